//! Operations on stored snapshots: list, delete (never a protected one),
//! protect, and garbage collection of what no snapshot references.

use crate::format::manifest::{Annotation, Manifest};
use crate::ids::{DiskName, SnapshotId};
use crate::progress::Progress;
use crate::store::{GcOptions, GcReport, Store};

use super::error::OpError;

/// Snapshots, oldest first, optionally of one disk. Damaged manifests are
/// logged and left out.
pub fn list(store: &dyn Store, disk: Option<&DiskName>) -> Result<Vec<Manifest>, OpError> {
    let (list, damaged) = store.list(disk)?;
    for d in damaged {
        tracing::error!("{d}");
    }
    Ok(list)
}

/// Deletes a snapshot unless it is protected.
pub fn delete(store: &dyn Store, id: &SnapshotId) -> Result<(), OpError> {
    if store.manifest(id)?.protected {
        return Err(OpError::conflict(format!(
            "snapshot {id} is protected; `novabackup snapshot unprotect {id}` first"
        )));
    }
    store.delete(id)?;
    tracing::info!(snapshot = %id, "snapshot deleted");
    Ok(())
}

/// Protects a snapshot from pruning and deletion, or lifts that.
pub fn protect(store: &dyn Store, id: &SnapshotId, protected: bool) -> Result<Manifest, OpError> {
    let a = Annotation {
        protected: Some(protected),
        ..Default::default()
    };
    let m = store.annotate(id, &a)?;
    tracing::info!(snapshot = %id, protected, "snapshot protection changed");
    Ok(m)
}

/// Fails unless `opts` make sense (before a collection starts).
pub fn check_gc(opts: &GcOptions) -> Result<(), OpError> {
    if opts.min_garbage_percent > 100 {
        return Err(OpError::invalid(
            "min_garbage_percent is a percentage (0-100)",
        ));
    }
    Ok(())
}

/// Removes every chunk and index page no snapshot references.
pub fn gc(store: &dyn Store, opts: &GcOptions, progress: &Progress) -> Result<GcReport, OpError> {
    check_gc(opts)?;
    let r = store.gc(opts, progress)?;
    tracing::info!(
        removed = r.chunks_removed,
        freed = r.bytes_before.saturating_sub(r.bytes_after),
        "garbage collection done"
    );
    Ok(r)
}
