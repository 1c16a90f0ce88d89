//! `novabackup backup`, `snapshots`, `snapshot delete`, `restore`, `verify`
//! and `jobs`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use novabackup_api::error::ErrorCode;
use novabackup_api::types::{BackupRequest, RestoreRequest, VerifyRequest};
use novabackup_api::Client;
use novabackup_engine::size::format_size;

use super::job;

/// `novabackup backup DISK`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The disk to back up.
    disk: String,
    /// Read the whole disk even when an incremental backup is possible.
    #[arg(long, conflicts_with = "audit")]
    full: bool,
    /// Read the whole disk and prove change tracking: every chunk it calls
    /// unchanged must equal the base snapshot's (exit 1 if one differs).
    #[arg(long)]
    audit: bool,
    /// Print the job id and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `novabackup restore ID --to PATH`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot id (see `novabackup snapshots`).
    snapshot: String,
    /// Target file or block device; with --file, the folder files go to.
    #[arg(long, required_unless_present = "stdout")]
    to: Option<PathBuf>,
    /// Overwrite an existing target.
    #[arg(long)]
    force: bool,
    /// Print the job id and return at once.
    #[arg(long, conflicts_with = "file")]
    no_wait: bool,
    /// Restore only this file or folder tree from the snapshot's file
    /// system (repeatable), with modes, times and symlinks, and owners
    /// when run as root.
    #[arg(long)]
    file: Vec<String>,
    /// With --file: the partition (see `novabackup partitions`).
    #[arg(long, requires = "file")]
    partition: Option<u32>,
    /// With one --file: write the file to standard output.
    #[arg(long, requires = "file", conflicts_with = "to")]
    stdout: bool,
    /// Attach the target as a disk at once (a VM can boot from it) and
    /// fill it in the background; reads of blocks not yet restored fetch
    /// them first, and guest writes are never overwritten.
    #[arg(long, conflicts_with = "file")]
    live: bool,
    /// With --live: the disk name (default: the snapshot's disk).
    #[arg(long, requires = "live")]
    attach: Option<String>,
}

