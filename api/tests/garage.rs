//! The object-storage store against a real 3-node Garage cluster
//! (replication factor 3) on loopback, started by `tests/garage/cluster.sh`.

use std::time::Duration;

use novabackup_api::objstore::{ObjectStore, S3Location};
use novabackup_engine::digest::ChunkDigest;
use novabackup_engine::format::{chunk, index};
use novabackup_engine::progress::Progress;
use novabackup_engine::store::conformance::manifest;
use novabackup_engine::store::{GcOptions, Store, StoreError};

#[path = "../../tests/garage/cluster.rs"]
mod cluster;
use cluster::Cluster;

trait Open {
    fn location(&self, prefix: &str) -> S3Location;
    fn open(&self, prefix: &str, grace: Duration) -> ObjectStore;
}

impl Open for Cluster {
    fn location(&self, prefix: &str) -> S3Location {
        S3Location::parse(&format!("s3://nova/{prefix}"), Some(&self.env())).unwrap()
    }

    fn open(&self, prefix: &str, grace: Duration) -> ObjectStore {
        ObjectStore::open(&self.location(prefix), None)
            .unwrap()
            .with_grace(grace)
    }
}

fn file(plain: &[u8]) -> (ChunkDigest, Vec<u8>) {
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    (ChunkDigest::of(plain), chunk::encode(plain, &mut z).0)
}

/// Puts an index page naming `chunks` and returns a snapshot of `disk` at
/// `t` built on it.
fn snapshot(
    s: &dyn Store,
    disk: &str,
    t: u64,
    chunks: &[ChunkDigest],
) -> novabackup_engine::format::manifest::Manifest {
    let page = index::encode_page(chunks);
    let (p, f) = file(&page);
    s.put_chunk(&p, &f).unwrap();
    let mut m = manifest(disk, t, vec![p]);
    m.image_size = chunks.len() as u64 * m.chunk_size;
    m
}

#[test]
fn the_object_store_passes_the_conformance_suite_on_garage() {
    let c = Cluster::start(4100);
    let s = c.open("conformance", Duration::ZERO);
    let early = c.open("conformance", Duration::ZERO);
    novabackup_engine::store::conformance::run(&s);
    // A reader opened before the packs were written finds them.
    let a = ChunkDigest::of(b"a");
    chunk::decode_verified(&early.get_chunk(&a).unwrap(), &a).unwrap();
    // A second process sees what the first wrote.
    let again = c.open("conformance", Duration::ZERO);
    assert_eq!(
        again.list(None).unwrap().0.len(),
        s.list(None).unwrap().0.len()
    );
    assert_eq!(again.chunk_count(), s.chunk_count());
}

#[test]
fn a_collection_dooms_first_and_a_racing_commit_keeps_what_it_needs() {
    let c = Cluster::start(4200);
    let grace = Duration::from_secs(2);
    let a = c.open("race", grace);
    let (x, fx) = file(b"x kept");
    let (y, fy) = file(b"y unreferenced, then needed");
    a.put_chunk(&x, &fx).unwrap();
    let m1 = snapshot(&a, "one", 1_000, &[x]);
    a.commit(&m1).unwrap();
    a.put_chunk(&y, &fy).unwrap();
    a.sync().unwrap();
    // Another host's backup, under way: it found y present.
    let b = c.open("race", grace);
    let held = b.lock(&"two".parse().unwrap(), None).unwrap();
    assert_eq!(b.missing(&[y]).unwrap(), vec![false]);

    std::thread::sleep(grace + Duration::from_millis(200));
    let r = a.gc(&GcOptions::default(), &Progress::default()).unwrap();
    assert_eq!((r.chunks_removed, r.packs_deleted), (1, 0), "{r:?}");
    assert_eq!(a.missing(&[x, y]).unwrap(), vec![false, true]);
    // Doomed is not deleted: it still reads.
    assert_eq!(a.get_chunk(&y).unwrap(), fy);

    // The racing backup commits a snapshot naming y: it copies y out of
    // the doomed pack first.
    let m2 = snapshot(&b, "two", 2_000, &[y]);
    b.commit(&m2).unwrap();
    drop(held);

    std::thread::sleep(grace + Duration::from_millis(200));
    let r = a.gc(&GcOptions::default(), &Progress::default()).unwrap();
    assert!(r.packs_deleted >= 1, "{r:?}");
    let fresh = c.open("race", grace);
    for m in [&m1, &m2] {
        let digests = novabackup_engine::store::pages::read_index(&fresh, m).unwrap();
        for d in digests {
            chunk::decode_verified(&fresh.get_chunk(&d).unwrap(), &d).unwrap();
        }
    }

    // A backup whose view predates a deletion is refused at its commit,
    // instead of publishing a snapshot that cannot be restored.
    let (z, fz) = file(b"z forgotten");
    a.put_chunk(&z, &fz).unwrap();
    a.sync().unwrap();
    let stale = c.open("race", grace);
    assert_eq!(stale.missing(&[z]).unwrap(), vec![false]);
    std::thread::sleep(grace + Duration::from_millis(200));
    a.gc(&GcOptions::default(), &Progress::default()).unwrap();
    std::thread::sleep(grace + Duration::from_millis(200));
    let r = a.gc(&GcOptions::default(), &Progress::default()).unwrap();
    assert!(r.packs_deleted >= 1, "{r:?}");
    let m3 = snapshot(&stale, "three", 3_000, &[z]);
    let e = stale.commit(&m3).unwrap_err();
    assert!(matches!(e, StoreError::Incomplete(_)), "{e}");
    assert!(e.to_string().contains("run the backup again"), "{e}");
    assert!(matches!(
        fresh.manifest(&m3.id),
        Err(StoreError::NoSnapshot(_))
    ));
}

