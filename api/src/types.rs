//! Request and response bodies of `/api/v1`. Requests reject unknown fields
//! so that a typo is an error, not a silently ignored option.

use serde::{Deserialize, Serialize};

/// `GET /api/v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Health {
    /// Always "ok" when the agent answers.
    pub status: String,
    /// Agent version.
    pub version: String,
    /// The NBD data engine in use (`uring` or `pread`).
    pub io_engine: String,
}

/// `POST /api/v1/disks`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// Disk name; also the NBD export name.
    pub name: String,
    /// Path of the raw image file or block device.
    pub image: String,
    /// CBT granularity in bytes (power of two, 4 KiB to 4 MiB; default 64 KiB).
    #[serde(default)]
    pub granularity: Option<u64>,
    /// Serve the disk read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// CBT state of a disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct CbtInfo {
    /// Block size in bytes.
    pub granularity: u64,
    /// Blocks in the image.
    pub blocks: u64,
    /// Dirty blocks.
    pub dirty_blocks: u64,
    /// Bytes covered by dirty blocks.
    pub dirty_bytes: u64,
    /// Whether an incremental backup may rely on the bitmap.
    pub trusted: bool,
    /// Why not, when not trusted.
    pub reason: Option<String>,
    /// A backup checkpoint is active.
    pub checkpoint_active: bool,
}

/// An attached disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DiskInfo {
    /// Disk name and NBD export name.
    pub name: String,
    /// Image path.
    pub image: String,
    /// `file` or `block_device`.
    pub backing: String,
    /// Size in bytes.
    pub size: u64,
    /// Served read-only.
    pub read_only: bool,
    /// Connected NBD clients.
    pub connections: usize,
    /// NBD URIs a client can use.
    pub uris: Vec<String>,
    /// Change tracking.
    pub cbt: CbtInfo,
}

/// `POST /api/v1/backups`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// The disk to back up.
    pub disk: String,
    /// Read the whole disk even when an incremental is possible.
    #[serde(default)]
    pub full: bool,
}

/// `POST /api/v1/restores`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Snapshot id.
    pub snapshot: String,
    /// Absolute path of the target file or block device.
    pub target: String,
    /// Overwrite an existing target.
    #[serde(default)]
    pub force: bool,
}

/// `POST /api/v1/verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Snapshot ids; none or absent means every snapshot.
    #[serde(default)]
    pub snapshots: Option<Vec<String>>,
}

/// A job's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Still running.
    Running,
    /// Finished; see `result`.
    Succeeded,
    /// Failed; see `error`.
    Failed,
    /// Cancelled by the operator.
    Cancelled,
}

/// A long-running job: backup, restore or verify.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// `backup`, `restore` or `verify`.
    pub kind: String,
    /// What it works on (disk, snapshot).
    pub target: String,
    /// State.
    pub state: JobState,
    /// Units done (bytes; chunks for verify).
    pub done: u64,
    /// Units in all (0 until known).
    pub total: u64,
    /// Units per second so far.
    pub rate: f64,
    /// Seconds left at the current rate.
    pub eta_seconds: Option<f64>,
    /// Start time, RFC 3339.
    pub started: String,
    /// Seconds since start (or until the end).
    pub elapsed_seconds: f64,
    /// The result, once succeeded.
    pub result: Option<serde_json::Value>,
    /// The error, once failed or cancelled.
    pub error: Option<String>,
}

/// A snapshot as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: String,
    /// Disk.
    pub disk: String,
    /// Checkpoint time, RFC 3339.
    pub time: String,
    /// `full` or `incremental`.
    #[schema(value_type = String, example = "full")]
    pub kind: novabackup_engine::format::manifest::BackupKind,
    /// Base of an incremental.
    pub parent: Option<String>,
    /// Why this kind.
    pub reason: String,
    /// Image size.
    pub image_size: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// What the backup did.
    #[schema(value_type = Object)]
    pub stats: novabackup_engine::format::manifest::BackupStats,
}

/// `GET /api/v1/store`: the store the agent backs up to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct StoreInfo {
    /// A folder, or the URL of a store server.
    pub location: String,
    /// Bytes used by packs and manifests.
    pub bytes_used: u64,
    /// Snapshots in the store, of every disk.
    pub snapshots: usize,
}

/// One server-sent event of `GET /api/v1/jobs/{id}/events` (documentation
/// only: the wire format is `event: ...` and `data: ...` lines).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// `progress` while the job runs, `end` once it finished.
    pub event: String,
    /// The job, as `GET /api/v1/jobs/{id}` returns it, in JSON.
    pub data: String,
}
