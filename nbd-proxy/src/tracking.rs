//! Changed block tracking in the proxy, following DESIGN.md's CBT rules.
//!
//! Every write, write-zeroes or trim calls [`Tracker::before_write`] before
//! its data is issued: the blocks are marked in the live bitmap and any
//! word that gained a bit is written to the bitmap file (page cache, no
//! fsync; see `novabackup_engine::cbt::persist`). When a checkpoint is
//! active the call also copies aside the old contents of frozen blocks the
//! backup has not read yet (copy-before-write, [`crate::cbw`]).
//!
//! A checkpoint ([`Tracker::checkpoint`]) swaps the live bitmap for a fresh
//! one under the same lock the write path takes, so every write is ordered
//! either before it (its bits are frozen) or after it (its bits are live).
//! A write that was marked before the swap but completes after it is marked
//! again in the live bitmap by [`Tracker::after_write`]: the backup may or
//! may not see its data, and the next backup reads the block in any case.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use novabackup_engine::cbt::persist::{self, BitmapFile, Trust};
use novabackup_engine::cbt::{CbtError, DirtyBitmap, Granularity};
use thiserror::Error;

use crate::checkpoint::{Checkpoint, CheckpointShared};

/// Errors of the tracker.
#[derive(Debug, Error)]
pub enum TrackError {
    /// The bitmap could not be read or saved.
    #[error(transparent)]
    Cbt(#[from] CbtError),
    /// Copy-before-write failed (reading the image or writing the copy).
    #[error("copy-before-write failed: {0}")]
    Cbw(std::io::Error),
    /// A checkpoint is already active for this disk.
    #[error("a backup checkpoint is already active for this disk; wait for that backup to finish")]
    CheckpointActive,
}

/// A snapshot of the tracker's state for `disk cbt`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CbtStatus {
    /// Block size in bytes.
    pub granularity: u64,
    /// Blocks in the image.
    pub blocks: u64,
    /// Dirty blocks in the live bitmap.
    pub dirty_blocks: u64,
    /// Bytes covered by dirty blocks.
    pub dirty_bytes: u64,
    /// Whether the bits can be trusted for an incremental backup.
    pub trusted: bool,
    /// Why not, if not.
    pub reason: Option<String>,
    /// A backup checkpoint is active.
    pub checkpoint_active: bool,
    /// The snapshot the bits start from (writes since its checkpoint).
    pub base: Option<String>,
}

/// Returned by [`Tracker::before_write`]; hand it to [`Tracker::after_write`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct WriteTicket {
    generation: u64,
}

pub(crate) struct State {
    pub(crate) live: DirtyBitmap,
    file: BitmapFile,
    pub(crate) trust: Trust,
    generation: u64,
    pub(crate) checkpoint: Option<Arc<CheckpointShared>>,
    base: Option<String>,
}

impl State {
    fn save(&mut self, clean: bool) -> Result<(), CbtError> {
        self.file
            .rewrite(&self.live, &self.trust, self.base.as_deref(), clean)
    }
}

/// The CBT state of one disk.
pub struct Tracker {
    state: Mutex<State>,
    /// A copy of `State::generation`, written under the lock, so that the
    /// common case of `after_write` (no checkpoint since the write was
    /// marked) takes no lock.
    generation: AtomicU64,
    frozen_path: PathBuf,
    cbw_dir: PathBuf,
    boot_id: String,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("frozen_path", &self.frozen_path)
            .finish()
    }
}

