//! Random access to a snapshot's bytes, straight from any store: what
//! reading a partition table, listing a file system or serving a snapshot
//! over NBD needs without restoring the whole image first.
//!
//! Reads go chunk by chunk. Each chunk is fetched once, checked against
//! its digest (a damaged chunk is an error, never data) and kept in a
//! bounded least-recently-used cache, so the many small reads of a file
//! system walk hit memory. When reads run sequentially the reader asks the
//! store to fetch the next chunks ahead ([`crate::store::FastPaths::prefetch`]):
//! a local store reads them from its packs on its own threads, a store
//! server's client downloads them in batches, while the caller works on
//! the current ones. All-zero chunks cost nothing.

use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::digest::ChunkDigest;
use crate::format::chunk;
use crate::format::manifest::Manifest;
use crate::store::pages::{read_index, PageError};
use crate::store::{Store, StoreError};

/// How a reader caches and reads ahead.
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// Decoded chunks kept, in bytes (at least one chunk is).
    pub cache_bytes: usize,
    /// Chunks fetched ahead of a sequential reader (0: none).
    pub readahead_chunks: usize,
}

impl Default for ReaderOptions {
    fn default() -> ReaderOptions {
        ReaderOptions {
            cache_bytes: 64 << 20,
            readahead_chunks: 32,
        }
    }
}

/// Errors of a snapshot reader.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The snapshot's index could not be read.
    #[error(transparent)]
    Index(#[from] PageError),
    /// A chunk could not be fetched from the store.
    #[error("cannot read chunk {digest} at offset {offset} of snapshot {snapshot}: {source}")]
    Fetch {
        /// The snapshot.
        snapshot: String,
        /// The chunk.
        digest: ChunkDigest,
        /// Where it belongs in the image.
        offset: u64,
        /// What the store said.
        source: StoreError,
    },
    /// A chunk is damaged: its bytes do not match its digest.
    #[error("chunk {digest} at offset {offset} of snapshot {snapshot} is damaged ({why}); run `novabackup verify {snapshot}` and `novabackup repair`")]
    Damaged {
        /// The snapshot.
        snapshot: String,
        /// The chunk.
        digest: ChunkDigest,
        /// Where it belongs in the image.
        offset: u64,
        /// What was wrong.
        why: String,
    },
}

impl From<ReaderError> for io::Error {
    fn from(e: ReaderError) -> io::Error {
        io::Error::other(e)
    }
}

/// What a reader has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderStats {
    /// Chunks served from the cache.
    pub hits: u64,
    /// Chunks fetched from the store and checked.
    pub fetched: u64,
    /// Chunk files' bytes fetched.
    pub fetched_bytes: u64,
    /// Chunks asked for ahead of a sequential reader.
    pub prefetched: u64,
}

/// Random access to one snapshot (module doc).
pub struct SnapshotReader {
    store: Arc<dyn Store>,
    manifest: Manifest,
    digests: Vec<ChunkDigest>,
    cache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    opts: ReaderOptions,
    /// The chunk after the last one read: a read starting there is
    /// sequential.
    next: AtomicU64,
    /// Chunks up to here were already asked for ahead.
    ahead_until: AtomicU64,
    hits: AtomicU64,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    prefetched: AtomicU64,
}

