//! The blocking HTTP client of the agent's API, used by the CLI.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApiError, ErrorBody};
use crate::types::{
    AttachRequest, BackupRequest, CbtInfo, DiskInfo, Health, JobInfo, PruneRequest, Quotas,
    RestoreRequest, RetentionPolicy, ScheduleInfo, ScheduleRequest, SnapshotInfo, VerifyRequest,
};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error.
    #[error("{error}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The agent's error.
        error: ApiError,
    },
    /// The agent could not be reached.
    #[error("cannot reach the novabackup agent at {url}: {why}. Is `novabackup agent` running? (pass --api or --data-dir to point at it)")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Transport error.
        why: String,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer from the agent at {url}: {why}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        why: String,
    },
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:7810`).
    pub fn new(base: &str, token: Option<String>) -> Client {
        Self::with_tls(base, token, None).expect("no TLS, nothing to fail")
    }

    /// A client for `base`; an `https://` agent's certificate is pinned by
    /// `fingerprint` (`sha256:...`, see `novabackup_api::tls`).
    pub fn with_tls(
        base: &str,
        token: Option<String>,
        fingerprint: Option<&str>,
    ) -> Result<Client, crate::tls::TlsError> {
        let mut b = ureq::AgentBuilder::new().timeout_connect(std::time::Duration::from_secs(5));
        if let Some(fp) = fingerprint {
            b = b.tls_connector(std::sync::Arc::new(crate::tls::BufferedConnector(
                crate::tls::pinned_client(fp)?,
            )));
        }
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent: b.build(),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<ureq::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = self.request(method, path);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(b) => Err(ClientError::Api {
                        status,
                        error: b.error,
                    }),
                    Err(_) => Err(ClientError::Protocol {
                        url,
                        why: format!("HTTP {status}: {text}"),
                    }),
                }
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Unreachable {
                url,
                why: t.to_string(),
            }),
        }
    }

    fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(method, path, body)?
            .into_json()
            .map_err(|e| ClientError::Protocol {
                url,
                why: e.to_string(),
            })
    }

    /// `GET /api/v1/health`.
    pub fn health(&self) -> Result<Health, ClientError> {
        self.json("GET", "/api/v1/health", None::<&()>)
    }

    /// `GET /api/v1/tokens`.
    pub fn tokens(&self) -> Result<Vec<crate::auth::TokenInfo>, ClientError> {
        self.json("GET", "/api/v1/tokens", None::<&()>)
    }

    /// `POST /api/v1/tokens`.
    pub fn create_token(
        &self,
        req: &crate::auth::CreateToken,
    ) -> Result<crate::auth::CreatedToken, ClientError> {
        self.json("POST", "/api/v1/tokens", Some(req))
    }

    /// `DELETE /api/v1/tokens/{id}`.
    pub fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        self.send(
            "DELETE",
            &format!("/api/v1/tokens/{}", enc(id)),
            None::<&()>,
        )
        .map(drop)
    }

    /// `GET /api/v1/store`.
    pub fn store_info(&self) -> Result<crate::types::StoreInfo, ClientError> {
        self.json("GET", "/api/v1/store", None::<&()>)
    }

    /// `GET /api/v1/disks`.
    pub fn disks(&self) -> Result<Vec<DiskInfo>, ClientError> {
        self.json("GET", "/api/v1/disks", None::<&()>)
    }

    /// `GET /api/v1/disks/{name}`.
    pub fn disk(&self, name: &str) -> Result<DiskInfo, ClientError> {
        self.json("GET", &format!("/api/v1/disks/{}", enc(name)), None::<&()>)
    }

    /// `POST /api/v1/disks`.
    pub fn attach(&self, req: &AttachRequest) -> Result<DiskInfo, ClientError> {
        self.json("POST", "/api/v1/disks", Some(req))
    }

    /// `DELETE /api/v1/disks/{name}`; `force` disconnects its NBD clients.
    pub fn detach(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let q = if force { "?force=true" } else { "" };
        self.send(
            "DELETE",
            &format!("/api/v1/disks/{}{q}", enc(name)),
            None::<&()>,
        )
        .map(drop)
    }

    /// `GET /api/v1/disks/{name}/cbt`.
    pub fn cbt(&self, name: &str) -> Result<CbtInfo, ClientError> {
        self.json(
            "GET",
            &format!("/api/v1/disks/{}/cbt", enc(name)),
            None::<&()>,
        )
    }

    /// `POST /api/v1/disks/{name}/cbt/reset`.
    pub fn cbt_reset(&self, name: &str) -> Result<CbtInfo, ClientError> {
        self.json(
            "POST",
            &format!("/api/v1/disks/{}/cbt/reset", enc(name)),
            None::<&()>,
        )
    }
}

