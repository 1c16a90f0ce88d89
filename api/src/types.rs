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
    /// NBD clients that may open the disk: `uid:N`, `gid:N` (unix-socket
    /// peers) or certificate subjects such as `CN=host,O=org` (TLS
    /// clients). Empty: any client the listener admits.
    #[serde(default)]
    pub allow: Vec<String>,
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
    /// NBD clients that may open the disk (empty: any the listener admits).
    #[serde(default)]
    pub allow: Vec<String>,
    /// NBD URIs a client can use.
    pub uris: Vec<String>,
    /// Change tracking.
    pub cbt: CbtInfo,
    /// While a live restore fills the disk: from which snapshot, how far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<FillInfo>,
}

/// A disk or mount being filled from a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FillInfo {
    /// The snapshot the bytes come from.
    pub snapshot: String,
    /// Chunks already in the image.
    pub filled: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The job filling the rest in the background, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// `POST /api/v1/mounts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// Snapshot id.
    pub snapshot: String,
    /// The export name (default: `mount-N`).
    #[serde(default)]
    pub name: Option<String>,
    /// Accept writes into a local copy-on-write overlay (never into the
    /// store).
    #[serde(default)]
    pub writable: bool,
    /// NBD clients that may open the mount (as for disks).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A snapshot served as an NBD export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct MountInfo {
    /// The export name.
    pub name: String,
    /// The snapshot served.
    pub snapshot: String,
    /// Writes go to the overlay.
    pub writable: bool,
    /// Size in bytes.
    pub size: u64,
    /// The local file holding fetched blocks and writes.
    pub overlay: String,
    /// Where the mount is being (or was) turned into a real disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_to: Option<String>,
    /// Connected NBD clients.
    pub connections: usize,
    /// NBD URIs a client can use.
    pub uris: Vec<String>,
    /// How much of the snapshot is local.
    pub fill: FillInfo,
}

/// `POST /api/v1/mounts/{name}/promote`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The absolute path the mount's image becomes (on the file system of
    /// the agent's data folder, where the overlay lives).
    pub to: String,
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
    /// Read the whole disk and check change tracking against it: every
    /// chunk tracking calls unchanged must equal the base snapshot's.
    #[serde(default)]
    pub audit: bool,
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
    /// Attach the target as a disk at once and fill it in the background
    /// (needs an admin token, as attaching does).
    #[serde(default)]
    pub live: bool,
    /// The disk name for a live restore (default: the snapshot's disk).
    #[serde(default)]
    pub attach: Option<String>,
}

/// `POST /api/v1/verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Snapshot ids; none or absent means every snapshot.
    #[serde(default)]
    pub snapshots: Option<Vec<String>>,
    /// Only this disk's snapshots (when `snapshots` is absent).
    #[serde(default)]
    pub disk: Option<String>,
    /// Skip snapshots verified successfully within this long (`7d`).
    #[serde(default)]
    pub skip_verified_within: Option<String>,
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
    /// The disks it acts on; empty for host-wide work (gc, verify of
    /// every disk). Tokens limited to disks see only jobs on theirs.
    #[serde(default)]
    pub disks: Vec<String>,
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
    /// Never pruned while set.
    pub protected: bool,
    /// The last verification: time, outcome, problems found.
    #[schema(value_type = Option<Object>)]
    pub verified: Option<novabackup_engine::format::manifest::Verification>,
    /// What the change-tracking audit found, if this backup was one.
    #[schema(value_type = Option<Object>)]
    pub audit: Option<novabackup_engine::format::manifest::AuditRecord>,
}

/// A retention policy: for one disk, or (without `disk`) for every disk
/// that has none of its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Policy name (letters, digits, `._-`).
    pub name: String,
    /// The disk it applies to; absent: all disks without their own.
    #[serde(default)]
    pub disk: Option<String>,
    /// The keep rules: keep_last, keep_hourly, keep_daily, keep_weekly,
    /// keep_monthly, keep_yearly (counts), keep_within (`30d`), timezone.
    #[schema(value_type = Object)]
    pub rules: novabackup_engine::retention::Policy,
}

/// `POST /api/v1/prune`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Only this disk; absent: every disk with snapshots.
    #[serde(default)]
    pub disk: Option<String>,
    /// Decide and report, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /api/v1/gc` (an empty body means the defaults).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Rewrite only packs at least this many percent unreferenced (0-100;
    /// default 0: every unreferenced chunk goes).
    #[serde(default)]
    pub min_garbage_percent: u8,
}

