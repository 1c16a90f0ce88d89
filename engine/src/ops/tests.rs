//! The operations on an in-memory store and a fake tracked disk: their
//! reports and every error path a user meets (busy disk, quota reached
//! before and during a backup, missing base, store full, damaged
//! manifest, protected snapshot, bad restore target).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::backup::{backup, BackupJobOptions};
use super::claims::Claims;
use super::error::ErrorKind;
use super::prune::{prune, PruneAction, PruneOptions};
use super::quota::Limits;
use super::restore::{self as restore_op, RestoreOptions};
use super::snapshots;
use super::tracker::{Checkpoint, TrackedDisk, TrackerError, TrackerState};
use super::verify::{verify, VerifyScope};
use crate::backup::{BackupOptions, PointInTime};
use crate::cbt::persist::Trust;
use crate::cbt::{DirtyBitmap, Granularity};
use crate::format::manifest::BackupKind;
use crate::plan::Mode;
use crate::progress::Progress;
use crate::read::ReadEngine;
use crate::retention::Policy;
use crate::store::memory::MemoryStore;
use crate::store::Store;

const SIZE: u64 = 4 << 20;
const G: u64 = 64 << 10;

struct Tracking {
    live: DirtyBitmap,
    trust: Trust,
    base: Option<String>,
    frozen: Option<DirtyBitmap>,
}

/// A disk image in a temporary file with an in-memory tracker that marks
/// what [`FakeDisk::write`] writes.
struct FakeDisk {
    _dir: tempfile::TempDir,
    file: File,
    t: Arc<Mutex<Tracking>>,
}