impl Client {
    /// `POST /api/v1/backups`.
    pub fn backup(&self, req: &BackupRequest) -> Result<JobInfo, ClientError> {
        self.json("POST", "/api/v1/backups", Some(req))
    }

    /// `POST /api/v1/restores`.
    pub fn restore(&self, req: &RestoreRequest) -> Result<JobInfo, ClientError> {
        self.json("POST", "/api/v1/restores", Some(req))
    }

    /// `POST /api/v1/mounts`.
    pub fn mount(
        &self,
        req: &crate::types::MountRequest,
    ) -> Result<crate::types::MountInfo, ClientError> {
        self.json("POST", "/api/v1/mounts", Some(req))
    }

    /// `GET /api/v1/mounts`.
    pub fn mounts(&self) -> Result<Vec<crate::types::MountInfo>, ClientError> {
        self.json("GET", "/api/v1/mounts", None::<&()>)
    }

    /// `DELETE /api/v1/mounts/{name}`; `force` disconnects its clients.
    pub fn unmount(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let q = if force { "?force=true" } else { "" };
        self.send(
            "DELETE",
            &format!("/api/v1/mounts/{}{q}", enc(name)),
            None::<&()>,
        )
        .map(drop)
    }

    /// `POST /api/v1/mounts/{name}/promote`.
    pub fn promote(&self, name: &str, to: &str) -> Result<JobInfo, ClientError> {
        self.json(
            "POST",
            &format!("/api/v1/mounts/{}/promote", enc(name)),
            Some(&crate::types::PromoteRequest { to: to.to_string() }),
        )
    }

    /// `POST /api/v1/verify`.
    pub fn verify(&self, req: &VerifyRequest) -> Result<JobInfo, ClientError> {
        self.json("POST", "/api/v1/verify", Some(req))
    }

    /// `GET /api/v1/snapshots[?disk=]`.
    pub fn snapshots(&self, disk: Option<&str>) -> Result<Vec<SnapshotInfo>, ClientError> {
        let q = disk
            .map(|d| format!("?disk={}", enc(d)))
            .unwrap_or_default();
        self.json("GET", &format!("/api/v1/snapshots{q}"), None::<&()>)
    }

    /// `GET /api/v1/snapshots/{id}`.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotInfo, ClientError> {
        self.json(
            "GET",
            &format!("/api/v1/snapshots/{}", enc(id)),
            None::<&()>,
        )
    }

    /// `GET /api/v1/snapshots/{id}/partitions`.
    pub fn partitions(&self, id: &str) -> Result<crate::types::PartitionTable, ClientError> {
        self.json(
            "GET",
            &format!("/api/v1/snapshots/{}/partitions", enc(id)),
            None::<&()>,
        )
    }

    /// `GET /api/v1/snapshots/{id}/files?path=&partition=`.
    pub fn files(
        &self,
        id: &str,
        path: &str,
        partition: Option<u32>,
    ) -> Result<Vec<crate::types::FileEntry>, ClientError> {
        let p = partition
            .map(|n| format!("&partition={n}"))
            .unwrap_or_default();
        self.json(
            "GET",
            &format!("/api/v1/snapshots/{}/files?path={}{p}", enc(id), enc(path)),
            None::<&()>,
        )
    }

    /// `POST /api/v1/snapshots/{id}/files/tar`: the archive as it streams.
    pub fn files_tar(
        &self,
        id: &str,
        req: &crate::types::FilesRequest,
    ) -> Result<Box<dyn std::io::Read + Send + Sync>, ClientError> {
        let r = self.send(
            "POST",
            &format!("/api/v1/snapshots/{}/files/tar", enc(id)),
            Some(req),
        )?;
        Ok(Box::new(r.into_reader()))
    }

    /// `DELETE /api/v1/snapshots/{id}`.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), ClientError> {
        self.send(
            "DELETE",
            &format!("/api/v1/snapshots/{}", enc(id)),
            None::<&()>,
        )
        .map(drop)
    }

    /// `GET /api/v1/jobs`.
    pub fn jobs(&self) -> Result<Vec<JobInfo>, ClientError> {
        self.json("GET", "/api/v1/jobs", None::<&()>)
    }

    /// `GET /api/v1/jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<JobInfo, ClientError> {
        self.json("GET", &format!("/api/v1/jobs/{}", enc(id)), None::<&()>)
    }

    /// `GET /api/v1/jobs/{id}?wait_ms=`: the job once it has ended or
    /// after `wait`, whichever comes first.
    pub fn wait_job(&self, id: &str, wait: std::time::Duration) -> Result<JobInfo, ClientError> {
        let path = format!("/api/v1/jobs/{}?wait_ms={}", enc(id), wait.as_millis());
        self.json("GET", &path, None::<&()>)
    }

    /// `POST /api/v1/jobs/{id}/cancel`.
    pub fn cancel(&self, id: &str) -> Result<JobInfo, ClientError> {
        self.json(
            "POST",
            &format!("/api/v1/jobs/{}/cancel", enc(id)),
            None::<&()>,
        )
    }

    /// `POST /api/v1/jobs/{id}/resume`.
    pub fn resume(&self, id: &str) -> Result<JobInfo, ClientError> {
        self.json(
            "POST",
            &format!("/api/v1/jobs/{}/resume", enc(id)),
            None::<&()>,
        )
    }
}

