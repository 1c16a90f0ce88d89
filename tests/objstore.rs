//! Agents backing up to an S3 store on a real 3-node Garage cluster
//! (replication factor 3): real processes, real NBD writes, nodes
//! stopped and killed under them.

#[path = "garage/cluster.rs"]
mod cluster;
#[path = "harness.rs"]
mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use cluster::Cluster;
use harness::*;

fn agent(c: &Cluster, dir: &Path, prefix: &str) -> Agent {
    Agent::start_with(
        dir,
        "pread",
        &[
            "--store",
            &format!("s3://nova/{prefix}"),
            "--store-credentials",
            c.env().to_str().unwrap(),
        ],
    )
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn backup(a: &Agent, disk: &str) -> serde_json::Value {
    serde_json::from_str(&a.ok(&["backup", disk, "--json"])).unwrap()
}

fn snap(v: &serde_json::Value) -> String {
    v["snapshot"].as_str().unwrap().to_string()
}

fn job(a: &Agent, id: &str) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_str(&a.ok(&["jobs", "--json"])).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap()
        .clone()
}

#[test]
fn backups_restores_and_verify_work_on_garage_with_a_node_stopped() {
    let t = tempdir();
    let c = Cluster::start(4500);
    let a = agent(&c, &t.path().join("host"), "site-a");
    let img = t.path().join("disk.img");
    random_file(&img, 48 << 20, 81);
    a.attach("vm", &img, &[]);
    let full = backup(&a, "vm");
    assert_eq!(full["kind"], "full", "{full}");
    let at_full = t.path().join("at-full.img");
    std::fs::copy(&img, &at_full).unwrap();

    // Node 1, the first endpoint the agent tries, goes away.
    c.kill(1);
    run(
        "qemu-io",
        &["-f", "raw", &a.uri("vm"), "-c", "write -P 0x6b 5M 1M"],
    );
    let inc = backup(&a, "vm");
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert!(
        inc["stats"]["bytes_new"].as_u64().unwrap() <= 2 << 20,
        "{inc}"
    );
    a.restore_and_compare(&snap(&full), &t.path().join("full.img"), &at_full);
    a.restore_and_compare(&snap(&inc), &t.path().join("inc.img"), &img);
    let v = a.ok(&["verify", "--all"]);
    assert!(v.contains(": ok") && !v.contains("FAIL"), "{v}");

    // The secret key never shows: not in the log, the status or the
    // listings; and nobody else may read the metadata cache.
    let secret = std::fs::read_to_string(c.env())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("AWS_SECRET_ACCESS_KEY=").map(str::to_string))
        .unwrap();
    for text in [
        a.log(),
        a.ok(&["status", "--json"]),
        a.ok(&["snapshots", "--json"]),
    ] {
        assert!(!text.contains(&secret), "the secret key leaked: {text}");
    }
    let cache = a.state().join("s3-cache");
    let toc = walk(&cache)
        .into_iter()
        .find(|p| p.is_file())
        .expect("a cached toc");
    for target in [&cache, &toc] {
        let o = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .args(["cat", target.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!o.status.success(), "nobody read {}", target.display());
    }
    let mode = std::fs::metadata(toc.parent().unwrap().parent().unwrap())
        .unwrap()
        .permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o077, 0, "the cache folder is private");

    // A second host opening the store with a node down sees both.
    let b = agent(&c, &t.path().join("other"), "site-a");
    let listed = b.ok(&["snapshots"]);
    assert!(
        listed.contains(&snap(&full)) && listed.contains(&snap(&inc)),
        "{listed}"
    );
    c.revive(1);
}

