//! The store server (`novabackup store serve`): a local store behind the
//! protocol of [`crate::store_wire`]. Handlers decode the request, call the
//! store or the engine's [`Acceptor`] on a blocking thread, and encode the
//! answer; what a snapshot must satisfy to be accepted is the engine's
//! (`novabackup_engine::ops::accept`). A lock is a lease: a client that
//! dies stops renewing it and it lapses after [`LEASE`], so a killed agent
//! never blocks a disk for good.
//!
//! Each request acts for one tenant ([`tenants`]): it sees, reads,
//! deletes, prunes and locks only its own snapshots, and once tenants of
//! more than one trust group exist, `missing` and chunk reads answer only
//! for chunks its group uploaded or references, so nothing tells it what
//! other groups store. Protection and quotas are enforced here, and only
//! admins collect garbage.

pub mod tenants;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::Request;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{middleware, Extension, Json, Router};
use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::chunk;
use novabackup_engine::format::manifest::{Annotation, Manifest};
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::ops::accept::Acceptor;
use novabackup_engine::store::local::LocalStore;
use novabackup_engine::store::{DiskLock, GcOptions, GcReport, Store, StoreError};
use serde::Deserialize;

use self::tenants::{StoreRole, Tenant, Tenants};
use crate::error::{ApiError, ErrorCode};
use crate::store_wire::{
    decode_digests, encode_batch, record_spans, split_commit, Health, Lease, SnapshotList, Stored,
    Usage, LEASE, MAX_FETCH, MAX_QUERY,
};

/// Largest accepted request body: one chunk at the largest plain size, plus
/// slack for an upload batch that it ends.
const MAX_BODY: usize = chunk::MAX_PLAIN + (2 << 20);

struct Held {
    lease: String,
    until: Instant,
    _guard: Box<dyn DiskLock>,
}

/// What a trust group may know is in the store: chunks its snapshots
/// reference and chunks its tenants uploaded.
#[derive(Default)]
struct GroupRefs {
    /// The snapshots' references were read in.
    built: bool,
    chunks: HashSet<ChunkDigest>,
}

struct Served {
    store: LocalStore,
    locks: Mutex<HashMap<DiskName, Held>>,
    /// Checks and commits snapshots.
    acceptor: Acceptor,
    tenants: Arc<Tenants>,
    groups: Mutex<HashMap<String, GroupRefs>>,
}

type Shared = Arc<Served>;

/// The router of a store server over the store at `store`. `token` is the
/// original shared token (the `default` tenant's admin); tenant tokens
/// come from `tenants.json` in the store folder.
pub fn router(store: LocalStore, token: String) -> Router {
    let tenants = match Tenants::open(store.root(), token.clone()) {
        Ok(t) => t,
        Err(e) => {
            // Refusing every tenant is safer than guessing; the shared
            // token still works so the operator can repair the file.
            tracing::error!("{e}");
            Tenants::open(std::path::Path::new("/nonexistent"), token)
                .expect("an absent file is an empty list")
        }
    };
    let tenants = Arc::new(tenants);
    let state: Shared = Arc::new(Served {
        store,
        locks: Mutex::new(HashMap::new()),
        acceptor: Acceptor::default(),
        tenants: tenants.clone(),
        groups: Mutex::new(HashMap::new()),
    });
    let protected = Router::new()
        .route("/store/v1/missing", post(missing))
        .route("/store/v1/chunks", post(put_chunks))
        .route("/store/v1/fetch", post(fetch))
        .route("/store/v1/chunks/{digest}", put(put_chunk).get(get_chunk))
        .route("/store/v1/sync", post(sync))
        .route("/store/v1/snapshots", post(commit).get(list))
        .route("/store/v1/commit", post(commit_with_pages))
        .route(
            "/store/v1/snapshots/{id}",
            get(manifest).delete(delete).patch(annotate),
        )
        .route("/store/v1/gc", post(gc))
        .route("/store/v1/locks/{disk}", post(lock))
        .route("/store/v1/locks/{disk}/{lease}", post(renew).delete(unlock))
        .route("/store/v1/usage", get(usage))
        .route("/store/v1/damaged", post(damaged))
        .route_layer(middleware::from_fn_with_state(tenants, require_tenant))
        .with_state(state);
    Router::new()
        .route(
            "/store/v1/health",
            get(|| async { Json(Health::current()) }),
        )
        .merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(crate::error::json_errors))
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such store endpoint; see /store/v1/health",
            )
        })
}

