//! The `/api/v1` router. Handlers parse and validate the request, call the
//! [`DiskService`] on a blocking thread (its calls touch files), and turn
//! the result into JSON.

pub(crate) mod disks;
pub(crate) mod jobs;
pub(crate) mod mounts;
pub(crate) mod policy;
pub(crate) mod tokens;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::Query;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};

use crate::error::{ApiError, ErrorCode};
use crate::types::{
    AttachRequest, BackupRequest, CbtInfo, DiskInfo, Health, JobInfo, PruneRequest, Quotas,
    RestoreRequest, RetentionPolicy, ScheduleInfo, ScheduleRequest, SnapshotInfo, VerifyRequest,
};

/// What the agent must provide to the API.
pub trait DiskService: Send + Sync + 'static {
    /// Agent health.
    fn health(&self) -> Health;
    /// Attached disks.
    fn list(&self) -> Vec<DiskInfo>;
    /// One disk.
    fn get(&self, name: &str) -> Result<DiskInfo, ApiError>;
    /// Attaches a disk.
    fn attach(&self, req: AttachRequest) -> Result<DiskInfo, ApiError>;
    /// Detaches a disk; with `force`, its NBD clients are disconnected.
    fn detach(&self, name: &str, force: bool) -> Result<(), ApiError>;
    /// CBT state of a disk.
    fn cbt(&self, name: &str) -> Result<CbtInfo, ApiError>;
    /// Clears a disk's bitmap.
    fn cbt_reset(&self, name: &str) -> Result<CbtInfo, ApiError>;
    /// Starts a backup job.
    fn backup(&self, req: BackupRequest) -> Result<JobInfo, ApiError>;
    /// Snapshots, oldest first, optionally of one disk.
    fn snapshots(&self, disk: Option<&str>) -> Result<Vec<SnapshotInfo>, ApiError>;
    /// One snapshot.
    fn snapshot(&self, id: &str) -> Result<SnapshotInfo, ApiError>;
    /// The partition table of a snapshot's disk, read from the store.
    fn partitions(&self, id: &str) -> Result<crate::types::PartitionTable, ApiError> {
        Err(ApiError::new(
            crate::error::ErrorCode::NotFound,
            format!("no partition table for {id}: this service does not read snapshots"),
        ))
    }
    /// The entries of folder `path` of the file system on `partition` of a
    /// snapshot's disk, read from the store.
    fn files(
        &self,
        id: &str,
        _partition: Option<u32>,
        _path: &str,
    ) -> Result<Vec<crate::types::FileEntry>, ApiError> {
        Err(ApiError::new(
            crate::error::ErrorCode::NotFound,
            format!("no files for {id}: this service does not read snapshots"),
        ))
    }
    /// Checks a download of files from a snapshot (every path exists) and
    /// returns the job that writes it as tar, so that a bad request fails
    /// before the stream starts.
    fn files_tar(&self, id: &str, _req: crate::types::FilesRequest) -> Result<TarJob, ApiError> {
        Err(ApiError::new(
            crate::error::ErrorCode::NotFound,
            format!("no files for {id}: this service does not read snapshots"),
        ))
    }
    /// Serves a snapshot as an NBD export.
    fn mount(&self, _req: crate::types::MountRequest) -> Result<crate::types::MountInfo, ApiError> {
        Err(no_mounts())
    }
    /// The mounts.
    fn mounts(&self) -> Result<Vec<crate::types::MountInfo>, ApiError> {
        Err(no_mounts())
    }
    /// Ends a mount (its overlay is deleted unless it was promoted).
    fn unmount(&self, _name: &str, _force: bool) -> Result<(), ApiError> {
        Err(no_mounts())
    }
    /// Turns a mount into a real disk image at `to`, filled in the
    /// background while the export stays up.
    fn promote(
        &self,
        _name: &str,
        _req: crate::types::PromoteRequest,
    ) -> Result<JobInfo, ApiError> {
        Err(no_mounts())
    }
    /// Deletes a snapshot.
    fn delete_snapshot(&self, id: &str) -> Result<(), ApiError>;
    /// Starts a verify job.
    fn verify(&self, req: VerifyRequest) -> Result<JobInfo, ApiError>;
    /// Starts a restore job.
    fn restore(&self, req: RestoreRequest) -> Result<JobInfo, ApiError>;
    /// All jobs, newest last.
    fn jobs(&self) -> Vec<JobInfo>;
    /// One job.
    fn job(&self, id: &str) -> Result<JobInfo, ApiError>;
    /// One job, once it has ended or `timeout` has passed, whichever comes
    /// first (a long poll: a client learns of the end at once instead of
    /// at its next poll).
    fn wait_job(&self, id: &str, _timeout: std::time::Duration) -> Result<JobInfo, ApiError> {
        self.job(id)
    }
    /// Asks a job to stop.
    fn cancel(&self, id: &str) -> Result<JobInfo, ApiError>;
    /// Starts again the fill a paused live restore or promotion left.
    fn resume_job(&self, _id: &str) -> Result<JobInfo, ApiError> {
        Err(no_mounts())
    }
    /// The Prometheus text exposition of `/metrics`.
    fn metrics(&self) -> Result<String, ApiError>;
    /// The store: where, how big, how many snapshots.
    fn store_info(&self) -> Result<crate::types::StoreInfo, ApiError>;
    /// Protects a snapshot from pruning and deletion, or lifts that.
    fn protect(&self, id: &str, protected: bool) -> Result<SnapshotInfo, ApiError>;
    /// Retention policies as configured (the built-in default applies to
    /// every disk none of them covers).
    fn policies(&self) -> Result<Vec<RetentionPolicy>, ApiError>;
    /// Creates (`create`) or replaces a policy.
    fn put_policy(&self, p: RetentionPolicy, create: bool) -> Result<RetentionPolicy, ApiError>;
    /// Deletes a policy.
    fn delete_policy(&self, name: &str) -> Result<(), ApiError>;
    /// Starts a prune job.
    fn prune(&self, req: PruneRequest) -> Result<JobInfo, ApiError>;
    /// Starts a garbage-collection job.
    fn gc(&self, req: crate::types::GcRequest) -> Result<JobInfo, ApiError>;
    /// Starts a replication job to another site's store.
    fn sync(&self, req: crate::types::SyncRequest) -> Result<JobInfo, ApiError>;
    /// Schedules with their next run.
    fn schedules(&self) -> Result<Vec<ScheduleInfo>, ApiError>;
    /// Creates (`id` None) or replaces a schedule.
    fn put_schedule(
        &self,
        req: ScheduleRequest,
        id: Option<String>,
    ) -> Result<ScheduleInfo, ApiError>;
    /// Deletes a schedule.
    fn delete_schedule(&self, id: &str) -> Result<(), ApiError>;
    /// Size limits.
    fn quotas(&self) -> Result<Quotas, ApiError>;
    /// Replaces the size limits.
    fn set_quotas(&self, q: Quotas) -> Result<Quotas, ApiError>;
}

