//! Backups and restores through the real agent, with real clients writing.

#[path = "harness.rs"]
mod harness;

use std::path::Path;

use harness::*;

fn backup(a: &Agent, disk: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", disk, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&a.ok(&args)).unwrap()
}

fn restore(a: &Agent, id: &str, to: &Path) {
    a.ok(&["restore", id, "--to", to.to_str().unwrap()]);
}

/// Restores write whole aligned runs with direct I/O and everything else
/// (the odd tail, runs cut by zero chunks) through the page cache; both
/// must land, on a file and on a block device.
#[test]
fn restores_to_a_block_device_and_an_odd_sized_file_are_exact() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    // 5 MiB and 3 sectors plus 100 bytes: the last chunk is short and
    // unaligned; zero ranges split the runs of non-zero chunks.
    let size = (5 << 20) + 3 * 512 + 100;
    random_file(&img, size, 21);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0u8; 3 << 16], 1 << 20).unwrap();
        f.write_all_at(&vec![0u8; 1 << 16], 3 << 20).unwrap();
    }
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let id = backup(&a, "vm", &[])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    a.restore_and_compare(&id, &t.path().join("out.img"), &img);

    // A device larger than the image, full of 0xff: zero chunks must be
    // written as zeroes there, and the bytes past the image left alone.
    let backing = t.path().join("backing.img");
    std::fs::write(&backing, vec![0xffu8; 6 << 20]).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.0.to_str().unwrap();
    let e = a.cli(&["restore", &id, "--to", dev]);
    assert!(
        !e.status.success(),
        "a device is overwritten only with --force"
    );
    a.ok(&["restore", &id, "--to", dev, "--force"]);
    let got = std::fs::read(&lo.0).unwrap();
    assert_eq!(got.len(), 6 << 20);
    assert!(
        got[..size] == std::fs::read(&img).unwrap()[..],
        "device differs from the image"
    );
    assert!(got[size..].iter().all(|&b| b == 0xff));
}