/// Checks the bearer token and puts its [`Tenant`] in the request.
async fn require_tenant(
    State(tenants): State<Arc<Tenants>>,
    mut req: Request,
    next: Next,
) -> Response {
    let tenant = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| tenants.check(t));
    match tenant {
        Some(t) => {
            req.extensions_mut().insert(t);
            next.run(req).await
        }
        None => ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong store token: pass the store server's server.token, or a tenant \
             token made with `novabackup store token create`",
        )
        .into_response(),
    }
}

impl Served {
    /// Whether answers must be limited to what `t`'s group may know.
    fn filtering(&self, t: &Tenant) -> bool {
        !(t.group == tenants::DEFAULT_TENANT && self.tenants.one_group())
    }

    /// Runs `f` on `t`'s group's references, reading them in first if
    /// needed (every index page of the group's snapshots).
    fn with_group<R>(
        &self,
        t: &Tenant,
        f: impl FnOnce(&mut HashSet<ChunkDigest>) -> R,
    ) -> Result<R, ApiError> {
        let built = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&t.group)
            .is_some_and(|g| g.built);
        if !built {
            let chunks = self.group_chunks(&t.group)?;
            let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            let e = g.entry(t.group.clone()).or_default();
            e.chunks.extend(chunks);
            e.built = true;
        }
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut g.entry(t.group.clone()).or_default().chunks))
    }

    fn group_chunks(&self, group: &str) -> Result<HashSet<ChunkDigest>, ApiError> {
        let (all, _) = self.store.list(None).map_err(ApiError::from)?;
        let mut out = HashSet::new();
        let group_of = self.tenants.groups();
        for m in all
            .iter()
            .filter(|m| group_of(&tenants::owner_of(&m.disk)) == group)
        {
            out.extend(m.pages.iter().copied());
            for (p, d) in m.pages.iter().enumerate() {
                let Ok(file) = self.store.get_chunk(d) else {
                    continue;
                };
                let Ok(plain) = chunk::decode(&file) else {
                    continue;
                };
                let n = novabackup_engine::format::index::page_len(m.chunks(), p as u64);
                if let Ok(ds) = novabackup_engine::format::index::decode_page(&plain, n) {
                    out.extend(ds.into_iter().filter(|d| !d.is_zero()));
                }
            }
        }
        Ok(out)
    }

    /// Records uploads of `t`'s group.
    fn uploaded(
        &self,
        t: &Tenant,
        digests: impl IntoIterator<Item = ChunkDigest>,
    ) -> Result<(), ApiError> {
        if self.filtering(t) {
            self.with_group(t, |g| g.extend(digests))?;
        }
        Ok(())
    }

    /// Whether `t` may be told of (or read) `d`.
    fn knows(&self, t: &Tenant, digests: &[ChunkDigest]) -> Result<Vec<bool>, ApiError> {
        if !self.filtering(t) {
            return Ok(vec![true; digests.len()]);
        }
        self.with_group(t, |g| digests.iter().map(|d| g.contains(d)).collect())
    }

    /// `m` as its tenant names it.
    fn outward(t: &Tenant, m: Manifest) -> Option<Manifest> {
        let mut m = m;
        m.id = t.external_id(&m.id)?;
        m.disk = t.external(&m.disk)?;
        m.parent = m.parent.as_ref().and_then(|p| t.external_id(p));
        m.checksum = m.sum();
        Some(m)
    }
}

fn not_found(id: &SnapshotId) -> ApiError {
    ApiError::from(StoreError::NoSnapshot(id.clone()))
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, e.to_string())))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, msg)
}

fn parse_digest(s: &str) -> Result<ChunkDigest, ApiError> {
    s.parse()
        .map_err(|_| bad(format!("{s:?} is not a chunk digest (64 hex digits)")))
}

