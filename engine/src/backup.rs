//! The backup pipeline: read the planned chunks (io_uring, many in flight),
//! settle each against the checkpoint's copy-before-write store so it holds
//! the contents at the checkpoint, then on worker threads fed through a
//! bounded channel: skip all-zero chunks, SHA-256, ask the store whether
//! it has the digest, compress with zstd (raw when that does not pay) and
//! store. A collector fills the index pages; unchanged pages keep the base
//! snapshot's page digests. Then the store syncs and the manifest is
//! committed: the snapshot is visible only once all its data is durable.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::bufpool;
use crate::digest::{is_all_zero, ChunkDigest};
use crate::format::chunk;
use crate::format::index::{self, PAGE_DIGESTS};
use crate::format::manifest::{AuditRecord, BackupKind, BackupStats, CbtRecord, Manifest, FORMAT};
use crate::ids::{DiskName, SnapshotId};
use crate::pagecache::PageCache;
use crate::plan::BackupPlan;
use crate::progress::Progress;
use crate::read::{read_chunks, ReadEngine, ReadError, ReadJob};
use crate::store::pages::{load_page, PageError};
use crate::store::{Store, StoreError};

/// The point-in-time view a backup reads through: after a chunk is read
/// from the image, `settle` replaces any part of it that the guest has
/// overwritten since the checkpoint with the copy taken before the write.
pub trait PointInTime: Sync {
    /// Settles `buf`, read from the image at `offset`.
    fn settle(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// No checkpoint: the image is not being written (tests, offline images).
pub struct Quiescent;

impl PointInTime for Quiescent {
    fn settle(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Ok(())
    }
}

pub use crate::format::chunk::DEFAULT_ZSTD_LEVEL;

/// Tunables of the pipeline.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupOptions {
    /// Chunk size in bytes (default 64 KiB; see benches/RESULTS.md, "Chunk size").
    pub chunk_size: u64,
    /// zstd level ([`DEFAULT_ZSTD_LEVEL`]).
    pub zstd_level: i32,
    /// Hash and compression threads (0 = one per CPU).
    pub workers: usize,
    /// Reads in flight.
    pub read_depth: usize,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            chunk_size: 64 * 1024,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            workers: 0,
            read_depth: 32,
        }
    }
}

/// Errors of a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading the image failed.
    #[error("reading the image failed: {0}")]
    Read(io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The base snapshot's index could not be read.
    #[error("the index of base snapshot {id} cannot be read ({why}); run `novabackup verify {id}`, and back up with --full")]
    BadBase {
        /// The base.
        id: SnapshotId,
        /// What failed.
        why: String,
    },
    /// Cancelled by the operator.
    #[error("the backup was cancelled")]
    Cancelled,
    /// A quota would be exceeded.
    #[error("the backup stopped: it would exceed {0}; prune snapshots and run `novabackup gc`, or raise the limit with `novabackup quota set`")]
    Quota(String),
    /// zstd could not start.
    #[error("cannot start zstd at level {0}: {1}")]
    Zstd(i32, io::Error),
}

impl From<PageError> for BackupError {
    fn from(e: PageError) -> Self {
        BackupError::BadBase {
            id: e.id,
            why: e.why,
        }
    }
}

/// Everything one backup needs.
pub struct BackupRequest<'a> {
    /// The disk.
    pub disk: &'a DiskName,
    /// Its image.
    pub image: &'a File,
    /// Image size.
    pub size: u64,
    /// What to read.
    pub plan: &'a BackupPlan,
    /// The base snapshot (for incremental backups).
    pub base: Option<&'a Manifest>,
    /// The point-in-time view.
    pub pit: &'a dyn PointInTime,
    /// Checkpoint time.
    pub time_unix: u64,
    /// CBT state at the checkpoint.
    pub cbt: CbtRecord,
    /// Read engine.
    pub engine: ReadEngine,
    /// Compare with this base where these bits are clean (a CBT audit;
    /// the plan must be a full read).
    pub audit: Option<(&'a Manifest, &'a crate::cbt::DirtyBitmap)>,
    /// The most bytes this backup may add to the store, and the quota
    /// that sets it (for the error).
    pub budget: Option<(u64, String)>,
    /// Decoded index pages kept between backups: the base's are taken
    /// from here, and the new snapshot's are left here.
    pub pages: Option<&'a PageCache>,
}

struct Done {
    idx: u64,
    digest: ChunkDigest,
    bytes: u64,
    new: Option<(u64, u64)>,
}