#[test]
fn chain_of_six_backups_restores_every_point_in_time() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 48 << 20, 1);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let mut points = Vec::new();
    for round in 0..6u64 {
        if round > 0 {
            // Random writes of assorted sizes and patterns through NBD.
            let mut cmds = Vec::new();
            for i in 0..12u64 {
                let x = (round * 7919 + i * 104_729) % (47 << 20);
                let len = [4096, 65536, 100_000, 1 << 20][(i % 4) as usize];
                cmds.push(format!(
                    "aio_write -P {} {} {}",
                    (round * 16 + i) % 255 + 1,
                    x,
                    len
                ));
            }
            cmds.push("aio_flush".into());
            if round == 3 {
                cmds.push("write -z 0 2M".into());
            }
            let mut args = vec!["-f".to_string(), "raw".to_string()];
            for c in cmds {
                args.push("-c".into());
                args.push(c);
            }
            args.push(a.uri("vm"));
            run(
                "qemu-io",
                &args.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            );
        }
        let copy = t.path().join(format!("at{round}.img"));
        std::fs::copy(&img, &copy).unwrap();
        let r = backup(&a, "vm", &[]);
        let kind = r["kind"].as_str().unwrap();
        assert_eq!(kind, if round == 0 { "full" } else { "incremental" }, "{r}");
        if round > 0 {
            // Only what changed is read.
            assert!(r["stats"]["bytes_read"].as_u64().unwrap() < 12 << 20, "{r}");
        }
        points.push((r["snapshot"].as_str().unwrap().to_string(), copy));
    }
    let list: serde_json::Value =
        serde_json::from_str(&a.ok(&["snapshots", "vm", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 6);
    for (id, copy) in &points {
        let out = t.path().join(format!("restored-{id}.img"));
        restore(&a, id, &out);
        compare_images(&out, copy);
    }
    // --full re-reads everything but stores nothing new.
    let r = backup(&a, "vm", &["--full"]);
    assert_eq!(r["kind"], "full");
    assert_eq!(r["stats"]["chunks_new"], 0, "{r}");
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    // Restore refuses to overwrite without --force.
    let o = a.cli(&[
        "restore",
        &points[0].0,
        "--to",
        points[0].1.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}

/// A writer sweeps a region block by block with generation numbers while
/// a backup runs. A point-in-time image shows one generation g on a prefix
/// of the region and g-1 on the rest (one block may be torn: the write in
/// flight at the checkpoint).
fn assert_point_in_time(data: &[u8], start: usize, blocks: usize) {
    let gens: Vec<u8> = (0..blocks)
        .map(|b| {
            let blk = &data[start + b * 65536..start + (b + 1) * 65536];
            if blk.iter().all(|x| *x == blk[0]) {
                blk[0]
            } else {
                0
            }
        })
        .collect();
    let torn = gens.iter().filter(|g| **g == 0).count();
    assert!(torn <= 1, "more than one torn block: {gens:?}");
    // Generations cycle 1..=250 (next(g) = g % 250 + 1), so "newer" is the
    // one that follows the other in the cycle, not the larger number.
    let next = |g: u8| g % 250 + 1;
    let mut vals: Vec<u8> = gens.iter().copied().filter(|g| *g != 0).collect();
    vals.sort_unstable();
    vals.dedup();
    let (newer, older) = match vals[..] {
        [one] => (one, one),
        [a, b] if next(a) == b => (b, a),
        [a, b] if next(b) == a => (a, b),
        _ => panic!("blocks from more than two consecutive generations: {gens:?}"),
    };
    let split = gens
        .iter()
        .position(|g| *g == older && older != newer)
        .unwrap_or(blocks);
    for (i, g) in gens.iter().enumerate() {
        if *g == 0 {
            continue;
        }
        let want = if i < split { newer } else { older };
        assert_eq!(
            *g, want,
            "block {i} is from another point in time: {gens:?}"
        );
    }
}

#[test]
fn backups_are_point_in_time_while_a_client_writes() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 96 << 20, 2);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    // The swept region is at the end: the backup reads it last, after the
    // writer has overwritten it many times.
    let start: u64 = 80 << 20;
    let blocks = 128u64;
    let script = format!(
        "import time\nstop = time.time() + 60\ng = 1\nwhile time.time() < stop and not __import__('os').path.exists('{stop}'):\n    b = bytes([g]) * 65536\n    for i in range({blocks}):\n        h.pwrite(b, {start} + i * 65536)\n    g = g % 250 + 1\n",
        stop = t.path().join("stop").display()
    );
    // Generation 250 everywhere first, so "g-1" exists from the start.
    run("nbdsh", &["-u", &a.uri("vm"), "-c", &format!("b = bytes([250]) * 65536\nfor i in range({blocks}):\n    h.pwrite(b, {start} + i * 65536)\n")]);
    let mut writer = peer("nbdsh")
        .args(["-u", &a.uri("vm"), "-c", &script])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let full = backup(&a, "vm", &[]);
    let inc = backup(&a, "vm", &[]);
    std::fs::write(t.path().join("stop"), b"").unwrap();
    writer.wait().unwrap();
    assert_eq!(full["kind"], "full");
    assert_eq!(inc["kind"], "incremental");
    let copies = full["copy_before_write_blocks"].as_u64().unwrap()
        + inc["copy_before_write_blocks"].as_u64().unwrap();
    assert!(
        copies > 0,
        "the writer never raced the backup; the test proves nothing: {full} {inc}"
    );
    for r in [&full, &inc] {
        let out = t.path().join("out.img");
        restore(&a, r["snapshot"].as_str().unwrap(), &out);
        let data = std::fs::read(&out).unwrap();
        assert_point_in_time(&data, start as usize, blocks as usize);
        // Outside the swept region the disk never changed.
        let orig = {
            let p = t.path().join("orig.img");
            random_file(&p, 96 << 20, 2);
            std::fs::read(&p).unwrap()
        };
        assert!(data[..start as usize] == orig[..start as usize]);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn kill_9_during_a_backup_loses_nothing() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 256 << 20, 3);
    let mut a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm", &[]);
    // Writes the next backups must carry.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 1M 3M",
            "-c",
            "write -P 0x43 200M 1M",
            &a.uri("vm"),
        ],
    );
    let before = a.cbt("vm")["dirty_blocks"].as_u64().unwrap();
    assert_eq!(before, 64);
    // A full backup reads 256 MiB; kill the agent once it has started.
    let job = a
        .ok(&["backup", "vm", "--full", "--no-wait"])
        .trim()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let jobs: serde_json::Value = serde_json::from_str(&a.ok(&["jobs", "--json"])).unwrap();
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == job.as_str())
            .unwrap()
            .clone();
        if j["done"].as_u64().unwrap() > 0 || j["state"] != "running" {
            assert_eq!(
                j["state"], "running",
                "the backup finished before the kill: {j}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    a.kill9();
    a.restart();
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "a partial snapshot is visible: {list}"
    );
    assert_eq!(
        a.cbt("vm")["dirty_blocks"].as_u64().unwrap(),
        before,
        "the frozen bits were not merged back"
    );
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    let next = backup(&a, "vm", &[]);
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(next["parent"], first["snapshot"]);
    let out = t.path().join("out.img");
    restore(&a, next["snapshot"].as_str().unwrap(), &out);
    compare_images(&out, &img);
}