impl SnapshotReader {
    /// A reader of the snapshot `manifest` describes; reads its index.
    pub fn new(
        store: Arc<dyn Store>,
        manifest: Manifest,
        opts: ReaderOptions,
    ) -> Result<SnapshotReader, ReaderError> {
        let digests = read_index(&*store, &manifest)?;
        let per_chunk = manifest.chunk_size.max(1) as usize;
        let entries = NonZeroUsize::new((opts.cache_bytes / per_chunk).max(1)).expect("at least 1");
        Ok(SnapshotReader {
            store,
            manifest,
            digests,
            cache: Mutex::new(LruCache::new(entries)),
            opts,
            next: AtomicU64::new(u64::MAX),
            ahead_until: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.image_size
    }

    /// The snapshot's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunk size of the snapshot, in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.manifest.chunk_size
    }

    /// Whether chunk `idx` is all zeroes (nothing to fetch for it).
    pub fn is_zero_chunk(&self, idx: u64) -> bool {
        self.digests.get(idx as usize).is_some_and(|d| d.is_zero())
    }

    /// Counters of cache hits, fetches and read-ahead.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            hits: self.hits.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
        }
    }

    /// Fills `buf` from `offset`; returns how many bytes it filled (fewer
    /// than asked only at the end of the image, 0 past it).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, ReaderError> {
        let size = self.size();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min((size - offset) as usize);
        let cs = self.manifest.chunk_size;
        let first = offset / cs;
        self.read_ahead(first);
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let chunk_len = (size - idx * cs).min(cs) as usize;
            let n = (chunk_len - within).min(want - done);
            let out = &mut buf[done..done + n];
            if self.digests[idx as usize].is_zero() {
                out.fill(0);
            } else {
                let data = self.chunk(idx)?;
                out.copy_from_slice(&data[within..within + n]);
            }
            done += n;
        }
        self.next
            .store((offset + want as u64).div_ceil(cs), Ordering::Relaxed);
        Ok(want)
    }

    /// Fills all of `buf` from `offset`, or fails with `UnexpectedEof`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} passes the end of the image ({} bytes)",
                    buf.len(),
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    /// A `Read + Seek` view from the start, for parsers that take one.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            reader: self,
            pos: 0,
        }
    }

    /// Chunk `idx`, decoded and checked, from the cache or the store.
    fn chunk(&self, idx: u64) -> Result<Arc<Vec<u8>>, ReaderError> {
        if let Some(c) = self.lock().get(&idx) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c.clone());
        }
        let digest = self.digests[idx as usize];
        let offset = idx * self.manifest.chunk_size;
        let file = self
            .store
            .get_chunk(&digest)
            .map_err(|source| ReaderError::Fetch {
                snapshot: self.manifest.id.to_string(),
                digest,
                offset,
                source,
            })?;
        let data = chunk::decode_verified(&file, &digest).map_err(|e| ReaderError::Damaged {
            snapshot: self.manifest.id.to_string(),
            digest,
            offset,
            why: e.to_string(),
        })?;
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes
            .fetch_add(file.len() as u64, Ordering::Relaxed);
        let data = Arc::new(data);
        self.lock().put(idx, data.clone());
        Ok(data)
    }

    /// A read starting where the last one ended asks the store for the
    /// next chunks, once each.
    fn read_ahead(&self, first: u64) {
        if self.opts.readahead_chunks == 0 || self.next.load(Ordering::Relaxed) != first {
            return;
        }
        let from = first.max(self.ahead_until.load(Ordering::Relaxed));
        let until = (first + 1 + self.opts.readahead_chunks as u64).min(self.digests.len() as u64);
        if from >= until {
            return;
        }
        self.ahead_until.store(until, Ordering::Relaxed);
        let cache = self.lock();
        let wanted: Vec<ChunkDigest> = (from..until)
            .filter(|i| !cache.contains(i))
            .map(|i| self.digests[i as usize])
            .filter(|d| !d.is_zero())
            .collect();
        drop(cache);
        if !wanted.is_empty() {
            self.prefetched
                .fetch_add(wanted.len() as u64, Ordering::Relaxed);
            self.store.fast().prefetch(&wanted);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<u64, Arc<Vec<u8>>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A `Read + Seek` position over a [`SnapshotReader`].
pub struct Cursor<'a> {
    reader: &'a SnapshotReader,
    pos: u64,
}

impl io::Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for Cursor<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let size = self.reader.size();
        let pos = match to {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => size.checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match pos {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the image",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::backup::tests::backup_with;
    use crate::cbt::{DirtyBitmap, Granularity};
    use crate::plan::Mode;
    use crate::store::local::LocalStore;

    const CS: u64 = 65536;

    /// A snapshot of an image with data, zero chunks and a short tail.
    fn snapshot() -> (tempfile::TempDir, Arc<dyn Store>, Manifest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.path().join("store")).unwrap());
        let size = 20 * CS as usize + 1000;
        let mut data = vec![0u8; size];
        let mut x: u64 = 7;
        for (i, b) in data.iter_mut().enumerate() {
            // Chunks 3..6 stay zero; the rest is noise.
            if !(3 * CS as usize..6 * CS as usize).contains(&i) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        let path = dir.path().join("img");
        std::fs::write(&path, &data).unwrap();
        let img = std::fs::File::open(&path).unwrap();
        let g = Granularity::new(CS).unwrap();
        let frozen = DirtyBitmap::new(size as u64, g);
        let m = backup_with(
            &*store,
            &img,
            size as u64,
            &frozen,
            None,
            1,
            Mode::Full,
            None,
            None,
        )
        .unwrap();
        (dir, store, m, data)
    }

    #[test]
    fn reads_anywhere_equal_the_image_across_chunk_edges_and_the_tail() {
        let (_d, store, m, data) = snapshot();
        let r = SnapshotReader::new(store, m, ReaderOptions::default()).unwrap();
        assert_eq!(r.size(), data.len() as u64);
        let size = data.len() as u64;
        for (off, len) in [
            (0, 1),
            (CS - 3, 10),
            (2 * CS + 17, 5 * CS as usize),
            (size - 700, 700),
            (size - 10, 100),
            (4 * CS, 1000),
        ] {
            let mut buf = vec![0xAAu8; len];
            let n = r.read_at(&mut buf, off).unwrap();
            let end = (off as usize + len).min(data.len());
            assert_eq!(n, end - off as usize, "at {off}");
            assert_eq!(&buf[..n], &data[off as usize..end], "at {off}");
        }
        assert_eq!(r.read_at(&mut [0u8; 8], size).unwrap(), 0);
        assert!(r.read_exact_at(&mut [0u8; 8], size - 4).is_err());
        let mut c = r.cursor();
        c.seek(SeekFrom::End(-1000)).unwrap();
        let mut tail = Vec::new();
        c.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, &data[data.len() - 1000..]);
        assert!(c.seek(SeekFrom::Current(-(size as i64) - 1)).is_err());
    }

    #[test]
    fn the_cache_serves_repeated_reads_and_stays_bounded() {
        let (_d, store, m, _) = snapshot();
        let opts = ReaderOptions {
            cache_bytes: 2 * CS as usize,
            readahead_chunks: 0,
        };
        let r = SnapshotReader::new(store, m, opts).unwrap();
        let mut b = [0u8; 512];
        for _ in 0..5 {
            r.read_at(&mut b, 100).unwrap();
        }
        assert_eq!(r.stats().fetched, 1);
        assert_eq!(r.stats().hits, 4);
        // Zero chunks are never fetched.
        r.read_at(&mut b, 4 * CS).unwrap();
        assert_eq!(r.stats().fetched, 1);
        // Three other chunks push chunk 0 out of a two-chunk cache.
        for c in [7, 8, 9] {
            r.read_at(&mut b, c * CS).unwrap();
        }
        r.read_at(&mut b, 100).unwrap();
        assert_eq!(r.stats().fetched, 5);
        assert!(r.lock().len() <= 2);
    }

    #[test]
    fn sequential_reads_ask_the_store_ahead_once() {
        let (_d, store, m, data) = snapshot();
        let opts = ReaderOptions {
            cache_bytes: 1 << 20,
            readahead_chunks: 4,
        };
        let r = SnapshotReader::new(store, m, opts).unwrap();
        let mut all = Vec::new();
        let mut c = r.cursor();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        assert_eq!(all, data);
        // 21 chunks, 3 of them zero: 18 fetched; every non-zero chunk
        // after the first was asked for ahead, none twice.
        let s = r.stats();
        assert_eq!(s.fetched, 18);
        assert_eq!(s.prefetched, 17);
    }

    #[test]
    fn a_damaged_chunk_is_an_error_never_data() {
        let (dir, store, m, _) = snapshot();
        // Flip a byte in the middle of every pack.
        for e in walk(&dir.path().join("store/packs")) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&e)
                .unwrap();
            let len = f.metadata().unwrap().len();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, len / 2).unwrap();
            f.write_all_at(&[b[0] ^ 0xFF], len / 2).unwrap();
        }
        drop(store);
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.path().join("store")).unwrap());
        let r = SnapshotReader::new(store, m, ReaderOptions::default());
        let failed = match r {
            Err(_) => true,
            Ok(r) => (0..21).any(|c| r.read_at(&mut [0u8; 64], c * CS).is_err()),
        };
        assert!(failed, "a flipped byte went unnoticed");
    }

    fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
        v
    }
}
