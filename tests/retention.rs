//! The store looking after itself, through the real agent: retention and
//! prune, protection, garbage collection (while a backup runs, and
//! interrupted by a crash), schedules, quotas, verify state and the CBT
//! audit catching a write made behind the proxy's back.

#[path = "harness.rs"]
mod harness;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use harness::*;

fn json(a: &Agent, args: &[&str]) -> serde_json::Value {
    let mut v = args.to_vec();
    v.push("--json");
    serde_json::from_str(&a.ok(&v)).unwrap()
}

fn backup(a: &Agent, disk: &str) -> String {
    let r = json(a, &["backup", disk]);
    r["snapshot"].as_str().unwrap().to_string()
}

fn snapshot_ids(a: &Agent, disk: &str) -> Vec<String> {
    json(a, &["snapshots", disk])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// Writes `len` bytes of `byte` at `off` through NBD.
fn nbd_write(a: &Agent, disk: &str, byte: u8, off: u64, len: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P {byte} {off} {len}"),
            &a.uri(disk),
        ],
    );
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An agent with disk "vm": a random image of `size` bytes.
fn agent_with_disk(size: usize, seed: u64) -> (tempfile::TempDir, std::path::PathBuf, Agent) {
    let t = tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, size, seed);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    (t, img, a)
}