/// `novabackup verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Snapshot ids to verify.
    snapshots: Vec<String>,
    /// Verify every snapshot.
    #[arg(long, conflicts_with = "snapshots")]
    all: bool,
    /// Verify every snapshot of this disk.
    #[arg(long, conflicts_with_all = ["snapshots", "all"])]
    disk: Option<String>,
    /// Skip snapshots verified successfully within this long (`7d`, `12h`).
    #[arg(long)]
    skip_verified_within: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `novabackup snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Delete a snapshot (its data goes at the next garbage collection).
    Delete {
        /// Snapshot id.
        id: String,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id.
        id: String,
    },
    /// Protect a snapshot: prune keeps it and delete refuses it.
    Protect {
        /// Snapshot id.
        id: String,
    },
    /// Lift a snapshot's protection.
    Unprotect {
        /// Snapshot id.
        id: String,
    },
}

pub fn backup(client: &Client, a: BackupArgs) -> anyhow::Result<()> {
    let j = client.backup(&BackupRequest {
        disk: a.disk,
        full: a.full,
        audit: a.audit,
    })?;
    if a.no_wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            println!("{}", j.id);
        }
        return Ok(());
    }
    let j = job::wait(client, j, a.json, "bytes")?;
    let r = job::result(&j)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(r)?);
        if r["audit"]["mismatches"].as_u64().unwrap_or(0) > 0 {
            anyhow::bail!("change tracking missed writes: see \"audit\" above");
        }
        return Ok(());
    }
    let st = &r["stats"];
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    let secs = n("duration_ms") as f64 / 1000.0;
    println!(
        "snapshot {} ({})",
        r["snapshot"].as_str().unwrap_or("?"),
        r["kind"].as_str().unwrap_or("?")
    );
    println!("  why:        {}", r["reason"].as_str().unwrap_or(""));
    println!(
        "  read:       {} in {} chunks ({} all zero), {:.0} MiB/s",
        format_size(n("bytes_read")),
        n("chunks_read"),
        n("zero_chunks"),
        n("bytes_read") as f64 / secs.max(1e-3) / 1048576.0
    );
    println!(
        "  new:        {} in {} chunks",
        format_size(n("bytes_new")),
        n("chunks_new")
    );
    println!(
        "  stored:     {} after compression",
        format_size(n("bytes_stored"))
    );
    println!(
        "  dedup:      {:.2}x   compression: {:.2}x",
        r["dedup_ratio"].as_f64().unwrap_or(0.0),
        r["compression_ratio"].as_f64().unwrap_or(0.0)
    );
    println!("  duration:   {secs:.2} s");
    audit_verdict(r)
}

/// Prints what an audit found; an error (exit 1) when it found missed writes.
fn audit_verdict(r: &serde_json::Value) -> anyhow::Result<()> {
    let a = &r["audit"];
    if a.is_null() {
        return Ok(());
    }
    let n = a["mismatches"].as_u64().unwrap_or(0);
    println!(
        "  audit:      {} chunks compared with {}, {} differed",
        a["chunks_compared"],
        a["base"].as_str().unwrap_or("?"),
        n
    );
    if n > 0 {
        let offsets: Vec<String> = a["mismatch_offsets"]
            .as_array()
            .into_iter()
            .flatten()
            .take(10)
            .map(|o| o.to_string())
            .collect();
        anyhow::bail!(
            "CHANGE TRACKING MISSED WRITES: {n} chunk(s) changed although tracking said they did not (first offsets: {}). \
             The new snapshot holds what was read, so it is correct; find what writes to the image without going through the proxy",
            offsets.join(", ")
        );
    }
    Ok(())
}

pub fn snapshots(client: &Client, disk: Option<String>, json: bool) -> anyhow::Result<()> {
    let list = client.snapshots(disk.as_deref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if list.is_empty() {
        println!("no snapshots; take one with `novabackup backup DISK`");
    } else {
        println!(
            "{:<36} {:<11} {:>10} {:>10} {:>10} {:<9} {:<10} PARENT",
            "ID", "KIND", "SIZE", "READ", "STORED", "PROTECTED", "VERIFIED"
        );
        for s in list {
            let verified = match &s.verified {
                Some(v) if v.ok => v.time.get(..10).unwrap_or("ok").to_string(),
                Some(_) => "DAMAGED".to_string(),
                None => "-".to_string(),
            };
            println!(
                "{:<36} {:<11} {:>10} {:>10} {:>10} {:<9} {:<10} {}",
                s.id,
                format!("{:?}", s.kind).to_lowercase(),
                format_size(s.image_size),
                format_size(s.stats.bytes_read),
                format_size(s.stats.bytes_stored),
                if s.protected { "yes" } else { "-" },
                verified,
                s.parent.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

pub fn snapshot(client: &Client, c: SnapshotCommand) -> anyhow::Result<()> {
    match c {
        SnapshotCommand::Delete { id } => {
            client.delete_snapshot(&id)?;
            println!("deleted {id}; its chunks are freed by the next garbage collection");
        }
        SnapshotCommand::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&client.snapshot(&id)?)?)
        }
        SnapshotCommand::Protect { id } => {
            client.protect(&id, true)?;
            println!("protected {id}: prune keeps it and delete refuses it");
        }
        SnapshotCommand::Unprotect { id } => {
            client.protect(&id, false)?;
            println!("{id} is no longer protected");
        }
    }
    Ok(())
}

/// `novabackup restore`. The agent writes restores only below its restore
/// folders; a target elsewhere is restored into DATA_DIR/restores and then
/// moved (or copied onto a device) by this process, with the rights of
/// whoever runs it, never the agent's.
pub fn restore(client: &Client, a: RestoreArgs, data_dir: &Path) -> anyhow::Result<()> {
    if !a.file.is_empty() {
        return restore_files(client, a);
    }
    let to = a.to.clone().context("--to is needed")?;
    let target =
        std::path::absolute(&to).with_context(|| format!("bad target {}", to.display()))?;
    if a.live {
        return restore_live(client, a, &target);
    }
    let direct = client.restore(&RestoreRequest {
        snapshot: a.snapshot.clone(),
        target: target.to_string_lossy().into_owned(),
        force: a.force,
        live: false,
        attach: None,
    });
    let staging = data_dir.join(crate::daemon::RESTORES_DIR);
    let (j, staged) = match direct {
        Err(novabackup_api::ClientError::Api { error, .. })
            if error.code == ErrorCode::Forbidden && !a.no_wait && staging.is_dir() =>
        {
            check_target(&target, a.force)?;
            let staged = staging.join(format!(
                ".cli-{}-{}.img",
                std::process::id(),
                novabackup_engine::time::now_unix()
            ));
            let j = client.restore(&RestoreRequest {
                snapshot: a.snapshot,
                target: staged.to_string_lossy().into_owned(),
                force: false,
                live: false,
                attach: None,
            })?;
            (j, Some(Staged(staged)))
        }
        other => (other?, None),
    };
    if a.no_wait {
        println!("{}", j.id);
        return Ok(());
    }
    let j = job::wait(client, j, false, "bytes")?;
    let r = job::result(&j)?;
    if let Some(s) = &staged {
        s.move_to(&target)
            .with_context(|| format!("cannot put the restored image at {}", target.display()))?;
    }
    let ms = r["stats"]["duration_ms"].as_u64().unwrap_or(0);
    let bytes = r["stats"]["bytes"].as_u64().unwrap_or(0);
    println!(
        "restored {} to {} ({}, every chunk verified) in {:.2} s",
        r["snapshot"].as_str().unwrap_or("?"),
        target.display(),
        format_size(bytes),
        ms as f64 / 1000.0
    );
    Ok(())
}

/// `restore --live`: the agent attaches the target at once; this follows
/// the background fill (or returns at once with --no-wait).
fn restore_live(client: &Client, a: RestoreArgs, target: &Path) -> anyhow::Result<()> {
    let j = client.restore(&RestoreRequest {
        snapshot: a.snapshot.clone(),
        target: target.to_string_lossy().into_owned(),
        force: a.force,
        live: true,
        attach: a.attach.clone(),
    })?;
    let disk = j.target.clone();
    eprintln!(
        "disk {disk} is attached on {} and usable now (`novabackup disk list` shows its NBD URI); \
         the rest of {} is filled in the background by {}",
        target.display(),
        a.snapshot,
        j.id
    );
    if a.no_wait {
        println!("{}", j.id);
        return Ok(());
    }
    let j = job::wait(client, j, false, "bytes")?;
    let r = job::result(&j)?;
    println!(
        "live restore of {} into disk {disk} complete ({}) in {:.2} s",
        a.snapshot,
        format_size(r["bytes"].as_u64().unwrap_or(0)),
        r["seconds"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

/// The checks the agent would make, made here for a staged restore.
fn check_target(target: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot use {}", target.display())),
        Ok(m) if m.is_dir() => anyhow::bail!(
            "{} is a folder; restore to a regular file or a block device",
            target.display()
        ),
        Ok(_) if !force => {
            anyhow::bail!("{} exists; pass --force to overwrite it", target.display())
        }
        Ok(_) => Ok(()),
    }
}

/// An image the agent restored into its restore folder for this process;
/// removed on drop unless moved.
struct Staged(PathBuf);

impl Staged {
    fn move_to(&self, target: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let dev = std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_block_device());
        if !dev {
            match std::fs::rename(&self.0, target) {
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
                r => return r,
            }
        }
        // Another filesystem, or a device: copy, with this process's rights.
        let mut src = std::fs::File::open(&self.0)?;
        let (mut out, partial) = if dev {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(target)?;
            (f, None)
        } else {
            let p = PathBuf::from(format!("{}.partial", target.display()));
            (novabackup_engine::fsutil::create_fresh(&p)?, Some(p))
        };
        let copied = std::io::copy(&mut src, &mut out).and_then(|_| out.sync_all());
        match (copied, &partial) {
            (Err(e), Some(p)) => {
                let _ = std::fs::remove_file(p);
                Err(e)
            }
            (Err(e), None) => Err(e),
            (Ok(()), Some(p)) => std::fs::rename(p, target),
            (Ok(()), None) => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn verify(client: &Client, a: VerifyArgs) -> anyhow::Result<()> {
    if a.snapshots.is_empty() && !a.all && a.disk.is_none() {
        anyhow::bail!("name the snapshots to verify, or pass --disk DISK or --all");
    }
    let req = VerifyRequest {
        snapshots: (!a.snapshots.is_empty()).then_some(a.snapshots),
        disk: a.disk,
        skip_verified_within: a.skip_verified_within,
    };
    let j = job::wait(client, client.verify(&req)?, a.json, "chunks")?;
    let r = job::result(&j)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let rep = &r["report"];
        for s in rep["snapshots"].as_array().into_iter().flatten() {
            let id = s["id"].as_str().unwrap_or("?");
            if s["ok"].as_bool() == Some(true) {
                println!("{id}: ok");
                continue;
            }
            println!("{id}: DAMAGED");
            for p in s["bad_pages"].as_array().into_iter().flatten() {
                println!("  index {}", p.as_str().unwrap_or(""));
            }
            for c in s["bad_chunks"].as_array().into_iter().flatten() {
                println!(
                    "  chunk {} at offset {}: {}",
                    c["digest"].as_str().unwrap_or(""),
                    c["offset"],
                    c["error"].as_str().unwrap_or("")
                );
            }
        }
        for d in r["damaged_manifests"].as_array().into_iter().flatten() {
            println!("{}", d.as_str().unwrap_or(""));
        }
        for d in r["damaged_store"].as_array().into_iter().flatten() {
            println!("store damaged: {}", d.as_str().unwrap_or(""));
        }
        if let Some(n) = r["chunks_forgotten"].as_u64().filter(|n| *n > 0) {
            println!(
                "{n} damaged chunk(s) set aside: the next backup of each affected disk reads it whole \
                 and stores them again (`novabackup repair` does it now)"
            );
        }
        let skipped = r["skipped_recently_verified"]
            .as_array()
            .map_or(0, |v| v.len());
        if skipped > 0 {
            println!("{skipped} snapshot(s) skipped: verified recently");
        }
        println!(
            "{} chunks checked ({})",
            rep["chunks_checked"],
            format_size(rep["bytes_checked"].as_u64().unwrap_or(0))
        );
    }
    if r["ok"].as_bool() != Some(true) {
        anyhow::bail!("verify found damaged snapshots");
    }
    Ok(())
}

pub fn jobs(client: &Client, json: bool) -> anyhow::Result<()> {
    let list = client.jobs()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for j in list {
        println!(
            "{:<8} {:<8} {:<30} {:<10} {}/{} {}",
            j.id,
            j.kind,
            j.target,
            format!("{:?}", j.state).to_lowercase(),
            j.done,
            j.total,
            j.error.unwrap_or_default()
        );
    }
    Ok(())
}

/// `novabackup restore ID --file PATH... (--to DIR | --stdout)`: the agent
/// streams the files as tar from the store; they are unpacked here, with
/// the invoking user's rights (the agent writes nothing).
fn restore_files(client: &Client, a: RestoreArgs) -> anyhow::Result<()> {
    let req = novabackup_api::types::FilesRequest {
        paths: a.file.clone(),
        partition: a.partition,
    };
    let stream = client.files_tar(&a.snapshot, &req)?;
    let mut archive = tar::Archive::new(stream);
    if a.stdout {
        anyhow::ensure!(a.file.len() == 1, "--stdout takes exactly one --file");
        let mut entries = archive.entries()?;
        let mut e = entries
            .next()
            .context("the agent sent an empty archive")?
            .context("reading the archive from the agent")?;
        anyhow::ensure!(
            e.header().entry_type().is_file(),
            "{} is not a regular file; restore it with --to DIR",
            a.file[0]
        );
        std::io::copy(&mut e, &mut std::io::stdout().lock())
            .context("writing to standard output")?;
        return Ok(());
    }
    let dir = a.to.context("--to DIR is needed")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_overwrite(a.force);
    // tar refuses entries that would land outside DIR (absolute paths,
    // "..", or through a symbolic link), whatever the guest put in its
    // file system.
    archive.unpack(&dir).with_context(|| {
        format!(
            "restoring into {} stopped (a file that exists needs --force)",
            dir.display()
        )
    })?;
    println!("restored {} into {}", a.file.join(", "), dir.display());
    Ok(())
}
