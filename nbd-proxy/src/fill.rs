//! Lazy images: an export whose blocks come from a snapshot the first time
//! they are touched. Instant mounts (a sparse overlay that is never filled
//! in the background) and live restores (a target that a background job
//! fills while the guest already runs on it) are both a [`Filler`] in front
//! of an ordinary image file.
//!
//! The rules that keep the guest's data safe:
//! - every request touching a chunk (read, write, trim, write-zeroes) first
//!   makes the chunk *filled*: its snapshot bytes are in the image file.
//!   One chunk is filled by one thread at a time (striped locks), and a
//!   filled chunk is never written by the filler again, so the background
//!   copy can never overwrite a guest write;
//! - the fill map on disk only ever names chunks whose bytes were made
//!   durable (`fdatasync` of the image) before the bit was written, so a
//!   crash or `kill -9` at any point leaves a map that may under-claim
//!   (the chunk is fetched again) but never over-claims;
//! - before a write is issued to a chunk, its bit is on disk: otherwise a
//!   restart would fetch the chunk again over the guest's write. A guest
//!   flush also syncs the map, so flushed writes survive a power loss too.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use novabackup_engine::snapshot_reader::SnapshotReader;

const MAGIC: &[u8; 8] = b"NBFILL01";
/// Header: magic, image size, chunk size, flags, id length, id (≤ 96).
const HEADER_LEN: u64 = 128;
const MAX_ID: usize = 96;
/// The target read as zeroes when the fill began (a new sparse file), so
/// zero chunks need no write.
const FLAG_ZEROED: u64 = 1;
/// Chunks filled for reads are persisted in batches of this many.
const PERSIST_EVERY: u64 = 256;
const STRIPES: usize = 64;

/// Where a filler's bytes come from: a snapshot.
pub trait Source: Send + Sync {
    /// The image's size in bytes.
    fn size(&self) -> u64;
    /// The fill granularity in bytes.
    fn chunk_size(&self) -> u64;
    /// Whether chunk `idx` is all zeroes.
    fn is_zero(&self, idx: u64) -> bool;
    /// Fills `buf` with the bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// What the map belongs to (a snapshot id), checked when reopening.
    fn id(&self) -> String;
}

impl Source for SnapshotReader {
    fn size(&self) -> u64 {
        SnapshotReader::size(self)
    }
    fn chunk_size(&self) -> u64 {
        SnapshotReader::chunk_size(self)
    }
    fn is_zero(&self, idx: u64) -> bool {
        self.is_zero_chunk(idx)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        SnapshotReader::read_exact_at(self, buf, offset)
    }
    fn id(&self) -> String {
        self.manifest().id.to_string()
    }
}

/// How far a fill has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FillProgress {
    /// Chunks whose bytes are in the image.
    pub filled: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
}

