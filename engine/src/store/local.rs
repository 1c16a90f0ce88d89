//! A store in a local folder.
//!
//! ```text
//! STORE/store.json                  {"format": 2}
//! STORE/packs/ab/ab…(16 hex).pack   sealed packs of chunk files (see format::pack)
//! STORE/snapshots/DISK/TIME.json    manifests (see format::manifest)
//! STORE/tmp/ID.pack                 packs that running backups are filling
//! STORE/locks/DISK.lock             per-disk backup locks (flock)
//! ```
//!
//! [`Store::put_chunk`] appends the chunk to one of a few open packs in
//! `tmp/` (one per concurrent writer, so workers do not queue on one file)
//! without fsync; a pack that reaches [`PACK_TARGET`] is sealed with its
//! table of contents. [`Store::sync`] seals the rest and makes them all
//! durable at once through [`fsutil::publish`] (`syncfs`, rename into
//! `packs/`, `syncfs` again). A pack under its final name is therefore
//! always complete, even after a power cut, and a backup costs two
//! filesystem syncs, not one fsync per chunk. The manifest goes through the
//! crash-safe helper after that, so a snapshot is visible only once every
//! chunk it references is durable. `tmp/` is emptied when the store is
//! opened: what is there belonged to a backup that died.
//!
//! Where each chunk lives is kept in memory (about 80 bytes per chunk),
//! loaded from the packs' tables of contents at open. A pack whose table is
//! damaged is reported and its chunks count as missing, so `verify` names
//! the snapshots that need them and the next backup stores them again.

mod gc;
mod packfile;
mod prefetch;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{DiskLock, Store, StoreError};
use crate::digest::ChunkDigest;
use crate::format::manifest::{Annotation, Manifest};
use crate::format::pack;
use crate::fsutil;
use crate::ids::{DiskName, SnapshotId};

/// A pack is sealed once it holds this many bytes. Large enough that a
/// backup creates few files, small enough that garbage collection can
/// rewrite a pack cheaply.
pub const PACK_TARGET: u64 = 32 << 20;
/// Published packs kept open for reading at most (a cache, not a limit on
/// the store).
const MAX_OPEN_PACKS: usize = 256;
/// Chunks of one pack this close together are prefetched as one range
/// (reading a little unneeded data beats another request).
const PREFETCH_GAP: u64 = 256 << 10;
const FORMAT: u32 = 2;
/// The chunks forgotten as damaged, hex digests in a JSON list.
const FORGOTTEN: &str = "damaged.json";

fn read_forgotten(path: &Path) -> Result<DigestSet, StoreError> {
    match fs::read(path) {
        Ok(b) => {
            let v: Vec<String> =
                serde_json::from_slice(&b).map_err(|e| StoreError::Unsupported {
                    path: path.display().to_string(),
                    why: format!("it is damaged ({e}); remove it and run verify again"),
                })?;
            Ok(v.iter().filter_map(|h| h.parse().ok()).collect())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(DigestSet::default()),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// Digests are SHA-256 output: their first bytes are already a good hash.
#[derive(Default)]
struct DigestHasher(u64);
impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= (*b as u64) << (8 * i);
        }
    }
}
type DigestMap<V> = HashMap<ChunkDigest, V, BuildHasherDefault<DigestHasher>>;
type DigestSet = HashSet<ChunkDigest, BuildHasherDefault<DigestHasher>>;

/// What garbage collection must not remove although no committed snapshot
/// references it (see the `gc` module).
#[derive(Default)]
struct Guard {
    /// Disk locks held (running backups).
    writers: usize,
    /// A collection is running.
    gc: bool,
    /// Chunks stored or found present while a backup or a collection ran.
    touched: DigestSet,
    /// Base snapshots of running backups, by lock.
    pins: Vec<(u64, Manifest)>,
    next_pin: u64,
}

