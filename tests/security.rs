//! The findings of the shared-host review, through the real binary: what
//! an unprivileged local user (`nobody`, via `setpriv`) and a token limited
//! to one disk could do before, and may not do now.

#[path = "harness.rs"]
mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use harness::*;

/// Runs `cmd args` as user nobody.
fn as_nobody(cmd: &str, args: &[&str]) -> std::process::Output {
    let path = std::env::var("PATH").unwrap_or_default();
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(cmd)
        .args(args)
        .env("PATH", format!("/usr/bin:{path}"))
        .output()
        .expect("setpriv runs")
}

/// A test folder others may enter, so that only novabackup's own
/// permissions stand between `nobody` and the data.
fn open_tempdir() -> tempfile::TempDir {
    let t = tempdir();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

fn api(a: &Agent, token: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let r = ureq::request(method, &format!("http://{}{path}", a.api))
        .set("Authorization", &format!("Bearer {token}"))
        .set("Content-Type", "application/json")
        .send_string(body);
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(serde_json::Value::Null)),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn token(a: &Agent, disk: &str) -> String {
    let out = a.ok(&[
        "token", "create", "t", "--role", "backup", "--disk", disk, "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn nobody_reaches_no_disk_and_reads_no_backup_data() {
    let t = open_tempdir();
    let img = t.path().join("vm.img");
    sparse_file(&img, 8 << 20);
    let mut a = Agent::start(&t.path().join("a"), "pread");
    std::fs::set_permissions(t.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
    a.attach("vm", &img, &[]);
    let secret = "guest-secret-7f3a9c";
    std::fs::write(t.path().join("secret"), secret.repeat(100)).unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 0 2k", t.path().join("secret").display()),
            &a.uri("vm"),
        ],
    );
    a.ok(&["backup", "vm"]);

    // The NBD socket: nobody can neither list nor read nor write.
    let sock = a.socket.display().to_string();
    let o = as_nobody(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={sock}")],
    );
    assert!(!o.status.success(), "nobody listed the exports");
    let o = as_nobody("qemu-io", &["-f", "raw", "-c", "write 0 4k", &a.uri("vm")]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || !text.contains("wrote"),
        "nobody wrote into the guest's disk: {text}"
    );

    // The state folder, the store's packs and manifests.
    let o = as_nobody("grep", &["-r", "-l", secret, a.state().to_str().unwrap()]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(secret) && o.stdout.is_empty(),
        "nobody found the guest's secret in: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    for p in ["", "store", "restores"] {
        let mode = std::fs::metadata(a.state().join(p))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{p} is {mode:o}");
    }
    let md = std::fs::metadata(a.state().join("agent.json")).unwrap();
    assert_eq!(md.permissions().mode() & 0o077, 0);

    // A restored image is private too.
    let snaps: serde_json::Value =
        serde_json::from_str(&a.ok(&["snapshots", "vm", "--json"])).unwrap();
    let id = snaps[0]["id"].as_str().unwrap().to_string();
    let out = t.path().join("restored.img");
    a.ok(&["restore", &id, "--to", out.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o077,
        0
    );
    let o = as_nobody("cat", &[out.to_str().unwrap()]);
    assert!(!o.status.success(), "nobody read the restored image");
    a.stop();
}

#[test]
fn nbd_over_tcp_needs_an_opt_in_and_loopback() {
    let t = tempdir();
    for (listen, extra, want) in [
        ("127.0.0.1:0", None, "--nbd-insecure-tcp"),
        ("0.0.0.0:0", Some("--nbd-insecure-tcp"), "loopback"),
    ] {
        let mut c = Command::new(BIN);
        c.arg("--data-dir").arg(t.path().join("s")).args([
            "agent",
            "--nbd-listen",
            listen,
            "--api-listen",
            "127.0.0.1:0",
        ]);
        if let Some(e) = extra {
            c.arg(e);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{listen}: the agent started");
        assert!(err.contains(want), "{listen}: {err}");
    }
}

#[test]
fn a_token_for_one_disk_cannot_write_as_root_or_reach_other_disks() {
    let t = open_tempdir();
    let img = t.path().join("vm.img");
    let db = t.path().join("db.img");
    random_file(&img, 2 << 20, 5);
    random_file(&db, 64 << 20, 6);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    a.attach("db", &db, &[]);
    a.ok(&["backup", "vm"]);
    let snaps: serde_json::Value =
        serde_json::from_str(&a.ok(&["snapshots", "vm", "--json"])).unwrap();
    let id = snaps[0]["id"].as_str().unwrap().to_string();
    let tok = token(&a, "vm");

    // Outside the restore folders: a root-owned file, a new file in a
    // system folder, a block device.
    let victim = t.path().join("root-runs-this.sh");
    std::fs::write(&victim, "#!/bin/sh\necho safe\n").unwrap();
    for (target, force) in [
        (victim.to_str().unwrap(), true),
        (victim.to_str().unwrap(), false),
        ("/etc/novabackup-test-planted", false),
        ("/dev/loop0", true),
    ] {
        let body =
            serde_json::json!({"snapshot": id, "target": target, "force": force}).to_string();
        let (s, v) = api(&a, &tok, "POST", "/api/v1/restores", &body);
        assert_eq!(s, 403, "{target}: {v}");
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "#!/bin/sh\necho safe\n"
    );
    assert!(!Path::new("/etc/novabackup-test-planted").exists());

    // Inside them it works, and a link planted at TARGET.partial is not
    // followed.
    let restores = a.state().join("restores");
    std::os::unix::fs::symlink(&victim, restores.join("r.img.partial")).unwrap();
    let target = restores.join("r.img");
    let body = serde_json::json!({"snapshot": id, "target": target}).to_string();
    let (s, v) = api(&a, &tok, "POST", "/api/v1/restores", &body);
    assert_eq!(s, 202, "{v}");
    let job = v["id"].as_str().unwrap().to_string();
    let (_, v) = api(
        &a,
        &tok,
        "GET",
        &format!("/api/v1/jobs/{job}?wait_ms=30000"),
        "",
    );
    assert_eq!(v["state"], "succeeded", "{v}");
    compare_images(&target, &img);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "#!/bin/sh\necho safe\n"
    );
    // Overwriting it needs an admin.
    let body = serde_json::json!({"snapshot": id, "target": target, "force": true}).to_string();
    assert_eq!(api(&a, &tok, "POST", "/api/v1/restores", &body).0, 403);

    // An admin's backup of another disk: invisible, not cancellable.
    let o = a.ok(&["backup", "db", "--full", "--no-wait"]);
    let other = o.trim().to_string();
    let (s, _) = api(
        &a,
        &tok,
        "POST",
        &format!("/api/v1/jobs/{other}/cancel"),
        "",
    );
    assert_eq!(s, 403);
    let (_, jobs) = api(&a, &tok, "GET", "/api/v1/jobs", "");
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["id"] != other.as_str()),
        "{jobs}"
    );
    // Verify of "no snapshots" is not "every snapshot"; tokens stay secret.
    let (s, _) = api(&a, &tok, "POST", "/api/v1/verify", r#"{"snapshots": []}"#);
    assert_eq!(s, 400);
    let (s, _) = api(&a, &tok, "POST", "/api/v1/verify", "{}");
    assert_eq!(s, 403);
    let (s, _) = api(&a, &tok, "GET", "/api/v1/tokens", "");
    assert_eq!(s, 403);
}

#[test]
fn the_socket_group_reaches_only_the_disks_that_allow_it() {
    let t = open_tempdir();
    let (a_img, b_img) = (t.path().join("a.img"), t.path().join("b.img"));
    sparse_file(&a_img, 1 << 20);
    sparse_file(&b_img, 1 << 20);
    let a = Agent::start_with(
        &t.path().join("a"),
        "pread",
        &["--nbd-socket-group", "nogroup"],
    );
    std::fs::set_permissions(t.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
    a.attach("shared", &a_img, &["--allow", "gid:65534"]);
    a.attach("private", &b_img, &["--allow", "uid:0"]);
    let sock = a.socket.display().to_string();
    let md = std::fs::metadata(&a.socket).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    // The state folder lets the group through, not list or read.
    let o = as_nobody("ls", &[a.state().to_str().unwrap()]);
    assert!(!o.status.success(), "the group listed the state folder");

    let o = as_nobody(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={sock}")],
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("shared"), "{out}");
    assert!(
        !out.contains("private"),
        "the group saw a disk that does not allow it: {out}"
    );
    let o = as_nobody(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 4k", &a.uri("shared")],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("wrote"),
        "{o:?}"
    );
    let o = as_nobody(
        "qemu-io",
        &["-f", "raw", "-c", "read 0 4k", &a.uri("private")],
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("read 4096"),
        "{o:?}"
    );
    // Outside the group: not even the socket.
    let o = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=1",
            "--clear-groups",
            "--",
            "/usr/bin/nbdinfo",
            "--list",
        ])
        .arg(format!("nbd+unix:///?socket={sock}"))
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "a user outside the group reached the socket"
    );
}