impl Tracker {
    /// Opens (or creates) the bitmap at `path` for an image of `size`
    /// bytes. A frozen bitmap left by a backup that never finished is
    /// merged back, so nothing it covered is lost.
    pub fn open(
        path: &Path,
        size: u64,
        granularity: Granularity,
        boot_id: &str,
    ) -> Result<Tracker, TrackError> {
        let persist::Opened {
            mut file,
            mut bitmap,
            mut trust,
            base,
        } = BitmapFile::open(path, size, granularity, boot_id)?;
        let frozen_path = path.with_extension("frozen");
        match persist::load_frozen(&frozen_path) {
            Ok(None) => {}
            Ok(Some(f)) if f.size() == size && f.granularity() == granularity => {
                bitmap.merge(&f);
                file.rewrite(&bitmap, &trust, base.as_deref(), false)?;
            }
            Ok(Some(_)) | Err(CbtError::Corrupt { .. }) => {
                bitmap.fill();
                trust = Trust::Untrusted(
                    "the bitmap of an unfinished backup could not be merged back; \
                     the next backup reads the whole disk"
                        .into(),
                );
                file.rewrite(&bitmap, &trust, base.as_deref(), false)?;
            }
            Err(e) => return Err(e.into()),
        }
        novabackup_engine::fsutil::remove_durable(&frozen_path).map_err(|source| CbtError::Io {
            path: frozen_path.clone(),
            source,
        })?;
        Ok(Tracker {
            generation: AtomicU64::new(0),
            state: Mutex::new(State {
                live: bitmap,
                file,
                trust,
                generation: 0,
                checkpoint: None,
                base,
            }),
            cbw_dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            frozen_path,
            boot_id: boot_id.to_string(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the bitmap with fewer
        // bits than before, so the state is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `[offset, offset+len)` dirty and persists it; copies frozen
    /// blocks aside when a checkpoint is active. Call before the data write
    /// is issued; if this fails, the write must not be issued.
    pub fn before_write(
        &self,
        offset: u64,
        len: u64,
        image: &File,
    ) -> Result<WriteTicket, TrackError> {
        let (generation, checkpoint) = {
            let mut s = self.lock();
            let words = s.live.mark(offset, len);
            s.file.write_words(&s.live, words)?;
            (s.generation, s.checkpoint.clone())
        };
        if let Some(cp) = checkpoint {
            cp.copy_before_write(offset, len, image)
                .map_err(TrackError::Cbw)?;
        }
        Ok(WriteTicket { generation })
    }

    /// Call when the write of `[offset, offset+len)` has completed. If a
    /// checkpoint was taken while it was in flight, its blocks are marked
    /// again in the new live bitmap (module doc).
    pub fn after_write(
        &self,
        ticket: WriteTicket,
        offset: u64,
        len: u64,
    ) -> Result<(), TrackError> {
        if self.generation.load(Ordering::SeqCst) == ticket.generation {
            return Ok(());
        }
        let mut s = self.lock();
        if s.generation != ticket.generation {
            let words = s.live.mark(offset, len);
            s.file.write_words(&s.live, words)?;
        }
        Ok(())
    }

    /// Freezes the live bitmap for a backup and starts a fresh one. With
    /// `protect_all` (a full backup, which reads every block) every block,
    /// not only the frozen ones, is copied before the guest overwrites it.
    pub fn checkpoint(self: &Arc<Self>, protect_all: bool) -> Result<Checkpoint, TrackError> {
        let mut s = self.lock();
        if s.checkpoint.is_some() {
            return Err(TrackError::CheckpointActive);
        }
        let frozen = s.live.clone();
        persist::save_frozen(&self.frozen_path, &frozen, &self.boot_id)?;
        let trust = std::mem::replace(&mut s.trust, Trust::Trusted);
        s.live.clear();
        if let Err(e) = s.save(false) {
            s.live = frozen;
            s.trust = trust;
            let _ = novabackup_engine::fsutil::remove_durable(&self.frozen_path);
            return Err(e.into());
        }
        s.generation += 1;
        self.generation.store(s.generation, Ordering::SeqCst);
        let shared = Arc::new(
            CheckpointShared::new(frozen, trust, protect_all, &self.cbw_dir)
                .map_err(TrackError::Cbw)?,
        );
        s.checkpoint = Some(shared.clone());
        Ok(Checkpoint::new(self.clone(), shared))
    }

    /// Ends the active checkpoint. `Ok(snapshot)`: the backup committed
    /// that snapshot, which becomes the base of the live bits. `Err(())`:
    /// it failed, and the frozen bits go back into the live bitmap (a
    /// failed backup loses nothing).
    pub(crate) fn end_checkpoint(&self, outcome: Result<&str, ()>) -> Result<(), TrackError> {
        let mut s = self.lock();
        let Some(cp) = s.checkpoint.take() else {
            return Ok(());
        };
        match outcome {
            Ok(snapshot) => {
                s.base = Some(snapshot.to_string());
                s.save(false)?;
            }
            Err(()) => {
                s.live.merge(cp.frozen());
                if !cp.trust().is_trusted() {
                    s.trust = cp.trust().clone();
                }
                s.save(false)?;
            }
        }
        novabackup_engine::fsutil::remove_durable(&self.frozen_path).map_err(|source| {
            CbtError::Io {
                path: self.frozen_path.clone(),
                source,
            }
        })?;
        Ok(())
    }

    /// Clears the live bitmap and trusts it from now on (operator reset).
    pub fn reset(&self) -> Result<(), TrackError> {
        let mut s = self.lock();
        s.live.clear();
        s.trust = Trust::Trusted;
        // The bits no longer hold every write since the base's checkpoint.
        s.base = None;
        s.save(false)?;
        Ok(())
    }

    /// Saves the bitmap with the clean-shutdown mark. An active checkpoint
    /// is merged back first: its backup cannot finish without us.
    pub fn shutdown(&self) -> Result<(), TrackError> {
        self.end_checkpoint(Err(()))?;
        self.lock().save(true)?;
        Ok(())
    }

    /// The tracker's state.
    pub fn status(&self) -> CbtStatus {
        let s = self.lock();
        CbtStatus {
            granularity: s.live.granularity().bytes(),
            blocks: s.live.blocks() as u64,
            dirty_blocks: s.live.count_dirty() as u64,
            dirty_bytes: s.live.dirty_bytes(),
            trusted: s.trust.is_trusted(),
            reason: match &s.trust {
                Trust::Trusted => None,
                Trust::Untrusted(r) => Some(r.clone()),
            },
            checkpoint_active: s.checkpoint.is_some(),
            base: s.base.clone(),
        }
    }

    /// The snapshot the live bits start from.
    pub fn base(&self) -> Option<String> {
        self.lock().base.clone()
    }

    /// A copy of the live bitmap and its trust.
    pub fn live(&self) -> (DirtyBitmap, Trust) {
        let s = self.lock();
        (s.live.clone(), s.trust.clone())
    }

    /// `qemu:dirty-bitmap` extents of the live bitmap over the range, as
    /// `(length, flags)`. These are the recorded bits as they are; whether
    /// they can be trusted is reported separately ([`Self::status`]), as
    /// QEMU keeps a bitmap's contents apart from its consistency.
    pub fn dirty_extents(&self, offset: u64, len: u32, max: usize) -> Vec<(u32, u32)> {
        let s = self.lock();
        s.live
            .extents(offset, len as u64)
            .take(max)
            .map(|e| {
                (
                    e.len as u32,
                    if e.dirty {
                        crate::proto::consts::STATE_DIRTY
                    } else {
                        0
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const G: u64 = 4096;

    fn setup(dir: &Path, blocks: u64) -> (Arc<Tracker>, File) {
        let img = dir.join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        for b in 0..blocks {
            f.write_all_at(&vec![b as u8; G as usize], b * G).unwrap();
        }
        let t = Tracker::open(
            &dir.join("d.cbt"),
            blocks * G,
            Granularity::new(G).unwrap(),
            "boot",
        )
        .unwrap();
        (Arc::new(t), f)
    }

    fn write(t: &Tracker, f: &File, off: u64, data: &[u8]) {
        let ticket = t.before_write(off, data.len() as u64, f).unwrap();
        f.write_all_at(data, off).unwrap();
        t.after_write(ticket, off, data.len() as u64).unwrap();
    }

    #[test]
    fn checkpoint_freezes_and_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let (t, f) = setup(dir.path(), 8);
        write(&t, &f, 0, &[1; 10]);
        write(&t, &f, 3 * G, &[1; 10]);
        let cp = t.checkpoint(false).unwrap();
        assert_eq!(cp.frozen().dirty_blocks().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(t.status().dirty_blocks, 0);
        assert!(matches!(
            t.checkpoint(false),
            Err(TrackError::CheckpointActive)
        ));
        write(&t, &f, 5 * G, &[1; 10]);
        cp.commit("vm@20260101T000000Z").unwrap();
        let (live, _) = t.live();
        assert_eq!(live.dirty_blocks().collect::<Vec<_>>(), vec![5]);
        assert!(!dir.path().join("d.frozen").exists());
    }

    #[test]
    fn abort_merges_back() {
        let dir = tempfile::tempdir().unwrap();
        let (t, f) = setup(dir.path(), 8);
        write(&t, &f, G, &[1; 10]);
        let cp = t.checkpoint(false).unwrap();
        write(&t, &f, 6 * G, &[1; 10]);
        cp.abort().unwrap();
        assert_eq!(t.live().0.dirty_blocks().collect::<Vec<_>>(), vec![1, 6]);
        // Dropping a checkpoint without commit is an abort too.
        let cp = t.checkpoint(false).unwrap();
        drop(cp);
        assert_eq!(t.live().0.dirty_blocks().collect::<Vec<_>>(), vec![1, 6]);
    }

    #[test]
    fn write_in_flight_across_checkpoint_is_marked_again() {
        let dir = tempfile::tempdir().unwrap();
        let (t, f) = setup(dir.path(), 8);
        let ticket = t.before_write(2 * G, 1, &f).unwrap();
        let cp = t.checkpoint(false).unwrap();
        f.write_all_at(&[9], 2 * G).unwrap();
        t.after_write(ticket, 2 * G, 1).unwrap();
        assert!(cp.frozen().is_dirty(2));
        assert!(t.live().0.is_dirty(2));
        cp.commit("vm@20260101T000000Z").unwrap();
    }

    #[test]
    fn copy_before_write_keeps_the_checkpoint_contents() {
        let dir = tempfile::tempdir().unwrap();
        let (t, f) = setup(dir.path(), 8);
        write(&t, &f, 2 * G, &[0xaa; 100]);
        write(&t, &f, 4 * G, &[0xbb; 100]);
        let mut at_checkpoint = vec![0u8; G as usize];
        f.read_exact_at(&mut at_checkpoint, 2 * G).unwrap();
        let cp = t.checkpoint(false).unwrap();
        // The guest overwrites frozen block 2 before the backup reads it.
        write(&t, &f, 2 * G + 50, &[0xcc; 4000]);
        // A second write to the same block keeps the first copy.
        write(&t, &f, 2 * G, &[0xdd; 10]);
        let mut buf = vec![0u8; G as usize];
        assert_eq!(cp.read_block(2, &f, &mut buf).unwrap(), G as usize);
        assert_eq!(buf, at_checkpoint);
        // Block 4 is read first, then overwritten: no copy needed, and the
        // read saw the checkpoint contents.
        cp.read_block(4, &f, &mut buf).unwrap();
        assert_eq!(&buf[..100], &[0xbb; 100]);
        write(&t, &f, 4 * G, &[0xee; 10]);
        assert_eq!(cp.copies(), 1);
        // Unfrozen blocks are never copied.
        write(&t, &f, 7 * G, &[1; 10]);
        assert_eq!(cp.copies(), 1);
        cp.commit("vm@20260101T000000Z").unwrap();
    }

    #[test]
    fn unfinished_checkpoint_is_merged_at_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (t, f) = setup(dir.path(), 8);
        write(&t, &f, G, &[1; 10]);
        let cp = t.checkpoint(false).unwrap();
        write(&t, &f, 7 * G, &[1; 10]);
        // Simulate kill -9: nothing runs on the way out.
        std::mem::forget(cp);
        drop(t);
        let t2 = Tracker::open(
            &dir.path().join("d.cbt"),
            8 * G,
            Granularity::new(G).unwrap(),
            "boot",
        )
        .unwrap();
        assert_eq!(t2.live().0.dirty_blocks().collect::<Vec<_>>(), vec![1, 7]);
        assert!(t2.status().trusted);
    }

    #[test]
    fn untrusted_survives_a_failed_full_backup_and_clears_after_success() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.cbt");
        {
            let (t, f) = setup(dir.path(), 8);
            write(&t, &f, G, &[1; 10]);
        }
        // Host crash: new boot id, no clean shutdown.
        let t = Arc::new(Tracker::open(&p, 8 * G, Granularity::new(G).unwrap(), "boot2").unwrap());
        assert!(!t.status().trusted);
        let cp = t.checkpoint(false).unwrap();
        assert!(!cp.trust().is_trusted());
        cp.abort().unwrap();
        assert!(!t.status().trusted);
        t.checkpoint(true)
            .unwrap()
            .commit("vm@20260101T000000Z")
            .unwrap();
        assert!(t.status().trusted);
        t.shutdown().unwrap();
        let t = Tracker::open(&p, 8 * G, Granularity::new(G).unwrap(), "boot3").unwrap();
        assert!(t.status().trusted, "clean shutdown is trusted after reboot");
    }
}
