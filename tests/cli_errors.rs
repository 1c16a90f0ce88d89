//! What an operator sees when something is wrong: CLI messages and exit
//! codes, API status codes with JSON bodies.

#[path = "harness.rs"]
mod harness;

use harness::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cli_errors_are_clear() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    sparse_file(&img, 1 << 20);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);

    let o = a.cli(&["disk", "attach", "x", "--image", "/nonexistent/disk.img"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));

    let o = a.cli(&["disk", "attach", "vm", "--image", img.to_str().unwrap()]);
    assert!(stderr(&o).contains("already attached"), "{}", stderr(&o));

    let other = t.path().join("other.img");
    sparse_file(&other, 1 << 20);
    let o = a.cli(&["disk", "attach", "vm2", "--image", img.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("already attached as disk vm"),
        "{}",
        stderr(&o)
    );

    let o = a.cli(&[
        "disk",
        "attach",
        "bad/name",
        "--image",
        other.to_str().unwrap(),
    ]);
    assert!(stderr(&o).contains("invalid disk name"), "{}", stderr(&o));

    let o = a.cli(&[
        "disk",
        "attach",
        "g",
        "--image",
        other.to_str().unwrap(),
        "--granularity",
        "3000",
    ]);
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));
    let o = a.cli(&[
        "disk",
        "attach",
        "g",
        "--image",
        other.to_str().unwrap(),
        "--granularity",
        "8M",
    ]);
    assert!(stderr(&o).contains("4 KiB to 4 MiB"), "{}", stderr(&o));
    let o = a.cli(&[
        "disk",
        "attach",
        "g",
        "--image",
        other.to_str().unwrap(),
        "--granularity",
        "lots",
    ]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");

    let o = a.cli(&["disk", "cbt", "nope"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("no disk named \"nope\""),
        "{}",
        stderr(&o)
    );
    let o = a.cli(&["disk", "detach", "nope"]);
    assert_eq!(o.status.code(), Some(4));

    // Detach is refused while a client is connected, then works.
    let mut c = peer("nbdsh")
        .args([
            "-u",
            &a.uri("vm"),
            "-c",
            "import time\nh.pread(1, 0)\nprint('connected', flush=True)\ntime.sleep(20)",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let o = a.cli(&["disk", "detach", "vm"]);
    assert!(
        stderr(&o).contains("connected NBD client"),
        "{}",
        stderr(&o)
    );
    let _ = c.kill();
    let _ = c.wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let o = a.cli(&["disk", "detach", "vm"]);
        if o.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", stderr(&o));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(a.ok(&["disk", "list"]).contains("no disks attached"));

    // A wrong token and an unreachable agent.
    let o = std::process::Command::new(BIN)
        .args(["--api", &a.api, "disk", "list"])
        .env("NOVABACKUP_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(stderr(&o).contains("bearer token"), "{}", stderr(&o));
    let o = std::process::Command::new(BIN)
        .args(["--api", "127.0.0.1:1", "disk", "list"])
        .env("NOVABACKUP_TOKEN", "x")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("Is `novabackup agent` running?"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn api_rejects_bad_requests_with_json() {
    let t = tempdir();
    let a = Agent::start(&t.path().join("a"), "pread");
    let token = std::fs::read_to_string(t.path().join("a/state/api.token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(t.path().join("a/state/api.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let url = format!("http://{}/api/v1/disks", a.api);
    for body in [
        "{",
        "{\"name\": 1}",
        "{\"name\":\"a\",\"image\":\"/x\",\"granularity\":\"big\"}",
        "{\"name\":\"a\",\"image\":\"relative.img\"}",
    ] {
        let r = ureq::post(&url)
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .set("Content-Type", "application/json")
            .send_string(body);
        match r {
            Err(ureq::Error::Status(code, resp)) => {
                assert!((400..500).contains(&code), "{body}: {code}");
                let v: serde_json::Value = resp.into_json().unwrap();
                assert!(
                    v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                    "{body}: {v}"
                );
            }
            other => panic!("{body}: expected a 4xx, got {other:?}"),
        }
    }
    match ureq::get(&url).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("expected 401, got {other:?}"),
    }
    let h: serde_json::Value = ureq::get(&format!("http://{}/api/v1/health", a.api))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["io_engine"], "pread");
}
