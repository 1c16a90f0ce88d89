//! The agent's TOML configuration (`/etc/novabackup/agent.toml` under
//! systemd, or `--config PATH`). Command-line flags override it; built-in
//! defaults fill the rest. Disks declared here are attached at start and
//! on SIGHUP, besides those attached at run time (`disk attach`).
//!
//! ```toml
//! data_dir = "/var/lib/novabackup"
//! api_listen = "127.0.0.1:7810"
//! nbd_listen = "none"                 # NBD over TCP: needs nbd_tls_dir, or loopback
//! nbd_insecure_tcp = false            #   with this set to true (no authentication)
//! nbd_tls_dir = "/etc/novabackup/nbd-tls" # ca-cert.pem, server-cert.pem, server-key.pem
//! nbd_socket_group = "novabackup"     # may connect to nbd.sock (default: root only)
//! nbd_max_connections = 256
//! nbd_handshake_timeout = 10          # seconds for a whole handshake
//! store = "/srv/backup/store"         # or "http://store-host:7820"
//! store_token_file = "/etc/novabackup/store.token"
//! # store = "s3://backups/site-a"          # an S3 bucket and prefix
//! # store_credentials = "/etc/novabackup/s3.env"
//! # site = "eu-1"                          # where the store is, for placement
//! # [placement]                            # disks kept to some sites only
//! # payroll = ["eu-1"]
//! chunk_size = "64K"
//! zstd_level = 1                      # -3 is faster, 3 smaller
//! audit_every = 14                    # CBT audit every 14th backup of a disk
//! restore_dirs = ["/srv/restores"]    # besides DATA_DIR/restores
//! restore_devices = ["/dev/vg0/restore"]
//! image_dirs = ["/var/lib/libvirt/images"] # run-time attaches (writable under systemd)
//! start_on_install = false            # the package starts the agent at once
//! snapshot_cache = "64M"              # per reader of a snapshot (file listings)
//!
//! [[disk]]
//! name = "web"
//! image = "/var/lib/libvirt/images/web.img"
//! granularity = "64K"                 # optional
//! read_only = false                   # optional
//! allow = ["CN=hv1,O=Example", "uid:107"] # NBD clients that may open it (optional)
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Where systemd's agent reads its configuration.
pub const SYSTEM_CONFIG: &str = "/etc/novabackup/agent.toml";

/// The file's contents; every field optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State folder.
    pub data_dir: Option<PathBuf>,
    /// NBD over TCP.
    pub nbd_listen: Option<String>,
    /// Allow NBD over TCP without TLS (loopback only).
    pub nbd_insecure_tcp: Option<bool>,
    /// NBD TLS credentials folder.
    pub nbd_tls_dir: Option<PathBuf>,
    /// NBD unix socket.
    pub nbd_socket: Option<String>,
    /// The group that may connect to the NBD socket.
    pub nbd_socket_group: Option<String>,
    /// Open NBD connections at most.
    pub nbd_max_connections: Option<usize>,
    /// Seconds for a whole NBD handshake.
    pub nbd_handshake_timeout: Option<u64>,
    /// The REST API address.
    pub api_listen: Option<std::net::SocketAddr>,
    /// NBD data engine.
    pub io_engine: Option<String>,
    /// A store folder or a store server's URL.
    pub store: Option<String>,
    /// The store server's token file.
    pub store_token_file: Option<PathBuf>,
    /// An `s3://` store's credentials file (`NAME=value` lines).
    pub store_credentials: Option<PathBuf>,
    /// The site the store is at, as placement rules name it.
    pub site: Option<String>,
    /// Per disk, the sites allowed to hold its backups: `DISK = ["site", ...]`.
    #[serde(default)]
    pub placement: novabackup_engine::placement::Placement,
    /// Other sites' stores, by site name, for `novabackup sync --site`.
    #[serde(default)]
    pub sites: std::collections::BTreeMap<String, SiteConfig>,
    /// Chunk size of new snapshots ("64K").
    pub chunk_size: Option<String>,
    /// zstd level.
    pub zstd_level: Option<i32>,
    /// Serve the API over TLS (self-signed unless tls_cert/tls_key).
    pub tls: Option<bool>,
    /// PEM certificate chain for the API.
    pub tls_cert: Option<PathBuf>,
    /// PEM key for the API.
    pub tls_key: Option<PathBuf>,
    /// Allow a non-loopback API without TLS.
    pub insecure_listen: Option<bool>,
    /// The https store server's certificate fingerprint.
    pub store_fingerprint: Option<String>,
    /// Audit change tracking every N backups of a disk (0: only on request).
    pub audit_every: Option<u32>,
    /// Folders besides DATA_DIR/restores that API restores may write in.
    #[serde(default)]
    pub restore_dirs: Vec<PathBuf>,
    /// Block devices API restores may overwrite.
    #[serde(default)]
    pub restore_devices: Vec<PathBuf>,
    /// Folders of disk images attached at run time (`disk attach`); under
    /// systemd only these, the declared disks' folders and the agent's own
    /// are writable.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
    /// Memory for the chunks of a snapshot read without a restore, per
    /// reader ("64M").
    pub snapshot_cache: Option<String>,
    /// Read by the package's install script only: start the agent right
    /// after installing (it is enabled either way, so it starts at boot).
    pub start_on_install: Option<bool>,
    /// Disks to attach.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