impl Guard {
    fn tracking(&self) -> bool {
        self.writers > 0 || self.gc
    }
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

struct PackInfo {
    id: String,
    published: bool,
    /// Deleted by garbage collection; nothing in the index points here.
    removed: bool,
    /// Unpublished packs are always open: their path changes when published.
    file: Option<Arc<File>>,
}

struct Writer {
    pack: u32,
    out: packfile::PackWriter,
    entries: Vec<pack::Entry>,
}

/// A store in a local folder (module doc).
pub struct LocalStore {
    root: PathBuf,
    index: RwLock<DigestMap<Loc>>,
    packs: Mutex<Vec<PackInfo>>,
    writers: Vec<Mutex<Option<Writer>>>,
    next_writer: AtomicUsize,
    sealed: Mutex<Vec<u32>>,
    damaged: Vec<String>,
    counter: AtomicU64,
    guard: Arc<Mutex<Guard>>,
    /// One collection at a time.
    collecting: Mutex<()>,
    /// Collections begun plus collections ended (see
    /// [`LocalStore::collections`]).
    collections: AtomicU64,
    /// Serializes annotation read-modify-writes.
    annotating: Mutex<()>,
    /// Chunk files read ahead by [`FastPaths::prefetch`](super::FastPaths::prefetch), until taken.
    prefetched: prefetch::Prefetcher,
    /// Chunks whose stored copy was found damaged and forgotten, until a
    /// good copy is published (kept in `damaged.json` across restarts).
    forgotten: RwLock<DigestSet>,
    /// Checks that a commit names only what the store holds.
    acceptor: crate::ops::accept::Acceptor,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .finish()
    }
}

