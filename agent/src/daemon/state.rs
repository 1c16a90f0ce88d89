//! The agent's state: a registry of its disks (attach, detach, restore at
//! start and save at stop, persisted in DATA_DIR/disks.json through the
//! crash-safe helper, with one bitmap per disk under DATA_DIR/cbt/), the
//! store, the job table and the settings. Operations are the engine's
//! (`novabackup_engine::ops`); the agent starts them as jobs
//! ([`Agent::start_backup`] and its siblings), and `service.rs` answers
//! the API with them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nbd_proxy::export::ExportError;
use nbd_proxy::server::ServerError;
use nbd_proxy::{Export, Image, Server, Tracker};
use novabackup_api::types::{AttachRequest, CbtInfo, DiskInfo, JobInfo};
use novabackup_engine::backup::BackupOptions;
use novabackup_engine::cbt::Granularity;
use novabackup_engine::fsutil;
use novabackup_engine::ids::DiskName;
use novabackup_engine::ops::backup::BackupJobOptions;
use novabackup_engine::ops::claims::Claims;
use novabackup_engine::ops::prune::PruneOptions;
use novabackup_engine::ops::restore::RestoreOptions;
use novabackup_engine::ops::verify::VerifyScope;
use novabackup_engine::ops::{self, ErrorKind, OpError};
use novabackup_engine::pagecache::PageCache;
use novabackup_engine::plan::Mode;
use novabackup_engine::read::ReadEngine;
use novabackup_engine::store::{GcOptions, Store};
use serde::{Deserialize, Serialize};

use super::jobs::{Jobs, Report};
use super::mounts::{LiveFill, MountRecord};
use super::policy::Settings;
use super::schedule::Schedules;

const DISKS_FILE: &str = "disks.json";

/// One attached disk as saved in disks.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskRecord {
    name: DiskName,
    image: PathBuf,
    granularity: Granularity,
    read_only: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allow: Vec<String>,
    /// A live restore still filling the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fill: Option<LiveFill>,
}

#[derive(Debug, Default, Clone)]
struct Endpoints {
    tcp: Option<String>,
    socket: Option<PathBuf>,
}

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
    pub pages: Arc<PageCache>,
    /// Where restores asked for over the API may write.
    pub confine: novabackup_engine::ops::restore::Confinement,
    /// Bytes of decoded chunks each reader of a snapshot keeps (file
    /// listings and downloads).
    pub snapshot_cache: usize,
    /// The store's site, as placement rules name it.
    pub site: Option<String>,
    /// Per disk, the sites allowed to hold its backups.
    pub placement: novabackup_engine::placement::Placement,
    /// Other sites' stores: where each is and how to reach it.
    pub sites: std::collections::BTreeMap<String, (String, crate::daemon::StoreAccess)>,
}

