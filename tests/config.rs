//! The agent's TOML configuration, SIGHUP reloads and systemd's notify
//! protocol, with the real binary.

#[path = "harness.rs"]
mod harness;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use harness::*;

fn disks(a: &Agent) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn hup(a: &Agent) {
    run("kill", &["-HUP", &a.pid().to_string()]);
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn declared_disks_attach_at_start_and_on_sighup_flags_override_the_file() {
    let t = tempdir();
    let (one, two) = (t.path().join("one.img"), t.path().join("two.img"));
    random_file(&one, 1 << 20, 51);
    random_file(&two, 1 << 20, 52);
    let cfg = t.path().join("agent.toml");
    let store = t.path().join("elsewhere");
    std::fs::write(
        &cfg,
        format!(
            "store = \"{}\"\nzstd_level = 3\napi_listen = \"127.0.0.1:1\"\n\n[[disk]]\nname = \"one\"\nimage = \"{}\"\ngranularity = \"128K\"\n",
            store.display(),
            one.display()
        ),
    )
    .unwrap();
    // The harness passes --api-listen 127.0.0.1:0, which must win over the file.
    let a = Agent::start_with(
        &t.path().join("a"),
        "pread",
        &["--config", cfg.to_str().unwrap()],
    );
    assert_eq!(disks(&a), vec!["one"]);
    assert_eq!(a.cbt("one")["granularity"], 128 << 10);
    let status: serde_json::Value = serde_json::from_str(&a.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["store"]["location"], store.display().to_string());

    // A second disk appears on SIGHUP.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[[disk]]\nname = \"two\"\nimage = \"{}\"\nread_only = true\n",
        two.display()
    ));
    std::fs::write(&cfg, &text).unwrap();
    hup(&a);
    until("disk two", || disks(&a).len() == 2);
    let two_info: serde_json::Value =
        serde_json::from_str(&a.ok(&["disk", "list", "--json"])).unwrap();
    assert_eq!(two_info[1]["read_only"], true);

    // A broken file is reported and changes nothing; the agent keeps serving.
    std::fs::write(&cfg, "[[disk]]\nname = 3\n").unwrap();
    hup(&a);
    until("the reload error in the log", || {
        a.log().contains("configuration not reloaded")
    });
    assert_eq!(disks(&a).len(), 2);
}

#[test]
fn a_bad_configuration_stops_the_agent_at_start_with_the_file_named() {
    let t = tempdir();
    let cfg = t.path().join("bad.toml");
    std::fs::write(&cfg, "zstd_levle = 3\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args([
            "--data-dir",
            t.path().join("s").to_str().unwrap(),
            "agent",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("zstd_levle"),
        "{err}"
    );
    // `config check`, which the unit runs before every start and reload,
    // says the same without starting anything; sizes are checked too.
    std::fs::write(&cfg, "snapshot_cache = \"lots\"\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("snapshot_cache"), "{err}");
    std::fs::write(&cfg, "snapshot_cache = \"256M\"\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (0 disks declared)"));
}

#[test]
fn systemd_hears_ready_watchdog_reloading_and_stopping() {
    let t = tempdir();
    let sock_path = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cfg = t.path().join("agent.toml");
    std::fs::write(&cfg, "").unwrap();
    let mut a = Agent::start_env(
        &t.path().join("a"),
        &["--config", cfg.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    let recv = |want: &str, seen: &mut Vec<String>| {
        let mut buf = [0u8; 256];
        loop {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for {want}: {e}; got {seen:?}"));
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(m.clone());
            if m == want {
                return;
            }
        }
    };
    recv("READY=1", &mut seen);
    recv("WATCHDOG=1", &mut seen);
    recv("WATCHDOG=1", &mut seen);
    hup(&a);
    recv("RELOADING=1", &mut seen);
    recv("READY=1", &mut seen);
    a.stop();
    recv("STOPPING=1", &mut seen);
}
