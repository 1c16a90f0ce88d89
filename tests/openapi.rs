//! The served OpenAPI document, checked by schemathesis (from PyPI; the
//! test script installs it): generated requests against every operation
//! must never get a 5xx, and every response must match the document.
//! Attach and restore are left out of the fuzzing: with an admin token
//! they would attach or overwrite arbitrary files of this machine (their
//! validation has its own tests in cli_errors and the API unit tests).

#[path = "harness.rs"]
mod harness;

use harness::*;

#[test]
fn the_openapi_document_lists_every_endpoint() {
    let t = tempdir();
    let a = Agent::start(&t.path().join("a"), "pread");
    let doc: serde_json::Value = ureq::get(&format!("http://{}/api/v1/openapi.json", a.api))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let ops: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert!(ops >= 39, "{ops} operations");
    for p in [
        "/api/v1/backups",
        "/api/v1/jobs/{id}/events",
        "/metrics",
        "/api/v1/tokens/{id}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} is not documented");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let t = tempdir();
    let img = t.path().join("disk.img");
    random_file(&img, 1 << 20, 41);
    let a = Agent::start(&t.path().join("a"), "pread");
    a.attach("vm", &img, &[]);
    a.ok(&["backup", "vm"]);
    let token = std::fs::read_to_string(t.path().join("a/state/api.token")).unwrap();
    let out = std::process::Command::new("st")
        .args([
            "run",
            &format!("http://{}/api/v1/openapi.json", a.api),
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--exclude-operation-id",
            "attach_disk",
            "--exclude-operation-id",
            "restore",
            "--phases",
            "examples,coverage,fuzzing",
            "-n",
            "30",
            "--seed",
            "1",
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run schemathesis (`st`): {e}; pip install schemathesis")
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
}
