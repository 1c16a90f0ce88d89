//! Snapshot manifests: JSON, one file per snapshot, checksummed.
//!
//! The `checksum` field holds the xxh3-64 (16 hex digits) of the manifest
//! serialized with `checksum` set to the empty string; serde_json writes
//! struct fields in declaration order, so the bytes are reproducible. A
//! manifest that fails the check is reported, never used.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::digest::ChunkDigest;
use crate::ids::{DiskName, SnapshotId};

/// Format version written in new manifests.
pub const FORMAT: u32 = 1;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    /// Every chunk was read.
    Full,
    /// Only chunks under dirty CBT blocks were read; the rest come from the parent.
    Incremental,
}

/// What the backup did, in bytes and chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Chunks read.
    pub chunks_read: u64,
    /// Chunks that were all zeroes (never stored).
    pub zero_chunks: u64,
    /// Chunks the store did not have.
    pub chunks_new: u64,
    /// Plain bytes of those chunks.
    pub bytes_new: u64,
    /// Bytes written to the store for them, after compression.
    pub bytes_stored: u64,
    /// Index pages written (changed pages).
    pub pages_new: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// The CBT state the backup was planned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbtRecord {
    /// Bitmap granularity.
    pub granularity: u64,
    /// Dirty blocks frozen at the checkpoint.
    pub dirty_blocks: u64,
    /// Whether the bitmap was trusted.
    pub trusted: bool,
}

/// The outcome of the last verification of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// When, RFC 3339 UTC.
    pub time: String,
    /// When, Unix seconds.
    pub time_unix: u64,
    /// Every index page and chunk was intact.
    pub ok: bool,
    /// Damaged or missing chunks and pages found.
    pub problems: u64,
}

/// What a change-tracking audit found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// The snapshot an incremental backup would have started from.
    pub base: SnapshotId,
    /// Chunks whose tracking said "unchanged since the base", compared.
    pub chunks_compared: u64,
    /// Of those, chunks that had changed all the same (missed writes).
    pub mismatches: u64,
    /// Image offsets of the first mismatching chunks (at most 100).
    pub mismatch_offsets: Vec<u64>,
}

/// A change to a snapshot's operator annotations: what is `Some` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annotation {
    /// Protect or unprotect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
    /// Record a verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verification>,
}

/// A snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// The snapshot id.
    pub id: SnapshotId,
    /// The disk.
    pub disk: DiskName,
    /// Checkpoint time, RFC 3339 UTC.
    pub time: String,
    /// Checkpoint time, Unix seconds.
    pub time_unix: u64,
    /// The snapshot an incremental was taken against.
    pub parent: Option<SnapshotId>,
    /// Full or incremental.
    pub kind: BackupKind,
    /// Why this kind.
    pub reason: String,
    /// Image size in bytes.
    pub image_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Index pages, in order.
    pub pages: Vec<ChunkDigest>,
    /// CBT state at the checkpoint.
    pub cbt: CbtRecord,
    /// What the backup did.
    pub stats: BackupStats,
    /// Never pruned while set (`novabackup snapshot protect`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
    /// The last verification of this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verification>,
    /// Set when this backup audited change tracking (read everything and
    /// compared with what an incremental would have kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditRecord>,
    /// xxh3-64 of this manifest with an empty checksum (module doc).
    pub checksum: String,
}

impl Manifest {
    /// Number of chunks in the image.
    pub fn chunks(&self) -> u64 {
        self.image_size.div_ceil(self.chunk_size)
    }

    /// The checksum of the canonical form (what [`Manifest::encode`] writes).
    pub fn sum(&self) -> String {
        let mut m = self.clone();
        m.checksum = String::new();
        let bytes = serde_json::to_vec(&m).expect("manifest serializes");
        format!("{:016x}", xxh3_64(&bytes))
    }

    /// Applies an annotation (the checksum is refreshed by [`Self::encode`]).
    pub fn annotate(&mut self, a: &Annotation) {
        if let Some(p) = a.protected {
            self.protected = p;
        }
        if let Some(v) = &a.verified {
            self.verified = Some(v.clone());
        }
    }

    /// Serializes with a fresh checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.checksum = self.sum();
        let mut v = serde_json::to_vec_pretty(&m).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// Parses and checks the checksum, the format and the page count.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        if m.format != FORMAT {
            return Err(format!("unsupported manifest format {}", m.format));
        }
        if m.sum() != m.checksum {
            return Err("manifest checksum mismatch (the file is damaged)".into());
        }
        if m.chunk_size == 0 || m.pages.len() as u64 != crate::format::index::page_count(m.chunks())
        {
            return Err("manifest page count does not match the image and chunk size".into());
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let disk: DiskName = "vm".parse().unwrap();
        Manifest {
            format: FORMAT,
            id: SnapshotId::new(&disk, 1_700_000_000),
            disk,
            time: "2023-11-14T22:13:20Z".into(),
            time_unix: 1_700_000_000,
            parent: None,
            kind: BackupKind::Full,
            reason: "no previous snapshot".into(),
            image_size: 1 << 20,
            chunk_size: 65536,
            pages: vec![ChunkDigest([7; 32])],
            cbt: CbtRecord {
                granularity: 65536,
                dirty_blocks: 3,
                trusted: true,
            },
            stats: BackupStats::default(),
            protected: false,
            verified: None,
            audit: None,
            checksum: String::new(),
        }
    }

    #[test]
    fn golden_manifest() {
        let bytes = sample().encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with(
                "{\n  \"format\": 1,\n  \"id\": \"vm@20231114T221320Z\",\n  \"disk\": \"vm\","
            ),
            "{text}"
        );
        assert!(text.contains("\"kind\": \"full\""));
        assert!(
            text.contains("\"checksum\": \"51006b27f2ba5bb5\""),
            "the pinned checksum changed: {text}"
        );
        let m = Manifest::decode(&bytes).unwrap();
        assert_eq!(m.id, sample().id);
        let tampered = text.replace("\"dirty_blocks\": 3", "\"dirty_blocks\": 4");
        assert!(Manifest::decode(tampered.as_bytes())
            .unwrap_err()
            .contains("checksum"));
        assert!(Manifest::decode(b"{}").is_err());
    }

    #[test]
    fn annotations_are_absent_until_set_and_keep_the_checksum_valid() {
        let mut m = sample();
        assert!(!String::from_utf8(m.encode()).unwrap().contains("protected"));
        m.annotate(&Annotation {
            protected: Some(true),
            verified: Some(Verification {
                time: "2023-11-15T00:00:00Z".into(),
                time_unix: 1_700_006_400,
                ok: true,
                problems: 0,
            }),
        });
        let back = Manifest::decode(&m.encode()).unwrap();
        assert!(back.protected);
        assert!(back.verified.unwrap().ok);
    }
}
