//! The backup plan: which chunks to read, as a pure function of the frozen
//! CBT bitmap, its trust, the base snapshot and (for a full backup) the
//! image's allocation map. Nothing here does I/O.

use std::ops::Range;

use crate::cbt::persist::Trust;
use crate::cbt::DirtyBitmap;
use crate::format::manifest::{BackupKind, Manifest};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Incremental when the bitmap is trusted and a base snapshot exists.
    #[default]
    Auto,
    /// Read everything; store only what the store lacks.
    Full,
    /// Read everything, like `Full`, and compare every chunk that change
    /// tracking calls unchanged with the base snapshot's (a CBT audit).
    Audit,
}

/// The reason a plan gives for an audit.
pub const AUDIT_REASON: &str =
    "change-tracking audit: every chunk read and compared with what an incremental would have kept";

/// Inputs of [`plan`].
#[derive(Debug)]
pub struct PlanInput<'a> {
    /// Image size.
    pub size: u64,
    /// Chunk size of the new snapshot.
    pub chunk_size: u64,
    /// Requested mode.
    pub mode: Mode,
    /// Bits frozen at the checkpoint.
    pub frozen: &'a DirtyBitmap,
    /// Their trust.
    pub trust: &'a Trust,
    /// The snapshot the bits start from, if it still exists.
    pub base: Option<&'a Manifest>,
    /// Why there is no base, when there is none.
    pub no_base_reason: &'a str,
    /// Data extents `(offset, len)` of the image; `None` means all data.
    pub data: Option<&'a [(u64, u64)]>,
}

/// The plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPlan {
    /// Full or incremental.
    pub kind: BackupKind,
    /// Why, for the manifest and the operator.
    pub reason: String,
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunk ranges to read, ascending and disjoint. Other chunks are
    /// holes (full) or unchanged since the base (incremental).
    pub read: Vec<Range<u64>>,
}

impl BackupPlan {
    /// Chunks to read.
    pub fn chunks_to_read(&self) -> u64 {
        self.read.iter().map(|r| r.end - r.start).sum()
    }

    /// Bytes to read, with the last chunk clipped to the image.
    pub fn bytes_to_read(&self, size: u64, chunk_size: u64) -> u64 {
        self.read
            .iter()
            .map(|r| (r.end * chunk_size).min(size) - r.start * chunk_size)
            .sum()
    }
}

/// Why the backup must be full, or `None` if an incremental is possible.
/// Depends only on the mode, the base and the trust, so the agent can ask
/// before the checkpoint (a full backup protects every block).
pub fn full_reason(
    mode: Mode,
    base: Option<&Manifest>,
    no_base_reason: &str,
    trust: &Trust,
    size: u64,
    chunk_size: u64,
) -> Option<String> {
    match (mode, base, trust) {
        (Mode::Full, _, _) => Some("full backup requested".to_string()),
        (_, None, _) => Some(no_base_reason.to_string()),
        (_, Some(b), _) if b.verified.as_ref().is_some_and(|v| !v.ok) => Some(format!(
            "the base snapshot {} failed verification: everything is read so that damaged chunks are stored again",
            b.id
        )),
        (_, _, Trust::Untrusted(r)) => Some(format!("change tracking is not trusted: {r}")),
        (_, Some(b), _) if b.image_size != size => Some(format!(
            "the image size changed from {} to {} bytes",
            b.image_size, size
        )),
        (_, Some(b), _) if b.chunk_size != chunk_size => Some(format!(
            "the chunk size changed from {} to {} bytes",
            b.chunk_size, chunk_size
        )),
        (Mode::Audit, _, _) => Some(AUDIT_REASON.to_string()),
        _ => None,
    }
}

