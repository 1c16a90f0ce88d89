//! `novabackup config`: checks the agent's configuration without starting
//! it (the unit runs `config check` before every start and reload, so a
//! typo is reported where the operator looks and the running agent keeps
//! its settings), prints single settings for the package scripts, and
//! lists the folders the agent writes, from which the systemd generator
//! makes the sandbox's `ReadWritePaths=`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::config::FileConfig;

/// `novabackup config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check the configuration: syntax, known options, sizes, disks.
    Check {
        /// The file [default: /etc/novabackup/agent.toml].
        #[arg(long, env = "NOVABACKUP_CONFIG")]
        config: Option<PathBuf>,
        /// Print nothing when it is fine.
        #[arg(long)]
        quiet: bool,
    },
    /// Print one top-level setting as the file gives it (exit 1 when unset).
    Get {
        /// The option, e.g. `start_on_install`.
        key: String,
        /// The file [default: /etc/novabackup/agent.toml].
        #[arg(long, env = "NOVABACKUP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the folders the agent writes to, one per line: its state
    /// folder, a store folder, the disk images' folders, `image_dirs`,
    /// restore folders. A sandbox must leave these writable.
    Paths {
        /// The file [default: /etc/novabackup/agent.toml].
        #[arg(long, env = "NOVABACKUP_CONFIG")]
        config: Option<PathBuf>,
        /// The state folder when the file does not name one.
        #[arg(long, default_value = super::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Print a systemd drop-in (`[Service]` with `ReadWritePaths=`).
        #[arg(long)]
        systemd: bool,
    },
}

/// Runs a `config` subcommand.
pub fn run(c: ConfigCommand) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Check { config, quiet } => {
            match FileConfig::find(config.as_deref())? {
                Some((path, c)) if !quiet => println!(
                    "{}: ok ({} disk{} declared)",
                    path.display(),
                    c.disks.len(),
                    if c.disks.len() == 1 { "" } else { "s" }
                ),
                Some(_) => {}
                None if !quiet => println!(
                    "no configuration file ({} does not exist): built-in defaults apply",
                    crate::config::SYSTEM_CONFIG
                ),
                None => {}
            }
            Ok(())
        }
        ConfigCommand::Get { key, config } => {
            let Some((path, _)) = FileConfig::find(config.as_deref())? else {
                anyhow::bail!("no configuration file: {key} is unset");
            };
            let text = std::fs::read_to_string(&path)?;
            let table: toml::Table = toml::from_str(&text)?;
            match table.get(&key) {
                Some(toml::Value::String(s)) => println!("{s}"),
                Some(v) => println!("{v}"),
                None => anyhow::bail!("{}: {key} is unset", path.display()),
            }
            Ok(())
        }
        ConfigCommand::Paths {
            config,
            data_dir,
            systemd,
        } => {
            let c = FileConfig::find(config.as_deref())?
                .map(|(_, c)| c)
                .unwrap_or_default();
            let dirs = writable_dirs(&c, &data_dir);
            if systemd {
                println!(
                    "# Written by novabackup's systemd generator from the agent's configuration."
                );
                println!("[Service]");
                for d in &dirs {
                    match unit_path(d) {
                        // "-": a folder that does not exist yet does not stop the agent.
                        Some(p) => println!("ReadWritePaths=-{p}"),
                        None => {
                            println!("# left out (rename it): {:?}", d.display().to_string());
                            eprintln!(
                                "novabackup: {:?} has characters a unit file cannot carry safely \
                                 (spaces, quotes, backslashes, %); the agent cannot write there \
                                 under systemd: rename the folder",
                                d.display().to_string()
                            );
                        }
                    }
                }
            } else {
                for d in &dirs {
                    println!("{}", d.display());
                }
            }
            Ok(())
        }
    }
}

/// The folders the configured agent writes to. Device nodes need no entry
/// (a sandbox leaves /dev writable), nor does anything relative, which the
/// agent would refuse anyway.
pub fn writable_dirs(c: &FileConfig, default_data_dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let data_dir = c.data_dir.clone().unwrap_or(default_data_dir.to_path_buf());
    let mut add = |p: &Path| {
        if p.is_absolute() && !p.starts_with("/dev") {
            out.insert(p.to_path_buf());
        }
    };
    add(&data_dir);
    if let Some(s) = c.store.as_deref().filter(|s| !s.contains("://")) {
        add(Path::new(s));
    }
    if let Some(s) = c.nbd_socket.as_deref().filter(|s| *s != "none") {
        if let Some(parent) = Path::new(s).parent() {
            add(parent);
        }
    }
    for d in &c.disks {
        // The folder, not the file: the bitmap's sidecar files and a
        // re-created image live beside it.
        if let Some(parent) = d.image.parent() {
            add(parent);
        }
    }
    for d in c.image_dirs.iter().chain(&c.restore_dirs) {
        add(d);
    }
    for d in &c.restore_devices {
        add(d);
    }
    out
}

/// A path as a unit file may carry it, or None when it holds characters
/// a unit file would read as quoting, escapes, specifiers or a second
/// path; such a folder is left read-only and reported.
fn unit_path(p: &Path) -> Option<String> {
    let s = p.to_str()?;
    s.chars()
        .all(|c| c.is_alphanumeric() || "/._-+@:,=~".contains(c))
        .then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_dirs_cover_what_the_agent_writes_and_nothing_under_dev() {
        let c: FileConfig = toml::from_str(
            r#"
            store = "/srv/backup/store"
            image_dirs = ["/var/lib/libvirt/images"]
            restore_dirs = ["/srv/restores"]
            restore_devices = ["/dev/vg0/restore"]
            [[disk]]
            name = "web"
            image = "/srv/vm/web.img"
            [[disk]]
            name = "raw"
            image = "/dev/sdb"
            "#,
        )
        .unwrap();
        let d: Vec<_> = writable_dirs(&c, Path::new("/var/lib/novabackup"))
            .into_iter()
            .collect();
        let want: Vec<PathBuf> = [
            "/srv/backup/store",
            "/srv/restores",
            "/srv/vm",
            "/var/lib/libvirt/images",
            "/var/lib/novabackup",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(d, want);
        let remote: FileConfig = toml::from_str("store = \"https://h:7820\"").unwrap();
        assert_eq!(writable_dirs(&remote, Path::new("/d")).len(), 1);
    }

    #[test]
    fn a_hostile_folder_name_cannot_add_unit_settings() {
        for bad in [
            "/srv/a b",
            "/srv/a\nExecStart=/bin/sh",
            "/srv/%h",
            "/srv/\"q\"",
            "/srv/a\\x20",
        ] {
            assert_eq!(unit_path(Path::new(bad)), None, "{bad:?}");
        }
        assert_eq!(
            unit_path(Path::new("/srv/vm-1/images_2")).as_deref(),
            Some("/srv/vm-1/images_2")
        );
    }
}
