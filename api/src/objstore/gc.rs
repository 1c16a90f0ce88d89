//! Garbage collection of an object store, in two phases across runs.
//!
//! A run finds what the listed manifests (and this process's running
//! backups) reference, then:
//! - dooms each pack older than the grace period that holds nothing
//!   referenced, and rewrites a pack whose unreferenced share passes the
//!   threshold (its live chunks go into new packs, the old one is doomed);
//! - deletes each pack doomed at least a grace period ago that is still
//!   unreferenced, and un-dooms one a snapshot has come to reference.
//!
//! Doomed and deleted packs are recorded in `gc/state.json`, which every
//! backup reads before its commit: what it needs from a doomed pack it
//! copies first, and a commit naming a deleted pack fails instead of
//! publishing a snapshot that cannot be restored. A snapshot committed
//! against an older state is seen by the listing of the run that would
//! delete its pack, as long as listings lag less than the grace period.
//! With a grace period of zero, a run deletes what it dooms at once:
//! only for a store a single process writes.
//!
//! One collection runs at a time: `gc/lock.json` is a lease written with
//! a conditional PUT; one older than [`LEASE`] is taken over (its
//! collector died).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::progress::Progress;
use novabackup_engine::store::pages::load_page;
use novabackup_engine::store::{GcOptions, GcReport, Store, StoreError};
use novabackup_engine::time::now_unix;

use super::{lock, pack_key, pack_time, DigestSet, ObjectStore};

/// A collection lease older than this belongs to a collector that died.
const LEASE: Duration = Duration::from_secs(6 * 3600);
/// How long deleted packs are remembered in the state.
const REMEMBER_DELETED: u64 = 7 * 86400;
const LOCK_KEY: &str = "gc/lock.json";

/// A live chunk where it lies: digest, offset and length in its pack.
type Placed = (ChunkDigest, u64, u32);

/// Removes the lease and the in-process marks when the run ends, however.
struct Running<'a> {
    store: &'a ObjectStore,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut g = lock(&self.store.guard);
        g.gc = false;
        if !g.tracking() {
            g.touched = DigestSet::default();
        }
        drop(g);
        if let Err(e) = self.store.s3.delete(LOCK_KEY) {
            tracing::warn!(error = %e, "could not remove the collection lease; the next collection waits for it to expire");
        }
    }
}

fn refuse(why: String) -> StoreError {
    StoreError::Gc(format!(
        "{why}; nothing was removed, so that a repair still finds every chunk"
    ))
}

fn take_lease(s: &ObjectStore) -> Result<(), StoreError> {
    let now = now_unix();
    let me = serde_json::json!({
        "host": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        "pid": std::process::id(),
        "started": now,
    })
    .to_string();
    if s.s3
        .put_new(LOCK_KEY, me.as_bytes())
        .map_err(|e| s.err(e))?
    {
        return Ok(());
    }
    let held =
        s.s3.get(LOCK_KEY)
            .map_err(|e| s.err(e))?
            .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&held).unwrap_or_default();
    let started = v.get("started").and_then(|t| t.as_u64()).unwrap_or(0);
    if now.saturating_sub(started) < LEASE.as_secs() {
        return Err(StoreError::Gc(format!(
            "another garbage collection holds {}{LOCK_KEY} ({v}); wait for it, or remove that object if its collector died",
            s.s3.describe()
        )));
    }
    tracing::warn!(lease = %v, "taking over a stale collection lease");
    s.s3.put(LOCK_KEY, me.as_bytes()).map_err(|e| s.err(e))
}

