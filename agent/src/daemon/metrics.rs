//! `/metrics`: the agent's state in the Prometheus text format (version
//! 0.0.4), rendered by hand: a few dozen lines do not need a metrics crate.

use std::fmt::Write;

use nbd_proxy::stats::COMMANDS;

use super::jobs::{Totals, DURATION_BUCKETS};

/// What one scrape reports about a disk.
pub struct DiskSample {
    /// Disk name.
    pub name: String,
    /// Requests per command (see `nbd_proxy::stats::COMMANDS`).
    pub requests: [u64; COMMANDS.len()],
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// Bytes the CBT bitmap marks dirty.
    pub dirty_bytes: u64,
    /// Open NBD connections.
    pub connections: usize,
    /// Latency histograms of reads, writes and flushes.
    pub latency: [nbd_proxy::stats::Latency; 3],
}

/// What one scrape reports about the store.
pub struct StoreSample {
    /// Bytes used.
    pub bytes: u64,
    /// Snapshots.
    pub snapshots: usize,
    /// Distinct stored chunks, when the store knows cheaply.
    pub chunks: Option<u64>,
    /// The store's size limit.
    pub limit: Option<u64>,
    /// Per disk: bytes its snapshots added, and its limit.
    pub disks: Vec<(String, u64, Option<u64>)>,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Label values escaped as the text format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(t: &Totals, disks: &[DiskSample], store: &StoreSample) -> String {
    let mut o = String::new();
    for (i, (name, help)) in [
        (
            "novabackup_backup_read_bytes_total",
            "Bytes read by successful backups.",
        ),
        (
            "novabackup_backup_new_bytes_total",
            "Bytes successful backups found missing from the store.",
        ),
        (
            "novabackup_backup_stored_bytes_total",
            "Bytes successful backups stored after compression.",
        ),
    ]
    .iter()
    .enumerate()
    {
        header(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", t.backup_bytes[i]);
    }
    header(
        &mut o,
        "novabackup_jobs_total",
        "counter",
        "Finished jobs by kind and outcome.",
    );
    for ((kind, state), n) in &t.outcomes {
        let _ = writeln!(
            o,
            "novabackup_jobs_total{{kind=\"{}\",state=\"{}\"}} {n}",
            esc(kind),
            esc(state)
        );
    }
    header(
        &mut o,
        "novabackup_job_duration_seconds",
        "histogram",
        "Wall time of finished jobs.",
    );
    for (kind, (buckets, sum)) in &t.durations {
        let k = esc(kind);
        let mut cum = 0;
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            cum += buckets[i];
            let _ = writeln!(
                o,
                "novabackup_job_duration_seconds_bucket{{kind=\"{k}\",le=\"{le}\"}} {cum}"
            );
        }
        cum += buckets[DURATION_BUCKETS.len()];
        let _ = writeln!(
            o,
            "novabackup_job_duration_seconds_bucket{{kind=\"{k}\",le=\"+Inf\"}} {cum}"
        );
        let _ = writeln!(
            o,
            "novabackup_job_duration_seconds_sum{{kind=\"{k}\"}} {sum}"
        );
        let _ = writeln!(
            o,
            "novabackup_job_duration_seconds_count{{kind=\"{k}\"}} {cum}"
        );
    }
    header(
        &mut o,
        "novabackup_nbd_requests_total",
        "counter",
        "NBD requests by disk and command (rejected: refused by the decoder).",
    );
    for d in disks {
        for (c, n) in COMMANDS.iter().zip(d.requests) {
            let _ = writeln!(
                o,
                "novabackup_nbd_requests_total{{disk=\"{}\",command=\"{c}\"}} {n}",
                esc(&d.name)
            );
        }
    }
    for (name, help, f) in [
        (
            "novabackup_nbd_read_bytes_total",
            "Bytes NBD clients read.",
            (|d: &DiskSample| d.bytes_read) as fn(&DiskSample) -> u64,
        ),
        (
            "novabackup_nbd_written_bytes_total",
            "Bytes NBD clients wrote, trimmed or zeroed.",
            |d| d.bytes_written,
        ),
        (
            "novabackup_cbt_dirty_bytes",
            "Bytes changed since the last backup's checkpoint.",
            |d| d.dirty_bytes,
        ),
        ("novabackup_nbd_connections", "Open NBD connections.", |d| {
            d.connections as u64
        }),
    ] {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        header(&mut o, name, kind, help);
        for d in disks {
            let _ = writeln!(o, "{name}{{disk=\"{}\"}} {}", esc(&d.name), f(d));
        }
    }
    header(
        &mut o,
        "novabackup_nbd_request_duration_seconds",
        "histogram",
        "Time from decoding an NBD request to its reply being ready, by disk and command.",
    );
    for d in disks {
        let disk = esc(&d.name);
        for (c, l) in nbd_proxy::stats::TIMED.iter().zip(&d.latency) {
            let name = "novabackup_nbd_request_duration_seconds";
            for (le, n) in nbd_proxy::stats::LATENCY_BUCKETS.iter().zip(l.cumulative) {
                let _ = writeln!(
                    o,
                    "{name}_bucket{{disk=\"{disk}\",command=\"{c}\",le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                o,
                "{name}_bucket{{disk=\"{disk}\",command=\"{c}\",le=\"+Inf\"}} {}",
                l.count
            );
            let _ = writeln!(
                o,
                "{name}_sum{{disk=\"{disk}\",command=\"{c}\"}} {}",
                l.sum_seconds
            );
            let _ = writeln!(
                o,
                "{name}_count{{disk=\"{disk}\",command=\"{c}\"}} {}",
                l.count
            );
        }
    }
    header(
        &mut o,
        "novabackup_store_bytes",
        "gauge",
        "Bytes the store uses.",
    );
    let _ = writeln!(o, "novabackup_store_bytes {}", store.bytes);
    header(
        &mut o,
        "novabackup_store_snapshots",
        "gauge",
        "Snapshots in the store.",
    );
    let _ = writeln!(o, "novabackup_store_snapshots {}", store.snapshots);
    if let Some(c) = store.chunks {
        header(
            &mut o,
            "novabackup_store_chunks",
            "gauge",
            "Distinct chunks in the store.",
        );
        let _ = writeln!(o, "novabackup_store_chunks {c}");
    }
    if let Some(l) = store.limit {
        header(
            &mut o,
            "novabackup_store_quota_bytes",
            "gauge",
            "The store's size limit.",
        );
        let _ = writeln!(o, "novabackup_store_quota_bytes {l}");
    }
    header(
        &mut o,
        "novabackup_disk_store_bytes",
        "gauge",
        "Bytes a disk's existing snapshots added to the store (what its quota counts).",
    );
    for (d, b, _) in &store.disks {
        let _ = writeln!(o, "novabackup_disk_store_bytes{{disk=\"{d}\"}} {b}");
    }
    header(
        &mut o,
        "novabackup_disk_quota_bytes",
        "gauge",
        "A disk's size limit.",
    );
    for (d, _, l) in &store.disks {
        if let Some(l) = l {
            let _ = writeln!(o, "novabackup_disk_quota_bytes{{disk=\"{d}\"}} {l}");
        }
    }
    header(
        &mut o,
        "novabackup_cbt_audits_total",
        "counter",
        "Backups that audited change tracking.",
    );
    let _ = writeln!(o, "novabackup_cbt_audits_total {}", t.audits);
    header(
        &mut o,
        "novabackup_cbt_audit_mismatches_total",
        "counter",
        "Chunks audits found changed although change tracking said unchanged (missed writes; should stay 0).",
    );
    let _ = writeln!(
        o,
        "novabackup_cbt_audit_mismatches_total {}",
        t.audit_mismatches
    );
    o
}
