//! Restores that do not make anyone wait: snapshots served as NBD exports
//! straight from the store (mounts, read-only or with a copy-on-write
//! overlay, and their promotion to real disks), and live restores (the
//! target is an attached, tracked disk at once while a job fills the rest).
//! Both are an export with a [`Filler`] in front of a local image; mounts
//! are saved in DATA_DIR/mounts.json, live restores in the disk's record.
//!
//! A snapshot being read this way is protected in the store (unless it
//! already was) so that prune and delete cannot take its chunks away; the
//! protection is lifted when the mount ends or the fill completes.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_proxy::fill::{FillProgress, Filler};
use nbd_proxy::{Export, Image, Tracker};
use novabackup_api::types::{FillInfo, JobInfo, JobState, MountInfo, MountRequest, PromoteRequest};
use novabackup_engine::cbt::Granularity;
use novabackup_engine::fsutil;
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::ops::restore::RestoreOptions;
use novabackup_engine::ops::{self, ErrorKind, OpError};
use novabackup_engine::progress::Progress;
use novabackup_engine::snapshot_reader::{ReaderOptions, SnapshotReader};
use serde::{Deserialize, Serialize};

use super::jobs::Report;
use super::state::Agent;

const MOUNTS_FILE: &str = "mounts.json";
/// Chunks the background fill copies between checks for cancel.
const FILL_STEP: u64 = 64;

/// One mount as saved in mounts.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MountRecord {
    name: DiskName,
    snapshot: SnapshotId,
    writable: bool,
    /// The overlay, or the promoted image.
    image: PathBuf,
    #[serde(default)]
    promoted: bool,
    /// Every block is local (a finished promotion): no filler any more.
    #[serde(default)]
    complete: bool,
    /// The mount protected the snapshot and lifts that at the end.
    #[serde(default)]
    protects: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allow: Vec<String>,
}

/// What a live restore keeps in its disk's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct LiveFill {
    pub(super) snapshot: SnapshotId,
    /// The target was new (reads as zeroes where nothing was written).
    pub(super) zeroed: bool,
    /// The restore protected the snapshot and lifts that at the end.
    #[serde(default)]
    pub(super) protects: bool,
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> OpError {
    OpError::new(kind, msg)
}

fn internal(what: &str, e: impl std::fmt::Display) -> OpError {
    err(ErrorKind::Internal, format!("{what}: {e}"))
}

/// Creates a new sparse image file of `size` bytes, never over anything.
fn create_sparse(path: &Path, size: u64) -> Result<(), OpError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| internal(&format!("cannot create {}", path.display()), e))?;
    f.set_len(size)
        .map_err(|e| internal(&format!("cannot size {}", path.display()), e))
}

impl Agent {
    fn mounts_path(&self) -> PathBuf {
        self.dir.join(MOUNTS_FILE)
    }

    fn mount_dir(&self) -> PathBuf {
        self.dir.join("mounts")
    }

    pub(super) fn fill_map(&self, name: &DiskName) -> PathBuf {
        self.dir.join("fill").join(format!("{name}.fill"))
    }

    fn mount_bitmap(&self, name: &DiskName) -> PathBuf {
        self.mount_dir().join(format!("{name}.cbt"))
    }

    fn save_mounts(&self, records: &[MountRecord]) -> Result<(), OpError> {
        let bytes = serde_json::to_vec_pretty(records).expect("records serialize");
        fsutil::write_atomic(&self.mounts_path(), &bytes, 0o600)
            .map_err(|e| internal(&format!("cannot save {MOUNTS_FILE}"), e))
    }

    fn mount_records(&self) -> std::sync::MutexGuard<'_, Vec<MountRecord>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Protects `id` unless it already is; true when this call did.
    fn hold(&self, id: &SnapshotId) -> Result<bool, OpError> {
        if self.store.manifest(id)?.protected {
            return Ok(false);
        }
        ops::snapshots::protect(&*self.store, id, true)?;
        Ok(true)
    }

    fn release(&self, id: &SnapshotId, protects: bool) {
        if protects {
            if let Err(e) = ops::snapshots::protect(&*self.store, id, false) {
                tracing::warn!(snapshot = %id, "cannot lift the protection a mount or live restore set: {e}");
            }
        }
    }

