//! `novabackup prune`, `gc`, `retention`, `schedule` and `quota`: the
//! store looking after itself.

use clap::{Args, Subcommand};
use novabackup_api::types::{
    PruneRequest, Quotas, RetentionPolicy, ScheduleAction, ScheduleRequest,
};
use novabackup_api::Client;
use novabackup_engine::retention::Policy;
use novabackup_engine::size::{format_size, parse_size};

use super::job;

/// `novabackup prune [DISK]`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only this disk (default: every disk with snapshots).
    disk: Option<String>,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn prune(client: &Client, a: PruneArgs) -> anyhow::Result<()> {
    let j = client.prune(&PruneRequest {
        disk: a.disk,
        dry_run: a.dry_run,
    })?;
    let j = job::wait(client, j, true, "snapshots")?;
    let r = job::result(&j)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let disks = r["disks"].as_array().cloned().unwrap_or_default();
    if disks.is_empty() {
        println!("no snapshots to prune");
    }
    for d in disks {
        println!(
            "disk {} (policy: {})",
            d["disk"].as_str().unwrap_or("?"),
            d["policy"].as_str().unwrap_or("?")
        );
        for s in d["snapshots"].as_array().into_iter().flatten() {
            let reasons: Vec<&str> = s["reasons"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str())
                .collect();
            let action = match (s["action"].as_str().unwrap_or("?"), a.dry_run) {
                ("remove", true) => "would remove",
                (x, _) => x,
            };
            println!(
                "  {:<36} {:<14} {}",
                s["id"].as_str().unwrap_or("?"),
                action,
                reasons.join(", ")
            );
        }
    }
    if a.dry_run {
        println!("dry run: nothing removed");
    } else {
        println!(
            "{} snapshot(s) removed; `novabackup gc` frees their space",
            r["removed"]
        );
    }
    Ok(())
}

pub fn gc(client: &Client, min_garbage: u8, json: bool) -> anyhow::Result<()> {
    let req = novabackup_api::types::GcRequest {
        min_garbage_percent: min_garbage,
    };
    let j = job::wait(client, client.gc(&req)?, json, "steps")?;
    let r = job::result(&j)?;
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    println!(
        "garbage collection: {} chunks and index pages removed, {} still referenced by {} snapshots",
        n("chunks_removed"),
        n("live_chunks"),
        n("snapshots")
    );
    println!(
        "  packs: {} scanned, {} deleted, {} rewritten",
        n("packs_scanned"),
        n("packs_deleted"),
        n("packs_rewritten")
    );
    if n("packs_below_threshold") > 0 {
        println!(
            "  {} pack(s) under the threshold kept {} unreferenced",
            n("packs_below_threshold"),
            format_size(n("bytes_left"))
        );
    }
    println!(
        "  store: {} -> {} (freed {}) in {:.2} s",
        format_size(n("bytes_before")),
        format_size(n("bytes_after")),
        format_size(n("bytes_before").saturating_sub(n("bytes_after"))),
        n("duration_ms") as f64 / 1000.0
    );
    Ok(())
}

/// The keep rules on the command line.
#[derive(Debug, Args)]
pub struct Rules {
    /// Keep the N newest snapshots.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long)]
    keep_hourly: Option<u32>,
    /// ... days.
    #[arg(long)]
    keep_daily: Option<u32>,
    /// ... ISO weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// ... months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// ... years.
    #[arg(long)]
    keep_yearly: Option<u32>,
    /// Keep every snapshot within this long of the newest (`30d`, `1y6m`).
    #[arg(long)]
    keep_within: Option<String>,
    /// IANA time zone of the calendar periods [default: UTC].
    #[arg(long)]
    timezone: Option<String>,
}

impl Rules {
    fn policy(self) -> Policy {
        Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            timezone: self.timezone,
        }
    }
}

/// `novabackup retention ...`.
#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// List the policies (and which applies when none is set).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create or replace a policy, e.g.
    /// `retention set default --keep-daily 7 --keep-weekly 4`.
    Set {
        /// Policy name.
        name: String,
        /// The disk it covers (default: every disk without its own policy).
        #[arg(long)]
        disk: Option<String>,
        #[command(flatten)]
        rules: Rules,
    },
    /// Delete a policy.
    Delete {
        /// Policy name.
        name: String,
    },
}