#[test]
fn prune_keeps_what_the_policy_says_and_gc_frees_the_rest() {
    let (t, img, a) = agent_with_disk(16 << 20, 7);
    let mut ids = Vec::new();
    for i in 0..4u8 {
        if i > 0 {
            // Each snapshot gets 2 MiB of its own data.
            nbd_write(&a, "vm", 10 + i, u64::from(i) << 21, 2 << 20);
        }
        ids.push(backup(&a, "vm"));
    }
    let last = t.path().join("last.img");
    std::fs::copy(&img, &last).unwrap();

    // Policies through the CLI: the built-in default until one is set.
    assert!(a.ok(&["retention", "list"]).contains("built-in default"));
    a.ok(&[
        "retention",
        "set",
        "tight",
        "--disk",
        "vm",
        "--keep-last",
        "1",
    ]);
    let bad = a.cli(&["retention", "set", "broken", "--keep-within", "soon"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a duration"));
    let p = json(&a, &["retention", "list"]);
    assert_eq!(p[0]["rules"]["keep_last"], 1, "{p}");

    // Protect the second snapshot; delete then refuses it.
    a.ok(&["snapshot", "protect", &ids[1]]);
    let del = a.cli(&["snapshot", "delete", &ids[1]]);
    assert!(String::from_utf8_lossy(&del.stderr).contains("protected"));

    // Dry run: every snapshot with its verdict and reasons; nothing goes.
    let out = a.ok(&["prune", "vm", "--dry-run"]);
    for (id, verdict) in [
        (&ids[0], "would remove"),
        (&ids[1], "keep"),
        (&ids[2], "would remove"),
        (&ids[3], "keep"),
    ] {
        let line = out.lines().find(|l| l.contains(id.as_str())).unwrap();
        assert!(line.contains(verdict), "{line}");
    }
    assert!(
        out.contains("protected") && out.contains("newest snapshot") && out.contains("last 1/1")
    );
    assert_eq!(snapshot_ids(&a, "vm").len(), 4);

    let r = json(&a, &["prune", "vm"]);
    assert_eq!(r["removed"], 2, "{r}");
    assert_eq!(snapshot_ids(&a, "vm"), [ids[1].clone(), ids[3].clone()]);

    // Only packs wholly garbage at 100%: here every pack with garbage
    // holds live chunks too, so nothing moves.
    let g = json(&a, &["gc", "--min-garbage", "100"]);
    assert_eq!(g["packs_rewritten"], 0, "{g}");
    assert!(g["packs_below_threshold"].as_u64().unwrap() > 0, "{g}");
    let before = json(&a, &["status"])["store"]["bytes_used"]
        .as_u64()
        .unwrap();
    let g = json(&a, &["gc"]);
    assert!(
        g["chunks_removed"].as_u64().unwrap() >= 32,
        "2 x 2 MiB of 64 KiB chunks: {g}"
    );
    let after = json(&a, &["status"])["store"]["bytes_used"]
        .as_u64()
        .unwrap();
    assert!(after + (3 << 19) < before, "{before} -> {after}: {g}");
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    a.restore_and_compare(&ids[3], &t.path().join("r3.img"), &last);

    // Policies through the API too: update and delete.
    a.ok(&[
        "retention",
        "set",
        "tight",
        "--disk",
        "vm",
        "--keep-daily",
        "3",
    ]);
    let p = json(&a, &["retention", "list"]);
    assert_eq!(p[0]["rules"]["keep_daily"], 3, "{p}");
    a.ok(&["retention", "delete", "tight"]);
    assert!(a.ok(&["retention", "list"]).contains("built-in default"));
}

#[test]
fn gc_while_a_backup_runs_keeps_what_the_backup_uses() {
    let t = tempdir();
    let img = t.path().join("a.img");
    random_file(&img, 96 << 20, 11);
    let twin = t.path().join("b.img");
    std::fs::copy(&img, &twin).unwrap();
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("a", &img, &[]);
    a.attach("b", &twin, &[]);
    // Disk a's data goes into the store, then its snapshot is deleted:
    // every chunk is garbage, until disk b's backup finds it present.
    let s = backup(&a, "a");
    a.ok(&["snapshot", "delete", &s]);
    let j = json(&a, &["backup", "b", "--no-wait"]);
    let job = j["id"].as_str().unwrap().to_string();
    let mut runs = 0;
    loop {
        let g = json(&a, &["gc"]);
        runs += 1;
        let state = json(&a, &["jobs"])
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == job.as_str())
            .unwrap()["state"]
            .clone();
        if state != "running" {
            assert_eq!(state, "succeeded", "{}", a.log());
            let _ = g;
            break;
        }
    }
    assert!(runs >= 1);
    let b = snapshot_ids(&a, "b");
    // Once more after the backup: nothing it references may go.
    json(&a, &["gc"]);
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    a.restore_and_compare(&b[0], &t.path().join("rb.img"), &twin);
}

#[test]
fn a_crash_in_the_middle_of_gc_loses_nothing_and_the_next_gc_finishes() {
    let t = tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, 48 << 20, 3);
    let dir = t.path().join("a");
    let a = Agent::start(&dir, "pread");
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm");
    // Rewrite most of the disk: the first snapshot's data becomes garbage
    // once it is deleted, spread over several packs.
    nbd_write(&a, "vm", 0x5a, 0, 40 << 20);
    let second = backup(&a, "vm");
    let want = t.path().join("want.img");
    std::fs::copy(&img, &want).unwrap();
    a.ok(&["snapshot", "delete", &first]);
    drop(a);

    for point in ["gc-before-delete", "gc-mid-delete"] {
        let mut a = Agent::start_env(&dir, &[], &[("NOVABACKUP_FAULT", point)]);
        let o = a.cli(&["gc"]);
        assert!(!o.status.success(), "the agent died mid-GC");
        let st = a.wait_exit();
        assert!(!st.success(), "{point}: {st}");
        assert!(a.log().contains(point), "{}", a.log());
        a.env.clear();
        a.restart();
        assert!(a.ok(&["verify", "--all"]).contains(": ok"), "{point}");
        a.restore_and_compare(&second, &t.path().join(format!("{point}.img")), &want);
    }
    let a = Agent::start(&dir, "pread");
    let g = json(&a, &["gc"]);
    assert!(
        g["packs_deleted"].as_u64().unwrap() + g["packs_rewritten"].as_u64().unwrap() > 0,
        "{g}"
    );
    let again = json(&a, &["gc"]);
    assert_eq!(again["chunks_removed"], 0, "{again}");
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    a.restore_and_compare(&second, &t.path().join("r2.img"), &want);
}

