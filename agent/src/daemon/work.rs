//! What the agent's jobs do: a backup ties the proxy's checkpoint to the
//! engine's pipeline; restore and verify call the engine on the store.

use std::path::Path;
use std::sync::Arc;

use nbd_proxy::Export;
use novabackup_engine::backup::{self, BackupOptions, BackupRequest};
use novabackup_engine::format::manifest::{BackupKind, CbtRecord, Manifest};
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::plan::{self, Mode, PlanInput};
use novabackup_engine::progress::Progress;
use novabackup_engine::read::ReadEngine;
use novabackup_engine::store::{Store, StoreError};
use novabackup_engine::{restore, time, verify};
use serde_json::json;

/// Engine settings shared by every job.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Pipeline tunables.
    pub backup: BackupOptions,
    /// Image reader.
    pub read: ReadEngine,
    /// Threads for restore and verify.
    pub workers: usize,
    /// Audit change tracking every this many backups of a disk (0: never
    /// unless asked).
    pub audit_every: u32,
    /// Index pages kept decoded between backups.
    pub pages: Arc<novabackup_engine::pagecache::PageCache>,
}

/// Backs up one disk (see DESIGN.md "Point-in-time consistency").
pub fn backup(
    export: Arc<Export>,
    store: Arc<dyn Store>,
    s: EngineSettings,
    mode: Mode,
    quotas: &novabackup_api::types::Quotas,
    progress: &Progress,
) -> Result<serde_json::Value, String> {
    let disk: DiskName = export.name.parse().map_err(|e| format!("{e}"))?;
    // A quota reached already stops the backup before the checkpoint, so
    // the dirty bits are untouched.
    // The disk's snapshots, read once: the quota, the base and the audit
    // rhythm all look at them.
    let (snaps, _) = store.list(Some(&disk)).map_err(|e| e.to_string())?;
    let budget = super::policy::budget(&*store, quotas, disk.as_str(), &snaps)?;
    let status = export.tracker.status();
    let mut opts = s.backup.clone();
    // A chunk never splits a CBT block, so copy-before-write copies line
    // up with what the backup reads.
    opts.chunk_size = opts.chunk_size.max(status.granularity);
    let (base, no_base) = find_base(&*store, &snaps, status.base.as_deref())?;
    let (_, trust) = export.tracker.live();
    let size = export.image.size;
    let incremental_possible = plan::full_reason(
        Mode::Auto,
        base.as_ref(),
        &no_base,
        &trust,
        size,
        opts.chunk_size,
    )
    .is_none();
    let mode = match mode {
        Mode::Auto if s.audit_every > 0 && incremental_possible => {
            // Every Nth backup: N-1 incrementals since the last full read.
            let since = snaps
                .iter()
                .rev()
                .take_while(|m| m.kind == BackupKind::Incremental)
                .count();
            if since + 1 >= s.audit_every as usize {
                tracing::info!(disk = %disk, every = s.audit_every, "this backup audits change tracking");
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
    let predicted_full =
        plan::full_reason(mode, base.as_ref(), &no_base, &trust, size, opts.chunk_size).is_some();

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
    let cp = export
        .tracker
        .checkpoint(predicted_full)
        .map_err(|e| e.to_string())?;
    let data = predicted_full.then(|| export.image.data_extents());
    let p = plan::plan(&PlanInput {
        size,
        chunk_size: opts.chunk_size,
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
        return Err("change tracking changed state while the backup started; retry".into());
    }
    tracing::info!(kind = ?p.kind, reason = %p.reason, chunks = p.chunks_to_read(), "backup planned");
    let req = BackupRequest {
        disk: &disk,
        image: &export.image.file,
        size,
        plan: &p,
        base: base.as_ref(),
        pit: &cp,
        time_unix: t,
        cbt: CbtRecord {
            granularity: status.granularity,
            dirty_blocks: cp.frozen().count_dirty() as u64,
            trusted: cp.trust().is_trusted(),
        },
        engine: s.read,
        audit: audit_base.map(|b| (b, cp.frozen())),
        budget,
        pages: Some(&s.pages),
    };
    match backup::run(&*store, &req, &opts, progress) {
        Ok(m) => {
            if let Some(a) = m.audit.as_ref().filter(|a| a.mismatches > 0) {
                tracing::error!(
                    disk = %disk,
                    snapshot = %m.id,
                    mismatches = a.mismatches,
                    first_offsets = ?&a.mismatch_offsets[..a.mismatch_offsets.len().min(8)],
                    "CHANGE TRACKING MISSED WRITES: the audit found chunks that changed although the bitmap says they did not; the new snapshot holds what was read. Something writes to the image without going through the proxy."
                );
            }
            let copies = cp.copies();
            cp.commit(&m.id.to_string()).map_err(|e| {
                format!(
                    "snapshot {} is stored, but saving the bitmap failed: {e}",
                    m.id
                )
            })?;
            Ok(summary(&m, copies))
        }
        Err(e) => {
            if let Err(x) = cp.abort() {
                tracing::error!("merging the frozen bits back failed: {x}");
            }
            Err(e.to_string())
        }
    }
}

fn find_base(
    store: &dyn Store,
    existing: &[Manifest],
    base: Option<&str>,
) -> Result<(Option<Manifest>, String), String> {
    let Some(id) = base else {
        let why = if existing.is_empty() {
            "no previous snapshot of this disk".to_string()
        } else {
            "change tracking has no base snapshot (the disk was attached, or its bitmap reset, after the last snapshot)".to_string()
        };
        return Ok((None, why));
    };
    let id: SnapshotId = match id.parse() {
        Ok(i) => i,
        Err(_) => {
            return Ok((
                None,
                format!("the bitmap names an invalid base snapshot {id:?}"),
            ))
        }
    };
    // Usually in the list just read; asked for only to say why it is not.
    if let Some(m) = existing.iter().find(|m| m.id == id) {
        return Ok((Some(m.clone()), String::new()));
    }
    match store.manifest(&id) {
        Ok(m) => Ok((Some(m), String::new())),
        Err(StoreError::NoSnapshot(_)) => Ok((None, format!("the base snapshot {id} was deleted"))),
        Err(e) => Ok((None, format!("the base snapshot {id} cannot be read: {e}"))),
    }
}

fn summary(m: &Manifest, copies: usize) -> serde_json::Value {
    let st = &m.stats;
    let secs = (st.duration_ms as f64 / 1000.0).max(1e-3);
    json!({
        "snapshot": m.id,
        "kind": m.kind,
        "reason": m.reason,
        "parent": m.parent,
        "image_size": m.image_size,
        "stats": st,
        "read_rate": st.bytes_read as f64 / secs,
        "dedup_ratio": if st.bytes_new > 0 { st.bytes_read as f64 / st.bytes_new as f64 } else { 0.0 },
        "compression_ratio": if st.bytes_stored > 0 { st.bytes_new as f64 / st.bytes_stored as f64 } else { 0.0 },
        "copy_before_write_blocks": copies,
        "audit": m.audit,
    })
}

/// Restores a snapshot to `target`.
pub fn restore(
    store: Arc<dyn Store>,
    id: &SnapshotId,
    target: &Path,
    force: bool,
    workers: usize,
    progress: &Progress,
) -> Result<serde_json::Value, String> {
    let m = store.manifest(id).map_err(|e| e.to_string())?;
    let st = restore::restore(&*store, &m, target, force, workers, progress)
        .map_err(|e| e.to_string())?;
    Ok(json!({ "snapshot": id, "target": target, "stats": st }))
}

/// What to verify.
pub struct VerifyScope {
    /// These snapshots; else every snapshot (of `disk` if set).
    pub ids: Option<Vec<SnapshotId>>,
    /// Only this disk's snapshots.
    pub disk: Option<DiskName>,
    /// Skip snapshots verified successfully within this many seconds.
    pub skip_within: Option<u64>,
}

/// Verifies snapshots disk by disk (each disk claimed while its snapshots
/// are read), records each verdict in its manifest.
pub fn verify(
    store: Arc<dyn Store>,
    scope: VerifyScope,
    busy: &super::policy::Busy,
    workers: usize,
    progress: &Progress,
) -> Result<serde_json::Value, String> {
    let (manifests, damaged) = match scope.ids {
        Some(ids) => {
            let mut v = Vec::new();
            for id in ids {
                v.push(store.manifest(&id).map_err(|e| e.to_string())?);
            }
            (v, Vec::new())
        }
        None => store.list(scope.disk.as_ref()).map_err(|e| e.to_string())?,
    };
    let now = time::now_unix();
    let (todo, skipped): (Vec<Manifest>, Vec<Manifest>) =
        manifests
            .into_iter()
            .partition(|m| match (&m.verified, scope.skip_within) {
                (Some(v), Some(w)) => !(v.ok && now.saturating_sub(v.time_unix) < w),
                _ => true,
            });
    let mut by_disk: std::collections::BTreeMap<DiskName, Vec<Manifest>> = Default::default();
    for m in todo {
        by_disk.entry(m.disk.clone()).or_default().push(m);
    }
    let mut report = verify::VerifyReport::default();
    for (disk, ms) in by_disk {
        let _claim = busy
            .claim(disk.as_str(), progress)
            .ok_or("verify was cancelled")?;
        let part = verify::verify(&*store, &ms, workers, progress);
        if progress.cancelled() {
            return Err("verify was cancelled".into());
        }
        let t = time::now_unix();
        for v in &part.snapshots {
            let Ok(id) = v.id.parse::<SnapshotId>() else {
                continue;
            };
            let rec = novabackup_engine::format::manifest::Verification {
                time: time::rfc3339(t),
                time_unix: t,
                ok: v.ok,
                problems: (v.bad_pages.len() + v.bad_chunks.len()) as u64,
            };
            let a = novabackup_engine::format::manifest::Annotation {
                verified: Some(rec),
                ..Default::default()
            };
            if let Err(e) = store.annotate(&id, &a) {
                tracing::warn!(snapshot = %id, "cannot record the verification in the manifest: {e}");
            }
        }
        report.snapshots.extend(part.snapshots);
        report.chunks_checked += part.chunks_checked;
        report.bytes_checked += part.bytes_checked;
    }
    let damaged: Vec<String> = damaged.iter().map(|e| e.to_string()).collect();
    let ok = report.ok() && damaged.is_empty();
    let skipped: Vec<String> = skipped.iter().map(|m| m.id.to_string()).collect();
    Ok(
        json!({ "ok": ok, "report": report, "damaged_manifests": damaged, "skipped_recently_verified": skipped }),
    )
}
