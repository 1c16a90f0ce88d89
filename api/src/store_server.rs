//! The store server (`novabackup store serve`): a local store behind the
//! protocol of [`crate::store_wire`]. Handlers decode the request, call the
//! store or the engine's [`Acceptor`] on a blocking thread, and encode the
//! answer; what a snapshot must satisfy to be accepted is the engine's
//! (`novabackup_engine::ops::accept`). A lock is a lease: a client that
//! dies stops renewing it and it lapses after [`LEASE`], so a killed agent
//! never blocks a disk for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{middleware, Json, Router};
use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::chunk;
use novabackup_engine::format::manifest::{Annotation, Manifest};
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::ops::accept::Acceptor;
use novabackup_engine::store::local::LocalStore;
use novabackup_engine::store::{DiskLock, GcOptions, GcReport, Store, StoreError};
use serde::Deserialize;

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

struct Served {
    store: LocalStore,
    locks: Mutex<HashMap<DiskName, Held>>,
    /// Checks and commits snapshots.
    acceptor: Acceptor,
}

type Shared = Arc<Served>;

/// The router of a store server over the store at `store`, guarded by `token`.
pub fn router(store: LocalStore, token: String) -> Router {
    let state: Shared = Arc::new(Served {
        store,
        locks: Mutex::new(HashMap::new()),
        acceptor: Acceptor::default(),
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
        .route_layer(middleware::from_fn_with_state(
            Arc::new(token),
            crate::auth::require_token,
        ))
        .with_state(state);
    Router::new()
        .route(
            "/store/v1/health",
            get(|| async { Json(Health::current()) }),
        )
        .merge(protected)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such store endpoint; see /store/v1/health",
            )
        })
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

async fn missing(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let digests = decode_digests(&body, 0, MAX_QUERY).map_err(bad)?;
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
    Path(digest): Path<String>,
    body: Bytes,
) -> Result<Json<Stored>, ApiError> {
    let d = parse_digest(&digest)?;
    blocking(move || {
        let mut body = owned(body);
        check_uploads(&mut [(&mut body[..], d)])?;
        let n = s.store.put_chunk(&d, &body).map_err(ApiError::from)?;
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
async fn put_chunks(State(s): State<Shared>, body: Bytes) -> Result<Json<Stored>, ApiError> {
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
        Ok(Json(Stored {
            stored,
            chunks: Some(spans.len()),
        }))
    })
    .await
}

async fn get_chunk(
    State(s): State<Shared>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let d = parse_digest(&digest)?;
    let bytes = blocking(move || s.store.get_chunk(&d).map_err(ApiError::from)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Many chunk files in one answer (a restore's batch): the ones the store
/// lacks are left out, so the client can name them with single requests.
async fn fetch(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let digests = decode_digests(&body, 1, MAX_FETCH).map_err(bad)?;
    let out = blocking(move || {
        let mut files = Vec::with_capacity(digests.len());
        for d in &digests {
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

async fn commit(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let m = Manifest::decode(&body).map_err(|e| bad(format!("bad manifest: {e}")))?;
    blocking(move || commit_checked(&s, m, &HashMap::new())).await
}

/// A commit that carries the snapshot's new index pages (see
/// [`encode_commit`]): the pages are checked like uploads and stored,
/// then the snapshot is checked with them in hand, where a commit alone
/// reads every changed page back from the store.
async fn commit_with_pages(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
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
        commit_checked(&s, m, &given)
    })
    .await
}

/// Commits `m` once everything it names is present; `given` holds the
/// plain bytes of index pages the request brought.
fn commit_checked(
    s: &Served,
    m: Manifest,
    given: &HashMap<ChunkDigest, Vec<u8>>,
) -> Result<Response, ApiError> {
    s.acceptor.accept(&s.store, &m, given)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"snapshot": m.id})),
    )
        .into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    disk: Option<String>,
}

async fn list(
    State(s): State<Shared>,
    Query(q): Query<ListQuery>,
) -> Result<Json<SnapshotList>, ApiError> {
    let disk = q.disk.as_deref().map(parse_disk).transpose()?;
    blocking(move || {
        let (snapshots, bad) = s.store.list(disk.as_ref()).map_err(ApiError::from)?;
        Ok(Json(SnapshotList {
            snapshots,
            damaged: bad.iter().map(|e| e.to_string()).collect(),
        }))
    })
    .await
}

async fn manifest(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let m = blocking(move || s.store.manifest(&id).map_err(ApiError::from)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], m.encode()).into_response())
}

async fn delete(State(s): State<Shared>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    blocking(move || s.store.delete(&id).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn annotate(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let a: Annotation =
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad annotation: {e}")))?;
    let m = blocking(move || s.store.annotate(&id, &a).map_err(ApiError::from)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], m.encode()).into_response())
}

async fn gc(
    State(s): State<Shared>,
    q: Result<Query<GcOptions>, QueryRejection>,
) -> Result<Json<GcReport>, ApiError> {
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
    Path(disk): Path<String>,
    q: Result<Query<LockQuery>, QueryRejection>,
) -> Result<Json<Lease>, ApiError> {
    let disk = parse_disk(&disk)?;
    let Query(q) = q.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    let base = q.base.as_deref().map(parse_id).transpose()?;
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
    Path((disk, lease)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let disk = parse_disk(&disk)?;
    let mut held = locks(&s);
    find_lease(&mut held, &disk, &lease)?.until = Instant::now() + LEASE;
    Ok(StatusCode::NO_CONTENT)
}

async fn unlock(
    State(s): State<Shared>,
    Path((disk, lease)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let disk = parse_disk(&disk)?;
    let mut held = locks(&s);
    find_lease(&mut held, &disk, &lease)?;
    held.remove(&disk);
    Ok(StatusCode::NO_CONTENT)
}

async fn usage(State(s): State<Shared>) -> Result<Json<Usage>, ApiError> {
    let n = blocking(move || s.store.usage().map_err(ApiError::from)).await?;
    Ok(Json(Usage { bytes: n }))
}