/// Runs a backup and commits its snapshot.
pub fn run(
    store: &dyn Store,
    req: &BackupRequest<'_>,
    opts: &BackupOptions,
    progress: &Progress,
) -> Result<Manifest, BackupError> {
    let started = Instant::now();
    let base = req
        .base
        .filter(|_| req.plan.kind == BackupKind::Incremental);
    // The lock pins the base against garbage collection, and fails if the
    // base is gone by then.
    let _lock = match (store.lock(req.disk, base), base) {
        (Err(StoreError::NoSnapshot(id)), Some(b)) if id == b.id => {
            return Err(BackupError::BadBase {
                id: b.id.clone(),
                why: "it was deleted as the backup started; the next backup is a full one".into(),
            })
        }
        (r, _) => r?,
    };
    let cs = opts.chunk_size;
    let plan = req.plan;
    progress.set_total(plan.bytes_to_read(req.size, cs));
    let pages_total = index::page_count(plan.chunks);

    // Pages with chunks to read start from the base's page (incremental)
    // or all zeroes (full: unread chunks are holes).
    let mut touched: HashMap<u64, Vec<ChunkDigest>> = HashMap::new();
    for r in &plan.read {
        for p in r.start / PAGE_DIGESTS as u64..=(r.end - 1) / PAGE_DIGESTS as u64 {
            touched.entry(p).or_default();
        }
    }
    match (plan.kind, req.base) {
        (BackupKind::Incremental, Some(b)) => {
            // The base's pages are asked for a group ahead of their use, so
            // a store server sends them in batches instead of one round
            // trip each (and never more than two groups are held).
            // Pages the last backup of the disk left decoded need neither.
            let mut order: Vec<u64> = Vec::with_capacity(touched.len());
            for (&p, page) in touched.iter_mut() {
                let kept = req
                    .pages
                    .zip(b.pages.get(p as usize))
                    .and_then(|(c, d)| c.get(req.disk, d))
                    .filter(|k| k.len() == index::page_len(plan.chunks, p));
                match kept {
                    Some(k) => page.extend_from_slice(&k),
                    None => order.push(p),
                }
            }
            order.sort_unstable();
            let groups: Vec<&[u64]> = order.chunks(PAGES_AHEAD).collect();
            let digests = |g: &[u64]| -> Vec<ChunkDigest> {
                g.iter()
                    .filter_map(|&p| b.pages.get(p as usize).copied())
                    .collect()
            };
            if let Some(first) = groups.first() {
                store.fast().prefetch(&digests(first));
            }
            for (i, group) in groups.iter().enumerate() {
                if let Some(next) = groups.get(i + 1) {
                    store.fast().prefetch(&digests(next));
                }
                for &p in group.iter() {
                    touched.insert(p, load_page(store, b, p)?);
                }
            }
        }
        _ => {
            for (&p, page) in touched.iter_mut() {
                *page = vec![ChunkDigest::ZERO; index::page_len(plan.chunks, p)];
            }
        }
    }

    let prepared = started.elapsed();
    let workers = if opts.workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        opts.workers
    };
    let mut stats = BackupStats::default();
    let (work_tx, work_rx) =
        crossbeam_channel::bounded::<(u64, Vec<u8>)>(opts.read_depth.max(workers * 2));
    let (done_tx, done_rx) = crossbeam_channel::bounded::<Result<Done, BackupError>>(256);
    let level = opts.zstd_level;

    let result: Result<(), BackupError> = std::thread::scope(|s| {
        for _ in 0..workers {
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || worker(store, level, &rx, &tx));
        }
        drop(work_rx);
        drop(done_tx);
        // The collector.
        let touched = &mut touched;
        let stats = &mut stats;
        let collector = s.spawn(move || -> Result<(), BackupError> {
            let mut first_err = None;
            for r in done_rx {
                match r {
                    Ok(d) => {
                        let p = d.idx / PAGE_DIGESTS as u64;
                        let page = touched.get_mut(&p).expect("page of a planned chunk");
                        page[(d.idx % PAGE_DIGESTS as u64) as usize] = d.digest;
                        stats.chunks_read += 1;
                        stats.bytes_read += d.bytes;
                        if d.digest.is_zero() {
                            stats.zero_chunks += 1;
                        }
                        if let Some((plain, stored)) = d.new {
                            stats.chunks_new += 1;
                            stats.bytes_new += plain;
                            stats.bytes_stored += stored;
                            if let Some((max, what)) = &req.budget {
                                if stats.bytes_stored > *max && first_err.is_none() {
                                    first_err = Some(BackupError::Quota(what.clone()));
                                    progress.cancel();
                                }
                            }
                        }
                        progress.add(d.bytes);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                        progress.cancel();
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        });
        let job = ReadJob {
            file: req.image,
            size: req.size,
            chunk_size: cs,
            ranges: &plan.read,
            depth: opts.read_depth,
            // Read buffers go back to the reader once a worker is done
            // with them, and stay for the next backup.
            recycled: Some(&bufpool::READS),
        };
        let read = read_chunks(req.engine, &job, &mut |idx, mut buf| {
            if progress.cancelled() {
                return Err(BackupError::Cancelled);
            }
            req.pit
                .settle(idx * cs, &mut buf)
                .map_err(BackupError::Read)?;
            work_tx.send((idx, buf)).map_err(|_| BackupError::Cancelled)
        });
        drop(work_tx);
        let collected = collector.join().expect("collector thread");
        // A worker's error explains a cancel better than the cancel does.
        match (collected, read) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(ReadError::Io(e))) => Err(BackupError::Read(e)),
            (Ok(()), Err(ReadError::Sink(e))) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    });
    result?;
    store.fast().send_pending();
    let piped = started.elapsed();
    let audit = match req.audit {
        Some((base, frozen)) if plan.kind == BackupKind::Full => Some(audit_against(
            store,
            base,
            frozen,
            &touched,
            plan.chunks,
            cs,
        )?),
        _ => None,
    };

    // Index pages: changed ones are stored, the rest are the base's.
    let mut comp =
        chunk::compressor(opts.zstd_level).map_err(|e| BackupError::Zstd(opts.zstd_level, e))?;
    let incremental = match (plan.kind, req.base) {
        (BackupKind::Incremental, Some(b)) => Some(b),
        _ => None,
    };
    let ask = incremental.is_none();
    let mut flush = |to_store: &mut Vec<_>, stats: &mut BackupStats| {
        store_pages(store, &mut comp, to_store, ask, stats)
    };
    let mut pages = Vec::with_capacity(pages_total as usize);
    let mut to_store = Vec::with_capacity(PAGES_AHEAD);
    for p in 0..pages_total {
        let bytes = match (touched.get(&p), incremental) {
            (Some(page), _) => index::encode_page(page),
            (None, Some(b)) => {
                pages.push(b.pages[p as usize]);
                continue;
            }
            (None, None) => {
                index::encode_page(&vec![ChunkDigest::ZERO; index::page_len(plan.chunks, p)])
            }
        };
        let d = ChunkDigest::of(&bytes);
        pages.push(d);
        // Rewritten with the bytes they had: the base's page.
        if incremental.is_some_and(|b| b.pages.get(p as usize) == Some(&d)) {
            continue;
        }
        to_store.push((d, bytes));
        if to_store.len() == PAGES_AHEAD {
            flush(&mut to_store, &mut stats)?;
        }
    }
    flush(&mut to_store, &mut stats)?;
    let paged = started.elapsed();
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let manifest = Manifest {
        format: FORMAT,
        id: SnapshotId::new(req.disk, req.time_unix),
        disk: req.disk.clone(),
        time: crate::time::rfc3339(req.time_unix),
        time_unix: req.time_unix,
        parent: match plan.kind {
            BackupKind::Incremental => req.base.map(|b| b.id.clone()),
            BackupKind::Full => None,
        },
        kind: plan.kind,
        reason: plan.reason.clone(),
        image_size: req.size,
        chunk_size: cs,
        pages,
        cbt: req.cbt.clone(),
        stats,
        protected: false,
        verified: None,
        audit,
        checksum: String::new(),
    };
    // Commit makes the chunks durable first: one round trip to a remote
    // store instead of a sync and then a commit.
    store.commit(&manifest)?;
    if let Some(c) = req.pages {
        let written = touched
            .into_iter()
            .map(|(p, page)| (manifest.pages[p as usize], Arc::new(page)))
            .collect();
        c.keep(req.disk, &manifest.pages, written);
    }
    tracing::debug!(
        prepare = ?prepared,
        pipeline = ?(piped - prepared),
        pages = ?(paged - piped),
        commit = ?(started.elapsed() - paged),
        "backup phases"
    );
    Ok(manifest)
}

