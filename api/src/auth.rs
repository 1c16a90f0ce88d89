//! Bearer tokens with roles. The agent's first token (`api.token`, created
//! 0600 at first start) is an admin token; more are made with `novabackup
//! token create` or `POST /api/v1/tokens`, and only their SHA-256 is kept
//! (`tokens.json`), so reading the state folder does not reveal them.
//!
//! Roles:
//! - `admin`: everything.
//! - `backup`: read, back up, restore, verify and cancel jobs; limited to
//!   the disks the token lists (all disks when it lists none): a limited
//!   token sees and acts on only those disks' snapshots and jobs, and
//!   nothing host-wide. No attaching, detaching, deleting, resetting,
//!   pruning, gc, policy or token management.
//! - `read-only`: reads, but never the token list.
//!
//! [`ROUTES`] is the one table of which role may call which route; the
//! middleware enforces it before any handler runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Back up and restore (its disks).
    Backup,
    /// Look, do not touch.
    ReadOnly,
}

impl Role {
    /// The role's name, as `token create --role` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Backup => "backup",
            Role::ReadOnly => "read-only",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "backup" => Ok(Role::Backup),
            "read-only" => Ok(Role::ReadOnly),
            _ => Err(format!(
                "unknown role {s:?}: use admin, backup or read-only"
            )),
        }
    }
}

/// A token as stored and listed (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Short id, used to revoke it.
    pub id: String,
    /// What the operator called it.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Disks a backup token is limited to (empty: all).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Creation time (RFC 3339).
    pub created: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    info: TokenInfo,
    sha256: String,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A name for people.
    pub name: String,
    /// `admin`, `backup` or `read-only`.
    pub role: Role,
    /// For a backup token: the disks it may back up and restore (empty: all).
    #[serde(default)]
    pub disks: Vec<String>,
}

/// The answer to a create: the secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// The token's record.
    #[serde(flatten)]
    pub info: TokenInfo,
    /// Pass as `Authorization: Bearer <token>`; not stored anywhere.
    pub token: String,
}

/// Who is calling, put into each authenticated request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Disks it is limited to (empty: all).
    pub disks: Vec<String>,
}

impl Caller {
    /// Whether the token is limited to some disks.
    pub fn is_scoped(&self) -> bool {
        self.role != Role::Admin && !self.disks.is_empty()
    }

    /// Whether this caller may act on `disk`.
    pub fn may_use(&self, disk: &str) -> bool {
        self.role == Role::Admin || self.disks.is_empty() || self.disks.iter().any(|d| d == disk)
    }

    /// Whether this caller may see a job acting on `disks` (empty:
    /// host-wide work, which only unlimited tokens see).
    pub fn may_see_job(&self, disks: &[String]) -> bool {
        !self.is_scoped() || (!disks.is_empty() && disks.iter().all(|d| self.may_use(d)))
    }

    /// Fails with 403 for a token limited to some disks.
    pub fn check_every_disk(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin || self.disks.is_empty() {
            Ok(())
        } else {
            self.check_disk("(every disk)")
        }
    }

    /// Fails with 403 unless [`Caller::may_use`].
    pub fn check_disk(&self, disk: &str) -> Result<(), ApiError> {
        if self.may_use(disk) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "token {:?} may not act on disk {disk:?}; it is limited to {:?}",
                    self.name, self.disks
                ),
            ))
        }
    }
}

/// Errors of the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing the file failed.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what we wrote.
    #[error("token file {path} is damaged ({why}); fix or remove it (all tokens but api.token are then gone)")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The token registry (module doc).
pub struct Tokens {
    path: Option<PathBuf>,
    bootstrap: [u8; 32],
    records: RwLock<Vec<Record>>,
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Tokens {
    /// The registry in `path` (created when the first token is), with
    /// `bootstrap` as an admin token that is not in the file.
    pub fn open(path: Option<&Path>, bootstrap: &str) -> Result<Tokens, TokenError> {
        let records = match path {
            Some(p) => match std::fs::read(p) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| TokenError::Damaged {
                    path: p.into(),
                    why: e.to_string(),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(TokenError::Io {
                        path: p.into(),
                        source,
                    })
                }
            },
            None => Vec::new(),
        };
        Ok(Tokens {
            path: path.map(Path::to_path_buf),
            bootstrap: hash(bootstrap),
            records: RwLock::new(records),
        })
    }

