//! The store server's wire protocol, shared by the server
//! ([`crate::store_server`]) and its client ([`crate::remote`]): the
//! endpoints, the binary bodies and the JSON answers, defined once. The client asks which of a
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
//! POST   /store/v1/damaged                     N x 32-byte digests a verify found damaged
//!                                              -> {"forgotten": n} (the server checks each)
//! ```
//!
//! Binary bodies (digests, chunk files) travel as `application/octet-stream`;
//! everything else is JSON, and every error the usual JSON error body. A
//! lock is a lease: a client that dies stops renewing it and it lapses
//! after [`LEASE`], so a killed agent never blocks a disk for good.

use std::time::Duration;

use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::manifest::Manifest;
use serde::{Deserialize, Serialize};

/// How long a lock lives without renewal.
pub const LEASE: Duration = Duration::from_secs(60);
/// Most digests one `missing` query may carry.
pub const MAX_QUERY: usize = 1 << 16;

/// Most digests one fetch may ask for (about 16 MiB of 64 KiB chunks).
pub const MAX_FETCH: usize = 256;

/// Answer of `POST /store/v1/damaged`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forgotten {
    /// Chunks the server found damaged and set aside.
    pub forgotten: u64,
}

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

/// Answer of `GET /store/v1/health`: what this server's protocol offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The store format.
    pub format: u32,
    /// The server sums chunk files itself: clients may send them unsummed.
    #[serde(default)]
    pub sums_chunks: bool,
    /// The server takes a snapshot's index pages inside its commit.
    #[serde(default)]
    pub commit_pages: bool,
}

impl Health {
    /// What this build's server answers.
    pub fn current() -> Health {
        Health {
            status: "ok".into(),
            format: 2,
            sums_chunks: true,
            commit_pages: true,
        }
    }
}

/// Answer of `GET /store/v1/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes used by chunks and manifests.
    pub bytes: u64,
}

/// Answer of a chunk upload: bytes stored (0 for chunks the store had),
/// and for a batch the number of chunks in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Bytes stored.
    pub stored: u64,
    /// Chunks in the batch (absent for a single upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
}

/// Encodes digests as a `missing` or `fetch` body.
pub fn encode_digests<'a>(digests: impl IntoIterator<Item = &'a ChunkDigest>) -> Vec<u8> {
    digests.into_iter().flat_map(|d| d.0).collect()
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

/// The digest and the byte range of each chunk file of an upload batch.
pub fn record_spans(body: &[u8]) -> Result<Vec<(ChunkDigest, std::ops::Range<usize>)>, String> {
    let base = body.as_ptr() as usize;
    Ok(decode_batch(body)?
        .iter()
        .map(|(d, f)| {
            let at = f.as_ptr() as usize - base;
            (*d, at..at + f.len())
        })
        .collect())
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
pub fn split_commit(body: &[u8]) -> Result<(Manifest, usize), String> {
    let len = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or("a commit with pages starts with its manifest's length")?;
    let m = body
        .get(4..4 + len)
        .ok_or_else(|| format!("the manifest's length says {len} bytes, fewer follow"))?;
    let m = Manifest::decode(m).map_err(|e| format!("bad manifest: {e}"))?;
    Ok((m, 4 + len))
}

/// A body of 32-byte digests, between `min` and `max` of them.
pub fn decode_digests(body: &[u8], min: usize, max: usize) -> Result<Vec<ChunkDigest>, String> {
    let n = body.len() / 32;
    if !body.len().is_multiple_of(32) || n < min || n > max {
        return Err(format!(
            "the body must be {min} to {max} whole 32-byte digests; got {} bytes",
            body.len()
        ));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| ChunkDigest(c.try_into().expect("32 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let a = ChunkDigest::of(b"a");
        let b = ChunkDigest::of(b"b");
        let body = encode_batch([(&a, &b"first"[..]), (&b, &b""[..])]);
        let got = decode_batch(&body).unwrap();
        assert_eq!(got, vec![(a, &b"first"[..]), (b, &b""[..])]);
    }

    #[test]
    fn a_commit_splits_into_its_manifest_and_its_pages() {
        let a = ChunkDigest::of(b"a");
        let m = novabackup_engine::store::conformance::manifest("vm", 5, vec![a]);
        let body = encode_commit(&m.encode(), [(&a, &b"page"[..])]);
        let (back, at) = split_commit(&body).unwrap();
        assert_eq!(back.id, m.id);
        assert_eq!(decode_batch(&body[at..]).unwrap(), vec![(a, &b"page"[..])]);
        assert!(split_commit(&body[..3]).is_err());
        assert!(split_commit(&[200, 0, 0, 0, b'{']).is_err());
    }

    #[test]
    fn digests_round_trip_and_bad_counts_are_refused() {
        let d = [ChunkDigest::of(b"a"), ChunkDigest::of(b"b")];
        assert_eq!(decode_digests(&encode_digests(&d), 1, 2).unwrap(), d);
        assert!(decode_digests(&encode_digests(&d), 1, 1).is_err());
        assert!(decode_digests(&[0; 33], 0, 9).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = decode_batch(&body);
        }
    }
}
