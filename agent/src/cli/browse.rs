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

/// `novabackup files ID [PATH] [--partition N] [--json]`: `ls -l` of a
/// folder in the snapshot.
pub fn files(
    client: &Client,
    id: &str,
    path: &str,
    partition: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    let entries = client.files(id, path, partition)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    for e in &entries {
        let kind = match e.kind.as_str() {
            "dir" => 'd',
            "symlink" => 'l',
            "char" => 'c',
            "block" => 'b',
            "fifo" => 'p',
            "socket" => 's',
            _ => '-',
        };
        let when = match u64::try_from(e.mtime) {
            Ok(t) => {
                let (y, mo, d, h, mi, _) = novabackup_engine::time::civil(t);
                format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}")
            }
            Err(_) => "-".into(),
        };
        let target = e
            .target
            .as_deref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default();
        println!(
            "{kind}{} {:>5} {:>5} {:>12} {when} {}{target}",
            rwx(e.mode),
            e.uid,
            e.gid,
            e.size,
            e.name
        );
    }
    Ok(())
}

/// `rwxr-xr-x` of permission bits, with set-id and sticky bits as ls shows them.
fn rwx(mode: u32) -> String {
    let mut s: Vec<char> = "rwxrwxrwx"
        .chars()
        .enumerate()
        .map(|(i, c)| if mode & (0o400 >> i) != 0 { c } else { '-' })
        .collect();
    for (bit, at, set) in [(0o4000, 2, 's'), (0o2000, 5, 's'), (0o1000, 8, 't')] {
        if mode & bit != 0 {
            s[at] = if s[at] == '-' {
                set.to_ascii_uppercase()
            } else {
                set
            };
        }
    }
    s.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn modes_print_as_ls_prints_them() {
        assert_eq!(super::rwx(0o755), "rwxr-xr-x");
        assert_eq!(super::rwx(0o4755), "rwsr-xr-x");
        assert_eq!(super::rwx(0o1777), "rwxrwxrwt");
        assert_eq!(super::rwx(0o2640), "rw-r-S---");
    }
}
