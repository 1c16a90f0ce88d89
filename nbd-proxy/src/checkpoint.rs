//! A backup checkpoint: the frozen bitmap handed to the engine, and the
//! point-in-time view of the image it reads through. Blocks are read with
//! [`Checkpoint::read_block`], which returns the contents the block had at
//! the checkpoint even if the guest has overwritten it since (the old data
//! was copied aside first, see [`crate::cbw`]). [`Checkpoint::commit`] ends
//! a successful backup; [`Checkpoint::abort`] (or dropping it) merges the
//! frozen bits back into the live bitmap.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use novabackup_engine::cbt::persist::Trust;
use novabackup_engine::cbt::DirtyBitmap;

use crate::cbw::CopyStore;
use crate::tracking::{TrackError, Tracker};

/// State shared between the checkpoint and the write path.
#[derive(Debug)]
pub struct CheckpointShared {
    frozen: DirtyBitmap,
    trust: Trust,
    /// Protect every block (a full backup), not only the frozen ones.
    protect_all: bool,
    copies: CopyStore,
}

impl CheckpointShared {
    pub(crate) fn new(
        frozen: DirtyBitmap,
        trust: Trust,
        protect_all: bool,
        dir: &Path,
    ) -> io::Result<Self> {
        let copies = CopyStore::new(dir, frozen.blocks())?;
        Ok(CheckpointShared {
            frozen,
            trust,
            protect_all,
            copies,
        })
    }

    pub(crate) fn frozen(&self) -> &DirtyBitmap {
        &self.frozen
    }

    pub(crate) fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Copies aside every frozen, not yet read block of the range.
    pub(crate) fn copy_before_write(&self, offset: u64, len: u64, image: &File) -> io::Result<()> {
        for block in self.frozen.block_range(offset, len) {
            if self.protect_all || self.frozen.is_dirty(block) {
                self.copies.preserve(block, self.block_span(block), image)?;
            }
        }
        Ok(())
    }

    fn block_span(&self, block: usize) -> (u64, usize) {
        let g = self.frozen.granularity().bytes();
        let start = block as u64 * g;
        (start, (self.frozen.size() - start).min(g) as usize)
    }
}

/// A frozen bitmap with point-in-time reads (module doc).
#[derive(Debug)]
pub struct Checkpoint {
    tracker: Arc<Tracker>,
    shared: Arc<CheckpointShared>,
    finished: bool,
}

impl Checkpoint {
    pub(crate) fn new(tracker: Arc<Tracker>, shared: Arc<CheckpointShared>) -> Self {
        Checkpoint {
            tracker,
            shared,
            finished: false,
        }
    }

    /// The blocks written before the checkpoint (since the last one).
    pub fn frozen(&self) -> &DirtyBitmap {
        &self.shared.frozen
    }

    /// Whether the frozen bits can be trusted. If not, the backup must read
    /// the whole disk.
    pub fn trust(&self) -> &Trust {
        &self.shared.trust
    }

    /// Reads `block` as it was at the checkpoint into `buf` (at least one
    /// granularity long); returns the byte count (the last block may be
    /// short). Any block can be read, frozen or not; only frozen blocks are
    /// protected from later guest writes.
    pub fn read_block(&self, block: usize, image: &File, buf: &mut [u8]) -> io::Result<usize> {
        let (offset, len) = self.shared.block_span(block);
        let buf = &mut buf[..len];
        std::os::unix::fs::FileExt::read_exact_at(image, buf, offset)?;
        self.shared.copies.take_or_mark_read(block, buf)?;
        Ok(len)
    }

    /// Settles a buffer read from the image at `offset` (block-aligned):
    /// each block the guest overwrote since the checkpoint is replaced by
    /// its copy, and every block is marked read, so later guest writes to
    /// it need no copy.
    pub fn settle(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.shared.frozen.granularity().bytes();
        debug_assert_eq!(offset % g, 0, "reads are block-aligned");
        for (i, part) in buf.chunks_mut(g as usize).enumerate() {
            let block = (offset / g) as usize + i;
            self.shared.copies.take_or_mark_read(block, part)?;
        }
        Ok(())
    }

    /// Number of blocks copied aside since the checkpoint began.
    pub fn copies(&self) -> usize {
        self.shared.copies.count()
    }

    /// The backup committed `snapshot`: drop the frozen bits and the
    /// copies; the live bits now hold every write since this snapshot.
    pub fn commit(mut self, snapshot: &str) -> Result<(), TrackError> {
        self.finished = true;
        self.tracker.end_checkpoint(Ok(snapshot))
    }

    /// The backup failed: merge the frozen bits back into the live bitmap.
    pub fn abort(mut self) -> Result<(), TrackError> {
        self.finished = true;
        self.tracker.end_checkpoint(Err(()))
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.tracker.end_checkpoint(Err(())) {
                tracing::error!("merging back the bits of an abandoned checkpoint failed: {e}");
            }
        }
    }
}

impl novabackup_engine::backup::PointInTime for Checkpoint {
    fn settle(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Checkpoint::settle(self, offset, buf)
    }
}

fn tracker_error(e: TrackError) -> novabackup_engine::ops::tracker::TrackerError {
    use novabackup_engine::ops::tracker::TrackerError;
    match e {
        TrackError::CheckpointActive => TrackerError::CheckpointActive,
        e => TrackerError::Failed(Box::new(e)),
    }
}

impl novabackup_engine::ops::tracker::Checkpoint for Checkpoint {
    fn frozen(&self) -> &DirtyBitmap {
        Checkpoint::frozen(self)
    }
    fn trust(&self) -> &Trust {
        Checkpoint::trust(self)
    }
    fn copies(&self) -> usize {
        Checkpoint::copies(self)
    }
    fn commit(
        self: Box<Self>,
        snapshot: &str,
    ) -> Result<(), novabackup_engine::ops::tracker::TrackerError> {
        Checkpoint::commit(*self, snapshot).map_err(tracker_error)
    }
    fn abort(self: Box<Self>) -> Result<(), novabackup_engine::ops::tracker::TrackerError> {
        Checkpoint::abort(*self).map_err(tracker_error)
    }
}

/// An export is a disk the engine's operations can back up: its image,
/// read through this tracker's checkpoints.
impl novabackup_engine::ops::tracker::TrackedDisk for crate::Export {
    fn name(&self) -> &str {
        &self.name
    }
    fn image(&self) -> &File {
        &self.image.file
    }
    fn size(&self) -> u64 {
        self.image.size
    }
    fn data_extents(&self) -> Vec<(u64, u64)> {
        self.image.data_extents()
    }
    fn tracking(&self) -> novabackup_engine::ops::tracker::TrackerState {
        let s = self.tracker.status();
        novabackup_engine::ops::tracker::TrackerState {
            granularity: s.granularity,
            checkpoint_active: s.checkpoint_active,
            base: s.base,
        }
    }
    fn live_trust(&self) -> Trust {
        self.tracker.live().1
    }
    fn checkpoint(
        &self,
        protect_all: bool,
    ) -> Result<
        Box<dyn novabackup_engine::ops::tracker::Checkpoint>,
        novabackup_engine::ops::tracker::TrackerError,
    > {
        let cp = self
            .tracker
            .checkpoint(protect_all)
            .map_err(tracker_error)?;
        Ok(Box::new(cp))
    }
}
