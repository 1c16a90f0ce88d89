//! Backups, restores, verify, snapshots and jobs.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;

use super::{blocking, json_body, query_params, DiskService};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::types::{
    BackupRequest, FileEntry, FilesRequest, JobInfo, PartitionTable, RestoreRequest, SnapshotInfo,
    VerifyRequest,
};

type Svc = State<Arc<dyn DiskService>>;
type Started = Result<(StatusCode, Json<JobInfo>), ApiError>;

#[utoipa::path(post, path = "/api/v1/backups", tag = "backups", request_body = BackupRequest, responses((status = 202, description = "Backup job started", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn backup(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    body: Result<Json<BackupRequest>, JsonRejection>,
) -> Started {
    let req = json_body(body)?;
    caller.check_disk(&req.disk)?;
    let job = blocking(&svc, move |s| s.backup(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/api/v1/restores", tag = "backups", request_body = RestoreRequest, responses((status = 202, description = "Restore job started", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn restore(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Started {
    let req = json_body(body)?;
    caller.check_disk(snapshot_disk(&req.snapshot))?;
    if req.live && caller.role != crate::auth::Role::Admin {
        return Err(ApiError::new(
            crate::error::ErrorCode::Forbidden,
            format!(
                "token {:?} may not start a live restore: it attaches a disk, which needs an admin token",
                caller.name
            ),
        ));
    }
    if req.force && caller.role != crate::auth::Role::Admin {
        return Err(ApiError::new(
            crate::error::ErrorCode::Forbidden,
            format!(
                "token {:?} may not overwrite an existing target (\"force\"): that needs an admin token",
                caller.name
            ),
        ));
    }
    let job = blocking(&svc, move |s| s.restore(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/api/v1/verify", tag = "backups", request_body = VerifyRequest, responses((status = 202, description = "Verify job started", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn verify_many(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    body: Result<Json<VerifyRequest>, JsonRejection>,
) -> Started {
    let req = json_body(body)?;
    match &req.snapshots {
        Some(ids) if ids.is_empty() => {
            return Err(ApiError::new(
                crate::error::ErrorCode::BadRequest,
                "`snapshots` is empty: name at least one snapshot, or leave it out to verify every snapshot",
            ))
        }
        Some(ids) => {
            for id in ids {
                caller.check_disk(snapshot_disk(id))?;
            }
        }
        None => match &req.disk {
            Some(d) => caller.check_disk(d)?,
            None => caller.check_every_disk()?,
        },
    }
    let job = blocking(&svc, move |s| s.verify(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

use crate::auth::snapshot_disk;

/// Fails with 403 unless the caller may see `job` (a token limited to
/// disks sees only jobs on those disks, never host-wide ones).
pub(super) fn check_job(caller: &Caller, job: &JobInfo) -> Result<(), ApiError> {
    if caller.may_see_job(&job.disks) {
        Ok(())
    } else {
        Err(ApiError::new(
            crate::error::ErrorCode::Forbidden,
            format!(
                "token {:?} may not see job {}: it is limited to disks {:?}",
                caller.name, job.id, caller.disks
            ),
        ))
    }
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/verify", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id (DISK@YYYYMMDDTHHMMSSZ)")), responses((status = 202, description = "Verify job started", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn verify_one(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Started {
    caller.check_disk(snapshot_disk(&id))?;
    let req = VerifyRequest {
        snapshots: Some(vec![id]),
        ..VerifyRequest::default()
    };
    let job = blocking(&svc, move |s| s.verify(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SnapshotQuery {
    disk: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/snapshots", tag = "snapshots", params(("disk" = Option<String>, Query, description = "Only this disk's")), responses((status = 200, description = "Snapshots, oldest first", body = [SnapshotInfo]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn snapshots(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    q: Result<Query<SnapshotQuery>, QueryRejection>,
) -> Result<Json<Vec<SnapshotInfo>>, ApiError> {
    let q = query_params(q)?;
    if let Some(d) = &q.disk {
        caller.check_disk(d)?;
    }
    let mut list = blocking(&svc, move |s| s.snapshots(q.disk.as_deref())).await?;
    list.retain(|s| caller.may_use(&s.disk));
    Ok(Json(list))
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id (DISK@YYYYMMDDTHHMMSSZ)")), responses((status = 200, description = "The snapshot", body = SnapshotInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn snapshot(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    blocking(&svc, move |s| s.snapshot(&id)).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}/partitions", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id (DISK@YYYYMMDDTHHMMSSZ)")), responses((status = 200, description = "The partition table of the snapshot's disk and the file system of each partition", body = PartitionTable), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn partitions(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Json<PartitionTable>, ApiError> {
    blocking(&svc, move |s| s.partitions(&id)).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilesQuery {
    path: Option<String>,
    partition: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/snapshots/{id}/files", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id (DISK@YYYYMMDDTHHMMSSZ)"), ("path" = Option<String>, Query, description = "The folder (default /)"), ("partition" = Option<u32>, Query, description = "The partition's number (default: the only file system)")), responses((status = 200, description = "The folder's entries, by name", body = [FileEntry]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn files(
    State(svc): Svc,
    Path(id): Path<String>,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Json<Vec<FileEntry>>, ApiError> {
    let q = query_params(q)?;
    let path = q.path.unwrap_or_else(|| "/".into());
    blocking(&svc, move |s| s.files(&id, q.partition, &path))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/files/tar", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id (DISK@YYYYMMDDTHHMMSSZ)")), request_body = FilesRequest, responses((status = 200, description = "The files and folder trees as a tar stream (modes, owners, times, symlinks)", content_type = "application/x-tar", body = Vec<u8>), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn files_tar(
    State(svc): Svc,
    Path(id): Path<String>,
    body: Result<Json<FilesRequest>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let req = json_body(body)?;
    if req.paths.is_empty() {
        return Err(ApiError::new(
            crate::error::ErrorCode::BadRequest,
            "name at least one file or folder in paths",
        ));
    }
    let job = blocking(&svc, move |s| s.files_tar(&id, req)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHANNEL_CHUNK),
        };
        let result =
            job(&mut w).and_then(|()| std::io::Write::flush(&mut w).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::warn!("file download ended early: {e}");
            // The client sees the stream break, not a short archive that
            // looks complete.
            let _ = w.tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-tar")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Bytes per message from the tar writer to the response.
const CHANNEL_CHUNK: usize = 256 << 10;

/// A `Write` into the response's channel, in [`CHANNEL_CHUNK`] pieces; a
/// client that went away stops the writer with `BrokenPipe`.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHANNEL_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHANNEL_CHUNK));
        self.tx
            .blocking_send(Ok(bytes::Bytes::from(chunk)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

#[utoipa::path(delete, path = "/api/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id (DISK@YYYYMMDDTHHMMSSZ)")), responses((status = 204, description = "Deleted (its chunks stay until garbage collection)"), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn delete_snapshot(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&svc, move |s| s.delete_snapshot(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/jobs/{id}/events`: server-sent events, one `progress`
/// event with the job (as `GET /api/v1/jobs/{id}` returns it) every half
/// second while it runs and whenever it changes, then one `end` event with
/// its final state, and the stream closes.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path, description = "Job id")), responses((status = 200, description = "Server-sent events: `progress` (the job) every half second, then `end`", content_type = "text/event-stream", body = crate::types::JobEvent), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn events(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<
    axum::response::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    // An unknown job is a 404 before the stream starts.
    let first = svc.job(&id)?;
    check_job(&caller, &first)?;
    let stream = futures_util::stream::unfold(
        (svc, id, Some(first), false),
        |(svc, id, pending, ended)| async move {
            if ended {
                return None;
            }
            let job = match pending {
                Some(j) => j,
                None => {
                    // Half a second between progress events, but the end
                    // is sent as soon as it happens.
                    let wait = std::time::Duration::from_millis(500);
                    let idc = id.clone();
                    blocking(&svc, move |s| s.wait_job(&idc, wait)).await.ok()?
                }
            };
            let done = job.state != crate::types::JobState::Running;
            let ev = Event::default()
                .event(if done { "end" } else { "progress" })
                .json_data(&job)
                .unwrap_or_else(|_| Event::default().event("error"));
            Some((Ok(ev), (svc, id, None, done)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[utoipa::path(get, path = "/metrics", tag = "agent", responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn metrics(State(svc): Svc) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let text = blocking(&svc, |s| s.metrics()).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/v1/store", tag = "agent", responses((status = 200, description = "The store", body = crate::types::StoreInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn store_info(State(svc): Svc) -> Result<Json<crate::types::StoreInfo>, ApiError> {
    blocking(&svc, |s| s.store_info()).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", responses((status = 200, description = "Jobs, oldest first", body = [JobInfo]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn jobs(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<JobInfo>>, ApiError> {
    let mut list = blocking(&svc, |s| Ok(s.jobs())).await?;
    list.retain(|j| caller.may_see_job(&j.disks));
    Ok(Json(list))
}

/// The longest `wait_ms` a client may ask for; a longer one is cut to it
/// (proxies and clients time out idle requests after some tens of seconds).
pub const MAX_JOB_WAIT_MS: u64 = 30_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobQuery {
    wait_ms: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "Job id"), ("wait_ms" = Option<u64>, Query, description = "Long poll: answer when the job ends or after this many milliseconds (at most 30000), whichever comes first")), responses((status = 200, description = "The job", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn job(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<JobQuery>, QueryRejection>,
) -> Result<Json<JobInfo>, ApiError> {
    let q = query_params(q)?;
    let wait = std::time::Duration::from_millis(q.wait_ms.unwrap_or(0).min(MAX_JOB_WAIT_MS));
    let c = caller.clone();
    blocking(&svc, move |s| {
        // Checked before waiting, so a long poll reveals nothing either.
        check_job(&c, &s.job(&id)?)?;
        s.wait_job(&id, wait)
    })
    .await
    .map(Json)
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path, description = "Job id")), responses((status = 200, description = "Cancel asked for", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn cancel(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobInfo>, ApiError> {
    blocking(&svc, move |s| {
        check_job(&caller, &s.job(&id)?)?;
        s.cancel(&id)
    })
    .await
    .map(Json)
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/resume", tag = "jobs", params(("id" = String, Path, description = "Id of a cancelled or failed live restore or promotion")), responses((status = 202, description = "A new job filling the rest", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn resume(State(svc): Svc, Path(id): Path<String>) -> Started {
    let job = blocking(&svc, move |s| s.resume_job(&id)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}