fn parse_id(s: &str) -> Result<SnapshotId, ApiError> {
    s.parse()
        .map_err(|e| bad(format!("{s:?} is not a snapshot id: {e}")))
}

fn parse_disk(s: &str) -> Result<DiskName, ApiError> {
    s.parse()
        .map_err(|e| bad(format!("{s:?} is not a disk name: {e}")))
}

/// Most digests of a question answered on the network thread; a larger
/// one (up to [`MAX_QUERY`], a few milliseconds of lookups) goes to a
/// blocking thread rather than hold up the connections that thread serves.
/// A backup's questions name 16 to a few hundred chunks.
const ANSWER_NOW_MAX: usize = 4096;

async fn missing(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let digests = decode_digests(&body, 0, MAX_QUERY).map_err(bad)?;
    if s.filtering(&t) {
        // Another group's chunk is "missing" to this tenant: uploading it
        // stores nothing, and the answer tells nothing.
        let out = blocking(move || {
            let lacks = s.store.missing(&digests).map_err(ApiError::from)?;
            let known = s.knows(&t, &digests)?;
            Ok(lacks
                .into_iter()
                .zip(known)
                .map(|(l, k)| u8::from(l || !k))
                .collect::<Vec<u8>>())
        })
        .await?;
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response());
    }
    // Answered here when no lock is taken: a hand-over to a blocking
    // thread and back, with the server's core busy checking uploads, kept
    // a backup's worker waiting for answers (see `LocalStore::missing_now`).
    let now = (digests.len() <= ANSWER_NOW_MAX)
        .then(|| s.store.missing_now(&digests))
        .flatten();
    let m = match now {
        Some(m) => m,
        None => blocking(move || s.store.missing(&digests).map_err(ApiError::from)).await?,
    };
    let out: Vec<u8> = m.into_iter().map(u8::from).collect();
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// Checks chunk files against their digests before anything is written:
/// a tampered or damaged upload never enters the store. The first bad one
/// is the error. The zero checksums agents leave to the server (see
/// `FastPaths::sums_chunks`) are filled in.
fn check_uploads(items: &mut [(&mut [u8], ChunkDigest)]) -> Result<(), ApiError> {
    // One zstd context per blocking thread, reused across uploads.
    thread_local! {
        static VERIFIER: std::cell::RefCell<Option<chunk::Verifier>> =
            const { std::cell::RefCell::new(None) };
    }
    VERIFIER.with(|v| {
        let mut v = v.borrow_mut();
        if v.is_none() {
            *v = Some(
                chunk::Verifier::new()
                    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?,
            );
        }
        let verdicts = v.as_mut().expect("just set").check_each_filling(items);
        for ((_, d), r) in items.iter().zip(verdicts) {
            r.map_err(|e| {
                bad(format!(
                    "chunk {d} rejected: {e}; nothing was stored (the client's data or the network is damaged)"
                ))
            })?;
        }
        Ok(())
    })
}

async fn put_chunk(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(digest): Path<String>,
    body: Bytes,
) -> Result<Json<Stored>, ApiError> {
    let d = parse_digest(&digest)?;
    blocking(move || {
        let mut body = owned(body);
        check_uploads(&mut [(&mut body[..], d)])?;
        let n = s.store.put_chunk(&d, &body).map_err(ApiError::from)?;
        s.uploaded(&t, [d])?;
        Ok(Json(Stored {
            stored: n,
            chunks: None,
        }))
    })
    .await
}

/// An upload the server may change (the chunk sums it fills in): the
/// collected body itself unless it is shared, which it usually is not.
fn owned(body: Bytes) -> bytes::BytesMut {
    body.try_into_mut()
        .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]))
}

/// The files at `spans` (in order, apart) of `body`, each writable.
fn split_spans<'a>(
    mut rest: &'a mut [u8],
    spans: &[(ChunkDigest, std::ops::Range<usize>)],
) -> Vec<(&'a mut [u8], ChunkDigest)> {
    let mut at = 0;
    let mut out = Vec::with_capacity(spans.len());
    for (d, span) in spans {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(span.start - at);
        let (file, tail) = tail.split_at_mut(span.len());
        out.push((file, *d));
        rest = tail;
        at = span.end;
    }
    out
}