#[test]
fn a_corrupted_chunk_is_named_by_verify_and_stops_restore() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 8 << 20, 4);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    let r = backup(&a, "vm", &[]);
    let id = r["snapshot"].as_str().unwrap();
    // Damage one data chunk: the first one in the largest pack (index
    // pages are stored after the data, so the first chunk of a pack is data).
    let packs = t.path().join("a/state/store/packs");
    let mut files: Vec<_> = walk(&packs);
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = files.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let o = a.cli(&["verify", id]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("{id}: DAMAGED")), "{out}");
    let bad: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chunk "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(bad.len(), 1, "exactly the damaged chunk is named: {out}");
    let name = bad[0].to_string();
    let target = t.path().join("restored.img");
    let o = a.cli(&["restore", id, "--to", target.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&name) && err.contains("was not completed"),
        "{err}"
    );
    assert!(!target.exists());
    assert!(!t.path().join("restored.img.partial").exists());
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path());
        }
    }
    v
}

#[test]
fn a_full_store_fails_cleanly_and_keeps_the_dirty_bits() {
    let t = tempdir();
    let mnt = t.path().join("small");
    let _fs = Tmpfs::mount(&mnt, "6m");
    let img = t.path().join("disk.img");
    random_file(&img, 4 << 20, 5);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut a = Agent::start_with(
        &t.path().join("a"),
        "uring",
        &["--store", mnt.join("store").to_str().unwrap()],
    );
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm", &[]);
    // 12 MiB of new incompressible data cannot fit in what is left.
    let src = t.path().join("noise.img");
    random_file(&src, 12 << 20, 6);
    run("nbdcopy", &[src.to_str().unwrap(), &a.uri("vm"), "--flush"]);
    let o = a.cli(&["backup", "vm"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("out of space"), "{err}");
    assert_eq!(a.cbt("vm")["dirty_blocks"], 192, "the dirty bits were lost");
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(a.ok(&["verify", "--all"]).contains(": ok"));
    // After a restart, what the failed backup staged is cleaned up.
    a.stop();
    a.restart();
    let used = walk(&mnt.join("store/tmp")).len();
    assert_eq!(used, 0);
    let _ = first;
}

#[test]
fn status_shows_the_store_and_each_disks_last_backup() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 4 << 20, 21);
    let other = t.path().join("other.img");
    sparse_file(&other, 8 << 20);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    a.attach("idle", &other, &[]);
    let r = backup(&a, "vm", &[]);
    let out = a.ok(&["status"]);
    assert!(
        out.contains("store:") && out.contains("1 snapshots"),
        "{out}"
    );
    let vm = out.lines().find(|l| l.starts_with("vm ")).unwrap();
    assert!(vm.contains("(full)") && vm.contains("trusted"), "{out}");
    let idle = out.lines().find(|l| l.starts_with("idle ")).unwrap();
    assert!(idle.contains("never"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&a.ok(&["status", "--json"])).unwrap();
    assert_eq!(j["store"]["snapshots"], 1);
    let disks = j["disks"].as_array().unwrap();
    let vm = disks.iter().find(|d| d["disk"]["name"] == "vm").unwrap();
    assert_eq!(vm["last_backup"]["id"], r["snapshot"]);
    assert!(j["store"]["bytes_used"].as_u64().unwrap() > 0);
}

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    let bash = std::process::Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let bash = String::from_utf8(bash.stdout).unwrap();
    assert!(bash.contains("_novabackup()") && bash.contains("restore"));
    let man = std::process::Command::new(BIN).arg("man").output().unwrap();
    assert!(man.status.success());
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(
        man.contains(".TH novabackup 1") && man.contains("Exit codes"),
        "{man}"
    );
    let o = std::process::Command::new(BIN)
        .args(["completions", "nosuchshell"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "bad usage exits 2");
}