impl FakeDisk {
    fn new() -> FakeDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.img");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // Text in the first half (compressible), noise in the second (a
        // quota fills up); no block all zero.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..SIZE)
            .map(|i| {
                if i < SIZE / 2 {
                    b"novabackup "[(i % 11) as usize]
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect();
        file.write_all_at(&data, 0).unwrap();
        let gran = Granularity::new(G).unwrap();
        FakeDisk {
            _dir: dir,
            file,
            t: Arc::new(Mutex::new(Tracking {
                live: DirtyBitmap::new(SIZE, gran),
                trust: Trust::Trusted,
                base: None,
                frozen: None,
            })),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.file.write_all_at(data, offset).unwrap();
        self.t.lock().unwrap().live.mark(offset, data.len() as u64);
    }

    fn dirty(&self) -> usize {
        self.t.lock().unwrap().live.count_dirty()
    }
}

struct FakeCheckpoint {
    t: Arc<Mutex<Tracking>>,
    frozen: DirtyBitmap,
    trust: Trust,
}

impl PointInTime for FakeCheckpoint {
    fn settle(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Ok(())
    }
}

impl Checkpoint for FakeCheckpoint {
    fn frozen(&self) -> &DirtyBitmap {
        &self.frozen
    }
    fn trust(&self) -> &Trust {
        &self.trust
    }
    fn copies(&self) -> usize {
        0
    }
    fn commit(self: Box<Self>, snapshot: &str) -> Result<(), TrackerError> {
        let mut t = self.t.lock().unwrap();
        t.frozen = None;
        t.base = Some(snapshot.to_string());
        Ok(())
    }
    fn abort(self: Box<Self>) -> Result<(), TrackerError> {
        let mut t = self.t.lock().unwrap();
        let f = t.frozen.take().expect("a checkpoint is active");
        t.live.merge(&f);
        Ok(())
    }
}

impl TrackedDisk for FakeDisk {
    fn name(&self) -> &str {
        "vm"
    }
    fn image(&self) -> &File {
        &self.file
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn data_extents(&self) -> Vec<(u64, u64)> {
        vec![(0, SIZE)]
    }
    fn tracking(&self) -> TrackerState {
        let t = self.t.lock().unwrap();
        TrackerState {
            granularity: G,
            checkpoint_active: t.frozen.is_some(),
            base: t.base.clone(),
        }
    }
    fn live_trust(&self) -> Trust {
        self.t.lock().unwrap().trust.clone()
    }
    fn checkpoint(&self, _protect_all: bool) -> Result<Box<dyn Checkpoint>, TrackerError> {
        let mut t = self.t.lock().unwrap();
        if t.frozen.is_some() {
            return Err(TrackerError::CheckpointActive);
        }
        let frozen = t.live.clone();
        t.live.clear();
        t.frozen = Some(frozen.clone());
        let trust = std::mem::replace(&mut t.trust, Trust::Trusted);
        Ok(Box::new(FakeCheckpoint {
            t: self.t.clone(),
            frozen,
            trust,
        }))
    }
}

fn opts(mode: Mode) -> BackupJobOptions {
    BackupJobOptions {
        mode,
        pipeline: BackupOptions {
            chunk_size: G,
            workers: 1,
            ..Default::default()
        },
        read: ReadEngine::Pread,
        audit_every: 0,
        limits: Limits::default(),
    }
}

fn run(disk: &FakeDisk, store: &dyn Store, o: &BackupJobOptions) -> super::backup::BackupReport {
    backup(disk, store, o, None, &Progress::default()).unwrap()
}

#[test]
fn a_full_then_an_incremental_backup_read_what_changed_and_move_the_base() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let full = run(&disk, &store, &opts(Mode::Auto));
    assert_eq!(full.kind, BackupKind::Full);
    assert_eq!(full.image_size, SIZE);
    assert!(full.compression_ratio > 1.0, "{full:?}");
    assert_eq!(disk.tracking().base, Some(full.snapshot.to_string()));

    disk.write(G * 3, &[7u8; 100]);
    let inc = run(&disk, &store, &opts(Mode::Auto));
    assert_eq!(inc.kind, BackupKind::Incremental, "{}", inc.reason);
    assert_eq!(inc.parent.as_ref(), Some(&full.snapshot));
    assert_eq!(inc.stats.bytes_read, G);
    assert_eq!(disk.dirty(), 0);
}

#[test]
fn a_backup_of_a_disk_under_checkpoint_is_busy_and_changes_nothing() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let held = disk.checkpoint(false).unwrap();
    let e = backup(&disk, &store, &opts(Mode::Auto), None, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(store.list(None).unwrap().0.is_empty());
    held.abort().unwrap();
}

#[test]
fn a_quota_reached_before_the_backup_stops_it_before_the_checkpoint() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    run(&disk, &store, &opts(Mode::Auto));
    disk.write(0, &[1u8; 10]);
    let mut o = opts(Mode::Auto);
    o.limits.disks.insert("vm".into(), 1);
    let e = backup(&disk, &store, &o, None, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Quota, "{e}");
    assert!(e.to_string().contains("quota of disk vm is reached"), "{e}");
    // The dirty bits were never frozen.
    assert_eq!(disk.dirty(), 1);
}

#[test]
fn a_quota_reached_mid_way_fails_the_backup_and_keeps_every_dirty_bit() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    disk.write(0, &[1u8; 10]);
    let mut o = opts(Mode::Full);
    // Far less than the full backup stores.
    o.limits.store = Some(2_000);
    let e = backup(&disk, &store, &o, None, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Quota, "{e}");
    assert!(store.list(None).unwrap().0.is_empty());
    assert!(!disk.tracking().checkpoint_active);
    assert_eq!(disk.dirty(), 1, "the frozen bits went back");
}

#[test]
fn a_missing_base_makes_a_full_backup_that_says_why() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let first = run(&disk, &store, &opts(Mode::Auto));
    store.delete(&first.snapshot).unwrap();
    disk.write(0, &[2u8; 10]);
    let r = run(&disk, &store, &opts(Mode::Auto));
    assert_eq!(r.kind, BackupKind::Full);
    assert!(r.reason.contains("was deleted"), "{}", r.reason);
}

#[test]
fn a_full_store_fails_the_backup_as_store_full_and_loses_no_dirty_bit() {
    let disk = FakeDisk::new();
    let store = MemoryStore::with_capacity(100_000);
    disk.write(G, &[3u8; 10]);
    let e = backup(&disk, &store, &opts(Mode::Auto), None, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StoreFull, "{e}");
    assert!(e.to_string().contains("out of space"), "{e}");
    assert_eq!(disk.dirty(), 1);
    assert!(!disk.tracking().checkpoint_active);
}

