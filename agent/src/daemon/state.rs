//! The agent's disks: attach, detach, restore at start and save at stop,
//! persisted in DATA_DIR/disks.json (through the crash-safe helper) with
//! one bitmap per disk under DATA_DIR/cbt/. Implements the API's
//! [`DiskService`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nbd_proxy::export::ExportError;
use nbd_proxy::server::ServerError;
use nbd_proxy::{Export, Image, Server, Tracker};
use novabackup_api::types::{
    AttachRequest, BackupRequest, CbtInfo, DiskInfo, Health, JobInfo, PruneRequest, Quotas,
    RestoreRequest, RetentionPolicy, ScheduleAction, ScheduleInfo, ScheduleRequest, SnapshotInfo,
    VerifyRequest,
};
use novabackup_engine::format::manifest::Manifest;
use novabackup_engine::ids::SnapshotId;
use novabackup_engine::plan::Mode;
use novabackup_engine::store::{Store, StoreError};

use super::jobs::Jobs;
use super::policy::{self, Busy, Settings};
use super::schedule::{self, Run, Schedules, Start};
use super::work::{self, EngineSettings};
use novabackup_api::{ApiError, DiskService, ErrorCode};
use novabackup_engine::cbt::Granularity;
use novabackup_engine::fsutil;
use novabackup_engine::ids::DiskName;
use serde::{Deserialize, Serialize};

const DISKS_FILE: &str = "disks.json";

/// One attached disk as saved in disks.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskRecord {
    name: DiskName,
    image: PathBuf,
    granularity: Granularity,
    read_only: bool,
}

#[derive(Debug, Default, Clone)]
struct Endpoints {
    tcp: Option<String>,
    socket: Option<PathBuf>,
}

/// The agent's state.
pub struct Agent {
    dir: PathBuf,
    server: Arc<Server>,
    boot_id: String,
    /// Serializes attach and detach, and holds what disks.json says.
    records: Mutex<Vec<DiskRecord>>,
    endpoints: Mutex<Endpoints>,
    store: Arc<dyn Store>,
    jobs: Jobs,
    settings: EngineSettings,
    policy: Arc<Settings>,
    schedules: Arc<Schedules>,
    busy: Busy,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl Agent {
    /// An agent with no disks yet.
    pub fn new(
        dir: PathBuf,
        server: Arc<Server>,
        boot_id: String,
        store: Arc<dyn Store>,
        settings: EngineSettings,
        policy: Settings,
        schedules: Arc<Schedules>,
    ) -> Agent {
        Agent {
            dir,
            server,
            boot_id,
            records: Mutex::new(Vec::new()),
            endpoints: Mutex::new(Endpoints::default()),
            store,
            jobs: Jobs::default(),
            settings,
            policy: Arc::new(policy),
            schedules,
            busy: Busy::default(),
        }
    }

    /// Starts a backup job holding the disk's claim.
    fn start_backup(&self, disk: &str, mode: Mode) -> Result<JobInfo, ApiError> {
        let export = self.export(disk)?;
        let busy = || {
            err(
                ErrorCode::Conflict,
                format!(
                    "a backup, prune or verify of disk {disk} is running; wait for it to finish"
                ),
            )
        };
        if export.tracker.status().checkpoint_active {
            return Err(busy());
        }
        let claim = self.busy.try_claim(disk).ok_or_else(busy)?;
        let store = self.store.clone();
        let settings = self.settings.clone();
        let quotas = self.policy.quotas();
        Ok(self.jobs.spawn("backup", disk, move |p| {
            let _claim = claim;
            work::backup(export, store, settings, mode, &quotas, p)
        }))
    }

    fn start_verify(&self, scope: work::VerifyScope, target: String) -> JobInfo {
        let store = self.store.clone();
        let workers = self.settings.workers;
        let busy = self.busy.clone();
        self.jobs.spawn("verify", &target, move |p| {
            work::verify(store, scope, &busy, workers, p)
        })
    }

    fn start_prune(&self, disk: Option<DiskName>, dry_run: bool) -> JobInfo {
        let store = self.store.clone();
        let settings = self.policy.clone();
        let busy = self.busy.clone();
        let target = disk.as_ref().map_or("all".to_string(), |d| d.to_string());
        let kind = if dry_run { "prune-dry-run" } else { "prune" };
        self.jobs.spawn(kind, &target, move |p| {
            policy::prune(&*store, &settings, &busy, disk.as_ref(), dry_run, p)
        })
    }

    fn start_gc(&self, opts: novabackup_engine::store::GcOptions) -> Result<JobInfo, ApiError> {
        // One collection at a time; the store refuses a second one too.
        let claim = self.busy.try_claim("\0gc").ok_or_else(|| {
            err(
                ErrorCode::Conflict,
                "a garbage collection is running; wait for it to finish",
            )
        })?;
        let store = self.store.clone();
        Ok(self.jobs.spawn("gc", "store", move |p| {
            let _claim = claim;
            let r = store.gc(&opts, p).map_err(|e| e.to_string())?;
            tracing::info!(
                removed = r.chunks_removed,
                freed = r.bytes_before.saturating_sub(r.bytes_after),
                "garbage collection done"
            );
            Ok(serde_json::to_value(r).expect("report serializes"))
        }))
    }

    pub(super) fn set_endpoints(&self, tcp: Option<String>, socket: Option<PathBuf>) {
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = Endpoints { tcp, socket };
    }

    fn bitmap_path(&self, name: &DiskName) -> PathBuf {
        self.dir.join("cbt").join(format!("{name}.cbt"))
    }

    /// Re-attaches the disks of disks.json. A disk whose image is gone is
    /// reported and kept in the file, so it comes back once the image does.
    pub fn restore(&self) -> anyhow::Result<()> {
        let path = self.dir.join(DISKS_FILE);
        let records: Vec<DiskRecord> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{} is damaged ({e}); fix or remove it, then re-attach the disks",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for r in &records {
            match self.open(r) {
                Ok(export) => {
                    let st = export.tracker.status();
                    if !st.trusted {
                        tracing::warn!(disk = %r.name, reason = st.reason.as_deref().unwrap_or(""), "change tracking is not trusted");
                    }
                    self.server.add(export)?;
                    tracing::info!(disk = %r.name, image = %r.image.display(), dirty_blocks = st.dirty_blocks, "disk attached");
                }
                Err(e) => tracing::error!(disk = %r.name, "cannot attach disk at start-up: {e}"),
            }
        }
        *self.records.lock().unwrap_or_else(|p| p.into_inner()) = records;
        Ok(())
    }

