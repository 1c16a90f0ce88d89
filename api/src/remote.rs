//! [`RemoteStore`]: the [`Store`] of a store server (`novabackup store
//! serve`), spoken over the protocol in [`crate::store_wire`].
//!
//! Uploads run on a pool of threads so that several are in flight while
//! the backup's workers go on hashing and compressing, each request a
//! batch of about a megabyte of chunks, sent on a connection of the
//! thread's own ([`upload`]): `put_chunk` queues and returns, `sync` waits
//! for the queue to drain and fails if any upload failed. A chunk queued
//! for upload counts as present (like a staged chunk in a local store), so
//! one backup never sends the same chunk twice.
//!
//! A backup's index pages are held back instead ([`FastPaths::put_index_page`])
//! and go inside its commit request (`POST /store/v1/commit`), when the
//! server's health says it takes them: the commit is then one round trip,
//! and the server checks the snapshot with the pages in hand.
//!
//! A failed upload is reported to the next `put_chunk` or `sync`, which
//! fails that backup; the chunk is not marked present, so a later backup
//! sends it again. Failures left over when the next backup takes its lock
//! belonged to a backup that already failed and are dropped. Should a
//! failure reach a different backup than the one that lost the chunk, the
//! server still refuses any snapshot whose chunks it does not hold: a
//! manifest never names a lost chunk.

mod upload;

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use novabackup_engine::bufpool;
use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::chunk;
use novabackup_engine::format::manifest::{Annotation, Manifest};
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::progress::Progress;
use novabackup_engine::store::chunkcache::ChunkCache;
use novabackup_engine::store::{DiskLock, FastPaths, GcOptions, GcReport, Store, StoreError};

use crate::error::ErrorBody;
use crate::store_wire::{decode_batch, Lease, SnapshotList, BATCH_BYTES, MAX_FETCH};
use upload::{UploadError, Uploader};

/// Upload requests in flight at most.
const UPLOADERS: usize = 4;
/// Full batches queued for upload at most (about 8 MiB): enough for every
/// uploader to have the next batch ready while the others are on the wire.
const QUEUED: usize = 8;

/// Chunks on their way to an uploader, a batch at a time.
type Batch = Vec<(ChunkDigest, Upload)>;

/// A chunk file to upload.
pub(crate) enum Upload {
    /// A whole file, made by the encoder.
    File(Vec<u8>),
    /// A raw chunk's header and its plain bytes (a read buffer), sent one
    /// after the other: no copy into one file.
    Raw([u8; chunk::HEADER_LEN], Vec<u8>),
}

impl Upload {
    /// The file's bytes, in (at most) two parts.
    pub(crate) fn parts(&self) -> [&[u8]; 2] {
        match self {
            Upload::File(f) => [f, &[]],
            Upload::Raw(head, plain) => [head, plain],
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    /// Gives the buffer back to the pool it came from.
    fn recycle(self) {
        match self {
            Upload::File(f) => bufpool::FILES.give(f),
            Upload::Raw(_, plain) => bufpool::READS.give(plain),
        }
    }
}

#[derive(Default)]
struct Pending {
    /// Put and not yet uploaded: in `filling` or with an uploader.
    queued: HashSet<ChunkDigest>,
    /// The batch being filled by `put_chunk_owned`. Handing each chunk to
    /// an uploader on its own woke a thread per chunk; a batch wakes one
    /// per megabyte.
    filling: Batch,
    filling_bytes: usize,
    /// Uploaded since the last backup started (a repeated put is a no-op).
    uploaded: HashSet<ChunkDigest>,
    failed: Option<String>,
}

struct Inner {
    base: String,
    /// The server sums chunk files itself (`sums_chunks` in its health).
    sums: std::sync::atomic::AtomicBool,
    token: String,
    http: ureq::Agent,
    pending: Mutex<Pending>,
    drained: Condvar,
}

/// Most bytes of prefetched chunk files held for `get_chunk`; past it
/// the cache is emptied (a restore that stopped leaves no lasting garbage).
const PREFETCH_LIMIT: usize = 64 << 20;

/// Download requests of prefetched batches in flight at most.
const FETCHERS: usize = 2;

/// Most bytes of index pages held back for the commits that name them;
/// past it, pages are uploaded like chunks. A 1% backup of a 64 GiB disk
/// at 64 KiB chunks changes about 256 pages; of the shared corpus, 16.
const PAGES_HELD: usize = 16 << 20;

/// Index pages held back for a commit (see [`FastPaths::put_index_page`]).
#[derive(Default)]
struct HeldPages {
    pages: Vec<(ChunkDigest, Vec<u8>)>,
    bytes: usize,
}

/// A store server's store (module doc).
pub struct RemoteStore {
    inner: Arc<Inner>,
    /// The server takes index pages inside the commit request.
    commit_pages: bool,
    held: Mutex<HeldPages>,
    cache: Arc<ChunkCache>,
    uploads: Option<crossbeam_channel::Sender<Batch>>,
    fetches: Option<crossbeam_channel::Sender<Vec<ChunkDigest>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    releases: Releases,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("base", &self.inner.base)
            .finish()
    }
}

impl RemoteStore {
    /// A client of the store server at `base` (`http://host:port`), checked
    /// with one health request so a wrong address fails at start, not at
    /// the first backup.
    pub fn connect(base: &str, token: &str) -> Result<RemoteStore, StoreError> {
        Self::connect_pinned(base, token, None)
    }