/// A batch of uploads: every chunk is checked before any is stored, so a
/// batch with one bad chunk stores nothing.
async fn put_chunks(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    body: Bytes,
) -> Result<Json<Stored>, ApiError> {
    blocking(move || {
        let mut body = owned(body);
        let spans = record_spans(&body).map_err(|e| bad(format!("bad upload batch: {e}")))?;
        check_uploads(&mut split_spans(&mut body, &spans))?;
        let mut stored = 0;
        for (d, span) in &spans {
            stored += s
                .store
                .put_chunk(d, &body[span.clone()])
                .map_err(ApiError::from)?;
        }
        s.uploaded(&t, spans.iter().map(|(d, _)| *d))?;
        Ok(Json(Stored {
            stored,
            chunks: Some(spans.len()),
        }))
    })
    .await
}

async fn get_chunk(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let d = parse_digest(&digest)?;
    let bytes = blocking(move || {
        if !s.knows(&t, &[d])?[0] {
            return Err(StoreError::MissingChunk(d).into());
        }
        s.store.get_chunk(&d).map_err(ApiError::from)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Many chunk files in one answer (a restore's batch): the ones the store
/// lacks are left out, so the client can name them with single requests.
async fn fetch(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let digests = decode_digests(&body, 1, MAX_FETCH).map_err(bad)?;
    let out = blocking(move || {
        let known = s.knows(&t, &digests)?;
        let mut files = Vec::with_capacity(digests.len());
        for (d, _) in digests.iter().zip(known).filter(|(_, k)| *k) {
            match s.store.get_chunk(d) {
                Ok(f) => files.push((d, f)),
                Err(StoreError::MissingChunk(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(encode_batch(files.iter().map(|(d, f)| (*d, f.as_slice()))))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

async fn sync(State(s): State<Shared>) -> Result<StatusCode, ApiError> {
    blocking(move || s.store.sync().map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn commit(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let m = Manifest::decode(&body).map_err(|e| bad(format!("bad manifest: {e}")))?;
    blocking(move || commit_checked(&s, &t, m, &HashMap::new())).await
}

/// A commit that carries the snapshot's new index pages (see
/// [`encode_commit`]): the pages are checked like uploads and stored,
/// then the snapshot is checked with them in hand, where a commit alone
/// reads every changed page back from the store.
async fn commit_with_pages(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    body: Bytes,
) -> Result<Response, ApiError> {
    blocking(move || {
        let mut body = owned(body);
        let (m, at) = split_commit(&body).map_err(bad)?;
        let spans = match &body[at..] {
            [] => Vec::new(),
            rest => record_spans(rest)
                .map_err(|e| bad(format!("bad index pages: {e}")))?
                .into_iter()
                .map(|(d, r)| (d, r.start + at..r.end + at))
                .collect(),
        };
        let mut given = HashMap::with_capacity(spans.len());
        for (file, d) in split_spans(&mut body, &spans) {
            let plain = chunk::decode_verified_filling(file, &d).map_err(|e| {
                bad(format!(
                    "index page {d} rejected: {e}; nothing was stored (the client's data or the network is damaged)"
                ))
            })?;
            given.insert(d, plain);
        }
        for (d, span) in &spans {
            s.store
                .put_chunk(d, &body[span.clone()])
                .map_err(ApiError::from)?;
        }
        s.uploaded(&t, spans.iter().map(|(d, _)| *d))?;
        commit_checked(&s, &t, m, &given)
    })
    .await
}

/// Commits `m` once everything it names is present; `given` holds the
/// plain bytes of index pages the request brought.
fn commit_checked(
    s: &Served,
    t: &Tenant,
    m: Manifest,
    given: &HashMap<ChunkDigest, Vec<u8>>,
) -> Result<Response, ApiError> {
    let outside = m.id.clone();
    let mut m = m;
    m.disk = t.internal(&m.disk)?;
    m.id = t.internal_id(&m.id)?;
    m.parent = m.parent.as_ref().map(|p| t.internal_id(p)).transpose()?;
    if let Some(limit) = t.quota {
        let (all, _) = s.store.list(None).map_err(ApiError::from)?;
        let used: u64 = all
            .iter()
            .filter(|x| tenants::owner_of(&x.disk) == t.name)
            .map(|x| x.stats.bytes_stored)
            .sum();
        if used + m.stats.bytes_stored > limit {
            return Err(ApiError::new(
                ErrorCode::InsufficientStorage,
                format!(
                    "tenant {} would pass its quota of {limit} bytes ({used} used, {} more); \
                     prune snapshots or ask the store's operator for more",
                    t.name, m.stats.bytes_stored
                ),
            ));
        }
    }
    if s.filtering(t) {
        // A snapshot may name only chunks its group uploaded or already
        // references: naming another group's chunk would make it readable.
        s.with_group(t, |_| ())?;
        // Looked up one at a time: the commit's I/O must not hold every
        // other tenant's questions.
        let known = |d: &ChunkDigest| {
            s.groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&t.group)
                .is_some_and(|g| g.chunks.contains(d))
        };
        s.acceptor.accept_known(&s.store, &m, given, &known)?;
    } else {
        s.acceptor.accept(&s.store, &m, given)?;
    }
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"snapshot": outside})),
    )
        .into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    disk: Option<String>,
}

async fn list(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Query(q): Query<ListQuery>,
) -> Result<Json<SnapshotList>, ApiError> {
    let disk = q
        .disk
        .as_deref()
        .map(parse_disk)
        .transpose()?
        .map(|d| t.internal(&d))
        .transpose()?;
    blocking(move || {
        let (snapshots, bad) = s.store.list(disk.as_ref()).map_err(ApiError::from)?;
        let prefix = format!("/_{}_", t.name);
        Ok(Json(SnapshotList {
            snapshots: snapshots
                .into_iter()
                .filter_map(|m| Served::outward(&t, m))
                .collect(),
            damaged: bad
                .iter()
                .map(|e| e.to_string())
                .filter(|e| {
                    if t.name == tenants::DEFAULT_TENANT {
                        !e.contains("/snapshots/_")
                    } else {
                        e.contains(&prefix)
                    }
                })
                .collect(),
        }))
    })
    .await
}

async fn manifest(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let inner = t.internal_id(&id)?;
    let m = blocking(move || s.store.manifest(&inner).map_err(ApiError::from)).await?;
    let m = Served::outward(&t, m).ok_or_else(|| not_found(&id))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], m.encode()).into_response())
}

async fn delete(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let inner = t.internal_id(&id)?;
    blocking(move || {
        // Protection holds on the server, whatever the client checked.
        if s.store.manifest(&inner).map_err(ApiError::from)?.protected {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("snapshot {id} is protected; unprotect it first"),
            ));
        }
        s.store.delete(&inner).map_err(ApiError::from)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn annotate(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let inner = t.internal_id(&id)?;
    let a: Annotation =
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad annotation: {e}")))?;
    let m = blocking(move || s.store.annotate(&inner, &a).map_err(ApiError::from)).await?;
    let m = Served::outward(&t, m).ok_or_else(|| not_found(&id))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], m.encode()).into_response())
}

async fn gc(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    q: Result<Query<GcOptions>, QueryRejection>,
) -> Result<Json<GcReport>, ApiError> {
    if t.role != StoreRole::Admin {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "tenant {}: garbage collection of a shared store is for its admins; \
                 the store's operator runs it (an admin token from `novabackup store token create --role admin`)",
                t.name
            ),
        ));
    }
    let Query(opts) = q.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    novabackup_engine::ops::snapshots::check_gc(&opts)?;
    blocking(move || {
        let progress = novabackup_engine::progress::Progress::default();
        Ok(novabackup_engine::ops::snapshots::gc(
            &s.store, &opts, &progress,
        )?)
    })
    .await
    .map(Json)
}