    fn open(&self, r: &DiskRecord) -> Result<Arc<Export>, ApiError> {
        let image = Image::open(&r.image, r.read_only).map_err(|e| match &e {
            ExportError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                err(
                    ErrorCode::Unprocessable,
                    format!("image {} does not exist", r.image.display()),
                )
            }
            _ => err(ErrorCode::Unprocessable, e.to_string()),
        })?;
        let tracker = Tracker::open(
            &self.bitmap_path(&r.name),
            image.size,
            r.granularity,
            &self.boot_id,
        )
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        Ok(Arc::new(Export {
            name: r.name.to_string(),
            image,
            tracker: Arc::new(tracker),
            stats: Default::default(),
        }))
    }

    fn save(&self, records: &[DiskRecord]) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec_pretty(records).expect("records serialize");
        fsutil::write_atomic(&self.dir.join(DISKS_FILE), &bytes, 0o600).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("cannot save {DISKS_FILE}: {e}"),
            )
        })
    }

    fn export(&self, name: &str) -> Result<Arc<Export>, ApiError> {
        self.server.get(name).ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("no disk named {name:?}; `novabackup disk list` shows the attached disks"),
            )
        })
    }

    fn info(&self, e: &Export) -> DiskInfo {
        let ep = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut uris = Vec::new();
        if let Some(s) = &ep.socket {
            uris.push(format!("nbd+unix:///{}?socket={}", e.name, s.display()));
        }
        if let Some(t) = &ep.tcp {
            uris.push(format!("nbd://{t}/{}", e.name));
        }
        DiskInfo {
            name: e.name.clone(),
            image: e.image.path.display().to_string(),
            backing: match e.image.kind {
                nbd_proxy::BackingKind::File => "file".into(),
                nbd_proxy::BackingKind::BlockDevice => "block_device".into(),
            },
            size: e.image.size,
            read_only: e.image.read_only,
            connections: self.server.connections(&e.name),
            uris,
            cbt: cbt_info(&e.tracker),
        }
    }

    /// Saves every bitmap with the clean-shutdown mark.
    pub fn shutdown(&self) {
        for e in self.server.all() {
            match e.tracker.shutdown() {
                Ok(()) => tracing::info!(disk = %e.name, "bitmap saved"),
                Err(err) => tracing::error!(disk = %e.name, "saving the bitmap failed: {err}"),
            }
        }
    }
}

