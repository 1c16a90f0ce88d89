//! The `Store` trait: where chunks and manifests live. Local folders
//! implement it here ([`local`]); remote stores implement it in the `api`
//! crate. Every implementation must pass [`conformance`].
//!
//! The trait holds the core operations; what only some stores do faster
//! (owned and raw puts, read-ahead, held index pages) is the optional
//! [`FastPaths`] extension, reached through `store.fast()`.
//!
//! Durability contract: [`Store::put_chunk`] may stage a chunk; it becomes
//! durable at the next [`Store::sync`]. [`Store::commit`] writes a manifest
//! and must only be called after a `sync` that followed the last put of
//! every chunk the manifest references, so a snapshot is never visible
//! before its data.

pub mod chunkcache;
pub mod conformance;
pub mod local;
pub mod memory;
pub mod pages;
pub mod readahead;

use crate::digest::ChunkDigest;
use crate::format::manifest::{Annotation, Manifest};
use crate::ids::{DiskName, SnapshotId};
use crate::progress::Progress;

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The chunk is not in the store.
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkDigest),
    /// No such snapshot.
    #[error("no snapshot {0}; `novabackup snapshots` lists them")]
    NoSnapshot(SnapshotId),
    /// A manifest is damaged.
    #[error("snapshot manifest {path} is damaged: {why}")]
    BadManifest {
        /// The manifest file.
        path: String,
        /// What was wrong.
        why: String,
    },
    /// The snapshot exists already.
    #[error("snapshot {0} already exists")]
    Exists(SnapshotId),
    /// Another backup holds the disk's lock.
    #[error("another backup of disk {0} is running; wait for it to finish")]
    Locked(DiskName),
    /// The store is full.
    #[error(
        "the store at {path} is out of space ({source}); free space or prune snapshots, then retry"
    )]
    Full {
        /// The store folder.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The folder holds a store this version cannot use.
    #[error("cannot use the store described by {path}: {why}")]
    Unsupported {
        /// The store's marker file.
        path: String,
        /// Why, and what to do.
        why: String,
    },
    /// A store server failed or could not be reached.
    #[error("the store server at {url} failed: {why}")]
    Remote {
        /// The server.
        url: String,
        /// What went wrong, with the server's own message when it sent one.
        why: String,
    },
    /// Garbage collection cannot run now or here.
    #[error("garbage collection refused: {0}")]
    Gc(String),
    /// Only annotations of a snapshot may change.
    #[error("snapshot {0}: only its protection and verification may change")]
    Immutable(SnapshotId),
    /// A snapshot names a page or chunk the store does not hold.
    #[error("{0}")]
    Incomplete(String),
    /// Any other I/O error.
    #[error("store I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Wraps an I/O error, recognising a full disk.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> StoreError {
        let path = path.as_ref().display().to_string();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::Full { path, source },
            _ => StoreError::Io { path, source },
        }
    }
}

/// How a garbage collection trades copying against space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcOptions {
    /// Rewrite only packs at least this many percent unreferenced (0, the
    /// default: every pack with anything unreferenced, so every
    /// unreferenced chunk goes). A pack is rewritten whole to drop part of
    /// it; on a big store a threshold such as 20 saves most of the copying.
    pub min_garbage_percent: u8,
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Snapshots whose references were kept.
    pub snapshots: u64,
    /// Distinct chunks and index pages still referenced.
    pub live_chunks: u64,
    /// Chunks and index pages removed.
    pub chunks_removed: u64,
    /// Packs looked at.
    pub packs_scanned: u64,
    /// Packs deleted whole (nothing in them was referenced).
    pub packs_deleted: u64,
    /// Packs rewritten without their unreferenced chunks.
    pub packs_rewritten: u64,
    /// Packs left alone because their unreferenced share was under the
    /// threshold.
    #[serde(default)]
    pub packs_below_threshold: u64,
    /// Unreferenced bytes those packs still hold.
    #[serde(default)]
    pub bytes_left: u64,
    /// Store bytes before.
    pub bytes_before: u64,
    /// Store bytes after.
    pub bytes_after: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Held while a backup of one disk runs; dropping it releases the lock.
pub trait DiskLock: Send {}

