//! `/api/v1/disks` and `/api/v1/disks/{name}/cbt`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::{blocking, json_body, DiskService};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::types::{AttachRequest, CbtInfo, DiskInfo};

type Svc = State<Arc<dyn DiskService>>;

#[utoipa::path(get, path = "/api/v1/disks", operation_id = "list_disks", tag = "disks", responses((status = 200, description = "Attached disks", body = [DiskInfo]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn list(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<DiskInfo>>, ApiError> {
    let mut list = blocking(&svc, |s| Ok(s.list())).await?;
    list.retain(|d| caller.may_use(&d.name));
    Ok(Json(list))
}

#[utoipa::path(post, path = "/api/v1/disks", operation_id = "attach_disk", tag = "disks", request_body = AttachRequest, responses((status = 201, description = "Attached", body = DiskInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn attach(
    State(svc): Svc,
    body: Result<Json<AttachRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<DiskInfo>), ApiError> {
    let req = json_body(body)?;
    let info = blocking(&svc, move |s| s.attach(req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(get, path = "/api/v1/disks/{name}", operation_id = "get_disk", tag = "disks", params(("name" = String, Path, description = "Disk name")), responses((status = 200, description = "The disk", body = DiskInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn get(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<DiskInfo>, ApiError> {
    blocking(&svc, move |s| s.get(&name)).await.map(Json)
}

/// `DELETE /api/v1/disks/{name}` options.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct DetachQuery {
    /// Disconnect the disk's NBD clients instead of refusing.
    #[serde(default)]
    pub(crate) force: bool,
}

/// The `force` of a detach or unmount query.
pub(crate) fn force(
    query: Result<axum::extract::Query<DetachQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<bool, ApiError> {
    query.map(|q| q.force).map_err(|e| {
        ApiError::new(
            crate::error::ErrorCode::BadRequest,
            format!("bad query: {e}"),
        )
    })
}

#[utoipa::path(delete, path = "/api/v1/disks/{name}", tag = "disks", params(("name" = String, Path, description = "Disk name"), DetachQuery), responses((status = 204, description = "Detached"), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn detach(
    State(svc): Svc,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<DetachQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let force = force(query)?;
    blocking(&svc, move |s| s.detach(&name, force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/disks/{name}/cbt", tag = "disks", params(("name" = String, Path, description = "Disk name")), responses((status = 200, description = "Change tracking state", body = CbtInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn cbt(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<CbtInfo>, ApiError> {
    blocking(&svc, move |s| s.cbt(&name)).await.map(Json)
}

#[utoipa::path(post, path = "/api/v1/disks/{name}/cbt/reset", tag = "disks", params(("name" = String, Path, description = "Disk name")), responses((status = 200, description = "Bitmap reset: the next backup is full", body = CbtInfo), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn cbt_reset(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<CbtInfo>, ApiError> {
    blocking(&svc, move |s| s.cbt_reset(&name)).await.map(Json)
}
