//! `novabackup disk ...`: attach, list, detach, and CBT state.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use novabackup_api::types::{AttachRequest, CbtInfo, DiskInfo};
use novabackup_api::Client;
use novabackup_engine::size::{format_size, parse_size};

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Serve an image over NBD (export name = NAME) and track its writes.
    Attach {
        /// Disk name, also the NBD export name.
        name: String,
        /// Raw image file or block device.
        #[arg(long)]
        image: PathBuf,
        /// CBT block size: a power of two from 4K to 4M.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        granularity: u64,
        /// Serve the disk read-only.
        #[arg(long)]
        read_only: bool,
        /// An NBD client that may open the disk (repeatable): uid:N or gid:N
        /// for unix-socket peers, a certificate subject such as
        /// "CN=host,O=org" for TLS clients. Default: any client the
        /// listener admits.
        #[arg(long = "allow", value_name = "IDENTITY")]
        allow: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List attached disks.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop serving a disk (refused while NBD clients are connected).
    Detach {
        /// Disk name.
        name: String,
        /// Disconnect its NBD clients first (a running VM sees I/O errors).
        #[arg(long)]
        force: bool,
    },
    /// Show the change-tracking state of a disk.
    Cbt {
        /// Disk name.
        name: String,
        /// Clear the bitmap: only writes from now on count as changed.
        #[arg(long)]
        reset: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(client: &Client, cmd: DiskCommand) -> anyhow::Result<()> {
    match cmd {
        DiskCommand::Attach {
            name,
            image,
            granularity,
            read_only,
            allow,
            json,
        } => {
            let image = std::path::absolute(&image)
                .with_context(|| format!("bad image path {}", image.display()))?;
            let d = client.attach(&AttachRequest {
                name,
                image: image.to_string_lossy().into_owned(),
                granularity: Some(granularity),
                read_only,
                allow,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("attached {} ({}, {})", d.name, d.image, format_size(d.size));
                for u in &d.uris {
                    println!("  {u}");
                }
            }
        }
        DiskCommand::List { json } => {
            let disks = client.disks()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&disks)?);
            } else if disks.is_empty() {
                println!(
                    "no disks attached; attach one with `novabackup disk attach NAME --image PATH`"
                );
            } else {
                print_table(&disks);
            }
        }
        DiskCommand::Detach { name, force } => {
            client.detach(&name, force)?;
            println!("detached {name}");
        }
        DiskCommand::Cbt { name, reset, json } => {
            let c = if reset {
                client.cbt_reset(&name)?
            } else {
                client.cbt(&name)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print_cbt(&name, &c, reset);
            }
        }
    }
    Ok(())
}

fn print_table(disks: &[DiskInfo]) {
    println!(
        "{:<16} {:>10} {:>5} {:>12} {:<9} IMAGE",
        "NAME", "SIZE", "CONNS", "DIRTY", "CBT"
    );
    for d in disks {
        println!(
            "{:<16} {:>10} {:>5} {:>12} {:<9} {}{}",
            d.name,
            format_size(d.size),
            d.connections,
            format_size(d.cbt.dirty_bytes),
            if d.cbt.trusted {
                "trusted"
            } else {
                "UNTRUSTED"
            },
            d.image,
            if d.read_only { " (read-only)" } else { "" }
        );
    }
}

fn print_cbt(name: &str, c: &CbtInfo, reset: bool) {
    if reset {
        println!("bitmap of {name} cleared");
    }
    println!("disk:         {name}");
    println!("granularity:  {}", format_size(c.granularity));
    println!("dirty blocks: {} of {}", c.dirty_blocks, c.blocks);
    println!(
        "dirty bytes:  {} ({})",
        c.dirty_bytes,
        format_size(c.dirty_bytes)
    );
    match &c.reason {
        None => println!("trusted:      yes"),
        Some(r) => println!("trusted:      no: {r}"),
    }
    if c.checkpoint_active {
        println!("checkpoint:   a backup is in progress");
    }
}