fn describe(p: &Policy) -> String {
    let mut v = Vec::new();
    for (k, n) in [
        ("last", p.keep_last),
        ("hourly", p.keep_hourly),
        ("daily", p.keep_daily),
        ("weekly", p.keep_weekly),
        ("monthly", p.keep_monthly),
        ("yearly", p.keep_yearly),
    ] {
        if let Some(n) = n {
            v.push(format!("{k} {n}"));
        }
    }
    if let Some(w) = &p.keep_within {
        v.push(format!("within {w}"));
    }
    v.push(format!("zone {}", p.timezone.as_deref().unwrap_or("UTC")));
    v.join(", ")
}

pub fn retention(client: &Client, c: RetentionCommand) -> anyhow::Result<()> {
    match c {
        RetentionCommand::List { json } => {
            let list = client.policies()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            for p in &list {
                println!(
                    "{:<20} {:<20} {}",
                    p.name,
                    p.disk.as_deref().unwrap_or("all disks"),
                    describe(&p.rules)
                );
            }
            if !list.iter().any(|p| p.disk.is_none()) {
                println!(
                    "{:<20} {:<20} {}",
                    "(built-in default)",
                    "other disks",
                    describe(&Policy::default())
                );
            }
        }
        RetentionCommand::Set { name, disk, rules } => {
            let exists = client.policies()?.iter().any(|p| p.name == name);
            let p = client.put_policy(
                &RetentionPolicy {
                    name,
                    disk,
                    rules: rules.policy(),
                },
                !exists,
            )?;
            println!(
                "policy {} ({}): {}",
                p.name,
                p.disk.as_deref().unwrap_or("all disks"),
                describe(&p.rules)
            );
        }
        RetentionCommand::Delete { name } => {
            client.delete_policy(&name)?;
            println!("policy {name} deleted");
        }
    }
    Ok(())
}

/// A schedule on the command line.
#[derive(Debug, Args)]
pub struct ScheduleSpec {
    /// backup, prune, gc, verify or sync.
    #[arg(value_parser = parse_action)]
    action: ScheduleAction,
    /// Cron expression, e.g. "30 2 * * *" (02:30 daily) or "@weekly".
    #[arg(long)]
    cron: String,
    /// Only this disk (default: every disk).
    #[arg(long)]
    disk: Option<String>,
    /// IANA time zone of the expression [default: UTC].
    #[arg(long)]
    timezone: Option<String>,
    /// Create it paused.
    #[arg(long)]
    disabled: bool,
    /// Backup: read everything.
    #[arg(long)]
    full: bool,
    /// Backup: audit change tracking.
    #[arg(long)]
    audit: bool,
    /// Verify: skip snapshots verified within this long (`7d`).
    #[arg(long)]
    skip_verified_within: Option<String>,
    /// Gc: rewrite only packs at least this many percent unreferenced.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    min_garbage: Option<u8>,
    /// Sync: the target site (named under `sites` in the configuration).
    #[arg(long)]
    site: Option<String>,
}

fn parse_action(s: &str) -> Result<ScheduleAction, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not one of backup, prune, gc, verify, sync"))
}

impl ScheduleSpec {
    fn request(self, id: Option<String>) -> ScheduleRequest {
        ScheduleRequest {
            id,
            action: self.action,
            disk: self.disk,
            cron: self.cron,
            timezone: self.timezone,
            enabled: !self.disabled,
            full: self.full,
            audit: self.audit,
            skip_verified_within: self.skip_verified_within,
            min_garbage_percent: self.min_garbage,
            site: self.site,
        }
    }
}

/// `novabackup schedule ...`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// List schedules with their last and next run.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a schedule, e.g. `schedule add backup --cron "0 1 * * *"`.
    Add {
        /// Its id (default: schedule-N).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        spec: ScheduleSpec,
    },
    /// Replace a schedule.
    Set {
        /// The schedule's id.
        id: String,
        #[command(flatten)]
        spec: ScheduleSpec,
    },
    /// Remove a schedule.
    Remove {
        /// The schedule's id.
        id: String,
    },
}

