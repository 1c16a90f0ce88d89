//! Replication: copying snapshots from one store to another (`novabackup
//! sync`), between any two kinds of store.
//!
//! Only what the target lacks moves: for each snapshot, its index pages
//! and chunks are asked of the target in batches ([`Store::missing`]), and
//! each missing one is read from the source, checked against its digest
//! (a damaged copy is never replicated), and put. The target is synced
//! every [`SyncOptions::checkpoint`] bytes, so an interrupted run loses at
//! most that much: the next run finds the rest present and does not send
//! it again. A snapshot's manifest is committed last, unchanged (same id,
//! same annotations), so the target never shows a snapshot whose data has
//! not arrived. Snapshots go oldest first, so an incremental's parent is
//! there before it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::digest::ChunkDigest;
use crate::format::chunk;
use crate::format::manifest::Manifest;
use crate::ids::DiskName;
use crate::progress::Progress;
use crate::store::pages::load_page;
use crate::store::{Store, StoreError};

use super::error::{ErrorKind, OpError};

/// Digests asked of the target at once.
const BATCH: usize = 2048;

/// What to copy, and how fast.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncOptions {
    /// Only these disks (all when empty).
    pub disks: Vec<DiskName>,
    /// Only each disk's newest N snapshots (all when unset).
    pub newest: Option<usize>,
    /// Bytes per second at most sent to the target (unlimited when unset).
    pub bandwidth: Option<u64>,
    /// Bytes between syncs of the target: what an interruption can cost
    /// (0: 256 MiB).
    pub checkpoint: u64,
    /// The placement rules and the target's site: disks the rules keep
    /// away from that site are not copied (a disk asked for by name is
    /// an error).
    #[serde(skip)]
    pub placement: Option<(crate::placement::Placement, Option<String>)>,
}

/// What a replication did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    /// Snapshots copied.
    pub copied: Vec<String>,
    /// Snapshots the target had already.
    pub present: u64,
    /// Disks left out because placement forbids the target's site.
    pub refused: Vec<String>,
    /// Chunks and index pages the copied snapshots name.
    pub chunks_named: u64,
    /// Chunks and index pages sent (the target lacked them).
    pub chunks_sent: u64,
    /// Bytes sent (stored chunk files, compressed).
    pub bytes_sent: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Sleeps as needed to keep the rate under a limit.
struct Throttle {
    rate: Option<u64>,
    start: Instant,
    sent: u64,
}

impl Throttle {
    fn take(&mut self, bytes: u64) {
        self.sent += bytes;
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            let spent = self.start.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
    }
}

fn source(e: impl std::fmt::Display) -> OpError {
    OpError::new(ErrorKind::Internal, format!("the source store failed: {e}"))
}

fn target(e: StoreError) -> OpError {
    let kind = super::error::store_kind(&e);
    OpError::new(kind, format!("the target store failed: {e}")).with_source(e)
}

/// The snapshots of `from` that `opts` selects, oldest first.
pub fn selected(from: &dyn Store, opts: &SyncOptions) -> Result<Vec<Manifest>, OpError> {
    let (all, damaged) = from.list(None).map_err(source)?;
    for d in &damaged {
        tracing::warn!(error = %d, "a damaged manifest in the source is not copied");
    }
    let mut out: Vec<Manifest> = all
        .into_iter()
        .filter(|m| opts.disks.is_empty() || opts.disks.contains(&m.disk))
        .collect();
    if let Some(n) = opts.newest {
        let mut keep = HashSet::new();
        let mut disks: Vec<&DiskName> = out.iter().map(|m| &m.disk).collect();
        disks.sort();
        disks.dedup();
        for d in disks {
            let of: Vec<&Manifest> = out.iter().filter(|m| &m.disk == d).collect();
            for m in of.iter().rev().take(n) {
                keep.insert(m.id.clone());
            }
        }
        out.retain(|m| keep.contains(&m.id));
    }
    Ok(out)
}

/// Copies the selected snapshots of `from` that `to` lacks. A run that
/// fails or is cancelled still makes durable what it sent (best effort),
/// so the next run does not send it again.
pub fn sync(
    from: &dyn Store,
    to: &dyn Store,
    opts: &SyncOptions,
    progress: &Progress,
) -> Result<SyncReport, OpError> {
    let r = copy(from, to, opts, progress);
    if r.is_err() {
        if let Err(e) = to.sync() {
            tracing::warn!("what this sync sent could not be made durable: {e}");
        }
    }
    r
}

