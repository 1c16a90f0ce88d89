//! The conformance suite every [`Store`] implementation must pass: run it
//! from the implementation's tests on an empty store.

use super::{Store, StoreError};
use crate::digest::ChunkDigest;
use crate::format::manifest::{BackupKind, BackupStats, CbtRecord, Manifest, FORMAT};
use crate::ids::{DiskName, SnapshotId};

/// A one-chunk full snapshot of `disk` at `t` with these index pages
/// (for store tests).
pub fn manifest(disk: &str, t: u64, pages: Vec<ChunkDigest>) -> Manifest {
    let disk: DiskName = disk.parse().unwrap();
    Manifest {
        format: FORMAT,
        id: SnapshotId::new(&disk, t),
        disk,
        time: crate::time::rfc3339(t),
        time_unix: t,
        parent: None,
        kind: BackupKind::Full,
        reason: "test".into(),
        // One chunk, so one index page.
        image_size: 65536,
        chunk_size: 65536,
        pages,
        cbt: CbtRecord {
            granularity: 65536,
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

/// Runs the suite; panics on the first violation.
pub fn run(s: &dyn Store) {
    // Real chunk files: a store server checks what it is sent.
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    let (file_a, _) = crate::format::chunk::encode(b"a", &mut z);
    let a = ChunkDigest::of(b"a");
    let b = ChunkDigest::of(b"b");
    assert_eq!(s.missing(&[a, b]).unwrap(), vec![true, true]);
    s.put_chunk(&a, &file_a).unwrap();
    assert_eq!(s.missing(&[a, b]).unwrap(), vec![false, true]);
    // A second put of the same digest is accepted and stores nothing.
    assert_eq!(s.put_chunk(&a, &file_a).unwrap(), 0);
    // An index page naming chunk a: snapshots reference it.
    let page = crate::format::index::encode_page(&[a]);
    let (file_p, _) = crate::format::chunk::encode(&page, &mut z);
    let p = ChunkDigest::of(&page);
    s.put_chunk(&p, &file_p).unwrap();
    s.sync().unwrap();
    assert_eq!(s.get_chunk(&a).unwrap(), file_a);
    assert!(matches!(s.get_chunk(&b), Err(StoreError::MissingChunk(d)) if d == b));

    let m1 = manifest("vm", 1_000, vec![p]);
    let m2 = manifest("vm", 2_000, vec![p]);
    let m3 = manifest("other", 1_500, vec![p]);
    s.commit(&m2).unwrap();
    s.commit(&m1).unwrap();
    s.commit(&m3).unwrap();
    assert!(matches!(s.commit(&m1), Err(StoreError::Exists(_))));
    let (all, bad) = s.list(None).unwrap();
    assert!(bad.is_empty());
    assert_eq!(
        all.iter().map(|m| m.time_unix).collect::<Vec<_>>(),
        vec![1_000, 1_500, 2_000]
    );
    let (vm, _) = s.list(Some(&"vm".parse().unwrap())).unwrap();
    assert_eq!(vm.len(), 2);
    assert_eq!(s.manifest(&m1.id).unwrap().id, m1.id);
    s.delete(&m1.id).unwrap();
    assert!(matches!(s.manifest(&m1.id), Err(StoreError::NoSnapshot(_))));
    assert!(matches!(s.delete(&m1.id), Err(StoreError::NoSnapshot(_))));

    // Annotations change, nothing else does.
    let protect = crate::format::manifest::Annotation {
        protected: Some(true),
        verified: None,
    };
    let back = s.annotate(&m2.id, &protect).unwrap();
    assert!(back.protected && back.pages == m2.pages);
    assert!(s.manifest(&m2.id).unwrap().protected);
    assert!(matches!(
        s.annotate(&m1.id, &protect),
        Err(StoreError::NoSnapshot(_))
    ));

    // Garbage collection drops what no snapshot references.
    let (file_c, _) = crate::format::chunk::encode(b"c", &mut z);
    let c = ChunkDigest::of(b"c");
    s.put_chunk(&c, &file_c).unwrap();
    s.sync().unwrap();
    let r = s
        .gc(
            &super::GcOptions::default(),
            &crate::progress::Progress::default(),
        )
        .unwrap();
    assert_eq!(r.chunks_removed, 1, "{r:?}");
    assert_eq!(s.missing(&[a, p, c]).unwrap(), vec![false, false, true]);
    assert_eq!(s.get_chunk(&a).unwrap(), file_a);

    let disk: DiskName = "vm".parse().unwrap();
    let lock = s.lock(&disk, None).unwrap();
    assert!(matches!(s.lock(&disk, None), Err(StoreError::Locked(_))));
    assert!(s.lock(&"other".parse().unwrap(), None).is_ok());
    drop(lock);
    assert!(s.lock(&disk, None).is_ok());
    // A backup building on a deleted snapshot is told so, and holds nothing.
    assert!(matches!(
        s.lock(&disk, Some(&m1)),
        Err(StoreError::NoSnapshot(id)) if id == m1.id
    ));
    let held = s.lock(&disk, Some(&m2)).unwrap();
    assert!(matches!(s.lock(&disk, None), Err(StoreError::Locked(_))));
    drop(held);
    assert!(s.usage().unwrap() > 0);
    fast_paths(s);
}

/// The optional fast paths, the store's own or the defaults: whatever
/// path a chunk takes in, it comes out the same.
fn fast_paths(s: &dyn Store) {
    use crate::format::chunk;
    let f = s.fast();
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    // A store that sums chunk files itself takes them unsummed.
    let sum = !f.sums_chunks();
    let owned = ChunkDigest::of(b"owned");
    let (file, _) = chunk::encode_with(b"owned", &mut z, sum);
    assert!(f.put_chunk_owned(&owned, file).unwrap() > 0);
    let plain = vec![7u8; 4096];
    let raw = ChunkDigest::of(&plain);
    f.put_raw_chunk(&raw, chunk::raw_head(&plain, sum), plain.clone())
        .unwrap();
    f.send_pending();
    s.sync().unwrap();
    assert_eq!(s.missing(&[owned, raw]).unwrap(), vec![false, false]);
    f.prefetch(&[owned, raw]);
    let back = |d: &ChunkDigest| chunk::decode_verified(&s.get_chunk(d).unwrap(), d).unwrap();
    assert_eq!(back(&owned), b"owned");
    assert_eq!(back(&raw), plain);

    // An index page put last (a store server's client holds it for the
    // commit) is there once the snapshot naming it is.
    let page = crate::format::index::encode_page(&[owned]);
    let p = ChunkDigest::of(&page);
    let (file, _) = chunk::encode_with(&page, &mut z, sum);
    f.put_index_page(&p, file).unwrap();
    let m = manifest("fast", 3_000, vec![p]);
    s.commit(&m).unwrap();
    assert_eq!(s.missing(&[p]).unwrap(), vec![false]);
    assert_eq!(
        crate::store::pages::load_page(s, &m, 0).unwrap(),
        vec![owned]
    );
}