    /// Like [`RemoteStore::connect`], pinning an `https://` server's
    /// certificate by `fingerprint` (`sha256:...`).
    pub fn connect_pinned(
        base: &str,
        token: &str,
        fingerprint: Option<&str>,
    ) -> Result<RemoteStore, StoreError> {
        let mut b = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(300))
            .max_idle_connections_per_host(UPLOADERS * 2);
        let remote = |why: String| StoreError::Remote {
            url: base.into(),
            why,
        };
        let tls = match fingerprint {
            Some(fp) => Some(crate::tls::pinned_client(fp).map_err(|e| remote(e.to_string()))?),
            None => None,
        };
        if let Some(config) = &tls {
            b = b.tls_connector(Arc::new(crate::tls::BufferedConnector(config.clone())));
        }
        // Without a pin, an https server is checked against the public
        // CAs, by ureq for the other requests and here for the uploads.
        let tls = match tls {
            None if base.starts_with("https://") => {
                Some(crate::tls::ca_client().map_err(|e| remote(e.to_string()))?)
            }
            t => t,
        };
        let uploaders = (0..UPLOADERS)
            .map(|_| Uploader::new(base, token, tls.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(remote)?;
        let http = b.build();
        let inner = Arc::new(Inner {
            base: base.trim_end_matches('/').to_string(),
            sums: Default::default(),
            token: token.to_string(),
            http,
            pending: Mutex::new(Pending::default()),
            drained: Condvar::new(),
        });
        let (tx, rx) = crossbeam_channel::bounded::<Batch>(QUEUED);
        let mut threads: Vec<std::thread::JoinHandle<()>> = uploaders
            .into_iter()
            .map(|mut up| {
                let (inner, rx) = (inner.clone(), rx.clone());
                std::thread::spawn(move || {
                    for batch in rx {
                        let failed = match inner.send_batch(&mut up, &batch) {
                            Ok(()) => None,
                            Err(e) => Some(match e {
                                StoreError::Remote { why, .. } => why,
                                other => other.to_string(),
                            }),
                        };
                        inner.settle(&batch, failed);
                        // The encoder and the reader make the next chunk
                        // files in these.
                        for (_, file) in batch {
                            file.recycle();
                        }
                    }
                })
            })
            .collect();
        let cache = Arc::new(ChunkCache::new(PREFETCH_LIMIT));
        let (ftx, frx) = crossbeam_channel::unbounded::<Vec<ChunkDigest>>();
        threads.extend((0..FETCHERS).map(|_| {
            let (inner, cache, frx) = (inner.clone(), cache.clone(), frx.clone());
            std::thread::spawn(move || {
                for ask in frx {
                    let got = inner.fetch(&ask).unwrap_or_default();
                    cache.arrive(&ask, got);
                }
            })
        }));
        let mut s = RemoteStore {
            inner,
            commit_pages: false,
            held: Default::default(),
            cache,
            uploads: Some(tx),
            fetches: Some(ftx),
            threads,
            releases: Default::default(),
        };
        let h: crate::store_wire::Health = s
            .inner
            .send("GET", "/store/v1/health", None)
            .map_err(|e| s.inner.error(e))
            .and_then(|r| r.into_json().map_err(|e| s.inner.remote(e.to_string())))?;
        let ours = crate::store_wire::Health::current().format;
        if h.format != ours {
            return Err(s.inner.remote(format!(
                "the server speaks store format {}, this agent format {ours}; upgrade the older one",
                h.format
            )));
        }
        // An older server checks the sums it is sent; it gets them.
        let sums = h.sums_chunks;
        s.commit_pages = h.commit_pages;
        s.inner
            .sums
            .store(sums, std::sync::atomic::Ordering::Relaxed);
        Ok(s)
    }
}

impl Pending {
    /// The batch being filled, leaving an empty one.
    fn take_filling(&mut self) -> Batch {
        self.filling_bytes = 0;
        std::mem::take(&mut self.filling)
    }
}

impl RemoteStore {
    /// Queues `file` for upload (module doc); its length, or 0 when this
    /// client has it queued or uploaded already.
    fn queue(&self, digest: &ChunkDigest, file: Upload) -> Result<u64, StoreError> {
        let len = file.len();
        let full = {
            let mut p = self.inner.pending();
            if let Some(f) = p.failed.take() {
                drop(p);
                file.recycle();
                return Err(self.inner.remote(f));
            }
            if p.uploaded.contains(digest) || !p.queued.insert(*digest) {
                drop(p);
                file.recycle();
                return Ok(0);
            }
            p.filling_bytes += len;
            p.filling.push((*digest, file));
            (p.filling_bytes >= BATCH_BYTES).then(|| p.take_filling())
        };
        self.hand_over(full.unwrap_or_default())?;
        Ok(len as u64)
    }

    /// Takes the held index pages that `named` lists (all with `None`)
    /// and queues the others for upload: a concurrent backup's pages, or
    /// a failed backup's, are not held for good.
    fn take_held(
        &self,
        named: Option<&[ChunkDigest]>,
    ) -> Result<Vec<(ChunkDigest, Vec<u8>)>, StoreError> {
        let named: HashSet<&ChunkDigest> = named.into_iter().flatten().collect();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *held)
            .pages
            .into_iter()
            .partition(|(d, _)| named.contains(d));
        // Queued with the lock held: a commit that finds its pages gone
        // from here finds them queued, and waits for them.
        for (d, file) in others {
            self.queue(&d, Upload::File(file))?;
        }
        Ok(mine)
    }

    /// Hands the batch being filled to the uploaders.
    fn flush(&self) -> Result<(), StoreError> {
        let batch = self.inner.pending().take_filling();
        self.hand_over(batch)
    }

    fn hand_over(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // Never with the pending lock held: a full queue waits for an
        // uploader, which takes that lock when its batch is done.
        let Err(lost) = self.uploads.as_ref().expect("open until drop").send(batch) else {
            return Ok(());
        };
        // No thread will upload them: a wait for them must not hang.
        let why = "the upload threads stopped";
        self.inner.settle(&lost.0, Some(why.into()));
        Err(self.inner.remote(why.into()))
    }

