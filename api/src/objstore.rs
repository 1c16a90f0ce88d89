//! A store on an S3-compatible object store (Garage, MinIO, Ceph RGW, AWS).
//!
//! ```text
//! PREFIX/store.json                    {"format": 1, "kind": "object"}
//! PREFIX/packs/ab/TTTTTTTTRRRRRRRRRRRRRRRR.pack   sealed packs (format::pack)
//! PREFIX/snapshots/DISK/TIME.json      manifests (format::manifest)
//! PREFIX/gc/state.json                 packs doomed and deleted by collections
//! PREFIX/gc/lock.json                  the running collection's lease
//! ```
//!
//! The pack format is the local store's: chunk files end to end and a
//! table of contents at the end, so a pack's contents cost one ranged GET
//! of its tail. A pack is built in memory and PUT whole once it reaches
//! the target size or at [`Store::sync`]: a completed PUT is durable, and
//! an object is never visible half-written, so a pack under its key is
//! always complete. A manifest is PUT only after every pack it needs, so
//! a crash at any point leaves at most unreferenced packs, which garbage
//! collection removes.
//!
//! Pack ids begin with their creation time (8 hex digits of Unix seconds)
//! followed by 64 random bits: collection learns a pack's age from its
//! key, without trusting listing dates.
//!
//! Where each chunk lives is loaded at open from the packs' tables of
//! contents, kept in a local metadata cache ([`ObjectStore::open`]'s
//! `cache`): one file per pack, written once, rebuilt from the bucket
//! when missing or damaged.
//!
//! Garbage collection never deletes at once. It dooms unreferenced packs
//! in `gc/state.json` and deletes them at a later run, once they have
//! been doomed longer than the grace period and are still unreferenced.
//! A backup re-reads the state before its commit and copies whatever it
//! references out of doomed packs first, so a snapshot never names a
//! deleted object even when listings lag (the grace period bounds the lag
//! tolerated) and collections run from other hosts (see `gc`).

mod gc;
pub mod location;
pub mod s3;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::manifest::{Annotation, Manifest};
use novabackup_engine::format::pack;
use novabackup_engine::ids::{DiskName, SnapshotId};
use novabackup_engine::progress::Progress;
use novabackup_engine::store::{DiskLock, GcOptions, GcReport, Store, StoreError};
use serde::{Deserialize, Serialize};

pub use location::{is_s3, S3Location};
use s3::{S3Error, S3};

/// A pack is PUT once it holds this many bytes. Measured on a 3-node
/// Garage on loopback (docs/SCALING.md): requests of 16 MiB reach the
/// store's throughput, while a collection rewriting a pack to drop a few
/// chunks copies at most this much.
pub const PACK_TARGET: usize = 16 << 20;
/// How long a doomed pack waits before it is deleted, by default: longer
/// than any listing lag and than a backup's commit takes.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Bytes read from a pack's end to find its table of contents in one
/// request (a 16 MiB pack of 64 KiB chunks has a toc of about 11 KiB).
const TAIL_GUESS: u64 = 64 << 10;
/// A reader missing a chunk lists the packs again at most this often.
const RELIST: Duration = Duration::from_secs(2);
const FORMAT: u32 = 1;

/// Digests are SHA-256 output: their first bytes are already a good hash.
#[derive(Default)]
struct DigestHasher(u64);
impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= (*b as u64) << (8 * i);
        }
    }
}
type Build = std::hash::BuildHasherDefault<DigestHasher>;
type DigestMap<V> = HashMap<ChunkDigest, V, Build>;
type DigestSet = HashSet<ChunkDigest, Build>;

#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

struct PackMeta {
    id: String,
    size: u64,
    /// In memory only (being filled, or being sent): not in the bucket yet.
    staged: Option<Arc<Vec<u8>>>,
    /// Doomed by a collection: its chunks count as missing.
    doomed: bool,
    /// Deleted: nothing may be read from it.
    gone: bool,
}

struct Writer {
    pack: u32,
    buf: Vec<u8>,
    entries: Vec<pack::Entry>,
}

/// What the collector writes in `gc/state.json`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
struct GcState {
    /// Packs doomed: pack id → Unix time doomed.
    doomed: std::collections::BTreeMap<String, u64>,
    /// Packs deleted: pack id → Unix time deleted (kept a week, so a
    /// backup that began before a deletion learns of it at its commit).
    deleted: std::collections::BTreeMap<String, u64>,
}