/// Another site's store.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// A folder, a store server's URL or `s3://BUCKET/PREFIX`.
    pub store: String,
    /// A store server's token file.
    pub store_token_file: Option<PathBuf>,
    /// An https store server's certificate fingerprint.
    pub store_fingerprint: Option<String>,
    /// An `s3://` store's credentials file.
    pub store_credentials: Option<PathBuf>,
}

/// One `[[disk]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Disk (and NBD export) name.
    pub name: String,
    /// Image file or block device.
    pub image: PathBuf,
    /// CBT granularity ("64K").
    pub granularity: Option<String>,
    /// Serve read-only.
    #[serde(default)]
    pub read_only: bool,
    /// NBD clients that may open it (uid:N, gid:N, certificate subjects).
    #[serde(default)]
    pub allow: Vec<String>,
}

impl FileConfig {
    /// Reads and checks `path`; the error names the file and the problem.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let c: FileConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(cs) = &c.chunk_size {
            novabackup_engine::size::parse_size(cs)
                .map_err(|e| anyhow::anyhow!("{}: chunk_size: {e}", path.display()))?;
        }
        if let Some(sc) = &c.snapshot_cache {
            novabackup_engine::size::parse_size(sc)
                .map_err(|e| anyhow::anyhow!("{}: snapshot_cache: {e}", path.display()))?;
        }
        for d in &c.disks {
            if let Some(g) = &d.granularity {
                novabackup_engine::size::parse_size(g).map_err(|e| {
                    anyhow::anyhow!("{}: disk {}: granularity: {e}", path.display(), d.name)
                })?;
            }
        }
        Ok(c)
    }

    /// The configuration to use: `--config`, else the system file when it
    /// exists, else none.
    pub fn find(explicit: Option<&Path>) -> anyhow::Result<Option<(PathBuf, FileConfig)>> {
        match explicit {
            Some(p) => Ok(Some((p.to_path_buf(), FileConfig::load(p)?))),
            None if Path::new(SYSTEM_CONFIG).exists() => {
                let p = PathBuf::from(SYSTEM_CONFIG);
                Ok(Some((p.clone(), FileConfig::load(&p)?)))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_and_rejects_mistakes() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        let c: FileConfig = toml::from_str(&example).unwrap();
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.zstd_level, Some(1));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "zstd_levle = 3\n").unwrap();
        let e = FileConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("a.toml") && e.contains("zstd_levle"), "{e}");
        std::fs::write(&p, "chunk_size = \"lots\"\n").unwrap();
        let e = FileConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("chunk_size"), "{e}");
    }

    /// The `pub NAME:` fields of `struct NAME` in this file.
    fn fields(strukt: &str) -> Vec<String> {
        let src = include_str!("config.rs");
        let start = src.find(&format!("pub struct {strukt} {{")).unwrap();
        let body = &src[start..start + src[start..].find("\n}").unwrap()];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
            .filter(|n| !n.contains(' '))
            .collect()
    }

    #[test]
    fn the_packaged_file_documents_every_option_and_parses_uncommented() {
        let shipped = include_str!("../../packaging/agent.toml");
        // As shipped: valid, with the socket in /run and the group set.
        let c: FileConfig = toml::from_str(shipped).unwrap();
        assert_eq!(c.nbd_socket.as_deref(), Some("/run/novabackup/nbd.sock"));
        assert_eq!(c.nbd_socket_group.as_deref(), Some("novabackup"));
        assert!(c.disks.is_empty() && c.start_on_install.is_none());
        // Every commented setting, uncommented: still valid, and every
        // field of the configuration appears.
        let example: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.starts_with("[[")
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all: toml::Table = toml::from_str(&example).unwrap();
        let _: FileConfig = toml::from_str(&example).unwrap();
        assert!(fields("FileConfig").len() > 20 && fields("DiskConfig").len() == 5);
        for f in fields("FileConfig") {
            let key = if f == "disks" { "disk".to_string() } else { f };
            assert!(
                all.contains_key(&key),
                "packaging/agent.toml does not describe {key}"
            );
        }
        let disk = all["disk"].as_array().unwrap()[0].as_table().unwrap();
        for f in fields("DiskConfig") {
            assert!(
                disk.contains_key(&f),
                "packaging/agent.toml does not describe disk.{f}"
            );
        }
    }
}