    /// Waits until every chunk put so far is uploaded (or has failed).
    /// Chunks put meanwhile, by a backup of another disk, are not waited
    /// for: a commit never waits for a concurrent backup to end.
    fn drained(&self) -> Result<std::sync::MutexGuard<'_, Pending>, StoreError> {
        let (batch, mut waiting) = {
            let mut p = self.inner.pending();
            let waiting: Vec<ChunkDigest> = p.queued.iter().copied().collect();
            (p.take_filling(), waiting)
        };
        self.hand_over(batch)?;
        let mut p = self.inner.pending();
        loop {
            waiting.retain(|d| p.queued.contains(d));
            if waiting.is_empty() {
                return Ok(p);
            }
            p = self
                .inner
                .drained
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for the uploads and reports a failed one.
    fn uploaded(&self) -> Result<(), StoreError> {
        let mut p = self.drained()?;
        // The failure is reported once; the chunks it lost are not marked
        // present, so the next backup sends them again.
        match p.failed.take() {
            Some(f) => Err(self.inner.remote(f)),
            None => Ok(()),
        }
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        // The threads upload what was put before they end.
        let _ = self.take_held(None);
        let _ = self.flush();
        self.uploads.take();
        self.fetches.take();
        finish_releases(&self.releases);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// Ends the wait for `batch`: uploaded, or failed with `failed` (kept
    /// for the next put or sync to report; its chunks are not present).
    fn settle(&self, batch: &[(ChunkDigest, Upload)], failed: Option<String>) {
        let mut p = self.pending();
        for (d, _) in batch {
            p.queued.remove(d);
            if failed.is_none() {
                p.uploaded.insert(*d);
            }
        }
        if let Some(f) = failed {
            p.failed.get_or_insert(f);
        }
        drop(p);
        self.drained.notify_all();
    }

    /// One batched download; `None` when it failed (each chunk is then
    /// fetched, and its error reported, by `get_chunk`).
    fn fetch(&self, ask: &[ChunkDigest]) -> Option<Vec<(ChunkDigest, Vec<u8>)>> {
        let body = crate::store_wire::encode_digests(ask);
        let r = self.send("POST", "/store/v1/fetch", Some(&body)).ok()?;
        let limit = (ask.len() * (novabackup_engine::format::chunk::MAX_PLAIN + 64)) as u64;
        let answer = read_body(r, limit).ok()?;
        let records = decode_batch(&answer).ok()?;
        Some(records.into_iter().map(|(d, f)| (d, f.to_vec())).collect())
    }

    fn call(&self, method: &str, path: &str) -> ureq::Request {
        self.http
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    /// Sends a request; a transport failure is retried twice on a fresh
    /// connection (a pooled one may be stale after the server restarted;
    /// every request of this protocol may be repeated safely). The error
    /// is ureq's own, large but short-lived: it is mapped at once.
    #[allow(clippy::result_large_err)]
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ureq::Response, ureq::Error> {
        with_retries(
            |e| matches!(e, ureq::Error::Transport(_)),
            || {
                let req = self.call(method, path);
                match body {
                    Some(b) => req
                        .set("Content-Type", "application/octet-stream")
                        .send_bytes(b),
                    None => req.call(),
                }
            },
        )
    }

    /// Uploads a batch straight from its chunk files (see [`upload`]),
    /// retrying a transport failure as [`Inner::send`] does.
    fn send_batch(
        &self,
        up: &mut Uploader,
        batch: &[(ChunkDigest, Upload)],
    ) -> Result<(), StoreError> {
        let sent = with_retries(
            |e| matches!(e, UploadError::Transport(_)),
            || up.send(batch),
        );
        match sent {
            Ok(()) => Ok(()),
            Err(UploadError::Transport(e)) => Err(self.remote(e.to_string())),
            Err(UploadError::Status(status, body)) => {
                let msg = serde_json::from_slice::<ErrorBody>(&body)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "no error body".into());
                Err(self.status_error(status, msg))
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remote(&self, why: String) -> StoreError {
        StoreError::Remote {
            url: self.base.clone(),
            why,
        }
    }

    /// Turns an HTTP failure into a store error, keeping the server's message.
    fn error(&self, e: ureq::Error) -> StoreError {
        match e {
            ureq::Error::Status(status, resp) => {
                let msg = resp
                    .into_json::<ErrorBody>()
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "no error body".into());
                self.status_error(status, msg)
            }
            ureq::Error::Transport(t) => self.remote(t.to_string()),
        }
    }

    /// The store error for an HTTP error status and the server's message.
    fn status_error(&self, status: u16, msg: String) -> StoreError {
        if status == 507 {
            StoreError::Full {
                path: self.base.clone(),
                source: std::io::Error::other(msg),
            }
        } else {
            self.remote(format!("HTTP {status}: {msg}"))
        }
    }
}

/// Runs `attempt`, and again up to twice when it fails with an error
/// `transient` accepts, 50 ms and then 200 ms later.
fn with_retries<T, E>(
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut delay = Duration::from_millis(50);
    for _ in 0..2 {
        match attempt() {
            Err(e) if transient(&e) => {
                std::thread::sleep(delay);
                delay *= 4;
            }
            r => return r,
        }
    }
    attempt()
}

fn read_body(r: ureq::Response, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.into_reader().take(limit).read_to_end(&mut v)?;
    Ok(v)
}

/// Threads ending a lease: each sends its release, which a backup that
/// ends does not wait for (a round trip at the end of every backup); the
/// next lock, or the store's drop, does.
type Releases = Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>;

/// Waits for the releases under way.
fn finish_releases(releases: &Releases) {
    let pending = std::mem::take(&mut *releases.lock().unwrap_or_else(|p| p.into_inner()));
    for t in pending {
        let _ = t.join();
    }
}

struct RemoteLock {
    stop: Option<crossbeam_channel::Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
    releases: Releases,
}

impl DiskLock for RemoteLock {}

impl Drop for RemoteLock {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.renewer.take() {
            self.releases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t);
        }
    }
}

impl Store for RemoteStore {
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(crate::store_wire::MAX_QUERY) {
            let body = crate::store_wire::encode_digests(batch);
            let r = self
                .inner
                .send("POST", "/store/v1/missing", Some(&body))
                .map_err(|e| self.inner.error(e))?;
            let answer = read_body(r, batch.len() as u64 + 1)
                .map_err(|e| self.inner.remote(e.to_string()))?;
            if answer.len() != batch.len() {
                return Err(self.inner.remote(format!(
                    "asked about {} digests, got {} answers",
                    batch.len(),
                    answer.len()
                )));
            }
            // The server's answer may predate an upload of ours that has
            // finished since: queued or uploaded both count as present.
            let p = self.inner.pending();
            out.extend(
                batch
                    .iter()
                    .zip(answer)
                    .map(|(d, a)| a == 1 && !p.queued.contains(d) && !p.uploaded.contains(d)),
            );
        }
        Ok(out)
    }

    fn put_chunk(&self, digest: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError> {
        self.queue(digest, Upload::File(file.to_vec()))
    }

    fn get_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        if let Some(f) = self.cache.take(digest) {
            return Ok(f);
        }
        match self
            .inner
            .send("GET", &format!("/store/v1/chunks/{digest}"), None)
        {
            Ok(r) => read_body(r, novabackup_engine::format::chunk::MAX_PLAIN as u64 + 4096)
                .map_err(|e| self.inner.remote(e.to_string())),
            Err(ureq::Error::Status(404, _)) => Err(StoreError::MissingChunk(*digest)),
            Err(e) => Err(self.inner.error(e)),
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.take_held(None)?;
        self.uploaded()?;
        self.inner
            .send("POST", "/store/v1/sync", None)
            .map_err(|e| self.inner.error(e))?;
        Ok(())
    }

    fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
        let pages = self.take_held(Some(&m.pages))?;
        // The server syncs before it commits; no round trip of our own.
        self.uploaded()?;
        let manifest = m.encode();
        let sent = if pages.is_empty() {
            self.inner
                .send("POST", "/store/v1/snapshots", Some(&manifest))
        } else {
            let body =
                crate::store_wire::encode_commit(&manifest, pages.iter().map(|(d, f)| (d, &f[..])));
            for (_, f) in pages {
                bufpool::FILES.give(f);
            }
            self.inner.send("POST", "/store/v1/commit", Some(&body))
        };
        match sent {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(409, _)) => Err(StoreError::Exists(m.id.clone())),
            Err(e) => Err(self.inner.error(e)),
        }
    }

    fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        match self
            .inner
            .send("GET", &format!("/store/v1/snapshots/{id}"), None)
        {
            Ok(r) => {
                let bytes = read_body(r, 64 << 20).map_err(|e| self.inner.remote(e.to_string()))?;
                Manifest::decode(&bytes).map_err(|why| StoreError::BadManifest {
                    path: format!("{}/store/v1/snapshots/{id}", self.inner.base),
                    why,
                })
            }
            Err(ureq::Error::Status(404, _)) => Err(StoreError::NoSnapshot(id.clone())),
            Err(e) => Err(self.inner.error(e)),
        }
    }

    fn list(
        &self,
        disk: Option<&DiskName>,
    ) -> Result<(Vec<Manifest>, Vec<StoreError>), StoreError> {
        let mut req = self.inner.call("GET", "/store/v1/snapshots");
        if let Some(d) = disk {
            req = req.query("disk", d.as_str());
        }
        let l: SnapshotList = req
            .call()
            .map_err(|e| self.inner.error(e))?
            .into_json()
            .map_err(|e| self.inner.remote(e.to_string()))?;
        let damaged = l
            .damaged
            .into_iter()
            .map(|why| StoreError::BadManifest {
                path: self.inner.base.clone(),
                why,
            })
            .collect();
        Ok((l.snapshots, damaged))
    }

    fn delete(&self, id: &SnapshotId) -> Result<(), StoreError> {
        match self
            .inner
            .send("DELETE", &format!("/store/v1/snapshots/{id}"), None)
        {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(404, _)) => Err(StoreError::NoSnapshot(id.clone())),
            Err(e) => Err(self.inner.error(e)),
        }
    }

    fn annotate(&self, id: &SnapshotId, a: &Annotation) -> Result<Manifest, StoreError> {
        let body = serde_json::to_vec(a).expect("annotation serializes");
        let r = match self
            .inner
            .send("PATCH", &format!("/store/v1/snapshots/{id}"), Some(&body))
        {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Err(StoreError::NoSnapshot(id.clone())),
            Err(e) => return Err(self.inner.error(e)),
        };
        let mut bytes = Vec::new();
        r.into_reader()
            .read_to_end(&mut bytes)
            .map_err(|e| self.inner.remote(e.to_string()))?;
        Manifest::decode(&bytes).map_err(|why| StoreError::BadManifest {
            path: format!("{}/store/v1/snapshots/{id}", self.inner.base),
            why,
        })
    }

    fn gc(&self, opts: &GcOptions, _progress: &Progress) -> Result<GcReport, StoreError> {
        // What this client remembers uploading may be collected now (it
        // forgets it at every lock anyway, and chunks a locked backup
        // uploads are kept by the server).
        self.drained()?.uploaded.clear();
        // A collection of a big store takes long: no read timeout of its own.
        let r = self
            .inner
            .call(
                "POST",
                &format!(
                    "/store/v1/gc?min_garbage_percent={}",
                    opts.min_garbage_percent
                ),
            )
            .timeout(Duration::from_secs(7 * 24 * 3600))
            .call();
        match r {
            Ok(r) => r.into_json().map_err(|e| self.inner.remote(e.to_string())),
            Err(ureq::Error::Status(409, r)) => Err(StoreError::Gc(
                r.into_json::<ErrorBody>()
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "the store server refused".into()),
            )),
            Err(e) => Err(self.inner.error(e)),
        }
    }

    fn lock(
        &self,
        disk: &DiskName,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn DiskLock>, StoreError> {
        // A backup starts here: uploads left from one that failed finish
        // first, and their failures, which belonged to it, are dropped.
        {
            let mut p = self.drained()?;
            p.failed = None;
            p.uploaded.clear();
        }
        // The last backup's lease, of this disk maybe, is gone first.
        finish_releases(&self.releases);
        let lease: Lease = match self.inner.send(
            "POST",
            &match base {
                Some(b) => format!("/store/v1/locks/{disk}?base={}", b.id),
                None => format!("/store/v1/locks/{disk}"),
            },
            None,
        ) {
            Ok(r) => r
                .into_json()
                .map_err(|e| self.inner.remote(e.to_string()))?,
            Err(ureq::Error::Status(409, _)) => return Err(StoreError::Locked(disk.clone())),
            Err(ureq::Error::Status(404, _)) if base.is_some() => {
                return Err(StoreError::NoSnapshot(base.expect("some").id.clone()))
            }
            Err(e) => return Err(self.inner.error(e)),
        };
        // Renewed at a third of its life; released when the guard drops.
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let inner = self.inner.clone();
        let path = format!("/store/v1/locks/{disk}/{}", lease.lease);
        let every = Duration::from_secs(lease.ttl_s.max(3) / 3);
        let renewer = std::thread::spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if let Err(e) = inner.call("POST", &path).call() {
                        tracing::warn!(error = %inner.error(e), "could not renew a backup lock");
                    }
                }
                _ => {
                    let _ = inner.call("DELETE", &path).call();
                    return;
                }
            }
        });
        Ok(Box::new(RemoteLock {
            stop: Some(stop),
            renewer: Some(renewer),
            releases: self.releases.clone(),
        }))
    }

    fn describe(&self) -> String {
        self.inner.base.clone()
    }

    fn fast_paths(&self) -> Option<&dyn FastPaths> {
        Some(self)
    }

    fn forget_damaged(&self, digests: &[ChunkDigest]) -> Result<u64, StoreError> {
        let mut n = 0;
        for batch in digests.chunks(crate::store_wire::MAX_QUERY) {
            let body = crate::store_wire::encode_digests(batch);
            let f: crate::store_wire::Forgotten = self
                .inner
                .send("POST", "/store/v1/damaged", Some(&body))
                .map_err(|e| self.inner.error(e))?
                .into_json()
                .map_err(|e| self.inner.remote(e.to_string()))?;
            n += f.forgotten;
        }
        Ok(n)
    }

    fn usage(&self) -> Result<u64, StoreError> {
        let u: crate::store_wire::Usage = self
            .inner
            .send("GET", "/store/v1/usage", None)
            .map_err(|e| self.inner.error(e))?
            .into_json()
            .map_err(|e| self.inner.remote(e.to_string()))?;
        Ok(u.bytes)
    }
}

