//! A restore job: a snapshot back to a file or block device, every chunk
//! checked against its digest. The checks that need no data run first
//! ([`check`]), so an API call fails at once instead of as a job.

use std::path::PathBuf;

use crate::format::manifest::Manifest;
use crate::ids::SnapshotId;
use crate::progress::Progress;
use crate::restore::{self, RestoreStats};
use crate::store::Store;

use super::error::OpError;

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// The target file or block device (an absolute path).
    pub target: PathBuf,
    /// Overwrite an existing target.
    pub force: bool,
    /// Threads.
    pub workers: usize,
    /// Images in use, by disk name: never a target (the images of attached
    /// disks, which a restore would overwrite under a running guest).
    pub in_use: Vec<(String, PathBuf)>,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RestoreReport {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Where it went.
    pub target: PathBuf,
    /// Bytes, chunks, time.
    pub stats: RestoreStats,
}

/// The checks before a restore starts: the snapshot exists, the target is
/// absolute, is no image in use and, unless forced, does not exist.
/// Returns the manifest.
pub fn check(store: &dyn Store, opts: &RestoreOptions) -> Result<Manifest, OpError> {
    let m = store.manifest(&opts.snapshot)?;
    if !opts.target.is_absolute() {
        return Err(OpError::invalid(format!(
            "target {:?} must be an absolute path",
            opts.target.display().to_string()
        )));
    }
    if let Some((disk, _)) = opts
        .in_use
        .iter()
        .find(|(_, image)| crate::fsutil::same_file(image, &opts.target))
    {
        return Err(OpError::conflict(format!(
            "{} is the image of attached disk {disk}; detach it before restoring over it",
            opts.target.display()
        )));
    }
    if opts.target.exists() && !opts.force {
        return Err(OpError::conflict(format!(
            "{} exists; pass --force to overwrite it",
            opts.target.display()
        )));
    }
    Ok(m)
}

/// Restores a snapshot.
pub fn restore(
    store: &dyn Store,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreReport, OpError> {
    let m = store.manifest(&opts.snapshot)?;
    let stats = restore::restore(store, &m, &opts.target, opts.force, opts.workers, progress)?;
    Ok(RestoreReport {
        snapshot: opts.snapshot.clone(),
        target: opts.target.clone(),
        stats,
    })
}