/// `?base=ID` of a lock request: the snapshot the backup builds on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockQuery {
    base: Option<String>,
}

fn locks(s: &Served) -> std::sync::MutexGuard<'_, HashMap<DiskName, Held>> {
    s.locks.lock().unwrap_or_else(|p| p.into_inner())
}

async fn lock(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(disk): Path<String>,
    q: Result<Query<LockQuery>, QueryRejection>,
) -> Result<Json<Lease>, ApiError> {
    let disk = t.internal(&parse_disk(&disk)?)?;
    let Query(q) = q.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    let base = q
        .base
        .as_deref()
        .map(parse_id)
        .transpose()?
        .map(|b| t.internal_id(&b))
        .transpose()?;
    blocking(move || {
        // A base that is gone is refused (404): the backup cannot build
        // on it. The store checks again once it is pinned.
        let base = base
            .map(|id| s.store.manifest(&id))
            .transpose()
            .map_err(ApiError::from)?;
        let mut held = locks(&s);
        if held.get(&disk).is_some_and(|h| h.until < Instant::now()) {
            tracing::warn!(%disk, "a backup lock lapsed (its client stopped renewing it)");
            held.remove(&disk);
        }
        if held.contains_key(&disk) {
            return Err(StoreError::Locked(disk).into());
        }
        let guard = s.store.lock(&disk, base.as_ref()).map_err(ApiError::from)?;
        let mut raw = [0u8; 16];
        getrandom::getrandom(&mut raw)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let lease: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        held.insert(
            disk,
            Held {
                lease: lease.clone(),
                until: Instant::now() + LEASE,
                _guard: guard,
            },
        );
        Ok(Json(Lease {
            lease,
            ttl_s: LEASE.as_secs(),
        }))
    })
    .await
}