#[test]
fn every_nth_backup_audits_and_the_audit_passes_when_tracking_is_exact() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let mut o = opts(Mode::Auto);
    o.audit_every = 2;
    run(&disk, &store, &o);
    disk.write(0, &[4u8; 10]);
    let r = run(&disk, &store, &o);
    assert!(r.audit.is_none(), "one incremental, then an audit");
    disk.write(G, &[4u8; 10]);
    let r = run(&disk, &store, &o);
    let audit = r.audit.expect("the third backup audits");
    assert_eq!(audit.mismatches, 0);
}

#[test]
fn verify_records_its_verdict_and_names_a_lost_chunk_and_a_damaged_manifest() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let a = run(&disk, &store, &opts(Mode::Auto));
    let claims = Claims::default();
    let scope = VerifyScope::default();
    let r = verify(&store, &scope, &claims, 1, &Progress::default()).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(store.manifest(&a.snapshot).unwrap().verified.unwrap().ok);

    // Recently verified: skipped when asked to.
    let skip = VerifyScope {
        skip_within: Some(3600),
        ..Default::default()
    };
    let r = verify(&store, &skip, &claims, 1, &Progress::default()).unwrap();
    assert_eq!(r.skipped_recently_verified, vec![a.snapshot.to_string()]);

    // A lost data chunk: not ok, and the verdict says so.
    let m = store.manifest(&a.snapshot).unwrap();
    let index = crate::store::pages::read_index(&store, &m).unwrap();
    store.lose_chunk(&index[0]);
    let r = verify(&store, &scope, &claims, 1, &Progress::default()).unwrap();
    assert!(!r.ok);
    assert_eq!(r.report.snapshots[0].bad_chunks.len(), 1);
    assert!(!store.manifest(&a.snapshot).unwrap().verified.unwrap().ok);

    store.damage_manifest(&a.snapshot);
    let r = verify(&store, &scope, &claims, 1, &Progress::default()).unwrap();
    assert!(!r.ok);
    assert_eq!(r.damaged_manifests.len(), 1, "{r:?}");
    let e = snapshots::delete(&store, &a.snapshot).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
}

#[test]
fn verify_of_a_named_snapshot_that_does_not_exist_is_not_found() {
    let store = MemoryStore::new();
    let scope = VerifyScope {
        ids: Some(vec!["vm@20260101T000000Z".parse().unwrap()]),
        ..Default::default()
    };
    assert_eq!(scope.check(&store).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(scope.target(), "vm@20260101T000000Z");
}

#[test]
fn prune_keeps_what_the_policy_and_protection_keep_and_a_dry_run_removes_nothing() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let a = run(&disk, &store, &opts(Mode::Auto));
    disk.write(0, &[5u8; 10]);
    let b = run(&disk, &store, &opts(Mode::Auto));
    disk.write(0, &[6u8; 10]);
    let c = run(&disk, &store, &opts(Mode::Auto));
    snapshots::protect(&store, &a.snapshot, true).unwrap();
    let keep_last_1 = |_: &str| {
        (
            "last".to_string(),
            Policy {
                keep_last: Some(1),
                keep_daily: None,
                keep_weekly: None,
                keep_monthly: None,
                keep_yearly: None,
                keep_within: None,
                ..Policy::default()
            },
        )
    };
    let claims = Claims::default();
    let dry = PruneOptions {
        disk: None,
        dry_run: true,
    };
    let r = prune(&store, &keep_last_1, &claims, &dry, &Progress::default()).unwrap();
    assert_eq!(r.removed, 0);
    let actions: Vec<PruneAction> = r.disks[0].snapshots.iter().map(|s| s.action).collect();
    assert_eq!(
        actions,
        vec![PruneAction::Keep, PruneAction::Remove, PruneAction::Keep]
    );
    assert_eq!(store.list(None).unwrap().0.len(), 3);

    let real = PruneOptions::default();
    let r = prune(&store, &keep_last_1, &claims, &real, &Progress::default()).unwrap();
    assert_eq!(r.removed, 1);
    let left: Vec<_> = store
        .list(None)
        .unwrap()
        .0
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, vec![a.snapshot.clone(), c.snapshot]);
    assert!(!left.contains(&b.snapshot));

    // A protected snapshot is never deleted.
    let e = snapshots::delete(&store, &a.snapshot).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("unprotect"), "{e}");
}

