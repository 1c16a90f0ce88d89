//! Reading chunk files ahead of a restore or a verify, with `O_DIRECT`, on
//! a thread of the store's own.
//!
//! Packs are written past the page cache (see `packfile`); reading them
//! back through it would fill it with fresh pages, which on this class of
//! machine cost more than the read itself. So the runs of neighbouring
//! chunks a reader announces ([`super::FastPaths::prefetch`]) are read with
//! one direct request each, by a thread, while the reader's threads decode
//! what came before; the chunk files wait here until taken. A reader
//! asking for a chunk still being read waits for it instead of reading it
//! twice. Where direct reads are refused (tmpfs, FUSE) the kernel is asked
//! to read ahead instead, and the chunk is read the usual way.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::lock;
use crate::digest::ChunkDigest;
use crate::fsutil::direct::{read_up_to, AlignedBuf, ALIGN};
use crate::store::chunkcache::ChunkCache;

/// Chunk files read ahead and not yet taken, in bytes at most. A reader
/// takes its chunks within a few batches; anything beyond this is left
/// over by a reader that stopped, and is dropped.
const BUDGET: usize = 64 << 20;

/// A range of one pack to read, and the chunk files in it.
pub(super) struct Run {
    /// The pack.
    pub path: PathBuf,
    /// Byte range of the pack.
    pub start: u64,
    /// End of the range (exclusive).
    pub end: u64,
    /// (offset in the pack, length, digest) of each chunk file wanted.
    pub members: Vec<(u64, u32, ChunkDigest)>,
}

impl Run {
    fn digests(&self) -> Vec<ChunkDigest> {
        self.members.iter().map(|(_, _, d)| *d).collect()
    }
}

/// The read-ahead of one store (module doc).
pub(super) struct Prefetcher {
    cache: Arc<ChunkCache>,
    /// The reading threads' queue, started with the first run.
    runs: Mutex<Option<crossbeam_channel::Sender<Run>>>,
}

impl Default for Prefetcher {
    fn default() -> Prefetcher {
        Prefetcher {
            cache: Arc::new(ChunkCache::new(BUDGET)),
            runs: Mutex::default(),
        }
    }
}

impl Prefetcher {
    /// Queues `run` for reading (its chunks already here or on their way
    /// are left out).
    pub(super) fn request(&self, mut run: Run) {
        let wanted: std::collections::HashSet<ChunkDigest> =
            self.cache.claim(&run.digests()).into_iter().collect();
        run.members.retain(|(_, _, d)| wanted.contains(d));
        if run.members.is_empty() {
            return;
        }
        let mut q = lock(&self.runs);
        let tx = q.get_or_insert_with(|| start(self.cache.clone()));
        if let Err(crossbeam_channel::SendError(run)) = tx.send(run) {
            // No thread (it could not start): the chunks are read on
            // demand, with the kernel's read-ahead.
            *q = None;
            drop(q);
            advise(&run);
            self.cache.arrive(&run.digests(), Vec::new());
        }
    }

    /// The chunk file of `d` if it was read ahead, waiting while it is
    /// being read.
    pub(super) fn take(&self, d: &ChunkDigest) -> Option<Vec<u8>> {
        self.cache.take(d)
    }

    /// Bytes held, and chunks being read (for tests).
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        let (_, bytes, reading) = self.cache.held();
        (bytes, reading)
    }
}

/// Threads reading runs at once: a single direct request at a time left
/// a restore's decoders waiting for chunks most of the time, while the
/// device also takes the restore's writes.
const READERS: usize = 4;

/// Starts the reading threads; they end when the store drops its queue.
fn start(cache: Arc<ChunkCache>) -> crossbeam_channel::Sender<Run> {
    let (tx, rx) = crossbeam_channel::unbounded::<Run>();
    for _ in 0..READERS {
        let (rx, cache) = (rx.clone(), cache.clone());
        let spawned = std::thread::Builder::new()
            .name("pack-reader".into())
            .spawn(move || {
                for run in rx {
                    let files = read(&run);
                    if files.is_none() {
                        advise(&run);
                    }
                    cache.arrive(&run.digests(), files.unwrap_or_default());
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to read packs ahead");
        }
    }
    tx
}

/// Reads a run with `O_DIRECT`; `None` when that cannot be done.
fn read(run: &Run) -> Option<Vec<(ChunkDigest, Vec<u8>)>> {
    let align = ALIGN as u64;
    let from = run.start / align * align;
    let to = run.end.next_multiple_of(align);
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&run.path)
        .ok()?;
    let mut buf = AlignedBuf::new((to - from) as usize);
    let got = read_up_to(&f, &mut buf, from).ok()?;
    if from + (got as u64) < run.end {
        return None;
    }
    Some(
        run.members
            .iter()
            .map(|&(off, len, d)| {
                let at = (off - from) as usize;
                (d, buf[at..at + len as usize].to_vec())
            })
            .collect(),
    )
}

/// Asks the kernel to read a run ahead into the page cache.
fn advise(run: &Run) {
    if let Ok(f) = File::open(&run.path) {
        let _ = nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            run.start as i64,
            (run.end - run.start) as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }
}