/// What garbage collection must keep although no manifest names it:
/// the base snapshots of running backups, and what they put or found.
#[derive(Default)]
struct Guard {
    locks: HashMap<DiskName, Option<Manifest>>,
    gc: bool,
    touched: DigestSet,
}

impl Guard {
    fn tracking(&self) -> bool {
        !self.locks.is_empty() || self.gc
    }
}

/// A store on an object store (module doc).
pub struct ObjectStore {
    s3: S3,
    cache: Option<PathBuf>,
    index: RwLock<DigestMap<Loc>>,
    packs: Mutex<Vec<PackMeta>>,
    by_id: Mutex<HashMap<String, u32>>,
    writers: Vec<Mutex<Option<Writer>>>,
    next_writer: AtomicUsize,
    /// Packs sealed and waiting for `sync`'s PUT.
    sealed: Mutex<Vec<(u32, Arc<Vec<u8>>)>>,
    guard: Arc<Mutex<Guard>>,
    counter: AtomicU64,
    collecting: Mutex<()>,
    /// Manifests committed by this process, listed even if the bucket's
    /// listing has not caught up with them yet.
    committed: Mutex<HashSet<SnapshotId>>,
    grace: Duration,
    pack_target: usize,
    damaged: Mutex<Vec<String>>,
    /// When the packs were last listed for a missing chunk (Unix ms).
    relisted: AtomicU64,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("s3", &self.s3)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn pack_key(id: &str) -> String {
    format!("packs/{}/{id}.pack", &id[..2])
}

fn manifest_key(id: &SnapshotId) -> String {
    format!("snapshots/{}/{}.json", id.disk().as_str(), id.time())
}

const STATE_KEY: &str = "gc/state.json";

/// The creation time a pack id starts with.
fn pack_time(id: &str) -> u64 {
    id.get(..8)
        .and_then(|t| u64::from_str_radix(t, 16).ok())
        .unwrap_or(0)
}

fn valid_pack_id(id: &str) -> bool {
    id.len() == 24
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl ObjectStore {
    /// Opens the store at `loc`, creating its marker if the prefix is
    /// empty, and loads the tables of contents of its packs, from the
    /// metadata cache folder `cache` where it has them.
    pub fn open(loc: &S3Location, cache: Option<&Path>) -> Result<ObjectStore, StoreError> {
        let s3 = S3::new(
            &loc.endpoints,
            &loc.region,
            &loc.bucket,
            &loc.prefix,
            rusty_s3::Credentials::new(loc.key_id.clone(), loc.secret.clone()),
        )
        .map_err(|e| StoreError::Remote {
            url: loc.display(),
            why: e.to_string(),
        })?;
        if let Some(c) = cache {
            novabackup_engine::fsutil::create_private_dir(c)
                .and_then(|_| std::fs::create_dir_all(c.join("tocs")))
                .map_err(|e| StoreError::io(c, e))?;
        }
        let writers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let store = ObjectStore {
            s3,
            cache: cache.map(Path::to_path_buf),
            index: Default::default(),
            packs: Default::default(),
            by_id: Default::default(),
            writers: (0..writers).map(|_| Mutex::new(None)).collect(),
            next_writer: AtomicUsize::new(0),
            sealed: Default::default(),
            guard: Default::default(),
            counter: AtomicU64::new(0),
            collecting: Mutex::new(()),
            committed: Default::default(),
            grace: DEFAULT_GRACE,
            pack_target: PACK_TARGET,
            damaged: Default::default(),
            relisted: AtomicU64::new(0),
        };
        store.check_marker()?;
        store.refresh_packs()?;
        let state = store.read_state()?;
        store.apply_state(&state);
        Ok(store)
    }

    /// Sets how long a doomed pack waits before deletion (zero deletes
    /// in the collection that dooms it: for a store only this process
    /// writes, such as a test's).
    pub fn with_grace(mut self, grace: Duration) -> ObjectStore {
        self.grace = grace;
        self
    }

    /// Sets the pack size (benchmarks measure the trade-off).
    pub fn with_pack_target(mut self, bytes: usize) -> ObjectStore {
        self.pack_target = bytes.max(1 << 16);
        self
    }

    fn err(&self, e: S3Error) -> StoreError {
        StoreError::Remote {
            url: self.s3.describe(),
            why: e.to_string(),
        }
    }

    fn check_marker(&self) -> Result<(), StoreError> {
        match self.s3.get("store.json").map_err(|e| self.err(e))? {
            Some(b) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&b).map_err(|e| StoreError::Unsupported {
                        path: format!("{}store.json", self.s3.describe()),
                        why: format!("it is damaged ({e})"),
                    })?;
                if v.get("kind").and_then(|k| k.as_str()) != Some("object")
                    || v.get("format").and_then(|f| f.as_u64()) != Some(FORMAT as u64)
                {
                    return Err(StoreError::Unsupported {
                        path: format!("{}store.json", self.s3.describe()),
                        why: format!(
                            "it describes {v}, not an object store of format {FORMAT}; use another prefix or a newer novabackup"
                        ),
                    });
                }
                Ok(())
            }
            None => self
                .s3
                .put(
                    "store.json",
                    format!("{{\"format\": {FORMAT}, \"kind\": \"object\"}}\n").as_bytes(),
                )
                .map_err(|e| self.err(e)),
        }
    }

