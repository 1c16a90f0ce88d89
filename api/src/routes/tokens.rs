//! Token management (admin only, enforced by the role middleware).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::json_body;
use crate::auth::{CreateToken, CreatedToken, TokenInfo, Tokens};
use crate::error::{ApiError, ErrorCode};

type T = State<Arc<Tokens>>;

#[utoipa::path(get, path = "/api/v1/tokens", operation_id = "list_tokens", tag = "tokens", responses((status = 200, description = "Tokens, without secrets", body = [TokenInfo]), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn list(State(t): T) -> Json<Vec<TokenInfo>> {
    Json(t.list())
}

#[utoipa::path(post, path = "/api/v1/tokens", operation_id = "create_token", tag = "tokens", request_body = CreateToken, responses((status = 201, description = "Created; the secret is in `token`, shown once", body = CreatedToken), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn create(
    State(t): T,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let req = json_body(body)?;
    let c = tokio::task::spawn_blocking(move || t.create(req))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(c)))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", operation_id = "revoke_token", tag = "tokens", params(("id" = String, Path, description = "Token id")), responses((status = 204, description = "Revoked"), crate::error::Errors), security(("bearer" = [])))]
pub(super) async fn revoke(State(t): T, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let gone = tokio::task::spawn_blocking(move || t.revoke(&id).map(|g| (g, id)))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))??;
    if gone.0 {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no token {:?}; `novabackup token list` shows them", gone.1),
        ))
    }
}