fn store_err(e: StoreError) -> ApiError {
    let code = match &e {
        StoreError::NoSnapshot(_) | StoreError::MissingChunk(_) => ErrorCode::NotFound,
        StoreError::Exists(_) | StoreError::Locked(_) => ErrorCode::Conflict,
        _ => ErrorCode::Internal,
    };
    err(code, e.to_string())
}

fn snapshot_id(id: &str) -> Result<SnapshotId, ApiError> {
    id.parse()
        .map_err(|e: novabackup_engine::ids::BadSnapshotId| {
            err(ErrorCode::BadRequest, e.to_string())
        })
}

fn parse_disk(d: &str) -> Result<DiskName, ApiError> {
    d.parse::<DiskName>()
        .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))
}

fn snapshot_info(m: Manifest) -> SnapshotInfo {
    SnapshotInfo {
        id: m.id.to_string(),
        disk: m.disk.to_string(),
        time: m.time,
        kind: m.kind,
        parent: m.parent.map(|p| p.to_string()),
        reason: m.reason,
        image_size: m.image_size,
        chunk_size: m.chunk_size,
        stats: m.stats,
        protected: m.protected,
        verified: m.verified,
        audit: m.audit,
    }
}

fn cbt_info(t: &Tracker) -> CbtInfo {
    let s = t.status();
    CbtInfo {
        granularity: s.granularity,
        blocks: s.blocks,
        dirty_blocks: s.dirty_blocks,
        dirty_bytes: s.dirty_bytes,
        trusted: s.trusted,
        reason: s.reason,
        checkpoint_active: s.checkpoint_active,
    }
}