/// Compares what a full read found with the base wherever the frozen
/// bitmap says nothing changed (pages absent from `read` are all zeroes).
fn audit_against(
    store: &dyn Store,
    base: &Manifest,
    frozen: &crate::cbt::DirtyBitmap,
    read: &HashMap<u64, Vec<ChunkDigest>>,
    chunks: u64,
    cs: u64,
) -> Result<AuditRecord, BackupError> {
    let mut rec = AuditRecord {
        base: base.id.clone(),
        chunks_compared: 0,
        mismatches: 0,
        mismatch_offsets: Vec::new(),
    };
    for p in 0..index::page_count(chunks) {
        let old = load_page(store, base, p)?;
        let zeroes;
        let new = match read.get(&p) {
            Some(v) => v,
            None => {
                zeroes = vec![ChunkDigest::ZERO; old.len()];
                &zeroes
            }
        };
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            let idx = p * PAGE_DIGESTS as u64 + i as u64;
            if frozen
                .block_range(idx * cs, cs)
                .any(|blk| frozen.is_dirty(blk))
            {
                continue;
            }
            rec.chunks_compared += 1;
            if a != b {
                rec.mismatches += 1;
                if rec.mismatch_offsets.len() < 100 {
                    rec.mismatch_offsets.push(idx * cs);
                }
            }
        }
    }
    Ok(rec)
}

/// Most chunks one worker hashes before asking the store which it lacks.
const BATCH: usize = 16;

/// Batches one worker holds while their questions are in flight: enough
/// to hide a store server's round trip behind compression, each about
/// 1 MiB held (benches/RESULTS.md, "Store server").
const QUESTIONS: usize = 4;

