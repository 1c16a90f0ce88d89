//! NBD access control through the real binary and the real TLS clients:
//! STARTTLS with X.509 client certificates (QEMU's `tls-creds-x509` and
//! libnbd's `nbds://`), per-export allow lists, the handshake deadline, the
//! bound on connections and on repeated log lines, and `disk detach
//! --force`. Certificates come from `openssl`, made fresh for each run.

#[path = "harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA in `dir/NAME-ca`, signing what [`sign`] makes.
fn ca(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(format!("{name}-ca"));
    std::fs::create_dir_all(&d).unwrap();
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    d
}

/// A leaf certificate for `subject` signed by `ca`, written as
/// `out/{prefix}-cert.pem` and `out/{prefix}-key.pem` beside a copy of the
/// CA certificate: the folder layout QEMU and libnbd read.
fn sign(ca: &Path, out: &Path, prefix: &str, subject: &str, ext: &str) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    std::fs::write(out.join("ext.cnf"), ext).unwrap();
    let key = format!("{prefix}-key.pem");
    openssl(
        out,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            "req.csr",
            "-subj",
            subject,
        ],
    );
    let ca_cert = ca.join("ca-cert.pem");
    let ca_key = ca.join("ca-key.pem");
    openssl(
        out,
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            ca_cert.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            &format!("{prefix}-cert.pem"),
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        ],
    );
}

const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

struct Pki {
    server: PathBuf,
    alice: PathBuf,
    bob: PathBuf,
    mallory: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let good = ca(dir, "good");
    let evil = ca(dir, "evil");
    let p = Pki {
        server: dir.join("server"),
        alice: dir.join("alice"),
        bob: dir.join("bob"),
        mallory: dir.join("mallory"),
    };
    sign(&good, &p.server, "server", "/CN=localhost", SERVER_EXT);
    sign(
        &good,
        &p.alice,
        "client",
        "/O=Nova Test/CN=alice",
        CLIENT_EXT,
    );
    sign(&good, &p.bob, "client", "/O=Nova Test/CN=bob", CLIENT_EXT);
    // Mallory names herself alice, with a CA the server does not trust.
    sign(
        &evil,
        &p.mallory,
        "client",
        "/O=Nova Test/CN=alice",
        CLIENT_EXT,
    );
    p
}

fn nbds(a: &Agent, export: &str, creds: &Path) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        a.tcp,
        creds.display()
    )
}

/// `qemu-io` over TLS with the client credentials in `creds`.
fn qemu_io_tls(a: &Agent, export: &str, creds: &Path, cmd: &str) -> std::process::Output {
    let (host, port) = a.tcp.rsplit_once(':').unwrap();
    peer("qemu-io")
        .args([
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                creds.display()
            ),
            "--image-opts",
            &format!("driver=nbd,host={host},port={port},export={export},tls-creds=tls0"),
            "-c",
            cmd,
        ])
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn tls_clients_see_and_open_only_what_they_may() {
    let t = tempdir();
    let p = pki(t.path());
    for engine in ENGINES {
        let dir = t.path().join(engine);
        let a = Agent::start_with(&dir, engine, &["--nbd-tls-dir", p.server.to_str().unwrap()]);
        let (ia, ib) = (dir.join("a.img"), dir.join("b.img"));
        random_file(&ia, 4 << 20, 1);
        random_file(&ib, 4 << 20, 2);
        a.attach("a", &ia, &["--allow", "CN=alice,O=Nova Test"]);
        a.attach("b", &ib, &["--allow", "O=Nova Test, CN=bob"]);
        let io = dir.join("open.img");
        sparse_file(&io, 1 << 20);
        a.attach("open", &io, &[]);

        // Listing shows alice her disk and the open one, never bob's.
        let list = peer("nbdinfo")
            .args(["--list", "--json", &nbds(&a, "", &p.alice)])
            .output()
            .unwrap();
        assert!(list.status.success(), "{}", text(&list));
        let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&list.stdout).unwrap()
            ["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect();
        assert!(names.contains(&"a".to_string()), "{names:?}");
        assert!(
            !names.contains(&"b".to_string()),
            "alice saw bob's disk: {names:?}"
        );

        // QEMU writes through TLS; the write lands and is tracked.
        let o = qemu_io_tls(&a, "a", &p.alice, "write -P 0x5a 1M 64k");
        assert!(
            o.status.success() && text(&o).contains("wrote"),
            "{}",
            text(&o)
        );
        let o = qemu_io_tls(&a, "a", &p.alice, "read -P 0x5a 1M 64k");
        assert!(
            o.status.success() && !text(&o).contains("fail"),
            "{}",
            text(&o)
        );
        assert_eq!(a.cbt("a")["dirty_blocks"], 1);

        // qemu-img sees the disk's size through TLS.
        let (host, port) = a.tcp.rsplit_once(':').unwrap();
        let o = peer("qemu-img")
            .args([
                "info",
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                    p.alice.display()
                ),
                "--image-opts",
                &format!("driver=nbd,host={host},port={port},export=a,tls-creds=tls0"),
            ])
            .output()
            .unwrap();
        assert!(text(&o).contains("virtual size: 4 MiB"), "{}", text(&o));

        // Bob's disk: not for alice, by either client.
        let o = qemu_io_tls(&a, "b", &p.alice, "read 0 4k");
        assert!(
            !text(&o).contains("read 4096/4096"),
            "alice read bob's disk: {}",
            text(&o)
        );
        let o = peer("nbdinfo")
            .arg(nbds(&a, "b", &p.alice))
            .output()
            .unwrap();
        assert!(!o.status.success(), "alice opened bob's disk: {}", text(&o));

        // nbdcopy reads bob's disk with bob's certificate, byte for byte.
        let copy = dir.join("b-copy.img");
        let o = peer("nbdcopy")
            .args([&nbds(&a, "b", &p.bob), copy.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        compare_images(&copy, &ib);

        // Without TLS, or with a certificate of another CA: nothing.
        let o = peer("nbdinfo")
            .args(["--list", &a.tcp_uri("")])
            .output()
            .unwrap();
        assert!(
            !o.status.success() || !text(&o).contains("export=\"a\""),
            "plain NBD listed exports: {}",
            text(&o)
        );
        let o = peer("nbdinfo")
            .args(["--size", &a.tcp_uri("open")])
            .output()
            .unwrap();
        assert!(!o.status.success(), "plain NBD opened a disk: {}", text(&o));
        let o = peer("nbdinfo")
            .args(["--list", &nbds(&a, "", &p.mallory)])
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "an untrusted CA's client listed exports"
        );
        let o = qemu_io_tls(&a, "a", &p.mallory, "write -P 0x66 0 4k");
        assert!(!text(&o).contains("wrote"), "{}", text(&o));

        // The allow list is shown and survives a restart.
        let d: serde_json::Value =
            serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
        assert_eq!(d[0]["allow"][0], "CN=alice,O=Nova Test");
        let mut a = a;
        a.restart();
        let o = qemu_io_tls(&a, "b", &p.alice, "read 0 4k");
        assert!(!text(&o).contains("read 4096/4096"), "{}", text(&o));
        a.stop();
    }
}

