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
        self.agent_as(dir, &self.token_file())
    }

    /// A tenant token file for `tenant`, made with `store token create`.
    fn tenant_token(&self, tenant: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec!["store", "token", "create", tenant, "--json", "--dir"];
        let dir = self.dir.to_str().unwrap().to_string();
        args.push(&dir);
        args.extend_from_slice(extra);
        let o = Command::new(BIN).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let f = self.dir.with_extension(format!("{tenant}.token"));
        std::fs::write(&f, v["token"].as_str().unwrap()).unwrap();
        f
    }

    /// An agent in `dir` using the store token in `token`.
    fn agent_as(&self, dir: &Path, token: &Path) -> Agent {
        let url = self.url();
        let token = token.to_path_buf();
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

/// A raw store request with `token`: (status, body).
fn store_req(
    s: &StoreServer,
    token: &Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let tok = std::fs::read_to_string(token).unwrap();
    let r = ureq::request(method, &format!("{}{path}", s.url()))
        .set("Authorization", &format!("Bearer {}", tok.trim()))
        .send_bytes(body);
    match r {
        Ok(r) => {
            let st = r.status();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut v).unwrap();
            (st, v)
        }
        Err(ureq::Error::Status(st, r)) => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut v).unwrap();
            (st, v)
        }
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn tenants_of_a_store_server_never_meet() {
    let t = tempdir();
    let server = StoreServer::start(&t.path().join("store"));
    // Before tenants: the original shared token's agent keeps its backups.
    let img_old = t.path().join("old.img");
    random_file(&img_old, 4 << 20, 40);
    let old = server.agent(&t.path().join("old"));
    old.attach("legacy", &img_old, &[]);
    let legacy = backup(&old, "legacy");

    let h1_tok = server.tenant_token("host1", &[]);
    let h2_tok = server.tenant_token("host2", &["--quota", "6M"]);
    let h1 = server.agent_as(&t.path().join("h1"), &h1_tok);
    let h2 = server.agent_as(&t.path().join("h2"), &h2_tok);
    let (i1, i2) = (t.path().join("1.img"), t.path().join("2.img"));
    random_file(&i1, 4 << 20, 41);
    random_file(&i2, 4 << 20, 42);
    // The same disk name on both hosts.
    h1.attach("vm", &i1, &[]);
    h2.attach("vm", &i2, &[]);
    let s1 = backup(&h1, "vm");
    let s2 = backup(&h2, "vm");
    let id1 = s1["snapshot"].as_str().unwrap().to_string();

    // host2's quota: 6 MiB of which about 4 are used.
    let big = t.path().join("big.img");
    random_file(&big, 4 << 20, 43);
    run(
        "nbdcopy",
        &[big.to_str().unwrap(), &h2.uri("vm"), "--flush"],
    );
    let o = h2.cli(&["backup", "vm"]);
    assert!(!o.status.success(), "host2 passed its quota");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("quota"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Each lists only its own.
    let l1: serde_json::Value = serde_json::from_str(&h1.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(l1.as_array().unwrap().len(), 1, "{l1}");
    assert_eq!(l1[0]["id"], s1["snapshot"]);
    let l2 = h2.ok(&["snapshots"]);
    assert!(!l2.contains("legacy"), "{l2}");

    // host2's retention and prune never touch host1's disk vm.
    h2.ok(&["retention", "set", "all", "--keep-last", "1"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 3 0 64k", &h2.uri("vm")],
    );
    backup(&h2, "vm");
    h2.ok(&["prune"]);
    h1.restore_and_compare(&id1, &t.path().join("r1.img"), &i1);

    // host2 cannot read, delete or lock host1's snapshot, nor learn its chunks.
    let m = std::fs::read_to_string(h1.state().join("agent.json")).unwrap();
    let _ = m;
    let (st, _) = store_req(
        &server,
        &h2_tok,
        "GET",
        &format!("/store/v1/snapshots/{id1}"),
        b"",
    );
    assert!(st == 404, "host2 read host1's manifest: {st}");
    let (st, _) = store_req(
        &server,
        &h2_tok,
        "DELETE",
        &format!("/store/v1/snapshots/{id1}"),
        b"",
    );
    assert!(st == 404, "host2 deleted host1's snapshot: {st}");
    let (st, body) = store_req(
        &server,
        &h1_tok,
        "GET",
        &format!("/store/v1/snapshots/{id1}"),
        b"",
    );
    assert_eq!(st, 200);
    let man: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let page = man["pages"][0].as_str().unwrap();
    let (st, _) = store_req(
        &server,
        &h2_tok,
        "GET",
        &format!("/store/v1/chunks/{page}"),
        b"",
    );
    assert_eq!(st, 404, "host2 read host1's index page");
    let (st, _) = store_req(
        &server,
        &h1_tok,
        "GET",
        &format!("/store/v1/chunks/{page}"),
        b"",
    );
    assert_eq!(st, 200);
    let (st, ans) = store_req(&server, &h2_tok, "POST", "/store/v1/missing", &hex(page));
    assert_eq!(
        (st, ans),
        (200, vec![1]),
        "missing told host2 of host1's data"
    );
    let (st, ans) = store_req(&server, &h1_tok, "POST", "/store/v1/missing", &hex(page));
    assert_eq!((st, ans), (200, vec![0]));

    // Protection holds on the server; gc is for admins.
    h1.ok(&["snapshot", "protect", &id1]);
    let (st, _) = store_req(
        &server,
        &h1_tok,
        "DELETE",
        &format!("/store/v1/snapshots/{id1}"),
        b"",
    );
    assert_eq!(
        st, 409,
        "a protected snapshot was deleted through the server"
    );
    let (st, _) = store_req(&server, &h1_tok, "POST", "/store/v1/gc", b"");
    assert_eq!(st, 403);
    let (st, _) = store_req(&server, &server.token_file(), "POST", "/store/v1/gc", b"");
    assert_eq!(st, 200);

    // A revoked token stops at once.
    let list = run(
        BIN,
        &[
            "store",
            "token",
            "list",
            "--dir",
            server.dir.to_str().unwrap(),
            "--json",
        ],
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id2 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["tenant"] == "host2")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    run(
        BIN,
        &[
            "store",
            "token",
            "revoke",
            &id2,
            "--dir",
            server.dir.to_str().unwrap(),
        ],
    );
    let (st, _) = store_req(&server, &h2_tok, "GET", "/store/v1/snapshots", b"");
    assert_eq!(st, 401);

    // The store from before tenants: its snapshots are the default
    // tenant's, whole.
    old.restore_and_compare(
        legacy["snapshot"].as_str().unwrap(),
        &t.path().join("rl.img"),
        &img_old,
    );
    let ol = old.ok(&["snapshots"]);
    assert!(ol.contains("legacy@") && !ol.contains("_host1_"), "{ol}");
    let _ = s2;
}

#[test]
fn a_damaged_chunk_on_a_store_server_is_stored_again() {
    let t = tempdir();
    let server = StoreServer::start(&t.path().join("store"));
    let tok = server.tenant_token("host1", &[]);
    let a = server.agent_as(&t.path().join("h1"), &tok);
    let img = t.path().join("vm.img");
    random_file(&img, 8 << 20, 50);
    a.attach("vm", &img, &[]);
    let first = backup(&a, "vm");
    let id = first["snapshot"].as_str().unwrap().to_string();
    let mut packs: Vec<PathBuf> = run(
        "find",
        &[
            server.dir.join("packs").to_str().unwrap(),
            "-name",
            "*.pack",
        ],
    )
    .lines()
    .map(PathBuf::from)
    .collect();
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = packs.last().unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[100] ^= 1;
    std::fs::write(victim, bytes).unwrap();
    let o = a.cli(&["verify", &id]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("set aside"), "{out}");
    let next = backup(&a, "vm");
    assert_eq!(next["kind"], "full", "{next}");
    let v = a.ok(&["verify", "--all"]);
    assert!(!v.contains("DAMAGED"), "{v}");
    a.restore_and_compare(&id, &t.path().join("r.img"), &img);
}

/// The snapshot reader works over a store server: the partition table of
/// a disk backed up there is read back without a restore.
#[test]
fn a_snapshot_on_a_store_server_is_read_without_a_restore() {
    let t = tempdir();
    let server = StoreServer::start(&t.path().join("store"));
    let a = server.agent(&t.path().join("host"));
    let img = t.path().join("d.img");
    sfdisk_table(
        &img,
        64 << 20,
        "label: gpt\nstart=2048, size=32768, name=\"data\"\n",
    );
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            "offset=1048576",
            img.to_str().unwrap(),
            "4096",
        ],
    );
    a.attach("vm", &img, &[]);
    let id = backup(&a, "vm")["snapshot"].as_str().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["partitions", &id, "--json"])).unwrap();
    assert_eq!(v["scheme"], "gpt", "{v}");
    let p = &v["partitions"][0];
    assert_eq!(
        (p["start"].as_u64(), p["size"].as_u64()),
        (Some(1 << 20), Some(16 << 20)),
        "{v}"
    );
    assert_eq!(p["name"], "data");
    assert_eq!(p["filesystem"], "ext4");

    // Served as an NBD export straight from the store server, and written
    // to through an overlay: the export equals the disk, then the disk
    // plus the write; the store server holds nothing more.
    let stored = du(&t.path().join("store"));
    a.ok(&["mount", &id, "--name", "remote", "--writable"]);
    compare_images(&img, Path::new(&a.uri("remote")));
    let o = peer("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x61 8192 4096",
            &a.uri("remote"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let copy = t.path().join("copy.img");
    run("nbdcopy", &[&a.uri("remote"), copy.to_str().unwrap()]);
    let mut want = std::fs::read(&img).unwrap();
    want[8192..8192 + 4096].fill(0x61);
    assert!(std::fs::read(&copy).unwrap() == want);
    a.ok(&["unmount", "remote"]);
    assert!(
        du(&t.path().join("store")) <= stored + 64 * 1024,
        "the mount wrote into the store"
    );
}
