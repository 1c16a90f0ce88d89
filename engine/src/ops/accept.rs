//! A store accepting a snapshot sent by an agent (the store server's
//! commit): the manifest becomes visible only once every index page and
//! chunk it names is present. The index of each disk's last accepted
//! snapshot is kept decoded, so the next snapshot of that disk, built on
//! it, is checked only where it differs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::digest::ChunkDigest;
use crate::format::chunk;
use crate::format::index;
use crate::format::manifest::Manifest;
use crate::ids::{DiskName, SnapshotId};
use crate::store::local::LocalStore;
use crate::store::Store;

use super::error::{ErrorKind, OpError};

/// Most digests kept decoded for one disk's last snapshot (16 MiB of
/// them: a 32 GiB disk at 64 KiB chunks). A bigger disk's snapshots are
/// checked whole.
const CHECKED_MAX: u64 = 1 << 19;
/// Most disks whose last snapshot is kept decoded.
const CHECKED_DISKS: usize = 16;

/// The index of the snapshot last accepted for a disk, decoded.
struct Checked {
    id: SnapshotId,
    /// [`LocalStore::collections`] when the check began and ended.
    collections: u64,
    chunks: u64,
    pages: Vec<ChunkDigest>,
    digests: Vec<Vec<ChunkDigest>>,
}

/// Accepts snapshots into a store; one per store server.
#[derive(Default)]
pub struct Acceptor {
    checked: Mutex<HashMap<DiskName, Checked>>,
}

impl Acceptor {
    fn checked(&self) -> std::sync::MutexGuard<'_, HashMap<DiskName, Checked>> {
        self.checked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `m` into `store` once everything it names is present.
    /// `given` holds the plain bytes of index pages the request brought
    /// (already checked against their digests and stored).
    pub fn accept(
        &self,
        store: &LocalStore,
        m: &Manifest,
        given: &HashMap<ChunkDigest, Vec<u8>>,
    ) -> Result<(), OpError> {
        self.accept_with(store, m, given, &|_| true, || store.publish_manifest(m))
    }

    /// [`Acceptor::accept`] for a client that may name only the chunks
    /// `known` admits (a store server's tenant and its trust group): any
    /// other counts as missing.
    pub fn accept_known(
        &self,
        store: &LocalStore,
        m: &Manifest,
        given: &HashMap<ChunkDigest, Vec<u8>>,
        known: &dyn Fn(&ChunkDigest) -> bool,
    ) -> Result<(), OpError> {
        self.accept_with(store, m, given, known, || store.publish_manifest(m))
    }

    /// [`Acceptor::accept`], with `publish` making the manifest visible
    /// once the check passed.
    pub(crate) fn accept_with(
        &self,
        store: &LocalStore,
        m: &Manifest,
        given: &HashMap<ChunkDigest, Vec<u8>>,
        known: &dyn Fn(&ChunkDigest) -> bool,
        publish: impl FnOnce() -> Result<(), crate::store::StoreError>,
    ) -> Result<(), OpError> {
        let started = Instant::now();
        let collections = store.collections();
        // Taken out while this commit checks: a concurrent commit of the
        // same disk (which its lock forbids) would only check in full.
        let prior = self.checked().remove(&m.disk);
        let digests = complete(store, m, prior.as_ref(), given, known)?;
        let checked = started.elapsed();
        // Publishing syncs the chunks first (the `Store` contract).
        publish()?;
        tracing::debug!(snapshot = %m.id, incremental = prior.is_some(), pages_given = given.len(), ?checked, total = ?started.elapsed(), "commit");
        if m.chunks() <= CHECKED_MAX && store.collections() == collections {
            let mut c = self.checked();
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
        Ok(())
    }
}

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
    known: &dyn Fn(&ChunkDigest) -> bool,
) -> Result<Vec<Vec<ChunkDigest>>, OpError> {
    let incomplete = |msg: String| OpError::new(ErrorKind::Damaged, msg);
    if m.pages.len() as u64 != index::page_count(m.chunks()) {
        return Err(OpError::invalid(format!(
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
    let lacks = store.missing(&m.pages)?;
    if let Some(i) = (0..lacks.len()).find(|&i| lacks[i] || !known(&m.pages[i])) {
        return Err(incomplete(format!(
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
                let file = store.get_chunk(d)?;
                // Not hashed again: its digest was checked when it entered
                // the store (an upload, or a backup that hashed it), and
                // the file's checksum catches damage since.
                read = chunk::decode(&file)
                    .map_err(|e| incomplete(format!("index page {d} is damaged: {e}")))?;
                &read
            }
        };
        let digests = index::decode_page(bytes, index::page_len(m.chunks(), p as u64))
            .map_err(|e| incomplete(format!("index page {d}: {e}")))?;
        let wanted: Vec<ChunkDigest> = match before {
            Some((_, old)) if old.len() == digests.len() => digests
                .iter()
                .zip(old)
                .filter(|(new, old)| !new.is_zero() && new != old)
                .map(|(new, _)| *new)
                .collect(),
            _ => digests.iter().filter(|d| !d.is_zero()).copied().collect(),
        };
        let lacks = store.missing(&wanted)?;
        if let Some(i) = (0..lacks.len()).find(|&i| lacks[i] || !known(&wanted[i])) {
            return Err(incomplete(format!(
                "snapshot {} refused: chunk {} is not in the store; upload it first",
                m.id, wanted[i]
            )));
        }
        out.push(digests);
    }
    Ok(out)
}
