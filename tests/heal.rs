//! A store that heals, through the real binary: a full store recovers as
//! soon as there is room (no restart), damaged chunks are set aside by
//! verify and stored again by the next backup or `novabackup repair`, a
//! commit never names a chunk the store lacks, and a pack whose table of
//! contents is damaged is reported.

#[path = "harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

use harness::*;

fn backup(a: &Agent, disk: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", disk, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&a.ok(&args)).unwrap()
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path());
        }
    }
    v
}

/// The largest pack of the store (data; index pages go last, so its first
/// chunk is data).
fn largest_pack(store: &Path) -> PathBuf {
    let mut files = walk(&store.join("packs"));
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    files.last().unwrap().clone()
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn after_enospc_the_next_backup_and_gc_succeed_without_a_restart() {
    let t = tempdir();
    let mnt = t.path().join("mnt");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 31);
    let store = mnt.join("store");
    let a = Agent::start_with(
        &t.path().join("a"),
        "uring",
        &["--store", store.to_str().unwrap()],
    );
    a.attach("vm", &img, &[]);
    backup(&a, "vm", &[]);
    let noise = t.path().join("noise.img");
    random_file(&noise, 6 << 20, 32);
    run(
        "nbdcopy",
        &[noise.to_str().unwrap(), &a.uri("vm"), "--flush"],
    );
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![1u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len - (2 << 20)).unwrap();
    }
    let o = a.cli(&["backup", "vm"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of space"));
    let o = a.cli(&["gc"]);
    let _ = o; // may fail or succeed: the store is full
               // Room again: the same agent backs up and collects.
    std::fs::remove_file(&filler).unwrap();
    let r = backup(&a, "vm", &[]);
    assert_eq!(r["kind"], "incremental", "{r}");
    a.ok(&["gc"]);
    assert!(
        walk(&store.join("tmp")).is_empty(),
        "the failed backup's staging stayed: {:?}",
        walk(&store.join("tmp"))
    );
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    let want = t.path().join("want.img");
    std::fs::copy(&img, &want).unwrap();
    a.restore_and_compare(
        r["snapshot"].as_str().unwrap(),
        &t.path().join("r.img"),
        &want,
    );
}

#[test]
fn a_damaged_chunk_is_stored_again_by_the_next_backup() {
    let t = tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 33);
    let mut a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm", &[]);
    let id = first["snapshot"].as_str().unwrap().to_string();
    flip(&largest_pack(&a.state().join("store")), 100);

    // Before: a full backup reused the damaged chunk.
    let o = a.cli(&["verify", &id]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("DAMAGED") && out.contains("set aside"),
        "{out}"
    );
    // Set aside across a restart too.
    a.restart();
    let next = backup(&a, "vm", &[]);
    assert_eq!(next["kind"], "full", "{next}");
    assert!(
        next["reason"]
            .as_str()
            .unwrap_or("")
            .contains("failed verification"),
        "{next}"
    );
    let nid = next["snapshot"].as_str().unwrap();
    // The new snapshot is whole, and so is the old one: the same chunk
    // was stored again.
    let v = a.ok(&["verify", "--all"]);
    assert!(!v.contains("DAMAGED"), "{v}");
    a.restore_and_compare(nid, &t.path().join("r1.img"), &img);
    a.restore_and_compare(&id, &t.path().join("r2.img"), &img);
    a.restart();
    assert!(!a.ok(&["verify", "--all"]).contains("DAMAGED"));
}

#[test]
fn repair_heals_from_the_disk_and_names_what_it_cannot() {
    let t = tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 34);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm", &[]);
    let id = first["snapshot"].as_str().unwrap().to_string();
    let old = t.path().join("old.img");
    std::fs::copy(&img, &old).unwrap();
    // The guest overwrites everything: the old data is gone from the disk.
    let noise = t.path().join("noise.img");
    random_file(&noise, 8 << 20, 35);
    run(
        "nbdcopy",
        &[noise.to_str().unwrap(), &a.uri("vm"), "--flush"],
    );
    let second = backup(&a, "vm", &[]);
    let sid = second["snapshot"].as_str().unwrap().to_string();
    // Damage one chunk of each snapshot.
    let mut packs = walk(&a.state().join("store/packs"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    for p in &packs {
        if std::fs::metadata(p).unwrap().len() > (1 << 20) {
            flip(p, 100);
        }
    }
    let o = a.cli(&["repair", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    assert!(!o.status.success(), "repair claimed success: {r}");
    assert!(
        r["repaired"]
            .as_array()
            .unwrap()
            .contains(&sid.clone().into()),
        "{r}"
    );
    assert!(
        r["still_damaged"]
            .as_array()
            .unwrap()
            .contains(&id.clone().into()),
        "{r}"
    );
    a.restore_and_compare(&sid, &t.path().join("r.img"), &noise);
    let _ = old;
}

#[test]
fn a_commit_never_names_a_lost_chunk_and_a_damaged_table_is_reported() {
    let t = tempdir();
    let (ia, ib) = (t.path().join("a.img"), t.path().join("b.img"));
    random_file(&ia, 8 << 20, 36);
    std::fs::copy(&ia, &ib).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&ib).unwrap();
        f.write_all_at(&[7u8; 64 << 10], (8 << 20) - (64 << 10))
            .unwrap();
    }
    let mut a = Agent::start(&t.path().join("a"), "pread");
    a.attach("a", &ia, &[]);
    a.attach("b", &ib, &[]);
    backup(&a, "a", &[]);
    let data_packs = walk(&a.state().join("store/packs"));
    // Disk b holds the same data but for its last chunk: its snapshot
    // adds that chunk and its index page, in packs of their own.
    backup(&a, "b", &[]);
    assert!(walk(&a.state().join("store/packs")).len() > data_packs.len());
    // Damage the tables of contents of the data packs: after a restart
    // their chunks are lost to the store; b's index is not.
    for p in &data_packs {
        let len = std::fs::metadata(p).unwrap().len() as usize;
        flip(p, len - 40);
    }
    a.restart();
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 64k", &a.uri("b")],
    );
    // The incremental names the lost chunks it did not read: refused.
    let o = a.cli(&["backup", "b"]);
    assert!(
        !o.status.success(),
        "a snapshot naming lost chunks was committed"
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not in the store"), "{e}");
    let list: serde_json::Value =
        serde_json::from_str(&a.ok(&["snapshots", "b", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Verify says why.
    let o = a.cli(&["verify", "--all"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("store damaged:") && out.contains(".pack"),
        "{out}"
    );
    // The next backup reads everything and is whole.
    let next = backup(&a, "b", &[]);
    assert_eq!(next["kind"], "full", "{next}");
    a.restore_and_compare(
        next["snapshot"].as_str().unwrap(),
        &t.path().join("r.img"),
        &ib,
    );
}