    /// An export of `image` filled from `snapshot` through the map at
    /// `map` (created, or resumed); `bitmap` is its change tracking.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lazy_export(
        &self,
        name: &DiskName,
        image: &Path,
        snapshot: &SnapshotId,
        read_only: bool,
        zeroed: bool,
        map: &Path,
        bitmap: &Path,
        allow: Vec<String>,
    ) -> Result<Arc<Export>, OpError> {
        let m = self.store.manifest(snapshot)?;
        let opts = ReaderOptions {
            cache_bytes: self.settings.snapshot_cache,
            readahead_chunks: 32,
        };
        let reader = SnapshotReader::new(self.store.clone(), m, opts)
            .map_err(|e| internal(&format!("cannot read snapshot {snapshot}"), e))?;
        let mut image =
            Image::open(image, false).map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
        if image.size < reader.size() {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{} holds {} bytes, less than the snapshot's {}",
                    image.path.display(),
                    image.size,
                    reader.size()
                ),
            ));
        }
        image.read_only = read_only;
        if let Some(dir) = map.parent() {
            fsutil::create_private_dir(dir)
                .map_err(|e| internal("cannot create the fill folder", e))?;
        }
        let file = image
            .file
            .try_clone()
            .map_err(|e| internal("cannot open the image twice", e))?;
        let filler = Filler::open(file, map, Arc::new(reader), zeroed)
            .map_err(|e| internal(&format!("cannot open the fill map {}", map.display()), e))?;
        let tracker = Tracker::open(bitmap, image.size, Granularity::DEFAULT, &self.boot_id)
            .map_err(|e| internal("cannot open change tracking", e))?;
        Ok(Arc::new(Export {
            name: name.to_string(),
            image,
            tracker: Arc::new(tracker),
            stats: Default::default(),
            allow,
            filler: Some(Arc::new(filler)),
        }))
    }

    fn open_mount(&self, r: &MountRecord) -> Result<Arc<Export>, OpError> {
        if r.complete {
            let mut image =
                Image::open(&r.image, false).map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
            image.read_only = !r.writable;
            let tracker = Tracker::open(
                &self.mount_bitmap(&r.name),
                image.size,
                Granularity::DEFAULT,
                &self.boot_id,
            )
            .map_err(|e| internal("cannot open change tracking", e))?;
            return Ok(Arc::new(Export {
                name: r.name.to_string(),
                image,
                tracker: Arc::new(tracker),
                stats: Default::default(),
                allow: r.allow.clone(),
                filler: None,
            }));
        }
        self.lazy_export(
            &r.name,
            &r.image,
            &r.snapshot,
            !r.writable,
            true,
            &self.mount_dir().join(format!("{}.fill", r.name)),
            &self.mount_bitmap(&r.name),
            r.allow.clone(),
        )
    }

    /// Serves the mounts of mounts.json again, and resumes promotions and
    /// live restores (called at start, after the disks are attached).
    pub(super) fn restore_mounts(&self) -> anyhow::Result<()> {
        let records: Vec<MountRecord> =
            super::state::load_records(&self.mounts_path(), "fix or remove it")?;
        for r in &records {
            match self.open_mount(r) {
                Ok(export) => {
                    self.server.add(export.clone())?;
                    tracing::info!(mount = %r.name, snapshot = %r.snapshot, "mount served");
                    if r.promoted && !r.complete {
                        self.start_fill(export, "promote", r.snapshot.clone());
                    }
                }
                Err(e) => {
                    tracing::error!(mount = %r.name, "cannot serve the mount at start-up: {e}")
                }
            }
        }
        *self.mount_records() = records;
        for e in self.server.all() {
            if let (Some(f), Some(live)) = (&e.filler, self.live_fill(&e.name)) {
                if !f.is_complete() || f.map_path().exists() {
                    self.start_fill(e.clone(), "live-restore", live.snapshot);
                }
            }
        }
        Ok(())
    }

    /// Starts again the background fill that job `id` (a cancelled or
    /// failed live restore or promotion) left unfinished.
    pub fn resume_job(&self, id: &str) -> Result<JobInfo, OpError> {
        let job = self.jobs.get(id).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no job {id:?}; `novabackup jobs` lists them"),
            )
        })?;
        if job.kind != "live-restore" && job.kind != "promote" {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "job {id} is a {}: only a live restore or a promotion can be resumed",
                    job.kind
                ),
            ));
        }
        let name = job.target.clone();
        // A fill job is named here while it runs (checked, since a job
        // that failed at once may end before it is named).
        let running = self
            .fill_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned()
            .filter(|j| {
                self.jobs
                    .get(j)
                    .is_some_and(|j| j.state == JobState::Running)
            });
        if let Some(j) = running {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} is being filled by job {j} already"),
            ));
        }
        let export = self.server.get(&name).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("{name} is no longer served: nothing to resume"),
            )
        })?;
        let unfinished = export
            .filler
            .as_ref()
            .is_some_and(|f| !f.is_complete() || f.map_path().exists());
        let snapshot = if job.kind == "promote" {
            self.mount_records()
                .iter()
                .find(|r| r.name.as_str() == name && r.promoted && !r.complete)
                .map(|r| r.snapshot.clone())
        } else {
            self.live_fill(&name).map(|l| l.snapshot)
        };
        match snapshot {
            Some(s) if unfinished => {
                tracing::info!(job = id, target = %name, "fill resumed");
                Ok(self.start_fill(export, &job.kind, s))
            }
            _ => Err(err(
                ErrorKind::Invalid,
                format!("{name} is complete: nothing left to fill"),
            )),
        }
    }

    /// Serves a snapshot as an NBD export.
    pub fn mount(&self, req: MountRequest) -> Result<MountInfo, OpError> {
        let snapshot: SnapshotId =
            req.snapshot
                .parse()
                .map_err(|e: novabackup_engine::ids::BadSnapshotId| {
                    err(ErrorKind::Invalid, e.to_string())
                })?;
        for a in &req.allow {
            nbd_proxy::access::check_entry(a)
                .map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
        }
        let m = self.store.manifest(&snapshot)?;
        let mut records = self.mount_records();
        let name: DiskName = match &req.name {
            Some(n) => n
                .parse()
                .map_err(|e: novabackup_engine::ids::BadDiskName| {
                    err(ErrorKind::Invalid, e.to_string())
                })?,
            None => (1..)
                .map(|i| format!("mount-{i}"))
                .find(|n| {
                    self.server.get(n).is_none() && !records.iter().any(|r| r.name.as_str() == n)
                })
                .expect("a free name")
                .parse()
                .expect("a valid name"),
        };
        if self.server.get(name.as_str()).is_some() || records.iter().any(|r| r.name == name) {
            return Err(err(
                ErrorKind::Conflict,
                format!("an export named {name} exists (a disk or a mount); pick another name"),
            ));
        }
        fsutil::create_private_dir(&self.mount_dir())
            .map_err(|e| internal("cannot create the mounts folder", e))?;
        let image = self.mount_dir().join(format!("{name}.img"));
        for p in [
            image.clone(),
            image.with_extension("fill"),
            self.mount_bitmap(&name),
        ] {
            let _ = fsutil::remove_durable(&p);
        }
        create_sparse(&image, m.image_size)?;
        let protects = self.hold(&snapshot)?;
        let record = MountRecord {
            name: name.clone(),
            snapshot: snapshot.clone(),
            writable: req.writable,
            image: image.clone(),
            promoted: false,
            complete: false,
            protects,
            allow: req.allow,
        };
        let opened = self.open_mount(&record).and_then(|export| {
            let mut next = records.clone();
            next.push(record.clone());
            self.save_mounts(&next)?;
            self.server
                .add(export.clone())
                .map_err(|e| err(ErrorKind::Conflict, e.to_string()))?;
            *records = next;
            Ok(export)
        });
        let export = match opened {
            Ok(e) => e,
            Err(e) => {
                self.release(&snapshot, protects);
                self.remove_mount_files(&record);
                return Err(e);
            }
        };
        drop(records);
        tracing::info!(mount = %name, snapshot = %snapshot, writable = req.writable, "snapshot mounted");
        Ok(self.mount_info(&record, &export))
    }

    fn remove_mount_files(&self, r: &MountRecord) {
        let mut files = vec![
            self.mount_dir().join(format!("{}.fill", r.name)),
            self.mount_bitmap(&r.name),
        ];
        if !r.promoted {
            files.push(r.image.clone());
        }
        for f in files {
            let _ = fsutil::remove_durable(&f);
        }
    }

    fn mount_info(&self, r: &MountRecord, e: &Export) -> MountInfo {
        let d = self.info(e);
        MountInfo {
            name: r.name.to_string(),
            snapshot: r.snapshot.to_string(),
            writable: r.writable,
            size: e.image.size,
            overlay: r.image.display().to_string(),
            promoted_to: r.promoted.then(|| r.image.display().to_string()),
            connections: d.connections,
            uris: d.uris,
            fill: self.fill_info(&r.snapshot, e),
        }
    }

    pub(super) fn fill_info(&self, snapshot: &SnapshotId, e: &Export) -> FillInfo {
        let p = e
            .filler
            .as_ref()
            .map(|f| f.progress())
            .unwrap_or(FillProgress {
                filled: 1,
                chunks: 1,
                chunk_size: 0,
            });
        FillInfo {
            snapshot: snapshot.to_string(),
            filled: p.filled,
            chunks: p.chunks,
            chunk_size: p.chunk_size,
            job: self
                .fill_jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&e.name)
                .cloned(),
        }
    }

    /// The mounts.
    pub fn mounts(&self) -> Vec<MountInfo> {
        self.mount_records()
            .iter()
            .filter_map(|r| {
                self.server
                    .get(r.name.as_str())
                    .map(|e| self.mount_info(r, &e))
            })
            .collect()
    }

    /// Ends a mount; refused while clients are connected unless `force`.
    pub fn unmount(&self, name: &str, force: bool) -> Result<(), OpError> {
        let mut records = self.mount_records();
        let Some(r) = records.iter().find(|r| r.name.as_str() == name).cloned() else {
            return Err(err(
                ErrorKind::NotFound,
                format!("no mount named {name:?}; `novabackup mounts` lists them"),
            ));
        };
        if force {
            self.server
                .disconnect(name, std::time::Duration::from_secs(10));
        }
        match self.server.remove(name) {
            Ok(e) => {
                if let Some(f) = &e.filler {
                    // A promotion in flight stops at its next step.
                    let _ = f.flush();
                }
                self.cancel_fill(name);
            }
            Err(nbd_proxy::server::ServerError::Busy { .. }) => {
                let n = self.server.connections(name);
                return Err(err(
                    ErrorKind::Conflict,
                    format!("mount {name} has {n} connected NBD client(s); disconnect them first, or unmount with --force"),
                ));
            }
            Err(_) => {}
        }
        let next: Vec<MountRecord> = records
            .iter()
            .filter(|x| x.name != r.name)
            .cloned()
            .collect();
        self.save_mounts(&next)?;
        *records = next;
        drop(records);
        self.remove_mount_files(&r);
        self.release(&r.snapshot, r.protects);
        tracing::info!(mount = name, kept = r.promoted, "unmounted");
        Ok(())
    }

    /// Moves a mount's image to `to` (same file system: a rename, so the
    /// export stays up on the same open file) and fills the rest of it in
    /// the background; the mount then serves a complete, real disk image.
    pub fn promote(&self, name: &str, req: PromoteRequest) -> Result<JobInfo, OpError> {
        let mut records = self.mount_records();
        let Some(i) = records.iter().position(|r| r.name.as_str() == name) else {
            return Err(err(
                ErrorKind::NotFound,
                format!("no mount named {name:?}; `novabackup mounts` lists them"),
            ));
        };
        if records[i].promoted {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "mount {name} is already promoted to {}",
                    records[i].image.display()
                ),
            ));
        }
        let mut opts = RestoreOptions {
            snapshot: records[i].snapshot.clone(),
            target: PathBuf::from(&req.to),
            force: false,
            workers: 1,
            in_use: self.images_in_use(),
            confine: Some(self.settings.confine.clone()),
        };
        ops::restore::check(&*self.store, &mut opts)?;
        let Some(export) = self.server.get(name) else {
            return Err(err(
                ErrorKind::NotFound,
                format!("mount {name} is not served (its overlay was missing at start-up)"),
            ));
        };
        std::fs::rename(&records[i].image, &opts.target).map_err(|e| match e.raw_os_error() {
            Some(libc::EXDEV) => err(
                ErrorKind::Invalid,
                format!(
                    "{} is on another file system than the mount's overlay ({}); promote to a path on that file system, then move the finished image",
                    opts.target.display(),
                    records[i].image.display()
                ),
            ),
            _ => internal(&format!("cannot move the overlay to {}", opts.target.display()), e),
        })?;
        let _ = fsutil::sync_dir(opts.target.parent().unwrap_or(Path::new("/")));
        let mut next = records.clone();
        next[i].image = opts.target.clone();
        next[i].promoted = true;
        self.save_mounts(&next)?;
        *records = next;
        let snapshot = records[i].snapshot.clone();
        drop(records);
        tracing::info!(mount = name, to = %opts.target.display(), "promoting the mount");
        Ok(self.start_fill(export, "promote", snapshot))
    }

    pub(super) fn images_in_use(&self) -> Vec<(String, PathBuf)> {
        self.server
            .all()
            .iter()
            .map(|e| (e.name.clone(), e.image.path.clone()))
            .collect()
    }

    /// A live restore: the target becomes attached disk `attach` at once
    /// and a job fills it from the snapshot.
    pub fn start_live_restore(
        &self,
        mut opts: RestoreOptions,
        attach: Option<String>,
    ) -> Result<JobInfo, OpError> {
        opts.in_use = self.images_in_use();
        let m = ops::restore::check(&*self.store, &mut opts)?;
        let name: DiskName = attach
            .unwrap_or_else(|| opts.snapshot.disk().to_string())
            .parse()
            .map_err(|e: novabackup_engine::ids::BadDiskName| {
                err(ErrorKind::Invalid, e.to_string())
            })?;
        if self.server.get(name.as_str()).is_some() {
            return Err(err(
                ErrorKind::Conflict,
                format!("a disk or mount named {name} is attached; detach it, or pick another name with --attach NAME"),
            ));
        }
        let zeroed = match std::fs::metadata(&opts.target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_sparse(&opts.target, m.image_size)?;
                true
            }
            Ok(md) if md.file_type().is_block_device() => false,
            Ok(md) if md.is_file() => {
                // --force over a file: start from an empty one, so that
                // zero chunks need no write.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&opts.target)
                    .map_err(|e| internal(&format!("cannot open {}", opts.target.display()), e))?;
                f.set_len(0)
                    .and_then(|()| f.set_len(m.image_size))
                    .map_err(|e| internal(&format!("cannot size {}", opts.target.display()), e))?;
                true
            }
            Ok(_) => {
                return Err(err(
                    ErrorKind::Invalid,
                    format!(
                        "{} is neither a file nor a block device",
                        opts.target.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(internal(
                    &format!("cannot inspect {}", opts.target.display()),
                    e,
                ))
            }
        };
        let _ = fsutil::remove_durable(&self.fill_map(&name));
        let protects = self.hold(&opts.snapshot)?;
        let live = LiveFill {
            snapshot: opts.snapshot.clone(),
            zeroed,
            protects,
        };
        let export = match self.attach_live(&name, &opts.target, live) {
            Ok(e) => e,
            Err(e) => {
                self.release(&opts.snapshot, protects);
                return Err(e);
            }
        };
        tracing::info!(disk = %name, snapshot = %opts.snapshot, target = %opts.target.display(), "live restore: disk attached, filling in the background");
        Ok(self.start_fill(export, "live-restore", opts.snapshot))
    }

    /// Runs the background fill of `export` as a job; at the end the fill
    /// map is removed and the record says the image is complete.
    fn start_fill(&self, export: Arc<Export>, kind: &str, snapshot: SnapshotId) -> JobInfo {
        let me = self.me.get().cloned();
        let name = export.name.clone();
        let kind_s = kind.to_string();
        let target = name.clone();
        let job = self
            .jobs
            .spawn(kind, &target, vec![target.clone()], move |p| {
                let filled = fill_all(&export, p, &kind_s, &snapshot);
                let agent = me.and_then(|w| w.upgrade());
                match (&filled, agent) {
                    (Ok(_), Some(agent)) => agent.fill_done(&name),
                    // A paused or failed fill is no longer the export's job.
                    (Err(_), Some(agent)) => {
                        agent
                            .fill_jobs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&name);
                    }
                    (_, None) => {}
                }
                filled
            });
        self.fill_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.target.clone(), job.id.clone());
        job
    }

    fn cancel_fill(&self, name: &str) {
        if let Some(id) = self
            .fill_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        {
            self.jobs.cancel(&id);
        }
    }

    /// Bookkeeping once a fill is complete: the record no longer names
    /// a fill, and the snapshot's protection is lifted.
    fn fill_done(&self, name: &str) {
        self.fill_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        {
            let mut records = self.mount_records();
            if let Some(i) = records.iter().position(|r| r.name.as_str() == name) {
                let mut next = records.clone();
                next[i].complete = true;
                if self.save_mounts(&next).is_ok() {
                    *records = next;
                }
                tracing::info!(mount = name, image = %records[i].image.display(), "promotion complete");
                return;
            }
        }
        if let Some(live) = self.finish_live(name) {
            self.release(&live.snapshot, live.protects);
            tracing::info!(disk = name, snapshot = %live.snapshot, "live restore complete");
        }
    }

    pub(super) fn is_mount(&self, name: &str) -> bool {
        self.mount_records().iter().any(|r| r.name.as_str() == name)
    }

    /// After a forced detach of a disk still being live-restored.
    pub(super) fn abandon_fill(&self, name: &DiskName, live: &LiveFill) {
        self.cancel_fill(name.as_str());
        let _ = fsutil::remove_durable(&self.fill_map(name));
        self.release(&live.snapshot, live.protects);
        tracing::warn!(disk = %name, snapshot = %live.snapshot, "live restore abandoned by a forced detach; the image is incomplete");
    }

    /// A disk's fill state for the API.
    pub(super) fn restoring(&self, e: &Export) -> Option<FillInfo> {
        let live = self.live_fill(&e.name)?;
        Some(self.fill_info(&live.snapshot, e))
    }
}