/// Decides the kind and the chunks to read.
pub fn plan(i: &PlanInput<'_>) -> BackupPlan {
    let chunks = i.size.div_ceil(i.chunk_size);
    let full_reason = full_reason(
        i.mode,
        i.base,
        i.no_base_reason,
        i.trust,
        i.size,
        i.chunk_size,
    );
    let (kind, reason, extents): (_, _, Vec<(u64, u64)>) = match full_reason {
        Some(reason) => {
            let ext = match i.data {
                Some(d) => d.to_vec(),
                None => vec![(0, i.size)],
            };
            (BackupKind::Full, reason, ext)
        }
        None => {
            let base = i.base.expect("incremental has a base");
            let ext = i
                .frozen
                .extents(0, i.size)
                .filter(|e| e.dirty)
                .map(|e| (e.offset, e.len))
                .collect();
            (
                BackupKind::Incremental,
                format!(
                    "incremental against {}: {} changed blocks",
                    base.id,
                    i.frozen.count_dirty()
                ),
                ext,
            )
        }
    };
    let mut read: Vec<Range<u64>> = Vec::new();
    for (off, len) in extents {
        if len == 0 || off >= i.size {
            continue;
        }
        let end = (off + len).min(i.size);
        let r = off / i.chunk_size..end.div_ceil(i.chunk_size);
        match read.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => read.push(r),
        }
    }
    BackupPlan {
        kind,
        reason,
        chunks,
        read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbt::Granularity;
    use crate::format::manifest::{BackupStats, CbtRecord, FORMAT};
    use crate::ids::{DiskName, SnapshotId};

    const K64: u64 = 65536;

    fn base(size: u64, cs: u64) -> Manifest {
        let disk: DiskName = "vm".parse().unwrap();
        Manifest {
            format: FORMAT,
            id: SnapshotId::new(&disk, 1),
            disk,
            time: String::new(),
            time_unix: 1,
            parent: None,
            kind: BackupKind::Full,
            reason: String::new(),
            image_size: size,
            chunk_size: cs,
            pages: vec![],
            cbt: CbtRecord {
                granularity: K64,
                dirty_blocks: 0,
                trusted: true,
            },
            stats: BackupStats::default(),
            protected: false,
            verified: None,
            audit: None,
            checksum: String::new(),
        }
    }

    fn input<'a>(
        frozen: &'a DirtyBitmap,
        trust: &'a Trust,
        b: Option<&'a Manifest>,
        mode: Mode,
        cs: u64,
    ) -> PlanInput<'a> {
        PlanInput {
            size: frozen.size(),
            chunk_size: cs,
            mode,
            frozen,
            trust,
            base: b,
            no_base_reason: "no previous snapshot of this disk",
            data: None,
        }
    }

    #[test]
    fn incremental_reads_only_dirty_chunks() {
        let mut f = DirtyBitmap::new(100 * K64, Granularity::new(K64).unwrap());
        f.mark(0, 1);
        f.mark(10 * K64, 3 * K64);
        f.mark(99 * K64 + 5, 1);
        let b = base(100 * K64, K64);
        let p = plan(&input(&f, &Trust::Trusted, Some(&b), Mode::Auto, K64));
        assert_eq!(p.kind, BackupKind::Incremental);
        assert_eq!(p.read, vec![0..1, 10..13, 99..100]);
        assert_eq!(p.bytes_to_read(100 * K64, K64), 5 * K64);
        // With 256 KiB chunks, dirty 64 KiB blocks map to their chunk.
        let b4 = base(100 * K64, 4 * K64);
        let p = plan(&input(&f, &Trust::Trusted, Some(&b4), Mode::Auto, 4 * K64));
        assert_eq!(p.read, vec![0..1, 2..4, 24..25]);
        assert_eq!(p.bytes_to_read(100 * K64, 4 * K64), 3 * 4 * K64 + 4 * K64);
    }

    #[test]
    fn full_when_it_must_be() {
        let f = DirtyBitmap::new(10 * K64 + 7, Granularity::new(K64).unwrap());
        let b = base(10 * K64 + 7, K64);
        let cases = [
            (None, Trust::Trusted, Mode::Auto, "no previous snapshot"),
            (
                Some(&b),
                Trust::Untrusted("host crashed".into()),
                Mode::Auto,
                "host crashed",
            ),
            (Some(&b), Trust::Trusted, Mode::Full, "requested"),
        ];
        for (bb, t, m, why) in cases {
            let p = plan(&input(&f, &t, bb, m, K64));
            assert_eq!(p.kind, BackupKind::Full);
            assert!(p.reason.contains(why), "{}", p.reason);
            assert_eq!(p.read, vec![0..11]);
            assert_eq!(p.bytes_to_read(10 * K64 + 7, K64), 10 * K64 + 7);
        }
        let resized = base(5 * K64, K64);
        assert!(
            plan(&input(&f, &Trust::Trusted, Some(&resized), Mode::Auto, K64))
                .reason
                .contains("size changed")
        );
        let other_cs = base(10 * K64 + 7, 2 * K64);
        assert!(plan(&input(
            &f,
            &Trust::Trusted,
            Some(&other_cs),
            Mode::Auto,
            K64
        ))
        .reason
        .contains("chunk size"));
    }

    #[test]
    fn full_skips_holes() {
        let f = DirtyBitmap::new(64 * K64, Granularity::new(K64).unwrap());
        let data = [
            (K64 + 100, 10),
            (K64 + 200, 10),
            (10 * K64, 2 * K64 + 1),
            (63 * K64, K64),
        ];
        let mut i = input(&f, &Trust::Trusted, None, Mode::Auto, K64);
        i.data = Some(&data);
        assert_eq!(plan(&i).read, vec![1..2, 10..13, 63..64]);
    }
}