/// `POST /api/v1/sync`: copy this agent's snapshots to another site's store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The target site, as the agent's configuration names it (`sites`).
    pub site: String,
    /// Only these disks (default: every disk).
    #[serde(default)]
    pub disks: Vec<String>,
    /// Only each disk's newest N snapshots.
    #[serde(default)]
    pub newest: Option<u32>,
    /// Bytes per second at most sent to the target.
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// What a schedule runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleAction {
    /// A backup (of the disk, or of every attached disk).
    Backup,
    /// Retention.
    Prune,
    /// Garbage collection of the store (`disk` must be absent).
    Gc,
    /// Verification.
    Verify,
    /// Replication to another site's store (`site` names it).
    Sync,
}

/// `POST /api/v1/schedules` and `PUT /api/v1/schedules/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// Schedule id (letters, digits, `._-`); chosen by the agent if absent.
    #[serde(default)]
    pub id: Option<String>,
    /// What to run.
    pub action: ScheduleAction,
    /// The disk; absent: every disk.
    #[serde(default)]
    pub disk: Option<String>,
    /// Cron expression: 5 fields (minute hour day month weekday), an
    /// optional leading seconds field, or `@daily`-style nicknames.
    pub cron: String,
    /// IANA time zone of the expression; UTC if absent.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Paused when false.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Backup: read everything.
    #[serde(default)]
    pub full: bool,
    /// Backup: audit change tracking.
    #[serde(default)]
    pub audit: bool,
    /// Verify: skip snapshots verified within this long (`7d`).
    #[serde(default)]
    pub skip_verified_within: Option<String>,
    /// Gc: rewrite only packs at least this many percent unreferenced.
    #[serde(default)]
    pub min_garbage_percent: Option<u8>,
    /// Sync: the target site, as the agent's configuration names it.
    /// Left out of other schedules' JSON, which stays as older agents
    /// wrote it (the package upgrade test compares it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

fn yes() -> bool {
    true
}

/// A schedule, with its run times.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ScheduleInfo {
    /// Schedule id.
    pub id: String,
    /// The schedule as configured.
    pub spec: ScheduleRequest,
    /// Last time it fired, RFC 3339.
    pub last_run: Option<String>,
    /// Next time it fires, RFC 3339 (absent when paused).
    pub next_run: Option<String>,
}

/// `GET/PUT /api/v1/quotas`: size limits in bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Limit of the whole store.
    #[serde(default)]
    pub store: Option<u64>,
    /// Per-disk limits of what the disk's snapshots added to the store.
    #[serde(default)]
    pub disks: std::collections::BTreeMap<String, u64>,
}

/// Usage of one disk against its quota.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DiskUsage {
    /// Disk.
    pub disk: String,
    /// Bytes its existing snapshots added to the store.
    pub bytes: u64,
    /// Its limit.
    pub limit: Option<u64>,
    /// Its snapshots.
    pub snapshots: usize,
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
    /// The store's size limit.
    pub limit: Option<u64>,
    /// Per disk: bytes, limit, snapshots.
    pub disks: Vec<DiskUsage>,
    /// Schedules with their next run.
    pub schedules: Vec<ScheduleInfo>,
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

impl From<&Quotas> for novabackup_engine::ops::quota::Limits {
    fn from(q: &Quotas) -> Self {
        novabackup_engine::ops::quota::Limits {
            store: q.store,
            disks: q.disks.clone(),
        }
    }
}

impl From<novabackup_engine::ops::quota::DiskUsage> for DiskUsage {
    fn from(u: novabackup_engine::ops::quota::DiskUsage) -> Self {
        DiskUsage {
            disk: u.disk,
            bytes: u.bytes,
            limit: u.limit,
            snapshots: u.snapshots,
        }
    }
}

/// A snapshot's partition table (`GET /api/v1/snapshots/{id}/partitions`).
pub use novabackup_engine::partitions::{Partition as PartitionInfo, PartitionTable};

/// An entry of a folder in a snapshot (`GET /api/v1/snapshots/{id}/files`).
pub use novabackup_engine::files::FileEntry;

/// Files and folders to download from a snapshot as a tar stream
/// (`POST /api/v1/snapshots/{id}/files/tar`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesRequest {
    /// Paths of files or folders (whole trees) in the file system.
    pub paths: Vec<String>,
    /// The partition's number (default: the disk's only file system).
    #[serde(default)]
    pub partition: Option<u32>,
}
