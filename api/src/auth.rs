//! Bearer-token authentication for everything but `/api/v1/health`.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};

/// Middleware: rejects a request without `Authorization: Bearer <token>`.
pub async fn require_token(
    State(token): State<std::sync::Arc<String>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong bearer token: pass the token from the agent's api.token file \
             (the CLI reads it with --data-dir or NOVABACKUP_TOKEN)",
        )
        .into_response(),
    }
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn eq() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }
}
