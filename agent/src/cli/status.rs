//! `novabackup status`, `novabackup completions` and `novabackup man`.

use std::collections::HashMap;

use anyhow::Context;
use clap::CommandFactory;
use novabackup_api::Client;
use novabackup_engine::size::format_size;

/// One screen: the agent, its store, and every disk with its change
/// tracking and last backup.
pub fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let health = client.health()?;
    let store = client.store_info()?;
    let disks = client.disks()?;
    let snaps = client.snapshots(None)?;
    let mut last: HashMap<&str, &novabackup_api::types::SnapshotInfo> = HashMap::new();
    for s in &snaps {
        // Listed oldest first: the last one wins.
        last.insert(s.disk.as_str(), s);
    }
    if json {
        let disks: Vec<serde_json::Value> = disks
            .iter()
            .map(|d| {
                serde_json::json!({
                    "disk": d,
                    "last_backup": last.get(d.name.as_str()),
                    "next_backup": next_backup(&store, &d.name),
                })
            })
            .collect();
        let v = serde_json::json!({
            "agent": health,
            "store": store,
            "disks": disks,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "agent:  {} (version {}, NBD engine {})",
        health.status, health.version, health.io_engine
    );
    println!(
        "store:  {} ({} used{}, {} snapshots)",
        store.location,
        format_size(store.bytes_used),
        store
            .limit
            .map(|l| format!(" of a {} quota", format_size(l)))
            .unwrap_or_default(),
        store.snapshots
    );
    for u in store.disks.iter().filter(|u| u.limit.is_some()) {
        println!(
            "quota:  disk {} {} of {}",
            u.disk,
            format_size(u.bytes),
            format_size(u.limit.unwrap_or(0))
        );
    }
    if !store.schedules.is_empty() {
        println!("schedules:");
        for s in &store.schedules {
            println!(
                "  {:<16} {:<7} {:<12} {:<16} next {}",
                s.id,
                serde_json::to_value(s.spec.action)?.as_str().unwrap_or("?"),
                match (&s.spec.disk, s.spec.action) {
                    (_, novabackup_api::types::ScheduleAction::Gc) => "the store",
                    (Some(d), _) => d.as_str(),
                    (None, _) => "all disks",
                },
                s.spec.cron,
                s.next_run.as_deref().unwrap_or("paused")
            );
        }
    }
    if disks.is_empty() {
        println!("disks:  none attached (`novabackup disk attach NAME --image PATH`)");
        return Ok(());
    }
    println!(
        "\n{:<16} {:>9} {:>5} {:>14} {:<9} {:<28} NEXT BACKUP",
        "DISK", "SIZE", "CONNS", "CBT DIRTY", "CBT", "LAST BACKUP"
    );
    for d in &disks {
        let trust = if d.cbt.trusted {
            "trusted"
        } else {
            "untrusted"
        };
        let lastb = match last.get(d.name.as_str()) {
            Some(s) => format!("{} ({})", s.time, format!("{:?}", s.kind).to_lowercase()),
            None => "never".into(),
        };
        println!(
            "{:<16} {:>9} {:>5} {:>14} {:<9} {:<28} {}",
            d.name,
            format_size(d.size),
            d.connections,
            format_size(d.cbt.dirty_bytes),
            trust,
            lastb,
            next_backup(&store, &d.name).unwrap_or_else(|| "not scheduled".into())
        );
    }
    Ok(())
}

/// The soonest next run of a backup schedule covering `disk`.
fn next_backup(store: &novabackup_api::types::StoreInfo, disk: &str) -> Option<String> {
    store
        .schedules
        .iter()
        .filter(|s| s.spec.action == novabackup_api::types::ScheduleAction::Backup)
        .filter(|s| s.spec.disk.as_deref().is_none_or(|d| d == disk))
        .filter_map(|s| s.next_run.clone())
        .min()
}

/// Prints a completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) {
    let mut cmd = super::Cli::command();
    clap_complete::generate(shell, &mut cmd, "novabackup", &mut std::io::stdout());
}

/// Prints the man page (roff) built from the command-line definitions.
pub fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cmd = super::Cli::command();
    match dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            clap_mangen::generate_to(cmd, d)
                .with_context(|| format!("cannot write the man pages into {}", d.display()))?;
        }
    }
    Ok(())
}
