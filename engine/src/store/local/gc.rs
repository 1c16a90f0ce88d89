//! Garbage collection of a local store.
//!
//! Mark: every index page of every committed snapshot and of the base
//! snapshot of every running backup (pinned by its lock), and every chunk
//! those pages name. Sweep: each published pack holding anything unmarked
//! is rewritten without it (its live chunks are appended to new packs), the
//! new packs are published durably, and only then are the old packs
//! deleted.
//!
//! Running backups: from the moment a backup takes its disk lock until it
//! lets go, and for the whole collection, every chunk stored or found
//! present is recorded in the store's `touched` set, under the same mutex
//! the sweep holds when it drops a chunk from the index. A chunk a backup
//! relies on is therefore either marked, touched (and kept), or already
//! gone from the index when the backup asks (and stored again).
//!
//! Crash safety: until the new packs are published the old ones are
//! untouched (and the new ones sit in `tmp/`, emptied at open); after that,
//! a chunk may exist twice, which loading tolerates and the next collection
//! removes (only the copy the index points to counts as live).

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{lock, read_toc, DigestSet, Loc, LocalStore, Writer, PACK_TARGET};
use crate::digest::ChunkDigest;
use crate::format::manifest::Manifest;
use crate::format::pack;
use crate::fsutil;
use crate::progress::Progress;
use crate::store::pages::load_page;
use crate::store::{GcOptions, GcReport, Store, StoreError};

/// Where a test makes the collection stop, as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Run to the end.
    Never,
    /// Return once the new packs are durable, before deleting old ones.
    #[cfg_attr(not(test), allow(dead_code))]
    AfterPublish,
}

/// Runs one collection (module doc).
pub(crate) fn collect(
    s: &LocalStore,
    opts: &GcOptions,
    progress: &Progress,
    stop: Stop,
) -> Result<GcReport, StoreError> {
    let started = Instant::now();
    let _one = match s.collecting.try_lock() {
        Ok(g) => g,
        // A collection that panicked is over; it must not block the next.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            return Err(StoreError::Gc(
                "another garbage collection is running".into(),
            ))
        }
    };
    /// Ends the collection's tracking however `run` returns (or panics).
    struct Tracking<'a>(&'a LocalStore);
    impl Drop for Tracking<'_> {
        fn drop(&mut self) {
            self.0.collections.fetch_add(1, Ordering::SeqCst);
            let mut g = lock(&self.0.guard);
            g.gc = false;
            if !g.tracking() {
                g.touched = DigestSet::default();
            }
        }
    }
    s.collections.fetch_add(1, Ordering::SeqCst);
    lock(&s.guard).gc = true;
    let tracking = Tracking(s);
    let r = run(s, opts, progress, stop);
    drop(tracking);
    let mut rep = r?;
    rep.duration_ms = started.elapsed().as_millis() as u64;
    Ok(rep)
}

fn run(
    s: &LocalStore,
    opts: &GcOptions,
    progress: &Progress,
    stop: Stop,
) -> Result<GcReport, StoreError> {
    let mut rep = GcReport {
        bytes_before: s.usage()?,
        ..GcReport::default()
    };
    s.sync_packs()?;
    let (manifests, damaged) = s.list(None)?;
    if let Some(e) = damaged.first() {
        return Err(StoreError::Gc(format!(
            "{e}; the chunks of a damaged manifest cannot be told from garbage: restore the file or delete the snapshot first"
        )));
    }
    rep.snapshots = manifests.len() as u64;
    let pins: Vec<Manifest> = lock(&s.guard).pins.iter().map(|(_, m)| m.clone()).collect();
    let roots: Vec<&Manifest> = manifests.iter().chain(&pins).collect();
    let packs: Vec<(u32, String)> = lock(&s.packs)
        .iter()
        .enumerate()
        .filter(|(_, p)| p.published && !p.removed)
        .map(|(n, p)| (n as u32, p.id.clone()))
        .collect();
    let pages_total: usize = roots.iter().map(|m| m.pages.len()).sum();
    progress.set_total((pages_total + packs.len()) as u64);

    // Mark.
    let mut live = DigestSet::default();
    for m in &roots {
        for (p, d) in m.pages.iter().enumerate() {
            progress.add(1);
            if !live.insert(*d) {
                continue;
            }
            let page = load_page(s, m, p as u64).map_err(|e| {
                StoreError::Gc(format!(
                    "{e}; nothing was removed, so that a repair still finds every chunk"
                ))
            })?;
            live.extend(page.into_iter().filter(|c| !c.is_zero()));
        }
        if progress.cancelled() {
            return Err(StoreError::Gc("cancelled; nothing was removed".into()));
        }
    }
    rep.live_chunks = live.len() as u64;

    // Sweep. Until the new packs are durable, a failure (a full disk)
    // puts every moved chunk back where the index had it: the old packs
    // are all still there.
    let mut moves = Moves::default();
    let doomed = match sweep(s, opts, progress, &live, packs, &mut rep, &mut moves)
        .and_then(|d| s.sync_packs().map(|()| d))
    {
        Ok(d) => d,
        Err(e) => {
            rollback(s, &moves);
            return Err(e);
        }
    };
    if stop == Stop::AfterPublish {
        return Ok(rep);
    }
    crate::fault::point("gc-before-delete");
    let mut first = true;
    for (n, id) in doomed {
        if !std::mem::take(&mut first) {
            crate::fault::point("gc-mid-delete");
        }
        let path = s.pack_path(&id, true);
        {
            let mut packs = lock(&s.packs);
            packs[n as usize].removed = true;
            packs[n as usize].file = None;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&path, e)),
        }
    }
    fsutil::sync_dir(&s.root.join("packs")).map_err(|e| StoreError::io(&s.root, e))?;
    rep.bytes_after = s.usage()?;
    Ok(rep)
}