/// A content-addressed store of chunks, with snapshot manifests.
pub trait Store: Send + Sync {
    /// For each digest, whether the store lacks it (staged chunks count
    /// as present).
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError>;
    /// Stores an encoded chunk file under `digest` (the caller checked it).
    fn put_chunk(&self, digest: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError>;
    /// The encoded chunk file of `digest`.
    fn get_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError>;

    /// Makes every chunk put so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// Makes every chunk put so far durable, as [`Store::sync`] does, then
    /// the snapshot visible: a visible snapshot never names a chunk that a
    /// crash could lose. Fails if its id exists.
    fn commit(&self, manifest: &Manifest) -> Result<(), StoreError>;
    /// One manifest.
    fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError>;
    /// Manifests, oldest first, optionally of one disk. Damaged manifests
    /// are reported in the second list, not skipped silently.
    fn list(&self, disk: Option<&DiskName>)
        -> Result<(Vec<Manifest>, Vec<StoreError>), StoreError>;
    /// Removes a snapshot (its chunks stay until garbage collection).
    fn delete(&self, id: &SnapshotId) -> Result<(), StoreError>;
    /// Takes the per-disk backup lock, or fails at once if it is held.
    /// `base` is the snapshot the backup builds on: while the lock is held,
    /// garbage collection keeps everything it references even if it is
    /// deleted meanwhile. Fails with [`StoreError::NoSnapshot`] (and holds
    /// nothing) if `base` is gone by the time it is pinned.
    fn lock(
        &self,
        disk: &DiskName,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn DiskLock>, StoreError>;
    /// Sets a snapshot's operator annotations (protection, verification)
    /// and returns the updated manifest. Nothing else of a manifest changes.
    fn annotate(&self, id: &SnapshotId, a: &Annotation) -> Result<Manifest, StoreError>;
    /// Removes every chunk and index page that no snapshot references.
    /// Safe while backups run: what a backup holding a [`DiskLock`] stored,
    /// found present or builds on is kept. A crash part-way loses nothing;
    /// the next run finishes the job.
    fn gc(&self, opts: &GcOptions, progress: &Progress) -> Result<GcReport, StoreError>;
    /// Bytes used by chunks and manifests.
    fn usage(&self) -> Result<u64, StoreError>;
    /// Where the store is (a folder or a URL), for people.
    fn describe(&self) -> String;
    /// Distinct chunks stored, when that is cheap to know.
    fn chunk_count(&self) -> Option<u64> {
        None
    }
    /// Forgets those of `digests` whose stored copy is damaged or
    /// unreadable (the store checks each itself), so that [`Store::missing`]
    /// reports them and the next put stores a good copy. Returns how many
    /// were forgotten. Stores that cannot check their copies forget none.
    fn forget_damaged(&self, _digests: &[ChunkDigest]) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Parts of the store found unreadable (a pack whose table of contents
    /// is damaged), with why; verify reports them.
    fn damaged_parts(&self) -> Vec<String> {
        Vec::new()
    }
    /// The store's own [`FastPaths`], if it has any; callers reach them
    /// (or the plain behaviour) through [`dyn Store::fast`].
    fn fast_paths(&self) -> Option<&dyn FastPaths> {
        None
    }
}

/// Optional fast paths of a store: owned and raw puts, index pages held
/// for the commit, read-ahead and send hints, chunk sums left to the
/// store. A store server's client has them all (each saves a copy or a
/// round trip); a local store reads ahead. Each default is the plain
/// behaviour over [`FastPaths::store`], so a store overrides only what it
/// does better; the conformance suite runs every one on every store.
pub trait FastPaths: Send + Sync {
    /// The store these paths belong to.
    fn store(&self) -> &dyn Store;

    /// [`Store::put_chunk`] of a file the caller no longer needs: a store
    /// that keeps the bytes for later (a store server's upload queue)
    /// takes them without a copy.
    fn put_chunk_owned(&self, digest: &ChunkDigest, file: Vec<u8>) -> Result<u64, StoreError> {
        let r = self.store().put_chunk(digest, &file);
        crate::bufpool::FILES.give(file);
        r
    }
    /// Stores a chunk kept raw, whose file is `head`
    /// ([`crate::format::chunk::raw_head`]) and then `plain`, a read
    /// buffer given back to [`crate::bufpool::READS`] once stored. A store
    /// server's queue sends the two as they are; the default joins them
    /// into one file for [`FastPaths::put_chunk_owned`].
    fn put_raw_chunk(
        &self,
        digest: &ChunkDigest,
        head: [u8; crate::format::chunk::HEADER_LEN],
        plain: Vec<u8>,
    ) -> Result<u64, StoreError> {
        let mut file = crate::bufpool::FILES.take_empty(head.len() + plain.len());
        file.extend_from_slice(&head);
        file.extend_from_slice(&plain);
        crate::bufpool::READS.give(plain);
        self.put_chunk_owned(digest, file)
    }
    /// [`FastPaths::put_chunk_owned`] of an index page, the last a backup
    /// puts before its commit. A store server's client holds these back
    /// and sends them inside the commit request: one round trip fewer,
    /// and the server has the pages it must read to check the snapshot
    /// in hand instead of reading them back from disk.
    fn put_index_page(&self, digest: &ChunkDigest, file: Vec<u8>) -> Result<u64, StoreError> {
        self.put_chunk_owned(digest, file)
    }
    /// Hints that these chunks will be read soon, so a store can start
    /// fetching them while the caller works on earlier ones (a restore
    /// from a store larger than memory). Best effort; the default does
    /// nothing.
    fn prefetch(&self, _digests: &[ChunkDigest]) {}
    /// Hints that no chunk follows soon (a backup's data is all put), so
    /// a store that holds chunks back to send them in batches sends what
    /// it holds now, while the caller builds the index. Best effort:
    /// failures surface at [`Store::sync`] or [`Store::commit`]; the
    /// default does nothing.
    fn send_pending(&self) {}

    /// Whether this store sums chunk files itself: true when `put_chunk`
    /// takes files with a zero checksum ([`crate::format::chunk::fill_sum`]).
    /// A store server does, having to read every upload anyway to check
    /// its digest; the agent then skips an xxh3 pass over every byte
    /// it sends (TLS and the digest check cover the way there).
    fn sums_chunks(&self) -> bool {
        false
    }
}

/// A store with none of its own fast paths: the defaults.
struct Plain<'a>(&'a dyn Store);

impl FastPaths for Plain<'_> {
    fn store(&self) -> &dyn Store {
        self.0
    }
}

/// A store's fast paths, its own or the defaults ([`dyn Store::fast`]).
pub struct Fast<'a>(FastInner<'a>);

enum FastInner<'a> {
    Own(&'a dyn FastPaths),
    Plain(Plain<'a>),
}

impl<'a> std::ops::Deref for Fast<'a> {
    type Target = dyn FastPaths + 'a;
    fn deref(&self) -> &Self::Target {
        match &self.0 {
            FastInner::Own(f) => *f,
            FastInner::Plain(p) => p,
        }
    }
}

impl dyn Store + '_ {
    /// This store's fast paths, or the plain behaviour where it has none.
    pub fn fast(&self) -> Fast<'_> {
        Fast(match self.fast_paths() {
            Some(f) => FastInner::Own(f),
            None => FastInner::Plain(Plain(self)),
        })
    }
}
