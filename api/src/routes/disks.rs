//! `/api/v1/disks` and `/api/v1/disks/{name}/cbt`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{blocking, json_body, DiskService};
use crate::error::ApiError;
use crate::types::{AttachRequest, CbtInfo, DiskInfo};

type Svc = State<Arc<dyn DiskService>>;

pub(super) async fn list(State(svc): Svc) -> Result<Json<Vec<DiskInfo>>, ApiError> {
    blocking(&svc, |s| Ok(s.list())).await.map(Json)
}

pub(super) async fn attach(
    State(svc): Svc,
    body: Result<Json<AttachRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<DiskInfo>), ApiError> {
    let req = json_body(body)?;
    let info = blocking(&svc, move |s| s.attach(req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub(super) async fn get(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<DiskInfo>, ApiError> {
    blocking(&svc, move |s| s.get(&name)).await.map(Json)
}

pub(super) async fn detach(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&svc, move |s| s.detach(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn cbt(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<CbtInfo>, ApiError> {
    blocking(&svc, move |s| s.cbt(&name)).await.map(Json)
}

pub(super) async fn cbt_reset(
    State(svc): Svc,
    Path(name): Path<String>,
) -> Result<Json<CbtInfo>, ApiError> {
    blocking(&svc, move |s| s.cbt_reset(&name)).await.map(Json)
}
