//! Quotas and usage: what each disk's snapshots added to the store, and
//! the most a backup may add before a limit is reached. Pure functions of
//! the manifests and the limits, but for the store's own size.

use std::collections::BTreeMap;

use crate::format::manifest::Manifest;
use crate::size::format_size;
use crate::store::Store;

use super::error::{ErrorKind, OpError};

/// Size limits as the operator set them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Limit of the whole store, in bytes.
    pub store: Option<u64>,
    /// Per disk, the limit of what its snapshots added to the store.
    pub disks: BTreeMap<String, u64>,
}

/// Usage of one disk against its limit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskUsage {
    /// Disk.
    pub disk: String,
    /// Bytes its existing snapshots added to the store.
    pub bytes: u64,
    /// Its limit.
    pub limit: Option<u64>,
    /// Its snapshots.
    pub snapshots: usize,
}

/// The most a backup may add to the store, and the limit that sets it
/// (named for the error that stops a backup reaching it).
pub type Budget = Option<(u64, String)>;

impl Limits {
    /// Checks limits before they are saved.
    pub fn validate(&self) -> Result<(), OpError> {
        for (d, &n) in &self.disks {
            d.parse::<crate::ids::DiskName>()
                .map_err(|e| OpError::invalid(e.to_string()))?;
            if n == 0 {
                return Err(OpError::invalid(format!(
                    "the quota of disk {d} is 0; remove it instead"
                )));
            }
        }
        if self.store == Some(0) {
            return Err(OpError::invalid("the store quota is 0; remove it instead"));
        }
        Ok(())
    }
}

/// What each disk's snapshots added to the store (the sum of their
/// `bytes_stored`: a chunk counts for the snapshot that stored it), and
/// how many snapshots it has.
pub fn disk_usage(manifests: &[Manifest]) -> BTreeMap<String, (u64, usize)> {
    let mut out: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for m in manifests {
        let e = out.entry(m.disk.to_string()).or_default();
        e.0 += m.stats.bytes_stored;
        e.1 += 1;
    }
    out
}

/// Usage of every disk with snapshots or a limit.
pub fn usage_report(manifests: &[Manifest], limits: &Limits) -> Vec<DiskUsage> {
    let mut u = disk_usage(manifests);
    for d in limits.disks.keys() {
        u.entry(d.clone()).or_default();
    }
    u.into_iter()
        .map(|(disk, (bytes, snapshots))| DiskUsage {
            limit: limits.disks.get(&disk).copied(),
            disk,
            bytes,
            snapshots,
        })
        .collect()
}

/// The most a backup of `disk` may add to the store under `limits`, or a
/// [`ErrorKind::Quota`] error when a limit is reached already (the backup
/// must not start). `snaps` are the disk's snapshots.
pub fn budget(
    store: &dyn Store,
    limits: &Limits,
    disk: &str,
    snaps: &[Manifest],
) -> Result<Budget, OpError> {
    if limits.store.is_none() && !limits.disks.contains_key(disk) {
        return Ok(None);
    }
    let mut best: Budget = None;
    if let Some(limit) = limits.store {
        let used = store.usage()?;
        let what = format!(
            "the store quota ({} of {} used)",
            format_size(used),
            format_size(limit)
        );
        if used >= limit {
            return Err(OpError::new(ErrorKind::Quota, format!("the store quota is reached: {what}; prune snapshots and run `novabackup gc`, or raise it with `novabackup quota set`")));
        }
        best = Some((limit - used, what));
    }
    if let Some(&limit) = limits.disks.get(disk) {
        let used = disk_usage(snaps).get(disk).map_or(0, |u| u.0);
        let what = format!(
            "the quota of disk {disk} ({} of {} used)",
            format_size(used),
            format_size(limit)
        );
        if used >= limit {
            return Err(OpError::new(ErrorKind::Quota, format!("the quota of disk {disk} is reached: {what}; prune its snapshots, or raise it with `novabackup quota set --disk {disk}`")));
        }
        if best.as_ref().is_none_or(|(b, _)| limit - used < *b) {
            best = Some((limit - used, what));
        }
    }
    Ok(best)
}