/// Rewrites the packs holding garbage; returns the packs to delete once
/// the new ones are published. Every index move goes into `journal`.
fn sweep(
    s: &LocalStore,
    opts: &GcOptions,
    progress: &Progress,
    live: &DigestSet,
    packs: Vec<(u32, String)>,
    rep: &mut GcReport,
    moves: &mut Moves,
) -> Result<Vec<(u32, String)>, StoreError> {
    let mut out: Option<Writer> = None;
    let mut doomed: Vec<(u32, String)> = Vec::new();
    for (n, id) in packs {
        progress.add(1);
        rep.packs_scanned += 1;
        let path = s.pack_path(&id, true);
        let entries = match read_toc(&path) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!(pack = %path.display(), %why, "garbage collection skips an unreadable pack");
                continue;
            }
        };
        let here = |e: &pack::Entry| {
            s.index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&e.digest)
                .is_some_and(|l| l.pack == n && l.offset == e.offset)
        };
        let (keep, gone): (Vec<&pack::Entry>, Vec<&pack::Entry>) = entries
            .iter()
            .partition(|e| here(e) && live.contains(&e.digest));
        if gone.is_empty() {
            continue;
        }
        let garbage: u64 = gone.iter().map(|e| e.len as u64).sum();
        let size: u64 = entries.iter().map(|e| e.len as u64).sum();
        if garbage * 100 < u64::from(opts.min_garbage_percent) * size {
            rep.packs_below_threshold += 1;
            rep.bytes_left += garbage;
            continue;
        }
        if progress.cancelled() {
            break;
        }
        let old = s.pack_file(n)?;
        let mut moved: Vec<(pack::Entry, Loc)> = Vec::with_capacity(keep.len());
        for e in keep {
            moved.push((*e, append(s, &mut out, &mut moves.open, &old, e)?));
        }
        // Decide the rest against what backups touched up to now.
        let g = lock(&s.guard);
        let mut removed = 0;
        let mut dropped = Vec::new();
        for e in gone {
            if !here(e) {
                continue; // a duplicate copy: the index points elsewhere
            }
            if g.touched.contains(&e.digest) {
                moved.push((*e, append(s, &mut out, &mut moves.open, &old, e)?));
            } else {
                dropped.push(e.digest);
            }
        }
        // Readers follow the index to the file: what moved must be there.
        if let Some(w) = out.as_mut() {
            w.out
                .write_through()
                .map_err(|x| StoreError::io(&s.root, x))?;
        }
        {
            let mut index = s.index.write().unwrap_or_else(|p| p.into_inner());
            for (e, to) in &moved {
                if let Some(l) = index.get_mut(&e.digest) {
                    if l.pack == n && l.offset == e.offset {
                        moves.journal.push((e.digest, *l, *to));
                        *l = *to;
                    }
                }
            }
            for d in dropped {
                if index.get(&d).is_some_and(|l| l.pack == n) {
                    index.remove(&d);
                    removed += 1;
                }
            }
        }
        drop(g);
        rep.chunks_removed += removed;
        if moved.is_empty() {
            rep.packs_deleted += 1;
        } else {
            rep.packs_rewritten += 1;
        }
        doomed.push((n, id));
    }
    if let Some(mut w) = out.take() {
        s.seal(&mut w)?;
        moves.open = None;
    }
    Ok(doomed)
}

