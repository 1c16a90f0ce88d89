//! novabackup's REST API: the axum router of the agent's control API, its
//! request and response types, the JSON error body, bearer-token auth, and
//! the blocking HTTP client the CLI uses. The agent implements
//! [`DiskService`]; handlers only translate HTTP to calls on it.

pub mod auth;
pub mod client;
pub mod error;
pub mod routes;
pub mod types;

pub use client::{Client, ClientError};
pub use error::{ApiError, ErrorCode};
pub use routes::{router, DiskService};
