//! Router tests with `oneshot`: no socket. The service is a small in-memory
//! implementation of our own trait.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::*;

#[derive(Default)]
struct Mem(Mutex<BTreeMap<String, DiskInfo>>);

fn cbt() -> CbtInfo {
    CbtInfo {
        granularity: 65536,
        blocks: 16,
        dirty_blocks: 0,
        dirty_bytes: 0,
        trusted: true,
        reason: None,
        checkpoint_active: false,
    }
}

impl DiskService for Mem {
    fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: "t".into(),
            io_engine: "pread".into(),
        }
    }
    fn list(&self) -> Vec<DiskInfo> {
        self.0.lock().unwrap().values().cloned().collect()
    }
    fn get(&self, name: &str) -> Result<DiskInfo, ApiError> {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no disk"))
    }
    fn attach(&self, r: AttachRequest) -> Result<DiskInfo, ApiError> {
        let mut m = self.0.lock().unwrap();
        if m.contains_key(&r.name) {
            return Err(ApiError::new(ErrorCode::Conflict, "taken"));
        }
        let d = DiskInfo {
            name: r.name.clone(),
            image: r.image,
            backing: "file".into(),
            size: 1 << 20,
            read_only: r.read_only,
            connections: 0,
            allow: r.allow,
            uris: vec![],
            cbt: cbt(),
            restoring: None,
        };
        m.insert(r.name, d.clone());
        Ok(d)
    }
    fn detach(&self, name: &str, _force: bool) -> Result<(), ApiError> {
        self.0
            .lock()
            .unwrap()
            .remove(name)
            .map(drop)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no disk"))
    }
    fn cbt(&self, name: &str) -> Result<CbtInfo, ApiError> {
        self.get(name).map(|d| d.cbt)
    }
    fn cbt_reset(&self, name: &str) -> Result<CbtInfo, ApiError> {
        self.cbt(name)
    }
    fn backup(&self, r: BackupRequest) -> Result<JobInfo, ApiError> {
        self.get(&r.disk).map(|_| job())
    }
    fn snapshots(&self, _: Option<&str>) -> Result<Vec<SnapshotInfo>, ApiError> {
        Ok(vec![])
    }
    fn snapshot(&self, _: &str) -> Result<SnapshotInfo, ApiError> {
        Err(ApiError::new(ErrorCode::NotFound, "no snapshot"))
    }
    fn delete_snapshot(&self, _: &str) -> Result<(), ApiError> {
        Err(ApiError::new(ErrorCode::NotFound, "no snapshot"))
    }
    fn verify(&self, _: VerifyRequest) -> Result<JobInfo, ApiError> {
        Ok(job())
    }
    fn restore(&self, _: RestoreRequest) -> Result<JobInfo, ApiError> {
        Err(ApiError::new(ErrorCode::NotFound, "no snapshot"))
    }
    fn jobs(&self) -> Vec<JobInfo> {
        vec![job()]
    }
    fn job(&self, id: &str) -> Result<JobInfo, ApiError> {
        (id == "job-1")
            .then(job)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no job"))
    }
    fn cancel(&self, id: &str) -> Result<JobInfo, ApiError> {
        self.job(id)
    }
    fn metrics(&self) -> Result<String, ApiError> {
        Ok("novabackup_store_bytes 1\n".into())
    }
    fn store_info(&self) -> Result<crate::types::StoreInfo, ApiError> {
        Ok(crate::types::StoreInfo {
            location: "/mem".into(),
            bytes_used: 1,
            snapshots: 0,
            limit: None,
            disks: vec![],
            schedules: vec![],
        })
    }
    fn protect(&self, id: &str, _: bool) -> Result<SnapshotInfo, ApiError> {
        self.snapshot(id)
    }
    fn policies(&self) -> Result<Vec<RetentionPolicy>, ApiError> {
        Ok(vec![])
    }
    fn put_policy(&self, p: RetentionPolicy, _: bool) -> Result<RetentionPolicy, ApiError> {
        Ok(p)
    }
    fn delete_policy(&self, _: &str) -> Result<(), ApiError> {
        Ok(())
    }
    fn prune(&self, _: PruneRequest) -> Result<JobInfo, ApiError> {
        Ok(job())
    }
    fn gc(&self, _: crate::types::GcRequest) -> Result<JobInfo, ApiError> {
        Ok(job())
    }
    fn sync(&self, _: crate::types::SyncRequest) -> Result<JobInfo, ApiError> {
        Ok(job())
    }
    fn schedules(&self) -> Result<Vec<ScheduleInfo>, ApiError> {
        Ok(vec![])
    }
    fn put_schedule(
        &self,
        _: ScheduleRequest,
        _: Option<String>,
    ) -> Result<ScheduleInfo, ApiError> {
        Err(ApiError::new(ErrorCode::BadRequest, "no"))
    }
    fn delete_schedule(&self, _: &str) -> Result<(), ApiError> {
        Ok(())
    }
    fn quotas(&self) -> Result<Quotas, ApiError> {
        Ok(Quotas::default())
    }
    fn set_quotas(&self, q: Quotas) -> Result<Quotas, ApiError> {
        Ok(q)
    }
}