pub(super) fn collect(
    s: &ObjectStore,
    opts: &GcOptions,
    progress: &Progress,
) -> Result<GcReport, StoreError> {
    let _one = s
        .collecting
        .try_lock()
        .map_err(|_| StoreError::Gc("a garbage collection is already running".into()))?;
    let started = Instant::now();
    take_lease(s)?;
    lock(&s.guard).gc = true;
    let _running = Running { store: s };
    s.flush()?;
    let mut state = s.read_state()?;
    s.refresh_packs()?;
    s.apply_state(&state);
    let bytes_before = s.usage()?;

    let (manifests, damaged) = s.list(None)?;
    if let Some(d) = damaged.first() {
        return Err(refuse(d.to_string()));
    }
    let pinned: Vec<_> = lock(&s.guard).locks.values().flatten().cloned().collect();
    progress.set_total((manifests.len() + pinned.len()) as u64);
    let mut live = DigestSet::default();
    for m in manifests.iter().chain(&pinned) {
        if progress.cancelled() {
            return Err(StoreError::Gc("cancelled; nothing was removed".into()));
        }
        for p in 0..m.pages.len() {
            live.insert(m.pages[p]);
            let page = load_page(s, m, p as u64).map_err(|e| refuse(e.to_string()))?;
            live.extend(page.into_iter().filter(|c| !c.is_zero()));
        }
        progress.add(1);
    }

    let now = now_unix();
    let grace = s.grace.as_secs();
    let mut report = GcReport {
        snapshots: manifests.len() as u64,
        live_chunks: live.len() as u64,
        bytes_before,
        ..Default::default()
    };

    // Phase 1, under the guard: what each pack holds that is live.
    let mut rewrite: Vec<(u32, Vec<Placed>)> = Vec::new();
    {
        let g = lock(&s.guard);
        let index = s.index.read().unwrap_or_else(|p| p.into_inner());
        let mut packs = lock(&s.packs);
        let mut live_in: HashMap<u32, Vec<Placed>> = HashMap::new();
        let mut dead_in: HashMap<u32, u64> = HashMap::new();
        for (d, l) in index.iter() {
            if live.contains(d) || g.touched.contains(d) {
                live_in
                    .entry(l.pack)
                    .or_default()
                    .push((*d, l.offset, l.len));
            } else {
                *dead_in.entry(l.pack).or_default() += 1;
            }
        }
        for (n, p) in packs.iter_mut().enumerate() {
            let n = n as u32;
            if p.gone || p.doomed || p.staged.is_some() || p.size == 0 {
                continue;
            }
            if now.saturating_sub(pack_time(&p.id)) < grace {
                continue;
            }
            report.packs_scanned += 1;
            let live_here = live_in.remove(&n).unwrap_or_default();
            let live_bytes: u64 = live_here.iter().map(|c| c.2 as u64).sum();
            if live_here.is_empty() {
                p.doomed = true;
                state.doomed.insert(p.id.clone(), now);
                report.chunks_removed += dead_in.get(&n).copied().unwrap_or(0);
                continue;
            }
            let dead_bytes = p.size.saturating_sub(live_bytes + 1024);
            if dead_in.get(&n).copied().unwrap_or(0) == 0 {
                continue;
            }
            let percent = dead_bytes * 100 / p.size.max(1);
            if percent >= opts.min_garbage_percent as u64 {
                rewrite.push((n, live_here));
            } else {
                report.packs_below_threshold += 1;
                report.bytes_left += dead_bytes;
            }
        }
    }

    // Phase 2: rewrites, each pack read in one request.
    for (n, live_here) in &rewrite {
        let id = lock(&s.packs)[*n as usize].id.clone();
        let Some(body) = s.s3.get(&pack_key(&id)).map_err(|e| s.err(e))? else {
            continue;
        };
        for (d, off, len) in live_here {
            let (a, b) = (*off as usize, *off as usize + *len as usize);
            if b <= body.len() {
                s.stage(d, &body[a..b], true)?;
            }
        }
    }
    s.flush()?;
    {
        let g = lock(&s.guard);
        let index = s.index.read().unwrap_or_else(|p| p.into_inner());
        // A chunk of a rewritten pack found by a backup since phase 1
        // (it was not copied): that pack stays.
        let mut keep: std::collections::HashSet<u32> = Default::default();
        for d in g.touched.iter() {
            if let Some(l) = index.get(d) {
                keep.insert(l.pack);
            }
        }
        let mut packs = lock(&s.packs);
        for (n, live_here) in &rewrite {
            if keep.contains(n) {
                continue;
            }
            let p = &mut packs[*n as usize];
            p.doomed = true;
            state.doomed.insert(p.id.clone(), now);
            report.packs_rewritten += 1;
            let dead = index.values().filter(|l| l.pack == *n).count();
            report.chunks_removed += dead.saturating_sub(live_here.len()) as u64;
        }
    }

    // Phase 3: deletions due, unless a snapshot came to need the pack.
    let due: Vec<(u32, String)> = {
        let by_id = lock(&s.by_id);
        state
            .doomed
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) >= grace)
            .filter_map(|(id, _)| by_id.get(id).map(|n| (*n, id.clone())))
            .collect()
    };
    let mut needed: std::collections::HashSet<u32> = Default::default();
    {
        let g = lock(&s.guard);
        let index = s.index.read().unwrap_or_else(|p| p.into_inner());
        for d in live.iter().chain(g.touched.iter()) {
            if let Some(l) = index.get(d) {
                needed.insert(l.pack);
            }
        }
    }
    for (n, id) in due {
        if needed.contains(&n) {
            tracing::info!(pack = %id, "a snapshot needs a doomed pack: it stays");
            state.doomed.remove(&id);
            lock(&s.packs)[n as usize].doomed = false;
            continue;
        }
        s.s3.delete(&pack_key(&id)).map_err(|e| s.err(e))?;
        state.doomed.remove(&id);
        state.deleted.insert(id.clone(), now);
        lock(&s.packs)[n as usize].gone = true;
        {
            let mut index = s.index.write().unwrap_or_else(|p| p.into_inner());
            index.retain(|_, l| l.pack != n);
        }
        if let Some(c) = &s.cache {
            let _ = std::fs::remove_file(c.join("tocs").join(&id));
        }
        report.packs_deleted += 1;
    }
    state
        .deleted
        .retain(|_, t| now.saturating_sub(*t) < REMEMBER_DELETED);
    let body = serde_json::to_vec_pretty(&state).expect("state serializes");
    s.s3.put(super::STATE_KEY, &body).map_err(|e| s.err(e))?;
    report.bytes_after = s.usage()?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}
