//! A store in a local folder.
//!
//! ```text
//! STORE/store.json                  {"format": 1}
//! STORE/chunks/ab/abcd…(64 hex)     chunk files (see format::chunk)
//! STORE/snapshots/DISK/TIME.json    manifests (see format::manifest)
//! STORE/tmp/ab/                     chunks staged by running backups
//! STORE/locks/DISK.lock             per-disk backup locks (flock)
//! ```
//!
//! Chunks are written to `tmp/` without fsync; [`Store::sync`] then makes
//! them all durable at once through [`fsutil::publish`] (`syncfs`, rename
//! into `chunks/`, `syncfs` again). A chunk file under
//! its final name is therefore always complete, even after a power cut, and
//! a backup of N chunks costs two filesystem syncs, not N fsyncs (the same
//! choice as Proxmox Backup Server's default "filesystem" sync level). The
//! manifest goes through the crash-safe helper after that, so a snapshot is
//! visible only once every chunk it references is durable. `tmp/` is
//! emptied when the store is opened: what is there belonged to a backup
//! that died.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{DiskLock, Store, StoreError};
use crate::digest::ChunkDigest;
use crate::format::manifest::Manifest;
use crate::fsutil;
use crate::ids::{DiskName, SnapshotId};

/// A store in a local folder (module doc).
pub struct LocalStore {
    root: PathBuf,
    staged: Mutex<HashMap<ChunkDigest, PathBuf>>,
    counter: AtomicU64,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .finish()
    }
}

struct FlockGuard(#[allow(dead_code)] nix::fcntl::Flock<File>);
impl DiskLock for FlockGuard {}

impl LocalStore {
    /// Opens the store at `root`, creating it if needed.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        let io = |p: &Path, e| StoreError::io(p, e);
        fs::create_dir_all(root).map_err(|e| io(root, e))?;
        let marker = root.join("store.json");
        if !marker.exists() {
            // Staging is sharded like the chunks: two writers creating
            // files in one folder contend for its lock (perf showed 4% of
            // a full backup's CPU spinning on it).
            for i in 0..=255u8 {
                for top in ["chunks", "tmp"] {
                    let d = root.join(top).join(format!("{i:02x}"));
                    fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
                }
            }
            for d in ["snapshots", "tmp", "locks"] {
                fs::create_dir_all(root.join(d)).map_err(|e| io(root, e))?;
            }
            fsutil::sync_dir(&root.join("chunks")).map_err(|e| io(root, e))?;
            fsutil::write_atomic(&marker, b"{\"format\": 1}\n", 0o644)
                .map_err(|e| io(&marker, e))?;
        }
        for i in 0..=255u8 {
            let tmp = root.join("tmp").join(format!("{i:02x}"));
            fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
            for e in fs::read_dir(&tmp).map_err(|e| io(&tmp, e))?.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            staged: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        })
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a chunk file.
    pub fn chunk_path(&self, d: &ChunkDigest) -> PathBuf {
        let hex = d.hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, id: &SnapshotId) -> PathBuf {
        self.root
            .join("snapshots")
            .join(id.disk().as_str())
            .join(format!("{}.json", id.time()))
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkDigest, PathBuf>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_manifest(&self, path: &Path) -> Result<Manifest, StoreError> {
        let bytes = fs::read(path).map_err(|e| StoreError::io(path, e))?;
        Manifest::decode(&bytes).map_err(|why| StoreError::BadManifest {
            path: path.display().to_string(),
            why,
        })
    }
}

impl Store for LocalStore {
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError> {
        let staged = self.staged();
        Ok(digests
            .iter()
            .map(|d| !staged.contains_key(d) && !self.chunk_path(d).exists())
            .collect())
    }

    fn put_chunk(&self, digest: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError> {
        if self.staged().contains_key(digest) || self.chunk_path(digest).exists() {
            return Ok(0);
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let hex = digest.hex();
        let tmp = self
            .root
            .join("tmp")
            .join(&hex[..2])
            .join(format!("{hex}.{}.{n}", std::process::id()));
        fsutil::write_staged(&tmp, file).map_err(|e| StoreError::io(&tmp, e))?;
        self.staged().insert(*digest, tmp);
        Ok(file.len() as u64)
    }

    fn get_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        let path = self
            .staged()
            .get(digest)
            .cloned()
            .unwrap_or_else(|| self.chunk_path(digest));
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingChunk(*digest),
            _ => StoreError::io(&path, e),
        })
    }

    fn sync(&self) -> Result<(), StoreError> {
        let batch: Vec<(ChunkDigest, PathBuf)> =
            self.staged().iter().map(|(d, p)| (*d, p.clone())).collect();
        let moves: Vec<(PathBuf, PathBuf)> = batch
            .iter()
            .map(|(d, p)| (p.clone(), self.chunk_path(d)))
            .collect();
        fsutil::publish(&self.root, &moves).map_err(|e| StoreError::io(&self.root, e))?;
        let mut staged = self.staged();
        for (d, _) in &batch {
            staged.remove(d);
        }
        Ok(())
    }

    fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
        let path = self.manifest_path(&m.id);
        if path.exists() {
            return Err(StoreError::Exists(m.id.clone()));
        }
        let dir = path.parent().expect("manifest has a folder");
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
            fsutil::sync_dir(&self.root.join("snapshots")).map_err(|e| StoreError::io(dir, e))?;
        }
        fsutil::write_atomic(&path, &m.encode(), 0o644).map_err(|e| StoreError::io(&path, e))
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

    fn lock(&self, disk: &DiskName) -> Result<Box<dyn DiskLock>, StoreError> {
        let path = self.root.join("locks").join(format!("{disk}.lock"));
        let f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Box::new(FlockGuard(l))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StoreError::Locked(disk.clone())),
            Err((_, e)) => Err(StoreError::io(
                &path,
                io::Error::from_raw_os_error(e as i32),
            )),
        }
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
    fn staged_chunks_are_not_in_chunks_until_sync_and_die_with_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let d = ChunkDigest::of(b"x");
        s.put_chunk(&d, b"file").unwrap();
        assert!(!s.chunk_path(&d).exists());
        let shard = dir.path().join("tmp").join(&d.hex()[..2]);
        assert_eq!(
            fs::read_dir(&shard).unwrap().count(),
            1,
            "staged in its shard"
        );
        assert_eq!(s.missing(&[d]).unwrap(), vec![false]);
        drop(s);
        // A new process (reopen) cleans what the dead one staged.
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(s.missing(&[d]).unwrap(), vec![true]);
        let tmp = dir.path().join("tmp").join(&d.hex()[..2]);
        assert_eq!(fs::read_dir(tmp).unwrap().count(), 0);
        s.put_chunk(&d, b"file").unwrap();
        s.sync().unwrap();
        assert!(s.chunk_path(&d).exists());
    }
}