fn job() -> JobInfo {
    JobInfo {
        id: "job-1".into(),
        kind: "backup".into(),
        target: "vm".into(),
        disks: vec!["vm".into()],
        state: crate::types::JobState::Running,
        done: 0,
        total: 0,
        rate: 0.0,
        eta_seconds: None,
        started: String::new(),
        elapsed_seconds: 0.0,
        result: None,
        error: None,
    }
}

fn app() -> Router {
    router(
        Arc::new(Mem::default()),
        Arc::new(crate::auth::Tokens::open(None, "secret").unwrap()),
    )
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(b.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    if resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "text/event-stream")
    {
        // A stream that lasts as long as its job: the status is the answer.
        return (status, serde_json::Value::Null);
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, v)
}

#[tokio::test]
async fn health_needs_no_token_the_rest_does() {
    let a = app();
    assert_eq!(
        call(&a, "GET", "/api/v1/health", None, "").await.0,
        StatusCode::OK
    );
    for (m, u) in [
        ("GET", "/api/v1/disks"),
        ("POST", "/api/v1/disks"),
        ("GET", "/api/v1/disks/x"),
        ("DELETE", "/api/v1/disks/x"),
        ("GET", "/api/v1/disks/x/cbt"),
        ("POST", "/api/v1/disks/x/cbt/reset"),
    ] {
        let (s, v) = call(&a, m, u, None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {u}");
        assert_eq!(v["error"]["code"], "unauthorized");
        assert_eq!(
            call(&a, m, u, Some("wrong"), "").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
}

#[tokio::test]
async fn malformed_bodies_are_json_400s() {
    let a = app();
    for body in [
        "{",
        "[]",
        r#"{"name": 5, "image": "x"}"#,
        r#"{"name": "a", "image": "x", "bogus": 1}"#,
        r#"{"image": "x"}"#,
    ] {
        let (s, v) = call(&a, "POST", "/api/v1/disks", Some("secret"), body).await;
        assert!(s.is_client_error(), "{body}: {s}");
        assert_eq!(v["error"]["code"], "bad_request", "{body}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bad request body"));
    }
}

#[tokio::test]
async fn attach_get_detach() {
    let a = app();
    let (s, v) = call(
        &a,
        "POST",
        "/api/v1/disks",
        Some("secret"),
        r#"{"name":"vm","image":"/x"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["name"], "vm");
    let (s, v) = call(
        &a,
        "POST",
        "/api/v1/disks",
        Some("secret"),
        r#"{"name":"vm","image":"/x"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "conflict");
    assert_eq!(
        call(&a, "GET", "/api/v1/disks/vm/cbt", Some("secret"), "")
            .await
            .1["granularity"],
        65536
    );
    assert_eq!(
        call(&a, "DELETE", "/api/v1/disks/vm", Some("secret"), "")
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&a, "GET", "/api/v1/disks/vm", Some("secret"), "")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, v) = call(&a, "GET", "/api/v1/nope", Some("secret"), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "not_found");
}

#[tokio::test]
async fn job_endpoints() {
    let a = app();
    call(
        &a,
        "POST",
        "/api/v1/disks",
        Some("secret"),
        r#"{"name":"vm","image":"/x"}"#,
    )
    .await;
    let (s, v) = call(
        &a,
        "POST",
        "/api/v1/backups",
        Some("secret"),
        r#"{"disk":"vm"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v["state"], "running");
    let (s, _) = call(
        &a,
        "POST",
        "/api/v1/backups",
        Some("secret"),
        r#"{"disk":"vm","full":"yes"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        call(&a, "GET", "/api/v1/jobs/job-1", Some("secret"), "")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&a, "GET", "/api/v1/jobs/job-9", Some("secret"), "")
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, v) = call(&a, "GET", "/api/v1/snapshots?bogus=1", Some("secret"), "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "bad_request");
}

/// Every route of the access table, called by every kind of token, with
/// path parameters and bodies that name disk `vm`: the answer is 403
/// exactly where the table (role, then scope) says it must be, and the
/// table lists exactly the routes the OpenAPI document has.
#[tokio::test]
async fn every_route_role_and_scope() {
    use crate::auth::{Access, CreateToken, Role, Scope, ROUTES};
    let tokens = Arc::new(crate::auth::Tokens::open(None, "secret").unwrap());
    let a = router(Arc::new(Mem::default()), tokens.clone());
    call(
        &a,
        "POST",
        "/api/v1/disks",
        Some("secret"),
        r#"{"name":"vm","image":"/x"}"#,
    )
    .await;
    call(
        &a,
        "POST",
        "/api/v1/backups",
        Some("secret"),
        r#"{"disk":"vm"}"#,
    )
    .await;
    let mk = |role: Role, disks: &[&str]| {
        tokens
            .create(CreateToken {
                name: format!("{role:?}{disks:?}"),
                role,
                disks: disks.iter().map(|d| d.to_string()).collect(),
            })
            .unwrap()
            .token
    };
    // (token, role, limited to disks, limited to other disks than vm)
    let callers = [
        ("secret".to_string(), Role::Admin, false, false),
        (mk(Role::Backup, &[]), Role::Backup, false, false),
        (mk(Role::Backup, &["vm"]), Role::Backup, true, false),
        (mk(Role::Backup, &["db"]), Role::Backup, true, true),
        (mk(Role::ReadOnly, &[]), Role::ReadOnly, false, false),
    ];
    let doc = serde_json::to_value(<crate::openapi::ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for m in ops.as_object().unwrap().keys() {
            if path != "/api/v1/health" && path != "/api/v1/openapi.json" {
                documented.push((m.to_uppercase(), path.clone()));
            }
        }
    }
    let mut table: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    table.sort();
    assert_eq!(
        documented, table,
        "the access table and the OpenAPI document differ"
    );

    for &(method, pattern, access, scope) in ROUTES {
        let param = if pattern.contains("/snapshots/{id}") {
            "vm%40T"
        } else if pattern.contains("/jobs/{id}") {
            "job-1"
        } else {
            "vm"
        };
        let uri = pattern.replace("{name}", param).replace("{id}", param);
        let body = match pattern {
            "/api/v1/backups" => r#"{"disk":"vm"}"#,
            "/api/v1/restores" => r#"{"snapshot":"vm@20260101T000000Z","target":"/r"}"#,
            "/api/v1/verify" => r#"{"disk":"vm"}"#,
            "/api/v1/prune" => r#"{"disk":"vm"}"#,
            _ => "{}",
        };
        for (token, role, limited, other) in &callers {
            let role_ok = match access {
                Access::Read => true,
                Access::Operate => *role != Role::ReadOnly,
                Access::Admin => *role == Role::Admin,
            };
            let scope_ok = match scope {
                Scope::Host => !limited,
                Scope::DiskParam | Scope::SnapshotParam | Scope::Handler => !other,
                Scope::Filtered => true,
            };
            let (s, v) = call(&a, method, &uri, Some(token), body).await;
            let forbidden = s == StatusCode::FORBIDDEN;
            assert_eq!(
                forbidden,
                !(role_ok && scope_ok),
                "{method} {uri} as {role:?} limited={limited} other={other}: {s} {v}"
            );
            if !forbidden && scope == Scope::Filtered && *other {
                assert_eq!(
                    v,
                    serde_json::json!([]),
                    "{method} {uri} leaks to another disk's token"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_oversized_body_and_a_wrong_method_answer_json() {
    let a = app();
    let big = format!("{{\"x\": \"{}\"}}", "a".repeat(3 << 20));
    let (s, v) = call(&a, "POST", "/api/v1/gc", Some("secret"), &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
    let (s, v) = call(&a, "PATCH", "/api/v1/gc", Some("secret"), "{}").await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
}
