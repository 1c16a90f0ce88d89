//! How operations reach a disk and its change tracking. The NBD proxy
//! implements [`TrackedDisk`] for its exports; tests implement it with a
//! plain file and an in-memory bitmap, so every operation runs without a
//! proxy.

use std::fs::File;

use crate::backup::PointInTime;
use crate::cbt::persist::Trust;
use crate::cbt::DirtyBitmap;

/// Why a tracker could not start or end a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// A checkpoint is active already (a backup of the disk is running).
    #[error("a backup checkpoint of this disk is active; wait for its backup to finish")]
    CheckpointActive,
    /// The tracker's files could not be written.
    #[error("change tracking failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What a tracker says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerState {
    /// Block size in bytes.
    pub granularity: u64,
    /// Whether a checkpoint is active.
    pub checkpoint_active: bool,
    /// The snapshot the live bits start from, as the tracker recorded it.
    pub base: Option<String>,
}

/// A disk a backup can read, with its change tracking.
pub trait TrackedDisk: Send + Sync {
    /// The disk's name.
    fn name(&self) -> &str;
    /// The image, opened for reading.
    fn image(&self) -> &File;
    /// The image's size in bytes.
    fn size(&self) -> u64;
    /// The byte ranges of the image that may hold data (a full backup
    /// skips the rest); the whole image when that cannot be known.
    fn data_extents(&self) -> Vec<(u64, u64)>;
    /// The tracker's state.
    fn tracking(&self) -> TrackerState;
    /// Whether the live bits can be trusted now.
    fn live_trust(&self) -> Trust;
    /// Freezes the live bits and starts a fresh set. With `protect_all`
    /// every block, not only the frozen ones, keeps its contents at the
    /// checkpoint for the backup's reads.
    fn checkpoint(&self, protect_all: bool) -> Result<Box<dyn Checkpoint>, TrackerError>;
}

/// A frozen bitmap with point-in-time reads; ended by exactly one of
/// [`Checkpoint::commit`] or [`Checkpoint::abort`] (dropping it aborts).
pub trait Checkpoint: PointInTime + Send {
    /// The blocks written before the checkpoint.
    fn frozen(&self) -> &DirtyBitmap;
    /// Whether the frozen bits can be trusted.
    fn trust(&self) -> &Trust;
    /// Blocks copied aside since the checkpoint began.
    fn copies(&self) -> usize;
    /// The backup committed `snapshot`: the live bits now start there.
    fn commit(self: Box<Self>, snapshot: &str) -> Result<(), TrackerError>;
    /// The backup failed: the frozen bits go back into the live ones.
    fn abort(self: Box<Self>) -> Result<(), TrackerError>;
}