struct FlockGuard {
    _flock: nix::fcntl::Flock<File>,
    guard: Arc<Mutex<Guard>>,
    pin: Option<u64>,
}
impl DiskLock for FlockGuard {}
impl Drop for FlockGuard {
    fn drop(&mut self) {
        let mut g = lock(&self.guard);
        g.writers -= 1;
        if let Some(p) = self.pin {
            g.pins.retain(|(n, _)| *n != p);
        }
        if !g.tracking() {
            // Every snapshot those chunks went into is committed (or its
            // backup failed): a collection sees them from the manifests.
            g.touched = DigestSet::default();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalStore {
    /// [`Store::missing`] if it can answer without waiting for a lock:
    /// `None` while a collection or a write holds one. A store server
    /// answers on its network thread this way, without a hand-over to a
    /// blocking thread and back; a collection holds the guard across pack
    /// writes, which the network thread must never wait for.
    pub fn missing_now(&self, digests: &[ChunkDigest]) -> Option<Vec<bool>> {
        let g = match self.guard.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let index = match self.index.try_read() {
            Ok(i) => i,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(Self::answer(g, &index, digests))
    }

    /// Which of `digests` the index lacks; those present are recorded for
    /// a collection under way.
    fn answer(
        mut g: MutexGuard<'_, Guard>,
        index: &DigestMap<Loc>,
        digests: &[ChunkDigest],
    ) -> Vec<bool> {
        let out: Vec<bool> = digests.iter().map(|d| !index.contains_key(d)).collect();
        if g.tracking() {
            for (d, m) in digests.iter().zip(&out) {
                if !m {
                    g.touched.insert(*d);
                }
            }
        }
        out
    }

    /// Garbage collections begun plus those ended in this process: odd
    /// while one runs. Only a collection removes chunks, so while this
    /// stays the same even number, a chunk found present stays present
    /// (a store server relies on it to check a snapshot only where it
    /// differs from its parent).
    pub fn collections(&self) -> u64 {
        self.collections.load(Ordering::SeqCst)
    }

    /// Opens the store at `root`, creating it if needed, and loads the
    /// tables of contents of its packs.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        let io = |p: &Path, e| StoreError::io(p, e);
        // Private even where it existed wider: packs hold guests' data.
        fsutil::create_private_dir(root).map_err(|e| io(root, e))?;
        let marker = root.join("store.json");
        let existing = marker.exists();
        if existing {
            check_format(&marker)?;
        }
        // Also in an existing store: a copy made with a tool that skips
        // empty folders (git, some rsync filters) lacks the empty shards.
        for i in 0..=255u8 {
            let d = root.join("packs").join(format!("{i:02x}"));
            fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        }
        for d in ["snapshots", "tmp", "locks"] {
            fs::create_dir_all(root.join(d)).map_err(|e| io(root, e))?;
        }
        if !existing {
            fsutil::sync_dir(&root.join("packs")).map_err(|e| io(root, e))?;
            fsutil::write_atomic(
                &marker,
                format!("{{\"format\": {FORMAT}}}\n").as_bytes(),
                0o600,
            )
            .map_err(|e| io(&marker, e))?;
        }
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        for e in fs::read_dir(&tmp).map_err(|e| io(&tmp, e))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let writers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let mut store = LocalStore {
            root: root.to_path_buf(),
            index: RwLock::new(DigestMap::default()),
            packs: Mutex::new(Vec::new()),
            writers: (0..writers).map(|_| Mutex::new(None)).collect(),
            next_writer: AtomicUsize::new(0),
            sealed: Mutex::new(Vec::new()),
            damaged: Vec::new(),
            counter: AtomicU64::new(0),
            guard: Default::default(),
            collecting: Mutex::new(()),
            collections: AtomicU64::new(0),
            annotating: Mutex::new(()),
            prefetched: Default::default(),
            forgotten: RwLock::new(read_forgotten(&root.join(FORGOTTEN))?),
            acceptor: Default::default(),
        };
        store.load()?;
        Ok(store)
    }

    fn load(&mut self) -> Result<(), StoreError> {
        let top = self.root.join("packs");
        let mut index = DigestMap::default();
        let mut packs = Vec::new();
        let mut paths: Vec<PathBuf> = Vec::new();
        for shard in fs::read_dir(&top)
            .map_err(|e| StoreError::io(&top, e))?
            .flatten()
        {
            let dir = shard.path();
            for e in fs::read_dir(&dir)
                .map_err(|e| StoreError::io(&dir, e))?
                .flatten()
            {
                let path = e.path();
                let Some(id) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".pack"))
                else {
                    continue;
                };
                match read_toc(&path) {
                    Ok(entries) => {
                        let n = packs.len() as u32;
                        packs.push(PackInfo {
                            id: id.to_string(),
                            published: true,
                            removed: false,
                            file: None,
                        });
                        paths.push(path.clone());
                        let forgotten = self.forgotten.get_mut().unwrap_or_else(|p| p.into_inner());
                        for en in entries {
                            if forgotten.contains(&en.digest) {
                                continue;
                            }
                            let loc = Loc {
                                pack: n,
                                offset: en.offset,
                                len: en.len,
                            };
                            // Two copies (a damaged one and the good copy
                            // stored after it): keep one that reads back.
                            if let Some(old) = index.insert(en.digest, loc) {
                                if !chunk_reads(&paths[old.pack as usize], old)
                                    || chunk_reads(&path, loc)
                                {
                                    continue;
                                }
                                index.insert(en.digest, old);
                            }
                        }
                    }
                    Err(why) => {
                        tracing::warn!(pack = %path.display(), %why, "damaged pack: its chunks count as missing; run verify");
                        self.damaged.push(format!("{}: {why}", path.display()));
                    }
                }
            }
        }
        self.index = RwLock::new(index);
        self.packs = Mutex::new(packs);
        Ok(())
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Packs that could not be read at open, with why.
    pub fn damaged_packs(&self) -> &[String] {
        &self.damaged
    }

    /// Where a chunk's file lies: the pack, its offset and its length
    /// (for tools and tests that need to look at the bytes).
    pub fn locate(&self, d: &ChunkDigest) -> Option<(PathBuf, u64, u32)> {
        let loc = *self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)?;
        let packs = lock(&self.packs);
        let p = &packs[loc.pack as usize];
        Some((self.pack_path(&p.id, p.published), loc.offset, loc.len))
    }

    fn pack_path(&self, id: &str, published: bool) -> PathBuf {
        if published {
            self.root
                .join("packs")
                .join(&id[..2])
                .join(format!("{id}.pack"))
        } else {
            self.root.join("tmp").join(format!("{id}.pack"))
        }
    }

    fn manifest_path(&self, id: &SnapshotId) -> PathBuf {
        self.root
            .join("snapshots")
            .join(id.disk().as_str())
            .join(format!("{}.json", id.time()))
    }

    fn read_manifest(&self, path: &Path) -> Result<Manifest, StoreError> {
        let bytes = fs::read(path).map_err(|e| StoreError::io(path, e))?;
        Manifest::decode(&bytes).map_err(|why| StoreError::BadManifest {
            path: path.display().to_string(),
            why,
        })
    }

    fn new_writer(&self) -> Result<Writer, StoreError> {
        loop {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let seed = format!("{}:{now}:{n}", std::process::id());
            let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()));
            let path = self.pack_path(&id, false);
            let file = match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                r => r.map_err(|e| StoreError::io(&path, e))?,
            };
            let reader = Arc::new(file.try_clone().map_err(|e| StoreError::io(&path, e))?);
            let mut out = packfile::PackWriter::new(file, &path);
            out.append(&pack::header())
                .map_err(|e| StoreError::io(&path, e))?;
            let mut packs = lock(&self.packs);
            packs.push(PackInfo {
                id,
                published: false,
                removed: false,
                file: Some(reader),
            });
            return Ok(Writer {
                pack: packs.len() as u32 - 1,
                out,
                entries: Vec::new(),
            });
        }
    }

    /// Writes the table of contents; the pack waits in `tmp/` for `sync`.
    /// On failure the writer stays where it is and a later seal retries:
    /// its chunks are indexed already and other backups may rely on them,
    /// so they must be published eventually or the process must die (which
    /// forgets them), never silently dropped.
    fn seal(&self, w: &mut Writer) -> Result<(), StoreError> {
        let path = {
            let packs = lock(&self.packs);
            self.pack_path(&packs[w.pack as usize].id, false)
        };
        let toc = pack::encode_toc(&w.entries, w.out.len());
        w.out.finish(&toc).map_err(|e| StoreError::io(&path, e))?;
        lock(&self.sealed).push(w.pack);
        Ok(())
    }

    fn read_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        let loc = *self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .ok_or(StoreError::MissingChunk(*digest))?;
        let filling = {
            let packs = lock(&self.packs);
            let p = &packs[loc.pack as usize];
            !p.published && !p.removed
        };
        if filling {
            // Its bytes may still be in the writer's memory.
            for slot in &self.writers {
                if let Some(w) = lock(slot).as_mut().filter(|w| w.pack == loc.pack) {
                    return w.out.read_at(loc.offset, loc.len as usize).map_err(|e| {
                        let (path, _, _) = self.locate(digest).unwrap_or_default();
                        StoreError::io(path, e)
                    });
                }
            }
        }
        let f = self.pack_file(loc.pack)?;
        let mut buf = vec![0u8; loc.len as usize];
        f.read_exact_at(&mut buf, loc.offset).map_err(|e| {
            let (path, _, _) = self.locate(digest).unwrap_or_default();
            StoreError::io(path, e)
        })?;
        Ok(buf)
    }

    fn save_forgotten(&self, f: &DigestSet) -> Result<(), StoreError> {
        let path = self.root.join(FORGOTTEN);
        let list: Vec<String> = f.iter().map(|d| d.hex()).collect();
        let bytes = serde_json::to_vec(&list).expect("strings serialize");
        fsutil::write_atomic(&path, &bytes, 0o600).map_err(|e| StoreError::io(&path, e))
    }

    /// Syncs the chunks, then writes the manifest (no presence check: the
    /// [`crate::ops::accept::Acceptor`] calls this once it checked).
    pub(crate) fn publish_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let path = self.manifest_path(&m.id);
        if path.exists() {
            return Err(StoreError::Exists(m.id.clone()));
        }
        self.sync_packs()?;
        let dir = path.parent().expect("manifest has a folder");
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
            fsutil::sync_dir(&self.root.join("snapshots")).map_err(|e| StoreError::io(dir, e))?;
        }
        fsutil::write_atomic(&path, &m.encode(), 0o600).map_err(|e| StoreError::io(&path, e))
    }

    fn sync_packs(&self) -> Result<(), StoreError> {
        // Success means every chunk indexed so far is durable: a backup may
        // have skipped a chunk because another one had just staged it.
        for slot in &self.writers {
            let mut w = lock(slot);
            if let Some(open) = w.as_mut() {
                self.seal(open)?;
                *w = None;
            }
        }
        let batch = std::mem::take(&mut *lock(&self.sealed));
        if batch.is_empty() {
            return Ok(());
        }
        let moves: Vec<(PathBuf, PathBuf)> = {
            let packs = lock(&self.packs);
            batch
                .iter()
                .map(|&n| {
                    let id = &packs[n as usize].id;
                    (self.pack_path(id, false), self.pack_path(id, true))
                })
                .collect()
        };
        if let Err(e) = fsutil::publish(&self.root, &moves) {
            // Still sealed and staged: a later sync tries again.
            lock(&self.sealed).extend(batch);
            return Err(StoreError::io(&self.root, e));
        }
        let mut packs = lock(&self.packs);
        for n in batch {
            packs[n as usize].published = true;
        }
        drop(packs);
        self.heal_forgotten()
    }

    /// Every chunk indexed now is durable: a forgotten chunk stored again
    /// is healed and need not be skipped at the next start.
    fn heal_forgotten(&self) -> Result<(), StoreError> {
        if self
            .forgotten
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Ok(());
        }
        let mut f = self.forgotten.write().unwrap_or_else(|p| p.into_inner());
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let before = f.len();
        f.retain(|d| !index.contains_key(d));
        drop(index);
        if f.len() != before {
            tracing::info!(chunks = before - f.len(), "damaged chunks stored again");
            self.save_forgotten(&f)?;
        }
        Ok(())
    }

    fn pack_file(&self, n: u32) -> Result<Arc<File>, StoreError> {
        let mut packs = lock(&self.packs);
        if let Some(f) = &packs[n as usize].file {
            return Ok(f.clone());
        }
        let open = packs
            .iter()
            .filter(|p| p.published && p.file.is_some())
            .count();
        if open >= MAX_OPEN_PACKS {
            for p in packs.iter_mut().filter(|p| p.published) {
                p.file = None;
            }
        }
        let p = &mut packs[n as usize];
        let path = self.pack_path(&p.id, p.published);
        if p.removed {
            return Err(StoreError::io(
                &path,
                io::Error::from(io::ErrorKind::NotFound),
            ));
        }
        let f = Arc::new(File::open(&path).map_err(|e| StoreError::io(&path, e))?);
        p.file = Some(f.clone());
        Ok(f)
    }
}

