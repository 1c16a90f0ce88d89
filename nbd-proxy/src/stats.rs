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

/// Commands whose latency is measured (decode to reply), in this order.
pub const TIMED: [&str; 3] = ["read", "write", "flush"];
/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
];

/// One command's latency histogram: a count per bucket (the last is
/// above every bound) and the sum in nanoseconds.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A snapshot of one latency histogram: cumulative counts per bound of
/// [`LATENCY_BUCKETS`], then the total count, and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// Cumulative count for each bound.
    pub cumulative: [u64; LATENCY_BUCKETS.len()],
    /// Every observation.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_seconds: f64,
}

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    requests: [AtomicU64; COMMANDS.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    latency: [Histogram; TIMED.len()],
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

    /// Records how long a request of `TIMED[which]` took.
    pub(crate) fn observe(&self, which: usize, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let b = LATENCY_BUCKETS
            .iter()
            .position(|&u| secs <= u)
            .unwrap_or(LATENCY_BUCKETS.len());
        let h = &self.latency[which];
        h.buckets[b].fetch_add(1, Ordering::Relaxed);
        h.sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The latency histograms, in the order of [`TIMED`].
    pub fn latency(&self) -> [Latency; TIMED.len()] {
        std::array::from_fn(|i| {
            let h = &self.latency[i];
            let mut cumulative = [0u64; LATENCY_BUCKETS.len()];
            let mut run = 0;
            for (j, c) in cumulative.iter_mut().enumerate() {
                run += h.buckets[j].load(Ordering::Relaxed);
                *c = run;
            }
            Latency {
                cumulative,
                count: run + h.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed),
                sum_seconds: h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            }
        })
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