    /// Who `token` is, if anyone.
    pub fn check(&self, token: &str) -> Option<Caller> {
        let h = hash(token);
        if constant_time_eq(&h, &self.bootstrap) {
            return Some(Caller {
                name: "api.token".into(),
                role: Role::Admin,
                disks: Vec::new(),
            });
        }
        let hx = hex(&h);
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .find(|r| constant_time_eq(r.sha256.as_bytes(), hx.as_bytes()))
            .map(|r| Caller {
                name: r.info.name.clone(),
                role: r.info.role,
                disks: r.info.disks.clone(),
            })
    }

    /// Every token, without secrets.
    pub fn list(&self) -> Vec<TokenInfo> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        records.iter().map(|r| r.info.clone()).collect()
    }

    /// Makes a token; the secret is returned once and only its hash kept.
    pub fn create(&self, req: CreateToken) -> Result<CreatedToken, ApiError> {
        if req.name.trim().is_empty() || req.name.len() > 100 {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "a token needs a name of 1 to 100 characters",
            ));
        }
        if req.role != Role::Backup && !req.disks.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "only backup tokens are limited to disks",
            ));
        }
        let internal = |e: String| ApiError::new(ErrorCode::Internal, e);
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| internal(e.to_string()))?;
        let token = hex(&raw);
        let info = TokenInfo {
            id: hex(&hash(&token)[..4]),
            name: req.name,
            role: req.role,
            disks: req.disks,
            created: novabackup_engine::time::rfc3339(novabackup_engine::time::now_unix()),
        };
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        records.push(Record {
            info: info.clone(),
            sha256: hex(&hash(&token)),
        });
        if let Err(e) = self.save(&records) {
            records.pop();
            return Err(internal(e.to_string()));
        }
        Ok(CreatedToken { info, token })
    }

    /// Revokes the token with `id`; false if there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, ApiError> {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        let before = records.clone();
        records.retain(|r| r.info.id != id);
        if records.len() == before.len() {
            return Ok(false);
        }
        if let Err(e) = self.save(&records) {
            *records = before;
            return Err(ApiError::new(ErrorCode::Internal, e.to_string()));
        }
        Ok(true)
    }

    fn save(&self, records: &[Record]) -> Result<(), TokenError> {
        let Some(p) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(records).expect("records serialize");
        novabackup_engine::fsutil::write_atomic(p, &bytes, 0o600).map_err(|source| TokenError::Io {
            path: p.clone(),
            source,
        })
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any token (admin, backup, read-only).
    Read,
    /// Admin and backup tokens.
    Operate,
    /// Admin tokens only.
    Admin,
}

/// How a route is confined for a token limited to some disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The `{name}` path segment is the disk.
    DiskParam,
    /// The `{id}` path segment is a snapshot id, `DISK@TIME`.
    SnapshotParam,
    /// The handler checks the disks the body names (backups, restores,
    /// verify, prune) or the job's disk (jobs/{id}).
    Handler,
    /// A list: the handler leaves out what the token may not see.
    Filtered,
    /// Host-wide: only tokens that are not limited to disks.
    Host,
}