/// What a sweep changed, to undo it if it fails before publishing.
#[derive(Default)]
struct Moves {
    /// (chunk, old place, new place) of every index move.
    journal: Vec<(ChunkDigest, Loc, Loc)>,
    /// The sweep's open pack, if any (its file is only ours until sealed).
    open: Option<u32>,
}

/// Points moved chunks back at their old packs (where they still are) and
/// deletes the sweep's unsealed pack, which a full disk needs back.
fn rollback(s: &LocalStore, moves: &Moves) {
    {
        let _g = lock(&s.guard);
        let mut index = s.index.write().unwrap_or_else(|p| p.into_inner());
        for (d, old, new) in &moves.journal {
            if let Some(l) = index.get_mut(d) {
                if l.pack == new.pack && l.offset == new.offset {
                    *l = *old;
                }
            }
        }
    }
    if let Some(n) = moves.open {
        let mut packs = lock(&s.packs);
        let p = &mut packs[n as usize];
        if !p.published {
            let _ = fs::remove_file(s.pack_path(&p.id, false));
            p.removed = true;
            p.file = None;
        }
    }
    tracing::warn!(
        moved = moves.journal.len(),
        "garbage collection failed; every chunk it moved is read from its old pack again"
    );
}

/// Copies one chunk file into the collection's open pack.
fn append(
    s: &LocalStore,
    out: &mut Option<Writer>,
    open: &mut Option<u32>,
    old: &Arc<fs::File>,
    e: &pack::Entry,
) -> Result<Loc, StoreError> {
    let mut buf = vec![0u8; e.len as usize];
    old.read_exact_at(&mut buf, e.offset)
        .map_err(|x| StoreError::io(&s.root, x))?;
    if out.is_none() {
        let w = s.new_writer()?;
        *open = Some(w.pack);
        *out = Some(w);
    }
    let w = out.as_mut().expect("just set");
    let offset = w.out.append(&buf).map_err(|x| StoreError::io(&s.root, x))?;
    w.entries.push(pack::Entry {
        digest: e.digest,
        offset,
        len: e.len,
    });
    let loc = Loc {
        pack: w.pack,
        offset,
        len: e.len,
    };
    if w.out.len() >= PACK_TARGET {
        let mut full = out.take().expect("open");
        s.seal(&mut full)?;
        *open = None;
    }
    Ok(loc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::ChunkDigest;
    use crate::format::{chunk, index};
    use crate::ids::DiskName;
    use crate::store::conformance::manifest;

    /// Stores chunks `names` and a snapshot at `t` whose page names them.
    fn snap(s: &LocalStore, t: u64, names: &[&str]) -> (Manifest, Vec<ChunkDigest>) {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let ds: Vec<ChunkDigest> = names
            .iter()
            .map(|n| ChunkDigest::of(n.as_bytes()))
            .collect();
        for (n, d) in names.iter().zip(&ds) {
            s.put_chunk(d, &chunk::encode(n.as_bytes(), &mut z).0)
                .unwrap();
        }
        let page = index::encode_page(&ds);
        let p = ChunkDigest::of(&page);
        s.put_chunk(&p, &chunk::encode(&page, &mut z).0).unwrap();
        s.sync().unwrap();
        let mut m = manifest("vm", t, vec![p]);
        // As many chunks as names, so the page decodes.
        m.image_size = m.chunk_size * names.len() as u64;
        s.commit(&m).unwrap();
        (m, ds)
    }

    fn gc(s: &LocalStore) -> GcReport {
        collect(s, &GcOptions::default(), &Progress::default(), Stop::Never).unwrap()
    }

    #[test]
    fn unreferenced_chunks_go_and_referenced_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let (m1, d1) = snap(&s, 1000, &["a", "b"]);
        let (_m2, d2) = snap(&s, 2000, &["b", "c"]);
        s.delete(&m1.id).unwrap();
        let r = gc(&s);
        assert_eq!(r.snapshots, 1);
        assert_eq!(r.chunks_removed, 2, "chunk a and m1's page: {r:?}");
        assert_eq!(
            s.missing(&[d1[0], d2[0], d2[1]]).unwrap(),
            [true, false, false]
        );
        assert!(r.bytes_after < r.bytes_before);
        // Reopened, the store agrees, and a second run has nothing to do.
        drop(s);
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(
            s.missing(&[d1[0], d2[0], d2[1]]).unwrap(),
            [true, false, false]
        );
        let r = gc(&s);
        assert_eq!(
            (r.chunks_removed, r.packs_rewritten, r.packs_deleted),
            (0, 0, 0)
        );
    }

    #[test]
    fn what_a_running_backup_touched_or_builds_on_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let (m1, d1) = snap(&s, 1000, &["a"]);
        let (m2, d2) = snap(&s, 2000, &["x"]);
        s.delete(&m1.id).unwrap();
        let disk: DiskName = "vm".parse().unwrap();
        // A backup found chunk a present before the collection started,
        // and builds on m2, which is deleted meanwhile.
        let held = s.lock(&disk, Some(&m2)).unwrap();
        s.delete(&m2.id).unwrap();
        assert_eq!(s.missing(&d1).unwrap(), [false]);
        gc(&s);
        assert_eq!(s.missing(&[d1[0], d2[0], m2.pages[0]]).unwrap(), [false; 3]);
        drop(held);
        let r = gc(&s);
        assert_eq!(r.chunks_removed, 3, "{r:?}");
        assert_eq!(s.missing(&[d1[0], d2[0]]).unwrap(), [true, true]);
    }

    #[test]
    fn a_crash_after_publishing_loses_nothing_and_the_next_run_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let (m1, _) = snap(&s, 1000, &["a", "b"]);
        let (m2, d2) = snap(&s, 2000, &["b", "c"]);
        s.delete(&m1.id).unwrap();
        collect(
            &s,
            &GcOptions::default(),
            &Progress::default(),
            Stop::AfterPublish,
        )
        .unwrap();
        drop(s); // the crash
        let s = LocalStore::open(dir.path()).unwrap();
        let report = crate::verify::verify(&s, std::slice::from_ref(&m2), 1, &Progress::default());
        assert!(report.ok(), "{report:?}");
        let r = gc(&s);
        assert!(r.packs_deleted + r.packs_rewritten > 0, "{r:?}");
        assert_eq!(s.missing(&d2).unwrap(), [false, false]);
        let report = crate::verify::verify(&s, &[m2], 1, &Progress::default());
        assert!(report.ok(), "{report:?}");
    }

    #[test]
    fn a_threshold_leaves_packs_that_are_mostly_live() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let names: Vec<String> = (0..20).map(|i| format!("chunk {i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (m1, _) = snap(&s, 1000, &refs);
        // A second snapshot keeps 19 of the 20 chunks.
        let (_m2, _) = snap(&s, 2000, &refs[1..]);
        s.delete(&m1.id).unwrap();
        // The chunks spread over one pack per writer; every pack holding
        // garbage (chunk 0, m1's page) holds live chunks too, so at 100%
        // nothing qualifies.
        let all = GcOptions {
            min_garbage_percent: 100,
        };
        let r = collect(&s, &all, &Progress::default(), Stop::Never).unwrap();
        assert_eq!((r.packs_rewritten, r.chunks_removed), (0, 0), "{r:?}");
        assert!(r.packs_below_threshold >= 1 && r.bytes_left > 0, "{r:?}");
        let d0 = ChunkDigest::of(b"chunk 0");
        assert_eq!(s.missing(&[d0]).unwrap(), [false]);
        let r = gc(&s);
        assert_eq!((r.chunks_removed, r.packs_below_threshold), (2, 0), "{r:?}");
        assert_eq!(s.missing(&[d0]).unwrap(), [true]);
    }

    #[test]
    fn a_damaged_manifest_stops_the_collection() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let (m1, d1) = snap(&s, 1000, &["a"]);
        let path = s.manifest_path(&m1.id);
        fs::write(&path, b"{ broken").unwrap();
        let e = collect(&s, &GcOptions::default(), &Progress::default(), Stop::Never).unwrap_err();
        assert!(e.to_string().contains("delete the snapshot"), "{e}");
        assert_eq!(s.missing(&d1).unwrap(), [false]);
    }
}
