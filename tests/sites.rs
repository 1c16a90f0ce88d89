//! Two sites in network namespaces: site A is a host with a local store,
//! site B a 3-node Garage cluster in its own namespace, reached over a
//! veth pair the test makes. Replication crosses that link, survives it
//! being cut mid-transfer, and both sites restore byte for byte.

#[path = "garage/cluster.rs"]
mod cluster;
#[path = "harness.rs"]
mod harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::Cluster;
use harness::*;

/// A network namespace joined to the host by a veth pair:
/// host 10.77.TAG.1/30, namespace 10.77.TAG.2/30.
struct Link {
    ns: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Link {
    fn new(tag: u8) -> Link {
        let id = std::process::id() % 100_000;
        let l = Link {
            ns: format!("nbsite{tag}-{id}"),
            host_if: format!("nbh{tag}-{id}"),
        };
        let peer = format!("nbn{tag}-{id}");
        ip(&["netns", "add", &l.ns]);
        ip(&[
            "link", "add", &l.host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &l.ns]);
        ip(&[
            "addr",
            "add",
            &format!("10.77.{tag}.1/30"),
            "dev",
            &l.host_if,
        ]);
        ip(&["link", "set", &l.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut v = vec!["netns", "exec", &l.ns, "ip"];
            v.extend_from_slice(args);
            ip(&v);
        };
        inside(&["addr", "add", &format!("10.77.{tag}.2/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        l
    }

    fn set(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn replication_to_another_site_survives_a_cut_link_and_both_sites_restore() {
    let t = tempdir();
    let link = Link::new(1);
    let b = Cluster::start_in(&link.ns, "10.77.1.2", 4800);
    let env = b.env();
    let env = env.to_str().unwrap();

    // Disk "payroll" may only be kept at site A.
    let rules = t.path().join("a.toml");
    std::fs::write(
        &rules,
        "site = \"site-a\"\n[placement]\npayroll = [\"site-a\"]\n",
    )
    .unwrap();
    let a = Agent::start_with(
        &t.path().join("a"),
        "pread",
        &["--config", rules.to_str().unwrap()],
    );
    let img = t.path().join("disk.img");
    random_file(&img, 40 << 20, 91);
    a.attach("vm", &img, &[]);
    let payroll = t.path().join("payroll.img");
    random_file(&payroll, 8 << 20, 92);
    a.attach("payroll", &payroll, &[]);
    a.ok(&["backup", "payroll"]);
    let full: serde_json::Value = serde_json::from_str(&a.ok(&["backup", "vm", "--json"])).unwrap();
    let at_full = t.path().join("at-full.img");
    std::fs::copy(&img, &at_full).unwrap();
    run(
        "qemu-io",
        &["-f", "raw", &a.uri("vm"), "-c", "write -P 0x21 3M 1M"],
    );
    let inc: serde_json::Value = serde_json::from_str(&a.ok(&["backup", "vm", "--json"])).unwrap();

    let store_a = t.path().join("a/state/store");
    let args = [
        "sync",
        "--from",
        store_a.to_str().unwrap(),
        "--to",
        "s3://nova/site-b",
        "--to-credentials",
        env,
        "--checkpoint",
        "2M",
        "--placement",
        rules.to_str().unwrap(),
        "--to-site",
        "site-b",
        "--json",
    ];
    let mut syncing = Command::new(BIN)
        .args(args)
        .args(["--bwlimit", "5M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        syncing.try_wait().unwrap().is_none(),
        "the sync ended before the cut"
    );
    link.set(false);
    std::thread::sleep(Duration::from_secs(4));
    link.set(true);
    let started = Instant::now();
    let out = syncing.wait_with_output().unwrap();
    // TCP carries on once the link is back; had a request timed out, the
    // rerun below finishes the job without sending again what arrived.
    let rerun = Command::new(BIN).args(args).output().unwrap();
    assert!(
        rerun.status.success(),
        "the sync after the cut failed: {}\nfirst run: {}",
        String::from_utf8_lossy(&rerun.stderr),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(r["refused"][0], "payroll", "{r}");
    if out.status.success() {
        assert_eq!(r["bytes_sent"], 0, "{r}");
    } else {
        assert!(r["bytes_sent"].as_u64().unwrap() < 36 << 20, "resent: {r}");
    }
    eprintln!(
        "first run ok: {}, then {:?} to finish; rerun {r}",
        out.status.success(),
        started.elapsed()
    );

    // Site B restores both snapshots byte for byte, as site A does.
    let on_b = Agent::start_with(
        &t.path().join("b"),
        "pread",
        &["--store", "s3://nova/site-b", "--store-credentials", env],
    );
    let id = |v: &serde_json::Value| v["snapshot"].as_str().unwrap().to_string();
    on_b.restore_and_compare(&id(&full), &t.path().join("b-full.img"), &at_full);
    on_b.restore_and_compare(&id(&inc), &t.path().join("b-inc.img"), &img);
    a.restore_and_compare(&id(&inc), &t.path().join("a-inc.img"), &img);

    // Asked for by name, payroll is refused outright.
    let named = Command::new(BIN)
        .args([
            "sync",
            "--from",
            store_a.to_str().unwrap(),
            "--to",
            "s3://nova/site-b",
        ])
        .args(["--to-credentials", env, "--disk", "payroll"])
        .args([
            "--placement",
            rules.to_str().unwrap(),
            "--to-site",
            "site-b",
        ])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&named.stderr);
    assert!(
        !named.status.success() && why.contains("placement forbids"),
        "{why}"
    );
    // An agent at site B with the same rules refuses to back payroll up.
    let rules_b = t.path().join("b.toml");
    std::fs::write(
        &rules_b,
        "site = \"site-b\"\n[placement]\npayroll = [\"site-a\"]\n",
    )
    .unwrap();
    let at_b = Agent::start_with(
        &t.path().join("b2"),
        "pread",
        &[
            "--config",
            rules_b.to_str().unwrap(),
            "--store",
            "s3://nova/site-b",
            "--store-credentials",
            env,
        ],
    );
    let copy = t.path().join("payroll-b.img");
    std::fs::copy(&payroll, &copy).unwrap();
    at_b.attach("payroll", &copy, &[]);
    let o = at_b.cli(&["backup", "payroll"]);
    let why = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && why.contains("placement forbids"),
        "{why}"
    );

    // Every replica of every object at site B: none holds a byte of
    // payroll, while the same scan finds the disk that was copied.
    let blobs = files(b.dir());
    let found = |img: &std::path::Path| {
        let data = std::fs::read(img).unwrap();
        (0..8)
            .filter(|i| {
                let at = (i * data.len() / 8) + 4096;
                let marker = &data[at..at + 256];
                blobs.iter().any(|f| f.windows(256).any(|w| w == marker))
            })
            .count()
    };
    assert!(found(&at_full) >= 6, "the scan finds what was copied");
    assert_eq!(found(&payroll), 0, "site B holds bytes of payroll");
}

/// The contents of every file under `dir`.
fn files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push(b);
        }
    }
    out
}