fn check_format(marker: &Path) -> Result<(), StoreError> {
    let bytes = fs::read(marker).map_err(|e| StoreError::io(marker, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Unsupported {
            path: marker.display().to_string(),
            why: format!("it is not valid JSON ({e})"),
        })?;
    match v.get("format").and_then(|f| f.as_u64()) {
        Some(f) if f == FORMAT as u64 => Ok(()),
        Some(1) => Err(StoreError::Unsupported {
            path: marker.display().to_string(),
            why: "it is a format 1 store (one file per chunk, written by a pre-release build); \
                  move it aside and let the agent create a new store"
                .into(),
        }),
        other => Err(StoreError::Unsupported {
            path: marker.display().to_string(),
            why: format!("format {other:?} is not one this version reads ({FORMAT})"),
        }),
    }
}

/// Whether the chunk file at `loc` of the pack at `path` passes its
/// checksum.
fn chunk_reads(path: &Path, loc: Loc) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; loc.len as usize];
    f.read_exact_at(&mut buf, loc.offset).is_ok() && crate::format::chunk::decode(&buf).is_ok()
}

fn read_toc(path: &Path) -> Result<Vec<pack::Entry>, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; pack::HEADER_LEN as usize];
    f.read_exact_at(&mut head, 0).map_err(|e| e.to_string())?;
    pack::check_header(&head).map_err(|e| e.to_string())?;
    let mut t = [0u8; pack::TRAILER_LEN as usize];
    f.read_exact_at(&mut t, len - pack::TRAILER_LEN)
        .map_err(|e| e.to_string())?;
    let trailer = pack::decode_trailer(&t, len).map_err(|e| e.to_string())?;
    let mut toc = vec![0u8; trailer.toc_len()];
    f.read_exact_at(&mut toc, trailer.toc_offset)
        .map_err(|e| e.to_string())?;
    pack::decode_toc(&toc, &trailer).map_err(|e| e.to_string())
}

