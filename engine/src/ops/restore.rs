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
    /// Where the restore may write; `None` for anywhere the process may.
    pub confine: Option<Confinement>,
}

/// Where a restore asked for over the API may write: a new (or, forced,
/// an existing) regular file below one of `dirs`, or one of `devices`.
/// Whoever holds a token must not become root's pen.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Folders whose files (at any depth) may be restore targets.
    pub dirs: Vec<PathBuf>,
    /// Block devices an admin listed as restore targets.
    pub devices: Vec<PathBuf>,
}

impl Confinement {
    /// The target with every folder on its way resolved, if it is allowed;
    /// the last component is kept as it is (the restore refuses to follow
    /// a link there).
    pub fn resolve(&self, target: &std::path::Path) -> Result<PathBuf, OpError> {
        let refuse = || {
            OpError::forbidden(format!(
                "{} is outside the restore folders ({}) and is not a listed restore device; \
                 restore below one of them, or have an admin add the folder to restore_dirs \
                 (or the device to restore_devices) in agent.toml",
                target.display(),
                self.dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(refuse());
        };
        let parent = parent.canonicalize().map_err(|e| {
            OpError::invalid(format!(
                "the folder of {} cannot be used: {e}",
                target.display()
            ))
        })?;
        let resolved = parent.join(name);
        let is_dev = std::fs::symlink_metadata(&resolved)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        if is_dev {
            let listed = self
                .devices
                .iter()
                .any(|d| d.canonicalize().is_ok_and(|d| d == resolved));
            return if listed { Ok(resolved) } else { Err(refuse()) };
        }
        let inside = self
            .dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| parent.starts_with(&d));
        if inside {
            Ok(resolved)
        } else {
            Err(refuse())
        }
    }
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
/// absolute, inside the confinement (and resolved there), is no image in
/// use and, unless forced, does not exist. Returns the manifest.
pub fn check(store: &dyn Store, opts: &mut RestoreOptions) -> Result<Manifest, OpError> {
    let m = store.manifest(&opts.snapshot)?;
    if !opts.target.is_absolute() {
        return Err(OpError::invalid(format!(
            "target {:?} must be an absolute path",
            opts.target.display().to_string()
        )));
    }
    if let Some(c) = &opts.confine {
        opts.target = c.resolve(&opts.target)?;
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
    if std::fs::symlink_metadata(&opts.target).is_ok() && !opts.force {
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
