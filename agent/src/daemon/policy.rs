//! Retention policies and quotas as the operator configured them
//! (DATA_DIR/retention.json and DATA_DIR/quotas.json, written through the
//! crash-safe helper), prune as a job, quota budgets for backups, and the
//! per-disk claims that keep two jobs off one disk.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use novabackup_api::types::{DiskUsage, Quotas, RetentionPolicy};
use novabackup_api::{ApiError, ErrorCode};
use novabackup_engine::format::manifest::Manifest;
use novabackup_engine::fsutil;
use novabackup_engine::ids::DiskName;
use novabackup_engine::progress::Progress;
use novabackup_engine::retention::{self, Candidate, Policy};
use novabackup_engine::size::format_size;
use novabackup_engine::store::Store;
use serde_json::json;

const POLICIES_FILE: &str = "retention.json";
const QUOTAS_FILE: &str = "quotas.json";
/// The name under which the built-in default policy is reported.
pub const BUILT_IN: &str = "built-in default";

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

fn load<T: serde::de::DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            anyhow::anyhow!(
                "{} is damaged ({e}); fix or remove it (its settings are then gone)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn save<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec_pretty(v).expect("settings serialize");
    fsutil::write_atomic(path, &bytes, 0o600).map_err(|e| {
        err(
            ErrorCode::Internal,
            format!("cannot save {}: {e}", path.display()),
        )
    })
}

/// Policies and quotas.
pub struct Settings {
    dir: PathBuf,
    policies: Mutex<Vec<RetentionPolicy>>,
    quotas: Mutex<Quotas>,
}

/// Checks a policy name or schedule id (the rules of disk names).
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorCode::BadRequest,
            format!("{what} {name:?} is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"),
        ))
    }
}

impl Settings {
    /// Loads what DATA_DIR holds.
    pub fn load(dir: &Path) -> anyhow::Result<Settings> {
        Ok(Settings {
            dir: dir.to_path_buf(),
            policies: Mutex::new(load(&dir.join(POLICIES_FILE))?),
            quotas: Mutex::new(load(&dir.join(QUOTAS_FILE))?),
        })
    }

    /// The configured policies.
    pub fn policies(&self) -> Vec<RetentionPolicy> {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Creates or replaces a policy.
    pub fn put_policy(
        &self,
        p: RetentionPolicy,
        create: bool,
    ) -> Result<RetentionPolicy, ApiError> {
        check_name("policy name", &p.name)?;
        if let Some(d) = &p.disk {
            d.parse::<DiskName>()
                .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        }
        p.rules
            .validate()
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        let mut all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        let exists = all.iter().position(|x| x.name == p.name);
        match (create, exists) {
            (true, Some(_)) => {
                return Err(err(
                    ErrorCode::Conflict,
                    format!("a policy named {} exists; update it instead", p.name),
                ))
            }
            (false, None) => {
                return Err(err(
                    ErrorCode::NotFound,
                    format!("no policy named {:?}; create it first", p.name),
                ))
            }
            _ => {}
        }
        if let Some(other) = all.iter().find(|x| x.name != p.name && x.disk == p.disk) {
            let scope = p
                .disk
                .as_deref()
                .map_or("all disks".to_string(), |d| format!("disk {d}"));
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "policy {} already covers {scope}; update or delete it instead",
                    other.name
                ),
            ));
        }
        let mut next = all.clone();
        match exists {
            Some(i) => next[i] = p.clone(),
            None => next.push(p.clone()),
        }
        save(&self.dir.join(POLICIES_FILE), &next)?;
        *all = next;
        Ok(p)
    }

    /// Deletes a policy.
    pub fn delete_policy(&self, name: &str) -> Result<(), ApiError> {
        let mut all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        let next: Vec<RetentionPolicy> = all.iter().filter(|p| p.name != name).cloned().collect();
        if next.len() == all.len() {
            return Err(err(
                ErrorCode::NotFound,
                format!("no policy named {name:?}; `novabackup retention list` shows them"),
            ));
        }
        save(&self.dir.join(POLICIES_FILE), &next)?;
        *all = next;
        Ok(())
    }

    /// The policy that applies to `disk`: its own, else the all-disks one,
    /// else the built-in default. Returns the policy's name too.
    pub fn effective(&self, disk: &str) -> (String, Policy) {
        let all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .find(|p| p.disk.as_deref() == Some(disk))
            .or_else(|| all.iter().find(|p| p.disk.is_none()))
            .map(|p| (p.name.clone(), p.rules.clone()))
            .unwrap_or_else(|| (BUILT_IN.to_string(), Policy::default()))
    }

    /// The limits.
    pub fn quotas(&self) -> Quotas {
        self.quotas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the limits.
    pub fn set_quotas(&self, q: Quotas) -> Result<Quotas, ApiError> {
        for (d, &n) in &q.disks {
            d.parse::<DiskName>()
                .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
            if n == 0 {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("the quota of disk {d} is 0; remove it instead"),
                ));
            }
        }
        if q.store == Some(0) {
            return Err(err(
                ErrorCode::BadRequest,
                "the store quota is 0; remove it instead",
            ));
        }
        let mut cur = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        save(&self.dir.join(QUOTAS_FILE), &q)?;
        *cur = q.clone();
        Ok(q)
    }
}

/// What each disk's existing snapshots added to the store (the sum of
/// their `bytes_stored`: a chunk counts for the snapshot that stored it),
/// and how many snapshots it has.
pub fn disk_usage(manifests: &[Manifest]) -> BTreeMap<String, (u64, usize)> {
    let mut out: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for m in manifests {
        let e = out.entry(m.disk.to_string()).or_default();
        e.0 += m.stats.bytes_stored;
        e.1 += 1;
    }
    out
}