fn copy(
    from: &dyn Store,
    to: &dyn Store,
    opts: &SyncOptions,
    progress: &Progress,
) -> Result<SyncReport, OpError> {
    let started = Instant::now();
    let mut wanted = selected(from, opts)?;
    let mut refused: Vec<String> = Vec::new();
    if let Some((rules, site)) = &opts.placement {
        for d in &opts.disks {
            rules
                .check(d.as_str(), site.as_deref())
                .map_err(|e| OpError::forbidden(e.to_string()))?;
        }
        wanted.retain(|m| match rules.check(m.disk.as_str(), site.as_deref()) {
            Ok(()) => true,
            Err(e) => {
                if !refused.contains(&e.disk) {
                    tracing::warn!("{e}: its snapshots are not copied");
                    refused.push(e.disk);
                }
                false
            }
        });
    }
    let (there, _) = to.list(None).map_err(target)?;
    let there: HashSet<_> = there.into_iter().map(|m| m.id).collect();
    let todo: Vec<&Manifest> = wanted.iter().filter(|m| !there.contains(&m.id)).collect();
    let mut report = SyncReport {
        present: (wanted.len() - todo.len()) as u64,
        refused,
        ..Default::default()
    };
    progress.set_total(todo.iter().map(|m| m.chunks() + m.pages.len() as u64).sum());
    let checkpoint = if opts.checkpoint == 0 {
        256 << 20
    } else {
        opts.checkpoint
    };
    let mut throttle = Throttle {
        rate: opts.bandwidth,
        start: Instant::now(),
        sent: 0,
    };
    let mut since_sync = 0u64;
    for m in todo {
        // Held so that a collection on the target keeps what this copy
        // finds present there until the snapshot is committed.
        let _lock = to.lock(&m.disk, None).map_err(target)?;
        let mut seen: HashSet<ChunkDigest> = HashSet::new();
        let mut pending: Vec<ChunkDigest> = Vec::new();
        let mut send = |batch: &mut Vec<ChunkDigest>,
                        report: &mut SyncReport,
                        since_sync: &mut u64|
         -> Result<(), OpError> {
            if batch.is_empty() {
                return Ok(());
            }
            let missing = to.missing(batch).map_err(target)?;
            for (d, miss) in batch.iter().zip(missing) {
                if progress.cancelled() {
                    return Err(OpError::cancelled("the replication"));
                }
                progress.add(1);
                if !miss {
                    continue;
                }
                let file = from.get_chunk(d).map_err(source)?;
                chunk::decode_verified(&file, d).map_err(|e| {
                    OpError::new(
                        ErrorKind::Damaged,
                        format!(
                            "chunk {d} of snapshot {} is damaged in the source ({e}); run `novabackup verify {}` there, then sync again",
                            m.id, m.id
                        ),
                    )
                })?;
                let n = file.len() as u64;
                to.put_chunk(d, &file).map_err(target)?;
                report.chunks_sent += 1;
                report.bytes_sent += n;
                *since_sync += n;
                throttle.take(n);
                if *since_sync >= checkpoint {
                    to.sync().map_err(target)?;
                    *since_sync = 0;
                }
            }
            batch.clear();
            Ok(())
        };
        for p in 0..m.pages.len() {
            let page = load_page(from, m, p as u64).map_err(|e| {
                OpError::new(ErrorKind::Damaged, format!("in the source: {e}")).with_source(e)
            })?;
            for d in std::iter::once(m.pages[p]).chain(page.into_iter().filter(|d| !d.is_zero())) {
                if seen.insert(d) {
                    pending.push(d);
                    if pending.len() >= BATCH {
                        send(&mut pending, &mut report, &mut since_sync)?;
                    }
                }
            }
        }
        send(&mut pending, &mut report, &mut since_sync)?;
        report.chunks_named += seen.len() as u64;
        match to.commit(m) {
            Ok(()) => report.copied.push(m.id.to_string()),
            // Another replication got there first: the same snapshot.
            Err(StoreError::Exists(_)) => report.present += 1,
            Err(e) => return Err(target(e)),
        }
        since_sync = 0;
        tracing::info!(snapshot = %m.id, "replicated");
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::manifest;
    use crate::store::memory::MemoryStore;

    fn put(s: &dyn Store, plain: &[u8]) -> ChunkDigest {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let d = ChunkDigest::of(plain);
        s.put_chunk(&d, &chunk::encode(plain, &mut z).0).unwrap();
        d
    }

    fn snap(s: &dyn Store, disk: &str, t: u64, chunks: &[ChunkDigest]) -> Manifest {
        let page = crate::format::index::encode_page(chunks);
        let p = put(s, &page);
        let mut m = manifest(disk, t, vec![p]);
        m.image_size = chunks.len() as u64 * m.chunk_size;
        s.commit(&m).unwrap();
        m
    }

    #[test]
    fn only_what_the_target_lacks_moves_and_a_second_run_moves_nothing() {
        let (a, b) = (MemoryStore::new(), MemoryStore::new());
        let x = put(&a, b"x");
        let y = put(&a, b"y");
        snap(&a, "vm", 1_000, &[x, y]);
        let z = put(&a, b"z");
        snap(&a, "vm", 2_000, &[x, z]);
        let r = sync(&a, &b, &SyncOptions::default(), &Progress::default()).unwrap();
        assert_eq!(r.copied.len(), 2);
        // x, y, z and two pages: x once.
        assert_eq!(r.chunks_sent, 5);
        let again = sync(&a, &b, &SyncOptions::default(), &Progress::default()).unwrap();
        assert_eq!(
            (again.copied.len(), again.present, again.chunks_sent),
            (0, 2, 0)
        );
        assert_eq!(b.list(None).unwrap().0.len(), 2);
    }

    #[test]
    fn filters_pick_disks_and_the_newest() {
        let (a, b) = (MemoryStore::new(), MemoryStore::new());
        let x = put(&a, b"x");
        for t in 1..=3 {
            snap(&a, "vm", t * 1000, &[x]);
            snap(&a, "db", t * 1000, &[x]);
        }
        let opts = SyncOptions {
            disks: vec!["vm".parse().unwrap()],
            newest: Some(2),
            ..Default::default()
        };
        let r = sync(&a, &b, &opts, &Progress::default()).unwrap();
        assert_eq!(r.copied, ["vm@19700101T003320Z", "vm@19700101T005000Z"]);
    }

    #[test]
    fn placement_keeps_a_disk_away_from_a_forbidden_site() {
        let (a, b) = (MemoryStore::new(), MemoryStore::new());
        let x = put(&a, b"x");
        let secret = put(&a, b"secret");
        snap(&a, "vm", 1_000, &[x]);
        snap(&a, "secret", 1_000, &[secret]);
        let rules =
            crate::placement::Placement([("secret".to_string(), vec!["home".to_string()])].into());
        let opts = SyncOptions {
            placement: Some((rules.clone(), Some("abroad".into()))),
            ..Default::default()
        };
        let r = sync(&a, &b, &opts, &Progress::default()).unwrap();
        assert_eq!(
            (r.copied.len(), r.refused.clone()),
            (1, vec!["secret".to_string()])
        );
        assert_eq!(b.missing(&[secret, x]).unwrap(), vec![true, false]);
        let named = SyncOptions {
            disks: vec!["secret".parse().unwrap()],
            ..opts
        };
        let e = sync(&a, &b, &named, &Progress::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Forbidden, "{e}");
        let home = SyncOptions {
            placement: Some((rules, Some("home".into()))),
            ..Default::default()
        };
        assert_eq!(
            sync(&a, &b, &home, &Progress::default())
                .unwrap()
                .copied
                .len(),
            1
        );
    }

    #[test]
    fn a_damaged_source_chunk_is_never_replicated() {
        let (a, b) = (MemoryStore::new(), MemoryStore::new());
        let x = ChunkDigest::of(b"x");
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        // Stored under x's name but holding other bytes.
        a.put_chunk(&x, &chunk::encode(b"not x", &mut z).0).unwrap();
        let m = snap(&a, "vm", 1_000, &[x]);
        let e = sync(&a, &b, &SyncOptions::default(), &Progress::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
        assert!(e.to_string().contains("verify"), "{e}");
        assert!(b.manifest(&m.id).is_err());
        assert_eq!(b.missing(&[x]).unwrap(), vec![true]);
    }
}
