//! The positional-read fallback: a few threads take chunks in order and
//! hand them to the caller's sink through a bounded channel.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{chunk_span, ReadError, ReadJob};

pub(super) fn read<E>(
    job: &ReadJob<'_>,
    sink: &mut dyn FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    let idxs: Vec<u64> = job.ranges.iter().flat_map(|r| r.clone()).collect();
    let next = AtomicUsize::new(0);
    let threads = job.depth.clamp(1, 4);
    let (tx, rx) = crossbeam_channel::bounded::<std::io::Result<(u64, Vec<u8>)>>(job.depth.max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (idxs, next) = (&idxs, &next);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&idx) = idxs.get(i) else { return };
                let (off, len) = chunk_span(job, idx);
                let mut buf = super::buffer(job, len);
                let r = job.file.read_exact_at(&mut buf, off).map(|()| (idx, buf));
                if tx.send(r).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        let mut result = Ok(());
        for r in &rx {
            match r {
                Ok((idx, buf)) => {
                    if let Err(e) = sink(idx, buf) {
                        result = Err(ReadError::Sink(e));
                        break;
                    }
                }
                Err(e) => {
                    result = Err(ReadError::Io(e));
                    break;
                }
            }
        }
        // Stop the readers: no more indexes, and the channel closes.
        next.store(usize::MAX / 2, Ordering::Relaxed);
        drop(rx);
        result
    })
}
