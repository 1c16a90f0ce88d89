//! novabackup's REST API: the axum router of the agent's control API, its
//! request and response types, the JSON error body, bearer-token auth, and
//! the blocking HTTP client the CLI uses; the store server's protocol
//! ([`store_server`]) and the agent's client of it ([`remote`]). The agent implements
//! [`DiskService`]; handlers only translate HTTP to calls on it.

pub mod auth;
pub mod client;
pub mod error;
pub mod objstore;
pub mod openapi;
pub mod remote;
pub mod routes;
pub mod store_server;
pub mod store_wire;
pub mod tls;
pub mod types;

pub use client::{Client, ClientError};
pub use error::{ApiError, ErrorCode};
pub use routes::{router, DiskService, TarJob};