/// A fill in progress (module doc).
pub struct Filler {
    image: File,
    map_path: PathBuf,
    map: File,
    source: Arc<dyn Source>,
    chunk: u64,
    chunks: u64,
    zeroed: bool,
    filled: Vec<AtomicU64>,
    /// The bits on disk, and how many filled chunks are not among them.
    persisted: Mutex<(Vec<u64>, u64)>,
    stripes: Vec<Mutex<()>>,
    count: AtomicU64,
    complete: AtomicBool,
    /// Complete and every bit on disk: nothing left to do for any request.
    settled: AtomicBool,
    /// Where the background fill goes on from.
    cursor: AtomicU64,
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filler")
            .field("map", &self.map_path)
            .field("progress", &self.progress())
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Filler {
    /// Starts a fill of `image` from `source`, or resumes the one whose
    /// map is at `map_path`. `zeroed` says the image reads as zeroes now
    /// (a new sparse file); it is only taken for a new map.
    pub fn open(
        image: File,
        map_path: &Path,
        source: Arc<dyn Source>,
        zeroed: bool,
    ) -> io::Result<Filler> {
        let size = source.size();
        let chunk = source.chunk_size().max(1);
        let chunks = size.div_ceil(chunk);
        let words = chunks.div_ceil(64) as usize;
        let id = source.id();
        if id.len() > MAX_ID {
            return Err(invalid(format!("snapshot id {id:?} is too long")));
        }
        let (map, bits, zeroed) = match OpenOptions::new().read(true).write(true).open(map_path) {
            Ok(map) => {
                let mut head = [0u8; HEADER_LEN as usize];
                map.read_exact_at(&mut head, 0)?;
                let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8"));
                let idlen = (word(32) as usize).min(MAX_ID);
                if &head[..8] != MAGIC
                    || word(8) != size
                    || word(16) != chunk
                    || head[40..40 + idlen] != *id.as_bytes()
                {
                    return Err(invalid(format!(
                        "the fill map {} belongs to another image or snapshot; remove it to start over",
                        map_path.display()
                    )));
                }
                let mut raw = vec![0u8; words * 8];
                map.read_exact_at(&mut raw, HEADER_LEN)?;
                let bits: Vec<u64> = raw
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
                    .collect();
                (map, bits, word(24) & FLAG_ZEROED != 0)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut head = vec![0u8; HEADER_LEN as usize];
                head[..8].copy_from_slice(MAGIC);
                head[8..16].copy_from_slice(&size.to_le_bytes());
                head[16..24].copy_from_slice(&chunk.to_le_bytes());
                let flags = if zeroed { FLAG_ZEROED } else { 0 };
                head[24..32].copy_from_slice(&flags.to_le_bytes());
                head[32..40].copy_from_slice(&(id.len() as u64).to_le_bytes());
                head[40..40 + id.len()].copy_from_slice(id.as_bytes());
                head.resize(HEADER_LEN as usize + words * 8, 0);
                let tmp = map_path.with_extension("new");
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all_at(&head, 0)?;
                f.sync_all()?;
                std::fs::rename(&tmp, map_path)?;
                novabackup_engine::fsutil::sync_dir(map_path.parent().unwrap_or(Path::new(".")))?;
                let map = OpenOptions::new().read(true).write(true).open(map_path)?;
                (map, vec![0u64; words], zeroed)
            }
            Err(e) => return Err(e),
        };
        let count = bits.iter().map(|w| w.count_ones() as u64).sum();
        let filler = Filler {
            image,
            map_path: map_path.to_path_buf(),
            map,
            source,
            chunk,
            chunks,
            zeroed,
            filled: bits.iter().map(|&w| AtomicU64::new(w)).collect(),
            persisted: Mutex::new((bits, 0)),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            count: AtomicU64::new(count),
            complete: AtomicBool::new(count == chunks),
            settled: AtomicBool::new(count == chunks),
            cursor: AtomicU64::new(0),
        };
        Ok(filler)
    }

    /// The fill map's path.
    pub fn map_path(&self) -> &Path {
        &self.map_path
    }

    /// Whether every chunk is filled (then the filler does nothing more).
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// How far the fill has come.
    pub fn progress(&self) -> FillProgress {
        FillProgress {
            filled: self.count.load(Ordering::Relaxed),
            chunks: self.chunks,
            chunk_size: self.chunk,
        }
    }

    fn is_filled(&self, c: u64) -> bool {
        self.filled[(c / 64) as usize].load(Ordering::Acquire) & (1 << (c % 64)) != 0
    }

    fn persisted(&self) -> MutexGuard<'_, (Vec<u64>, u64)> {
        self.persisted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts chunk `c`'s snapshot bytes into the image unless it is
    /// filled; true when this call filled it.
    fn fill_chunk(&self, c: u64, buf: &mut Vec<u8>) -> io::Result<bool> {
        let _g = self.stripes[(c as usize) % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.is_filled(c) {
            return Ok(false);
        }
        let off = c * self.chunk;
        let len = (self.source.size() - off).min(self.chunk) as usize;
        if !(self.zeroed && self.source.is_zero(c)) {
            buf.resize(len, 0);
            self.source.read_exact_at(&mut buf[..len], off)?;
            self.image.write_all_at(&buf[..len], off)?;
        }
        self.filled[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::AcqRel);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.chunks {
            self.complete.store(true, Ordering::Release);
        }
        Ok(true)
    }

    fn chunk_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len.max(1)).min(self.source.size());
        if offset >= end {
            return 0..0;
        }
        offset / self.chunk..end.div_ceil(self.chunk)
    }