/// The one table of who may call what: every route of the API (the test
/// `every_route_role_and_scope` walks it against the router and the
/// OpenAPI document).
pub const ROUTES: &[(&str, &str, Access, Scope)] = {
    use Access::*;
    use Scope::*;
    &[
        ("GET", "/api/v1/disks", Read, Filtered),
        ("POST", "/api/v1/disks", Admin, Host),
        ("GET", "/api/v1/disks/{name}", Read, DiskParam),
        ("DELETE", "/api/v1/disks/{name}", Admin, Host),
        ("GET", "/api/v1/disks/{name}/cbt", Read, DiskParam),
        ("POST", "/api/v1/disks/{name}/cbt/reset", Admin, Host),
        ("POST", "/api/v1/backups", Operate, Handler),
        ("POST", "/api/v1/restores", Operate, Handler),
        ("POST", "/api/v1/verify", Operate, Handler),
        ("GET", "/api/v1/snapshots", Read, Filtered),
        ("GET", "/api/v1/snapshots/{id}", Read, SnapshotParam),
        (
            "GET",
            "/api/v1/snapshots/{id}/partitions",
            Read,
            SnapshotParam,
        ),
        ("GET", "/api/v1/snapshots/{id}/files", Read, SnapshotParam),
        (
            "POST",
            "/api/v1/snapshots/{id}/files/tar",
            Operate,
            SnapshotParam,
        ),
        ("DELETE", "/api/v1/snapshots/{id}", Admin, Host),
        (
            "POST",
            "/api/v1/snapshots/{id}/verify",
            Operate,
            SnapshotParam,
        ),
        ("POST", "/api/v1/snapshots/{id}/protect", Admin, Host),
        ("POST", "/api/v1/snapshots/{id}/unprotect", Admin, Host),
        ("GET", "/api/v1/mounts", Read, Host),
        ("POST", "/api/v1/mounts", Admin, Host),
        ("DELETE", "/api/v1/mounts/{name}", Admin, Host),
        ("POST", "/api/v1/mounts/{name}/promote", Admin, Host),
        ("GET", "/api/v1/jobs", Read, Filtered),
        ("GET", "/api/v1/jobs/{id}", Read, Handler),
        ("POST", "/api/v1/jobs/{id}/cancel", Operate, Handler),
        ("POST", "/api/v1/jobs/{id}/resume", Admin, Host),
        ("GET", "/api/v1/jobs/{id}/events", Read, Handler),
        ("GET", "/api/v1/store", Read, Host),
        ("GET", "/api/v1/retention/policies", Read, Host),
        ("POST", "/api/v1/retention/policies", Admin, Host),
        ("GET", "/api/v1/retention/policies/{name}", Read, Host),
        ("PUT", "/api/v1/retention/policies/{name}", Admin, Host),
        ("DELETE", "/api/v1/retention/policies/{name}", Admin, Host),
        ("POST", "/api/v1/prune", Admin, Host),
        ("POST", "/api/v1/gc", Admin, Host),
        ("POST", "/api/v1/sync", Admin, Host),
        ("GET", "/api/v1/schedules", Read, Host),
        ("POST", "/api/v1/schedules", Admin, Host),
        ("GET", "/api/v1/schedules/{id}", Read, Host),
        ("PUT", "/api/v1/schedules/{id}", Admin, Host),
        ("DELETE", "/api/v1/schedules/{id}", Admin, Host),
        ("GET", "/api/v1/quotas", Read, Host),
        ("PUT", "/api/v1/quotas", Admin, Host),
        ("GET", "/api/v1/tokens", Admin, Host),
        ("POST", "/api/v1/tokens", Admin, Host),
        ("DELETE", "/api/v1/tokens/{id}", Admin, Host),
        ("GET", "/metrics", Read, Host),
    ]
};

/// The table row for a request and the values of its `{...}` segments.
fn route<'a>(method: &Method, path: &'a str) -> Option<(Access, Scope, Vec<&'a str>)> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES.iter().find_map(|&(m, pattern, access, scope)| {
        if m != method {
            return None;
        }
        let mut params = Vec::new();
        let mut got = path.split('/');
        for want in pattern.split('/') {
            let g = got.next()?;
            if want.starts_with('{') {
                if g.is_empty() {
                    return None;
                }
                params.push(g);
            } else if want != g {
                return None;
            }
        }
        got.next().is_none().then_some((access, scope, params))
    })
}

/// Whether `caller` may make this call, as far as the method and path
/// tell (handlers check bodies and jobs: [`Scope::Handler`]).
pub fn authorize(caller: &Caller, method: &Method, path: &str) -> Result<(), ApiError> {
    let deny = |why: String| {
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "token {:?} ({}) may not {method} {path}: {why}",
                caller.name,
                caller.role.as_str()
            ),
        ))
    };
    let Some((access, scope, params)) = route(method, path) else {
        // The router answers 404 for paths it does not know; a known path
        // with another method is refused here rather than guessed at.
        return if caller.role == Role::Admin {
            Ok(())
        } else {
            deny("no such route in the access table".into())
        };
    };
    let role_ok = match access {
        Access::Read => true,
        Access::Operate => caller.role != Role::ReadOnly,
        Access::Admin => caller.role == Role::Admin,
    };
    if !role_ok {
        return deny(format!(
            "it needs an {} token",
            match access {
                Access::Admin => "admin",
                _ => "admin or backup",
            }
        ));
    }
    if caller.is_scoped() {
        let param = params.first().map(|p| percent_decode(p));
        let disk = match scope {
            Scope::DiskParam => param.as_deref(),
            Scope::SnapshotParam => param.as_deref().map(snapshot_disk),
            Scope::Handler | Scope::Filtered => None,
            Scope::Host => {
                return deny(format!(
                    "it acts on the whole host and the token is limited to {:?}",
                    caller.disks
                ))
            }
        };
        if let Some(d) = disk {
            caller.check_disk(d)?;
        }
    }
    Ok(())
}