impl Client {
    /// `POST /api/v1/snapshots/{id}/protect` or `.../unprotect`.
    pub fn protect(&self, id: &str, protected: bool) -> Result<SnapshotInfo, ClientError> {
        let verb = if protected { "protect" } else { "unprotect" };
        self.json(
            "POST",
            &format!("/api/v1/snapshots/{}/{verb}", enc(id)),
            None::<&()>,
        )
    }

    /// `GET /api/v1/retention/policies`.
    pub fn policies(&self) -> Result<Vec<RetentionPolicy>, ClientError> {
        self.json("GET", "/api/v1/retention/policies", None::<&()>)
    }

    /// `POST /api/v1/retention/policies` (create) or `PUT .../{name}`.
    pub fn put_policy(
        &self,
        p: &RetentionPolicy,
        create: bool,
    ) -> Result<RetentionPolicy, ClientError> {
        if create {
            self.json("POST", "/api/v1/retention/policies", Some(p))
        } else {
            self.json(
                "PUT",
                &format!("/api/v1/retention/policies/{}", enc(&p.name)),
                Some(p),
            )
        }
    }

    /// `DELETE /api/v1/retention/policies/{name}`.
    pub fn delete_policy(&self, name: &str) -> Result<(), ClientError> {
        self.send(
            "DELETE",
            &format!("/api/v1/retention/policies/{}", enc(name)),
            None::<&()>,
        )
        .map(drop)
    }

    /// `POST /api/v1/prune`.
    pub fn prune(&self, req: &PruneRequest) -> Result<JobInfo, ClientError> {
        self.json("POST", "/api/v1/prune", Some(req))
    }

    /// `POST /api/v1/sync`.
    pub fn sync(&self, req: &crate::types::SyncRequest) -> Result<JobInfo, ClientError> {
        self.json("POST", "/api/v1/sync", Some(req))
    }

    /// `POST /api/v1/gc`.
    pub fn gc(&self, req: &crate::types::GcRequest) -> Result<JobInfo, ClientError> {
        self.json("POST", "/api/v1/gc", Some(req))
    }

    /// `GET /api/v1/schedules`.
    pub fn schedules(&self) -> Result<Vec<ScheduleInfo>, ClientError> {
        self.json("GET", "/api/v1/schedules", None::<&()>)
    }

    /// `POST /api/v1/schedules` (no id) or `PUT /api/v1/schedules/{id}`.
    pub fn put_schedule(
        &self,
        req: &ScheduleRequest,
        id: Option<&str>,
    ) -> Result<ScheduleInfo, ClientError> {
        match id {
            None => self.json("POST", "/api/v1/schedules", Some(req)),
            Some(id) => self.json("PUT", &format!("/api/v1/schedules/{}", enc(id)), Some(req)),
        }
    }

    /// `DELETE /api/v1/schedules/{id}`.
    pub fn delete_schedule(&self, id: &str) -> Result<(), ClientError> {
        self.send(
            "DELETE",
            &format!("/api/v1/schedules/{}", enc(id)),
            None::<&()>,
        )
        .map(drop)
    }

    /// `GET /api/v1/quotas`.
    pub fn quotas(&self) -> Result<Quotas, ClientError> {
        self.json("GET", "/api/v1/quotas", None::<&()>)
    }

    /// `PUT /api/v1/quotas`.
    pub fn set_quotas(&self, q: &Quotas) -> Result<Quotas, ClientError> {
        self.json("PUT", "/api/v1/quotas", Some(q))
    }
}

/// Percent-encodes a path segment (disk names are plain, but a typo with a
/// slash or space must reach the agent as one segment and fail there).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
