//! Appending to a pack that is being filled, with direct I/O off the
//! workers' threads.
//!
//! Why: buffered writes put every stored byte into fresh page-cache pages.
//! On this class of machine (a microVM whose freed memory goes back to the
//! host) a fresh page costs a trip to the host, and growing the page cache
//! became the largest cost of a full backup (benches/RESULTS.md, "Packs
//! are written with `O_DIRECT`"). A store rarely reads back what it has
//! just written, so caching it buys little.
//!
//! So a [`PackWriter`] gathers appended bytes in an aligned buffer and,
//! each time the buffer is full, hands it to a thread of its own that
//! writes it with `O_DIRECT` (through [`DirectWriter`], which falls back
//! to buffered writes with early writeback where the filesystem refuses
//! direct I/O). The appender fills a second buffer meanwhile, so the
//! device's latency never stalls the pipeline. The unaligned tail stays in
//! memory until [`PackWriter::finish`] writes it, padded to the block
//! size, and cuts the file to its exact length.
//!
//! Nothing is lost when a write fails (a full disk): the buffer is kept,
//! the next append or the seal tries it again first and reports the
//! error, and bytes not yet on disk are read back from memory.
//!
//! The last [`RECENT`] buffers written stay readable from memory too. A
//! store server checks a snapshot's new index pages as it commits, and
//! those were uploaded just before: direct writes leave them out of the
//! page cache, so each page would be a read from the device.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::bufpool::BufPool;
use crate::fsutil::direct::{read_up_to, AlignedBuf, DirectWriter, ALIGN};

/// Bytes gathered before one direct write.
const STAGE: usize = 1 << 20;
/// Buffers already written that a pack keeps for reads (module doc): with
/// the one filling and the one in flight, four per open pack.
const RECENT: usize = 2;

/// Stage buffers kept from one pack for the next: a backup's pack is new,
/// and fresh stages (with the padded tail each sync writes) cost a page
/// fault and a cleared page every 4 KiB (see [`crate::bufpool`]).
static STAGES: BufPool = BufPool::new();

/// A buffer handed to the writing thread: `len` bytes from file offset `at`.
struct Job {
    buf: AlignedBuf,
    len: usize,
    at: u64,
}

/// The writing thread's end of the channels.
struct Flusher {
    jobs: crossbeam_channel::Sender<Job>,
    done: crossbeam_channel::Receiver<(Job, io::Result<()>)>,
}

/// Appends to one pack file (module doc).
pub(super) struct PackWriter {
    out: Arc<DirectWriter>,
    /// Bytes appended so far, on disk or not.
    len: u64,
    /// Bytes from `stage_at` on, not yet handed to the thread.
    stage: AlignedBuf,
    stage_len: usize,
    /// File offset of `stage[0]`, always a multiple of [`ALIGN`].
    stage_at: u64,
    spare: Option<AlignedBuf>,
    /// The last buffers written, oldest first, at most [`RECENT`].
    recent: std::collections::VecDeque<Job>,
    flusher: Option<Flusher>,
    in_flight: bool,
    /// Writes that failed, oldest first: tried again before anything else.
    failed: Vec<Job>,
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // The buffer in flight, if any, is the writing thread's.
        let stage = std::mem::replace(&mut self.stage, AlignedBuf::new(0));
        stage.give_to(&STAGES);
        if let Some(spare) = self.spare.take() {
            spare.give_to(&STAGES);
        }
        for job in self.recent.drain(..) {
            job.buf.give_to(&STAGES);
        }
    }
}

impl PackWriter {
    /// Appends to `file` (open for reading and writing at `path`, empty).
    pub(super) fn new(file: File, path: &Path) -> PackWriter {
        PackWriter {
            out: Arc::new(DirectWriter::new(file, path)),
            len: 0,
            stage: AlignedBuf::pooled(&STAGES, STAGE),
            stage_len: 0,
            stage_at: 0,
            spare: None,
            recent: std::collections::VecDeque::new(),
            flusher: None,
            in_flight: false,
            failed: Vec::new(),
        }
    }

