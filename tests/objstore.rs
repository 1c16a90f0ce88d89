//! Agents backing up to an S3 store on a real 3-node Garage cluster
//! (replication factor 3): real processes, real NBD writes, nodes
//! stopped and killed under them.

#[path = "harness.rs"]
mod harness;
#[path = "garage/cluster.rs"]
mod cluster;

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
    assert!(inc["stats"]["bytes_new"].as_u64().unwrap() <= 2 << 20, "{inc}");
    a.restore_and_compare(&snap(&full), &t.path().join("full.img"), &at_full);
    a.restore_and_compare(&snap(&inc), &t.path().join("inc.img"), &img);
    let v = a.ok(&["verify", "--all"]);
    assert!(v.contains(": ok") && !v.contains("FAIL"), "{v}");

    // A second host opening the store with a node down sees both.
    let b = agent(&c, &t.path().join("other"), "site-a");
    let listed = b.ok(&["snapshots"]);
    assert!(listed.contains(&snap(&full)) && listed.contains(&snap(&inc)), "{listed}");
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
    assert_eq!(list.as_array().unwrap().len(), 0, "partial snapshot: {list}");

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
        assert!(list.is_empty(), "a failed backup left {list:?}; it ended {ended}");
        backup(&a, "vm");
    }
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    a.restore_and_compare(&id, &t.path().join("out.img"), &img);
    c.revive(1);
}
