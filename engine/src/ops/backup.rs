//! A backup job of one disk: read its snapshots once (for the quota
//! budget, the base and the audit rhythm), decide the mode, take the
//! tracker's checkpoint, plan, run the pipeline, and end the checkpoint:
//! commit on success (the live bits then start from the new snapshot),
//! abort on failure (the frozen bits merge back, nothing is lost).

use crate::backup::{self, BackupOptions, BackupRequest};
use crate::format::manifest::{AuditRecord, BackupKind, BackupStats, CbtRecord, Manifest};
use crate::ids::{DiskName, SnapshotId};
use crate::pagecache::PageCache;
use crate::plan::{self, Mode, PlanInput};
use crate::progress::Progress;
use crate::read::ReadEngine;
use crate::store::{Store, StoreError};
use crate::time;

use super::error::{ErrorKind, OpError};
use super::quota::{self, Limits};
use super::tracker::{TrackedDisk, TrackerError};

/// How to back up.
#[derive(Debug, Clone)]
pub struct BackupJobOptions {
    /// Full, audit, or incremental when change tracking allows it.
    pub mode: Mode,
    /// Pipeline tunables.
    pub pipeline: BackupOptions,
    /// Image reader.
    pub read: ReadEngine,
    /// Audit change tracking every this many backups of a disk (0: only
    /// when asked).
    pub audit_every: u32,
    /// Quotas.
    pub limits: Limits,
}

/// What a backup did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackupReport {
    /// The new snapshot.
    pub snapshot: SnapshotId,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Why that kind.
    pub reason: String,
    /// The base of an incremental.
    pub parent: Option<SnapshotId>,
    /// Image size.
    pub image_size: u64,
    /// Bytes and chunks read, new, stored.
    pub stats: BackupStats,
    /// Bytes read per second.
    pub read_rate: f64,
    /// Bytes read per new byte (0 when nothing was new).
    pub dedup_ratio: f64,
    /// New bytes per stored byte (0 when nothing was stored).
    pub compression_ratio: f64,
    /// Blocks the guest wrote during the backup, copied aside first.
    pub copy_before_write_blocks: usize,
    /// What the CBT audit found, when this backup audited.
    pub audit: Option<AuditRecord>,
}

impl BackupReport {
    fn new(m: &Manifest, copies: usize) -> BackupReport {
        let st = &m.stats;
        let secs = (st.duration_ms as f64 / 1000.0).max(1e-3);
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        BackupReport {
            snapshot: m.id.clone(),
            kind: m.kind,
            reason: m.reason.clone(),
            parent: m.parent.clone(),
            image_size: m.image_size,
            stats: st.clone(),
            read_rate: st.bytes_read as f64 / secs,
            dedup_ratio: ratio(st.bytes_read, st.bytes_new),
            compression_ratio: ratio(st.bytes_new, st.bytes_stored),
            copy_before_write_blocks: copies,
            audit: m.audit.clone(),
        }
    }
}

fn tracker_error(e: TrackerError) -> OpError {
    match e {
        TrackerError::CheckpointActive => OpError::busy(e.to_string()),
        TrackerError::Failed(_) => OpError::internal(e.to_string()).with_source(e),
    }
}