#[test]
fn metrics_count_nbd_requests_backups_and_the_store() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 4 << 20, 22);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &a.uri("vm"),
            "-c",
            "write -P 1 0 64k",
            "-c",
            "read 0 128k",
        ],
    );
    backup(&a, "vm", &[]);
    let url = format!("http://{}/metrics", a.api);
    match ureq::get(&url).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("metrics without a token: {other:?}"),
    }
    let token = std::fs::read_to_string(t.path().join("a/state/api.token")).unwrap();
    let r = ureq::get(&url)
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .unwrap();
    assert!(r.content_type().starts_with("text/plain"));
    let m = r.into_string().unwrap();
    let value = |line: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {line} in:\n{m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("novabackup_nbd_requests_total{disk=\"vm\",command=\"write\"}") >= 1.0);
    assert!(value("novabackup_nbd_requests_total{disk=\"vm\",command=\"read\"}") >= 1.0);
    assert!(value("novabackup_nbd_written_bytes_total{disk=\"vm\"}") >= 65536.0);
    assert_eq!(
        value("novabackup_jobs_total{kind=\"backup\",state=\"succeeded\"}"),
        1.0
    );
    assert_eq!(
        value("novabackup_backup_read_bytes_total"),
        (4 << 20) as f64
    );
    assert_eq!(
        value("novabackup_job_duration_seconds_count{kind=\"backup\"}"),
        1.0
    );
    assert_eq!(value("novabackup_store_snapshots"), 1.0);
    assert!(value("novabackup_store_chunks") >= 64.0);
    assert_eq!(value("novabackup_cbt_dirty_bytes{disk=\"vm\"}"), 0.0);
    let reads =
        value("novabackup_nbd_request_duration_seconds_count{disk=\"vm\",command=\"read\"}");
    assert!(reads >= 1.0, "{m}");
    assert_eq!(
        value("novabackup_nbd_request_duration_seconds_bucket{disk=\"vm\",command=\"read\",le=\"+Inf\"}"),
        reads
    );
    // Every sample line belongs to a declared metric.
    let declared: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    for l in m.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(
            declared.iter().any(|d| name.starts_with(d)),
            "undeclared sample {l}"
        );
    }
}

#[test]
fn a_long_poll_on_a_job_answers_when_the_job_ends() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 64 << 20, 29);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let job: serde_json::Value =
        serde_json::from_str(&a.ok(&["backup", "vm", "--no-wait", "--json"])).unwrap();
    let token = std::fs::read_to_string(t.path().join("a/state/api.token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let url = |id: &str, q: &str| format!("http://{}/api/v1/jobs/{id}{q}", a.api);
    let id = job["id"].as_str().unwrap();
    // The longest wait is 30 s: an answer well before it came from the
    // job's end, and the job has ended.
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let got: serde_json::Value = ureq::get(&url(id, "?wait_ms=30000"))
            .set("Authorization", &auth)
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        assert_eq!(got["state"], "succeeded", "{got}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    }
    for q in ["?wait_ms=soon", "?wait_ms=-1", "?wait=5"] {
        match ureq::get(&url(id, q)).set("Authorization", &auth).call() {
            Err(ureq::Error::Status(400, r)) => {
                let e: serde_json::Value = r.into_json().unwrap();
                assert_eq!(e["error"]["code"], "bad_request", "{q}: {e}");
            }
            other => panic!("{q}: {other:?}"),
        }
    }
    match ureq::get(&url("job-99", "?wait_ms=30000"))
        .set("Authorization", &auth)
        .call()
    {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("unknown job: {other:?}"),
    }
}

#[test]
fn job_progress_streams_as_server_sent_events_until_the_job_ends() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 32 << 20, 23);
    let a = Agent::start(&t.path().join("a"), "uring");
    a.attach("vm", &img, &[]);
    let job: serde_json::Value =
        serde_json::from_str(&a.ok(&["backup", "vm", "--no-wait", "--json"])).unwrap();
    let token = std::fs::read_to_string(t.path().join("a/state/api.token")).unwrap();
    let url = format!(
        "http://{}/api/v1/jobs/{}/events",
        a.api,
        job["id"].as_str().unwrap()
    );
    let r = ureq::get(&url)
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .unwrap();
    assert_eq!(r.content_type(), "text/event-stream");
    let body = r.into_string().unwrap();
    let events: Vec<(String, serde_json::Value)> = body
        .split("\n\n")
        .filter(|e| e.contains("data:"))
        .map(|e| {
            let kind = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (kind.to_string(), serde_json::from_str(data).unwrap())
        })
        .collect();
    let (last, job) = events.last().expect("at least the end event");
    assert_eq!(last, "end", "{body}");
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["done"], job["total"]);
    assert!(events[..events.len() - 1]
        .iter()
        .all(|(k, _)| k == "progress"));
    let missing = format!("http://{}/api/v1/jobs/job-99/events", a.api);
    match ureq::get(&missing)
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .call()
    {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("unknown job: {other:?}"),
    }
}