/// Usage of every disk with snapshots or a quota.
pub fn usage_report(manifests: &[Manifest], q: &Quotas) -> Vec<DiskUsage> {
    let mut u = disk_usage(manifests);
    for d in q.disks.keys() {
        u.entry(d.clone()).or_default();
    }
    u.into_iter()
        .map(|(disk, (bytes, snapshots))| DiskUsage {
            limit: q.disks.get(&disk).copied(),
            disk,
            bytes,
            snapshots,
        })
        .collect()
}

/// The most a backup of `disk` may add to the store under the quotas, or
/// an error when a limit is reached already (the backup must not start).
/// `snaps` are the disk's snapshots.
pub fn budget(
    store: &dyn Store,
    q: &Quotas,
    disk: &str,
    snaps: &[Manifest],
) -> Result<Option<(u64, String)>, String> {
    if q.store.is_none() && !q.disks.contains_key(disk) {
        return Ok(None);
    }
    let mut best: Option<(u64, String)> = None;
    if let Some(limit) = q.store {
        let used = store.usage().map_err(|e| e.to_string())?;
        let what = format!(
            "the store quota ({} of {} used)",
            format_size(used),
            format_size(limit)
        );
        if used >= limit {
            return Err(format!("the store quota is reached: {}; prune snapshots and run `novabackup gc`, or raise it with `novabackup quota set`", what));
        }
        best = Some((limit - used, what));
    }
    if let Some(&limit) = q.disks.get(disk) {
        let used = disk_usage(snaps).get(disk).map_or(0, |u| u.0);
        let what = format!(
            "the quota of disk {disk} ({} of {} used)",
            format_size(used),
            format_size(limit)
        );
        if used >= limit {
            return Err(format!("the quota of disk {disk} is reached: {}; prune its snapshots, or raise it with `novabackup quota set --disk {disk}`", what));
        }
        if best.as_ref().is_none_or(|(b, _)| limit - used < *b) {
            best = Some((limit - used, what));
        }
    }
    Ok(best)
}

/// Disks with a job running: backup, prune and verify of one disk never
/// overlap.
#[derive(Default, Clone)]
pub struct Busy(Arc<Mutex<HashSet<String>>>);

/// A disk's claim; released when dropped.
pub struct Claim {
    busy: Busy,
    disk: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.busy
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.disk);
    }
}

impl Busy {
    /// Claims `disk` if no job holds it.
    pub fn try_claim(&self, disk: &str) -> Option<Claim> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.insert(disk.to_string()).then(|| Claim {
            busy: self.clone(),
            disk: disk.to_string(),
        })
    }

    /// Claims `disk`, waiting for the job that holds it; `None` if the
    /// job was cancelled meanwhile.
    pub fn claim(&self, disk: &str, progress: &Progress) -> Option<Claim> {
        loop {
            if let Some(c) = self.try_claim(disk) {
                return Some(c);
            }
            if progress.cancelled() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether a job holds `disk`.
    pub fn is_busy(&self, disk: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(disk)
    }
}

/// Applies retention to one disk or all: every snapshot with keep or
/// remove and the rules that kept it; removes unless `dry_run`.
pub fn prune(
    store: &dyn Store,
    settings: &Settings,
    busy: &Busy,
    disk: Option<&DiskName>,
    dry_run: bool,
    progress: &Progress,
) -> Result<serde_json::Value, String> {
    let (all, damaged) = store.list(disk).map_err(|e| e.to_string())?;
    for d in &damaged {
        tracing::error!("prune skips a damaged manifest: {d}");
    }
    let mut by_disk: BTreeMap<String, Vec<Manifest>> = BTreeMap::new();
    for m in all {
        by_disk.entry(m.disk.to_string()).or_default().push(m);
    }
    progress.set_total(by_disk.values().map(|v| v.len() as u64).sum());
    let mut disks = Vec::new();
    let mut removed_total = 0;
    for (name, snaps) in by_disk {
        let (policy_name, policy) = settings.effective(&name);
        // A backup of this disk finishes first (its snapshot is then one
        // more candidate; a snapshot being written is never one).
        let _claim = if dry_run {
            None
        } else {
            Some(
                busy.claim(&name, progress)
                    .ok_or_else(|| "prune was cancelled".to_string())?,
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
        let plan = retention::plan(&candidates, &policy)
            .map_err(|e| format!("policy {policy_name} cannot be applied to disk {name}: {e}"))?;
        let mut removed = 0;
        let mut rows = Vec::new();
        for d in &plan {
            let mut outcome = if d.keep { "keep" } else { "remove" };
            if !d.keep && !dry_run {
                let id = d.id.parse().map_err(|e| format!("{e}"))?;
                match store.delete(&id) {
                    Ok(()) => {
                        removed += 1;
                        tracing::info!(snapshot = %d.id, "pruned");
                    }
                    Err(e) => {
                        tracing::error!(snapshot = %d.id, "prune could not delete it: {e}");
                        outcome = "remove failed";
                    }
                }
            }
            progress.add(1);
            rows.push(json!({
                "id": d.id,
                "time": novabackup_engine::time::rfc3339(d.time_unix),
                "action": outcome,
                "reasons": d.reasons,
            }));
        }
        removed_total += removed;
        disks.push(json!({
            "disk": name,
            "policy": policy_name,
            "rules": policy,
            "snapshots": rows,
            "removed": removed,
        }));
    }
    Ok(json!({
        "dry_run": dry_run,
        "disks": disks,
        "removed": removed_total,
        "damaged_manifests": damaged.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    }))
}
