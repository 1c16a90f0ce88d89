//! Per-export request counters, read by the agent's `/metrics`. Relaxed
//! atomics: one add per request on the hot path, no lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// The NBD commands counted separately.
pub const COMMANDS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "cache",
    "block_status",
    "rejected",
];

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    requests: [AtomicU64; COMMANDS.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl ExportStats {
    pub(crate) fn count(&self, command: usize, read: u64, written: u64) {
        self.requests[command].fetch_add(1, Ordering::Relaxed);
        if read > 0 {
            self.bytes_read.fetch_add(read, Ordering::Relaxed);
        }
        if written > 0 {
            self.bytes_written.fetch_add(written, Ordering::Relaxed);
        }
    }

    /// Requests per command, in the order of [`COMMANDS`].
    pub fn requests(&self) -> [u64; COMMANDS.len()] {
        std::array::from_fn(|i| self.requests[i].load(Ordering::Relaxed))
    }

    /// Bytes clients read.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes clients wrote (writes; trims and zeroes count their length).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
}
