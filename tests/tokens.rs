//! API tokens and roles through the real agent: no token is a 401, a role
//! that may not make a call is a 403, and both are JSON errors.

#[path = "harness.rs"]
mod harness;

use harness::*;

fn call(
    a: &Agent,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut req = ureq::request(method, &format!("http://{}{path}", a.api));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => {
            let text = r.into_string().unwrap();
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{method} {path}: error body is not JSON: {text}"));
            (s, v["error"]["code"].as_str().unwrap().to_string())
        }
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

#[test]
fn roles_limit_what_a_token_may_do() {
    let t = tempdir();
    let web = t.path().join("web.img");
    let db = t.path().join("db.img");
    random_file(&web, 2 << 20, 31);
    random_file(&db, 2 << 20, 32);
    let mut a = Agent::start(&t.path().join("a"), "pread");
    a.attach("web", &web, &[]);
    a.attach("db", &db, &[]);

    // Every endpoint but health wants a token.
    let endpoints = [
        ("GET", "/api/v1/disks"),
        ("POST", "/api/v1/disks"),
        ("GET", "/api/v1/disks/web"),
        ("DELETE", "/api/v1/disks/web"),
        ("GET", "/api/v1/disks/web/cbt"),
        ("POST", "/api/v1/disks/web/cbt/reset"),
        ("POST", "/api/v1/backups"),
        ("POST", "/api/v1/restores"),
        ("POST", "/api/v1/verify"),
        ("GET", "/api/v1/snapshots"),
        ("GET", "/api/v1/snapshots/web@20260101T000000Z"),
        ("DELETE", "/api/v1/snapshots/web@20260101T000000Z"),
        ("POST", "/api/v1/snapshots/web@20260101T000000Z/verify"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/job-1"),
        ("POST", "/api/v1/jobs/job-1/cancel"),
        ("GET", "/api/v1/store"),
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("DELETE", "/api/v1/tokens/abcd"),
        ("GET", "/metrics"),
    ];
    for (m, p) in endpoints {
        assert_eq!(
            call(&a, None, m, p, None),
            (401, "unauthorized".into()),
            "{m} {p}"
        );
        assert_eq!(call(&a, Some("wrong"), m, p, None).0, 401, "{m} {p}");
    }
    assert_eq!(call(&a, None, "GET", "/api/v1/health", None).0, 200);

    // Tokens made through the CLI (as admin, with api.token).
    let make = |name: &str, role: &str, disks: &[&str]| -> (String, String) {
        let mut args = vec!["token", "create", name, "--role", role, "--json"];
        for d in disks {
            args.extend(["--disk", d]);
        }
        let v: serde_json::Value = serde_json::from_str(&a.ok(&args)).unwrap();
        (
            v["token"].as_str().unwrap().into(),
            v["id"].as_str().unwrap().into(),
        )
    };
    let (ro, _) = make("grafana", "read-only", &[]);
    let (bk, bk_id) = make("web-backups", "backup", &["web"]);
    let listed = a.ok(&["token", "list"]);
    assert!(
        listed.contains("grafana") && listed.contains("web-backups"),
        "{listed}"
    );
    assert!(
        !listed.contains(&ro) && !listed.contains(&bk),
        "secrets are never listed"
    );
    let stored = std::fs::read_to_string(t.path().join("a/state/tokens.json")).unwrap();
    assert!(
        !stored.contains(&ro) && !stored.contains(&bk),
        "only hashes are stored"
    );

    // Read-only: reads yes, writes no.
    assert_eq!(call(&a, Some(&ro), "GET", "/api/v1/disks", None).0, 200);
    assert_eq!(call(&a, Some(&ro), "GET", "/metrics", None).0, 200);
    for (m, p) in endpoints.iter().filter(|(m, _)| *m != "GET") {
        assert_eq!(
            call(&a, Some(&ro), m, p, Some("{}")),
            (403, "forbidden".into()),
            "{m} {p}"
        );
    }

    // Backup, limited to web: back up and restore web, nothing else.
    let body = r#"{"disk": "web"}"#;
    let (s, _) = call(&a, Some(&bk), "POST", "/api/v1/backups", Some(body));
    assert_eq!(s, 202);
    let (s, code) = call(
        &a,
        Some(&bk),
        "POST",
        "/api/v1/backups",
        Some(r#"{"disk": "db"}"#),
    );
    assert_eq!((s, code.as_str()), (403, "forbidden"));
    assert_eq!(
        call(&a, Some(&bk), "POST", "/api/v1/disks", Some("{}")).0,
        403
    );
    assert_eq!(call(&a, Some(&bk), "GET", "/api/v1/tokens", None).0, 403);
    assert_eq!(
        call(&a, Some(&bk), "POST", "/api/v1/verify", Some("{}")).0,
        403,
        "verify all touches db"
    );
    // Wait for the backup, then restore it with the backup token.
    let snap = loop {
        let list: serde_json::Value =
            serde_json::from_str(&a.ok(&["snapshots", "web", "--json"])).unwrap();
        if let Some(s) = list.as_array().unwrap().first() {
            break s["id"].as_str().unwrap().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // API restores go below the agent's restore folders.
    let target = t.path().join("a/state/restores/restored.img");
    let body = format!(
        r#"{{"snapshot": "{snap}", "target": "{}"}}"#,
        target.display()
    );
    assert_eq!(
        call(&a, Some(&bk), "POST", "/api/v1/restores", Some(&body)).0,
        202
    );
    let del = format!("/api/v1/snapshots/{snap}");
    assert_eq!(call(&a, Some(&bk), "DELETE", &del, None).0, 403);

    // Revoked: 401 from then on; a second revoke is a 404 (exit code 4).
    a.ok(&["token", "revoke", &bk_id]);
    assert_eq!(call(&a, Some(&bk), "GET", "/api/v1/disks", None).0, 401);
    assert_eq!(a.cli(&["token", "revoke", &bk_id]).status.code(), Some(4));
    // Tokens survive an agent restart.
    a.stop();
    a.restart();
    let o = std::process::Command::new(BIN)
        .args(["--api", &a.api, "disk", "list"])
        .env("NOVABACKUP_TOKEN", &ro)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