#[test]
fn prune_waits_for_a_busy_disk_and_stops_when_cancelled() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    run(&disk, &store, &opts(Mode::Auto));
    let claims = Claims::default();
    let _held = claims.try_claim("vm").unwrap();
    let p = Progress::default();
    p.cancel();
    let e = prune(
        &store,
        &|_| ("d".into(), Policy::default()),
        &claims,
        &PruneOptions::default(),
        &p,
    )
    .unwrap_err();
    assert!(e.to_string().contains("prune was cancelled"), "{e}");
}

#[test]
fn restore_checks_its_target_first_and_brings_back_the_bytes() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let s = run(&disk, &store, &opts(Mode::Auto));
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.img");
    let mut o = RestoreOptions {
        snapshot: s.snapshot.clone(),
        target: "relative.img".into(),
        force: false,
        workers: 1,
        in_use: vec![],
        confine: None,
    };
    assert_eq!(
        restore_op::check(&store, &mut o.clone())
            .unwrap_err()
            .kind(),
        ErrorKind::Invalid
    );
    std::fs::write(&target, b"precious").unwrap();
    o.target = target.clone();
    let e = restore_op::check(&store, &mut o.clone()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    let mut busy = o.clone();
    busy.force = true;
    busy.in_use = vec![("vm".into(), target.clone())];
    let e = restore_op::check(&store, &mut busy).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("image of attached disk vm"), "{e}");
    let mut gone = o.clone();
    gone.snapshot = "vm@20200101T000000Z".parse().unwrap();
    assert_eq!(
        restore_op::check(&store, &mut gone).unwrap_err().kind(),
        ErrorKind::NotFound
    );

    o.force = true;
    restore_op::check(&store, &mut o.clone()).unwrap();
    let r = restore_op::restore(&store, &o, &Progress::default()).unwrap();
    assert_eq!(r.stats.bytes, SIZE);
    let mut want = vec![0u8; SIZE as usize];
    disk.file.read_exact_at(&mut want, 0).unwrap();
    assert!(std::fs::read(&target).unwrap() == want);
}