impl DiskService for Agent {
    fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            io_engine: match self.server.engine() {
                nbd_proxy::IoEngine::Uring => "uring".into(),
                nbd_proxy::IoEngine::Pread => "pread".into(),
            },
        }
    }

    fn list(&self) -> Vec<DiskInfo> {
        self.server.all().iter().map(|e| self.info(e)).collect()
    }

    fn get(&self, name: &str) -> Result<DiskInfo, ApiError> {
        Ok(self.info(&*self.export(name)?))
    }

    fn attach(&self, req: AttachRequest) -> Result<DiskInfo, ApiError> {
        let name: DiskName =
            req.name
                .parse()
                .map_err(|e: novabackup_engine::ids::BadDiskName| {
                    err(ErrorCode::BadRequest, e.to_string())
                })?;
        let granularity = Granularity::new(req.granularity.unwrap_or(Granularity::DEFAULT.bytes()))
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        let image = PathBuf::from(&req.image);
        if !image.is_absolute() {
            return Err(err(
                ErrorCode::BadRequest,
                format!("image path {:?} must be absolute", req.image),
            ));
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if self.server.get(name.as_str()).is_some() || records.iter().any(|r| r.name == name) {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "a disk named {name} is already attached; detach it first or pick another name"
                ),
            ));
        }
        let canonical = image.canonicalize().unwrap_or_else(|_| image.clone());
        if let Some(other) = records.iter().find(|r| same_file(&r.image, &canonical)) {
            return Err(err(
                ErrorCode::Conflict,
                format!("{} is already attached as disk {}; writes through two exports would escape tracking", image.display(), other.name),
            ));
        }
        let record = DiskRecord {
            name: name.clone(),
            image: canonical,
            granularity,
            read_only: req.read_only,
        };
        // A bitmap left from an earlier attachment says nothing about the
        // writes made while the disk was not tracked.
        let _ = fsutil::remove_durable(&self.bitmap_path(&name));
        let _ = fsutil::remove_durable(&self.bitmap_path(&name).with_extension("frozen"));
        let export = self.open(&record)?;
        let mut next = records.clone();
        next.push(record);
        self.save(&next)?;
        self.server
            .add(export.clone())
            .map_err(|e| err(ErrorCode::Conflict, e.to_string()))?;
        *records = next;
        tracing::info!(disk = %name, image = %export.image.path.display(), "disk attached");
        Ok(self.info(&export))
    }

    fn detach(&self, name: &str) -> Result<(), ApiError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let export = match self.server.remove(name) {
            Ok(e) => Some(e),
            Err(ServerError::Busy { .. }) => {
                let n = self.server.connections(name);
                return Err(err(ErrorCode::Conflict, format!("disk {name} has {n} connected NBD client(s); disconnect them (shut the VM down) first")));
            }
            // Known but not served (its image was missing at start-up).
            Err(_) if records.iter().any(|r| r.name.as_str() == name) => None,
            Err(_) => return Err(self.export(name).unwrap_err()),
        };
        if let Some(e) = &export {
            if let Err(x) = e.tracker.shutdown() {
                tracing::warn!(disk = name, "saving the bitmap at detach failed: {x}");
            }
        }
        let next: Vec<DiskRecord> = records
            .iter()
            .filter(|r| r.name.as_str() != name)
            .cloned()
            .collect();
        self.save(&next)?;
        *records = next;
        if let Ok(n) = name.parse::<DiskName>() {
            let _ = fsutil::remove_durable(&self.bitmap_path(&n));
        }
        tracing::info!(disk = name, "disk detached");
        Ok(())
    }

    fn cbt(&self, name: &str) -> Result<CbtInfo, ApiError> {
        Ok(cbt_info(&self.export(name)?.tracker))
    }

    fn cbt_reset(&self, name: &str) -> Result<CbtInfo, ApiError> {
        let e = self.export(name)?;
        e.tracker
            .reset()
            .map_err(|x| err(ErrorCode::Internal, x.to_string()))?;
        tracing::info!(disk = name, "bitmap reset by the operator");
        Ok(cbt_info(&e.tracker))
    }

    fn backup(&self, req: BackupRequest) -> Result<JobInfo, ApiError> {
        let mode = match (req.full, req.audit) {
            (true, true) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    "choose full or audit, not both (an audit reads everything too)",
                ))
            }
            (true, false) => Mode::Full,
            (false, true) => Mode::Audit,
            (false, false) => Mode::Auto,
        };
        self.start_backup(&req.disk, mode)
    }

    fn snapshots(&self, disk: Option<&str>) -> Result<Vec<SnapshotInfo>, ApiError> {
        let disk = match disk {
            Some(d) => Some(
                d.parse::<DiskName>()
                    .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?,
            ),
            None => None,
        };
        let (list, damaged) = self.store.list(disk.as_ref()).map_err(store_err)?;
        for d in damaged {
            tracing::error!("{d}");
        }
        Ok(list.into_iter().map(snapshot_info).collect())
    }

    fn snapshot(&self, id: &str) -> Result<SnapshotInfo, ApiError> {
        self.store
            .manifest(&snapshot_id(id)?)
            .map(snapshot_info)
            .map_err(store_err)
    }

    fn delete_snapshot(&self, id: &str) -> Result<(), ApiError> {
        let id = snapshot_id(id)?;
        if self.store.manifest(&id).map_err(store_err)?.protected {
            return Err(err(
                ErrorCode::Conflict,
                format!("snapshot {id} is protected; `novabackup snapshot unprotect {id}` first"),
            ));
        }
        self.store.delete(&id).map_err(store_err)?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    fn verify(&self, req: VerifyRequest) -> Result<JobInfo, ApiError> {
        let ids = match req.snapshots {
            Some(v) if !v.is_empty() => {
                let ids = v
                    .iter()
                    .map(|i| snapshot_id(i))
                    .collect::<Result<Vec<_>, _>>()?;
                for id in &ids {
                    self.store.manifest(id).map_err(store_err)?;
                }
                Some(ids)
            }
            _ => None,
        };
        let target = ids
            .as_ref()
            .map(|v| {
                v.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "all".into());
        let disk = req.disk.as_deref().map(parse_disk).transpose()?;
        let skip_within = req
            .skip_verified_within
            .as_deref()
            .map(novabackup_engine::retention::parse_duration)
            .transpose()
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        let target = match (&ids, &disk) {
            (None, Some(d)) => d.to_string(),
            _ => target,
        };
        Ok(self.start_verify(
            work::VerifyScope {
                ids,
                disk,
                skip_within,
            },
            target,
        ))
    }

    fn restore(&self, req: RestoreRequest) -> Result<JobInfo, ApiError> {
        let id = snapshot_id(&req.snapshot)?;
        self.store.manifest(&id).map_err(store_err)?;
        let target = PathBuf::from(&req.target);
        if !target.is_absolute() {
            return Err(err(
                ErrorCode::BadRequest,
                format!("target {:?} must be an absolute path", req.target),
            ));
        }
        if let Some(d) = self
            .server
            .all()
            .iter()
            .find(|e| same_file(&e.image.path, &target))
        {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "{} is the image of attached disk {}; detach it before restoring over it",
                    target.display(),
                    d.name
                ),
            ));
        }
        if target.exists() && !req.force {
            return Err(err(
                ErrorCode::Conflict,
                format!("{} exists; pass --force to overwrite it", target.display()),
            ));
        }
        let store = self.store.clone();
        let workers = self.settings.workers;
        let force = req.force;
        Ok(self.jobs.spawn("restore", &id.to_string(), move |p| {
            work::restore(store, &id, &target, force, workers, p)
        }))
    }

    fn jobs(&self) -> Vec<JobInfo> {
        self.jobs.list()
    }

    fn job(&self, id: &str) -> Result<JobInfo, ApiError> {
        self.jobs.get(id).ok_or_else(|| no_job(id))
    }

    fn wait_job(&self, id: &str, timeout: std::time::Duration) -> Result<JobInfo, ApiError> {
        self.jobs.wait(id, timeout).ok_or_else(|| no_job(id))
    }

    fn cancel(&self, id: &str) -> Result<JobInfo, ApiError> {
        self.jobs.cancel(id).ok_or_else(|| no_job(id))
    }

    fn metrics(&self) -> Result<String, ApiError> {
        use super::metrics::{render, DiskSample, StoreSample};
        let disks: Vec<DiskSample> = self
            .server
            .all()
            .iter()
            .map(|e| DiskSample {
                name: e.name.clone(),
                requests: e.stats.requests(),
                bytes_read: e.stats.bytes_read(),
                bytes_written: e.stats.bytes_written(),
                dirty_bytes: cbt_info(&e.tracker).dirty_bytes,
                connections: self.server.connections(&e.name),
                latency: e.stats.latency(),
            })
            .collect();
        let (list, _) = self.store.list(None).map_err(store_err)?;
        let q = self.policy.quotas();
        let store = StoreSample {
            bytes: self.store.usage().map_err(store_err)?,
            snapshots: list.len(),
            chunks: self.store.chunk_count(),
            limit: q.store,
            disks: policy::usage_report(&list, &q)
                .into_iter()
                .map(|u| (u.disk, u.bytes, u.limit))
                .collect(),
        };
        Ok(render(&self.jobs.totals(), &disks, &store))
    }

    fn store_info(&self) -> Result<novabackup_api::types::StoreInfo, ApiError> {
        let (list, _) = self.store.list(None).map_err(store_err)?;
        let q = self.policy.quotas();
        Ok(novabackup_api::types::StoreInfo {
            location: self.store.describe(),
            bytes_used: self.store.usage().map_err(store_err)?,
            snapshots: list.len(),
            limit: q.store,
            disks: policy::usage_report(&list, &q),
            schedules: self.schedules.list(),
        })
    }

    fn protect(&self, id: &str, protected: bool) -> Result<SnapshotInfo, ApiError> {
        let id = snapshot_id(id)?;
        let a = novabackup_engine::format::manifest::Annotation {
            protected: Some(protected),
            ..Default::default()
        };
        let m = self.store.annotate(&id, &a).map_err(store_err)?;
        tracing::info!(snapshot = %id, protected, "snapshot protection changed");
        Ok(snapshot_info(m))
    }

    fn policies(&self) -> Result<Vec<RetentionPolicy>, ApiError> {
        Ok(self.policy.policies())
    }

    fn put_policy(&self, p: RetentionPolicy, create: bool) -> Result<RetentionPolicy, ApiError> {
        self.policy.put_policy(p, create)
    }

    fn delete_policy(&self, name: &str) -> Result<(), ApiError> {
        self.policy.delete_policy(name)
    }

    fn prune(&self, req: PruneRequest) -> Result<JobInfo, ApiError> {
        let disk = req.disk.as_deref().map(parse_disk).transpose()?;
        Ok(self.start_prune(disk, req.dry_run))
    }

    fn gc(&self, req: novabackup_api::types::GcRequest) -> Result<JobInfo, ApiError> {
        self.start_gc(novabackup_engine::store::GcOptions {
            min_garbage_percent: req.min_garbage_percent,
        })
    }

    fn schedules(&self) -> Result<Vec<ScheduleInfo>, ApiError> {
        Ok(self.schedules.list())
    }

    fn put_schedule(
        &self,
        req: ScheduleRequest,
        id: Option<String>,
    ) -> Result<ScheduleInfo, ApiError> {
        self.schedules
            .put(req, id, novabackup_engine::time::now_unix())
    }

    fn delete_schedule(&self, id: &str) -> Result<(), ApiError> {
        self.schedules.delete(id)
    }

    fn quotas(&self) -> Result<Quotas, ApiError> {
        Ok(self.policy.quotas())
    }

    fn set_quotas(&self, q: Quotas) -> Result<Quotas, ApiError> {
        self.policy.set_quotas(q)
    }
}

