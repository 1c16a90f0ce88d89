//! `/api/v1/mounts`: snapshots served as NBD exports straight from the
//! store (instant restore), and their promotion to real disks.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::disks::DetachQuery;
use super::{blocking, json_body, DiskService};
use crate::error::ApiError;
use crate::types::{JobInfo, MountInfo, MountRequest, PromoteRequest};

type Svc = State<Arc<dyn DiskService>>;

#[utoipa::path(get, path = "/api/v1/mounts", operation_id = "list_mounts", tag = "mounts", responses((status = 200, description = "Snapshots served over NBD", body = [MountInfo]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn list(State(svc): Svc) -> Result<Json<Vec<MountInfo>>, ApiError> {
    blocking(&svc, |s| s.mounts()).await.map(Json)
}

#[utoipa::path(post, path = "/api/v1/mounts", operation_id = "mount", tag = "mounts", request_body = MountRequest, responses((status = 201, description = "Served", body = MountInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn mount(
    State(svc): Svc,
    body: Result<Json<MountRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<MountInfo>), ApiError> {
    let req = json_body(body)?;
    let info = blocking(&svc, move |s| s.mount(req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(delete, path = "/api/v1/mounts/{name}", operation_id = "unmount", tag = "mounts", params(("name" = String, Path, description = "Mount name"), DetachQuery), responses((status = 204, description = "Ended; the overlay is deleted unless the mount was promoted"), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn unmount(
    State(svc): Svc,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<DetachQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let force = super::disks::force(query)?;
    blocking(&svc, move |s| s.unmount(&name, force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/mounts/{name}/promote", operation_id = "promote_mount", tag = "mounts", params(("name" = String, Path, description = "Mount name")), request_body = PromoteRequest, responses((status = 202, description = "The job filling the rest of the image", body = JobInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn promote(
    State(svc): Svc,
    Path(name): Path<String>,
    body: Result<Json<PromoteRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobInfo>), ApiError> {
    let req = json_body(body)?;
    let job = blocking(&svc, move |s| s.promote(&name, req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}