/// The agent's state.
pub struct Agent {
    pub(super) dir: PathBuf,
    pub(super) server: Arc<Server>,
    pub(super) boot_id: String,
    /// The mounts (see `mounts.rs`), as mounts.json says.
    pub(super) mounts: Mutex<Vec<MountRecord>>,
    /// The background fill job of each export being filled.
    pub(super) fill_jobs: Mutex<std::collections::HashMap<String, String>>,
    /// The agent itself, for jobs that update it when they end.
    pub(super) me: std::sync::OnceLock<std::sync::Weak<Agent>>,
    /// Serializes attach and detach, and holds what disks.json says.
    records: Mutex<Vec<DiskRecord>>,
    endpoints: Mutex<Endpoints>,
    pub(super) store: Arc<dyn Store>,
    pub(super) jobs: Jobs,
    pub(super) settings: EngineSettings,
    pub(super) policy: Arc<Settings>,
    pub(super) schedules: Arc<Schedules>,
    claims: Claims,
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> OpError {
    OpError::new(kind, msg)
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
            mounts: Mutex::new(Vec::new()),
            fill_jobs: Default::default(),
            me: Default::default(),
            records: Mutex::new(Vec::new()),
            endpoints: Mutex::new(Endpoints::default()),
            store,
            jobs: Jobs::default(),
            settings,
            policy: Arc::new(policy),
            schedules,
            claims: Claims::default(),
        }
    }

    /// Starts a backup job holding the disk's claim; [`ErrorKind::Busy`]
    /// when another job holds the disk.
    pub fn start_backup(&self, disk: &str, mode: Mode) -> Result<JobInfo, OpError> {
        let export = self.export(disk)?;
        self.settings
            .placement
            .check(disk, self.settings.site.as_deref())
            .map_err(|e| OpError::forbidden(e.to_string()))?;
        let busy = || {
            OpError::busy(format!(
                "a backup, prune or verify of disk {disk} is running; wait for it to finish"
            ))
        };
        if export.tracker.status().checkpoint_active {
            return Err(busy());
        }
        if let Some(f) = export.filling() {
            let p = f.progress();
            return Err(OpError::busy(format!(
                "disk {disk} is being live-restored ({} of {} chunks filled); back it up once the restore job has finished",
                p.filled, p.chunks
            )));
        }
        let claim = self.claims.try_claim(disk).ok_or_else(busy)?;
        let store = self.store.clone();
        let s = &self.settings;
        let opts = BackupJobOptions {
            mode,
            pipeline: s.backup.clone(),
            read: s.read,
            audit_every: s.audit_every,
            limits: self.policy.limits(),
        };
        let pages = s.pages.clone();
        Ok(self
            .jobs
            .spawn("backup", disk, vec![disk.to_string()], move |p| {
                let _claim = claim;
                ops::backup::backup(&*export, &*store, &opts, Some(&pages), p)
                    .map(|r| Report::Backup(Box::new(r)))
            }))
    }

    /// Starts a verify job (it claims each disk in turn, waiting for it).
    pub fn start_verify(&self, scope: VerifyScope) -> Result<JobInfo, OpError> {
        scope.check(&*self.store)?;
        let store = self.store.clone();
        let workers = self.settings.workers;
        let claims = self.claims.clone();
        let disks = match (&scope.ids, &scope.disk) {
            (Some(ids), _) => {
                let mut d: Vec<String> = ids.iter().map(|i| i.disk().to_string()).collect();
                d.dedup();
                d
            }
            (None, Some(d)) => vec![d.to_string()],
            (None, None) => Vec::new(),
        };
        Ok(self.jobs.spawn("verify", &scope.target(), disks, move |p| {
            ops::verify::verify(&*store, &scope, &claims, workers, p).map(Report::Verify)
        }))
    }

    /// Starts a prune job (it claims each disk in turn, waiting for it).
    pub fn start_prune(&self, opts: PruneOptions) -> JobInfo {
        let store = self.store.clone();
        let settings = self.policy.clone();
        let claims = self.claims.clone();
        let target = opts
            .disk
            .as_ref()
            .map_or("all".to_string(), |d| d.to_string());
        let kind = if opts.dry_run {
            "prune-dry-run"
        } else {
            "prune"
        };
        let disks = opts.disk.iter().map(|d| d.to_string()).collect();
        self.jobs.spawn(kind, &target, disks, move |p| {
            let policy_for = |d: &str| settings.effective(d);
            ops::prune::prune(&*store, &policy_for, &claims, &opts, p).map(Report::Prune)
        })
    }

    /// Starts a garbage collection; [`ErrorKind::Busy`] while one runs.
    pub fn start_gc(&self, opts: GcOptions) -> Result<JobInfo, OpError> {
        ops::snapshots::check_gc(&opts)?;
        // One collection at a time; the store refuses a second one too.
        let claim = self.claims.try_claim("\0gc").ok_or_else(|| {
            OpError::busy("a garbage collection is running; wait for it to finish")
        })?;
        let store = self.store.clone();
        Ok(self.jobs.spawn("gc", "store", Vec::new(), move |p| {
            let _claim = claim;
            ops::snapshots::gc(&*store, &opts, p).map(Report::Gc)
        }))
    }

    /// Starts a replication of this agent's store to another site's store
    /// (opened when the job starts, so an unreachable site fails the job,
    /// not the agent); one at a time per site.
    pub fn start_sync(&self, req: novabackup_api::types::SyncRequest) -> Result<JobInfo, OpError> {
        let Some((where_, access)) = self.settings.sites.get(&req.site).cloned() else {
            let known: Vec<&str> = self.settings.sites.keys().map(String::as_str).collect();
            return Err(OpError::invalid(format!(
                "no site {:?} in the configuration (sites: {}); add it under `sites`",
                req.site,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        let disks = req
            .disks
            .iter()
            .map(|d| d.parse().map_err(|e| OpError::invalid(format!("{e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let claim = self
            .claims
            .try_claim(&format!("\0sync:{}", req.site))
            .ok_or_else(|| {
                OpError::busy(format!(
                    "a replication to site {} is running; wait for it to finish",
                    req.site
                ))
            })?;
        let opts = ops::sync::SyncOptions {
            disks,
            newest: req.newest.map(|n| n as usize),
            bandwidth: req.bandwidth,
            checkpoint: 0,
            placement: Some((self.settings.placement.clone(), Some(req.site.clone()))),
        };
        let store = self.store.clone();
        let site = req.site.clone();
        Ok(self.jobs.spawn("sync", &req.site, Vec::new(), move |p| {
            let _claim = claim;
            let target = crate::daemon::open_store_at(&where_, &access).map_err(|e| {
                OpError::new(
                    ErrorKind::Internal,
                    format!("cannot reach the store of site {site}: {e:#}"),
                )
            })?;
            ops::sync::sync(&*store, &*target, &opts, p).map(Report::Sync)
        }))
    }

    /// Starts a restore job once the target passed its checks; never over
    /// the image of an attached disk.
    pub fn start_restore(&self, mut opts: RestoreOptions) -> Result<JobInfo, OpError> {
        opts.in_use = self
            .server
            .all()
            .iter()
            .map(|e| (e.name.clone(), e.image.path.clone()))
            .collect();
        ops::restore::check(&*self.store, &mut opts)?;
        let store = self.store.clone();
        Ok(self.jobs.spawn(
            "restore",
            &opts.snapshot.to_string(),
            vec![opts.snapshot.disk().to_string()],
            move |p| ops::restore::restore(&*store, &opts, p).map(Report::Restore),
        ))
    }

    /// Whether a job holds `disk`.
    pub fn is_busy(&self, disk: &str) -> bool {
        self.claims.is_busy(disk)
    }

    pub(super) fn set_endpoints(&self, tcp: Option<String>, socket: Option<PathBuf>) {
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = Endpoints { tcp, socket };
    }

    fn bitmap_path(&self, name: &DiskName) -> PathBuf {
        self.dir.join("cbt").join(format!("{name}.cbt"))
    }

    /// Lets jobs reach the agent (call once, right after `Arc::new`).
    pub fn set_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Re-attaches the disks of disks.json. A disk whose image is gone is
    /// reported and kept in the file, so it comes back once the image does.
    pub fn restore(&self) -> anyhow::Result<()> {
        let records: Vec<DiskRecord> = load_records(
            &self.dir.join(DISKS_FILE),
            "fix or remove it, then re-attach the disks",
        )?;
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
        self.restore_mounts()
    }

    fn open(&self, r: &DiskRecord) -> Result<Arc<Export>, OpError> {
        if let Some(live) = &r.fill {
            let map = self.fill_map(&r.name);
            // The map is made before the record names it and removed only
            // once the fill is complete: a record naming a fill whose map
            // is gone was complete when the agent stopped.
            if map.exists() {
                return self.lazy_export(
                    &r.name,
                    &r.image,
                    &live.snapshot,
                    r.read_only,
                    live.zeroed,
                    &map,
                    &self.bitmap_path(&r.name),
                    r.allow.clone(),
                );
            }
        }
        let image = Image::open(&r.image, r.read_only).map_err(|e| match &e {
            ExportError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                err(
                    ErrorKind::Invalid,
                    format!("image {} does not exist", r.image.display()),
                )
            }
            _ => err(ErrorKind::Invalid, e.to_string()),
        })?;
        let tracker = Tracker::open(
            &self.bitmap_path(&r.name),
            image.size,
            r.granularity,
            &self.boot_id,
        )
        .map_err(|e| err(ErrorKind::Internal, e.to_string()))?;
        Ok(Arc::new(Export {
            name: r.name.to_string(),
            image,
            tracker: Arc::new(tracker),
            stats: Default::default(),
            allow: r.allow.clone(),
            filler: None,
        }))
    }

    /// The live restore filling disk `name`, if one is.
    pub(super) fn live_fill(&self, name: &str) -> Option<LiveFill> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .find(|r| r.name.as_str() == name)?
            .fill
            .clone()
    }

    /// Forgets disk `name`'s finished fill; returns what it was.
    pub(super) fn finish_live(&self, name: &str) -> Option<LiveFill> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let i = records.iter().position(|r| r.name.as_str() == name)?;
        let live = records[i].fill.clone()?;
        let mut next = records.clone();
        next[i].fill = None;
        if let Err(e) = self.save(&next) {
            tracing::error!(disk = name, "{e}");
            return None;
        }
        *records = next;
        Some(live)
    }

    /// Attaches `image` as disk `name`, filled from a snapshot (a live
    /// restore).
    pub(super) fn attach_live(
        &self,
        name: &DiskName,
        image: &std::path::Path,
        live: LiveFill,
    ) -> Result<Arc<Export>, OpError> {
        let (live_snapshot, zeroed) = (live.snapshot.clone(), live.zeroed);
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if self.server.get(name.as_str()).is_some() || records.iter().any(|r| &r.name == name) {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "a disk named {name} is already attached; detach it first or pick another name"
                ),
            ));
        }
        let record = DiskRecord {
            name: name.clone(),
            image: image.canonicalize().unwrap_or_else(|_| image.to_path_buf()),
            granularity: Granularity::DEFAULT,
            read_only: false,
            allow: Vec::new(),
            fill: Some(live),
        };
        let _ = fsutil::remove_durable(&self.bitmap_path(name));
        let _ = fsutil::remove_durable(&self.bitmap_path(name).with_extension("frozen"));
        // Makes the fill map, before the record that names it is saved.
        let export = self.lazy_export(
            name,
            &record.image,
            &live_snapshot,
            false,
            zeroed,
            &self.fill_map(name),
            &self.bitmap_path(name),
            Vec::new(),
        )?;
        let mut next = records.clone();
        next.push(record);
        self.save(&next)?;
        self.server
            .add(export.clone())
            .map_err(|e| err(ErrorKind::Conflict, e.to_string()))?;
        *records = next;
        Ok(export)
    }

    fn save(&self, records: &[DiskRecord]) -> Result<(), OpError> {
        let bytes = serde_json::to_vec_pretty(records).expect("records serialize");
        fsutil::write_atomic(&self.dir.join(DISKS_FILE), &bytes, 0o600).map_err(|e| {
            err(
                ErrorKind::Internal,
                format!("cannot save {DISKS_FILE}: {e}"),
            )
        })
    }

    /// The attached disks (mounts are exports too, but not disks).
    pub(super) fn disks(&self) -> Vec<Arc<Export>> {
        let mut all = self.server.all();
        all.retain(|e| !self.is_mount(&e.name));
        all
    }

    pub(super) fn export(&self, name: &str) -> Result<Arc<Export>, OpError> {
        if self.is_mount(name) {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{name} is a mount of a snapshot, not a disk; `novabackup mounts` shows it"
                ),
            ));
        }
        self.server.get(name).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no disk named {name:?}; `novabackup disk list` shows the attached disks"),
            )
        })
    }

    pub(super) fn info(&self, e: &Export) -> DiskInfo {
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
            allow: e.allow.clone(),
            uris,
            cbt: cbt_info(&e.tracker),
            restoring: self.restoring(e),
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
    /// Attaches a disk: serves its image over NBD and tracks its writes.
    pub fn attach(&self, req: AttachRequest) -> Result<DiskInfo, OpError> {
        let name: DiskName =
            req.name
                .parse()
                .map_err(|e: novabackup_engine::ids::BadDiskName| {
                    err(ErrorKind::Invalid, e.to_string())
                })?;
        let granularity = Granularity::new(req.granularity.unwrap_or(Granularity::DEFAULT.bytes()))
            .map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
        for a in &req.allow {
            nbd_proxy::access::check_entry(a)
                .map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
        }
        let image = PathBuf::from(&req.image);
        if !image.is_absolute() {
            return Err(err(
                ErrorKind::Invalid,
                format!("image path {:?} must be absolute", req.image),
            ));
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if self.server.get(name.as_str()).is_some() || records.iter().any(|r| r.name == name) {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "a disk named {name} is already attached; detach it first or pick another name"
                ),
            ));
        }
        let canonical = image.canonicalize().unwrap_or_else(|_| image.clone());
        if let Some(other) = records
            .iter()
            .find(|r| fsutil::same_file(&r.image, &canonical))
        {
            return Err(err(
                ErrorKind::Conflict,
                format!("{} is already attached as disk {}; writes through two exports would escape tracking", image.display(), other.name),
            ));
        }
        let record = DiskRecord {
            name: name.clone(),
            image: canonical,
            granularity,
            read_only: req.read_only,
            allow: req.allow.clone(),
            fill: None,
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
            .map_err(|e| err(ErrorKind::Conflict, e.to_string()))?;
        *records = next;
        drop(records);
        tracing::info!(disk = %name, image = %export.image.path.display(), "disk attached");
        Ok(self.info(&export))
    }

    /// Detaches a disk. Refused while NBD clients are connected, unless
    /// `force`: then they are disconnected first.
    pub fn detach(&self, name: &str, force: bool) -> Result<(), OpError> {
        if self.is_mount(name) {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} is a mount, not a disk; end it with `novabackup unmount {name}`"),
            ));
        }
        let live = self.live_fill(name);
        if let (Some(l), false) = (&live, force) {
            return Err(err(
                ErrorKind::Conflict,
                format!("disk {name} is being live-restored from {}; wait for the restore job, or detach with --force (the image is left incomplete)", l.snapshot),
            ));
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if force {
            let n = self
                .server
                .disconnect(name, std::time::Duration::from_secs(10));
            if n > 0 {
                tracing::warn!(
                    disk = name,
                    clients = n,
                    "NBD clients disconnected by a forced detach"
                );
            }
        }
        let export = match self.server.remove(name) {
            Ok(e) => Some(e),
            Err(ServerError::Busy { .. }) => {
                let n = self.server.connections(name);
                return Err(err(ErrorKind::Conflict, format!("disk {name} has {n} connected NBD client(s); disconnect them (shut the VM down) first, or detach with --force")));
            }
            // Known but not served (its image was missing at start-up).
            Err(_) if records.iter().any(|r| r.name.as_str() == name) => None,
            Err(_) => {
                return Err(err(
                    ErrorKind::NotFound,
                    format!(
                        "no disk named {name:?}; `novabackup disk list` shows the attached disks"
                    ),
                ))
            }
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
            if let Some(l) = live {
                drop(records);
                self.abandon_fill(&n, &l);
            }
        }
        tracing::info!(disk = name, "disk detached");
        Ok(())
    }

    /// Clears a disk's bitmap (the operator's reset).
    pub fn cbt_reset(&self, name: &str) -> Result<CbtInfo, OpError> {
        let e = self.export(name)?;
        e.tracker
            .reset()
            .map_err(|x| err(ErrorKind::Internal, x.to_string()).with_source(x))?;
        tracing::info!(disk = name, "bitmap reset by the operator");
        Ok(cbt_info(&e.tracker))
    }
}

/// A saved list of records (disks.json, mounts.json); empty when the file
/// does not exist yet, an error naming `fix` when it is damaged.
pub(super) fn load_records<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    fix: &str,
) -> anyhow::Result<Vec<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); {fix}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// What the API shows of a tracker.
pub(super) fn cbt_info(t: &Tracker) -> CbtInfo {
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
