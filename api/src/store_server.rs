//! The store server's HTTP protocol (`novabackup store serve`): a local
//! store behind the remote protocol of DESIGN.md. The client asks which of a
//! batch of digests are missing, then uploads only those; the server checks
//! each upload against its digest before storing it, and accepts a
//! snapshot only when every index page and chunk it references is present.
//!
//! ```text
//! GET    /store/v1/health                      {"status": "ok", "format": 2, "sums_chunks": true,
//!                                               "commit_pages": true}
//! POST   /store/v1/missing                     N x 32-byte digests -> N bytes, 1 = missing
//! PUT    /store/v1/chunks/{digest}             a chunk file -> {"stored": bytes}
//! POST   /store/v1/chunks                      a batch of chunk files (see [`encode_batch`])
//!                                              -> {"stored": bytes, "chunks": n}
//! GET    /store/v1/chunks/{digest}             the chunk file
//! POST   /store/v1/fetch                       N x 32-byte digests -> a batch of the
//!                                              chunk files present (format of [`encode_batch`])
//! POST   /store/v1/sync                        make every uploaded chunk durable
//! POST   /store/v1/snapshots                   commit a manifest (JSON as stored)
//! POST   /store/v1/commit                      commit a manifest with its new index pages
//!                                              (see [`encode_commit`])
//! GET    /store/v1/snapshots[?disk=]           {"snapshots": [...], "damaged": [...]}
//! GET    /store/v1/snapshots/{id}              one manifest
//! DELETE /store/v1/snapshots/{id}
//! PATCH  /store/v1/snapshots/{id}              set protection/verification (JSON Annotation)
//! POST   /store/v1/gc[?min_garbage_percent=N] garbage collection -> GcReport
//! POST   /store/v1/locks/{disk}[?base=ID]      take the disk's backup lock -> {"lease": ...}
//!                                              (404 if the base snapshot is gone)
//! POST   /store/v1/locks/{disk}/{lease}        renew it
//! DELETE /store/v1/locks/{disk}/{lease}        release it
//! GET    /store/v1/usage                       {"bytes": n}
//! ```
//!
//! Binary bodies (digests, chunk files) travel as `application/octet-stream`;
//! everything else is JSON, and every error the usual JSON error body. A
//! lock is a lease: a client that dies stops renewing it and it lapses
//! after [`LEASE`], so a killed agent never blocks a disk for good.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{middleware, Json, Router};
use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::chunk;
use novabackup_engine::format::index;
use novabackup_engine::format::manifest::{Annotation, Manifest};
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::store::local::LocalStore;
use novabackup_engine::store::{DiskLock, GcOptions, GcReport, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};

/// How long a lock lives without renewal.
pub const LEASE: Duration = Duration::from_secs(60);
/// Most digests one `missing` query may carry.
pub const MAX_QUERY: usize = 1 << 16;
/// Largest accepted request body: one chunk at the largest plain size, plus
/// slack for an upload batch that it ends.
const MAX_BODY: usize = chunk::MAX_PLAIN + (2 << 20);

/// Answer of `POST /store/v1/locks/{disk}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    /// Pass it to renew or release.
    pub lease: String,
    /// Seconds the lease lasts without renewal.
    pub ttl_s: u64,
}

/// Answer of `GET /store/v1/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotList {
    /// Manifests, oldest first.
    pub snapshots: Vec<Manifest>,
    /// Manifests that could not be read, with why.
    pub damaged: Vec<String>,
}

struct Held {
    lease: String,
    until: Instant,
    _guard: Box<dyn DiskLock>,
}

struct Served {
    store: LocalStore,
    locks: Mutex<HashMap<DiskName, Held>>,
    /// Per disk, the index of the last snapshot committed (see [`Checked`]).
    checked: Mutex<HashMap<DiskName, Checked>>,
}

fn lock_checked(s: &Served) -> std::sync::MutexGuard<'_, HashMap<DiskName, Checked>> {
    s.checked.lock().unwrap_or_else(|p| p.into_inner())
}

type Shared = Arc<Served>;