/// Every fast path: a store server is across a network, where each saves
/// a copy, a round trip or a pass over the data.
impl FastPaths for RemoteStore {
    fn store(&self) -> &dyn Store {
        self
    }

    fn put_chunk_owned(&self, digest: &ChunkDigest, file: Vec<u8>) -> Result<u64, StoreError> {
        self.queue(digest, Upload::File(file))
    }

    fn put_raw_chunk(
        &self,
        digest: &ChunkDigest,
        head: [u8; chunk::HEADER_LEN],
        plain: Vec<u8>,
    ) -> Result<u64, StoreError> {
        self.queue(digest, Upload::Raw(head, plain))
    }

    /// Held for the commit that names the page, up to [`PAGES_HELD`];
    /// uploaded like a chunk past that, or to a server that does not take
    /// pages with a commit.
    fn put_index_page(&self, digest: &ChunkDigest, file: Vec<u8>) -> Result<u64, StoreError> {
        let len = file.len();
        if self.commit_pages {
            let known = {
                let p = self.inner.pending();
                p.queued.contains(digest) || p.uploaded.contains(digest)
            };
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if known || held.pages.iter().any(|(d, _)| d == digest) {
                bufpool::FILES.give(file);
                return Ok(0);
            }
            if held.bytes + len <= PAGES_HELD {
                held.bytes += len;
                held.pages.push((*digest, file));
                return Ok(len as u64);
            }
        }
        self.queue(digest, Upload::File(file))
    }

    /// Queues the chunks for download in batches (one request per batch
    /// instead of one per chunk) by the fetcher threads, to be handed out
    /// by `get_chunk`; returns at once, so the network overlaps the
    /// caller's decoding. Errors are left for `get_chunk` to report,
    /// chunk by chunk.
    fn prefetch(&self, digests: &[ChunkDigest]) {
        let Some(fetches) = self.fetches.as_ref() else {
            return;
        };
        for ask in digests.chunks(MAX_FETCH) {
            let ask = self.cache.claim(ask);
            if !ask.is_empty() {
                if let Err(e) = fetches.send(ask) {
                    self.cache.arrive(&e.0, Vec::new());
                }
            }
        }
    }

    fn sums_chunks(&self) -> bool {
        self.inner.sums.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send_pending(&self) {
        // A failure is kept in `failed`; the commit's wait reports it.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests_support {
    /// A store server on a random loopback port, for the life of the runtime.
    pub fn serve(dir: &std::path::Path) -> (String, tokio::runtime::Runtime) {
        serve_on(dir, "127.0.0.1:0")
    }

    /// [`serve`] on a given address (a restarted server).
    pub fn serve_at(dir: &std::path::Path, addr: &str) -> tokio::runtime::Runtime {
        serve_on(dir, addr).1
    }

    fn serve_on(dir: &std::path::Path, addr: &str) -> (String, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = novabackup_engine::store::local::LocalStore::open(dir).unwrap();
        let l = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let app = crate::store_server::router(store, "secret".into());
        rt.spawn(async move { axum::serve(l, app).await });
        (url, rt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::tests_support::serve;
    use crate::store_wire::encode_batch;

    #[test]
    fn remote_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        novabackup_engine::store::conformance::run(&s);
    }

    #[test]
    fn a_wrong_token_or_address_fails_at_connect_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "wrong").unwrap();
        let e = s.usage().unwrap_err().to_string();
        assert!(e.contains("401") && e.contains("token"), "{e}");
        let e = RemoteStore::connect("http://127.0.0.1:1", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store server at http://127.0.0.1:1"), "{e}");
    }

    #[test]
    fn a_tampered_upload_is_rejected_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let (file, _) = novabackup_engine::format::chunk::encode(b"real data", &mut z);
        let claimed = ChunkDigest::of(b"other data");
        let r = ureq::put(&format!("{url}/store/v1/chunks/{claimed}"))
            .set("Authorization", "Bearer secret")
            .send_bytes(&file);
        match r {
            Err(ureq::Error::Status(400, resp)) => {
                let b: ErrorBody = resp.into_json().unwrap();
                assert!(b.error.message.contains("rejected"), "{}", b.error.message);
            }
            other => panic!("expected 400, got {other:?}"),
        }
        let s = RemoteStore::connect(&url, "secret").unwrap();
        assert_eq!(s.missing(&[claimed]).unwrap(), vec![true]);
        // Through the client, a failed upload fails the sync.
        s.put_chunk(&claimed, &file).unwrap();
        let e = s.sync().unwrap_err().to_string();
        assert!(e.contains("rejected"), "{e}");
        assert_eq!(s.missing(&[claimed]).unwrap(), vec![true]);
    }

    #[test]
    fn a_sync_waits_for_its_own_uploads_not_for_a_concurrent_backup() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = Arc::new(RemoteStore::connect(&url, "secret").unwrap());
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let put = |s: &RemoteStore, z: &mut zstd::bulk::Compressor, i: u64| {
            let plain = i.to_le_bytes();
            let (file, _) = novabackup_engine::format::chunk::encode(&plain, z);
            s.put_chunk_owned(&ChunkDigest::of(&plain), file).unwrap();
        };
        // Far less than a batch: it waits in the batch being filled.
        put(&s, &mut z, 0);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Another disk's backup keeps putting until the sync is back.
        let other = {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let mut z = zstd::bulk::Compressor::new(1).unwrap();
                let mut i = 1;
                while !done.load(std::sync::atomic::Ordering::Relaxed) && i < 1_000_000 {
                    put(&s, &mut z, i);
                    i += 1;
                }
                i
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let syncing = s.clone();
        std::thread::spawn(move || tx.send(syncing.sync().map_err(|e| e.to_string())));
        let synced = rx.recv_timeout(Duration::from_secs(60));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        synced.expect("the sync came back").unwrap();
        assert!(
            other.join().unwrap() < 1_000_000,
            "the sync waited for the other puts to end"
        );
        // The server has it (a fresh client knows nothing of its own).
        let fresh = RemoteStore::connect(&url, "secret").unwrap();
        let first = ChunkDigest::of(&0u64.to_le_bytes());
        assert_eq!(fresh.missing(&[first]).unwrap(), vec![false]);
        s.sync().unwrap();
    }

    #[test]
    fn a_lease_released_in_the_background_is_gone_before_the_next_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let other = RemoteStore::connect(&url, "secret").unwrap();
        let disk: DiskName = "vm".parse().unwrap();
        // Back to back, as a schedule's backups of one disk may run: a
        // release still on its way would make the next lock a conflict.
        for _ in 0..20 {
            let held = s.lock(&disk, None).unwrap();
            assert!(matches!(
                other.lock(&disk, None).map(|_| ()),
                Err(StoreError::Locked(_))
            ));
            drop(held);
        }
        // A store that closes sends its releases first.
        drop(s);
        other.lock(&disk, None).unwrap();
    }