#[test]
fn a_confined_restore_writes_only_below_its_folders_and_never_through_links() {
    use std::os::unix::fs::PermissionsExt;
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let s = run(&disk, &store, &opts(Mode::Auto));
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("restores");
    let outside = dir.path().join("etc");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let confine = restore_op::Confinement {
        dirs: vec![allowed.clone()],
        devices: vec![],
    };
    let mut o = RestoreOptions {
        snapshot: s.snapshot.clone(),
        target: outside.join("passwd"),
        force: true,
        workers: 1,
        in_use: vec![],
        confine: Some(confine),
    };
    let e = restore_op::check(&store, &mut o.clone()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Forbidden, "{e}");
    assert!(e.to_string().contains("restore_dirs"), "{e}");
    // A way out through `..` or a linked folder is resolved first.
    o.target = allowed.join("../etc/passwd");
    assert_eq!(
        restore_op::check(&store, &mut o.clone())
            .unwrap_err()
            .kind(),
        ErrorKind::Forbidden
    );
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    o.target = allowed.join("link/passwd");
    assert_eq!(
        restore_op::check(&store, &mut o.clone())
            .unwrap_err()
            .kind(),
        ErrorKind::Forbidden
    );
    // A link planted at the target or at TARGET.partial is never followed.
    let victim = outside.join("victim");
    std::fs::write(&victim, b"root's file").unwrap();
    std::os::unix::fs::symlink(&victim, allowed.join("out.img.partial")).unwrap();
    o.target = allowed.join("out.img");
    o.force = false;
    let mut ok = o.clone();
    restore_op::check(&store, &mut ok).unwrap();
    restore_op::restore(&store, &ok, &Progress::default()).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file");
    let md = std::fs::symlink_metadata(allowed.join("out.img")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert!(!allowed.join("out.img.partial").exists());
    std::os::unix::fs::symlink(&victim, allowed.join("l.img")).unwrap();
    o.target = allowed.join("l.img");
    o.force = true;
    let mut l = o.clone();
    restore_op::check(&store, &mut l).unwrap();
    let e = restore_op::restore(&store, &l, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's file");
    // A folder as the target fails before anything is written.
    std::fs::create_dir(allowed.join("d")).unwrap();
    o.target = allowed.join("d");
    let mut d = o.clone();
    restore_op::check(&store, &mut d).unwrap();
    restore_op::restore(&store, &d, &Progress::default()).unwrap_err();
    assert!(!allowed.join("d.partial").exists());
}

#[test]
fn restore_of_a_snapshot_with_a_lost_chunk_fails_as_damaged() {
    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let s = run(&disk, &store, &opts(Mode::Auto));
    let m = store.manifest(&s.snapshot).unwrap();
    let index = crate::store::pages::read_index(&store, &m).unwrap();
    store.lose_chunk(&index[1]);
    let dir = tempfile::tempdir().unwrap();
    let o = RestoreOptions {
        snapshot: s.snapshot,
        target: dir.path().join("out.img"),
        force: false,
        workers: 1,
        in_use: vec![],
        confine: None,
    };
    let e = restore_op::restore(&store, &o, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
}

#[test]
fn quota_limits_are_validated_and_usage_counts_each_disk() {
    let mut l = Limits::default();
    l.disks.insert("vm".into(), 0);
    assert_eq!(l.validate().unwrap_err().kind(), ErrorKind::Invalid);
    l.disks.insert("vm".into(), 10);
    l.disks.insert("../x".into(), 10);
    assert_eq!(l.validate().unwrap_err().kind(), ErrorKind::Invalid);
    l.disks.remove("../x");
    l.validate().unwrap();

    let (disk, store) = (FakeDisk::new(), MemoryStore::new());
    let r = run(&disk, &store, &opts(Mode::Auto));
    let (list, _) = store.list(None).unwrap();
    let u = super::quota::usage_report(&list, &l);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].bytes, r.stats.bytes_stored);
    assert_eq!(u[0].limit, Some(10));
}

#[test]
fn gc_refuses_a_threshold_over_100_percent() {
    let store = MemoryStore::new();
    let o = crate::store::GcOptions {
        min_garbage_percent: 101,
    };
    let e = snapshots::gc(&store, &o, &Progress::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
}

#[test]
fn a_store_accepts_a_complete_snapshot_and_refuses_one_missing_a_chunk() {
    use crate::digest::ChunkDigest;
    use crate::store::local::LocalStore;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let acceptor = super::accept::Acceptor::default();
    let mut z = zstd::bulk::Compressor::new(1).unwrap();
    let a = ChunkDigest::of(b"a");
    let page = crate::format::index::encode_page(&[a]);
    let p = ChunkDigest::of(&page);
    let (fp, _) = crate::format::chunk::encode(&page, &mut z);
    store.put_chunk(&p, &fp).unwrap();
    let m = crate::store::conformance::manifest("vm", 10, vec![p]);
    let no = Default::default();
    let e = acceptor.accept(&store, &m, &no).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Damaged, "{e}");
    assert!(e.to_string().contains("upload it first"), "{e}");
    assert!(store.list(None).unwrap().0.is_empty());

    let (fa, _) = crate::format::chunk::encode(b"a", &mut z);
    store.put_chunk(&a, &fa).unwrap();
    acceptor.accept(&store, &m, &no).unwrap();
    assert_eq!(store.list(None).unwrap().0.len(), 1);
    let again = acceptor.accept(&store, &m, &no).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Conflict);

    let mut bad = crate::store::conformance::manifest("vm", 20, vec![p, p]);
    bad.parent = None;
    assert_eq!(
        acceptor.accept(&store, &bad, &no).unwrap_err().kind(),
        ErrorKind::Invalid
    );
}