    /// Bytes appended so far.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Appends `bytes` and returns their offset. An error is that of an
    /// earlier write, still failing; `bytes` were not taken then.
    pub(super) fn append(&mut self, bytes: &[u8]) -> io::Result<u64> {
        self.retry_failed()?;
        let at = self.len;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = (STAGE - self.stage_len).min(rest.len());
            self.stage[self.stage_len..self.stage_len + n].copy_from_slice(&rest[..n]);
            self.stage_len += n;
            rest = &rest[n..];
            if self.stage_len == STAGE {
                self.hand_over();
            }
        }
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Reads `len` bytes at `off`, from memory where they are not on disk
    /// yet.
    pub(super) fn read_at(&mut self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        self.wait();
        if let Some(bytes) = self.in_memory(off, len) {
            return Ok(bytes);
        }
        let mut buf = vec![0u8; len];
        let on_disk = self.stage_at.saturating_sub(off).min(len as u64) as usize;
        let got = read_up_to(self.out.file(), &mut buf[..on_disk], off)?;
        // Only a failed write, kept below, leaves a hole short of the end.
        if got < on_disk && self.failed.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Memory holds the newest bytes of the ranges it covers.
        self.copy_from_memory(off, &mut buf);
        Ok(buf)
    }

    /// `len` bytes at `off` if the buffers kept in memory hold all of them
    /// (every buffer holds its range as the file does or will).
    fn in_memory(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        // The pieces cover disjoint ranges, so their overlaps add up.
        let held: usize = self.in_memory_at(off, len).map(|(_, b)| b.len()).sum();
        (held == len).then(|| {
            let mut buf = vec![0u8; len];
            self.copy_from_memory(off, &mut buf);
            buf
        })
    }

