//! Reading a snapshot's index back from a store: one page at a time, each
//! checked against its digest. Backup (the base's pages), restore, verify
//! and garbage collection all read indexes this way.

use crate::digest::ChunkDigest;
use crate::format::chunk;
use crate::format::index;
use crate::format::manifest::Manifest;
use crate::ids::SnapshotId;
use crate::store::Store;

/// A page of a snapshot's index that cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the index of snapshot {id} cannot be read ({why}); run `novabackup verify {id}`")]
pub struct PageError {
    /// The snapshot.
    pub id: SnapshotId,
    /// What failed.
    pub why: String,
}

/// Reads page `p` of a snapshot's index, checking its digest.
pub fn load_page(store: &dyn Store, m: &Manifest, p: u64) -> Result<Vec<ChunkDigest>, PageError> {
    let bad = |why: String| PageError {
        id: m.id.clone(),
        why,
    };
    let d = m
        .pages
        .get(p as usize)
        .ok_or_else(|| bad(format!("page {p} missing from the manifest")))?;
    let file = store.get_chunk(d).map_err(|e| bad(e.to_string()))?;
    let bytes =
        chunk::decode_verified(&file, d).map_err(|e| bad(format!("index page {d}: {e}")))?;
    index::decode_page(&bytes, index::page_len(m.chunks(), p)).map_err(bad)
}

/// The full chunk index of a snapshot.
pub fn read_index(store: &dyn Store, m: &Manifest) -> Result<Vec<ChunkDigest>, PageError> {
    let mut v = Vec::with_capacity(m.chunks() as usize);
    for p in 0..index::page_count(m.chunks()) {
        v.extend(load_page(store, m, p)?);
    }
    Ok(v)
}
