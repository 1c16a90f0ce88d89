//! Request and response bodies of `/api/v1`. Requests reject unknown fields
//! so that a typo is an error, not a silently ignored option.

use serde::{Deserialize, Serialize};

/// `GET /api/v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// Always "ok" when the agent answers.
    pub status: String,
    /// Agent version.
    pub version: String,
    /// The NBD data engine in use (`uring` or `pread`).
    pub io_engine: String,
}

/// `POST /api/v1/disks`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
