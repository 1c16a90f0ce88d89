//! `novabackup mount`, `mounts`, `unmount` and `mount promote`: snapshots
//! served as NBD exports straight from the store.

use clap::{Args, Subcommand};
use novabackup_api::types::{MountInfo, MountRequest};
use novabackup_api::Client;
use novabackup_engine::size::format_size;

use super::job;

/// `novabackup mount ID [--writable]`, or `novabackup mount promote`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MountArgs {
    #[command(subcommand)]
    command: Option<MountCommand>,
    /// Snapshot id (see `novabackup snapshots`).
    #[arg(required = true)]
    snapshot: Option<String>,
    /// Accept writes into a local copy-on-write overlay; they never reach
    /// the store.
    #[arg(long)]
    writable: bool,
    /// The export name (default: mount-N).
    #[arg(long)]
    name: Option<String>,
    /// An NBD client that may open the mount (repeatable), as for
    /// `disk attach --allow`.
    #[arg(long = "allow", value_name = "IDENTITY")]
    allow: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum MountCommand {
    /// Turn a mount into a real disk image at PATH: the rest is copied in
    /// the background while the export stays up.
    Promote {
        /// Mount name.
        name: String,
        /// The image's new path (on the file system of the agent's data
        /// folder, and below its restore folders).
        #[arg(long)]
        to: std::path::PathBuf,
        /// Print the job id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

fn print(m: &MountInfo) {
    let pct = if m.fill.chunks == 0 {
        100.0
    } else {
        m.fill.filled as f64 * 100.0 / m.fill.chunks as f64
    };
    println!(
        "{:<14} {:<36} {:<10} {:>9} {:>6.1}% {:>5}  {}",
        m.name,
        m.snapshot,
        match (&m.promoted_to, m.writable) {
            (Some(_), _) => "promoted",
            (None, true) => "writable",
            (None, false) => "read-only",
        },
        format_size(m.size),
        pct,
        m.connections,
        m.uris.first().map(String::as_str).unwrap_or("-")
    );
}

fn header() {
    println!(
        "{:<14} {:<36} {:<10} {:>9} {:>7} {:>5}  URI",
        "NAME", "SNAPSHOT", "MODE", "SIZE", "LOCAL", "CONN"
    );
}

/// `novabackup mount`.
pub fn mount(client: &Client, a: MountArgs) -> anyhow::Result<()> {
    if let Some(MountCommand::Promote { name, to, no_wait }) = a.command {
        let to = std::path::absolute(&to)?;
        let j = client.promote(&name, &to.to_string_lossy())?;
        eprintln!(
            "mount {name} now lives at {} and stays served; {} copies the rest",
            to.display(),
            j.id
        );
        if no_wait {
            println!("{}", j.id);
            return Ok(());
        }
        job::result(&job::wait(client, j, false, "bytes")?)?;
        println!("{} is a complete disk image", to.display());
        return Ok(());
    }
    let m = client.mount(&MountRequest {
        snapshot: a.snapshot.unwrap_or_default(),
        name: a.name,
        writable: a.writable,
        allow: a.allow,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!(
        "{} serves {} {} over NBD:",
        m.name,
        m.snapshot,
        if m.writable {
            "with writes kept in a local overlay"
        } else {
            "read-only"
        }
    );
    for u in &m.uris {
        println!("  {u}");
    }
    println!("end it with `novabackup unmount {}`", m.name);
    Ok(())
}

/// `novabackup mounts`.
pub fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let list = client.mounts()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no mounts; `novabackup mount SNAPSHOT` serves one");
        return Ok(());
    }
    header();
    for m in &list {
        print(m);
    }
    Ok(())
}

/// `novabackup unmount`.
pub fn unmount(client: &Client, name: &str, force: bool) -> anyhow::Result<()> {
    client.unmount(name, force)?;
    println!("unmounted {name}");
    Ok(())
}