#[test]
fn a_node_or_the_agent_killed_during_a_backup_leaves_no_partial_snapshot() {
    let t = tempdir();
    let c = Cluster::start(4600);
    let dir = t.path().join("host");
    let mut a = agent(&c, &dir, "kills");
    let img = t.path().join("disk.img");
    random_file(&img, 192 << 20, 82);
    a.attach("vm", &img, &[]);

    // The agent dies mid-backup: nothing is visible, the next backup is
    // a full one and restores byte for byte.
    let started: serde_json::Value =
        serde_json::from_str(&a.ok(&["backup", "vm", "--no-wait", "--json"])).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&a, &id)["done"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no progress: {}", job(&a, &id));
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill9();
    a.restart();
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "partial snapshot: {list}"
    );

    // A node dies mid-backup: the backup goes on through the others (two
    // of three replicas still make a quorum) or fails; either way every
    // snapshot listed restores exactly.
    let started: serde_json::Value =
        serde_json::from_str(&a.ok(&["backup", "vm", "--no-wait", "--json"])).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&a, &id)["done"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no progress: {}", job(&a, &id));
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill(1);
    let deadline = Instant::now() + Duration::from_secs(180);
    let ended = loop {
        let j = job(&a, &id);
        if j["state"] != "running" {
            break j;
        }
        assert!(Instant::now() < deadline, "the backup hangs: {j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    let list = list.as_array().unwrap();
    if ended["state"] == "succeeded" {
        assert_eq!(list.len(), 1, "{list:?}");
    } else {
        assert!(
            list.is_empty(),
            "a failed backup left {list:?}; it ended {ended}"
        );
        backup(&a, "vm");
    }
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    a.restore_and_compare(&id, &t.path().join("out.img"), &img);
    c.revive(1);
}

/// Runs `novabackup sync ARGS --json` and returns its report.
fn sync(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .arg("sync")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn sync_moves_only_what_the_target_lacks_resumes_after_a_kill_and_restores_there() {
    let t = tempdir();
    let c = Cluster::start(4700);
    let env = c.env();
    let env = env.to_str().unwrap();
    // Site A: an agent on a local store.
    let a = Agent::start(&t.path().join("a"), "pread");
    let local = t.path().join("a/state/store");
    let local = local.to_str().unwrap();
    let img = t.path().join("disk.img");
    random_file(&img, 48 << 20, 83);
    a.attach("vm", &img, &[]);
    let full = backup(&a, "vm");
    let at_full = t.path().join("at-full.img");
    std::fs::copy(&img, &at_full).unwrap();
    let to = [
        "--from",
        local,
        "--to",
        "s3://nova/site-b",
        "--to-credentials",
        env,
    ];

    // Interrupted: a slow sync is killed part-way; the rerun does not send
    // again what had arrived.
    let mut slow = std::process::Command::new(BIN)
        .arg("sync")
        .args(to)
        .args(["--bwlimit", "12M", "--checkpoint", "4M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    slow.kill().unwrap();
    slow.wait().unwrap();
    let first = sync(&to);
    assert_eq!(first["copied"].as_array().unwrap().len(), 1, "{first}");
    let sent = first["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 40 << 20,
        "the rerun sent {sent} bytes of a 48 MiB disk: it resent what arrived"
    );

    // An incremental: about the changed bytes move, not more.
    run(
        "qemu-io",
        &["-f", "raw", &a.uri("vm"), "-c", "write -P 0x3c 7M 1M"],
    );
    let inc = backup(&a, "vm");
    let r = sync(&to);
    assert_eq!(r["copied"][0], inc["snapshot"], "{r}");
    let sent = r["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= (1 << 20) * 11 / 10,
        "an incremental of 1 MiB sent {sent} bytes"
    );
    let again = sync(&to);
    assert_eq!(
        (again["bytes_sent"].as_u64(), again["present"].as_u64()),
        (Some(0), Some(2))
    );

    // Site B restores both byte for byte.
    let b = agent(&c, &t.path().join("b"), "site-b");
    b.restore_and_compare(&snap(&full), &t.path().join("b-full.img"), &at_full);
    b.restore_and_compare(&snap(&inc), &t.path().join("b-inc.img"), &img);
    let v = b.ok(&["verify", "--all"]);
    assert!(v.contains(": ok") && !v.contains("FAIL"), "{v}");

    // Pull back into an empty folder, one disk's newest only, at a limit.
    let back = t.path().join("back");
    let started = Instant::now();
    let r = sync(&[
        "--from",
        "s3://nova/site-b",
        "--from-credentials",
        env,
        "--to",
        back.to_str().unwrap(),
        "--disk",
        "vm",
        "--newest",
        "1",
        "--bwlimit",
        "16M",
    ]);
    assert_eq!(r["copied"][0], inc["snapshot"], "{r}");
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    let sent = r["bytes_sent"].as_u64().unwrap() as f64;
    assert!(
        started.elapsed().as_secs_f64() >= sent / (16 << 20) as f64 * 0.9,
        "{sent} bytes in {:?} at 16 MiB/s",
        started.elapsed()
    );

    // The target's own retention and collection after a sync: both
    // snapshots arrive, the older goes, and what only it held is freed.
    let kept = t.path().join("kept");
    let r = sync(&[
        "--from",
        "s3://nova/site-b",
        "--from-credentials",
        env,
        "--to",
        kept.to_str().unwrap(),
        "--prune",
        "--keep-last",
        "1",
        "--gc",
    ]);
    assert_eq!(r["copied"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["pruned"]["removed"], 1, "{r}");
    assert!(r["gc"]["chunks_removed"].as_u64().unwrap() >= 16, "{r}");
    let on_kept = Agent::start_with(
        &t.path().join("k"),
        "pread",
        &["--store", kept.to_str().unwrap()],
    );
    let listed: serde_json::Value =
        serde_json::from_str(&on_kept.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    on_kept.restore_and_compare(&snap(&inc), &t.path().join("k-inc.img"), &img);
}

#[test]
fn the_agent_syncs_to_a_named_site_as_a_job_that_cancels_resumes_and_runs_on_schedule() {
    let t = tempdir();
    let c = Cluster::start(4750);
    let conf = t.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "site = \"home\"\nsites = {{ dr = {{ store = \"s3://nova/dr\", store_credentials = \"{}\" }} }}\n",
            c.env().display()
        ),
    )
    .unwrap();
    let a = Agent::start_with(
        &t.path().join("a"),
        "pread",
        &["--config", conf.to_str().unwrap()],
    );
    let img = t.path().join("disk.img");
    random_file(&img, 24 << 20, 84);
    a.attach("vm", &img, &[]);
    let full = backup(&a, "vm");

    let o = a.cli(&["sync", "--site", "nowhere"]);
    let why = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && why.contains("no site \"nowhere\""),
        "{why}"
    );

    // Slowed down, cancelled part-way: the job says so, and the next run
    // sends only the rest.
    let started: serde_json::Value = serde_json::from_str(&a.ok(&[
        "sync",
        "--site",
        "dr",
        "--bwlimit",
        "4M",
        "--no-wait",
        "--json",
    ]))
    .unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(2));
    a.ok(&["job", "cancel", &id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ended = loop {
        let j = job(&a, &id);
        if j["state"] != "running" {
            break j;
        }
        assert!(Instant::now() < deadline, "the cancel is not heard: {j}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ended["state"], "cancelled", "{ended}");
    let r: serde_json::Value =
        serde_json::from_str(&a.ok(&["sync", "--site", "dr", "--json"])).unwrap();
    assert_eq!(r["copied"][0], full["snapshot"], "{r}");
    assert!(r["bytes_sent"].as_u64().unwrap() < 20 << 20, "resent: {r}");

    // A schedule runs it too (every second here).
    run(
        "qemu-io",
        &["-f", "raw", &a.uri("vm"), "-c", "write -P 0x44 2M 64k"],
    );
    let inc = backup(&a, "vm");
    a.ok(&[
        "schedule",
        "add",
        "sync",
        "--site",
        "dr",
        "--cron",
        "* * * * * *",
        "--id",
        "dr",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let dr = agent(&c, &t.path().join("dr"), "dr");
    loop {
        let listed = dr.ok(&["snapshots"]);
        if listed.contains(&snap(&inc)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduled sync did not run: {listed}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    a.ok(&["schedule", "remove", "dr"]);
    dr.restore_and_compare(&snap(&inc), &t.path().join("dr.img"), &img);
}