    #[test]
    fn send_pending_uploads_a_part_batch_without_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let plain = b"far less than a batch";
        let d = ChunkDigest::of(plain);
        let (file, _) = novabackup_engine::format::chunk::encode(
            plain,
            &mut zstd::bulk::Compressor::new(1).unwrap(),
        );
        s.put_chunk_owned(&d, file).unwrap();
        // A fresh client knows nothing of the other's queue.
        let fresh = RemoteStore::connect(&url, "secret").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(fresh.missing(&[d]).unwrap(), vec![true], "held back");
        s.send_pending();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while fresh.missing(&[d]).unwrap() != vec![false] {
            assert!(std::time::Instant::now() < deadline, "never uploaded");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_batch_with_one_tampered_chunk_stores_none_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let (good, _) = novabackup_engine::format::chunk::encode(b"good data", &mut z);
        let good_d = ChunkDigest::of(b"good data");
        let (bad, _) = novabackup_engine::format::chunk::encode(b"real data", &mut z);
        let claimed = ChunkDigest::of(b"other data");
        let post = |body: &[u8]| {
            ureq::post(&format!("{url}/store/v1/chunks"))
                .set("Authorization", "Bearer secret")
                .send_bytes(body)
                .map_err(Box::new)
        };
        let body = encode_batch([(&good_d, &good[..]), (&claimed, &bad[..])]);
        match post(&body).map_err(|e| *e) {
            Err(ureq::Error::Status(400, resp)) => {
                let b: ErrorBody = resp.into_json().unwrap();
                assert!(
                    b.error.message.contains(&claimed.hex()),
                    "{}",
                    b.error.message
                );
            }
            other => panic!("expected 400, got {other:?}"),
        }
        let s = RemoteStore::connect(&url, "secret").unwrap();
        assert_eq!(s.missing(&[good_d, claimed]).unwrap(), vec![true, true]);
        // The good chunk alone goes in, and reads back.
        let r: serde_json::Value = post(&encode_batch([(&good_d, &good[..])]))
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(r["chunks"], 1, "{r}");
        assert_eq!(s.missing(&[good_d]).unwrap(), vec![false]);
        assert_eq!(s.get_chunk(&good_d).unwrap(), good);
    }