/// The router of a store server over the store at `store`, guarded by `token`.
pub fn router(store: LocalStore, token: String) -> Router {
    let state: Shared = Arc::new(Served {
        store,
        locks: Mutex::new(HashMap::new()),
        checked: Mutex::new(HashMap::new()),
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
            get(|| async {
                Json(serde_json::json!({"status": "ok", "format": 2, "sums_chunks": true, "commit_pages": true}))
            }),
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

/// Maps store errors to the JSON error body.
fn store_error(e: StoreError) -> ApiError {
    let code = match &e {
        StoreError::MissingChunk(_) | StoreError::NoSnapshot(_) => ErrorCode::NotFound,
        StoreError::Exists(_) | StoreError::Locked(_) | StoreError::Gc(_) => ErrorCode::Conflict,
        StoreError::Full { .. } => ErrorCode::InsufficientStorage,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
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

/// A body of 32-byte digests, between `min` and `max` of them.
fn digest_list(body: &[u8], min: usize, max: usize) -> Result<Vec<ChunkDigest>, ApiError> {
    let n = body.len() / 32;
    if !body.len().is_multiple_of(32) || n < min || n > max {
        return Err(bad(format!(
            "the body must be {min} to {max} whole 32-byte digests; got {} bytes",
            body.len()
        )));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| ChunkDigest(c.try_into().expect("32 bytes")))
        .collect())
}

/// Most digests of a question answered on the network thread; a larger
/// one (up to [`MAX_QUERY`], a few milliseconds of lookups) goes to a
/// blocking thread rather than hold up the connections that thread serves.
/// A backup's questions name 16 to a few hundred chunks.
const ANSWER_NOW_MAX: usize = 4096;

async fn missing(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let digests = digest_list(&body, 0, MAX_QUERY)?;
    // Answered here when no lock is taken: a hand-over to a blocking
    // thread and back, with the server's core busy checking uploads, kept
    // a backup's worker waiting for answers (see `LocalStore::missing_now`).
    let now = (digests.len() <= ANSWER_NOW_MAX)
        .then(|| s.store.missing_now(&digests))
        .flatten();
    let m = match now {
        Some(m) => m,
        None => blocking(move || s.store.missing(&digests).map_err(store_error)).await?,
    };
    let out: Vec<u8> = m.into_iter().map(u8::from).collect();
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// Checks chunk files against their digests before anything is written:
/// a tampered or damaged upload never enters the store. The first bad one
/// is the error. The zero checksums agents leave to the server (see
/// `Store::sums_chunks`) are filled in.
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
) -> Result<Json<serde_json::Value>, ApiError> {
    let d = parse_digest(&digest)?;
    blocking(move || {
        let mut body = owned(body);
        check_uploads(&mut [(&mut body[..], d)])?;
        let n = s.store.put_chunk(&d, &body).map_err(store_error)?;
        Ok(Json(serde_json::json!({ "stored": n })))
    })
    .await
}

/// Most bytes of chunk files a client puts in one batch (a single larger
/// chunk travels alone). One request per ~16 chunks instead of one per
/// chunk: the per-request work of both sides (HTTP, TLS records, routing,
/// a blocking task) cost about as much CPU as hashing the data.
pub const BATCH_BYTES: usize = 1 << 20;

/// Bytes of a record's head in a batch: the digest and the file's length.
pub const RECORD_HEAD: usize = 32 + 4;

/// Encodes chunk files as an upload batch: for each, its 32-byte digest,
/// its length (u32, little endian) and the file.
pub fn encode_batch<'a>(chunks: impl IntoIterator<Item = (&'a ChunkDigest, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (d, file) in chunks {
        out.extend_from_slice(&record_head(d, file.len()));
        out.extend_from_slice(file);
    }
    out
}

/// The head of the record of a `len`-byte file in an upload batch. A
/// client that sends a batch straight from its chunk files writes, for
/// each, this and then the file.
pub fn record_head(d: &ChunkDigest, len: usize) -> [u8; RECORD_HEAD] {
    let mut head = [0u8; RECORD_HEAD];
    head[..32].copy_from_slice(&d.0);
    head[32..].copy_from_slice(&(len as u32).to_le_bytes());
    head
}

/// Splits an upload batch into (digest, file) records; any malformed
/// body is an error, never a panic.
pub fn decode_batch(body: &[u8]) -> Result<Vec<(ChunkDigest, &[u8])>, String> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < RECORD_HEAD {
            return Err(format!(
                "record {} is cut short: {} bytes left, a record head is {RECORD_HEAD}",
                out.len(),
                rest.len()
            ));
        }
        let d = ChunkDigest(rest[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(rest[32..RECORD_HEAD].try_into().expect("4 bytes")) as usize;
        let Some(file) = rest.get(RECORD_HEAD..RECORD_HEAD + len) else {
            return Err(format!(
                "record {} ({d}) says {len} bytes but only {} follow",
                out.len(),
                rest.len() - RECORD_HEAD
            ));
        };
        out.push((d, file));
        rest = &rest[RECORD_HEAD + len..];
    }
    if out.is_empty() {
        return Err("an empty batch".into());
    }
    Ok(out)
}

/// An upload the server may change (the chunk sums it fills in): the
/// collected body itself unless it is shared, which it usually is not.
fn owned(body: Bytes) -> bytes::BytesMut {
    body.try_into_mut()
        .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]))
}