    /// Learns the packs the bucket lists that this process does not know
    /// yet, reading each one's table of contents (from the cache when it
    /// has it). Returns how many were added.
    fn refresh_packs(&self) -> Result<usize, StoreError> {
        let listed = self.s3.list("packs/").map_err(|e| self.err(e))?;
        let mut added = 0;
        for l in listed {
            let Some(id) = l
                .key
                .rsplit('/')
                .next()
                .and_then(|n| n.strip_suffix(".pack"))
                .filter(|id| valid_pack_id(id))
            else {
                continue;
            };
            if lock(&self.by_id).contains_key(id) {
                continue;
            }
            match self.read_toc(id, l.size) {
                Ok(entries) => {
                    self.add_pack(id, l.size, None, &entries, false);
                    added += 1;
                }
                Err(why) => {
                    tracing::warn!(pack = id, %why, "damaged pack: its chunks count as missing; run verify");
                    lock(&self.damaged).push(format!("{}: {why}", pack_key(id)));
                }
            }
        }
        Ok(added)
    }

    /// Registers a pack and indexes its chunks (a chunk already indexed
    /// in a live pack keeps its place unless `replace`).
    fn add_pack(
        &self,
        id: &str,
        size: u64,
        staged: Option<Arc<Vec<u8>>>,
        entries: &[pack::Entry],
        replace: bool,
    ) -> u32 {
        let n = {
            let mut packs = lock(&self.packs);
            packs.push(PackMeta {
                id: id.to_string(),
                size,
                staged,
                doomed: false,
                gone: false,
            });
            packs.len() as u32 - 1
        };
        lock(&self.by_id).insert(id.to_string(), n);
        // Lock order everywhere: guard, index, packs.
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let packs = lock(&self.packs);
        for e in entries {
            let loc = Loc {
                pack: n,
                offset: e.offset,
                len: e.len,
            };
            match index.get(&e.digest) {
                Some(old) if !replace && !packs[old.pack as usize].doomed => {}
                _ => {
                    index.insert(e.digest, loc);
                }
            }
        }
        n
    }

    /// A pack's table of contents: from the cache, else from the tail of
    /// the object (then cached).
    fn read_toc(&self, id: &str, size: u64) -> Result<Vec<pack::Entry>, String> {
        let cached = self.cache.as_ref().map(|c| c.join("tocs").join(id));
        if let Some(p) = &cached {
            if let Ok(tail) = std::fs::read(p) {
                match decode_tail(&tail, size) {
                    Ok(e) => return Ok(e),
                    Err(why) => {
                        tracing::warn!(cache = %p.display(), %why, "damaged cache entry; reading the pack again")
                    }
                }
            }
        }
        let key = pack_key(id);
        let mut tail = self
            .s3
            .get_range(&key, -(TAIL_GUESS.min(size) as i64), TAIL_GUESS.min(size))
            .map_err(|e| e.to_string())?
            .ok_or("the pack disappeared while being read")?;
        if tail.len() < pack::TRAILER_LEN as usize {
            return Err("the pack is too short to be sealed".into());
        }
        let t = pack::decode_trailer(&tail[tail.len() - pack::TRAILER_LEN as usize..], size)
            .map_err(|e| e.to_string())?;
        let need = t.toc_len() as u64 + pack::TRAILER_LEN;
        if need > tail.len() as u64 {
            tail = self
                .s3
                .get_range(&key, t.toc_offset as i64, need)
                .map_err(|e| e.to_string())?
                .ok_or("the pack disappeared while being read")?;
        }
        let tail = tail[tail.len() - need as usize..].to_vec();
        let entries = decode_tail(&tail, size)?;
        if let Some(p) = cached {
            let _ = novabackup_engine::fsutil::write_atomic(&p, &tail, 0o600);
        }
        Ok(entries)
    }

