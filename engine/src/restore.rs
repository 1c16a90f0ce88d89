//! Restore a snapshot to a file or a block device. Every chunk is checked
//! against its digest before it is written; all-zero chunks are left as
//! holes in a file (sparse output) and written as zeroes on a device. A
//! file target is written as `TARGET.partial` and renamed into place only
//! when complete and fsynced, so a failed restore never leaves a file that
//! looks finished.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::digest::ChunkDigest;
use crate::format::chunk;
use crate::format::manifest::Manifest;
use crate::fsutil::direct::{AlignedBuf, DirectWriter};
use crate::progress::Progress;
use crate::store::pages::{read_index, PageError};
use crate::store::readahead::ReadAhead;
use crate::store::{Store, StoreError};

/// Errors of a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target exists.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    /// The target device is too small.
    #[error("{path} holds {have} bytes but the snapshot is {need} bytes")]
    TooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The snapshot's size.
        need: u64,
    },
    /// The index could not be read.
    #[error(transparent)]
    Index(#[from] PageError),
    /// A chunk is missing or damaged: nothing wrong was written.
    #[error("chunk {digest} at offset {offset} of snapshot {snapshot} is bad ({why}); the restore stopped and {target} was not completed")]
    BadChunk {
        /// The snapshot.
        snapshot: String,
        /// The chunk.
        digest: ChunkDigest,
        /// Where it belongs.
        offset: u64,
        /// What was wrong.
        why: String,
        /// The target.
        target: String,
    },
    /// Writing the target failed.
    #[error("writing {path} failed: {source}")]
    Write {
        /// The target.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The target is neither a regular file (or a new one) nor a block
    /// device: a folder, a symbolic link, a socket...
    #[error("{path} is {what}; restore to a regular file or a block device")]
    NotATarget {
        /// The target.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// Cancelled.
    #[error("the restore was cancelled")]
    Cancelled,
}

/// What is at `target`, without following a symbolic link there.
fn target_kind(target: &Path) -> Result<Option<bool>, RestoreError> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RestoreError::Write {
            path: target.into(),
            source,
        }),
        Ok(md) => {
            let ft = md.file_type();
            let what = if ft.is_block_device() {
                return Ok(Some(true));
            } else if ft.is_file() {
                return Ok(Some(false));
            } else if ft.is_symlink() {
                "a symbolic link"
            } else if ft.is_dir() {
                "a folder"
            } else {
                "a special file"
            };
            Err(RestoreError::NotATarget {
                path: target.into(),
                what,
            })
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RestoreStats {
    /// Bytes of the image.
    pub bytes: u64,
    /// Chunks fetched and written.
    pub chunks: u64,
    /// Zero chunks (holes).
    pub zero_chunks: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// Restores `m` to `target`.
pub fn restore(
    store: &dyn Store,
    m: &Manifest,
    target: &Path,
    force: bool,
    workers: usize,
    progress: &Progress,
) -> Result<RestoreStats, RestoreError> {
    let started = std::time::Instant::now();
    let werr = |path: &Path, source| RestoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let kind = target_kind(target)?;
    let is_dev = kind == Some(true);
    if kind.is_some() && !force {
        return Err(RestoreError::Exists(target.to_path_buf()));
    }
    let digests = read_index(store, m)?;
    let (out, partial) = if is_dev {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(target)
            .map_err(|e| werr(target, e))?;
        // What was checked by name is what was opened.
        match f.metadata() {
            Ok(md) if md.file_type().is_block_device() => {}
            _ => {
                return Err(RestoreError::NotATarget {
                    path: target.into(),
                    what: "no longer a block device",
                })
            }
        }
        let have = device_size(&f).map_err(|e| werr(target, e))?;
        if have < m.image_size {
            return Err(RestoreError::TooSmall {
                path: target.into(),
                have,
                need: m.image_size,
            });
        }
        (f, None)
    } else {
        let partial = PathBuf::from(format!("{}.partial", target.display()));
        let f = crate::fsutil::create_fresh(&partial).map_err(|e| werr(&partial, e))?;
        let sized = f
            .set_len(m.image_size)
            .and_then(|()| preallocate(&f, &digests, m.chunk_size, m.image_size));
        if let Err(e) = sized {
            let _ = std::fs::remove_file(&partial);
            return Err(werr(&partial, e));
        }
        (f, Some(partial))
    };
    let written_path = partial.clone().unwrap_or_else(|| target.to_path_buf());
    let out = DirectWriter::new(out, &written_path);
    progress.set_total(m.image_size);
    let failure: Mutex<Option<RestoreError>> = Mutex::new(None);
    let mut stats = RestoreStats {
        bytes: m.image_size,
        ..Default::default()
    };
    let chunks = AtomicUsize::new(0);
    let zeros = AtomicUsize::new(0);
    let cs = m.chunk_size as usize;
    let batch = (BATCH_BYTES / cs).max(1);
    let decoders = workers.max(1);
    // Four buffers per decoder, so a decoder rarely waits for the disk
    // (with two, the cores idled waiting for writes).
    let (free_tx, free_rx) = crossbeam_channel::bounded::<AlignedBuf>(decoders * 4);
    for _ in 0..decoders * 4 {
        free_tx
            .send(AlignedBuf::new(cs * batch))
            .expect("the pool has room for every buffer");
    }
    let (filled_tx, filled_rx) = crossbeam_channel::bounded::<Filled>(decoders * 2);
    let prefetch = |d: &[ChunkDigest]| store.fast().prefetch(d);
    let w = Worker {
        store,
        m,
        digests: &digests,
        batches: &ReadAhead::new(&prefetch, &digests, batch, AHEAD_BATCHES),
        progress,
        out: &out,
        is_dev,
        written_path: &written_path,
        target,
        chunks: &chunks,
        zeros: &zeros,
        failure: &failure,
    };
    let w = &w;
    std::thread::scope(|s| {
        for _ in 0..decoders {
            let (free_rx, filled_tx) = (free_rx.clone(), filled_tx.clone());
            s.spawn(move || {
                if let Err(e) = decoder(w, &free_rx, &filled_tx) {
                    w.failure.lock().unwrap().get_or_insert(e);
                }
            });
        }
        drop((free_rx, filled_tx));
        for _ in 0..WRITERS {
            let (filled_rx, free_tx) = (filled_rx.clone(), free_tx.clone());
            s.spawn(move || {
                if let Err(e) = writer(w, &filled_rx, &free_tx) {
                    w.failure.lock().unwrap().get_or_insert(e);
                }
            });
        }
        drop((filled_rx, free_tx));
    });
    if let Some(e) = failure.into_inner().unwrap() {
        if let Some(p) = &partial {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    let decoded = started.elapsed();
    // Nothing is left behind on failure: a partial file is removed.
    let fail = |path: &Path, e: io::Error| {
        if let Some(p) = &partial {
            let _ = std::fs::remove_file(p);
        }
        werr(path, e)
    };
    out.file().sync_all().map_err(|e| fail(&written_path, e))?;
    tracing::debug!(decode = ?decoded, fsync = ?(started.elapsed() - decoded), direct = out.is_direct(), "restore phases");
    if let Some(p) = &partial {
        // A folder or link put in place of the target meanwhile is not
        // replaced (rename would swap a link, never follow it, but a
        // folder there means someone else's plans).
        if let Err(e) = target_kind(target) {
            let _ = std::fs::remove_file(p);
            return Err(e);
        }
        std::fs::rename(p, target).map_err(|e| fail(target, e))?;
        if let Some(dir) = target.parent() {
            let _ = crate::fsutil::sync_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            });
        }
    }
    stats.chunks = chunks.into_inner() as u64;
    stats.zero_chunks = zeros.into_inner() as u64;
    stats.duration_ms = started.elapsed().as_millis() as u64;
    Ok(stats)
}

struct Worker<'a> {
    store: &'a dyn Store,
    m: &'a Manifest,
    digests: &'a [ChunkDigest],
    batches: &'a ReadAhead<'a>,
    progress: &'a Progress,
    out: &'a DirectWriter,
    is_dev: bool,
    written_path: &'a Path,
    target: &'a Path,
    chunks: &'a AtomicUsize,
    zeros: &'a AtomicUsize,
    failure: &'a Mutex<Option<RestoreError>>,
}

/// Chunks a decoder claims at once: about 1 MiB, written with one
/// `pwrite` per run of non-zero chunks.
const BATCH_BYTES: usize = 1 << 20;

/// Batches beyond the current one whose chunks are already prefetched
/// ([`ReadAhead`]). A local store reads its packs from the device (they
/// are written past the page cache), competing with the restore's own
/// writes: four batches ahead left the decoders waiting for chunks.
const AHEAD_BATCHES: usize = 16;

/// Threads writing the target. Direct writes into preallocated blocks run
/// side by side (ext4 takes its inode lock shared for them); one writer
/// at one request at a time was busy for almost the whole restore
/// (benches/RESULTS.md, "Restore and verify").
const WRITERS: usize = 3;

/// A decoded batch on its way to the writer: the buffer and its runs of
/// non-zero chunks, each as (offset in the target, range in the buffer).
struct Filled {
    buf: AlignedBuf,
    runs: Vec<(u64, std::ops::Range<usize>)>,
}

/// Takes batches of chunks until none are left or another thread failed,
/// decodes and checks them into buffers from the pool, and hands the
/// buffers to the writer.
fn decoder(
    w: &Worker<'_>,
    free: &crossbeam_channel::Receiver<AlignedBuf>,
    filled: &crossbeam_channel::Sender<Filled>,
) -> Result<(), RestoreError> {
    let werr = |source| RestoreError::Write {
        path: w.written_path.to_path_buf(),
        source,
    };
    let cs = w.m.chunk_size as usize;
    let mut dctx = zstd::bulk::Decompressor::new().map_err(werr)?;
    loop {
        if w.failure.lock().unwrap().is_some() {
            return Ok(());
        }
        if w.progress.cancelled() {
            return Err(RestoreError::Cancelled);
        }
        let Some(claimed) = w.batches.claim() else {
            return Ok(());
        };
        let first = claimed.start;
        // Without a buffer the writer has stopped (and said why).
        let Ok(mut buf) = free.recv() else {
            return Ok(());
        };
        let mut runs = Vec::new();
        let mut run_start: Option<(u64, usize)> = None;
        let mut used = 0usize;
        // Where each decoded chunk sits in `buf`, for the digest check.
        let mut decoded: Vec<(ChunkDigest, u64, std::ops::Range<usize>)> = Vec::new();
        for (i, d) in w.digests[claimed].iter().enumerate() {
            let off = ((first + i) * cs) as u64;
            let len = (w.m.image_size - off).min(cs as u64) as usize;
            if d.is_zero() {
                if let Some((at, from)) = run_start.take() {
                    runs.push((at, from..used));
                }
                w.zeros.fetch_add(1, Ordering::Relaxed);
                if w.is_dev {
                    write_zeroes(w.out.file(), off, len as u64).map_err(werr)?;
                }
                w.progress.add(len as u64);
                continue;
            }
            w.chunks.fetch_add(1, Ordering::Relaxed);
            fetch_into(w.store, d, &mut buf[used..used + len], &mut dctx)
                .map_err(|why| w.bad_chunk(d, off, why))?;
            decoded.push((*d, off, used..used + len));
            run_start.get_or_insert((off, used));
            used += len;
        }
        if let Some((at, from)) = run_start {
            runs.push((at, from..used));
        }
        // Nothing reaches the writer before its digest is checked.
        let parts: Vec<&[u8]> = decoded.iter().map(|(_, _, r)| &buf[r.clone()]).collect();
        for ((d, off, _), sum) in decoded.iter().zip(ChunkDigest::of_each(&parts)) {
            if sum != *d {
                let why = chunk::ChunkError::Digest(*d).to_string();
                return Err(w.bad_chunk(d, *off, why));
            }
        }
        if filled.send(Filled { buf, runs }).is_err() {
            return Ok(());
        }
    }
}

/// Writes decoded batches as they come and returns their buffers to the
/// pool ([`WRITERS`] of these share the queue).
fn writer(
    w: &Worker<'_>,
    filled: &crossbeam_channel::Receiver<Filled>,
    free: &crossbeam_channel::Sender<AlignedBuf>,
) -> Result<(), RestoreError> {
    for f in filled {
        for (off, range) in &f.runs {
            w.out
                .write_all_at(&f.buf[range.clone()], *off)
                .map_err(|source| RestoreError::Write {
                    path: w.written_path.to_path_buf(),
                    source,
                })?;
            w.progress.add(range.len() as u64);
        }
        // Decoders may all have finished and dropped the pool.
        let _ = free.send(f.buf);
    }
    Ok(())
}

/// Allocates the target file's blocks for every run of non-zero chunks
/// (zero chunks stay holes) before anything is written: a full disk shows
/// at once instead of midway, and direct writes into allocated blocks do
/// not serialise on block allocation. A filesystem without `fallocate`
/// simply allocates as the writes come.
fn preallocate(f: &File, digests: &[ChunkDigest], cs: u64, size: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let mut i = 0;
    while i < digests.len() {
        if digests[i].is_zero() {
            i += 1;
            continue;
        }
        let first = i;
        while i < digests.len() && !digests[i].is_zero() {
            i += 1;
        }
        let off = first as u64 * cs;
        let end = (i as u64 * cs).min(size);
        match fallocate(
            f.as_raw_fd(),
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            (end - off) as i64,
        ) {
            Ok(()) => {}
            Err(e @ (nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT)) => {
                return Err(e.into())
            }
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Fetches and decodes one chunk into `out`; the caller checks its digest.
fn fetch_into(
    store: &dyn Store,
    d: &ChunkDigest,
    out: &mut [u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
) -> Result<(), String> {
    let file = store.get_chunk(d).map_err(|e| match e {
        StoreError::MissingChunk(_) => "missing from the store".to_string(),
        e => e.to_string(),
    })?;
    chunk::decode_into(&file, out, dctx).map_err(|e| e.to_string())
}

impl Worker<'_> {
    fn bad_chunk(&self, d: &ChunkDigest, offset: u64, why: String) -> RestoreError {
        RestoreError::BadChunk {
            snapshot: self.m.id.to_string(),
            digest: *d,
            offset,
            why,
            target: self.target.display().to_string(),
        }
    }
}

fn write_zeroes(f: &File, off: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    if fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off as i64,
        len as i64,
    )
    .is_ok()
    {
        return Ok(());
    }
    f.write_all_at(&vec![0u8; len as usize], off)
}

fn device_size(f: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = f;
    f.seek(io::SeekFrom::End(0))
}