    #[test]
    fn prefetched_chunks_are_served_once_and_absent_ones_still_named() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut want = Vec::new();
        for i in 0..40u32 {
            let data = format!("chunk {i} ").repeat(100 + i as usize);
            let (file, _) = novabackup_engine::format::chunk::encode(data.as_bytes(), &mut z);
            let d = ChunkDigest::of(data.as_bytes());
            s.put_chunk(&d, &file).unwrap();
            want.push((d, file));
        }
        s.sync().unwrap();
        let absent = ChunkDigest::of(b"never stored");
        let mut ask: Vec<ChunkDigest> = want.iter().map(|(d, _)| *d).collect();
        ask.push(absent);
        s.prefetch(&ask);
        // The first chunk waits for the download in flight; by then every
        // chunk of the batch has arrived.
        assert_eq!(s.get_chunk(&want[0].0).unwrap(), want[0].1);
        let (files, _, in_flight) = s.cache.held();
        assert_eq!((files, in_flight), (39, 0));
        for (d, file) in &want[1..] {
            assert_eq!(&s.get_chunk(d).unwrap(), file);
        }
        assert_eq!(s.cache.held().1, 0, "handed out once");
        // Asked again: from the server, not a stale cache.
        assert_eq!(s.get_chunk(&want[0].0).unwrap(), want[0].1);
        assert!(matches!(
            s.get_chunk(&absent),
            Err(StoreError::MissingChunk(_))
        ));
    }

    #[test]
    fn a_snapshot_missing_its_chunks_is_refused() {
        use novabackup_engine::format::index;
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let absent = ChunkDigest::of(b"never uploaded");
        let page = index::encode_page(&[absent]);
        let (pf, _) = novabackup_engine::format::chunk::encode(&page, &mut z);
        let pd = ChunkDigest::of(&page);
        s.put_chunk(&pd, &pf).unwrap();
        s.sync().unwrap();
        let m = novabackup_engine::store::conformance::manifest("vm", 5, vec![pd]);
        let e = s.commit(&m).unwrap_err().to_string();
        assert!(
            e.contains(&absent.hex()) && e.contains("upload it first"),
            "{e}"
        );
        assert!(matches!(s.manifest(&m.id), Err(StoreError::NoSnapshot(_))));
    }

    /// Puts a chunk of these bytes into `s`; its digest.
    fn putter(s: &RemoteStore) -> impl FnMut(&[u8]) -> ChunkDigest + '_ {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        move |bytes| {
            let (f, _) = novabackup_engine::format::chunk::encode(bytes, &mut z);
            let d = ChunkDigest::of(bytes);
            s.put_chunk(&d, &f).unwrap();
            d
        }
    }

    /// Agents leave chunk sums to a server that says it fills them in; the
    /// stored file is summed, and the digest check still stands.
    #[test]
    fn unsummed_uploads_are_summed_by_the_server_and_still_checked() {
        use novabackup_engine::format::chunk;
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        assert!(s.sums_chunks(), "this server fills in sums");
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let plains = [
            vec![3u8; 65536],
            (0..65536u32).map(|i| ((i * 7919) >> 5) as u8).collect(),
        ];
        for plain in &plains {
            let (bare, _) = chunk::encode_with(plain, &mut z, false);
            s.put_chunk_owned(&ChunkDigest::of(plain), bare).unwrap();
        }
        s.sync().unwrap();
        for plain in &plains {
            let file = s.get_chunk(&ChunkDigest::of(plain)).unwrap();
            assert_eq!(&chunk::decode(&file).unwrap(), plain, "summed when stored");
        }
        // Unsummed and tampered, alone and in a batch: refused.
        let plain = vec![9u8; 65536];
        let d = ChunkDigest::of(&plain);
        let (mut bare, _) = chunk::encode_with(&plain, &mut z, false);
        *bare.last_mut().unwrap() ^= 1;
        let auth = |r: ureq::Request| r.set("Authorization", "Bearer secret");
        let e = auth(ureq::put(&format!("{url}/store/v1/chunks/{d}"))).send_bytes(&bare);
        assert!(matches!(e, Err(ureq::Error::Status(400, _))), "{e:?}");
        let batch = crate::store_wire::encode_batch([(&d, &bare[..])]);
        let e = auth(ureq::post(&format!("{url}/store/v1/chunks"))).send_bytes(&batch);
        assert!(matches!(e, Err(ureq::Error::Status(400, _))), "{e:?}");
        assert_eq!(s.missing(&[d]).unwrap(), vec![true]);
    }

    /// Pages that repeat (an empty disk's are all alike) are decoded once,
    /// in a full snapshot and in a child, and still checked.
    #[test]
    fn repeated_index_pages_are_checked_once_and_still_checked() {
        use novabackup_engine::format::index;
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let mut put = putter(&s);
        let per = index::PAGE_DIGESTS;
        let snap = |t: u64, pages: Vec<ChunkDigest>, parent: Option<&Manifest>| {
            let n = pages.len();
            let mut m = novabackup_engine::store::conformance::manifest("vm", t, pages);
            m.image_size = (n * per) as u64 * 65536;
            m.parent = parent.map(|p| p.id.clone());
            m
        };
        let (a, b) = (put(b"a"), put(b"b"));
        let (pa, pb) = (
            put(&index::encode_page(&vec![a; per])),
            put(&index::encode_page(&vec![b; per])),
        );
        let absent = ChunkDigest::of(b"never uploaded");
        let px = put(&index::encode_page(&vec![absent; per]));
        s.sync().unwrap();
        let m1 = snap(10, vec![pa, pa, pb, pa], None);
        s.commit(&m1).unwrap();
        let m2 = snap(20, vec![pa, pb, pb, pb], Some(&m1));
        s.commit(&m2).unwrap();
        let e = s
            .commit(&snap(30, vec![pa, px, pb, px], Some(&m2)))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&absent.hex()), "{e}");
        let e = s
            .commit(&snap(40, vec![px, px, px, px], None))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&absent.hex()), "{e}");
    }

    /// Index pages go inside the commit that names them: the server has
    /// none of them before, checks them like uploads (digest, then the
    /// sum it fills in) and checks the snapshot with them.
    #[test]
    fn a_commit_brings_its_index_pages_and_they_are_checked() {
        use novabackup_engine::format::{chunk, index};
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        assert!(s.commit_pages, "this server takes pages with a commit");
        let mut put = putter(&s);
        let (a, b, c) = (put(b"a"), put(b"b"), put(b"c"));
        let absent = ChunkDigest::of(b"never uploaded");
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        // As a backup puts them: unsummed, for the server to sum.
        let mut page = |digests: &[ChunkDigest]| {
            let plain = index::encode_page(digests);
            let (file, _) = chunk::encode_with(&plain, &mut z, false);
            (ChunkDigest::of(&plain), file)
        };
        let snap = |t: u64, page: ChunkDigest, parent: Option<&Manifest>| {
            let mut m = novabackup_engine::store::conformance::manifest("vm", t, vec![page]);
            m.image_size = 2 * 65536;
            m.parent = parent.map(|p| p.id.clone());
            m
        };
        let (p1, f1) = page(&[a, b]);
        assert!(s.put_index_page(&p1, f1.clone()).unwrap() > 0);
        assert_eq!(s.put_index_page(&p1, f1.clone()).unwrap(), 0, "held once");
        s.send_pending();
        assert_eq!(s.missing(&[p1]).unwrap(), vec![true], "held, not uploaded");
        let m1 = snap(10, p1, None);
        s.commit(&m1).unwrap();
        let stored = s.get_chunk(&p1).unwrap();
        assert_eq!(
            chunk::decode_verified(&stored, &p1).unwrap(),
            index::encode_page(&[a, b])
        );
        assert_ne!(stored, f1, "summed by the server");
        assert!(s.held.lock().unwrap().pages.is_empty());

        // A child, checked where it changed, with its page in hand.
        let (p2, f2) = page(&[a, c]);
        s.put_index_page(&p2, f2).unwrap();
        let m2 = snap(20, p2, Some(&m1));
        s.commit(&m2).unwrap();
        let (p3, f3) = page(&[a, absent]);
        s.put_index_page(&p3, f3).unwrap();
        let e = s.commit(&snap(30, p3, Some(&m2))).unwrap_err().to_string();
        assert!(
            e.contains(&absent.hex()) && e.contains("upload it first"),
            "{e}"
        );

        // A page that is not what its digest says: refused, nothing stored.
        let (p4, mut f4) = page(&[b, c]);
        *f4.last_mut().unwrap() ^= 1;
        let m4 = snap(40, p4, Some(&m2));
        let body = crate::store_wire::encode_commit(&m4.encode(), [(&p4, &f4[..])]);
        let e = ureq::post(&format!("{url}/store/v1/commit"))
            .set("Authorization", "Bearer secret")
            .send_bytes(&body);
        assert!(matches!(e, Err(ureq::Error::Status(400, _))), "{e:?}");
        assert_eq!(s.missing(&[p4]).unwrap(), vec![true]);
        assert!(matches!(s.manifest(&m4.id), Err(StoreError::NoSnapshot(_))));
    }

    /// Pages held for one backup's commit are not another's: a commit
    /// takes the pages its manifest names and uploads the rest, which the
    /// other commit then waits for.
    #[test]
    fn a_commit_takes_its_own_pages_and_uploads_the_others() {
        use novabackup_engine::format::{chunk, index};
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let mut put = putter(&s);
        let (a, b) = (put(b"a"), put(b"b"));
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut held = Vec::new();
        for (disk, d) in [("one", a), ("two", b)] {
            let plain = index::encode_page(&[d]);
            let pd = ChunkDigest::of(&plain);
            s.put_index_page(&pd, chunk::encode(&plain, &mut z).0)
                .unwrap();
            let mut m = novabackup_engine::store::conformance::manifest(disk, 10, vec![pd]);
            m.image_size = 65536;
            held.push((pd, m));
        }
        s.commit(&held[0].1).unwrap();
        assert!(s.held.lock().unwrap().pages.is_empty());
        s.commit(&held[1].1).unwrap();
        assert_eq!(
            s.missing(&[held[0].0, held[1].0]).unwrap(),
            vec![false, false]
        );
        assert!(s.manifest(&held[1].1.id).is_ok());
    }

    /// A child snapshot is checked only where it differs from its parent;
    /// after a garbage collection the parent's word counts for nothing.
    #[test]
    fn a_child_snapshot_is_checked_where_it_changed_and_in_full_after_a_collection() {
        use novabackup_engine::format::index;
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let s = RemoteStore::connect(&url, "secret").unwrap();
        let mut put = putter(&s);
        // Two chunks, one index page.
        let snap = |t: u64, page: ChunkDigest, parent: Option<&Manifest>| {
            let mut m = novabackup_engine::store::conformance::manifest("vm", t, vec![page]);
            m.image_size = 2 * 65536;
            m.parent = parent.map(|p| p.id.clone());
            m
        };
        let (a, b) = (put(b"a"), put(b"b"));
        let p1 = put(&index::encode_page(&[a, b]));
        s.sync().unwrap();
        let m1 = snap(10, p1, None);
        s.commit(&m1).unwrap();

        // Changed at chunk 1 to one never uploaded: refused, naming it.
        let absent = ChunkDigest::of(b"never uploaded");
        let p2 = put(&index::encode_page(&[a, absent]));
        s.sync().unwrap();
        let e = s.commit(&snap(20, p2, Some(&m1))).unwrap_err().to_string();
        assert!(e.contains(&absent.hex()), "{e}");
        let c = put(b"c");
        let p3 = put(&index::encode_page(&[a, c]));
        s.sync().unwrap();
        let m3 = snap(30, p3, Some(&m1));
        s.commit(&m3).unwrap();

        // m3 is gone and a collection removed chunk a; a child of m3 that
        // keeps chunk a must not be accepted on m3's word.
        s.delete(&m1.id).unwrap();
        s.delete(&m3.id).unwrap();
        let r = s
            .gc(
                &Default::default(),
                &novabackup_engine::progress::Progress::default(),
            )
            .unwrap();
        assert!(r.chunks_removed >= 3, "{r:?}");
        assert_eq!(s.missing(&[a]).unwrap(), vec![true]);
        let d = put(b"d");
        let p4 = put(&index::encode_page(&[a, d]));
        s.sync().unwrap();
        let e = s.commit(&snap(40, p4, Some(&m3))).unwrap_err().to_string();
        assert!(e.contains(&a.hex()) && e.contains("upload it first"), "{e}");
    }
}