#[test]
fn the_metadata_cache_is_used_and_rebuilt_when_damaged() {
    let c = Cluster::start(4300);
    let cache = tempfile::tempdir().unwrap();
    let loc = c.location("cache");
    let s = ObjectStore::open(&loc, Some(cache.path())).unwrap();
    let chunks: Vec<_> = (0..50u32).map(|i| file(&i.to_le_bytes())).collect();
    for (d, f) in &chunks {
        s.put_chunk(d, f).unwrap();
    }
    s.sync().unwrap();
    let tocs: Vec<_> = std::fs::read_dir(cache.path().join("tocs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!tocs.is_empty());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cache.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the cache is private: {mode:o}");
    // Damage every cached entry: the store reads the packs' tails again.
    for t in &tocs {
        std::fs::write(t, b"garbage").unwrap();
    }
    let again = ObjectStore::open(&loc, Some(cache.path())).unwrap();
    assert_eq!(again.chunk_count(), Some(50));
    for (d, f) in &chunks {
        assert_eq!(&again.get_chunk(d).unwrap(), f);
    }
    assert_ne!(std::fs::read(&tocs[0]).unwrap(), b"garbage", "rewritten");
    // No cache at all: the same from the bucket alone.
    let bare = ObjectStore::open(&loc, None).unwrap();
    assert_eq!(bare.chunk_count(), Some(50));
}

#[test]
fn the_store_works_with_one_node_stopped() {
    let c = Cluster::start(4400);
    let s = c.open("degraded", Duration::ZERO);
    let (x, fx) = file(b"before");
    s.put_chunk(&x, &fx).unwrap();
    let m1 = snapshot(&s, "vm", 1_000, &[x]);
    s.commit(&m1).unwrap();
    // The first endpoint the client tries is gone.
    c.kill(1);
    let s = c.open("degraded", Duration::ZERO);
    assert_eq!(s.get_chunk(&x).unwrap(), fx);
    let (y, fy) = file(b"during");
    s.put_chunk(&y, &fy).unwrap();
    let m2 = snapshot(&s, "vm", 2_000, &[x, y]);
    s.commit(&m2).unwrap();
    assert_eq!(s.list(None).unwrap().0.len(), 2);
    c.revive(1);
    let s = c.open("degraded", Duration::ZERO);
    assert_eq!(s.get_chunk(&y).unwrap(), fy);
}

#[test]
fn a_store_with_no_reachable_node_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    std::fs::write(&env, "AWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY=b\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    let loc = S3Location::parse("s3://nova/x?endpoint=http://127.0.0.1:1", Some(&env)).unwrap();
    let e = ObjectStore::open(&loc, None).unwrap_err().to_string();
    assert!(
        e.contains("no endpoint of the object store answered"),
        "{e}"
    );
}
