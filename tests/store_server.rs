//! Several agents backing up to one store server (`novabackup store serve`):
//! real processes on loopback, real NBD writes, restores on the other host.

#[path = "harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;

struct StoreServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    tls: bool,
}

impl StoreServer {
    fn start(dir: &Path) -> StoreServer {
        Self::start_tls(dir, false)
    }

    fn start_tls(dir: &Path, tls: bool) -> StoreServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = StoreServer {
            dir: dir.to_path_buf(),
            port,
            child: None,
            tls,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        self.child = Some(
            Command::new(BIN)
                .args(["store", "serve", "--dir"])
                .arg(&self.dir)
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(if self.tls { &["--tls"][..] } else { &[][..] })
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || !self.token_file().exists()
        {
            assert!(Instant::now() < deadline, "the store server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn fingerprint(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.fingerprint"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn token_file(&self) -> PathBuf {
        self.dir.join("server.token")
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An agent in `dir` whose store is this server.
    fn agent(&self, dir: &Path) -> Agent {
        let url = self.url();
        let token = self.token_file();
        let fp = if self.tls {
            self.fingerprint()
        } else {
            String::new()
        };
        let mut args = vec![
            "--store",
            &url,
            "--store-token-file",
            token.to_str().unwrap(),
        ];
        if self.tls {
            args.extend(["--store-fingerprint", &fp]);
        }
        Agent::start_with(dir, "uring", &args)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn backup(a: &Agent, disk: &str) -> serde_json::Value {
    serde_json::from_str(&a.ok(&["backup", disk, "--json"])).unwrap()
}

/// The job `id` as `jobs --json` lists it.
fn job(a: &Agent, id: &str) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_str(&a.ok(&["jobs", "--json"])).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap()
        .clone()
}

fn du(p: &Path) -> u64 {
    let out = run("du", &["-sb", p.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn two_hosts_share_a_store_dedup_across_hosts_and_restore_each_others_disks() {
    let t = tempdir();
    let server = StoreServer::start(&t.path().join("store"));
    let a = server.agent(&t.path().join("host-a"));
    let b = server.agent(&t.path().join("host-b"));

    // Host A: a disk, written through NBD, backed up.
    let img_a = t.path().join("a.img");
    random_file(&img_a, 32 << 20, 11);
    a.attach("web", &img_a, &[]);
    run(
        "qemu-io",
        &["-f", "raw", &a.uri("web"), "-c", "write -P 0x5a 1M 3M"],
    );
    let first = backup(&a, "web");
    assert_eq!(first["kind"], "full", "{first}");
    let after_a = du(&server.dir);

    // Host B: a clone of that disk (a VM made from the same template).
    let img_b = t.path().join("b.img");
    std::fs::copy(&img_a, &img_b).unwrap();
    b.attach("web-clone", &img_b, &[]);
    let clone = backup(&b, "web-clone");
    let size = 32u64 << 20;
    let sent = clone["stats"]["bytes_new"].as_u64().unwrap();
    assert!(
        sent <= size / 10,
        "host B sent {sent} bytes for a clone of {size} already in the store"
    );
    let grew = du(&server.dir) - after_a;
    assert!(
        grew <= size / 10,
        "the store grew by {grew} bytes for a clone"
    );

    // Both hosts see both disks; each restores the other's.
    let listed = a.ok(&["snapshots"]);
    assert!(
        listed.contains("web-clone@") && listed.contains("web@"),
        "{listed}"
    );
    let snap = |v: &serde_json::Value| v["snapshot"].as_str().unwrap().to_string();
    a.restore_and_compare(&snap(&clone), &t.path().join("b-on-a.img"), &img_b);
    b.restore_and_compare(&snap(&first), &t.path().join("a-on-b.img"), &img_a);

    // An incremental from A goes to the same store and restores on B.
    run(
        "qemu-io",
        &["-f", "raw", &a.uri("web"), "-c", "write -P 0x77 20M 64k"],
    );
    let inc = backup(&a, "web");
    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert!(inc["stats"]["bytes_new"].as_u64().unwrap() <= 64 << 10);
    b.restore_and_compare(&snap(&inc), &t.path().join("inc-on-b.img"), &img_a);
    assert!(b.ok(&["verify", "--all"]).contains(": ok"));
}

#[test]
fn a_store_server_killed_mid_backup_fails_it_cleanly_and_the_next_backup_succeeds() {
    let t = tempdir();
    let mut server = StoreServer::start(&t.path().join("store"));
    let a = server.agent(&t.path().join("host"));
    let img = t.path().join("disk.img");
    random_file(&img, 256 << 20, 12);
    a.attach("vm", &img, &[]);
    let started: serde_json::Value =
        serde_json::from_str(&a.ok(&["backup", "vm", "--no-wait", "--json"])).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    // Kill the server once data is flowing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = job(&a, &id);
        assert_eq!(
            j["state"], "running",
            "the backup ended before the kill: {j}"
        );
        if j["done"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let j = job(&a, &id);
        if j["state"] != "running" {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "the backup hangs without its store"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ended["state"], "failed", "{ended}");
    let why = ended["error"].as_str().unwrap();
    assert!(why.contains("store server"), "{why}");
    // Nothing was lost: the bits are back, and the server comes back clean.
    server.spawn();
    let next = backup(&a, "vm");
    assert_eq!(next["kind"], "full", "no snapshot existed yet: {next}");
    let out = t.path().join("out.img");
    a.ok(&[
        "restore",
        next["snapshot"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    compare_images(&out, &img);
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "no partial snapshot: {list}"
    );
}

#[test]
fn agents_reach_a_tls_store_server_by_its_pinned_fingerprint_only() {
    let t = tempdir();
    let server = StoreServer::start_tls(&t.path().join("store"), true);
    assert!(server.fingerprint().starts_with("sha256:"));
    let a = server.agent(&t.path().join("host"));
    let img = t.path().join("disk.img");
    random_file(&img, 8 << 20, 61);
    a.attach("vm", &img, &[]);
    let r = backup(&a, "vm");
    let out = t.path().join("out.img");
    a.ok(&[
        "restore",
        r["snapshot"].as_str().unwrap(),
        "--to",
        out.to_str().unwrap(),
    ]);
    compare_images(&out, &img);

    // The wrong fingerprint: the agent refuses to start, and says why.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let o = Command::new(BIN)
        .args([
            "--data-dir",
            t.path().join("other").to_str().unwrap(),
            "agent",
        ])
        .args(["--nbd-listen", "none", "--api-listen", "127.0.0.1:0"])
        .args(["--store", &server.url(), "--store-fingerprint", &wrong])
        .args(["--store-token-file", server.token_file().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not the pinned"), "{err}");
    // Plain HTTP to the TLS port gets nowhere.
    assert!(
        ureq::get(&format!("http://127.0.0.1:{}/store/v1/health", server.port))
            .call()
            .is_err()
    );
}