fn no_mounts() -> ApiError {
    ApiError::new(
        crate::error::ErrorCode::NotFound,
        "this service does not serve snapshots",
    )
}

/// The control API. Everything but health needs a token from `tokens`,
/// whose role allows the call (see [`crate::auth`]).
pub fn router(svc: Arc<dyn DiskService>, tokens: Arc<crate::auth::Tokens>) -> Router {
    let token_routes = Router::new()
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .with_state(tokens.clone());
    let protected = Router::new()
        .route("/api/v1/disks", get(disks::list).post(disks::attach))
        .route(
            "/api/v1/disks/{name}",
            get(disks::get).delete(disks::detach),
        )
        .route("/api/v1/disks/{name}/cbt", get(disks::cbt))
        .route("/api/v1/disks/{name}/cbt/reset", post(disks::cbt_reset))
        .route("/api/v1/backups", post(jobs::backup))
        .route("/api/v1/restores", post(jobs::restore))
        .route("/api/v1/verify", post(jobs::verify_many))
        .route("/api/v1/snapshots", get(jobs::snapshots))
        .route(
            "/api/v1/snapshots/{id}",
            get(jobs::snapshot).delete(jobs::delete_snapshot),
        )
        .route("/api/v1/snapshots/{id}/verify", post(jobs::verify_one))
        .route("/api/v1/snapshots/{id}/partitions", get(jobs::partitions))
        .route("/api/v1/snapshots/{id}/files", get(jobs::files))
        .route("/api/v1/snapshots/{id}/files/tar", post(jobs::files_tar))
        .route("/api/v1/mounts", get(mounts::list).post(mounts::mount))
        .route(
            "/api/v1/mounts/{name}",
            axum::routing::delete(mounts::unmount),
        )
        .route("/api/v1/mounts/{name}/promote", post(mounts::promote))
        .route("/api/v1/jobs", get(jobs::jobs))
        .route("/api/v1/jobs/{id}", get(jobs::job))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/api/v1/jobs/{id}/events", get(jobs::events))
        .route("/api/v1/store", get(jobs::store_info))
        .route("/api/v1/snapshots/{id}/protect", post(policy::protect))
        .route("/api/v1/snapshots/{id}/unprotect", post(policy::unprotect))
        .route(
            "/api/v1/retention/policies",
            get(policy::policies).post(policy::create_policy),
        )
        .route(
            "/api/v1/retention/policies/{name}",
            get(policy::policy)
                .put(policy::update_policy)
                .delete(policy::delete_policy),
        )
        .route("/api/v1/prune", post(policy::prune))
        .route("/api/v1/gc", post(policy::gc))
        .route("/api/v1/sync", post(policy::sync))
        .route(
            "/api/v1/schedules",
            get(policy::schedules).post(policy::create_schedule),
        )
        .route(
            "/api/v1/schedules/{id}",
            get(policy::schedule)
                .put(policy::update_schedule)
                .delete(policy::delete_schedule),
        )
        .route(
            "/api/v1/quotas",
            get(policy::quotas).put(policy::set_quotas),
        )
        .route("/metrics", get(jobs::metrics))
        .with_state(svc.clone())
        .merge(token_routes)
        .route_layer(middleware::from_fn_with_state(
            tokens,
            crate::auth::require_role,
        ));
    Router::new()
        .route("/api/v1/health", get(health))
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(<crate::openapi::ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .with_state(svc)
        .merge(protected)
        .fallback(|| async {
            ApiError::new(ErrorCode::NotFound, "no such endpoint; see /api/v1/health")
        })
        .layer(middleware::from_fn(crate::error::json_errors))
}

#[utoipa::path(get, path = "/api/v1/health", tag = "agent", responses((status = 200, description = "The agent answers", body = Health)))]
async fn health(
    axum::extract::State(svc): axum::extract::State<Arc<dyn DiskService>>,
) -> Json<Health> {
    Json(svc.health())
}

/// Runs a service call off the async workers.
async fn blocking<T: Send + 'static>(
    svc: &Arc<dyn DiskService>,
    f: impl FnOnce(&dyn DiskService) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let svc = svc.clone();
    tokio::task::spawn_blocking(move || f(&*svc))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("request handler failed: {e}")))?
}

/// Writes a prepared download as tar; its error ends the stream.
pub type TarJob = Box<dyn FnOnce(&mut dyn std::io::Write) -> Result<(), String> + Send>;

/// A JSON body whose rejection is our JSON error, not axum's plain text.
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("bad request body: {}", e.body_text()),
        )
    })
}

/// A query string whose rejection is our JSON error, not axum's plain text.
fn query_params<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("bad query: {}", e.body_text()),
        )
    })
}

#[cfg(test)]
mod tests;
