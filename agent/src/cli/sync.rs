//! `novabackup sync`: copy snapshots from one store to another (a folder,
//! a store server or an `s3://` bucket on either side), moving only what
//! the target lacks; see `novabackup_engine::ops::sync`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use novabackup_engine::ids::DiskName;
use novabackup_engine::ops::sync::{sync, SyncOptions};
use novabackup_engine::progress::Progress;

use crate::daemon::{open_store_at, StoreAccess};

/// `novabackup sync` options: `--site` runs it as a job of the agent,
/// `--from` and `--to` in this process.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["site", "from"])))]
pub struct SyncArgs {
    /// Have the agent copy its store to this site's store (a job, with
    /// progress and cancel; sites are named in the agent's configuration).
    #[arg(long, conflicts_with_all = ["from", "to", "placement", "to_site", "prune", "gc"])]
    pub site: Option<String>,
    /// The store to copy from: a folder, `http(s)://host:7820` or `s3://BUCKET/PREFIX`.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// The store to copy to (same forms).
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// With --site: return once the job has started.
    #[arg(long, requires = "site")]
    pub no_wait: bool,
    /// Only this disk (repeatable; default: every disk).
    #[arg(long = "disk")]
    pub disks: Vec<DiskName>,
    /// Only each disk's newest N snapshots.
    #[arg(long)]
    pub newest: Option<usize>,
    /// Send at most this many bytes per second (e.g. 20M).
    #[arg(long, value_parser = novabackup_engine::size::parse_size)]
    pub bwlimit: Option<u64>,
    /// Make what arrived durable every this many bytes: what an
    /// interruption can cost to send again [default: 256M].
    #[arg(long, value_parser = novabackup_engine::size::parse_size)]
    pub checkpoint: Option<u64>,
    /// The source store server's token file.
    #[arg(long)]
    pub from_token_file: Option<PathBuf>,
    /// The target store server's token file.
    #[arg(long)]
    pub to_token_file: Option<PathBuf>,
    /// The source `s3://` store's credentials file.
    #[arg(long)]
    pub from_credentials: Option<PathBuf>,
    /// The target `s3://` store's credentials file.
    #[arg(long)]
    pub to_credentials: Option<PathBuf>,
    /// Pin the source https store server's certificate (`sha256:...`).
    #[arg(long)]
    pub from_fingerprint: Option<String>,
    /// Pin the target https store server's certificate (`sha256:...`).
    #[arg(long)]
    pub to_fingerprint: Option<String>,
    /// Placement rules: a TOML file with a `[placement]` table (`DISK =
    /// ["site", ...]`), such as the agent's configuration. Disks the rules
    /// keep away from the target's site are not copied.
    #[arg(long)]
    pub placement: Option<PathBuf>,
    /// The target's site, as the placement rules name it.
    #[arg(long)]
    pub to_site: Option<String>,
    /// Afterwards, apply retention to the target: the default policy
    /// (within 30d, daily 7, weekly 4, monthly 12, yearly 7), or the
    /// rules of --keep-last.
    #[arg(long)]
    pub prune: bool,
    /// With --prune: keep only each disk's newest N snapshots.
    #[arg(long, requires = "prune")]
    pub keep_last: Option<u32>,
    /// Afterwards, garbage-collect the target (after --prune, this frees
    /// what the removed snapshots alone held).
    #[arg(long)]
    pub gc: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The `[placement]` table of a TOML file.
fn read_placement(p: &std::path::Path) -> anyhow::Result<novabackup_engine::placement::Placement> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        placement: novabackup_engine::placement::Placement,
    }
    let text = std::fs::read_to_string(p)
        .map_err(|e| anyhow::anyhow!("cannot read the placement rules {}: {e}", p.display()))?;
    let f: File = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the placement rules {} do not parse: {e}", p.display()))?;
    Ok(f.placement)
}