    fn read_state(&self) -> Result<GcState, StoreError> {
        match self.s3.get(STATE_KEY).map_err(|e| self.err(e))? {
            None => Ok(GcState::default()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Unsupported {
                path: format!("{}{STATE_KEY}", self.s3.describe()),
                why: format!("it is damaged ({e}); run `novabackup gc` to write it again"),
            }),
        }
    }

    /// Marks the packs `state` dooms or deleted.
    fn apply_state(&self, state: &GcState) {
        let by_id = lock(&self.by_id);
        let mut packs = lock(&self.packs);
        for p in packs.iter_mut() {
            p.doomed = state.doomed.contains_key(&p.id);
            p.gone = p.gone || state.deleted.contains_key(&p.id);
        }
        drop(by_id);
    }

    fn new_pack_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let seed = format!(
            "{host}:{}:{}:{n}:{:?}",
            std::process::id(),
            now.as_nanos(),
            std::thread::current().id()
        );
        format!(
            "{:08x}{:016x}",
            now.as_secs() as u32,
            xxhash_rust::xxh3::xxh3_64(seed.as_bytes())
        )
    }

    fn new_writer(&self) -> Writer {
        let id = self.new_pack_id();
        let n = {
            let mut packs = lock(&self.packs);
            packs.push(PackMeta {
                id: id.clone(),
                size: 0,
                staged: None,
                doomed: false,
                gone: false,
            });
            packs.len() as u32 - 1
        };
        lock(&self.by_id).insert(id, n);
        let mut buf = Vec::with_capacity(self.pack_target + (1 << 20));
        buf.extend_from_slice(&pack::header());
        Writer {
            pack: n,
            buf,
            entries: Vec::new(),
        }
    }

    /// Closes a pack: its toc is appended and it waits for `sync`'s PUT.
    fn seal(&self, w: Writer) {
        let Writer {
            pack: n,
            mut buf,
            entries,
        } = w;
        let toc = pack::encode_toc(&entries, buf.len() as u64);
        buf.extend_from_slice(&toc);
        let buf = Arc::new(buf);
        {
            let mut packs = lock(&self.packs);
            packs[n as usize].size = buf.len() as u64;
            packs[n as usize].staged = Some(buf.clone());
        }
        lock(&self.sealed).push((n, buf));
    }

    /// Appends a chunk file to a pack in memory; `force` stores it even
    /// if the index has it (a collection moving it out of a pack).
    fn stage(&self, digest: &ChunkDigest, file: &[u8], force: bool) -> Result<u64, StoreError> {
        {
            let mut g = lock(&self.guard);
            if g.tracking() {
                g.touched.insert(*digest);
            }
            if !force && self.present(digest) {
                return Ok(0);
            }
        }
        let slot = self.next_writer.fetch_add(1, Ordering::Relaxed) % self.writers.len();
        let mut w = lock(&self.writers[slot]);
        let wr = w.get_or_insert_with(|| self.new_writer());
        let entry = pack::Entry {
            digest: *digest,
            offset: wr.buf.len() as u64,
            len: file.len() as u32,
        };
        wr.buf.extend_from_slice(file);
        wr.entries.push(entry);
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                *digest,
                Loc {
                    pack: wr.pack,
                    offset: entry.offset,
                    len: entry.len,
                },
            );
        if wr.buf.len() >= self.pack_target {
            let full = w.take().expect("just filled");
            self.seal(full);
            // Send full packs while the backup goes on, so `sync` has
            // little left to send.
            if lock(&self.sealed).len() >= 2 {
                self.send_sealed()?;
            }
        }
        Ok(file.len() as u64)
    }

    /// Whether the index has `digest` in a pack that is not doomed.
    fn present(&self, digest: &ChunkDigest) -> bool {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        match index.get(digest) {
            None => false,
            Some(l) => {
                let packs = lock(&self.packs);
                let p = &packs[l.pack as usize];
                !p.doomed && !p.gone
            }
        }
    }

    /// PUTs every sealed pack, a few at a time.
    fn send_sealed(&self) -> Result<(), StoreError> {
        let todo: Vec<(u32, Arc<Vec<u8>>)> = std::mem::take(&mut *lock(&self.sealed));
        if todo.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = {
            let packs = lock(&self.packs);
            todo.iter()
                .map(|(n, _)| packs[*n as usize].id.clone())
                .collect()
        };
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<StoreError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..todo.len().min(4) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= todo.len() || lock(&failed).is_some() {
                        return;
                    }
                    let (n, buf) = &todo[i];
                    match self.s3.put(&pack_key(&ids[i]), buf) {
                        Ok(()) => {
                            lock(&self.packs)[*n as usize].staged = None;
                            if let Some(c) = &self.cache {
                                let tail_len = tail_len(buf);
                                let _ = novabackup_engine::fsutil::write_atomic(
                                    &c.join("tocs").join(&ids[i]),
                                    &buf[buf.len() - tail_len..],
                                    0o600,
                                );
                            }
                        }
                        Err(e) => {
                            *lock(&failed) = Some(self.err(e));
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            // Keep what was not sent for the next attempt: other backups
            // may rely on its chunks already.
            let mut sealed = lock(&self.sealed);
            let packs = lock(&self.packs);
            for (n, buf) in todo {
                if packs[n as usize].staged.is_some() {
                    sealed.push((n, buf));
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Where a chunk lies; a chunk not known yet may be in a pack another
    /// process wrote since this one loaded the index (a sync into this
    /// prefix, another host's backup): the packs are listed again, at
    /// most every [`RELIST`].
    fn locate(&self, digest: &ChunkDigest) -> Result<Loc, StoreError> {
        let known = |s: &Self| {
            s.index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(digest)
                .copied()
        };
        if let Some(l) = known(self) {
            return Ok(l);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let last = self.relisted.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= RELIST.as_millis() as u64
            && self
                .relisted
                .compare_exchange(last, now, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        {
            let added = self.refresh_packs()?;
            if added > 0 {
                tracing::info!(packs = added, "learned packs written by another process");
            }
        }
        known(self).ok_or(StoreError::MissingChunk(*digest))
    }

    fn read_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        let loc = self.locate(digest)?;
        let (id, staged, gone) = {
            let packs = lock(&self.packs);
            let p = &packs[loc.pack as usize];
            (p.id.clone(), p.staged.clone(), p.gone)
        };
        if gone {
            return Err(StoreError::MissingChunk(*digest));
        }
        let (start, end) = (loc.offset as usize, loc.offset as usize + loc.len as usize);
        if let Some(buf) = staged {
            return Ok(buf[start..end].to_vec());
        }
        // Still filling: its bytes are only in a writer's buffer.
        for slot in &self.writers {
            if let Some(w) = lock(slot).as_ref().filter(|w| w.pack == loc.pack) {
                return Ok(w.buf[start..end].to_vec());
            }
        }
        if let Some(buf) = lock(&self.packs)[loc.pack as usize].staged.clone() {
            return Ok(buf[start..end].to_vec());
        }
        match self
            .s3
            .get_range(&pack_key(&id), loc.offset as i64, loc.len as u64)
            .map_err(|e| self.err(e))?
        {
            Some(b) if b.len() == loc.len as usize => Ok(b),
            Some(b) => Err(StoreError::Remote {
                url: self.s3.describe(),
                why: format!(
                    "{}: asked for {} bytes at {}, got {}",
                    pack_key(&id),
                    loc.len,
                    loc.offset,
                    b.len()
                ),
            }),
            None => Err(StoreError::MissingChunk(*digest)),
        }
    }

    fn decode_manifest(&self, key: &str, bytes: &[u8]) -> Result<Manifest, StoreError> {
        Manifest::decode(bytes).map_err(|why| StoreError::BadManifest {
            path: format!("{}{key}", self.s3.describe()),
            why,
        })
    }

    /// Before a commit: re-reads the collector's state, and copies every
    /// chunk `m` names that lies in a doomed pack into a new one, so the
    /// snapshot never depends on a pack about to be deleted. Fails if
    /// something it names is gone.
    fn secure(&self, m: &Manifest) -> Result<(), StoreError> {
        let state = self.read_state()?;
        self.apply_state(&state);
        let at_risk = {
            let packs = lock(&self.packs);
            packs.iter().any(|p| p.doomed || p.gone)
        };
        let mut names: Vec<ChunkDigest> = m.pages.clone();
        if at_risk {
            for p in 0..m.pages.len() {
                let page = novabackup_engine::store::pages::load_page(self, m, p as u64)
                    .map_err(|e| StoreError::Incomplete(e.to_string()))?;
                names.extend(page.into_iter().filter(|d| !d.is_zero()));
            }
        }
        let mut copied = 0u64;
        let mut seen = DigestSet::default();
        for d in names {
            if !seen.insert(d) {
                continue;
            }
            let (doomed, gone) = {
                let index = self.index.read().unwrap_or_else(|p| p.into_inner());
                match index.get(&d) {
                    None => (false, true),
                    Some(l) => {
                        let packs = lock(&self.packs);
                        let p = &packs[l.pack as usize];
                        (p.doomed, p.gone)
                    }
                }
            };
            if gone {
                return Err(StoreError::Incomplete(format!(
                    "snapshot {} names chunk {d}, which the store no longer holds (a garbage collection removed it while the backup ran); run the backup again",
                    m.id
                )));
            }
            if doomed {
                let file = self.read_chunk(&d)?;
                self.stage(&d, &file, true)?;
                copied += 1;
            }
        }
        if copied > 0 {
            tracing::info!(snapshot = %m.id, chunks = copied, "copied chunks out of packs a collection doomed");
            self.sync()?;
        }
        Ok(())
    }

    /// Closes every open pack and PUTs it.
    fn flush(&self) -> Result<(), StoreError> {
        for slot in &self.writers {
            if let Some(w) = lock(slot).take() {
                if w.entries.is_empty() {
                    continue;
                }
                self.seal(w);
            }
        }
        self.send_sealed()
    }

    fn list_keys(&self, disk: Option<&DiskName>) -> Result<Vec<(SnapshotId, String)>, StoreError> {
        let rel = match disk {
            Some(d) => format!("snapshots/{}/", d.as_str()),
            None => "snapshots/".to_string(),
        };
        let mut out: Vec<(SnapshotId, String)> = Vec::new();
        let mut seen = HashSet::new();
        let listed = self.s3.list(&rel).map_err(|e| self.err(e))?;
        for l in listed {
            let Some(rest) = l.key.strip_prefix("snapshots/") else {
                continue;
            };
            let Some((d, t)) = rest.split_once('/') else {
                continue;
            };
            let Some(t) = t.strip_suffix(".json") else {
                continue;
            };
            if let Ok(id) = format!("{d}@{t}").parse::<SnapshotId>() {
                seen.insert(id.clone());
                out.push((id, l.key));
            }
        }
        // Our own commits, if the listing has not caught up yet.
        for id in lock(&self.committed).iter() {
            if disk.is_none_or(|d| id.disk() == d) && !seen.contains(id) {
                out.push((id.clone(), manifest_key(id)));
            }
        }
        Ok(out)
    }

    /// Packs known to this process, for tests and tools: (id, size,
    /// doomed).
    pub fn packs(&self) -> Vec<(String, u64, bool)> {
        lock(&self.packs)
            .iter()
            .filter(|p| !p.gone && p.staged.is_none() && p.size > 0)
            .map(|p| (p.id.clone(), p.size, p.doomed))
            .collect()
    }
}

/// The length of a sealed pack's toc and trailer.
fn tail_len(buf: &[u8]) -> usize {
    let t = &buf[buf.len() - pack::TRAILER_LEN as usize..];
    let count = u32::from_le_bytes(t[8..12].try_into().expect("4 bytes")) as usize;
    count * pack::ENTRY_LEN + pack::TRAILER_LEN as usize
}

/// Decodes a pack's tail (toc then trailer) for a pack of `size` bytes.
fn decode_tail(tail: &[u8], size: u64) -> Result<Vec<pack::Entry>, String> {
    if tail.len() < pack::TRAILER_LEN as usize {
        return Err("the pack's tail is too short".into());
    }
    let (toc, t) = tail.split_at(tail.len() - pack::TRAILER_LEN as usize);
    let trailer = pack::decode_trailer(t, size).map_err(|e| e.to_string())?;
    if toc.len() != trailer.toc_len() {
        return Err("the pack's tail does not match its trailer".into());
    }
    pack::decode_toc(toc, &trailer).map_err(|e| e.to_string())
}

struct ObjectLock {
    guard: Arc<Mutex<Guard>>,
    disk: DiskName,
}
impl DiskLock for ObjectLock {}
impl Drop for ObjectLock {
    fn drop(&mut self) {
        let mut g = lock(&self.guard);
        g.locks.remove(&self.disk);
        if !g.tracking() {
            g.touched = DigestSet::default();
        }
    }
}

impl Store for ObjectStore {
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError> {
        let mut g = lock(&self.guard);
        let out: Vec<bool> = digests.iter().map(|d| !self.present(d)).collect();
        if g.tracking() {
            for (d, m) in digests.iter().zip(&out) {
                if !m {
                    g.touched.insert(*d);
                }
            }
        }
        Ok(out)
    }

    fn put_chunk(&self, digest: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError> {
        self.stage(digest, file, false)
    }

    fn get_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        self.read_chunk(digest)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.flush()
    }

    fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
        let key = manifest_key(&m.id);
        self.flush()?;
        if self.s3.head(&key).map_err(|e| self.err(e))?.is_some() {
            return Err(StoreError::Exists(m.id.clone()));
        }
        self.secure(m)?;
        if !self
            .s3
            .put_new(&key, &m.encode())
            .map_err(|e| self.err(e))?
        {
            return Err(StoreError::Exists(m.id.clone()));
        }
        lock(&self.committed).insert(m.id.clone());
        Ok(())
    }

    fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let key = manifest_key(id);
        match self.s3.get(&key).map_err(|e| self.err(e))? {
            Some(b) => self.decode_manifest(&key, &b),
            None => Err(StoreError::NoSnapshot(id.clone())),
        }
    }

    fn list(
        &self,
        disk: Option<&DiskName>,
    ) -> Result<(Vec<Manifest>, Vec<StoreError>), StoreError> {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for (id, key) in self.list_keys(disk)? {
            match self.s3.get(&key).map_err(|e| self.err(e))? {
                Some(b) => match self.decode_manifest(&key, &b) {
                    Ok(m) => ok.push(m),
                    Err(e) => bad.push(e),
                },
                // Deleted since the listing.
                None => {
                    lock(&self.committed).remove(&id);
                }
            }
        }
        ok.sort_by(|a, b| (a.time_unix, &a.id).cmp(&(b.time_unix, &b.id)));
        Ok((ok, bad))
    }

    fn delete(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let key = manifest_key(id);
        if self.s3.head(&key).map_err(|e| self.err(e))?.is_none() {
            return Err(StoreError::NoSnapshot(id.clone()));
        }
        self.s3.delete(&key).map_err(|e| self.err(e))?;
        lock(&self.committed).remove(id);
        Ok(())
    }

    fn lock(
        &self,
        disk: &DiskName,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn DiskLock>, StoreError> {
        {
            let mut g = lock(&self.guard);
            if g.locks.contains_key(disk) {
                return Err(StoreError::Locked(disk.clone()));
            }
            g.locks.insert(disk.clone(), base.cloned());
        }
        let held = ObjectLock {
            guard: self.guard.clone(),
            disk: disk.clone(),
        };
        if let Some(b) = base {
            if self
                .s3
                .head(&manifest_key(&b.id))
                .map_err(|e| self.err(e))?
                .is_none()
            {
                return Err(StoreError::NoSnapshot(b.id.clone()));
            }
        }
        // What collections elsewhere doomed since we opened counts as
        // missing for this backup.
        let state = self.read_state()?;
        self.apply_state(&state);
        Ok(Box::new(held))
    }

    fn annotate(&self, id: &SnapshotId, a: &Annotation) -> Result<Manifest, StoreError> {
        let mut m = self.manifest(id)?;
        m.annotate(a);
        self.s3
            .put(&manifest_key(id), &m.encode())
            .map_err(|e| self.err(e))?;
        Ok(m)
    }

    fn gc(&self, opts: &GcOptions, progress: &Progress) -> Result<GcReport, StoreError> {
        gc::collect(self, opts, progress)
    }

    fn usage(&self) -> Result<u64, StoreError> {
        let packs = lock(&self.packs);
        Ok(packs
            .iter()
            .filter(|p| !p.gone && !p.doomed)
            .map(|p| p.size)
            .sum())
    }

    fn describe(&self) -> String {
        self.s3.describe()
    }

    fn chunk_count(&self) -> Option<u64> {
        Some(self.index.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn damaged_parts(&self) -> Vec<String> {
        lock(&self.damaged).clone()
    }
}