/// The disk part of a snapshot id (`disk@time`).
pub fn snapshot_disk(id: &str) -> &str {
    id.split('@').next().unwrap_or(id)
}

/// Path segments arrive percent-encoded (`vm%40T` for `vm@T`).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Middleware: 401 without a known token, 403 when its role may not make
/// this call; otherwise the [`Caller`] goes into the request's extensions.
pub async fn require_role(
    State(tokens): State<Arc<Tokens>>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = bearer(&req).and_then(|t| tokens.check(t));
    let Some(caller) = caller else {
        return unauthorized().into_response();
    };
    if let Err(e) = authorize(&caller, req.method(), req.uri().path()) {
        return e.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Middleware for a single shared secret (the store server).
pub async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    match bearer(&req) {
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => unauthorized().into_response(),
    }
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn unauthorized() -> ApiError {
    ApiError::new(
        ErrorCode::Unauthorized,
        "missing or wrong bearer token: pass the token from the agent's api.token file \
         (the CLI reads it with --data-dir or NOVABACKUP_TOKEN), or one made with \
         `novabackup token create`",
    )
}

/// Compares without an early exit, so timing does not reveal the token.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn tokens_are_stored_hashed_survive_reopen_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.json");
        let t = Tokens::open(Some(&p), "boot").unwrap();
        assert_eq!(t.check("boot").unwrap().role, Role::Admin);
        let c = t
            .create(CreateToken {
                name: "ci".into(),
                role: Role::Backup,
                disks: vec!["web".into()],
            })
            .unwrap();
        let file = std::fs::read_to_string(&p).unwrap();
        assert!(!file.contains(&c.token), "the secret is not stored");
        let t = Tokens::open(Some(&p), "boot").unwrap();
        let caller = t.check(&c.token).unwrap();
        assert_eq!(caller.role, Role::Backup);
        assert!(caller.may_use("web") && !caller.may_use("db"));
        assert!(t.check("nope").is_none());
        assert!(t.revoke(&c.info.id).unwrap());
        assert!(!t.revoke(&c.info.id).unwrap());
        assert!(t.check(&c.token).is_none());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    fn caller(role: Role, disks: &[&str]) -> Caller {
        Caller {
            name: "t".into(),
            role,
            disks: disks.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn roles_allow_what_the_module_doc_says() {
        use Method as M;
        let ro = caller(Role::ReadOnly, &[]);
        let bk = caller(Role::Backup, &[]);
        let web = caller(Role::Backup, &["web"]);
        let admin = caller(Role::Admin, &[]);
        assert!(authorize(&ro, &M::GET, "/metrics").is_ok());
        assert!(authorize(&ro, &M::POST, "/api/v1/backups").is_err());
        assert!(authorize(&ro, &M::GET, "/api/v1/tokens").is_err());
        assert!(authorize(&bk, &M::POST, "/api/v1/backups").is_ok());
        assert!(authorize(&bk, &M::POST, "/api/v1/jobs/job-1/cancel").is_ok());
        assert!(authorize(&bk, &M::DELETE, "/api/v1/snapshots/vm@x").is_err());
        assert!(authorize(&bk, &M::POST, "/api/v1/disks").is_err());
        assert!(authorize(&bk, &M::GET, "/api/v1/tokens").is_err());
        assert!(authorize(&web, &M::GET, "/api/v1/disks/web").is_ok());
        assert!(authorize(&web, &M::GET, "/api/v1/disks/db").is_err());
        assert!(authorize(&web, &M::GET, "/api/v1/snapshots/web%40T").is_ok());
        assert!(authorize(&web, &M::GET, "/api/v1/snapshots/db%40T").is_err());
        assert!(authorize(&web, &M::GET, "/metrics").is_err());
        assert!(authorize(&admin, &M::DELETE, "/api/v1/tokens/ab").is_ok());
        assert!(authorize(&bk, &M::PATCH, "/api/v1/disks").is_err());
    }
}
