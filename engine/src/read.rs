//! Reading chunk ranges of an image with many reads in flight: through
//! io_uring ([`uring`]) or, where the kernel has no io_uring, with pread on
//! a few threads ([`pread`]). Both deliver each chunk to a sink as soon as
//! it is read, in completion order.

mod pread;
mod uring;

use std::fs::File;
use std::io;
use std::ops::Range;

/// Which reader to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadEngine {
    /// io_uring.
    Uring,
    /// Positional reads.
    Pread,
}

impl ReadEngine {
    /// io_uring if it works here, else pread.
    pub fn probe() -> ReadEngine {
        if uring::available() {
            ReadEngine::Uring
        } else {
            ReadEngine::Pread
        }
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct ReadJob<'a> {
    /// The image.
    pub file: &'a File,
    /// Its size (the last chunk may be short).
    pub size: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// Chunk index ranges.
    pub ranges: &'a [Range<u64>],
    /// Reads in flight.
    pub depth: usize,
    /// Buffers the sink is done with, reused before allocating new ones
    /// (a fresh zeroed buffer per chunk costs memset and page faults).
    pub recycled: Option<&'a crate::bufpool::BufPool>,
}

/// Errors of a read: the image's, or the sink's.
#[derive(Debug)]
pub enum ReadError<E> {
    /// Reading the image failed.
    Io(io::Error),
    /// The sink refused a chunk.
    Sink(E),
}

/// Reads every chunk of the job and passes `(chunk index, bytes)` to `sink`.
pub fn read_chunks<E>(
    engine: ReadEngine,
    job: &ReadJob<'_>,
    sink: &mut dyn FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    match engine {
        ReadEngine::Uring => uring::read(job, sink),
        ReadEngine::Pread => pread::read(job, sink),
    }
}

fn chunk_span(job: &ReadJob<'_>, idx: u64) -> (u64, usize) {
    let off = idx * job.chunk_size;
    (off, (job.size - off).min(job.chunk_size) as usize)
}

/// A buffer of `len` bytes for a read: a recycled one if there is one (its
/// stale contents are overwritten before the sink sees it), else a new one.
fn buffer(job: &ReadJob<'_>, len: usize) -> Vec<u8> {
    match job.recycled {
        Some(pool) => pool.take_len(len),
        None => vec![0u8; len],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn both_engines_read_the_same_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let size = 37 * 4096 + 100;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let ranges = [0..3, 5..6, 9..10];
        for engine in [ReadEngine::Uring, ReadEngine::Pread] {
            let mut got = Vec::new();
            let job = ReadJob {
                file: &f,
                size: size as u64,
                chunk_size: 16384,
                ranges: &ranges,
                depth: 4,
                recycled: None,
            };
            read_chunks::<()>(engine, &job, &mut |i, b| {
                got.push((i, b));
                Ok(())
            })
            .unwrap();
            got.sort();
            assert_eq!(
                got.iter().map(|g| g.0).collect::<Vec<_>>(),
                vec![0, 1, 2, 5, 9]
            );
            for (i, b) in got {
                let off = i as usize * 16384;
                let end = (off + 16384).min(size);
                assert_eq!(b, data[off..end], "{engine:?} chunk {i}");
            }
        }
        // The sink's error stops the read.
        let job = ReadJob {
            file: &f,
            size: size as u64,
            chunk_size: 4096,
            ranges: &[0..15, 15..30],
            depth: 8,
            recycled: None,
        };
        let r = read_chunks(ReadEngine::Uring, &job, &mut |_, _| Err("stop"));
        assert!(matches!(r, Err(ReadError::Sink("stop"))));
        let _ = f.read_at(&mut [0u8; 1], 0);
    }
}