/// The digest and the byte range of each chunk file of an upload batch.
fn record_spans(body: &[u8]) -> Result<Vec<(ChunkDigest, std::ops::Range<usize>)>, String> {
    let base = body.as_ptr() as usize;
    Ok(decode_batch(body)?
        .iter()
        .map(|(d, f)| {
            let at = f.as_ptr() as usize - base;
            (*d, at..at + f.len())
        })
        .collect())
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
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let mut body = owned(body);
        let spans = record_spans(&body).map_err(|e| bad(format!("bad upload batch: {e}")))?;
        check_uploads(&mut split_spans(&mut body, &spans))?;
        let mut stored = 0;
        for (d, span) in &spans {
            stored += s
                .store
                .put_chunk(d, &body[span.clone()])
                .map_err(store_error)?;
        }
        Ok(Json(
            serde_json::json!({ "stored": stored, "chunks": spans.len() }),
        ))
    })
    .await
}

async fn get_chunk(
    State(s): State<Shared>,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let d = parse_digest(&digest)?;
    let bytes = blocking(move || s.store.get_chunk(&d).map_err(store_error)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Most digests one fetch may ask for (about 16 MiB of 64 KiB chunks).
pub const MAX_FETCH: usize = 256;

/// Many chunk files in one answer (a restore's batch): the ones the store
/// lacks are left out, so the client can name them with single requests.
async fn fetch(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let digests = digest_list(&body, 1, MAX_FETCH)?;
    let out = blocking(move || {
        let mut files = Vec::with_capacity(digests.len());
        for d in &digests {
            match s.store.get_chunk(d) {
                Ok(f) => files.push((d, f)),
                Err(StoreError::MissingChunk(_)) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(encode_batch(files.iter().map(|(d, f)| (*d, f.as_slice()))))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

async fn sync(State(s): State<Shared>) -> Result<StatusCode, ApiError> {
    blocking(move || s.store.sync().map_err(store_error)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn commit(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let m = Manifest::decode(&body).map_err(|e| bad(format!("bad manifest: {e}")))?;
    blocking(move || commit_checked(&s, m, &HashMap::new())).await
}

/// A commit that carries the snapshot's new index pages (see
/// [`encode_commit`]): the pages are checked like uploads and stored,
/// then the snapshot is checked with them in hand, where a commit alone
/// reads every changed page back from the store (2-3 ms of a 1% backup
/// of the shared corpus, its 16 pages).
async fn commit_with_pages(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    blocking(move || {
        let mut body = owned(body);
        let (m, at) = split_commit(&body)?;
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
                .map_err(store_error)?;
        }
        commit_checked(&s, m, &given)
    })
    .await
}

/// Encodes a commit with index pages: the manifest's length (u32, little
/// endian), the manifest, then the pages' files as an upload batch.
pub fn encode_commit<'a>(
    manifest: &[u8],
    pages: impl IntoIterator<Item = (&'a ChunkDigest, &'a [u8])>,
) -> Vec<u8> {
    let mut out = (manifest.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(manifest);
    out.extend_from_slice(&encode_batch(pages));
    out
}

/// The manifest of a commit with pages, and where its pages begin.
fn split_commit(body: &[u8]) -> Result<(Manifest, usize), ApiError> {
    let len = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| bad("a commit with pages starts with its manifest's length"))?;
    let m = body.get(4..4 + len).ok_or_else(|| {
        bad(format!(
            "the manifest's length says {len} bytes, fewer follow"
        ))
    })?;
    let m = Manifest::decode(m).map_err(|e| bad(format!("bad manifest: {e}")))?;
    Ok((m, 4 + len))
}

/// Commits `m` once everything it names is present; `given` holds the
/// plain bytes of index pages the request brought.
fn commit_checked(
    s: &Served,
    m: Manifest,
    given: &HashMap<ChunkDigest, Vec<u8>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let collections = s.store.collections();
    // Taken out while this commit checks: a concurrent commit of the
    // same disk (which its lock forbids) would only check in full.
    let prior = lock_checked(s).remove(&m.disk);
    let digests = complete(&s.store, &m, prior.as_ref(), given)?;
    let checked = started.elapsed();
    // Commit syncs the chunks first (the `Store` contract).
    s.store.commit(&m).map_err(store_error)?;
    tracing::debug!(snapshot = %m.id, incremental = prior.is_some(), pages_given = given.len(), ?checked, total = ?started.elapsed(), "commit");
    if m.chunks() <= CHECKED_MAX && s.store.collections() == collections {
        let mut c = lock_checked(s);
        if c.len() >= CHECKED_DISKS {
            c.clear();
        }
        c.insert(
            m.disk.clone(),
            Checked {
                id: m.id.clone(),
                collections,
                chunks: m.chunks(),
                pages: m.pages.clone(),
                digests,
            },
        );
    }
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"snapshot": m.id})),
    )
        .into_response())
}

/// The index of the snapshot a store server last accepted for a disk,
/// decoded: the next snapshot of that disk, built on it, is checked only
/// where it differs.
struct Checked {
    id: SnapshotId,
    /// [`LocalStore::collections`] when the check began and ended.
    collections: u64,
    chunks: u64,
    pages: Vec<ChunkDigest>,
    digests: Vec<Vec<ChunkDigest>>,
}

/// Most digests a store server keeps decoded for one disk's last snapshot
/// (16 MiB of them: a 32 GiB disk at 64 KiB chunks). A bigger disk's
/// snapshots are checked whole.
const CHECKED_MAX: u64 = 1 << 19;
/// Most disks whose last snapshot a store server keeps decoded.
const CHECKED_DISKS: usize = 16;

/// Fails unless every page and chunk of `m` is in the store; returns `m`'s
/// decoded index. With `prior`, the parent's index as an earlier call
/// returned it and no garbage collection since, only the pages and chunks
/// that differ from the parent's are looked up: the rest were present
/// then, and only a collection removes chunks.
fn complete(
    store: &LocalStore,
    m: &Manifest,
    prior: Option<&Checked>,
    given: &HashMap<ChunkDigest, Vec<u8>>,
) -> Result<Vec<Vec<ChunkDigest>>, ApiError> {
    let unprocessable = |msg: String| ApiError::new(ErrorCode::Unprocessable, msg);
    if m.pages.len() as u64 != index::page_count(m.chunks()) {
        return Err(bad(format!(
            "manifest {} lists {} index pages for {} chunks",
            m.id,
            m.pages.len(),
            m.chunks()
        )));
    }
    let prior = prior.filter(|c| {
        m.parent.as_ref() == Some(&c.id)
            && c.chunks == m.chunks()
            && c.collections % 2 == 0
            && c.collections == store.collections()
    });
    let lacks = store.missing(&m.pages).map_err(store_error)?;
    if let Some(i) = lacks.iter().position(|l| *l) {
        return Err(unprocessable(format!(
            "snapshot {} refused: index page {} is not in the store; upload it first",
            m.id, m.pages[i]
        )));
    }
    let mut out: Vec<Vec<ChunkDigest>> = Vec::with_capacity(m.pages.len());
    let mut seen: HashMap<ChunkDigest, usize> = HashMap::new();
    for (p, d) in m.pages.iter().enumerate() {
        let before = prior.map(|c| (&c.pages[p], &c.digests[p]));
        if let Some((_, digests)) = before.filter(|(pd, _)| *pd == d) {
            out.push(digests.clone());
            continue;
        }
        if let Some(&q) = seen.get(d) {
            out.push(out[q].clone());
            continue;
        }
        seen.insert(*d, p);
        let read;
        let bytes = match given.get(d) {
            Some(plain) => plain,
            None => {
                let file = store.get_chunk(d).map_err(store_error)?;
                // Not hashed again: its digest was checked when it entered
                // the store (an upload, or a backup that hashed it), and
                // the file's checksum catches damage since. Hashing the
                // pages again was half of a 1% backup's check (4.2 ms
                // against 2.4 ms).
                read = chunk::decode(&file)
                    .map_err(|e| unprocessable(format!("index page {d} is damaged: {e}")))?;
                &read
            }
        };
        let digests = index::decode_page(bytes, index::page_len(m.chunks(), p as u64))
            .map_err(|e| unprocessable(format!("index page {d}: {e}")))?;
        let wanted: Vec<ChunkDigest> = match before {
            Some((_, old)) if old.len() == digests.len() => digests
                .iter()
                .zip(old)
                .filter(|(new, old)| !new.is_zero() && new != old)
                .map(|(new, _)| *new)
                .collect(),
            _ => digests.iter().filter(|d| !d.is_zero()).copied().collect(),
        };
        let lacks = store.missing(&wanted).map_err(store_error)?;
        if let Some(i) = lacks.iter().position(|l| *l) {
            return Err(unprocessable(format!(
                "snapshot {} refused: chunk {} is not in the store; upload it first",
                m.id, wanted[i]
            )));
        }
        out.push(digests);
    }
    Ok(out)
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
        let (snapshots, bad) = s.store.list(disk.as_ref()).map_err(store_error)?;
        Ok(Json(SnapshotList {
            snapshots,
            damaged: bad.iter().map(|e| e.to_string()).collect(),
        }))
    })
    .await
}

