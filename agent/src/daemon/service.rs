//! The API's [`DiskService`] and the scheduler's [`Runner`] over the
//! agent: each call parses its request into the engine's typed options,
//! calls the registry or an operation, and turns the report into the API's
//! type. Errors are the engine's [`OpError`], mapped to HTTP once
//! (`ApiError::from`); the scheduler branches on their kind.

use std::path::PathBuf;

use novabackup_api::types::{
    AttachRequest, BackupRequest, CbtInfo, DiskInfo, GcRequest, Health, JobInfo, PruneRequest,
    Quotas, RestoreRequest, RetentionPolicy, ScheduleAction, ScheduleInfo, ScheduleRequest,
    SnapshotInfo, StoreInfo, VerifyRequest,
};
use novabackup_api::{ApiError, DiskService, ErrorCode};
use novabackup_engine::format::manifest::Manifest;
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::ops::prune::PruneOptions;
use novabackup_engine::ops::restore::RestoreOptions;
use novabackup_engine::ops::verify::VerifyScope;
use novabackup_engine::ops::{self, quota, ErrorKind, OpError};
use novabackup_engine::plan::Mode;
use novabackup_engine::retention::parse_duration;
use novabackup_engine::store::GcOptions;

use super::schedule::{Run, Runner, Start};
use super::state::{cbt_info, Agent};

fn snapshot_id(id: &str) -> Result<SnapshotId, OpError> {
    id.parse()
        .map_err(|e: novabackup_engine::ids::BadSnapshotId| OpError::invalid(e.to_string()))
}

fn parse_disk(d: &str) -> Result<DiskName, OpError> {
    d.parse::<DiskName>()
        .map_err(|e| OpError::invalid(e.to_string()))
}

fn parse_within(w: Option<&str>) -> Result<Option<u64>, OpError> {
    w.map(parse_duration)
        .transpose()
        .map_err(|e| OpError::invalid(e.to_string()))
}

fn mode(full: bool, audit: bool) -> Result<Mode, OpError> {
    match (full, audit) {
        (true, true) => Err(OpError::invalid(
            "choose full or audit, not both (an audit reads everything too)",
        )),
        (true, false) => Ok(Mode::Full),
        (false, true) => Ok(Mode::Audit),
        (false, false) => Ok(Mode::Auto),
    }
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

fn no_job(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no job {id:?}; `GET /api/v1/jobs` lists them"),
    )
}

impl Agent {
    fn usage(&self) -> Result<(usize, Vec<quota::DiskUsage>), OpError> {
        let (list, _) = self.store.list(None)?;
        Ok((
            list.len(),
            quota::usage_report(&list, &self.policy.limits()),
        ))
    }
}

