//! `novabackup repair`: heal a damaged store from the disks it can read.
//!
//! Verify every snapshot (the store sets aside the chunks it finds
//! damaged), back up in full each attached disk that has a damaged
//! snapshot (reading the disk stores again every damaged chunk whose data
//! the disk still holds), then verify the damaged snapshots again. A
//! snapshot whose damaged chunks held data the disk no longer has stays
//! damaged, and is named.

use std::collections::BTreeSet;

use novabackup_api::types::{BackupRequest, VerifyRequest};
use novabackup_api::Client;

use super::job;

/// Runs the repair (module doc); `json` prints the summary as JSON.
pub fn run(client: &Client, json: bool) -> anyhow::Result<()> {
    let verify = |snapshots: Option<Vec<String>>| -> anyhow::Result<serde_json::Value> {
        let req = VerifyRequest {
            snapshots,
            disk: None,
            skip_verified_within: None,
        };
        let j = job::wait(client, client.verify(&req)?, json, "chunks")?;
        Ok(job::result(&j)?.clone())
    };
    let damaged_of = |r: &serde_json::Value| -> Vec<String> {
        r["report"]["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["ok"].as_bool() != Some(true))
            .filter_map(|s| s["id"].as_str().map(str::to_string))
            .collect()
    };
    let first = verify(None)?;
    let damaged = damaged_of(&first);
    let attached: BTreeSet<String> = client.disks()?.into_iter().map(|d| d.name).collect();
    let disks: BTreeSet<String> = damaged
        .iter()
        .filter_map(|id| id.split_once('@').map(|(d, _)| d.to_string()))
        .collect();
    let mut backed_up = Vec::new();
    let mut unreadable = Vec::new();
    for d in &disks {
        if !attached.contains(d) {
            unreadable.push(d.clone());
            continue;
        }
        if !json {
            eprintln!("reading disk {d} whole to store its damaged chunks again");
        }
        let req = BackupRequest {
            disk: d.clone(),
            full: true,
            audit: false,
        };
        let j = job::wait(client, client.backup(&req)?, json, "bytes")?;
        job::result(&j)?;
        backed_up.push(d.clone());
    }
    let still = if damaged.is_empty() {
        Vec::new()
    } else {
        damaged_of(&verify(Some(damaged.clone()))?)
    };
    let repaired: Vec<&String> = damaged.iter().filter(|id| !still.contains(id)).collect();
    let store_damage = first["damaged_store"].clone();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "damaged": damaged,
                "repaired": repaired,
                "still_damaged": still,
                "disks_read": backed_up,
                "disks_not_attached": unreadable,
                "damaged_store": store_damage,
            }))?
        );
    } else {
        if damaged.is_empty() {
            println!("every snapshot is intact");
        }
        for id in &repaired {
            println!("{id}: repaired");
        }
        for id in &still {
            println!("{id}: still damaged (the disk no longer holds the lost data)");
        }
        for d in &unreadable {
            println!(
                "disk {d} is not attached: attach it and run repair again to heal its snapshots"
            );
        }
        for p in store_damage.as_array().into_iter().flatten() {
            println!("store damaged: {}", p.as_str().unwrap_or(""));
        }
    }
    if !still.is_empty() || store_damage.as_array().is_some_and(|a| !a.is_empty()) {
        anyhow::bail!("some damage could not be repaired");
    }
    Ok(())
}
