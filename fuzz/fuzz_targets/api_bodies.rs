//! The agent API's request bodies and its access table: every body type
//! parses or refuses, and authorization of any method and path answers
//! without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novabackup_api::auth::{authorize, Caller, CreateToken, Role};
use novabackup_api::types::*;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<AttachRequest>(data);
    let _ = serde_json::from_slice::<BackupRequest>(data);
    let _ = serde_json::from_slice::<RestoreRequest>(data);
    let _ = serde_json::from_slice::<VerifyRequest>(data);
    let _ = serde_json::from_slice::<PruneRequest>(data);
    let _ = serde_json::from_slice::<GcRequest>(data);
    let _ = serde_json::from_slice::<ScheduleRequest>(data);
    let _ = serde_json::from_slice::<RetentionPolicy>(data);
    let _ = serde_json::from_slice::<Quotas>(data);
    let _ = serde_json::from_slice::<CreateToken>(data);
    if let Ok(path) = std::str::from_utf8(data) {
        for method in [axum::http::Method::GET, axum::http::Method::POST, axum::http::Method::DELETE] {
            let callers = [
                Caller { name: "scoped".into(), role: Role::Backup, disks: vec!["vm".into()] },
                Caller { name: "ro".into(), role: Role::ReadOnly, disks: vec![] },
            ];
            for caller in &callers {
                let _ = authorize(caller, &method, path);
            }
        }
    }
});