fn find_lease<'a>(
    held: &'a mut HashMap<DiskName, Held>,
    disk: &DiskName,
    lease: &str,
) -> Result<&'a mut Held, ApiError> {
    match held.get_mut(disk) {
        Some(h) if h.lease == lease => Ok(h),
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no lease {lease} on disk {disk} (it lapsed or was released)"),
        )),
    }
}

async fn renew(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path((disk, lease)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let disk = t.internal(&parse_disk(&disk)?)?;
    let mut held = locks(&s);
    find_lease(&mut held, &disk, &lease)?.until = Instant::now() + LEASE;
    Ok(StatusCode::NO_CONTENT)
}

async fn unlock(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path((disk, lease)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let disk = t.internal(&parse_disk(&disk)?)?;
    let mut held = locks(&s);
    find_lease(&mut held, &disk, &lease)?;
    held.remove(&disk);
    Ok(StatusCode::NO_CONTENT)
}

async fn usage(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
) -> Result<Json<Usage>, ApiError> {
    let n = blocking(move || {
        if !s.filtering(&t) {
            return s.store.usage().map_err(ApiError::from);
        }
        // The whole store's size is other tenants' business: a tenant
        // sees what its own snapshots added.
        let (all, _) = s.store.list(None).map_err(ApiError::from)?;
        Ok(all
            .iter()
            .filter(|m| tenants::owner_of(&m.disk) == t.name)
            .map(|m| m.stats.bytes_stored)
            .sum())
    })
    .await?;
    Ok(Json(Usage { bytes: n }))
}

/// Chunks a client's verify found damaged: the server checks each copy
/// itself (a client cannot make it drop a good chunk) and sets aside the
/// damaged ones, so that the next upload stores a good copy.
async fn damaged(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    body: Bytes,
) -> Result<Json<crate::store_wire::Forgotten>, ApiError> {
    let digests = decode_digests(&body, 0, MAX_QUERY).map_err(bad)?;
    blocking(move || {
        let known = s.knows(&t, &digests)?;
        let mine: Vec<ChunkDigest> = digests
            .iter()
            .zip(known)
            .filter(|(_, k)| *k)
            .map(|(d, _)| *d)
            .collect();
        let n = s.store.forget_damaged(&mine).map_err(ApiError::from)?;
        Ok(Json(crate::store_wire::Forgotten { forgotten: n }))
    })
    .await
}