#[cfg(test)]
mod malformed {
    use super::tests_support::serve;
    use crate::error::ErrorBody;

    fn status_and_code(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
        match r {
            Err(ureq::Error::Status(s, resp)) => {
                let b: ErrorBody = resp.into_json().expect("a JSON error body");
                (
                    s,
                    serde_json::to_value(b.error.code)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            }
            other => panic!("expected an error status, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_get_json_errors_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _rt) = serve(dir.path());
        let auth = |r: ureq::Request| r.set("Authorization", "Bearer secret");
        let cases: Vec<(Result<ureq::Response, ureq::Error>, u16, &str)> = vec![
            (
                ureq::get(&format!("{url}/store/v1/usage")).call(),
                401,
                "unauthorized",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/missing"))).send_bytes(&[0u8; 33]),
                400,
                "bad_request",
            ),
            (
                auth(ureq::put(&format!("{url}/store/v1/chunks/nothex"))).send_bytes(b"x"),
                400,
                "bad_request",
            ),
            (
                auth(ureq::get(&format!(
                    "{url}/store/v1/chunks/{}",
                    "ab".repeat(32)
                )))
                .call(),
                404,
                "not_found",
            ),
            // Fetches: empty, not whole digests.
            (
                auth(ureq::post(&format!("{url}/store/v1/fetch"))).send_bytes(b""),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/fetch"))).send_bytes(&[1u8; 40]),
                400,
                "bad_request",
            ),
            // Upload batches: empty, a head cut short, a length past the end.
            (
                auth(ureq::post(&format!("{url}/store/v1/chunks"))).send_bytes(b""),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/chunks"))).send_bytes(&[7u8; 35]),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/chunks"))).send_bytes(&{
                    let mut b = vec![7u8; 32];
                    b.extend_from_slice(&1000u32.to_le_bytes());
                    b.extend_from_slice(&[1u8; 10]);
                    b
                }),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/snapshots"))).send_bytes(b"{not json"),
                400,
                "bad_request",
            ),
            // Commits with pages: empty, a manifest length past the end, a
            // bad manifest, a sound manifest with a page record cut short.
            (
                auth(ureq::post(&format!("{url}/store/v1/commit"))).send_bytes(b""),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/commit")))
                    .send_bytes(&[200, 0, 0, 0, b'{']),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/commit")))
                    .send_bytes(&crate::store_wire::encode_commit(b"{not json", [])),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/commit"))).send_bytes(&{
                    let m = novabackup_engine::store::conformance::manifest("vm", 5, vec![]);
                    let mut b = crate::store_wire::encode_commit(&m.encode(), []);
                    b.extend_from_slice(&[7u8; 35]);
                    b
                }),
                400,
                "bad_request",
            ),
            (
                auth(ureq::get(&format!("{url}/store/v1/snapshots/vm@nonsense"))).call(),
                400,
                "bad_request",
            ),
            (
                auth(ureq::post(&format!("{url}/store/v1/locks/vm/nolease"))).call(),
                404,
                "not_found",
            ),
            (
                auth(ureq::get(&format!("{url}/store/v1/nowhere"))).call(),
                404,
                "not_found",
            ),
        ];
        for (i, (r, status, code)) in cases.into_iter().enumerate() {
            assert_eq!(status_and_code(r), (status, code.to_string()), "case {i}");
        }
        let packs = dir.path().join("packs");
        let n: usize = std::fs::read_dir(&packs)
            .unwrap()
            .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(n, 0, "nothing was stored");
    }
}
