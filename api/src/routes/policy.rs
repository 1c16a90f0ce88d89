//! The store looking after itself: snapshot protection, retention
//! policies and prune, garbage collection, schedules and quotas.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{blocking, json_body, DiskService};
use crate::error::{ApiError, ErrorCode};
use crate::types::{
    GcRequest, JobInfo, PruneRequest, Quotas, RetentionPolicy, ScheduleInfo, ScheduleRequest,
    SnapshotInfo, SyncRequest,
};

type Svc = State<Arc<dyn DiskService>>;
type Started = Result<(StatusCode, Json<JobInfo>), ApiError>;

fn not_found(what: &str, name: &str, list: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no {what} {name:?}; `GET {list}` lists them"),
    )
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/protect", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")), responses((status = 200, description = "Protected: never pruned, not deletable until unprotected", body = SnapshotInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn protect(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    blocking(&svc, move |s| s.protect(&id, true))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/api/v1/snapshots/{id}/unprotect", tag = "snapshots", params(("id" = String, Path, description = "Snapshot id")), responses((status = 200, description = "No longer protected", body = SnapshotInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn unprotect(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    blocking(&svc, move |s| s.protect(&id, false))
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/api/v1/retention/policies", tag = "retention", responses((status = 200, description = "Configured policies; the built-in default (daily 7, weekly 4, monthly 12, yearly 7, within 30d) covers disks none of them names", body = [RetentionPolicy]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn policies(State(svc): Svc) -> Result<Json<Vec<RetentionPolicy>>, ApiError> {
    blocking(&svc, |s| s.policies()).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/retention/policies/{name}", tag = "retention", params(("name" = String, Path, description = "Policy name")), responses((status = 200, description = "The policy", body = RetentionPolicy), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn policy(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<RetentionPolicy>, ApiError> {
    let all = blocking(&svc, |s| s.policies()).await?;
    all.into_iter()
        .find(|p| p.name == name)
        .map(Json)
        .ok_or_else(|| not_found("retention policy", &name, "/api/v1/retention/policies"))
}

#[utoipa::path(post, path = "/api/v1/retention/policies", tag = "retention", request_body = RetentionPolicy, responses((status = 201, description = "Created", body = RetentionPolicy), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn create_policy(
    State(svc): Svc,
    body: Result<Json<RetentionPolicy>, JsonRejection>,
) -> Result<(StatusCode, Json<RetentionPolicy>), ApiError> {
    let p = json_body(body)?;
    let p = blocking(&svc, move |s| s.put_policy(p, true)).await?;
    Ok((StatusCode::CREATED, Json(p)))
}

#[utoipa::path(put, path = "/api/v1/retention/policies/{name}", tag = "retention", params(("name" = String, Path, description = "Policy name")), request_body = RetentionPolicy, responses((status = 200, description = "Replaced", body = RetentionPolicy), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn update_policy(
    State(svc): Svc,
    Path(name): Path<String>,
    body: Result<Json<RetentionPolicy>, JsonRejection>,
) -> Result<Json<RetentionPolicy>, ApiError> {
    let p = json_body(body)?;
    if p.name != name {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "the body names policy {:?}, the path {name:?}; rename by deleting and creating",
                p.name
            ),
        ));
    }
    blocking(&svc, move |s| s.put_policy(p, false))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/api/v1/retention/policies/{name}", tag = "retention", params(("name" = String, Path, description = "Policy name")), responses((status = 204, description = "Deleted"), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn delete_policy(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&svc, move |s| s.delete_policy(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/prune", tag = "retention", request_body = PruneRequest, responses((status = 202, description = "Prune job started; its result lists every snapshot with keep or remove and the rules that kept it", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn prune(
    State(svc): Svc,
    body: Result<Json<PruneRequest>, JsonRejection>,
) -> Started {
    let req = json_body(body)?;
    let job = blocking(&svc, move |s| s.prune(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/api/v1/gc", tag = "retention", request_body(content = GcRequest, description = "Optional; an empty body means the defaults"), responses((status = 202, description = "Garbage collection job started", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn gc(State(svc): Svc, body: axum::body::Bytes) -> Started {
    let req: GcRequest = if body.iter().all(u8::is_ascii_whitespace) {
        GcRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("bad request body: {e}")))?
    };
    let job = blocking(&svc, move |s| s.gc(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(post, path = "/api/v1/sync", tag = "retention", request_body = SyncRequest, responses((status = 202, description = "Replication job started: only what the target site's store lacks is sent", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn sync(
    State(svc): Svc,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> Started {
    let req = json_body(body)?;
    let job = blocking(&svc, move |s| s.sync(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[utoipa::path(get, path = "/api/v1/schedules", tag = "schedules", responses((status = 200, description = "Schedules with their last and next run", body = [ScheduleInfo]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn schedules(State(svc): Svc) -> Result<Json<Vec<ScheduleInfo>>, ApiError> {
    blocking(&svc, |s| s.schedules()).await.map(Json)
}

#[utoipa::path(get, path = "/api/v1/schedules/{id}", tag = "schedules", params(("id" = String, Path, description = "Schedule id")), responses((status = 200, description = "The schedule", body = ScheduleInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn schedule(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    let all = blocking(&svc, |s| s.schedules()).await?;
    all.into_iter()
        .find(|x| x.id == id)
        .map(Json)
        .ok_or_else(|| not_found("schedule", &id, "/api/v1/schedules"))
}

#[utoipa::path(post, path = "/api/v1/schedules", tag = "schedules", request_body = ScheduleRequest, responses((status = 201, description = "Created", body = ScheduleInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn create_schedule(
    State(svc): Svc,
    body: Result<Json<ScheduleRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ScheduleInfo>), ApiError> {
    let req = json_body(body)?;
    let s = blocking(&svc, move |s| s.put_schedule(req, None)).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(put, path = "/api/v1/schedules/{id}", tag = "schedules", params(("id" = String, Path, description = "Schedule id")), request_body = ScheduleRequest, responses((status = 200, description = "Replaced", body = ScheduleInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn update_schedule(
    State(svc): Svc,
    Path(id): Path<String>,
    body: Result<Json<ScheduleRequest>, JsonRejection>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    let req = json_body(body)?;
    blocking(&svc, move |s| s.put_schedule(req, Some(id)))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/api/v1/schedules/{id}", tag = "schedules", params(("id" = String, Path, description = "Schedule id")), responses((status = 204, description = "Deleted"), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn delete_schedule(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&svc, move |s| s.delete_schedule(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/quotas", tag = "retention", responses((status = 200, description = "Size limits in bytes", body = Quotas), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn quotas(State(svc): Svc) -> Result<Json<Quotas>, ApiError> {
    blocking(&svc, |s| s.quotas()).await.map(Json)
}

#[utoipa::path(put, path = "/api/v1/quotas", tag = "retention", request_body = Quotas, responses((status = 200, description = "Replaced", body = Quotas), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn set_quotas(
    State(svc): Svc,
    body: Result<Json<Quotas>, JsonRejection>,
) -> Result<Json<Quotas>, ApiError> {
    let q = json_body(body)?;
    blocking(&svc, move |s| s.set_quotas(q)).await.map(Json)
}
