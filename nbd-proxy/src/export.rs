//! Export backends: a raw image file or a block device, opened once and
//! shared by every connection to the export. Data reads and writes go
//! through the connection's I/O engine; this module holds the operations
//! both engines share: discard, zeroing, prefetch and the allocation map.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};
use thiserror::Error;

use crate::proto::consts::{tflag, STATE_HOLE, STATE_ZERO};
use crate::proto::handshake::{ExportInfo, MetaContext};
use crate::tracking::Tracker;

/// Largest READ or WRITE payload we accept (and advertise).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Errors opening an export.
#[derive(Debug, Error)]
pub enum ExportError {
    /// The image could not be opened.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image's file system is read-only to this process.
    #[error(
        "cannot open image {0} for writing: its file system is read-only to the agent (a \
         read-only mount, or the agent's systemd sandbox, which leaves writable only the folders \
         /etc/novabackup/agent.toml names: add the folder to image_dirs there, then run \
         `systemctl daemon-reload && systemctl restart novabackup`), or attach it read-only"
    )]
    ReadOnlyFs(PathBuf),
    /// The path is neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    NotAnImage(PathBuf),
}

/// What backs an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingKind {
    /// A regular file (TRIM punches holes).
    File,
    /// A block device.
    BlockDevice,
}

/// An open image.
#[derive(Debug)]
pub struct Image {
    /// The open file.
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Size in bytes, fixed at open.
    pub size: u64,
    /// File or block device.
    pub kind: BackingKind,
    /// Opened read-only.
    pub read_only: bool,
}

impl Image {
    /// Opens an image file or block device.
    pub fn open(path: &Path, read_only: bool) -> Result<Image, ExportError> {
        let err = |source| ExportError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EROFS) => ExportError::ReadOnlyFs(path.to_path_buf()),
                _ => err(e),
            })?;
        let ft = file.metadata().map_err(err)?.file_type();
        let kind = if ft.is_file() {
            BackingKind::File
        } else if ft.is_block_device() {
            BackingKind::BlockDevice
        } else {
            return Err(ExportError::NotAnImage(path.to_path_buf()));
        };
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        Ok(Image {
            file,
            path: path.to_path_buf(),
            size,
            kind,
            read_only,
        })
    }

    /// Discards a range: a hole in a file, a discard on a device. Trim is
    /// advisory, so a backend that cannot discard reports success.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    /// Makes a range read as zeroes. Without `no_hole` a file gets a hole;
    /// with it the blocks stay allocated. When the backend has no cheap way
    /// and `fast` is set, fails with `EOPNOTSUPP` (NBD_ENOTSUP) as
    /// NBD_CMD_FLAG_FAST_ZERO asks.
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fast: bool) -> io::Result<()> {
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if !no_hole
            && self
                .fallocate(FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep, offset, len)
                .is_ok()
        {
            return Ok(());
        }
        if self
            .fallocate(FallocateFlags::FALLOC_FL_ZERO_RANGE | keep, offset, len)
            .is_ok()
        {
            return Ok(());
        }
        if fast {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let zeroes = vec![0u8; (1 << 20).min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Asks the kernel to read a range ahead (NBD_CMD_CACHE).
    pub fn cache(&self, offset: u64, len: u64) {
        // Advisory: an error here changes nothing the client can see.
        let _ = nix::fcntl::posix_fadvise(
            self.file.as_raw_fd(),
            offset as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }

    /// `base:allocation` extents covering `[offset, offset+len)` as
    /// `(length, flags)`, at most `max` of them. Holes of a file read as
    /// zeroes; a block device reports all data.
    pub fn allocation(&self, offset: u64, len: u32, max: usize) -> Vec<(u32, u32)> {
        let end = offset + len as u64;
        if self.kind == BackingKind::BlockDevice {
            return vec![(len, 0)];
        }
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => end,
                // Cannot tell: report data, which is always correct.
                Err(_) => {
                    out.push(((end - pos) as u32, 0));
                    break;
                }
            };
            if data > pos {
                let stop = data.min(end);
                out.push(((stop - pos) as u32, STATE_HOLE | STATE_ZERO));
                pos = stop;
                continue;
            }
            let hole = lseek(fd, pos as i64, Whence::SeekHole)
                .map(|h| h as u64)
                .unwrap_or(end);
            let stop = hole.clamp(pos + 1, end);
            out.push(((stop - pos) as u32, 0));
            pos = stop;
        }
        out
    }

    /// Data extents `(offset, len)` of the whole image: what a full backup
    /// must read. Holes of a file are left out; a block device is all data.
    pub fn data_extents(&self) -> Vec<(u64, u64)> {
        if self.kind == BackingKind::BlockDevice {
            return vec![(0, self.size)];
        }
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(_) => return vec![(0, self.size)],
            };
            let hole = lseek(fd, data as i64, Whence::SeekHole)
                .map(|h| h as u64)
                .unwrap_or(self.size)
                .min(self.size);
            if hole > data {
                out.push((data, hole - data));
            }
            pos = hole.max(data + 1);
        }
        out
    }

    /// Flushes written data to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))
    }
}

/// An export: an image, its name and its change tracker.
#[derive(Debug)]
pub struct Export {
    /// The export name (the disk name).
    pub name: String,
    /// The backing image.
    pub image: Image,
    /// The CBT tracker recording every write.
    pub tracker: Arc<Tracker>,
    /// Request counters.
    pub stats: crate::stats::ExportStats,
    /// Client identities that may open it (see [`crate::access`]).
    pub allow: Vec<String>,
    /// For a mount or a live restore: fetches blocks from the snapshot
    /// before any request touches them (see [`crate::fill`]).
    pub filler: Option<Arc<crate::fill::Filler>>,
}

impl Export {
    /// The transmission flags we advertise. CAN_MULTI_CONN holds because
    /// every connection writes through the same page cache of one file, so
    /// a flush (fdatasync) on any connection covers writes completed on all.
    pub fn flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_DF
            | tflag::CAN_MULTI_CONN
            | tflag::SEND_CACHE;
        if self.image.read_only {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        }
        f
    }

    /// The filler while blocks are still missing from the image.
    pub fn filling(&self) -> Option<&crate::fill::Filler> {
        self.filler.as_deref().filter(|f| !f.is_complete())
    }

    /// The handshake's view of this export.
    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: format!(
                "novabackup disk {} ({})",
                self.name,
                self.image.path.display()
            ),
            size: self.image.size,
            flags: self.flags(),
            block_size: (1, 4096, MAX_PAYLOAD),
            contexts: vec![
                MetaContext::BaseAllocation,
                MetaContext::DirtyBitmap(crate::CBT_BITMAP_NAME.into()),
            ],
            allow: self.allow.clone(),
        }
    }
}