#[test]
fn half_sent_requests_time_out_and_every_error_is_json() {
    use std::io::{Read, Write};
    let t = tempdir();
    let a = Agent::start_with(&t.path().join("a"), "pread", &["--api-timeout", "2"]);
    let tok = std::fs::read_to_string(a.state().join("api.token")).unwrap();
    // Headers that never end, then a body that stops half-way: both
    // connections are closed by the agent.
    for req in [
        "POST /api/v1/gc HTTP/1.1\r\nHost: x\r\n".to_string(),
        format!(
            "POST /api/v1/gc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"min",
            tok.trim()
        ),
    ] {
        let mut s = std::net::TcpStream::connect(&a.api).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let start = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "a half-sent request held its connection for {:?}",
            start.elapsed()
        );
    }
    // The oversized body's 413 is checked without a socket
    // (`routes::tests::an_oversized_body_and_a_wrong_method_answer_json`):
    // over TCP the agent may close before a 3 MiB body is sent.
    let (st, body) = api(&a, tok.trim(), "PATCH", "/api/v1/gc", "{}");
    assert_eq!(st, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let t = tempdir();
    let a = Agent::start(&t.path().join("a"), "pread");
    let img = t.path().join("vm.img");
    sparse_file(&img, 1 << 20);
    for i in 0..30 {
        a.attach(
            &format!("d{i}"),
            &{
                let p = t.path().join(format!("{i}.img"));
                sparse_file(&p, 1 << 20);
                p
            },
            &[],
        );
    }
    for cmd in ["disk list", "completions bash", "man", "status"] {
        let line = format!(
            "{BIN} --data-dir {} {cmd} | head -c 1 > /dev/null",
            a.state().display()
        );
        let o = Command::new("sh").args(["-c", &line]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{cmd}: {err}"
        );
    }
    let _ = img;
}

