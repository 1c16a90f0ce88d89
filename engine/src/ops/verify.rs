//! A verify job: re-read and re-hash what snapshots reference, disk by
//! disk (each disk claimed while its snapshots are read, so no prune
//! removes them meanwhile), and record each verdict in its manifest.

use std::collections::BTreeMap;

use crate::format::manifest::{Annotation, Manifest, Verification};
use crate::ids::{DiskName, SnapshotId};
use crate::progress::Progress;
use crate::store::Store;
use crate::time;
use crate::verify::{self, VerifyReport};

use super::claims::Claims;
use super::error::OpError;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyScope {
    /// These snapshots; else every snapshot (of `disk` if set).
    pub ids: Option<Vec<SnapshotId>>,
    /// Only this disk's snapshots.
    pub disk: Option<DiskName>,
    /// Skip snapshots verified successfully within this many seconds.
    pub skip_within: Option<u64>,
}

impl VerifyScope {
    /// What the job is about, for people: the ids, the disk, or `all`.
    pub fn target(&self) -> String {
        match (&self.ids, &self.disk) {
            (Some(ids), _) => ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            (None, Some(d)) => d.to_string(),
            (None, None) => "all".into(),
        }
    }

    /// Fails unless every named snapshot exists (before a job starts).
    pub fn check(&self, store: &dyn Store) -> Result<(), OpError> {
        for id in self.ids.iter().flatten() {
            store.manifest(id)?;
        }
        Ok(())
    }
}

/// What a verify job found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerifyJobReport {
    /// Every snapshot intact and every manifest readable.
    pub ok: bool,
    /// The verdicts.
    pub report: VerifyReport,
    /// Manifests that could not be read, with why.
    pub damaged_manifests: Vec<String>,
    /// Snapshots skipped because they were verified recently.
    pub skipped_recently_verified: Vec<String>,
    /// Parts of the store found unreadable (a pack's damaged table of
    /// contents), whatever the snapshots verified.
    #[serde(default)]
    pub damaged_store: Vec<String>,
    /// Damaged chunks the store forgot, so that the next backup reading
    /// their data stores them again.
    #[serde(default)]
    pub chunks_forgotten: u64,
}

/// Verifies the snapshots of `scope`; records each verdict in its
/// manifest (a verdict that cannot be recorded is logged, not fatal).
pub fn verify(
    store: &dyn Store,
    scope: &VerifyScope,
    claims: &Claims,
    workers: usize,
    progress: &Progress,
) -> Result<VerifyJobReport, OpError> {
    let (manifests, damaged) = match &scope.ids {
        Some(ids) => {
            let mut v = Vec::new();
            for id in ids {
                v.push(store.manifest(id)?);
            }
            (v, Vec::new())
        }
        None => store.list(scope.disk.as_ref())?,
    };
    let now = time::now_unix();
    let (todo, skipped): (Vec<Manifest>, Vec<Manifest>) =
        manifests
            .into_iter()
            .partition(|m| match (&m.verified, scope.skip_within) {
                (Some(v), Some(w)) => !(v.ok && now.saturating_sub(v.time_unix) < w),
                _ => true,
            });
    let mut by_disk: BTreeMap<DiskName, Vec<Manifest>> = BTreeMap::new();
    for m in todo {
        by_disk.entry(m.disk.clone()).or_default().push(m);
    }
    let mut report = VerifyReport::default();
    let mut forgotten = 0;
    for (disk, ms) in by_disk {
        let _claim = claims
            .claim(disk.as_str(), progress)
            .ok_or_else(|| OpError::cancelled("verify"))?;
        let part = verify::verify(store, &ms, workers, progress);
        if progress.cancelled() {
            return Err(OpError::cancelled("verify"));
        }
        let t = time::now_unix();
        for v in &part.snapshots {
            let Ok(id) = v.id.parse::<SnapshotId>() else {
                continue;
            };
            let a = Annotation {
                verified: Some(Verification {
                    time: time::rfc3339(t),
                    time_unix: t,
                    ok: v.ok,
                    problems: (v.bad_pages.len() + v.bad_chunks.len()) as u64,
                }),
                ..Default::default()
            };
            if let Err(e) = store.annotate(&id, &a) {
                tracing::warn!(snapshot = %id, "cannot record the verification in the manifest: {e}");
            }
        }
        let bad: Vec<_> = part
            .snapshots
            .iter()
            .flat_map(|v| v.bad_chunks.iter().map(|b| b.digest))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !bad.is_empty() {
            match store.forget_damaged(&bad) {
                Ok(n) => forgotten += n,
                Err(e) => tracing::warn!(disk = %disk, "cannot forget the damaged chunks: {e}"),
            }
        }
        report.snapshots.extend(part.snapshots);
        report.chunks_checked += part.chunks_checked;
        report.bytes_checked += part.bytes_checked;
    }
    let damaged: Vec<String> = damaged.iter().map(|e| e.to_string()).collect();
    let damaged_store = store.damaged_parts();
    Ok(VerifyJobReport {
        ok: report.ok() && damaged.is_empty() && damaged_store.is_empty(),
        report,
        damaged_manifests: damaged,
        skipped_recently_verified: skipped.iter().map(|m| m.id.to_string()).collect(),
        damaged_store,
        chunks_forgotten: forgotten,
    })
}