impl Store for LocalStore {
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError> {
        // Under the guard: a collection cannot remove a chunk between our
        // "present" and its record in `touched`.
        let g = lock(&self.guard);
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        Ok(Self::answer(g, &index, digests))
    }

    fn put_chunk(&self, digest: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError> {
        let present = |s: &Self| {
            let mut g = lock(&s.guard);
            let here = s
                .index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(digest);
            if here && g.tracking() {
                g.touched.insert(*digest);
            }
            here
        };
        if present(self) {
            return Ok(0);
        }
        // A free writer if there is one, else wait for "ours".
        let n = self.writers.len();
        let start = self.next_writer.fetch_add(1, Ordering::Relaxed) % n;
        let mut slot = (0..n)
            .find_map(|i| self.writers[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| lock(&self.writers[start]));
        if present(self) {
            return Ok(0);
        }
        if slot.is_none() {
            *slot = Some(self.new_writer()?);
        }
        let w = slot.as_mut().expect("just set");
        let offset = match w.out.append(file) {
            Ok(at) => at,
            Err(e) => {
                let packs = lock(&self.packs);
                return Err(StoreError::io(
                    self.pack_path(&packs[w.pack as usize].id, false),
                    e,
                ));
            }
        };
        let len = file.len() as u32;
        w.entries.push(pack::Entry {
            digest: *digest,
            offset,
            len,
        });
        let mut g = lock(&self.guard);
        if g.tracking() {
            g.touched.insert(*digest);
        }
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                *digest,
                Loc {
                    pack: w.pack,
                    offset,
                    len,
                },
            );
        drop(g);
        if w.out.len() >= PACK_TARGET {
            self.seal(w)?;
            *slot = None;
        }
        Ok(len as u64)
    }

    fn get_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        if let Some(f) = self.prefetched.take(digest) {
            return Ok(f);
        }
        match self.read_chunk(digest) {
            // A collection moved it between our lookup and the read.
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                self.read_chunk(digest)
            }
            r => r,
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.sync_packs()
    }