pub fn schedule(client: &Client, c: ScheduleCommand) -> anyhow::Result<()> {
    match c {
        ScheduleCommand::List { json } => {
            let list = client.schedules()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("no schedules; add one with `novabackup schedule add backup --cron \"0 1 * * *\"`");
                return Ok(());
            }
            println!(
                "{:<16} {:<7} {:<12} {:<18} {:<21} NEXT",
                "ID", "ACTION", "DISK", "CRON", "LAST"
            );
            for s in list {
                println!(
                    "{:<16} {:<7} {:<12} {:<18} {:<21} {}",
                    s.id,
                    serde_json::to_value(s.spec.action)?.as_str().unwrap_or("?"),
                    match (&s.spec.disk, s.spec.action) {
                        (_, ScheduleAction::Gc) => "store",
                        (_, ScheduleAction::Sync) => s.spec.site.as_deref().unwrap_or("?"),
                        (Some(d), _) => d.as_str(),
                        (None, _) => "all",
                    },
                    s.spec.cron,
                    s.last_run.as_deref().unwrap_or("never"),
                    s.next_run.as_deref().unwrap_or("paused")
                );
            }
        }
        ScheduleCommand::Add { id, spec } => {
            let s = client.put_schedule(&spec.request(id), None)?;
            println!(
                "schedule {} added; next run {}",
                s.id,
                s.next_run.as_deref().unwrap_or("never (paused)")
            );
        }
        ScheduleCommand::Set { id, spec } => {
            let s = client.put_schedule(&spec.request(Some(id.clone())), Some(&id))?;
            println!(
                "schedule {} changed; next run {}",
                s.id,
                s.next_run.as_deref().unwrap_or("never (paused)")
            );
        }
        ScheduleCommand::Remove { id } => {
            client.delete_schedule(&id)?;
            println!("schedule {id} removed");
        }
    }
    Ok(())
}

/// `novabackup quota ...`.
#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Show limits and usage.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Limit the store (or, with --disk, what a disk's snapshots add), e.g. `quota set 500G`.
    Set {
        /// The limit (`500G`, `2T`).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Limit this disk instead of the store.
        #[arg(long)]
        disk: Option<String>,
    },
    /// Remove the store's limit (or, with --disk, the disk's).
    Clear {
        /// Clear this disk's instead of the store's.
        #[arg(long)]
        disk: Option<String>,
    },
}

pub fn quota(client: &Client, c: QuotaCommand) -> anyhow::Result<()> {
    let mut q: Quotas = client.quotas()?;
    match c {
        QuotaCommand::Show { json } => {
            let info = client.store_info()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "quotas": q, "store_bytes": info.bytes_used, "disks": info.disks,
                    }))?
                );
                return Ok(());
            }
            let limit = |l: Option<u64>| l.map_or("no limit".to_string(), format_size);
            println!(
                "store: {} used, limit {}",
                format_size(info.bytes_used),
                limit(q.store)
            );
            for d in info.disks {
                println!(
                    "disk {}: {} added by {} snapshot(s), limit {}",
                    d.disk,
                    format_size(d.bytes),
                    d.snapshots,
                    limit(d.limit)
                );
            }
            return Ok(());
        }
        QuotaCommand::Set { size, disk: None } => q.store = Some(size),
        QuotaCommand::Set {
            size,
            disk: Some(d),
        } => {
            q.disks.insert(d, size);
        }
        QuotaCommand::Clear { disk: None } => q.store = None,
        QuotaCommand::Clear { disk: Some(d) } => {
            q.disks.remove(&d);
        }
    }
    let q = client.set_quotas(&q)?;
    println!(
        "store limit: {}",
        q.store.map_or("none".to_string(), format_size)
    );
    for (d, n) in &q.disks {
        println!("disk {d} limit: {}", format_size(*n));
    }
    Ok(())
}