/// One worker of the pipeline. It takes whatever is queued (up to
/// [`BATCH`] chunks), hashes it and asks the store in one `missing` call
/// which of those chunks it lacks: one round trip per batch to a remote
/// store instead of one per chunk. The question goes to a helper thread,
/// and while the answers travel the worker compresses and stores the
/// batches asked about before (up to [`QUESTIONS`] wait), so a store
/// server's round trips do not idle the core.
fn worker(
    store: &dyn Store,
    level: i32,
    rx: &crossbeam_channel::Receiver<(u64, Vec<u8>)>,
    tx: &crossbeam_channel::Sender<Result<Done, BackupError>>,
) {
    let mut comp = match chunk::compressor(level) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(BackupError::Zstd(level, e)));
            return;
        }
    };
    // Answers come back in the order of the questions; the channels hold
    // every question and answer of the batches waiting, so neither side
    // blocks the other.
    let (ask_tx, ask_rx) = crossbeam_channel::bounded::<Vec<ChunkDigest>>(QUESTIONS + 1);
    let (answer_tx, answer_rx) =
        crossbeam_channel::bounded::<Result<Vec<bool>, StoreError>>(QUESTIONS + 1);
    // `move`: the channels drop when the worker ends, which ends the asker
    // before the scope waits for it.
    std::thread::scope(move |s| {
        s.spawn(move || {
            while let Ok(first) = ask_rx.recv() {
                // Questions that queued while the last was answered go out
                // as one: a round trip (and a request for a store server
                // to parse) per call, not per batch.
                let mut asks = vec![first];
                asks.extend(ask_rx.try_iter());
                for answer in ask_together(store, &asks) {
                    if answer_tx.send(answer).is_err() {
                        return;
                    }
                }
            }
        });
        // Only a panic in `missing` ends the asker early (the scope
        // re-raises it); the batches still get an error, never a hole.
        let asker_gone = || query_error("the asking thread stopped");
        let mut waiting: std::collections::VecDeque<Hashed> = Default::default();
        // Finishes the oldest waiting batch once its answer is in; false
        // when the worker must stop.
        let mut finish_oldest = |waiting: &mut std::collections::VecDeque<Hashed>| {
            let oldest = waiting.pop_front().expect("a batch waiting");
            let answer = answer_rx.recv().unwrap_or_else(|_| Err(asker_gone()));
            emit(oldest.finish(store, &mut comp, answer), tx)
        };
        loop {
            // With batches waiting on their answers, do not block for more
            // input: finish the oldest first.
            let first = if waiting.is_empty() {
                rx.recv().ok()
            } else {
                rx.try_recv().ok()
            };
            let Some(first) = first else {
                if waiting.is_empty() || !finish_oldest(&mut waiting) {
                    return;
                }
                continue;
            };
            let mut batch = Vec::with_capacity(BATCH);
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let h = Hashed::new(batch);
            if h.asked.is_empty() {
                if !emit(Ok(h), tx) {
                    return;
                }
                continue;
            }
            if ask_tx.send(h.digests()).is_err() {
                emit(Err(asker_gone().into()), tx);
                return;
            }
            waiting.push_back(h);
            if waiting.len() > QUESTIONS && !finish_oldest(&mut waiting) {
                return;
            }
        }
    });
}

/// Asks the store about several batches in one `missing` call; one
/// answer per batch, in order. When the call fails, the first batch gets
/// its error and the others one that points to it.
fn ask_together(
    store: &dyn Store,
    asks: &[Vec<ChunkDigest>],
) -> Vec<Result<Vec<bool>, StoreError>> {
    let all: Vec<ChunkDigest> = asks.iter().flatten().copied().collect();
    let mut answer = store.missing(&all).map(|lacks| lacks.into_iter());
    asks.iter()
        .map(|ask| match &mut answer {
            Ok(lacks) if lacks.len() >= ask.len() => Ok(lacks.by_ref().take(ask.len()).collect()),
            Ok(_) => Err(query_error("the store answered for too few chunks")),
            Err(e) => Err(std::mem::replace(
                e,
                query_error("an earlier question failed"),
            )),
        })
        .collect()
}

/// An error of the missing-chunk questions that is not the store's own.
fn query_error(why: &str) -> StoreError {
    StoreError::Io {
        path: "the store's missing-chunk query".into(),
        source: io::Error::other(why.to_string()),
    }
}

/// A batch of chunks, hashed: what the collector will get for each, and
/// which of them (the non-zero ones) the store is asked about.
struct Hashed {
    batch: Vec<(u64, Vec<u8>)>,
    done: Vec<Done>,
    asked: Vec<usize>,
    /// [`chunk::looks_incompressible`] of each asked chunk, judged while
    /// the chunk is in the CPU cache from hashing: by the time a store
    /// server's answer is in, megabytes have passed through it, and
    /// judging it cold costs about twice as much.
    incompressible: Vec<bool>,
}

impl Hashed {
    fn new(batch: Vec<(u64, Vec<u8>)>) -> Hashed {
        let mut done: Vec<Done> = batch
            .iter()
            .map(|(idx, buf)| Done {
                idx: *idx,
                digest: ChunkDigest::ZERO,
                bytes: buf.len() as u64,
                new: None,
            })
            .collect();
        let asked: Vec<usize> = (0..batch.len())
            .filter(|&i| !is_all_zero(&batch[i].1))
            .collect();
        let bufs: Vec<&[u8]> = asked.iter().map(|&i| &batch[i].1[..]).collect();
        for (&i, d) in asked.iter().zip(ChunkDigest::of_each(&bufs)) {
            done[i].digest = d;
        }
        let incompressible = bufs
            .iter()
            .map(|b| chunk::looks_incompressible(b))
            .collect();
        Hashed {
            batch,
            done,
            asked,
            incompressible,
        }
    }

    fn digests(&self) -> Vec<ChunkDigest> {
        self.asked.iter().map(|&i| self.done[i].digest).collect()
    }