/// Runs a replication as a job of the agent.
pub fn via_agent(client: &novabackup_api::Client, a: SyncArgs) -> anyhow::Result<()> {
    let req = novabackup_api::types::SyncRequest {
        site: a.site.clone().unwrap_or_default(),
        disks: a.disks.iter().map(|d| d.to_string()).collect(),
        newest: a.newest.map(|n| n as u32),
        bandwidth: a.bwlimit,
    };
    let started = client.sync(&req)?;
    if a.no_wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("sync job {} started", started.id);
        }
        return Ok(());
    }
    let j = super::job::wait(client, started, a.json, "chunks")?;
    let r = super::job::result(&j)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let r: novabackup_engine::ops::sync::SyncReport = serde_json::from_value(r.clone())?;
    print_report(&r, &format!("site {}", req.site));
    Ok(())
}

fn print_report(r: &novabackup_engine::ops::sync::SyncReport, to: &str) {
    for id in &r.copied {
        println!("copied {id}");
    }
    for d in &r.refused {
        println!("not copied: disk {d} (placement forbids the target's site)");
    }
    println!(
        "{} snapshot(s) copied, {} already in {to}; {} of {} chunks sent ({} bytes) in {:.1} s",
        r.copied.len(),
        r.present,
        r.chunks_sent,
        r.chunks_named,
        r.bytes_sent,
        r.duration_ms as f64 / 1000.0
    );
}

/// Runs a replication in this process, printing progress to stderr.
pub fn run(a: SyncArgs) -> anyhow::Result<()> {
    let (Some(from_url), Some(to_url)) = (a.from.clone(), a.to.clone()) else {
        anyhow::bail!("name the stores with --from and --to, or a site with --site");
    };
    if from_url == to_url {
        anyhow::bail!("--from and --to name the same store; nothing to copy");
    }
    let from = open_store_at(
        &from_url,
        &StoreAccess {
            token_file: a.from_token_file.clone(),
            fingerprint: a.from_fingerprint.clone(),
            credentials: a.from_credentials.clone(),
            cache_dir: None,
        },
    )?;
    let to = open_store_at(
        &to_url,
        &StoreAccess {
            token_file: a.to_token_file.clone(),
            fingerprint: a.to_fingerprint.clone(),
            credentials: a.to_credentials.clone(),
            cache_dir: None,
        },
    )?;
    let opts = SyncOptions {
        disks: a.disks.clone(),
        newest: a.newest,
        bandwidth: a.bwlimit,
        checkpoint: a.checkpoint.unwrap_or(0),
        placement: match &a.placement {
            Some(p) => Some((read_placement(p)?, a.to_site.clone())),
            None => None,
        },
    };
    let progress = Arc::new(Progress::default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (progress, done) = (progress.clone(), done.clone());
        std::thread::spawn(move || {
            let mut waited = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                waited += 1;
                if waited % 25 == 0 {
                    let (n, total) = progress.get();
                    eprintln!("sync: {n} of {total} chunks checked");
                }
            }
        })
    };
    let r = sync(from.as_ref(), to.as_ref(), &opts, &progress);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticker.join();
    let r = r?;
    let pruned = if a.prune {
        let policy = match a.keep_last {
            Some(n) => novabackup_engine::retention::Policy {
                keep_last: Some(n),
                keep_hourly: None,
                keep_daily: None,
                keep_weekly: None,
                keep_monthly: None,
                keep_yearly: None,
                keep_within: None,
                ..Default::default()
            },
            None => Default::default(),
        };
        let name = if a.keep_last.is_some() {
            "sync --keep-last"
        } else {
            "default"
        };
        Some(novabackup_engine::ops::prune::prune(
            to.as_ref(),
            &|_| (name.to_string(), policy.clone()),
            &Default::default(),
            &Default::default(),
            &Progress::default(),
        )?)
    } else {
        None
    };
    let collected = if a.gc {
        Some(novabackup_engine::ops::snapshots::gc(
            to.as_ref(),
            &Default::default(),
            &Progress::default(),
        )?)
    } else {
        None
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["pruned"] = serde_json::to_value(&pruned)?;
        v["gc"] = serde_json::to_value(&collected)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_report(&r, &to.describe());
    if let Some(p) = pruned {
        println!("retention on the target removed {} snapshot(s)", p.removed);
    }
    if let Some(g) = collected {
        println!(
            "garbage collection on the target removed {} chunk(s), {} -> {} bytes",
            g.chunks_removed, g.bytes_before, g.bytes_after
        );
    }
    Ok(())
}
