//! Copy-before-write storage: old contents of frozen blocks that the guest
//! overwrites before the backup has read them. Copies go to an unlinked
//! temporary file in the state folder (not RAM: a busy guest during a long
//! backup could copy gigabytes), indexed by block.
//!
//! Races between a guest write and the backup's read of the same block are
//! settled without holding a lock across I/O of the image:
//! - a writer reads the old data, then, under the lock, stores it only if
//!   the block is neither copied nor already read; then it writes;
//! - the backup reads the image, then, under the lock, replaces what it read
//!   with the copy if one exists, and marks the block read.
//!
//! A copy is always stored before its write is issued, so if the backup's
//! read raced with that write, the backup finds the copy afterwards.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use bitvec::prelude::*;

#[derive(Debug)]
struct Inner {
    read: BitVec<u64, Lsb0>,
    index: HashMap<usize, (u64, usize)>,
    next: u64,
    made: usize,
}

/// Copies of frozen blocks (module doc).
#[derive(Debug)]
pub struct CopyStore {
    file: File,
    inner: Mutex<Inner>,
}

impl CopyStore {
    /// An empty store for `blocks` blocks, backed by a file in `dir`.
    pub fn new(dir: &Path, blocks: usize) -> io::Result<Self> {
        Ok(CopyStore {
            file: tempfile_in(dir)?,
            inner: Mutex::new(Inner {
                read: bitvec![u64, Lsb0; 0; blocks],
                index: HashMap::new(),
                next: 0,
                made: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn needed(i: &Inner, block: usize) -> bool {
        !i.read[block] && !i.index.contains_key(&block)
    }

    /// Called by the write path before it overwrites `block`.
    pub fn preserve(
        &self,
        block: usize,
        (offset, len): (u64, usize),
        image: &File,
    ) -> io::Result<()> {
        if !Self::needed(&self.lock(), block) {
            return Ok(());
        }
        let mut old = vec![0u8; len];
        image.read_exact_at(&mut old, offset)?;
        let mut i = self.lock();
        if Self::needed(&i, block) {
            let at = i.next;
            self.file.write_all_at(&old, at)?;
            i.next += len as u64;
            i.index.insert(block, (at, len));
            i.made += 1;
        }
        Ok(())
    }

    /// Called by the backup after reading `block` from the image into
    /// `buf`: swaps in the copy if there is one, and marks the block read.
    pub fn take_or_mark_read(&self, block: usize, buf: &mut [u8]) -> io::Result<()> {
        let mut i = self.lock();
        if let Some((at, len)) = i.index.remove(&block) {
            self.file.read_exact_at(&mut buf[..len], at)?;
        }
        i.read.set(block, true);
        Ok(())
    }

    /// Blocks copied aside since the checkpoint began.
    pub fn count(&self) -> usize {
        self.lock().made
    }
}

fn tempfile_in(dir: &Path) -> io::Result<File> {
    // O_TMPFILE: never visible, freed by the kernel when we close it or die.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .or_else(|_| {
            let p = dir.join(format!(
                ".cbw.{}.{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)?;
            std::fs::remove_file(&p)?;
            Ok(f)
        })
}

use std::os::unix::fs::OpenOptionsExt;
