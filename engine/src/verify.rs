//! Verify snapshots: re-read and re-hash every chunk and index page they
//! reference, each distinct chunk once, and name every bad one together
//! with the snapshots (and offsets) that need it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::digest::ChunkDigest;
use crate::format::chunk;
use crate::format::manifest::Manifest;
use crate::progress::Progress;
use crate::store::pages::load_page;
use crate::store::readahead::ReadAhead;
use crate::store::Store;

/// A bad chunk in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadChunk {
    /// The chunk.
    pub digest: ChunkDigest,
    /// First offset in the image where the snapshot uses it.
    pub offset: u64,
    /// What was wrong.
    pub error: String,
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotVerdict {
    /// The snapshot.
    pub id: String,
    /// Whether everything it references is intact.
    pub ok: bool,
    /// Damaged or missing index pages.
    pub bad_pages: Vec<String>,
    /// Damaged or missing chunks.
    pub bad_chunks: Vec<BadChunk>,
}

/// What verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// One verdict per snapshot.
    pub snapshots: Vec<SnapshotVerdict>,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Bytes of plain data checked.
    pub bytes_checked: u64,
}

impl VerifyReport {
    /// Whether every snapshot is intact.
    pub fn ok(&self) -> bool {
        self.snapshots.iter().all(|s| s.ok)
    }
}

/// Chunks a worker claims at once.
const BATCH: usize = 16;
/// Batches beyond the current one whose chunks are prefetched
/// ([`ReadAhead`]).
const AHEAD: usize = 4;

/// Verifies `manifests` against `store`.
pub fn verify(
    store: &dyn Store,
    manifests: &[Manifest],
    workers: usize,
    progress: &Progress,
) -> VerifyReport {
    // digest -> (snapshot index, first offset) of every use.
    let mut uses: HashMap<ChunkDigest, Vec<(usize, u64)>> = HashMap::new();
    let mut verdicts: Vec<SnapshotVerdict> = manifests
        .iter()
        .map(|m| SnapshotVerdict {
            id: m.id.to_string(),
            ok: true,
            bad_pages: vec![],
            bad_chunks: vec![],
        })
        .collect();
    for (si, m) in manifests.iter().enumerate() {
        for p in 0..m.pages.len() as u64 {
            match load_page(store, m, p) {
                Ok(page) => {
                    for (i, d) in page.iter().enumerate() {
                        if !d.is_zero() {
                            let off = (p * crate::format::index::PAGE_DIGESTS as u64 + i as u64)
                                * m.chunk_size;
                            let u = uses.entry(*d).or_default();
                            if u.last().map(|l| l.0) != Some(si) {
                                u.push((si, off));
                            }
                        }
                    }
                }
                Err(e) => {
                    verdicts[si].ok = false;
                    verdicts[si].bad_pages.push(format!("page {p}: {e}"));
                }
            }
        }
    }
    // In the order of first use (a snapshot's chunks by offset): chunks
    // written together sit together in the packs, so reads stay close.
    let mut first_use: Vec<(ChunkDigest, (usize, u64))> =
        uses.iter().map(|(d, u)| (*d, u[0])).collect();
    first_use.sort_unstable_by_key(|&(_, at)| at);
    let list: Vec<ChunkDigest> = first_use.into_iter().map(|(d, _)| d).collect();
    // Callers may verify in parts on one progress: this part adds to it.
    progress.set_total(progress.get().0 + list.len() as u64);
    let prefetch = |d: &[ChunkDigest]| store.fast().prefetch(d);
    let batches = ReadAhead::new(&prefetch, &list, BATCH, AHEAD);
    let bad: Mutex<BTreeMap<ChunkDigest, String>> = Mutex::new(BTreeMap::new());
    let bytes = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                // Without a reusable context (out of memory), each check
                // allocates its own.
                let mut verifier = chunk::Verifier::new().ok();
                loop {
                    if progress.cancelled() {
                        return;
                    }
                    let Some(claimed) = batches.claim() else {
                        return;
                    };
                    let part = &list[claimed];
                    let mut files = Vec::with_capacity(part.len());
                    for d in part {
                        match store.get_chunk(d) {
                            Ok(f) => files.push((f, *d)),
                            Err(e) => {
                                bad.lock().unwrap().insert(*d, e.to_string());
                                progress.add(1);
                            }
                        }
                    }
                    let items: Vec<(&[u8], ChunkDigest)> =
                        files.iter().map(|(f, d)| (&f[..], *d)).collect();
                    let verdicts = match verifier.as_mut() {
                        Some(v) => v.check_each(&items),
                        None => items
                            .iter()
                            .map(|(f, d)| chunk::decode_verified(f, d).map(|p| p.len()))
                            .collect(),
                    };
                    for ((_, d), r) in items.iter().zip(verdicts) {
                        match r {
                            Ok(n) => {
                                bytes.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(e) => {
                                bad.lock().unwrap().insert(*d, e.to_string());
                            }
                        }
                        progress.add(1);
                    }
                }
            });
        }
    });
    for (d, error) in bad.into_inner().unwrap() {
        for &(si, offset) in &uses[&d] {
            verdicts[si].ok = false;
            verdicts[si].bad_chunks.push(BadChunk {
                digest: d,
                offset,
                error: error.clone(),
            });
        }
    }
    VerifyReport {
        snapshots: verdicts,
        chunks_checked: list.len() as u64,
        bytes_checked: bytes.into_inner() as u64,
    }
}