    /// Compresses and stores the chunks the store lacks, given its answer.
    /// A chunk kept raw goes to the store as its read buffer, with no copy
    /// into a chunk file (the buffer goes back to the reader from there).
    fn finish(
        mut self,
        store: &dyn Store,
        comp: &mut zstd::bulk::Compressor<'_>,
        missing: Result<Vec<bool>, StoreError>,
    ) -> Result<Hashed, BackupError> {
        let sum = !store.fast().sums_chunks();
        for ((&i, lacks), &incompressible) in
            self.asked.iter().zip(missing?).zip(&self.incompressible)
        {
            if lacks {
                let d = &self.done[i].digest;
                let plain = &mut self.batch[i].1;
                let stored = match chunk::compressed(plain, comp, sum, incompressible) {
                    Some(file) => store.fast().put_chunk_owned(d, file)?,
                    None => {
                        let head = chunk::raw_head(plain, sum);
                        store.fast().put_raw_chunk(d, head, std::mem::take(plain))?
                    }
                };
                if stored > 0 {
                    self.done[i].new = Some((self.done[i].bytes, stored));
                }
            }
        }
        Ok(self)
    }
}

/// Hands a finished batch's results to the collector and its buffers back
/// to the reader; false when the worker must stop (an error, sent on, or
/// the collector gone).
fn emit(
    r: Result<Hashed, BackupError>,
    tx: &crossbeam_channel::Sender<Result<Done, BackupError>>,
) -> bool {
    match r {
        Ok(h) => {
            for (_, buf) in h.batch {
                bufpool::READS.give(buf);
            }
            h.done.into_iter().all(|d| tx.send(Ok(d)).is_ok())
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            false
        }
    }
}

/// Index pages a backup loads or stores per round trip to the store.
const PAGES_AHEAD: usize = 32;