async fn manifest(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let m = blocking(move || s.store.manifest(&id).map_err(store_error)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], m.encode()).into_response())
}

async fn delete(State(s): State<Shared>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    blocking(move || s.store.delete(&id).map_err(store_error)).await?;
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
    let m = blocking(move || s.store.annotate(&id, &a).map_err(store_error)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], m.encode()).into_response())
}

async fn gc(
    State(s): State<Shared>,
    q: Result<Query<GcOptions>, QueryRejection>,
) -> Result<Json<GcReport>, ApiError> {
    let Query(opts) = q.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    if opts.min_garbage_percent > 100 {
        return Err(bad("min_garbage_percent is a percentage (0-100)"));
    }
    blocking(move || {
        s.store
            .gc(&opts, &novabackup_engine::progress::Progress::default())
            .map_err(store_error)
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
            .map_err(store_error)?;
        let mut held = locks(&s);
        if held.get(&disk).is_some_and(|h| h.until < Instant::now()) {
            tracing::warn!(%disk, "a backup lock lapsed (its client stopped renewing it)");
            held.remove(&disk);
        }
        if held.contains_key(&disk) {
            return Err(store_error(StoreError::Locked(disk)));
        }
        let guard = s.store.lock(&disk, base.as_ref()).map_err(store_error)?;
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

async fn usage(State(s): State<Shared>) -> Result<Json<serde_json::Value>, ApiError> {
    let n = blocking(move || s.store.usage().map_err(store_error)).await?;
    Ok(Json(serde_json::json!({ "bytes": n })))
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let a = ChunkDigest::of(b"a");
        let b = ChunkDigest::of(b"b");
        let body = encode_batch([(&a, &b"first"[..]), (&b, &b""[..])]);
        let got = decode_batch(&body).unwrap();
        assert_eq!(got, vec![(a, &b"first"[..]), (b, &b""[..])]);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = decode_batch(&body);
        }
    }
}