#[test]
fn a_bad_allow_entry_or_tls_folder_is_refused_clearly() {
    let t = tempdir();
    let a = Agent::start(&t.path().join("a"), "pread");
    let img = t.path().join("vm.img");
    sparse_file(&img, 1 << 20);
    let o = a.cli(&[
        "disk",
        "attach",
        "vm",
        "--image",
        img.to_str().unwrap(),
        "--allow",
        "alice",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("uid:N"),
        "{}",
        text(&o)
    );
    let o = Command::new(BIN)
        .arg("--data-dir")
        .arg(t.path().join("b"))
        .args([
            "agent",
            "--nbd-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .args(["--nbd-tls-dir", t.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("ca-cert.pem"), "{}", text(&o));
}

/// Reads until the peer closes or `limit` passes; true if it closed.
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + limit;
    let mut b = [0u8; 256];
    while Instant::now() < end {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn the_handshake_has_one_deadline_and_connections_are_bounded() {
    let t = tempdir();
    let a = Agent::start_with(
        &t.path().join("a"),
        "pread",
        &["--nbd-handshake-timeout", "2", "--nbd-max-connections", "4"],
    );
    // A client that trickles a byte every 300 ms never lets a per-read
    // timeout fire; the deadline for the whole handshake does.
    let mut s = UnixStream::connect(&a.socket).unwrap();
    let start = Instant::now();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut closed = false;
    for b in b"IHAVEOPT\0\0\0\x03\0\0\0\0".iter().cycle().take(60) {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut s, Duration::from_millis(300)) {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a trickling client kept its connection for {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );

    // Four idle connections are served; a fifth is closed at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = UnixStream::connect(&a.socket).unwrap();
        s.read_exact(&mut greeting).unwrap();
        held.push(s);
    }
    let mut fifth = UnixStream::connect(&a.socket).unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(1)),
        "a fifth connection was served"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let o = peer("nbdinfo")
        .args(["--list", &a.uri("")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // A flood of bad handshakes leaves a bounded number of log lines.
    for _ in 0..60 {
        let mut s = UnixStream::connect(&a.socket).unwrap();
        let _ = s.read_exact(&mut greeting);
        let _ = s.write_all(&[0xff; 20]);
        let _ = closed_within(&mut s, Duration::from_secs(1));
    }
    let lines = a
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("NBD"))
        .count();
    assert!(
        lines <= 12,
        "{lines} warning lines for a flood of bad clients:\n{}",
        a.log()
    );
}

/// Completes a handshake for `export` (NBD_OPT_EXPORT_NAME) and returns
/// the connected socket.
fn open_export(socket: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    s
}

#[test]
fn detach_force_disconnects_clients() {
    let t = tempdir();
    let a = Agent::start(&t.path().join("a"), "uring");
    let img = t.path().join("vm.img");
    sparse_file(&img, 1 << 20);
    a.attach("vm", &img, &[]);
    let mut s = open_export(&a.socket, "vm");
    let o = a.cli(&["disk", "detach", "vm"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--force"), "{}", text(&o));
    a.ok(&["disk", "detach", "vm", "--force"]);
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "the client stayed connected"
    );
    let list = a.ok(&["disk", "list", "--json"]);
    assert_eq!(list.trim(), "[]");
}