/// A file-reading error as the API answers it.
fn files_error(e: novabackup_engine::files::FilesError) -> ApiError {
    use novabackup_engine::files::FilesError as E;
    let code = match &e {
        E::NotFound(_) | E::NoPartition(_) => ErrorCode::NotFound,
        E::ChoosePartition(_) | E::NotADirectory(_) => ErrorCode::BadRequest,
        E::Unsupported(_) => ErrorCode::Unprocessable,
        E::Table(_) | E::Read(_) => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}

impl Agent {
    /// A reader of snapshot `id` straight from the store.
    fn reader(
        &self,
        id: &str,
        cache_bytes: usize,
        readahead_chunks: usize,
    ) -> Result<novabackup_engine::snapshot_reader::SnapshotReader, ApiError> {
        use novabackup_engine::snapshot_reader::{ReaderOptions, SnapshotReader};
        let m = self.store.manifest(&snapshot_id(id)?)?;
        let opts = ReaderOptions {
            cache_bytes,
            readahead_chunks,
        };
        SnapshotReader::new(self.store.clone(), m, opts)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
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
        self.disks().iter().map(|e| self.info(e)).collect()
    }

    fn get(&self, name: &str) -> Result<DiskInfo, ApiError> {
        Ok(self.info(&*self.export(name)?))
    }

    fn attach(&self, req: AttachRequest) -> Result<DiskInfo, ApiError> {
        Ok(Agent::attach(self, req)?)
    }

    fn detach(&self, name: &str, force: bool) -> Result<(), ApiError> {
        Ok(Agent::detach(self, name, force)?)
    }

    fn cbt(&self, name: &str) -> Result<CbtInfo, ApiError> {
        Ok(cbt_info(&self.export(name)?.tracker))
    }

    fn cbt_reset(&self, name: &str) -> Result<CbtInfo, ApiError> {
        Ok(Agent::cbt_reset(self, name)?)
    }

    fn backup(&self, req: BackupRequest) -> Result<JobInfo, ApiError> {
        let mode = mode(req.full, req.audit)?;
        Ok(self.start_backup(&req.disk, mode)?)
    }

    fn snapshots(&self, disk: Option<&str>) -> Result<Vec<SnapshotInfo>, ApiError> {
        let disk = disk.map(parse_disk).transpose()?;
        let list = ops::snapshots::list(&*self.store, disk.as_ref())?;
        Ok(list.into_iter().map(snapshot_info).collect())
    }

    fn snapshot(&self, id: &str) -> Result<SnapshotInfo, ApiError> {
        Ok(snapshot_info(self.store.manifest(&snapshot_id(id)?)?))
    }

    fn partitions(&self, id: &str) -> Result<novabackup_api::types::PartitionTable, ApiError> {
        // A table and a few superblocks: a small cache and no read-ahead.
        let reader = self.reader(id, 4 << 20, 0)?;
        novabackup_engine::partitions::read(&mut reader.cursor(), reader.size()).map_err(
            |e| match e {
                novabackup_engine::partitions::PartitionError::Damaged { .. } => {
                    ApiError::new(ErrorCode::Unprocessable, e.to_string())
                }
                other => ApiError::new(ErrorCode::Internal, other.to_string()),
            },
        )
    }

    fn files(
        &self,
        id: &str,
        partition: Option<u32>,
        path: &str,
    ) -> Result<Vec<novabackup_api::types::FileEntry>, ApiError> {
        let reader = self.reader(id, self.settings.snapshot_cache, 8)?;
        novabackup_engine::files::list(&reader, partition, path).map_err(files_error)
    }

    fn files_tar(
        &self,
        id: &str,
        req: novabackup_api::types::FilesRequest,
    ) -> Result<novabackup_api::TarJob, ApiError> {
        use novabackup_engine::files;
        let reader = self.reader(id, self.settings.snapshot_cache, 32)?;
        files::check_paths(&reader, req.partition, &req.paths).map_err(files_error)?;
        Ok(Box::new(move |w| {
            files::write_tar(&reader, req.partition, &req.paths, w)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }))
    }

    fn mount(
        &self,
        req: novabackup_api::types::MountRequest,
    ) -> Result<novabackup_api::types::MountInfo, ApiError> {
        Ok(Agent::mount(self, req)?)
    }

    fn mounts(&self) -> Result<Vec<novabackup_api::types::MountInfo>, ApiError> {
        Ok(Agent::mounts(self))
    }

    fn unmount(&self, name: &str, force: bool) -> Result<(), ApiError> {
        Ok(Agent::unmount(self, name, force)?)
    }

    fn promote(
        &self,
        name: &str,
        req: novabackup_api::types::PromoteRequest,
    ) -> Result<JobInfo, ApiError> {
        Ok(Agent::promote(self, name, req)?)
    }

    fn delete_snapshot(&self, id: &str) -> Result<(), ApiError> {
        Ok(ops::snapshots::delete(&*self.store, &snapshot_id(id)?)?)
    }

    fn verify(&self, req: VerifyRequest) -> Result<JobInfo, ApiError> {
        let ids = match req.snapshots {
            Some(v) if !v.is_empty() => Some(
                v.iter()
                    .map(|i| snapshot_id(i))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        let scope = VerifyScope {
            ids,
            disk: req.disk.as_deref().map(parse_disk).transpose()?,
            skip_within: parse_within(req.skip_verified_within.as_deref())?,
        };
        Ok(self.start_verify(scope)?)
    }

    fn restore(&self, req: RestoreRequest) -> Result<JobInfo, ApiError> {
        if !req.live && req.attach.is_some() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "`attach` names the disk of a live restore; add `live`",
            ));
        }
        let opts = RestoreOptions {
            snapshot: snapshot_id(&req.snapshot)?,
            target: PathBuf::from(&req.target),
            force: req.force,
            workers: self.settings.workers,
            in_use: Vec::new(),
            confine: Some(self.settings.confine.clone()),
        };
        if req.live {
            return Ok(self.start_live_restore(opts, req.attach)?);
        }
        Ok(self.start_restore(opts)?)
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

    fn resume_job(&self, id: &str) -> Result<JobInfo, ApiError> {
        Ok(Agent::resume_job(self, id)?)
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
        let (snapshots, usage) = self.usage()?;
        let store = StoreSample {
            bytes: self.store.usage()?,
            snapshots,
            chunks: self.store.chunk_count(),
            limit: self.policy.quotas().store,
            disks: usage
                .into_iter()
                .map(|u| (u.disk, u.bytes, u.limit))
                .collect(),
        };
        Ok(render(&self.jobs.totals(), &disks, &store))
    }

    fn store_info(&self) -> Result<StoreInfo, ApiError> {
        let (snapshots, usage) = self.usage()?;
        Ok(StoreInfo {
            location: self.store.describe(),
            bytes_used: self.store.usage()?,
            snapshots,
            limit: self.policy.quotas().store,
            disks: usage.into_iter().map(Into::into).collect(),
            schedules: self.schedules.list(),
        })
    }

    fn protect(&self, id: &str, protected: bool) -> Result<SnapshotInfo, ApiError> {
        let m = ops::snapshots::protect(&*self.store, &snapshot_id(id)?, protected)?;
        Ok(snapshot_info(m))
    }

    fn policies(&self) -> Result<Vec<RetentionPolicy>, ApiError> {
        Ok(self.policy.policies())
    }

    fn put_policy(&self, p: RetentionPolicy, create: bool) -> Result<RetentionPolicy, ApiError> {
        Ok(self.policy.put_policy(p, create)?)
    }

    fn delete_policy(&self, name: &str) -> Result<(), ApiError> {
        Ok(self.policy.delete_policy(name)?)
    }

    fn prune(&self, req: PruneRequest) -> Result<JobInfo, ApiError> {
        Ok(self.start_prune(PruneOptions {
            disk: req.disk.as_deref().map(parse_disk).transpose()?,
            dry_run: req.dry_run,
        }))
    }

    fn gc(&self, req: GcRequest) -> Result<JobInfo, ApiError> {
        Ok(self.start_gc(GcOptions {
            min_garbage_percent: req.min_garbage_percent,
        })?)
    }

    fn sync(&self, req: novabackup_api::types::SyncRequest) -> Result<JobInfo, ApiError> {
        Ok(self.start_sync(req)?)
    }

    fn schedules(&self) -> Result<Vec<ScheduleInfo>, ApiError> {
        Ok(self.schedules.list())
    }

    fn put_schedule(
        &self,
        req: ScheduleRequest,
        id: Option<String>,
    ) -> Result<ScheduleInfo, ApiError> {
        Ok(self
            .schedules
            .put(req, id, novabackup_engine::time::now_unix())?)
    }

    fn delete_schedule(&self, id: &str) -> Result<(), ApiError> {
        Ok(self.schedules.delete(id)?)
    }

    fn quotas(&self) -> Result<Quotas, ApiError> {
        Ok(self.policy.quotas())
    }

    fn set_quotas(&self, q: Quotas) -> Result<Quotas, ApiError> {
        Ok(self.policy.set_quotas(q)?)
    }
}

impl Runner for Agent {
    fn disks_for(&self, action: ScheduleAction) -> Vec<String> {
        match action {
            ScheduleAction::Backup => self.disks().iter().map(|e| e.name.clone()).collect(),
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
        if disk.as_deref().is_some_and(|d| self.is_busy(d)) {
            return Start::Busy;
        }
        let disk = match disk.as_deref().map(parse_disk).transpose() {
            Ok(d) => d,
            Err(e) => return Start::Failed(e.to_string()),
        };
        let r = match (run.spec.action, disk) {
            (ScheduleAction::Backup, Some(d)) => {
                let mode = match (run.spec.full, run.spec.audit) {
                    (true, _) => Mode::Full,
                    (_, true) => Mode::Audit,
                    _ => Mode::Auto,
                };
                self.start_backup(d.as_str(), mode)
            }
            (ScheduleAction::Backup, None) => Err(OpError::invalid("no disk")),
            (ScheduleAction::Prune, disk) => Ok(self.start_prune(PruneOptions {
                disk,
                dry_run: false,
            })),
            (ScheduleAction::Verify, disk) => {
                // Checked when the schedule was saved.
                let skip_within = run
                    .spec
                    .skip_verified_within
                    .as_deref()
                    .and_then(|w| parse_duration(w).ok());
                self.start_verify(VerifyScope {
                    ids: None,
                    disk,
                    skip_within,
                })
            }
            (ScheduleAction::Gc, _) => self.start_gc(GcOptions {
                min_garbage_percent: run.spec.min_garbage_percent.unwrap_or(0),
            }),
            (ScheduleAction::Sync, disk) => self.start_sync(novabackup_api::types::SyncRequest {
                site: run.spec.site.clone().unwrap_or_default(),
                disks: disk.iter().map(|d| d.to_string()).collect(),
                newest: None,
                bandwidth: None,
            }),
        };
        match r {
            Ok(j) => {
                tracing::info!(schedule = %run.schedule, job = %j.id, kind = %j.kind, target = %j.target, "scheduled job started");
                Start::Started
            }
            Err(e) if e.kind() == ErrorKind::Busy => Start::Busy,
            Err(e) => Start::Failed(e.to_string()),
        }
    }
}