    /// Copies into `buf`, which starts at file offset `off`, what memory
    /// holds of its range.
    fn copy_from_memory(&self, off: u64, buf: &mut [u8]) {
        for (from, bytes) in self.in_memory_at(off, buf.len()) {
            let at = (from - off) as usize;
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// The parts of `len` bytes at `off` that memory holds, each with its
    /// file offset: written buffers kept, failed writes, the stage.
    fn in_memory_at(&self, off: u64, len: usize) -> impl Iterator<Item = (u64, &[u8])> {
        let end = off + len as u64;
        self.recent
            .iter()
            .chain(&self.failed)
            .map(|j| (j.at, &j.buf[..j.len]))
            .chain(std::iter::once((
                self.stage_at,
                &self.stage[..self.stage_len],
            )))
            .filter_map(move |(at, bytes)| {
                let from = off.max(at);
                let to = end.min(at + bytes.len() as u64);
                (from < to).then(|| (from, &bytes[(from - at) as usize..(to - at) as usize]))
            })
    }

    /// Writes everything appended so far to the file (the tail padded to
    /// the block size, which later writes overwrite), so that readers of
    /// the file see it.
    pub(super) fn write_through(&mut self) -> io::Result<()> {
        self.finish(&[]).map(|_| ())
    }

    /// Writes everything appended so far followed by `trailer`, and cuts
    /// the file to their exact length. Changes nothing the writer holds,
    /// so a failed call can be repeated.
    pub(super) fn finish(&mut self, trailer: &[u8]) -> io::Result<u64> {
        self.wait();
        self.retry_failed()?;
        let total = self.stage_len + trailer.len();
        let mut last = AlignedBuf::pooled(&STAGES, total.next_multiple_of(ALIGN));
        last[..self.stage_len].copy_from_slice(&self.stage[..self.stage_len]);
        last[self.stage_len..total].copy_from_slice(trailer);
        last[total..].fill(0);
        let written = self.out.write_all_at(&last, self.stage_at);
        last.give_to(&STAGES);
        written?;
        let end = self.len + trailer.len() as u64;
        self.out.file().set_len(end)?;
        Ok(end)
    }

    /// Hands the full stage to the writing thread and starts a new one.
    fn hand_over(&mut self) {
        self.wait();
        let next = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedBuf::pooled(&STAGES, STAGE));
        let job = Job {
            buf: std::mem::replace(&mut self.stage, next),
            len: STAGE,
            at: self.stage_at,
        };
        self.stage_at += STAGE as u64;
        self.stage_len = 0;
        let flusher = self.flusher.get_or_insert_with(|| start(self.out.clone()));
        match flusher.jobs.send(job) {
            Ok(()) => self.in_flight = true,
            // The thread is gone (it cannot panic short of a bug): the
            // bytes stay in memory and the next append writes them.
            Err(crossbeam_channel::SendError(job)) => self.failed.push(job),
        }
    }

    /// Waits for the buffer in flight, if any, and keeps it for reuse or,
    /// when its write failed, for another try.
    fn wait(&mut self) {
        if !self.in_flight {
            return;
        }
        self.in_flight = false;
        let Some(f) = &self.flusher else { return };
        match f.done.recv() {
            Ok((job, Ok(()))) => self.keep(job),
            Ok((job, Err(e))) => {
                tracing::warn!(error = %e, "a pack write failed; it is kept in memory and tried again");
                self.failed.push(job);
            }
            // Unreachable: the thread answers every job it takes.
            Err(_) => self.flusher = None,
        }
    }

    fn retry_failed(&mut self) -> io::Result<()> {
        while let Some(job) = self.failed.first() {
            self.out.write_all_at(&job.buf[..job.len], job.at)?;
            let job = self.failed.remove(0);
            self.keep(job);
        }
        Ok(())
    }

    /// Keeps a written buffer for reads; the oldest kept becomes the spare.
    fn keep(&mut self, job: Job) {
        self.recent.push_back(job);
        if self.recent.len() > RECENT {
            if let Some(old) = self.recent.pop_front() {
                if let Some(spare) = self.spare.replace(old.buf) {
                    spare.give_to(&STAGES);
                }
            }
        }
    }
}

/// Starts the writing thread of one pack; it ends when its writer drops.
fn start(out: Arc<DirectWriter>) -> Flusher {
    let (jobs, rx) = crossbeam_channel::bounded::<Job>(1);
    let (tx, done) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name("pack-writer".into())
        .spawn(move || {
            for job in rx {
                let r = out.write_all_at(&job.buf[..job.len], job.at);
                if tx.send((job, r)).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        // Without a thread the channel is closed: every buffer is kept
        // and written by the appender itself (`retry_failed`).
        tracing::warn!(error = %e, "no thread for pack writes; writing inline");
    }
    Flusher { jobs, done }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> (tempfile::TempDir, PackWriter, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pack");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (dir, PackWriter::new(f, &path), path)
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn appended_bytes_read_back_before_and_after_finish() {
        let (_d, mut w, path) = writer();
        let mut want = Vec::new();
        // Odd sizes so appends straddle stage boundaries.
        for (i, n) in [7usize, 65_543, STAGE - 3, 100, 2 * STAGE + 11, 4096]
            .into_iter()
            .enumerate()
        {
            let b = bytes(n, i as u8);
            let at = w.append(&b).unwrap();
            assert_eq!(at, want.len() as u64);
            want.extend_from_slice(&b);
            assert_eq!(w.len(), want.len() as u64);
            // Anything appended reads back at once, on disk or not.
            assert_eq!(w.read_at(at, n).unwrap(), b);
            assert_eq!(w.read_at(0, 7).unwrap(), want[..7]);
        }
        let mid = STAGE as u64 - 50;
        assert_eq!(
            w.read_at(mid, 100).unwrap(),
            want[mid as usize..mid as usize + 100]
        );
        let end = w.finish(b"TRAILER").unwrap();
        want.extend_from_slice(b"TRAILER");
        assert_eq!(end, want.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // Finishing again gives the same file.
        w.finish(b"TRAILER").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn the_last_buffers_written_are_read_from_memory() {
        use std::os::unix::fs::FileExt;
        let (_d, mut w, path) = writer();
        let want = bytes(3 * STAGE + 100, 9);
        w.append(&want).unwrap();
        // Three buffers written (the last once a read waits for it), the
        // first of them no longer kept. Damage what the file holds of all
        // three, as the device only could: reads show what memory keeps.
        assert_eq!(w.read_at(5, 10).unwrap(), want[5..15]);
        let disk = File::options().write(true).open(&path).unwrap();
        disk.write_all_at(&vec![0xee; 3 * STAGE], 0).unwrap();
        let from = STAGE as u64 + 10;
        assert_eq!(
            w.read_at(from, 2 * STAGE).unwrap(),
            want[from as usize..from as usize + 2 * STAGE]
        );
        // Across the tail still filling.
        let from = 3 * STAGE as u64 - 30;
        assert_eq!(w.read_at(from, 100).unwrap(), want[from as usize..][..100]);
        // The first buffer's bytes come from the file.
        assert_eq!(w.read_at(5, 10).unwrap(), vec![0xee; 10]);
        let from = STAGE as u64 - 4;
        let mut mixed = vec![0xee; 4];
        mixed.extend_from_slice(&want[STAGE..STAGE + 4]);
        assert_eq!(w.read_at(from, 8).unwrap(), mixed);
    }

    #[test]
    fn written_through_bytes_are_in_the_file_and_later_appends_overwrite_the_padding() {
        let (_d, mut w, path) = writer();
        w.append(&bytes(5000, 1)).unwrap();
        w.write_through().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes(5000, 1));
        w.append(&bytes(3000, 2)).unwrap();
        w.finish(&[]).unwrap();
        let mut want = bytes(5000, 1);
        want.extend(bytes(3000, 2));
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