/// Fills the rest of `export` from `snapshot` (the body of a fill job).
fn fill_all(
    export: &Export,
    p: &Progress,
    kind: &str,
    snapshot: &SnapshotId,
) -> Result<Report, OpError> {
    let name = &export.name;
    let Some(filler) = export.filler.clone() else {
        return Err(OpError::internal("nothing to fill"));
    };
    let total = filler.progress();
    p.set_total(total.chunks * total.chunk_size);
    p.add(total.filled * total.chunk_size);
    let started = std::time::Instant::now();
    loop {
        if p.cancelled() {
            return Err(err(
                ErrorKind::Internal,
                format!("{kind} of {name} paused: the export stays up and fetches what it needs; `novabackup job resume ID` (or the next agent start) fills the rest"),
            ));
        }
        // Tests hold the fill still to act while nothing but the clients'
        // own requests moves it.
        if super::fault::armed("fill-pause") {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        let n = filler
            .fill_some(FILL_STEP)
            .map_err(|e| internal(&format!("filling {name} from {snapshot}"), e))?;
        p.add(n * total.chunk_size);
        if n == 0 {
            break;
        }
        // Tests slow the fill down to act in the middle of it.
        if super::fault::armed("fill-slow") {
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
    filler
        .finish()
        .map_err(|e| internal("finishing the fill", e))?;
    Ok(Report::Fill(super::jobs::FillReport {
        export: name.clone(),
        snapshot: snapshot.to_string(),
        bytes: total.chunks * total.chunk_size,
        seconds: started.elapsed().as_secs_f64(),
    }))
}
