//! Direct I/O (`O_DIRECT`) writes for bulk output, with the buffered path
//! as fallback.
//!
//! Why: on this class of machine a buffered write costs more CPU than the
//! data's SHA-256 (copying into fresh page-cache pages), while the same
//! bytes written with `O_DIRECT` cost almost no CPU and disk time that
//! overlaps with decoding (benches/RESULTS.md, "Restore and verify"). A restore is CPU-bound, so every copy it
//! avoids is wall time saved, and the final fsync has nothing left to
//! flush.
//!
//! Direct writes need the buffer, the file offset and the length aligned
//! to the device's logical block; [`ALIGN`] (4 KiB) covers every common
//! device. Filesystems that refuse `O_DIRECT` (some tmpfs, FUSE) fail the
//! open or the first write with `EINVAL`; [`DirectWriter`] then switches to
//! buffered writes for good, so the caller never sees the difference.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of buffers, offsets and lengths for direct writes.
pub const ALIGN: usize = 4096;

/// A zeroed byte buffer whose start is aligned to [`ALIGN`], built from an
/// over-allocated `Vec` (no unsafe code: the slice simply starts at the
/// first aligned byte).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }

    /// A buffer of `len` bytes taken from `pool` where it has one (its
    /// stale contents kept: for a caller that overwrites what it uses).
    /// Give it back with [`AlignedBuf::give_to`].
    pub fn pooled(pool: &crate::bufpool::BufPool, len: usize) -> AlignedBuf {
        let raw = pool.take_len(len + ALIGN);
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }

    /// Hands the memory to `pool`, for a later [`AlignedBuf::pooled`].
    pub fn give_to(self, pool: &crate::bufpool::BufPool) {
        pool.give(self.raw);
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Reads at `off` until `buf` is full or the file ends, and returns how
/// much it read: the end of a pack need not be aligned to what a direct
/// read asks for.
pub fn read_up_to(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Writes to one file through `O_DIRECT` where the request allows it and
/// through the page cache otherwise.
pub struct DirectWriter {
    buffered: File,
    direct: Option<File>,
    direct_ok: AtomicBool,
}

impl DirectWriter {
    /// Wraps `buffered` (already open for writing at `path`) and opens a
    /// second, direct descriptor on the same file when the filesystem
    /// allows it.
    pub fn new(buffered: File, path: &Path) -> DirectWriter {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let direct_ok = AtomicBool::new(direct.is_some());
        DirectWriter {
            buffered,
            direct,
            direct_ok,
        }
    }

    /// The buffered descriptor (for fsync, zero ranges, size queries).
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Whether direct writes are in use (false after a fallback).
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Writes all of `buf` at `off`: directly when both are aligned and
    /// the filesystem takes it, else buffered with early writeback.
    pub fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let aligned = (buf.as_ptr() as usize).is_multiple_of(ALIGN)
            && buf.len().is_multiple_of(ALIGN)
            && off.is_multiple_of(ALIGN as u64);
        if aligned && self.is_direct() {
            if let Some(d) = &self.direct {
                match d.write_all_at(buf, off) {
                    Ok(()) => return Ok(()),
                    // The filesystem or device refuses direct I/O after
                    // all (or wants a larger alignment): go buffered.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::debug!(
                            "direct writes refused ({e}); writing through the page cache"
                        );
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.buffered.write_all_at(buf, off)?;
        super::start_writeback(&self.buffered, off, buf.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4096, 65536 * 16 + 7] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn aligned_and_unaligned_writes_land_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(3 * 65536).unwrap();
        let w = DirectWriter::new(f, &path);
        let mut a = AlignedBuf::new(65536);
        a.fill(7);
        w.write_all_at(&a, 65536).unwrap();
        // Unaligned in length and offset: always buffered.
        w.write_all_at(&[9u8; 100], 2 * 65536 + 3).unwrap();
        w.file().sync_all().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[..65536].iter().all(|&x| x == 0));
        assert!(got[65536..2 * 65536].iter().all(|&x| x == 7));
        assert_eq!(&got[2 * 65536..2 * 65536 + 3], &[0, 0, 0]);
        assert!(got[2 * 65536 + 3..2 * 65536 + 103].iter().all(|&x| x == 9));
    }

    #[test]
    fn a_filesystem_without_direct_io_falls_back() {
        // /dev/shm is tmpfs; older kernels refuse O_DIRECT there, newer
        // ones take it. Either way the bytes must land.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let path = dir.path().join("out");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let w = DirectWriter::new(f, &path);
        let mut a = AlignedBuf::new(8192);
        a.fill(5);
        w.write_all_at(&a, 4096).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 12288);
        assert!(got[4096..].iter().all(|&x| x == 5));
    }
}