impl schedule::Runner for Agent {
    fn disks_for(&self, action: ScheduleAction) -> Vec<String> {
        match action {
            ScheduleAction::Backup => self.server.all().iter().map(|e| e.name.clone()).collect(),
            // Every disk with snapshots, attached or not.
            _ => match self.store.list(None) {
                Ok((l, _)) => l
                    .iter()
                    .map(|m| m.disk.to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                Err(e) => {
                    tracing::error!("scheduler cannot list snapshots: {e}");
                    Vec::new()
                }
            },
        }
    }

    fn start(&self, run: &Run) -> Start {
        let disk = run.disk.clone();
        if let Some(d) = &disk {
            if self.busy.is_busy(d) {
                return Start::Busy;
            }
        }
        let r = match (run.spec.action, disk) {
            (ScheduleAction::Backup, Some(d)) => {
                let mode = match (run.spec.full, run.spec.audit) {
                    (true, _) => Mode::Full,
                    (_, true) => Mode::Audit,
                    _ => Mode::Auto,
                };
                match self.start_backup(&d, mode) {
                    Err(e) if e.code == ErrorCode::Conflict => return Start::Busy,
                    r => r,
                }
            }
            (ScheduleAction::Prune, d) => d
                .as_deref()
                .map(parse_disk)
                .transpose()
                .map(|d| self.start_prune(d, false)),
            (ScheduleAction::Verify, d) => {
                let skip = run
                    .spec
                    .skip_verified_within
                    .as_deref()
                    .and_then(|w| novabackup_engine::retention::parse_duration(w).ok());
                d.as_deref().map(parse_disk).transpose().map(|disk| {
                    let target = disk.as_ref().map_or("all".into(), |d| d.to_string());
                    self.start_verify(
                        work::VerifyScope {
                            ids: None,
                            disk,
                            skip_within: skip,
                        },
                        target,
                    )
                })
            }
            (ScheduleAction::Gc, _) => match self.start_gc(novabackup_engine::store::GcOptions {
                min_garbage_percent: run.spec.min_garbage_percent.unwrap_or(0),
            }) {
                Err(e) if e.code == ErrorCode::Conflict => return Start::Busy,
                r => r,
            },
            (ScheduleAction::Backup, None) => Err(err(ErrorCode::BadRequest, "no disk")),
        };
        match r {
            Ok(j) => {
                tracing::info!(schedule = %run.schedule, job = %j.id, kind = %j.kind, target = %j.target, "scheduled job started");
                Start::Started
            }
            Err(e) => Start::Failed(e.message),
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino(), x.rdev()) == (y.dev(), y.ino(), y.rdev()),
        _ => a == b,
    }
}

fn no_job(id: &str) -> ApiError {
    err(
        ErrorCode::NotFound,
        format!("no job {id:?}; `GET /api/v1/jobs` lists them"),
    )
}