    /// Makes every chunk of `[offset, offset+len)` filled before a request
    /// touches it. With `write`, also makes their bits durable first
    /// (module doc).
    pub fn ensure(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        if self.settled.load(Ordering::Acquire) || (self.is_complete() && !write) {
            return Ok(());
        }
        let range = self.chunk_range(offset, len);
        let mut buf = Vec::new();
        let mut fresh = 0;
        for c in range.clone() {
            if self.fill_chunk(c, &mut buf)? {
                fresh += 1;
            }
        }
        if write {
            let p = self.persisted();
            let all_on_disk = range
                .clone()
                .all(|c| p.0[(c / 64) as usize] & (1 << (c % 64)) != 0);
            drop(p);
            if !all_on_disk {
                self.persist(Some(range))?;
            }
        } else if fresh > 0 {
            let p = self.persisted();
            let behind = p.1 + fresh;
            drop(p);
            if behind >= PERSIST_EVERY {
                self.persist(None)?;
            }
        }
        Ok(())
    }

    /// Writes the filled bits to the map after making their bytes durable.
    /// `words` limits the write to the words covering those chunks.
    fn persist(&self, chunks: Option<std::ops::Range<u64>>) -> io::Result<()> {
        self.image.sync_data()?;
        let mut p = self.persisted();
        let (from, to) = match chunks {
            Some(r) => ((r.start / 64) as usize, r.end.div_ceil(64) as usize),
            None => (0, p.0.len()),
        };
        let mut raw = Vec::with_capacity((to - from) * 8);
        for i in from..to {
            let w = self.filled[i].load(Ordering::Acquire);
            p.0[i] = w;
            raw.extend_from_slice(&w.to_le_bytes());
        }
        self.map.write_all_at(&raw, HEADER_LEN + from as u64 * 8)?;
        let on_disk: u64 = p.0.iter().map(|w| w.count_ones() as u64).sum();
        p.1 = self.count.load(Ordering::Acquire).saturating_sub(on_disk);
        Ok(())
    }