/// Backs up `disk` into `store` (see DESIGN.md "Point-in-time
/// consistency"). `pages` keeps decoded index pages between backups.
pub fn backup(
    disk: &dyn TrackedDisk,
    store: &dyn Store,
    opts: &BackupJobOptions,
    pages: Option<&PageCache>,
    progress: &Progress,
) -> Result<BackupReport, OpError> {
    let name: DiskName = disk
        .name()
        .parse()
        .map_err(|e: crate::ids::BadDiskName| OpError::invalid(e.to_string()))?;
    let tracking = disk.tracking();
    if tracking.checkpoint_active {
        return Err(tracker_error(TrackerError::CheckpointActive));
    }
    // The disk's snapshots, read once: the quota, the base and the audit
    // rhythm all look at them. A quota reached already stops the backup
    // before the checkpoint, so the dirty bits are untouched.
    let (snaps, _) = store.list(Some(&name))?;
    let budget = quota::budget(store, &opts.limits, name.as_str(), &snaps)?;
    let mut pipeline = opts.pipeline.clone();
    // A chunk never splits a CBT block, so copy-before-write copies line
    // up with what the backup reads.
    pipeline.chunk_size = pipeline.chunk_size.max(tracking.granularity);
    let (base, no_base) = find_base(store, &snaps, tracking.base.as_deref());
    let trust = disk.live_trust();
    let size = disk.size();
    let incremental_possible = plan::full_reason(
        Mode::Auto,
        base.as_ref(),
        &no_base,
        &trust,
        size,
        pipeline.chunk_size,
    )
    .is_none();
    let mode = match opts.mode {
        Mode::Auto if opts.audit_every > 0 && incremental_possible => {
            // Every Nth backup: N-1 incrementals since the last full read.
            let since = snaps
                .iter()
                .rev()
                .take_while(|m| m.kind == BackupKind::Incremental)
                .count();
            if since + 1 >= opts.audit_every as usize {
                tracing::info!(disk = %name, every = opts.audit_every, "this backup audits change tracking");
                Mode::Audit
            } else {
                Mode::Auto
            }
        }
        m => m,
    };
    let audit_base = (mode == Mode::Audit && incremental_possible)
        .then_some(base.as_ref())
        .flatten();
    let predicted_full = plan::full_reason(
        mode,
        base.as_ref(),
        &no_base,
        &trust,
        size,
        pipeline.chunk_size,
    )
    .is_some();

    // Snapshot ids have a one-second resolution: wait for a second no
    // snapshot of this disk has (the list holds the last one; a commit in
    // a taken second would fail, losing nothing).
    let t = loop {
        let t = time::now_unix();
        if !snaps.iter().any(|m| m.time_unix == t) {
            break t;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let cp = disk.checkpoint(predicted_full).map_err(tracker_error)?;
    let data = predicted_full.then(|| disk.data_extents());
    let p = plan::plan(&PlanInput {
        size,
        chunk_size: pipeline.chunk_size,
        mode,
        frozen: cp.frozen(),
        trust: cp.trust(),
        base: base.as_ref(),
        no_base_reason: &no_base,
        data: data.as_deref(),
    });
    if (p.kind == BackupKind::Full) != predicted_full {
        // The trust changed between the two looks (it cannot today).
        let _ = cp.abort();
        return Err(OpError::busy(
            "change tracking changed state while the backup started; retry",
        ));
    }
    tracing::info!(kind = ?p.kind, reason = %p.reason, chunks = p.chunks_to_read(), "backup planned");
    let req = BackupRequest {
        disk: &name,
        image: disk.image(),
        size,
        plan: &p,
        base: base.as_ref(),
        pit: &*cp,
        time_unix: t,
        cbt: CbtRecord {
            granularity: tracking.granularity,
            dirty_blocks: cp.frozen().count_dirty() as u64,
            trusted: cp.trust().is_trusted(),
        },
        engine: opts.read,
        audit: audit_base.map(|b| (b, cp.frozen())),
        budget,
        pages,
    };
    match backup::run(store, &req, &pipeline, progress) {
        Ok(m) => {
            if let Some(a) = m.audit.as_ref().filter(|a| a.mismatches > 0) {
                tracing::error!(
                    disk = %name,
                    snapshot = %m.id,
                    mismatches = a.mismatches,
                    first_offsets = ?&a.mismatch_offsets[..a.mismatch_offsets.len().min(8)],
                    "CHANGE TRACKING MISSED WRITES: the audit found chunks that changed although the bitmap says they did not; the new snapshot holds what was read. Something writes to the image without going through the proxy."
                );
            }
            let copies = cp.copies();
            cp.commit(&m.id.to_string()).map_err(|e| {
                OpError::new(
                    ErrorKind::Internal,
                    format!(
                        "snapshot {} is stored, but saving the bitmap failed: {e}",
                        m.id
                    ),
                )
                .with_source(e)
            })?;
            Ok(BackupReport::new(&m, copies))
        }
        Err(e) => {
            if let Err(x) = cp.abort() {
                tracing::error!("merging the frozen bits back failed: {x}");
            }
            Err(e.into())
        }
    }
}

/// The snapshot the tracker's bits start from, if it is still in the
/// store, and otherwise why there is none (the plan's full-backup reason).
fn find_base(
    store: &dyn Store,
    existing: &[Manifest],
    base: Option<&str>,
) -> (Option<Manifest>, String) {
    let Some(id) = base else {
        let why = if existing.is_empty() {
            "no previous snapshot of this disk"
        } else {
            "change tracking has no base snapshot (the disk was attached, or its bitmap reset, after the last snapshot)"
        };
        return (None, why.to_string());
    };
    let id: SnapshotId = match id.parse() {
        Ok(i) => i,
        Err(_) => {
            return (
                None,
                format!("the bitmap names an invalid base snapshot {id:?}"),
            )
        }
    };
    // Usually in the list just read; asked for only to say why it is not.
    if let Some(m) = existing.iter().find(|m| m.id == id) {
        return (Some(m.clone()), String::new());
    }
    match store.manifest(&id) {
        Ok(m) => (Some(m), String::new()),
        Err(StoreError::NoSnapshot(_)) => (None, format!("the base snapshot {id} was deleted")),
        Err(e) => (None, format!("the base snapshot {id} cannot be read: {e}")),
    }
}
