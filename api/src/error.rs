//! The one error type of the API and its JSON body:
//! `{"error": {"code": "...", "message": "..."}}` with a stable code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// Stable machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request body or a parameter is malformed.
    BadRequest,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// The token's role does not allow the call.
    Forbidden,
    /// No such resource.
    NotFound,
    /// The resource exists or is in use.
    Conflict,
    /// The request is well-formed but cannot be done (e.g. image missing).
    Unprocessable,
    /// The store is out of space.
    InsufficientStorage,
    /// The request body is larger than the endpoint accepts.
    PayloadTooLarge,
    /// The endpoint does not take this method.
    MethodNotAllowed,
    /// Something failed inside the agent.
    Internal,
}

impl ErrorCode {
    fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An API error: a code and a message that says what to do.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema,
)]
#[error("{message}")]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(ErrorBody { error: self })).into_response()
    }
}

/// The error responses every endpoint may give, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Errors {
    /// A malformed request: bad JSON, wrong types, bad names.
    #[response(status = 400, description = "Malformed request")]
    BadRequest(ErrorBody),
    /// No token, or an unknown one.
    #[response(status = 401, description = "Missing or wrong bearer token")]
    Unauthorized(ErrorBody),
    /// The token's role may not make this call.
    #[response(status = 403, description = "The token's role does not allow this")]
    Forbidden(ErrorBody),
    /// No such disk, snapshot, job or token.
    #[response(status = 404, description = "Not found")]
    NotFound(ErrorBody),
    /// The thing exists, is busy, or is in use.
    #[response(status = 409, description = "Conflict")]
    Conflict(ErrorBody),
    /// Well-formed but impossible (e.g. a missing image).
    #[response(status = 422, description = "Cannot be done")]
    Unprocessable(ErrorBody),
    /// Something failed inside the agent (see its log).
    #[response(status = 500, description = "Internal error")]
    Internal(ErrorBody),
    /// The store is full.
    #[response(status = 507, description = "The store is out of space")]
    InsufficientStorage(ErrorBody),
}

impl From<novabackup_engine::ops::OpError> for ApiError {
    /// The one mapping of operation errors to HTTP: the kind decides the
    /// status, the message goes as it is.
    fn from(e: novabackup_engine::ops::OpError) -> Self {
        use novabackup_engine::ops::ErrorKind;
        let code = match e.kind() {
            ErrorKind::NotFound => ErrorCode::NotFound,
            ErrorKind::Conflict | ErrorKind::Busy => ErrorCode::Conflict,
            ErrorKind::Quota | ErrorKind::StoreFull => ErrorCode::InsufficientStorage,
            ErrorKind::Invalid => ErrorCode::BadRequest,
            ErrorKind::Damaged => ErrorCode::Unprocessable,
            ErrorKind::Forbidden => ErrorCode::Forbidden,
            ErrorKind::Internal => ErrorCode::Internal,
        };
        ApiError::new(code, e.message())
    }
}

impl From<novabackup_engine::store::StoreError> for ApiError {
    fn from(e: novabackup_engine::store::StoreError) -> Self {
        novabackup_engine::ops::OpError::from(e).into()
    }
}

impl ErrorCode {
    /// The CLI's exit code for an error the agent answered with: 4 when
    /// something named does not exist, else 1 (see `novabackup --help`).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::NotFound => 4,
            _ => 1,
        }
    }
}

/// Turns an error answer that is not our JSON body (axum's plain-text 413
/// for an oversized body, 405 for a wrong method, ...) into one, so that
/// every error a client sees has the same shape.
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::PayloadTooLarge,
            "the request body is too large for this endpoint",
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            "this endpoint does not take that method; see /api/v1/openapi.json",
        ),
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "not found"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => (
            ErrorCode::BadRequest,
            "the request body is not the JSON this endpoint takes",
        ),
        s if s.is_server_error() => (ErrorCode::Internal, "the server failed"),
        _ => (ErrorCode::BadRequest, "bad request"),
    };
    let mut out = ApiError::new(code, message).into_response();
    *out.status_mut() = status;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use novabackup_engine::ops::{ErrorKind, OpError};

    #[test]
    fn each_operation_error_kind_has_one_status_and_exit_code() {
        let cases = [
            (ErrorKind::NotFound, StatusCode::NOT_FOUND, 4),
            (ErrorKind::Conflict, StatusCode::CONFLICT, 1),
            (ErrorKind::Busy, StatusCode::CONFLICT, 1),
            (ErrorKind::Quota, StatusCode::INSUFFICIENT_STORAGE, 1),
            (ErrorKind::StoreFull, StatusCode::INSUFFICIENT_STORAGE, 1),
            (ErrorKind::Invalid, StatusCode::BAD_REQUEST, 1),
            (ErrorKind::Damaged, StatusCode::UNPROCESSABLE_ENTITY, 1),
            (ErrorKind::Internal, StatusCode::INTERNAL_SERVER_ERROR, 1),
        ];
        for (kind, status, exit) in cases {
            let e = ApiError::from(OpError::new(kind, "what to do"));
            assert_eq!(e.code.status(), status, "{kind:?}");
            assert_eq!(e.code.exit_code(), exit, "{kind:?}");
            assert_eq!(e.message, "what to do");
        }
    }

    #[test]
    fn a_full_store_is_507_wherever_it_is_reported() {
        let full = novabackup_engine::store::StoreError::io(
            "/store",
            // ENOSPC on Linux.
            std::io::Error::from_raw_os_error(28),
        );
        assert_eq!(ApiError::from(full).code, ErrorCode::InsufficientStorage);
    }
}
