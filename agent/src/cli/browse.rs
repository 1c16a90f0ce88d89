//! Looking into a snapshot without restoring it: `novabackup partitions`
//! prints the partition table of a snapshot's disk and the file system in
//! each partition, read by the agent straight from the store.

use novabackup_api::Client;
use novabackup_engine::size::format_size;

/// `novabackup partitions ID [--json]`.
pub fn partitions(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let t = client.partitions(id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    let fs = |f: &Option<String>| f.clone().unwrap_or_else(|| "-".into());
    match t.scheme.as_str() {
        "none" => println!(
            "{id}: no partition table; {} on the whole disk ({})",
            fs(&t.filesystem),
            format_size(t.disk_size)
        ),
        scheme => {
            println!(
                "{id}: {} partition table, {} sectors of {} bytes",
                scheme.to_uppercase(),
                t.disk_size / t.sector_size.max(1),
                t.sector_size
            );
            println!(
                "{:>3}  {:>14}  {:>10}  {:<12}  {:<24}  NAME",
                "NR", "START", "SIZE", "FILESYSTEM", "TYPE"
            );
            for p in &t.partitions {
                let kind = if p.logical {
                    format!("{} (logical)", p.type_name)
                } else {
                    p.type_name.clone()
                };
                println!(
                    "{:>3}  {:>14}  {:>10}  {:<12}  {:<24}  {}",
                    p.number,
                    p.start,
                    format_size(p.size),
                    fs(&p.filesystem),
                    kind,
                    p.name
                );
            }
        }
    }
    Ok(())
}