    /// Makes everything filled so far durable, bits included (a guest
    /// flush, a checkpoint, the end of a fill).
    pub fn flush(&self) -> io::Result<()> {
        if self.settled.load(Ordering::Acquire) {
            return Ok(());
        }
        let complete = self.is_complete();
        self.persist(None)?;
        self.map.sync_data()?;
        if complete {
            self.settled.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The background fill: fills up to `max` chunks from where it left
    /// off; returns how many it filled (0 once everything is).
    pub fn fill_some(&self, max: u64) -> io::Result<u64> {
        let mut buf = Vec::new();
        let mut n = 0;
        let mut c = self.cursor.load(Ordering::Relaxed);
        while n < max && c < self.chunks {
            if self.fill_chunk(c, &mut buf)? {
                n += 1;
            }
            c += 1;
        }
        self.cursor.store(c, Ordering::Relaxed);
        if n > 0 {
            self.flush()?;
        }
        Ok(n)
    }

    /// Removes the fill map of a complete fill; the image is then a
    /// plain disk.
    pub fn finish(&self) -> io::Result<()> {
        if !self.is_complete() {
            return Err(io::Error::other("the fill is not complete"));
        }
        self.flush()?;
        novabackup_engine::fsutil::remove_durable(&self.map_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern {
        size: u64,
        reads: AtomicU64,
    }

    impl Source for Pattern {
        fn size(&self) -> u64 {
            self.size
        }
        fn chunk_size(&self) -> u64 {
            4096
        }
        fn is_zero(&self, idx: u64) -> bool {
            idx % 4 == 3
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            for (i, b) in buf.iter_mut().enumerate() {
                let p = offset + i as u64;
                *b = if (p / 4096) % 4 == 3 {
                    0
                } else {
                    (p % 251) as u8 + 1
                };
            }
            Ok(())
        }
        fn id(&self) -> String {
            "disk@1".into()
        }
    }

    fn setup(size: u64) -> (tempfile::TempDir, PathBuf, Arc<Pattern>) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        File::create(&img).unwrap().set_len(size).unwrap();
        let src = Arc::new(Pattern {
            size,
            reads: AtomicU64::new(0),
        });
        (dir, img, src)
    }

    fn rw(p: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn reads_fill_once_and_writes_are_never_overwritten() {
        let size = 4096 * 10 + 100;
        let (dir, img, src) = setup(size);
        let map = dir.path().join("map");
        let f = Filler::open(rw(&img), &map, src.clone(), true).unwrap();
        f.ensure(5000, 10, false).unwrap();
        f.ensure(4096, 4096, false).unwrap();
        assert_eq!(src.reads.load(Ordering::Relaxed), 1, "chunk 1 fetched once");
        // A guest write into chunk 2 after it was filled.
        f.ensure(8192 + 10, 5, true).unwrap();
        rw(&img).write_all_at(b"GUEST", 8192 + 10).unwrap();
        while f.fill_some(3).unwrap() > 0 {}
        assert!(f.is_complete());
        // Zero chunks of a zeroed target are never fetched: 11 chunks, 2
        // of them zero (3 and 7), the tail chunk 10 is not.
        assert_eq!(src.reads.load(Ordering::Relaxed), 9);
        let got = std::fs::read(&img).unwrap();
        let mut want = vec![0u8; size as usize];
        src.read_exact_at(&mut want, 0).unwrap();
        want[8192 + 10..8192 + 15].copy_from_slice(b"GUEST");
        assert_eq!(got, want);
        f.finish().unwrap();
        assert!(!map.exists());
    }

    #[test]
    fn a_reopened_map_keeps_written_chunks_and_refuses_another_snapshot() {
        let size = 4096 * 8;
        let (dir, img, src) = setup(size);
        let map = dir.path().join("map");
        {
            let f = Filler::open(rw(&img), &map, src.clone(), true).unwrap();
            f.ensure(0, 1, true).unwrap();
            rw(&img).write_all_at(b"W", 0).unwrap();
            f.ensure(3 * 4096 + 7, 1, false).unwrap();
            // Dropped without a flush: like a kill -9.
        }
        let f = Filler::open(rw(&img), &map, src.clone(), false).unwrap();
        assert!(f.is_filled(0), "a written chunk's bit is on disk");
        while f.fill_some(100).unwrap() > 0 {}
        let got = std::fs::read(&img).unwrap();
        assert_eq!(got[0], b'W');
        assert_eq!(got[1], 2);

        struct Other;
        impl Source for Other {
            fn size(&self) -> u64 {
                4096 * 8
            }
            fn chunk_size(&self) -> u64 {
                4096
            }
            fn is_zero(&self, _: u64) -> bool {
                false
            }
            fn read_exact_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
                Ok(())
            }
            fn id(&self) -> String {
                "disk@2".into()
            }
        }
        let e = Filler::open(rw(&img), &map, Arc::new(Other), false).unwrap_err();
        assert!(e.to_string().contains("another image or snapshot"), "{e}");
    }

    #[test]
    fn concurrent_fills_fetch_each_chunk_once() {
        let size = 4096 * 64;
        let (dir, img, src) = setup(size);
        let f =
            Arc::new(Filler::open(rw(&img), &dir.path().join("m"), src.clone(), false).unwrap());
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for i in 0..64u64 {
                        f.ensure(((i * 7 + t) % 64) * 4096, 4096, t % 2 == 0)
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(f.is_complete());
        // Not zeroed: zero chunks are read (and written) too.
        assert_eq!(src.reads.load(Ordering::Relaxed), 64);
    }
}
