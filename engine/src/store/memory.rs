//! A store in memory: the operations' unit tests run on it, and it passes
//! the conformance suite like every store. It can be told to fill up
//! ([`MemoryStore::with_capacity`]) and to damage a manifest
//! ([`MemoryStore::damage_manifest`]), the failures tests must cover.
//!
//! Manifests are kept encoded, as a store on disk keeps them, so a damaged
//! one fails to decode exactly where a real one would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::digest::ChunkDigest;
use crate::format::manifest::{Annotation, Manifest};
use crate::ids::{DiskName, SnapshotId};
use crate::progress::Progress;
use crate::store::pages::load_page;
use crate::store::{DiskLock, GcOptions, GcReport, Store, StoreError};

#[derive(Default)]
struct Inner {
    chunks: HashMap<ChunkDigest, Vec<u8>>,
    manifests: BTreeMap<SnapshotId, Vec<u8>>,
    /// Held disk locks, with the base each pins.
    locks: HashMap<DiskName, Option<Manifest>>,
}

/// A store in memory.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    capacity: Option<u64>,
}

struct MemoryLock {
    inner: Arc<Mutex<Inner>>,
    disk: DiskName,
}

impl DiskLock for MemoryLock {}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .locks
            .remove(&self.disk);
    }
}

impl MemoryStore {
    /// An empty store of unlimited size.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// An empty store whose chunks may take at most `bytes`; a put beyond
    /// that fails as a full disk does ([`StoreError::Full`]).
    pub fn with_capacity(bytes: u64) -> MemoryStore {
        MemoryStore {
            capacity: Some(bytes),
            ..Default::default()
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overwrites a manifest's stored bytes with garbage.
    pub fn damage_manifest(&self, id: &SnapshotId) {
        if let Some(b) = self.inner().manifests.get_mut(id) {
            *b = b"{ damaged".to_vec();
        }
    }

    /// Removes a chunk behind the store's back (a lost file).
    pub fn lose_chunk(&self, digest: &ChunkDigest) {
        self.inner().chunks.remove(digest);
    }

    fn decode(id: &SnapshotId, bytes: &[u8]) -> Result<Manifest, StoreError> {
        Manifest::decode(bytes).map_err(|why| StoreError::BadManifest {
            path: format!("memory:{id}"),
            why,
        })
    }
}

impl Store for MemoryStore {
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError> {
        let g = self.inner();
        Ok(digests.iter().map(|d| !g.chunks.contains_key(d)).collect())
    }

    fn put_chunk(&self, digest: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError> {
        let mut g = self.inner();
        if g.chunks.contains_key(digest) {
            return Ok(0);
        }
        if let Some(cap) = self.capacity {
            let used: u64 = g.chunks.values().map(|c| c.len() as u64).sum();
            if used + file.len() as u64 > cap {
                return Err(StoreError::io(
                    "memory",
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
        }
        g.chunks.insert(*digest, file.to_vec());
        Ok(file.len() as u64)
    }

    fn get_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        self.inner()
            .chunks
            .get(digest)
            .cloned()
            .ok_or(StoreError::MissingChunk(*digest))
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
        let mut g = self.inner();
        if g.manifests.contains_key(&m.id) {
            return Err(StoreError::Exists(m.id.clone()));
        }
        g.manifests.insert(m.id.clone(), m.encode());
        Ok(())
    }

    fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let bytes = self
            .inner()
            .manifests
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NoSnapshot(id.clone()))?;
        Self::decode(id, &bytes)
    }

    fn list(
        &self,
        disk: Option<&DiskName>,
    ) -> Result<(Vec<Manifest>, Vec<StoreError>), StoreError> {
        let g = self.inner();
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for (id, bytes) in &g.manifests {
            if disk.is_some_and(|d| id.disk() != d) {
                continue;
            }
            match Self::decode(id, bytes) {
                Ok(m) => ok.push(m),
                Err(e) => bad.push(e),
            }
        }
        ok.sort_by(|a, b| (a.time_unix, &a.id).cmp(&(b.time_unix, &b.id)));
        Ok((ok, bad))
    }

    fn delete(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.inner()
            .manifests
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| StoreError::NoSnapshot(id.clone()))
    }

    fn lock(
        &self,
        disk: &DiskName,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn DiskLock>, StoreError> {
        let mut g = self.inner();
        if g.locks.contains_key(disk) {
            return Err(StoreError::Locked(disk.clone()));
        }
        if let Some(b) = base {
            if !g.manifests.contains_key(&b.id) {
                return Err(StoreError::NoSnapshot(b.id.clone()));
            }
        }
        g.locks.insert(disk.clone(), base.cloned());
        Ok(Box::new(MemoryLock {
            inner: self.inner.clone(),
            disk: disk.clone(),
        }))
    }

    fn annotate(&self, id: &SnapshotId, a: &Annotation) -> Result<Manifest, StoreError> {
        let mut m = self.manifest(id)?;
        m.annotate(a);
        self.inner().manifests.insert(id.clone(), m.encode());
        Ok(m)
    }

    fn gc(&self, _opts: &GcOptions, progress: &Progress) -> Result<GcReport, StoreError> {
        let started = std::time::Instant::now();
        let (manifests, damaged) = self.list(None)?;
        if let Some(d) = damaged.first() {
            return Err(StoreError::Gc(format!(
                "{d}; nothing was removed, so that a repair still finds every chunk"
            )));
        }
        let bytes_before = self.usage()?;
        let pinned: Vec<Manifest> = self.inner().locks.values().flatten().cloned().collect();
        let mut live: HashSet<ChunkDigest> = HashSet::new();
        for m in manifests.iter().chain(&pinned) {
            for p in 0..m.pages.len() {
                live.insert(m.pages[p]);
                let page = load_page(self, m, p as u64).map_err(|e| {
                    StoreError::Gc(format!(
                        "{e}; nothing was removed, so that a repair still finds every chunk"
                    ))
                })?;
                live.extend(page.into_iter().filter(|c| !c.is_zero()));
            }
            progress.add(1);
        }
        let mut g = self.inner();
        let before = g.chunks.len();
        // A lock without a base (a full backup under way) keeps everything:
        // its chunks are not named by any manifest yet.
        if g.locks.values().all(|b| b.is_some()) {
            g.chunks.retain(|d, _| live.contains(d));
        }
        let removed = (before - g.chunks.len()) as u64;
        drop(g);
        Ok(GcReport {
            snapshots: manifests.len() as u64,
            live_chunks: live.len() as u64,
            chunks_removed: removed,
            bytes_before,
            bytes_after: self.usage()?,
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        })
    }

    fn usage(&self) -> Result<u64, StoreError> {
        let g = self.inner();
        Ok(g.chunks.values().map(|c| c.len() as u64).sum::<u64>()
            + g.manifests.values().map(|m| m.len() as u64).sum::<u64>())
    }

    fn describe(&self) -> String {
        "memory".into()
    }

    fn chunk_count(&self) -> Option<u64> {
        Some(self.inner().chunks.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_conformance() {
        crate::store::conformance::run(&MemoryStore::new());
    }

    #[test]
    fn a_full_memory_store_fails_as_a_full_disk() {
        let s = MemoryStore::with_capacity(10);
        let d = ChunkDigest::of(b"x");
        assert!(matches!(
            s.put_chunk(&d, &[0; 11]),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(s.put_chunk(&d, &[0; 10]).unwrap(), 10);
    }
}