    fn annotate(&self, id: &SnapshotId, a: &Annotation) -> Result<Manifest, StoreError> {
        let _one = lock(&self.annotating);
        let mut m = self.manifest(id)?;
        m.annotate(a);
        let path = self.manifest_path(id);
        fsutil::write_atomic(&path, &m.encode(), 0o600).map_err(|e| StoreError::io(&path, e))?;
        Ok(m)
    }

    fn gc(
        &self,
        opts: &super::GcOptions,
        progress: &crate::progress::Progress,
    ) -> Result<super::GcReport, StoreError> {
        gc::collect(self, opts, progress, gc::Stop::Never)
    }

    fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
        // Checked like a store server's commit: a snapshot never names a
        // chunk the store lacks (one forgotten as damaged meanwhile, a
        // pack lost to a damaged table of contents).
        let mut failed = None;
        let r = self
            .acceptor
            .accept_with(self, m, &HashMap::new(), &|_| true, || {
                self.publish_manifest(m).map_err(|e| {
                    let msg = StoreError::Incomplete(e.to_string());
                    failed = Some(e);
                    msg
                })
            });
        match (r, failed) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(StoreError::Incomplete(e.to_string())),
        }
    }

    fn forget_damaged(&self, digests: &[ChunkDigest]) -> Result<u64, StoreError> {
        let mut bad = Vec::new();
        for d in digests {
            let damaged = match self.read_chunk(d) {
                Ok(file) => crate::format::chunk::decode_verified(&file, d).is_err(),
                Err(StoreError::MissingChunk(_)) => false,
                Err(_) => true,
            };
            if damaged {
                bad.push(*d);
            }
        }
        if bad.is_empty() {
            return Ok(0);
        }
        let mut f = self.forgotten.write().unwrap_or_else(|p| p.into_inner());
        f.extend(bad.iter().copied());
        self.save_forgotten(&f)?;
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        for d in &bad {
            index.remove(d);
        }
        tracing::warn!(
            chunks = bad.len(),
            "damaged chunks forgotten: the next backup that reads their data stores them again"
        );
        Ok(bad.len() as u64)
    }

    fn damaged_parts(&self) -> Vec<String> {
        self.damaged.clone()
    }

    fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let path = self.manifest_path(id);
        if !path.exists() {
            return Err(StoreError::NoSnapshot(id.clone()));
        }
        self.read_manifest(&path)
    }

    fn list(
        &self,
        disk: Option<&DiskName>,
    ) -> Result<(Vec<Manifest>, Vec<StoreError>), StoreError> {
        let snaps = self.root.join("snapshots");
        let mut out = Vec::new();
        let mut bad = Vec::new();
        let disks: Vec<PathBuf> = match disk {
            Some(d) => vec![snaps.join(d.as_str())],
            None => fs::read_dir(&snaps)
                .map_err(|e| StoreError::io(&snaps, e))?
                .flatten()
                .map(|e| e.path())
                .collect(),
        };
        for dir in disks {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "json") {
                    match self.read_manifest(&p) {
                        Ok(m) => out.push(m),
                        Err(e) => bad.push(e),
                    }
                }
            }
        }
        out.sort_by_key(|m| (m.time_unix, m.id.to_string()));
        Ok((out, bad))
    }

    fn delete(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let path = self.manifest_path(id);
        if !path.exists() {
            return Err(StoreError::NoSnapshot(id.clone()));
        }
        fsutil::remove_durable(&path).map_err(|e| StoreError::io(&path, e))
    }

    fn lock(
        &self,
        disk: &DiskName,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn DiskLock>, StoreError> {
        let path = self.root.join("locks").join(format!("{disk}.lock"));
        let f = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => {
                let mut g = lock(&self.guard);
                g.writers += 1;
                let pin = base.map(|m| {
                    g.next_pin += 1;
                    let n = g.next_pin;
                    g.pins.push((n, m.clone()));
                    n
                });
                let held = Box::new(FlockGuard {
                    _flock: l,
                    guard: self.guard.clone(),
                    pin,
                });
                drop(g);
                // Pinned first, then looked for: a deletion after this
                // check no longer matters to a collection.
                match base {
                    Some(m) if !self.manifest_path(&m.id).exists() => {
                        Err(StoreError::NoSnapshot(m.id.clone()))
                    }
                    _ => Ok(held),
                }
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StoreError::Locked(disk.clone())),
            Err((_, e)) => Err(StoreError::io(
                &path,
                io::Error::from_raw_os_error(e as i32),
            )),
        }
    }

    fn chunk_count(&self) -> Option<u64> {
        Some(self.index.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn fast_paths(&self) -> Option<&dyn super::FastPaths> {
        Some(self)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn usage(&self) -> Result<u64, StoreError> {
        fn walk(p: &Path, total: &mut u64) {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path(), total),
                        Ok(_) => *total += e.metadata().map(|m| m.len()).unwrap_or(0),
                        Err(_) => {}
                    }
                }
            }
        }
        let mut total = 0;
        walk(&self.root, &mut total);
        Ok(total)
    }
}