#[test]
fn schedules_run_on_time_once_after_downtime_and_show_in_status() {
    let t = tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 5);
    let dir = t.path().join("a");
    let mut a = Agent::start(&dir, "pread");
    a.attach("vm", &img, &[]);
    // Every 2 seconds (a seconds field).
    let out = a.ok(&[
        "schedule",
        "add",
        "backup",
        "--disk",
        "vm",
        "--cron",
        "*/2 * * * * *",
        "--id",
        "often",
    ]);
    assert!(out.contains("next run"), "{out}");
    let bad = a.cli(&[
        "schedule",
        "add",
        "gc",
        "--disk",
        "vm",
        "--cron",
        "0 3 * * *",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("whole store"));
    let bad = a.cli(&["schedule", "add", "backup", "--cron", "0 25 * * *"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not valid"));
    wait_for("two scheduled backups", Duration::from_secs(30), || {
        snapshot_ids(&a, "vm").len() >= 2
    });
    let st = a.ok(&["status"]);
    assert!(
        st.contains("often") && !st.contains("not scheduled"),
        "{st}"
    );
    // Pause it; no more backups.
    a.ok(&[
        "schedule",
        "set",
        "often",
        "backup",
        "--disk",
        "vm",
        "--cron",
        "*/2 * * * * *",
        "--disabled",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    let n = snapshot_ids(&a, "vm").len();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(snapshot_ids(&a, "vm").len(), n, "paused");
    a.ok(&["schedule", "remove", "often"]);

    // A yearly verify whose last run was two years ago: missed while the
    // agent was down, it runs once at start.
    a.ok(&[
        "schedule",
        "add",
        "verify",
        "--cron",
        "0 0 1 1 *",
        "--id",
        "yearly",
    ]);
    a.stop();
    let path = a.state().join("schedules.json");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let two_years_ago = 1_700_000_000u64;
    s[0]["anchor_unix"] = two_years_ago.into();
    s[0]["last_run_unix"] = two_years_ago.into();
    std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
    a.restart();
    wait_for("the missed verify", Duration::from_secs(20), || {
        json(&a, &["jobs"])
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "verify" && j["state"] == "succeeded")
    });
    std::thread::sleep(Duration::from_secs(2));
    let verifies = json(&a, &["jobs"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "verify")
        .count();
    assert_eq!(verifies, 1, "once, not once per missed year");
    let l = json(&a, &["schedule", "list"]);
    assert!(l[0]["next_run"].as_str().unwrap() > "2027", "{l}");
    // The verify recorded its verdict in the manifests.
    let snaps = json(&a, &["snapshots", "vm"]);
    for s in snaps.as_array().unwrap() {
        assert_eq!(s["verified"]["ok"], true, "{s}");
    }
    let r = json(&a, &["verify", "--all", "--skip-verified-within", "1d"]);
    assert_eq!(
        r["skipped_recently_verified"].as_array().unwrap().len(),
        snaps.as_array().unwrap().len(),
        "{r}"
    );
}

#[test]
fn quotas_stop_backups_early_or_midway_and_keep_the_dirty_bits() {
    let (t, img, a) = agent_with_disk(32 << 20, 9);
    // Mid-way: random data does not compress; 4 MiB is reached early.
    a.ok(&["quota", "set", "--disk", "vm", "4M"]);
    let o = a.cli(&["backup", "vm"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("quota of disk vm") && e.contains("quota set"),
        "{e}"
    );
    assert!(snapshot_ids(&a, "vm").is_empty());
    let cbt = a.cbt("vm");
    assert!(!cbt["checkpoint_active"].as_bool().unwrap(), "{cbt}");
    // Metrics and status show the limit.
    let m = a.metrics();
    assert!(
        m.contains("novabackup_disk_quota_bytes{disk=\"vm\"} 4194304"),
        "{m}"
    );
    a.ok(&["quota", "clear", "--disk", "vm"]);
    let id = backup(&a, "vm");
    a.restore_and_compare(&id, &t.path().join("r.img"), &img);

    // Early: a store already over its limit refuses before reading.
    a.ok(&["quota", "set", "1M"]);
    assert!(a.ok(&["status"]).contains("quota"));
    nbd_write(&a, "vm", 1, 0, 1 << 20);
    let dirty = a.cbt("vm")["dirty_blocks"].as_u64().unwrap();
    let o = a.cli(&["backup", "vm"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("store quota is reached"), "{e}");
    assert_eq!(
        a.cbt("vm")["dirty_blocks"].as_u64().unwrap(),
        dirty,
        "the dirty bits stay"
    );
    a.ok(&["quota", "clear"]);
    let r = json(&a, &["backup", "vm"]);
    assert_eq!(r["kind"], "incremental", "{r}");
}

#[test]
fn an_audit_catches_a_write_made_behind_the_proxys_back() {
    let t = tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, 16 << 20, 13);
    let a = Agent::start_with(&t.path().join("a"), "pread", &["--audit-every", "3"]);
    a.attach("vm", &img, &[]);
    backup(&a, "vm");
    // A clean audit on request: nothing differs.
    nbd_write(&a, "vm", 3, 1 << 20, 65536);
    let r = json(&a, &["backup", "vm", "--audit"]);
    assert_eq!(r["audit"]["mismatches"], 0, "{r}");
    assert!(
        r["audit"]["chunks_compared"].as_u64().unwrap() >= 250,
        "{r}"
    );

    // One write through the proxy, one straight into the image file.
    nbd_write(&a, "vm", 4, 2 << 20, 65536);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xee; 4096], (9 << 20) + 8192).unwrap();
    f.sync_all().unwrap();
    for byte in [6, 7] {
        let inc = json(&a, &["backup", "vm"]);
        assert_eq!(inc["kind"], "incremental", "{inc}");
        assert!(inc["audit"].is_null(), "{inc}");
        nbd_write(&a, "vm", byte, 4 << 20, 65536);
    }
    // Every 3rd backup audits (two incrementals since the last full
    // read): this one.
    let o = a.cli(&["backup", "vm"]);
    assert!(!o.status.success(), "missed writes fail the command");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("CHANGE TRACKING MISSED WRITES"), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("1 differed"), "{out}");
    assert!(a.log().contains("CHANGE TRACKING MISSED WRITES"));
    let snaps = json(&a, &["snapshots", "vm"]);
    let last = snaps.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["audit"]["mismatches"], 1, "{last}");
    assert_eq!(last["audit"]["mismatch_offsets"][0], 9 << 20, "{last}");
    // The snapshot holds what was read, the hidden write included.
    a.restore_and_compare(last["id"].as_str().unwrap(), &t.path().join("r.img"), &img);
    let m = a.metrics();
    assert!(m.contains("novabackup_cbt_audit_mismatches_total 1"), "{m}");
    assert!(m.contains("novabackup_cbt_audits_total 2"), "{m}");
}

#[test]
fn gc_on_a_full_disk_fails_cleanly_and_loses_nothing() {
    let t = tempdir();
    let mnt = t.path().join("mnt");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 21);
    let dir = t.path().join("a");
    let store = mnt.join("store");
    let mut a = Agent::start_with(&dir, "pread", &["--store", store.to_str().unwrap()]);
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm");
    let noise = t.path().join("noise.img");
    random_file(&noise, 6 << 20, 22);
    run(
        "nbdcopy",
        &[noise.to_str().unwrap(), &a.uri("vm"), "--flush"],
    );
    let second = backup(&a, "vm");
    let want = t.path().join("want.img");
    std::fs::copy(&img, &want).unwrap();
    a.ok(&["snapshot", "delete", &first]);

    // Fill what is left: the collection cannot write all its new packs.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![1u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        // Room for part of the live chunks it must move, not all: it fails
        // half-way through the sweep.
        let len = f.metadata().unwrap().len();
        f.set_len(len - (3 << 19)).unwrap();
    }
    let o = a.cli(&["gc"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("out of space"), "{e}");
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    a.restore_and_compare(&second, &t.path().join("r1.img"), &want);

    // With room again the same agent collects, and nothing was lost, in
    // memory or on disk.
    std::fs::remove_file(&filler).unwrap();
    let g = json(&a, &["gc"]);
    // 8 MiB live (and index pages) stay; the 6 MiB the noise replaced go.
    let after = g["bytes_after"].as_u64().unwrap();
    assert!(after < 9 << 20, "{g}");
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    a.stop();
    a.restart();
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    a.restore_and_compare(&second, &t.path().join("r2.img"), &want);
}
