//! Prune: apply retention to one disk or all. The decisions are the pure
//! [`crate::retention::plan`]; this runs it per disk (each claimed, so a
//! running backup finishes first) and removes what it says, unless it is a
//! dry run. The report names every snapshot with its fate and the rules
//! that kept it.

use std::collections::BTreeMap;

use crate::format::manifest::Manifest;
use crate::ids::DiskName;
use crate::progress::Progress;
use crate::retention::{self, Candidate, Policy};
use crate::store::Store;

use super::claims::Claims;
use super::error::OpError;

/// What prune does.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Only this disk; else every disk with snapshots.
    pub disk: Option<DiskName>,
    /// Decide and report, remove nothing.
    pub dry_run: bool,
}

/// What became of one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PruneAction {
    /// Kept by a rule.
    #[serde(rename = "keep")]
    Keep,
    /// Removed (or to be removed, in a dry run).
    #[serde(rename = "remove")]
    Remove,
    /// To be removed, but the store refused (logged).
    #[serde(rename = "remove failed")]
    RemoveFailed,
}

/// One snapshot's row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PruneRow {
    /// Snapshot id.
    pub id: String,
    /// Checkpoint time, RFC 3339.
    pub time: String,
    /// Its fate.
    pub action: PruneAction,
    /// The rules that keep it.
    pub reasons: Vec<String>,
}

/// One disk's part.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiskPrune {
    /// The disk.
    pub disk: String,
    /// The policy applied (its name).
    pub policy: String,
    /// Its rules.
    pub rules: Policy,
    /// Every snapshot, oldest first.
    pub snapshots: Vec<PruneRow>,
    /// Snapshots removed.
    pub removed: u64,
}

/// What prune did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Nothing was removed.
    pub dry_run: bool,
    /// Per disk.
    pub disks: Vec<DiskPrune>,
    /// Snapshots removed in all.
    pub removed: u64,
    /// Manifests that could not be read (skipped).
    pub damaged_manifests: Vec<String>,
}

/// Applies retention. `policy_for` names the policy of a disk and gives
/// its rules.
pub fn prune(
    store: &dyn Store,
    policy_for: &dyn Fn(&str) -> (String, Policy),
    claims: &Claims,
    opts: &PruneOptions,
    progress: &Progress,
) -> Result<PruneReport, OpError> {
    let (all, damaged) = store.list(opts.disk.as_ref())?;
    for d in &damaged {
        tracing::error!("prune skips a damaged manifest: {d}");
    }
    let mut by_disk: BTreeMap<String, Vec<Manifest>> = BTreeMap::new();
    for m in all {
        by_disk.entry(m.disk.to_string()).or_default().push(m);
    }
    progress.set_total(by_disk.values().map(|v| v.len() as u64).sum());
    let mut disks = Vec::new();
    for (name, snaps) in by_disk {
        let (policy_name, policy) = policy_for(&name);
        // A backup of this disk finishes first (its snapshot is then one
        // more candidate; a snapshot being written is never one).
        let _claim = if opts.dry_run {
            None
        } else {
            Some(
                claims
                    .claim(&name, progress)
                    .ok_or_else(|| OpError::cancelled("prune"))?,
            )
        };
        let candidates: Vec<Candidate> = snaps
            .iter()
            .map(|m| Candidate {
                id: m.id.to_string(),
                time_unix: m.time_unix,
                protected: m.protected,
            })
            .collect();
        let plan = retention::plan(&candidates, &policy).map_err(|e| {
            OpError::invalid(format!(
                "policy {policy_name} cannot be applied to disk {name}: {e}"
            ))
            .with_source(e)
        })?;
        let mut removed = 0;
        let mut rows = Vec::new();
        for d in plan {
            let mut action = if d.keep {
                PruneAction::Keep
            } else {
                PruneAction::Remove
            };
            if !d.keep && !opts.dry_run {
                let id =
                    d.id.parse()
                        .map_err(|e: crate::ids::BadSnapshotId| OpError::internal(e.to_string()))?;
                match store.delete(&id) {
                    Ok(()) => {
                        removed += 1;
                        tracing::info!(snapshot = %d.id, "pruned");
                    }
                    Err(e) => {
                        tracing::error!(snapshot = %d.id, "prune could not delete it: {e}");
                        action = PruneAction::RemoveFailed;
                    }
                }
            }
            progress.add(1);
            rows.push(PruneRow {
                time: crate::time::rfc3339(d.time_unix),
                id: d.id,
                action,
                reasons: d.reasons,
            });
        }
        disks.push(DiskPrune {
            disk: name,
            policy: policy_name,
            rules: policy,
            snapshots: rows,
            removed,
        });
    }
    Ok(PruneReport {
        dry_run: opts.dry_run,
        removed: disks.iter().map(|d| d.removed).sum(),
        disks,
        damaged_manifests: damaged.iter().map(|e| e.to_string()).collect(),
    })
}