/// A local store reads ahead; its puts are the plain ones.
impl super::FastPaths for LocalStore {
    fn store(&self) -> &dyn Store {
        self
    }

    /// Reads the chunks of published packs ahead (see `prefetch`), one
    /// request per run of neighbouring chunks.
    fn prefetch(&self, digests: &[ChunkDigest]) {
        let mut locs: Vec<(Loc, ChunkDigest)> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            digests
                .iter()
                .filter_map(|d| index.get(d).map(|l| (*l, *d)))
                .collect()
        };
        locs.sort_by_key(|(l, _)| (l.pack, l.offset));
        // Reading a little unneeded data beats another request.
        let mut runs: Vec<(u32, prefetch::Run)> = Vec::new();
        for (l, d) in locs {
            let end = l.offset + l.len as u64;
            match runs.last_mut() {
                Some((p, r)) if *p == l.pack && l.offset <= r.end + PREFETCH_GAP => {
                    r.end = r.end.max(end);
                    r.members.push((l.offset, l.len, d));
                }
                _ => runs.push((
                    l.pack,
                    prefetch::Run {
                        path: PathBuf::new(),
                        start: l.offset,
                        end,
                        members: vec![(l.offset, l.len, d)],
                    },
                )),
            }
        }
        for (pack, mut run) in runs {
            {
                let packs = lock(&self.packs);
                let p = &packs[pack as usize];
                // A pack being filled is read from its writer's memory.
                if !p.published || p.removed {
                    continue;
                }
                run.path = self.pack_path(&p.id, true);
            }
            self.prefetched.request(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        super::super::conformance::run(&s);
    }

    #[test]
    fn missing_now_answers_like_missing_and_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let (file, _) = crate::format::chunk::encode(b"here", &mut z);
        let here = ChunkDigest::of(b"here");
        s.put_chunk(&here, &file).unwrap();
        let ask = [here, ChunkDigest::of(b"absent")];
        assert_eq!(s.missing_now(&ask), Some(vec![false, true]));
        assert_eq!(s.missing_now(&ask).unwrap(), s.missing(&ask).unwrap());
        // A collection holds the guard across pack writes; a writer holds
        // the index. Either way: no answer now, rather than a wait.
        let g = s.guard.lock().unwrap();
        assert_eq!(s.missing_now(&ask), None);
        drop(g);
        let w = s.index.write().unwrap();
        assert_eq!(s.missing_now(&ask), None);
        drop(w);
        assert_eq!(s.missing_now(&ask), Some(vec![false, true]));
    }

    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn staged_chunks_are_published_by_sync_and_die_with_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let d = ChunkDigest::of(b"x");
        s.put_chunk(&d, b"file").unwrap();
        assert_eq!(count(&dir.path().join("tmp")), 1, "one open pack");
        assert_eq!(s.missing(&[d]).unwrap(), vec![false]);
        assert_eq!(s.get_chunk(&d).unwrap(), b"file", "readable before sync");
        drop(s);
        // A new process (reopen) cleans what the dead one staged.
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(s.missing(&[d]).unwrap(), vec![true]);
        assert_eq!(count(&dir.path().join("tmp")), 0);
        s.put_chunk(&d, b"file").unwrap();
        s.sync().unwrap();
        let (path, off, len) = s.locate(&d).unwrap();
        assert!(path.starts_with(dir.path().join("packs")), "{path:?}");
        assert_eq!((off, len), (pack::HEADER_LEN, 4));
        assert_eq!(count(&dir.path().join("tmp")), 0);
        drop(s);
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get_chunk(&d).unwrap(),
            b"file",
            "found again after reopen"
        );
    }

    #[test]
    fn a_commit_makes_the_chunks_put_before_it_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let page = crate::format::index::encode_page(&[ChunkDigest::ZERO]);
        let d = ChunkDigest::of(&page);
        let mut z = crate::format::chunk::compressor(1).unwrap();
        let (file, _) = crate::format::chunk::encode(&page, &mut z);
        s.put_chunk(&d, &file).unwrap();
        // No sync: commit's own must publish the staged pack.
        s.commit(&super::super::conformance::manifest("vm", 1, vec![d]))
            .unwrap();
        assert_eq!(count(&dir.path().join("tmp")), 0);
        drop(s);
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(s.get_chunk(&d).unwrap(), file);
    }

    #[test]
    fn chunks_read_back_alike_from_a_filling_pack_a_sealed_one_and_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        // Odd sizes, several MiB in all: chunks straddle the writer's
        // buffers, some on disk already, some still in memory.
        let files: Vec<(ChunkDigest, Vec<u8>)> = (0..40u32)
            .map(|i| {
                let f: Vec<u8> = (0..100_000 + i as usize * 997)
                    .map(|j| (j as u32 ^ i.wrapping_mul(2_654_435_761)) as u8)
                    .collect();
                (ChunkDigest::of(&f), f)
            })
            .collect();
        for (d, f) in &files {
            s.put_chunk(d, f).unwrap();
        }
        for (d, f) in &files {
            assert_eq!(&s.get_chunk(d).unwrap(), f, "before sync");
        }
        s.sync().unwrap();
        let all: Vec<ChunkDigest> = files.iter().map(|(d, _)| *d).collect();
        super::super::FastPaths::prefetch(&s, &all);
        let (bytes, reading) = s.prefetched.held();
        assert!(bytes + reading > 0, "read ahead or being read");
        for (d, f) in &files {
            assert_eq!(&s.get_chunk(d).unwrap(), f, "read ahead");
        }
        assert_eq!(s.prefetched.held(), (0, 0), "each handed out once");
        for (d, f) in files.iter().rev() {
            assert_eq!(&s.get_chunk(d).unwrap(), f, "read again");
        }
        drop(s);
        let s = LocalStore::open(dir.path()).unwrap();
        for (d, f) in &files {
            assert_eq!(&s.get_chunk(d).unwrap(), f, "after reopen");
        }
    }

    #[test]
    fn packs_are_sealed_at_the_target_size() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let big = vec![7u8; (PACK_TARGET / 3) as usize + 1];
        let mut ds = Vec::new();
        for i in 0..7u8 {
            let mut c = big.clone();
            c[0] = i;
            let d = ChunkDigest::of(&c);
            s.put_chunk(&d, &c).unwrap();
            ds.push((d, c));
        }
        s.sync().unwrap();
        drop(s);
        let s = LocalStore::open(dir.path()).unwrap();
        let mut packs: Vec<PathBuf> = ds.iter().map(|(d, _)| s.locate(d).unwrap().0).collect();
        packs.dedup();
        assert!(packs.len() >= 3, "{packs:?}");
        for (d, c) in &ds {
            assert_eq!(&s.get_chunk(d).unwrap(), c);
        }
    }

    #[test]
    fn a_damaged_pack_is_reported_and_its_chunks_are_missing() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let (a, b) = (ChunkDigest::of(b"a"), ChunkDigest::of(b"b"));
        s.put_chunk(&a, b"aaaa").unwrap();
        s.sync().unwrap();
        s.put_chunk(&b, b"bbbb").unwrap();
        s.sync().unwrap();
        let (path, _, _) = s.locate(&a).unwrap();
        drop(s);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 1; // inside the table of contents
        fs::write(&path, bytes).unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(s.damaged_packs().len(), 1);
        assert_eq!(s.missing(&[a, b]).unwrap(), vec![true, false]);
        // Storing it again heals the store.
        s.put_chunk(&a, b"aaaa").unwrap();
        s.sync().unwrap();
        assert_eq!(s.get_chunk(&a).unwrap(), b"aaaa");
    }

    #[test]
    fn a_format_1_store_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("store.json"), "{\"format\": 1}\n").unwrap();
        let e = LocalStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("format 1") && e.contains("move it aside"), "{e}");
    }
}
