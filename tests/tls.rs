//! TLS on the agent's API: self-signed certificate, pinned by the CLI
//! through agent.json, a wrong pin refused, plain HTTP refused on a
//! non-loopback address unless explicitly allowed.

#[path = "harness.rs"]
mod harness;

use std::process::Command;

use harness::*;

#[test]
fn the_cli_pins_a_tls_agent_and_refuses_a_wrong_certificate() {
    let t = tempdir();
    let a = Agent::start_with(&t.path().join("a"), "pread", &["--tls"]);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("a/state/agent.json")).unwrap())
            .unwrap();
    let fp = info["api_fingerprint"].as_str().unwrap().to_string();
    assert!(fp.starts_with("sha256:"), "{info}");
    // Through agent.json: https and the pin, nothing to pass.
    assert!(a.ok(&["status"]).contains("agent:"));
    // Explicitly, from elsewhere.
    let token = std::fs::read_to_string(t.path().join("a/state/api.token")).unwrap();
    let url = format!("https://{}", a.api);
    let run_cli = |pin: &str| {
        Command::new(BIN)
            .args(["--api", &url, "--fingerprint", pin, "disk", "list"])
            .env("NOVABACKUP_TOKEN", token.trim())
            .output()
            .unwrap()
    };
    assert!(run_cli(&fp).status.success());
    let o = run_cli(&format!("sha256:{}", "1".repeat(64)));
    assert_eq!(o.status.code(), Some(3), "unreachable, with the reason");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not the pinned"));
    // https without any pin is refused before connecting.
    let o = Command::new(BIN)
        .args(["--api", &url, "disk", "list"])
        .env("NOVABACKUP_TOKEN", token.trim())
        .env_remove("NOVABACKUP_FINGERPRINT")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--fingerprint"));
    // Plain HTTP to the TLS listener gets no answer.
    assert!(ureq::get(&format!("http://{}/api/v1/health", a.api))
        .call()
        .is_err());
    // The key is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(t.path().join("a/state/tls.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_non_loopback_api_needs_tls_or_an_explicit_insecure_flag() {
    let t = tempdir();
    let o = Command::new(BIN)
        .args(["--data-dir", t.path().join("s").to_str().unwrap(), "agent"])
        .args(["--nbd-listen", "none", "--api-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing") && err.contains("--tls"), "{err}");
    let o = Command::new(BIN)
        .args([
            "store",
            "serve",
            "--dir",
            t.path().join("st").to_str().unwrap(),
        ])
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing"));
}