/// The chain the review used to run code as root: as `nobody`, write a
/// script into a guest's disk over NBD, have it backed up, then restore
/// it over a file root runs, with a backup token for that one disk.
#[test]
fn the_root_chain_is_broken_at_every_link() {
    let t = open_tempdir();
    let img = t.path().join("vm.img");
    random_file(&img, 2 << 20, 9);
    let a = Agent::start(&t.path().join("a"), "pread");
    std::fs::set_permissions(t.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
    a.attach("vm", &img, &[]);
    let victim = t.path().join("cron-job.sh");
    std::fs::write(&victim, "#!/bin/sh\necho safe\n").unwrap();
    let payload = t.path().join("payload");
    std::fs::write(&payload, "#!/bin/sh\nid > /tmp/owned\n").unwrap();
    std::fs::set_permissions(&payload, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Link 1: nobody writes the payload into the disk.
    let o = as_nobody(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 0 512", payload.display()),
            &a.uri("vm"),
        ],
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("wrote"),
        "{o:?}"
    );
    let before = std::fs::read(&img).unwrap();
    assert!(
        !before.starts_with(b"#!/bin/sh\nid"),
        "the payload reached the disk"
    );

    // Link 2: even a backup token handed to nobody cannot restore over
    // a file outside the restore folders.
    a.ok(&["backup", "vm"]);
    let snaps: serde_json::Value =
        serde_json::from_str(&a.ok(&["snapshots", "vm", "--json"])).unwrap();
    let id = snaps[0]["id"].as_str().unwrap().to_string();
    let tok = token(&a, "vm");
    let script = format!(
        "import urllib.request as u, json\n\
         r = u.Request('http://{}/api/v1/restores', method='POST', \
         data=json.dumps({{'snapshot': '{id}', 'target': '{}', 'force': True}}).encode(), \
         headers={{'Authorization': 'Bearer {tok}', 'Content-Type': 'application/json'}})\n\
         try:\n  print(u.urlopen(r).status)\nexcept Exception as e:\n  print(e.code)\n",
        a.api,
        victim.display()
    );
    let o = as_nobody("/usr/bin/python3", &["-c", &script]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "403", "{o:?}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "#!/bin/sh\necho safe\n"
    );
}
