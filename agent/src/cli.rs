//! Command-line definitions (clap) and dispatch. One file per subcommand
//! group; each talks to the agent through `novabackup_api::Client`.

mod backup;
mod browse;
mod config;
mod demo;
mod disk;
mod job;
mod mount;
mod repair;
mod retention;
mod status;
mod store;
mod sync;
mod token;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use novabackup_api::{Client, ClientError};

use crate::daemon::{self, AgentArgs};

/// The default state folder when running as root.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/novabackup";
/// The default API address.
pub const DEFAULT_API: &str = "127.0.0.1:7810";

/// novabackup: incremental block-level backups of running VM disks.
#[derive(Debug, Parser)]
#[command(
    name = "novabackup",
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 success; 1 an error the agent reported, a failed job, or damage found \
                  by verify; 2 bad command-line usage; 3 the agent is unreachable; 4 no such disk, \
                  snapshot or job."
)]
pub struct Cli {
    /// The agent's state folder; the CLI reads the API address and token there.
    #[arg(long, global = true, env = "NOVABACKUP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URL of the agent's API (default: what the agent in --data-dir listens on, else http://127.0.0.1:7810).
    #[arg(long, global = true, env = "NOVABACKUP_API")]
    pub api: Option<String>,
    /// Pin an https agent's certificate (`sha256:...`; read from agent.json when --api is not given).
    #[arg(long, global = true, env = "NOVABACKUP_FINGERPRINT")]
    pub fingerprint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: the NBD proxy with change tracking, and the API.
    Agent(Box<AgentArgs>),
    /// Attach, list, inspect and detach disks.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Back up a disk (incremental when change tracking allows it).
    Backup(backup::BackupArgs),
    /// List snapshots.
    Snapshots {
        /// Only this disk's.
        disk: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or delete a snapshot.
    #[command(subcommand)]
    Snapshot(backup::SnapshotCommand),
    /// Restore a snapshot to a file or block device.
    Restore(backup::RestoreArgs),
    /// The partition table of a snapshot's disk and the file system in
    /// each partition, read from the store without a restore.
    Partitions {
        /// Snapshot id (see `novabackup snapshots`).
        snapshot: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a folder of a snapshot's file system (ext2/3/4, FAT), read
    /// from the store without a restore.
    Files {
        /// Snapshot id (see `novabackup snapshots`).
        snapshot: String,
        /// The folder.
        #[arg(default_value = "/")]
        path: String,
        /// The partition (see `novabackup partitions`); default: the only
        /// file system on the disk.
        #[arg(long)]
        partition: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a snapshot over NBD straight from the store, read-only or
    /// with a local copy-on-write overlay (a VM boots from it at once);
    /// `mount promote` turns one into a real disk image.
    Mount(mount::MountArgs),
    /// List the mounts.
    Mounts {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a mount; its overlay is deleted (unless promoted).
    Unmount {
        /// Mount name.
        name: String,
        /// Disconnect its NBD clients first.
        #[arg(long)]
        force: bool,
    },
    /// Re-read and re-hash every chunk of snapshots.
    Verify(backup::VerifyArgs),
    /// Verify every snapshot, store again what damaged ones lost from the
    /// attached disks that still hold it, and say what stays damaged.
    Repair {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole product on a temporary folder: agent, disk, NBD writes,
    /// full and incremental backups, restores checked byte for byte.
    Demo(demo::DemoArgs),
    /// The agent, its store, and every disk's change tracking and last backup.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `novabackup man > novabackup.1`.
    Man {
        /// Write a page for every subcommand (novabackup.1,
        /// novabackup-agent.1, ...) into this folder instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Check the agent's configuration, print a setting, or list the
    /// folders the agent writes to.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Create, list and revoke API tokens (roles: admin, backup, read-only).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Run a store server that many agents back up to.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Copy snapshots from one store to another (folder, store server or
    /// s3://), moving only what the target lacks.
    Sync(sync::SyncArgs),
    /// Apply retention: remove the snapshots the policy does not keep.
    Prune(retention::PruneArgs),
    /// Garbage collection: free the chunks no snapshot references.
    Gc {
        /// Rewrite only packs at least this many percent unreferenced
        /// (default 0: every unreferenced chunk goes; 20 saves most of the
        /// copying on a big store).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        min_garbage: u8,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retention policies (GFS: last, hourly, daily, weekly, monthly, yearly, within).
    #[command(subcommand)]
    Retention(retention::RetentionCommand),
    /// Schedules of backup, prune, gc and verify (cron expressions).
    #[command(subcommand)]
    Schedule(retention::ScheduleCommand),
    /// Size limits of the store and of each disk.
    #[command(subcommand)]
    Quota(retention::QuotaCommand),
    /// List the agent's jobs.
    Jobs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow or cancel one job.
    #[command(subcommand)]
    Job(job::JobCommand),
}

impl Cli {
    /// Whether this invocation runs the daemon (which logs at info).
    pub fn is_agent(&self) -> bool {
        matches!(self.command, Command::Agent(_) | Command::Store(_))
    }
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let found = crate::config::FileConfig::find(args.config.as_deref())?;
            let dir = cli
                .data_dir
                .or_else(|| found.as_ref().and_then(|(_, c)| c.data_dir.clone()))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            daemon::run(dir, args.resolve(found))
        }
        Command::Demo(a) => demo::run(a),
        Command::Store(c) => store::run(c),
        Command::Sync(a) if a.site.is_none() => sync::run(a),
        Command::Completions { shell } => {
            status::completions(shell);
            Ok(())
        }
        Command::Man { dir } => status::man(dir.as_deref()),
        Command::Config(c) => config::run(c),
        other => {
            let client = client(
                cli.data_dir.as_deref(),
                cli.api.as_deref(),
                cli.fingerprint.as_deref(),
            )?;
            match other {
                Command::Agent(_)
                | Command::Demo(_)
                | Command::Store(_)
                | Command::Sync(sync::SyncArgs { site: None, .. })
                | Command::Completions { .. }
                | Command::Config(_)
                | Command::Man { .. } => {
                    unreachable!("handled above")
                }
                Command::Disk(c) => disk::run(&client, c),
                Command::Backup(a) => backup::backup(&client, a),
                Command::Snapshots { disk, json } => backup::snapshots(&client, disk, json),
                Command::Snapshot(c) => backup::snapshot(&client, c),
                Command::Restore(a) => backup::restore(
                    &client,
                    a,
                    cli.data_dir
                        .as_deref()
                        .unwrap_or(Path::new(DEFAULT_DATA_DIR)),
                ),
                Command::Verify(a) => backup::verify(&client, a),
                Command::Partitions { snapshot, json } => {
                    browse::partitions(&client, &snapshot, json)
                }
                Command::Files {
                    snapshot,
                    path,
                    partition,
                    json,
                } => browse::files(&client, &snapshot, &path, partition, json),
                Command::Repair { json } => repair::run(&client, json),
                Command::Mount(a) => mount::mount(&client, a),
                Command::Mounts { json } => mount::list(&client, json),
                Command::Unmount { name, force } => mount::unmount(&client, &name, force),
                Command::Jobs { json } => backup::jobs(&client, json),
                Command::Job(c) => job::run(&client, c),
                Command::Status { json } => status::status(&client, json),
                Command::Token(c) => token::run(&client, c),
                Command::Prune(a) => retention::prune(&client, a),
                Command::Gc { min_garbage, json } => retention::gc(&client, min_garbage, json),
                Command::Sync(a) => sync::via_agent(&client, a),
                Command::Retention(c) => retention::retention(&client, c),
                Command::Schedule(c) => retention::schedule(&client, c),
                Command::Quota(c) => retention::quota(&client, c),
            }
        }
    }
}

/// Exit codes: 0 success, 1 an error the agent reported or any other
/// failure (a failed job, damage found by verify), 2 bad command-line usage
/// (clap), 3 the agent is unreachable, 4 no such disk, snapshot or job.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => 3,
        Some(ClientError::Api { error, .. }) => error.code.exit_code(),
        _ => 1,
    }
}

fn client(
    data_dir: Option<&Path>,
    api: Option<&str>,
    fingerprint: Option<&str>,
) -> anyhow::Result<Client> {
    let dir = data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR));
    let mut pin = fingerprint.map(str::to_string);
    let base = match api {
        Some(a) => a.to_string(),
        None => match daemon::runtime_info(dir) {
            // A TLS agent says so, with the fingerprint to pin.
            Some(i) => match i.api_fingerprint {
                Some(fp) => {
                    pin.get_or_insert(fp);
                    format!("https://{}", i.api)
                }
                None => i.api,
            },
            None => DEFAULT_API.to_string(),
        },
    };
    let base = if base.contains("://") {
        base
    } else {
        format!("http://{base}")
    };
    let token = match std::env::var("NOVABACKUP_TOKEN") {
        Ok(t) if !t.is_empty() => Some(t),
        _ => {
            let p = dir.join(daemon::TOKEN_FILE);
            match std::fs::read_to_string(&p) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot read the API token {} (run as the agent's user, or set NOVABACKUP_TOKEN)", p.display())
                    })
                }
            }
        }
    };
    if base.starts_with("https://") && pin.is_none() {
        anyhow::bail!(
            "{base} needs the agent's certificate fingerprint: pass --fingerprint sha256:... \
             (the agent logs it at start) or set NOVABACKUP_FINGERPRINT"
        );
    }
    Ok(Client::with_tls(&base, token, pin.as_deref())?)
}