/// Stores the index pages (digest, encoded page) and empties the list;
/// when `ask`, only those the store lacks, asking about all at once.
///
/// An incremental backup does not ask: a page that differs from its base
/// page names a chunk just read, so another disk holds the same page only
/// by a rare coincidence, and a store keeps one copy of a page it is
/// given twice. To a store server the question would be a round trip
/// waiting behind the backup's last uploads, for no page saved.
fn store_pages(
    store: &dyn Store,
    comp: &mut zstd::bulk::Compressor<'_>,
    pages: &mut Vec<(ChunkDigest, Vec<u8>)>,
    ask: bool,
    stats: &mut BackupStats,
) -> Result<(), BackupError> {
    if pages.is_empty() {
        return Ok(());
    }
    let missing = if ask {
        let digests: Vec<ChunkDigest> = pages.iter().map(|(d, _)| *d).collect();
        store.missing(&digests)?
    } else {
        vec![true; pages.len()]
    };
    for ((d, bytes), lacks) in pages.drain(..).zip(missing) {
        if lacks {
            let (file, _) = chunk::encode_with(&bytes, comp, !store.fast().sums_chunks());
            if store.fast().put_index_page(&d, file)? > 0 {
                stats.pages_new += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cbt::persist::Trust;
    use crate::cbt::{DirtyBitmap, Granularity};
    use crate::plan::{plan, Mode, PlanInput};
    use crate::store::local::LocalStore;
    use std::os::unix::fs::FileExt;

    const CS: u64 = 65536;

    fn image(path: &std::path::Path, size: usize) -> Vec<u8> {
        let mut x: u64 = 0x1234_5678;
        let mut v = vec![0u8; size];
        for (i, b) in v.iter_mut().enumerate() {
            // Zero regions, compressible text and noise.
            let region = i / 100_000 % 3;
            *b = match region {
                0 => 0,
                1 => b"backup "[i % 7],
                _ => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            };
        }
        std::fs::write(path, &v).unwrap();
        v
    }

    fn backup(
        store: &LocalStore,
        img: &File,
        size: u64,
        frozen: &DirtyBitmap,
        base: Option<&Manifest>,
        t: u64,
    ) -> Manifest {
        backup_with(store, img, size, frozen, base, t, Mode::Auto, None, None).unwrap()
    }

    /// One backup of `img` into `store` (other modules' tests use it too).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backup_with(
        store: &dyn Store,
        img: &File,
        size: u64,
        frozen: &DirtyBitmap,
        base: Option<&Manifest>,
        t: u64,
        mode: Mode,
        budget: Option<u64>,
        pages: Option<&PageCache>,
    ) -> Result<Manifest, BackupError> {
        let p = plan(&PlanInput {
            size,
            chunk_size: CS,
            mode,
            frozen,
            trust: &Trust::Trusted,
            base,
            no_base_reason: "no previous snapshot",
            data: None,
        });
        let disk: DiskName = "vm".parse().unwrap();
        let req = BackupRequest {
            disk: &disk,
            image: img,
            size,
            plan: &p,
            base,
            pit: &Quiescent,
            time_unix: t,
            cbt: CbtRecord {
                granularity: CS,
                dirty_blocks: frozen.count_dirty() as u64,
                trusted: true,
            },
            engine: ReadEngine::probe(),
            audit: (mode == Mode::Audit).then(|| (base.unwrap(), frozen)),
            budget: budget.map(|b| (b, format!("a test quota of {b} bytes"))),
            pages,
        };
        run(store, &req, &BackupOptions::default(), &Progress::default())
    }

    /// A store and a read-write image of `size` bytes (with its contents).
    fn fixture(size: usize) -> (tempfile::TempDir, LocalStore, Vec<u8>, File) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("store")).unwrap();
        let path = dir.path().join("img");
        let data = image(&path, size);
        let img = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, store, data, img)
    }

    #[test]
    fn an_audit_finds_a_write_the_bitmap_missed_and_the_snapshot_has_it() {
        let (dir, store, mut data, img) = fixture(2 * 1024 * 1024);
        let size = data.len();
        let g = Granularity::new(CS).unwrap();
        let clean = DirtyBitmap::new(size as u64, g);
        let full = backup(&store, &img, size as u64, &clean, None, 1000);
        // One tracked write (chunk 3) and one behind tracking's back (chunk 9).
        let mut bits = DirtyBitmap::new(size as u64, g);
        for (chunk, tracked) in [(3u64, true), (9, false)] {
            let off = (chunk * CS) as usize;
            data[off..off + 10].copy_from_slice(b"0123456789");
            img.write_all_at(b"0123456789", off as u64).unwrap();
            if tracked {
                bits.mark(off as u64, 10);
            }
        }
        let a = backup_with(
            &store,
            &img,
            size as u64,
            &bits,
            Some(&full),
            2000,
            Mode::Audit,
            None,
            None,
        )
        .unwrap();
        assert_eq!(a.kind, BackupKind::Full);
        let rec = a.audit.clone().unwrap();
        assert_eq!(rec.base, full.id);
        assert_eq!(rec.chunks_compared, size as u64 / CS - 1);
        assert_eq!(
            (rec.mismatches, rec.mismatch_offsets.clone()),
            (1, vec![9 * CS])
        );
        let out = dir.path().join("out");
        crate::restore::restore(&store, &a, &out, false, 2, &Progress::default()).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            data,
            "the snapshot has what was read"
        );
    }

    /// A local store whose `missing` answers late, each call by a
    /// different delay, and fails from call `fail_from` on: a store server
    /// far away, whose link may drop.
    struct SlowStore {
        inner: LocalStore,
        calls: std::sync::atomic::AtomicUsize,
        fail_from: usize,
        gets: std::sync::atomic::AtomicUsize,
        /// Every digest asked about, in order.
        asked: std::sync::Mutex<Vec<ChunkDigest>>,
    }

    impl Store for SlowStore {
        fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<bool>, StoreError> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n >= self.fail_from {
                return Err(StoreError::Remote {
                    url: "https://far.example".into(),
                    why: "the link dropped".into(),
                });
            }
            std::thread::sleep(std::time::Duration::from_micros((n % 4) as u64 * 700));
            self.asked.lock().unwrap().extend_from_slice(digests);
            self.inner.missing(digests)
        }
        fn put_chunk(&self, d: &ChunkDigest, file: &[u8]) -> Result<u64, StoreError> {
            self.inner.put_chunk(d, file)
        }
        fn get_chunk(&self, d: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
            self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.get_chunk(d)
        }
        fn sync(&self) -> Result<(), StoreError> {
            self.inner.sync()
        }
        fn commit(&self, m: &Manifest) -> Result<(), StoreError> {
            self.inner.commit(m)
        }
        fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
            self.inner.manifest(id)
        }
        fn list(
            &self,
            disk: Option<&DiskName>,
        ) -> Result<(Vec<Manifest>, Vec<StoreError>), StoreError> {
            self.inner.list(disk)
        }
        fn delete(&self, id: &SnapshotId) -> Result<(), StoreError> {
            self.inner.delete(id)
        }
        fn lock(
            &self,
            disk: &DiskName,
            base: Option<&Manifest>,
        ) -> Result<Box<dyn crate::store::DiskLock>, StoreError> {
            self.inner.lock(disk, base)
        }
        fn annotate(
            &self,
            id: &SnapshotId,
            a: &crate::format::manifest::Annotation,
        ) -> Result<Manifest, StoreError> {
            self.inner.annotate(id, a)
        }
        fn gc(
            &self,
            opts: &crate::store::GcOptions,
            progress: &Progress,
        ) -> Result<crate::store::GcReport, StoreError> {
            self.inner.gc(opts, progress)
        }
        fn usage(&self) -> Result<u64, StoreError> {
            self.inner.usage()
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    #[test]
    fn late_answers_land_on_their_own_chunks_and_a_failed_one_fails_the_backup() {
        // 256 chunks: many batches, with questions in flight while the
        // batches before them are compressed.
        let (dir, local, mut data, img) = fixture(16 * 1024 * 1024);
        let size = data.len() as u64;
        let clean = DirtyBitmap::new(size, Granularity::new(CS).unwrap());
        let slow = SlowStore {
            inner: local,
            calls: Default::default(),
            fail_from: usize::MAX,
            gets: Default::default(),
            asked: Default::default(),
        };
        let full = backup_with(
            &slow,
            &img,
            size,
            &clean,
            None,
            1000,
            Mode::Auto,
            None,
            None,
        )
        .unwrap();
        assert!(slow.calls.load(std::sync::atomic::Ordering::SeqCst) > 4);
        let out = dir.path().join("out");
        crate::restore::restore(&slow, &full, &out, false, 2, &Progress::default()).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "restored image differs"
        );

        // Every fifth chunk changes and a full read follows: the answers
        // now mix "lacks" and "has", so one landing on the wrong batch
        // would leave a new chunk unstored.
        for c in (0..data.len() / CS as usize).step_by(5) {
            let off = c * CS as usize + 17;
            data[off..off + 8].copy_from_slice(&(c as u64 + 0xfeed).to_le_bytes());
            img.write_all_at(&data[off..off + 8], off as u64).unwrap();
        }
        let second = backup_with(
            &slow,
            &img,
            size,
            &clean,
            None,
            2000,
            Mode::Full,
            None,
            None,
        )
        .unwrap();
        assert_eq!(second.stats.chunks_new, 52, "{:?}", second.stats);
        std::fs::remove_file(&out).unwrap();
        crate::restore::restore(&slow, &second, &out, false, 2, &Progress::default()).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "restored image differs"
        );

        // The link drops at the third question of a full read: the backup
        // fails with the store's error and commits nothing.
        let failing = SlowStore {
            inner: slow.inner,
            calls: Default::default(),
            fail_from: 2,
            gets: Default::default(),
            asked: Default::default(),
        };
        let e = backup_with(
            &failing,
            &img,
            size,
            &clean,
            None,
            3000,
            Mode::Full,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("the link dropped"), "{e}");
        assert_eq!(
            failing.list(None).unwrap().0.len(),
            2,
            "nothing more committed"
        );
    }

    #[test]
    fn questions_asked_together_get_their_own_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("store")).unwrap();
        let mut comp = chunk::compressor(1).unwrap();
        let have: Vec<ChunkDigest> = (1..4u8)
            .map(|i| {
                let plain = vec![i; 100];
                let d = ChunkDigest::of(&plain);
                store
                    .put_chunk(&d, &chunk::encode(&plain, &mut comp).0)
                    .unwrap();
                d
            })
            .collect();
        let lack: Vec<ChunkDigest> = (10..13u8).map(|i| ChunkDigest::of(&[i; 100])).collect();
        let asks = vec![
            vec![have[0], lack[0]],
            vec![lack[1]],
            vec![have[1], have[2], lack[2]],
        ];
        let answers: Vec<Vec<bool>> = ask_together(&store, &asks)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            answers,
            vec![vec![false, true], vec![true], vec![false, false, true]]
        );

        // A failed call fails every batch, the first with the store's own
        // error.
        let failing = SlowStore {
            inner: store,
            calls: Default::default(),
            fail_from: 0,
            gets: Default::default(),
            asked: Default::default(),
        };
        let answers = ask_together(&failing, &asks);
        let errors: Vec<String> = answers
            .iter()
            .map(|a| a.as_ref().unwrap_err().to_string())
            .collect();
        assert!(errors[0].contains("the link dropped"), "{errors:?}");
        assert!(
            errors[1..]
                .iter()
                .all(|e| e.contains("an earlier question failed")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_backup_over_its_budget_stops_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("store")).unwrap();
        let path = dir.path().join("img");
        let size = 2 * 1024 * 1024;
        image(&path, size);
        let img = File::open(&path).unwrap();
        let clean = DirtyBitmap::new(size as u64, Granularity::new(CS).unwrap());
        let e = backup_with(
            &store,
            &img,
            size as u64,
            &clean,
            None,
            1000,
            Mode::Auto,
            Some(50_000),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, BackupError::Quota(_)), "{e}");
        assert!(e.to_string().contains("test quota"), "{e}");
        assert!(store.list(None).unwrap().0.is_empty());
    }

    #[test]
    fn full_incremental_restore_verify_and_corruption() {
        let (dir, store, mut data, img) = fixture(3 * 1024 * 1024 + 1000);
        let size = data.len();
        let g = Granularity::new(CS).unwrap();
        let full = backup(
            &store,
            &img,
            size as u64,
            &DirtyBitmap::new(size as u64, g),
            None,
            1000,
        );
        assert_eq!(full.kind, BackupKind::Full);
        assert!(full.stats.zero_chunks > 0 && full.stats.chunks_new > 0);
        assert!(
            full.stats.bytes_stored < full.stats.bytes_new,
            "text compresses"
        );

        // Change two chunks and record them.
        let mut frozen = DirtyBitmap::new(size as u64, g);
        for off in [70_000u64, size as u64 - 10] {
            img.write_all_at(b"changed!", off).unwrap();
            data[off as usize..off as usize + 8.min(size - off as usize)]
                .copy_from_slice(&b"changed!"[..8.min(size - off as usize)]);
            frozen.mark(off, 8);
        }
        let inc = backup(&store, &img, size as u64, &frozen, Some(&full), 2000);
        assert_eq!(inc.kind, BackupKind::Incremental);
        assert_eq!(inc.parent, Some(full.id.clone()));
        assert_eq!(inc.stats.chunks_read, 2);
        assert_eq!(inc.stats.bytes_read, CS + (size as u64 % CS));

        let out = dir.path().join("restored");
        let st =
            crate::restore::restore(&store, &inc, &out, false, 2, &Progress::default()).unwrap();
        assert_eq!(st.bytes, size as u64);
        assert!(std::fs::read(&out).unwrap() == data);
        assert!(matches!(
            crate::restore::restore(&store, &inc, &out, false, 2, &Progress::default()),
            Err(crate::restore::RestoreError::Exists(_))
        ));
        let r = crate::verify::verify(
            &store,
            &[full.clone(), inc.clone()],
            2,
            &Progress::default(),
        );
        assert!(r.ok(), "{r:?}");

        // Damage the chunk at offset 0 of the changed set: find it via the index.
        let idx = crate::store::pages::read_index(&store, &inc).unwrap();
        let victim = idx[1];
        let (f, off, len) = store.locate(&victim).unwrap();
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[(off + len as u64 - 1) as usize] ^= 0xff;
        std::fs::write(&f, bytes).unwrap();
        let r = crate::verify::verify(
            &store,
            &[full.clone(), inc.clone()],
            2,
            &Progress::default(),
        );
        assert!(!r.ok());
        let bad = &r.snapshots[1].bad_chunks;
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].digest, victim);
        assert_eq!(bad[0].offset, CS);
        let out = dir.path().join("restored2");
        let e = crate::restore::restore(&store, &inc, &out, false, 2, &Progress::default())
            .unwrap_err();
        assert!(e.to_string().contains(&victim.hex()), "{e}");
        assert!(!out.exists(), "a failed restore leaves no target");
        assert!(!dir.path().join("restored2.partial").exists());
    }

    #[test]
    fn an_incremental_takes_base_pages_from_the_cache_and_stores_changed_ones_unasked() {
        use std::sync::atomic::Ordering::SeqCst;
        // Two index pages (4096 chunks each), so one stays untouched.
        let (dir, local, mut data, img) = fixture(2 * PAGE_DIGESTS * CS as usize);
        let size = data.len() as u64;
        let g = Granularity::new(CS).unwrap();
        let store = SlowStore {
            inner: local,
            calls: Default::default(),
            fail_from: usize::MAX,
            gets: Default::default(),
            asked: Default::default(),
        };
        let cache = PageCache::default();
        let full = backup_with(
            &store,
            &img,
            size,
            &DirtyBitmap::new(size, g),
            None,
            1000,
            Mode::Auto,
            None,
            Some(&cache),
        )
        .unwrap();
        let change = |data: &mut Vec<u8>, at: u64, bytes: &[u8]| {
            img.write_all_at(bytes, at).unwrap();
            data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            let mut frozen = DirtyBitmap::new(size, g);
            frozen.mark(at, bytes.len() as u64);
            frozen
        };

        // The base's page comes from the cache: nothing is read back.
        let frozen = change(&mut data, 5 * CS + 3, b"first change");
        let before = store.gets.load(SeqCst);
        let inc = backup_with(
            &store,
            &img,
            size,
            &frozen,
            Some(&full),
            2000,
            Mode::Auto,
            None,
            Some(&cache),
        )
        .unwrap();
        assert_eq!(inc.kind, BackupKind::Incremental);
        assert_eq!(store.gets.load(SeqCst), before, "no page was read");
        assert_eq!(inc.pages[1], full.pages[1], "the untouched page is shared");
        assert_ne!(inc.pages[0], full.pages[0]);
        // The full backup asked about its pages; the incremental stored
        // its changed page without asking.
        let asked = std::mem::take(&mut *store.asked.lock().unwrap());
        assert!(full.pages.iter().all(|p| asked.contains(p)));
        assert!(
            !asked.contains(&inc.pages[0]),
            "the changed page was asked about"
        );
        assert_eq!(inc.stats.pages_new, 1);
        let out = dir.path().join("out");
        crate::restore::restore(&store, &inc, &out, false, 2, &Progress::default()).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "restored image differs"
        );

        // The second page, untouched by that backup, was written by the
        // full one; it is still kept, as the new index names it.
        let frozen = change(&mut data, PAGE_DIGESTS as u64 * CS + 9, b"second page");
        let before = store.gets.load(SeqCst);
        let inc2 = backup_with(
            &store,
            &img,
            size,
            &frozen,
            Some(&inc),
            3000,
            Mode::Auto,
            None,
            Some(&cache),
        )
        .unwrap();
        assert_eq!(store.gets.load(SeqCst), before, "no page was read");

        // A chunk rewritten with the bytes it had: its page is the base's
        // page again, and is neither stored nor asked about.
        let same = data[(PAGE_DIGESTS + 1) * CS as usize..][..100].to_vec();
        let frozen = change(&mut data, (PAGE_DIGESTS as u64 + 1) * CS, &same);
        store.asked.lock().unwrap().clear();
        let rewritten = backup_with(
            &store,
            &img,
            size,
            &frozen,
            Some(&inc2),
            3500,
            Mode::Auto,
            None,
            Some(&cache),
        )
        .unwrap();
        assert_eq!(rewritten.pages, inc2.pages);
        assert_eq!(rewritten.stats.pages_new, 0);
        assert!(!store.asked.lock().unwrap().contains(&inc2.pages[1]));

        // Without the cache the base's page is read from the store, and
        // both ways give the same snapshot contents.
        let frozen = change(&mut data, 7 * CS, b"third change");
        let before = store.gets.load(SeqCst);
        let inc3 = backup_with(
            &store,
            &img,
            size,
            &frozen,
            Some(&inc2),
            4000,
            Mode::Auto,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            store.gets.load(SeqCst),
            before + 1,
            "the base's page was read"
        );
        std::fs::remove_file(&out).unwrap();
        crate::restore::restore(&store, &inc3, &out, false, 2, &Progress::default()).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "restored image differs"
        );
    }
}
