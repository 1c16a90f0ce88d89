//! `novabackup agent`: the daemon. It restores attached disks from the state
//! folder, serves them over NBD (TCP and a unix socket) with change
//! tracking, serves the API, and on SIGTERM or SIGINT stops cleanly: the
//! listeners close, every NBD connection answers what is in flight, and
//! every bitmap is saved with the clean-shutdown mark.

mod fault;
mod jobs;
mod listen;
mod metrics;
mod mounts;
mod notify;
mod policy;
mod schedule;
mod service;
mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nbd_proxy::{IoEngine, Server};
use novabackup_engine::fsutil;
use novabackup_engine::store::local::LocalStore;
use novabackup_engine::store::Store;
use serde::{Deserialize, Serialize};

pub use state::Agent;

/// The API token, created 0600 at first start.
pub const TOKEN_FILE: &str = "api.token";
/// Where the running agent says where it listens.
const RUNTIME_FILE: &str = "agent.json";
/// The folder restores go to unless the configuration names others.
pub const RESTORES_DIR: &str = "restores";

/// Flags of `novabackup agent`; each overrides the configuration file.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// TOML configuration (default /etc/novabackup/agent.toml when it exists).
    #[arg(long, env = "NOVABACKUP_CONFIG")]
    pub config: Option<PathBuf>,
    /// NBD over TCP [default: none]. TCP requires TLS (--nbd-tls-dir);
    /// without it only a loopback address with --nbd-insecure-tcp.
    #[arg(long)]
    pub nbd_listen: Option<String>,
    /// Allow NBD over TCP without TLS or authentication (loopback only).
    #[arg(long)]
    pub nbd_insecure_tcp: bool,
    /// TLS credentials for NBD over TCP: a folder with ca-cert.pem (signs
    /// client certificates), server-cert.pem and server-key.pem, as for
    /// QEMU's tls-creds-x509.
    #[arg(long)]
    pub nbd_tls_dir: Option<PathBuf>,
    /// NBD unix socket ("none" to disable) [default: DATA_DIR/nbd.sock].
    #[arg(long)]
    pub nbd_socket: Option<String>,
    /// A group whose members may connect to the NBD socket [default: root only].
    #[arg(long)]
    pub nbd_socket_group: Option<String>,
    /// Open NBD connections at most [default: 256].
    #[arg(long)]
    pub nbd_max_connections: Option<usize>,
    /// Seconds an NBD client has for its whole handshake [default: 10].
    #[arg(long)]
    pub nbd_handshake_timeout: Option<u64>,
    /// The REST API [default: 127.0.0.1:7810].
    #[arg(long)]
    pub api_listen: Option<SocketAddr>,
    /// NBD data engine: auto (io_uring when the kernel allows it), uring or pread [default: auto].
    #[arg(long)]
    pub io_engine: Option<String>,
    /// The backup store: a folder [default: DATA_DIR/store], the URL of a
    /// store server (`http://host:7820`, see `novabackup store serve`), or
    /// an S3 bucket (`s3://BUCKET/PREFIX`).
    #[arg(long)]
    pub store: Option<String>,
    /// The store server's token (default: the NOVABACKUP_STORE_TOKEN variable).
    #[arg(long)]
    pub store_token_file: Option<PathBuf>,
    /// An `s3://` store's credentials and endpoints, `NAME=value` lines
    /// (default: the AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT
    /// and S3_REGION variables).
    #[arg(long)]
    pub store_credentials: Option<PathBuf>,
    /// Chunk size of new snapshots, at least the disk's CBT granularity [default: 64K].
    #[arg(long, value_parser = novabackup_engine::size::parse_size)]
    pub chunk_size: Option<u64>,
    /// zstd compression level (-7 to 19; lower is faster, higher is smaller) [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub zstd_level: Option<i32>,
    /// TLS on the API.
    #[command(flatten)]
    pub tls: crate::tlsopts::TlsArgs,
    /// Pin an https store server's certificate (`sha256:...`, printed by `store serve`).
    #[arg(long)]
    pub store_fingerprint: Option<String>,
    /// Audit change tracking every N backups of a disk (0: only on request) [default: 14].
    #[arg(long)]
    pub audit_every: Option<u32>,
    /// A folder restores may write in, besides DATA_DIR/restores (repeatable).
    #[arg(long = "restore-dir")]
    pub restore_dirs: Vec<PathBuf>,
    /// A block device restores may overwrite (repeatable).
    #[arg(long = "restore-device")]
    pub restore_devices: Vec<PathBuf>,
    /// Memory for the chunks of a snapshot read without a restore (file
    /// listings and downloads), per reader [default: 64M].
    #[arg(long, value_parser = novabackup_engine::size::parse_size)]
    pub snapshot_cache: Option<u64>,
    /// Seconds an API client has for a request's headers, and may pause
    /// within its body [default: 30].
    #[arg(long, hide = true)]
    pub api_timeout: Option<u64>,
    /// Where the boot id is read (tests point it at a file to simulate a reboot).
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id", hide = true)]
    pub boot_id_file: PathBuf,
}

/// The agent's settings: flags, then the configuration file, then defaults.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The configuration file in use, reread on SIGHUP.
    pub config: Option<PathBuf>,
    /// NBD over TCP ("none" to disable).
    pub nbd_listen: String,
    /// The operator's opt-in to NBD over TCP without TLS (loopback only).
    pub nbd_insecure_tcp: bool,
    /// NBD TLS credentials folder.
    pub nbd_tls_dir: Option<PathBuf>,
    /// NBD unix socket.
    pub nbd_socket: Option<String>,
    /// The group that may connect to the NBD socket.
    pub nbd_socket_group: Option<String>,
    /// Bounds on NBD connections.
    pub nbd_limits: nbd_proxy::server::Limits,
    /// The REST API.
    pub api_listen: SocketAddr,
    /// NBD data engine.
    pub io_engine: String,
    /// Store folder or URL.
    pub store: Option<String>,
    /// The store server's token file.
    pub store_token_file: Option<PathBuf>,
    /// An `s3://` store's credentials file.
    pub store_credentials: Option<PathBuf>,
    /// The store's site, for placement rules.
    pub site: Option<String>,
    /// Per disk, the sites allowed to hold its backups.
    pub placement: novabackup_engine::placement::Placement,
    /// Other sites' stores.
    pub sites: std::collections::BTreeMap<String, crate::config::SiteConfig>,
    /// Chunk size of new snapshots.
    pub chunk_size: u64,
    /// zstd level.
    pub zstd_level: i32,
    /// Where the boot id is read.
    pub boot_id_file: PathBuf,
    /// API header and body-pause timeout.
    pub api_timeout: Duration,
    /// Disks the configuration declares.
    pub disks: Vec<crate::config::DiskConfig>,
    /// TLS on the API.
    pub tls: crate::tlsopts::TlsMode,
    /// Allow a non-loopback API without TLS.
    pub insecure_listen: bool,
    /// The store server's pinned certificate.
    pub store_fingerprint: Option<String>,
    /// Audit change tracking every N backups of a disk (0: never).
    pub audit_every: u32,
    /// Folders besides DATA_DIR/restores that API restores may write in.
    pub restore_dirs: Vec<PathBuf>,
    /// Block devices API restores may overwrite.
    pub restore_devices: Vec<PathBuf>,
    /// Bytes of chunks each snapshot reader keeps.
    pub snapshot_cache: usize,
}

impl AgentArgs {
    /// Applies the configuration file under the flags.
    pub fn resolve(self, file: Option<(PathBuf, crate::config::FileConfig)>) -> AgentOptions {
        let (path, c) = match file {
            Some((p, c)) => (Some(p), c),
            None => (None, Default::default()),
        };
        AgentOptions {
            config: path,
            nbd_listen: self
                .nbd_listen
                .or(c.nbd_listen)
                .unwrap_or_else(|| "none".into()),
            nbd_insecure_tcp: self.nbd_insecure_tcp || c.nbd_insecure_tcp.unwrap_or(false),
            nbd_tls_dir: self.nbd_tls_dir.or(c.nbd_tls_dir),
            nbd_socket: self.nbd_socket.or(c.nbd_socket),
            nbd_socket_group: self.nbd_socket_group.or(c.nbd_socket_group),
            nbd_limits: {
                let d = nbd_proxy::server::Limits::default();
                let max = self
                    .nbd_max_connections
                    .or(c.nbd_max_connections)
                    .unwrap_or(d.max_connections)
                    .max(1);
                nbd_proxy::server::Limits {
                    handshake: self
                        .nbd_handshake_timeout
                        .or(c.nbd_handshake_timeout)
                        .map(Duration::from_secs)
                        .unwrap_or(d.handshake),
                    max_connections: max,
                    max_handshakes: d.max_handshakes.min(max),
                }
            },
            api_listen: self
                .api_listen
                .or(c.api_listen)
                .unwrap_or_else(|| "127.0.0.1:7810".parse().expect("a valid address")),
            io_engine: self
                .io_engine
                .or(c.io_engine)
                .unwrap_or_else(|| "auto".into()),
            store: self.store.or(c.store),
            store_token_file: self.store_token_file.or(c.store_token_file),
            store_credentials: self.store_credentials.or(c.store_credentials),
            site: c.site,
            placement: c.placement,
            sites: c.sites,
            chunk_size: self
                .chunk_size
                .or(c
                    .chunk_size
                    .and_then(|s| novabackup_engine::size::parse_size(&s).ok()))
                .unwrap_or(64 << 10),
            zstd_level: self
                .zstd_level
                .or(c.zstd_level)
                .unwrap_or(novabackup_engine::backup::DEFAULT_ZSTD_LEVEL),
            boot_id_file: self.boot_id_file,
            api_timeout: Duration::from_secs(self.api_timeout.unwrap_or(30)),
            disks: c.disks,
            tls: self
                .tls
                .mode(c.tls_cert.zip(c.tls_key), c.tls.unwrap_or(false)),
            insecure_listen: self.tls.insecure_listen || c.insecure_listen.unwrap_or(false),
            store_fingerprint: self.store_fingerprint.or(c.store_fingerprint),
            audit_every: self.audit_every.or(c.audit_every).unwrap_or(14),
            restore_dirs: if self.restore_dirs.is_empty() {
                c.restore_dirs
            } else {
                self.restore_dirs
            },
            restore_devices: if self.restore_devices.is_empty() {
                c.restore_devices
            } else {
                self.restore_devices
            },
            snapshot_cache: self
                .snapshot_cache
                .or(c
                    .snapshot_cache
                    .and_then(|s| novabackup_engine::size::parse_size(&s).ok()))
                .unwrap_or(64 << 20) as usize,
        }
    }
}

/// What a running agent writes to DATA_DIR/agent.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// Process id.
    pub pid: u32,
    /// API address (host:port).
    pub api: String,
    /// NBD TCP address, if enabled.
    pub nbd_tcp: Option<String>,
    /// NBD unix socket, if enabled.
    pub nbd_socket: Option<PathBuf>,
    /// The API's certificate fingerprint when it serves TLS.
    #[serde(default)]
    pub api_fingerprint: Option<String>,
}

/// Reads DATA_DIR/agent.json, if an agent wrote one.
pub fn runtime_info(dir: &Path) -> Option<RuntimeInfo> {
    let s = std::fs::read(dir.join(RUNTIME_FILE)).ok()?;
    serde_json::from_slice(&s).ok()
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(dir: PathBuf, opts: AgentOptions) -> anyhow::Result<()> {
    fsutil::create_private_dir(&dir)
        .and_then(|()| std::fs::create_dir_all(dir.join("cbt")))
        .with_context(|| format!("cannot create the state folder {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let token = load_or_create_token(&dir)?;
    let engine = match opts.io_engine.as_str() {
        "auto" => IoEngine::probe(),
        other => other.parse().map_err(anyhow::Error::msg)?,
    };
    tracing::info!(?engine, "NBD data engine");
    let boot_id = std::fs::read_to_string(&opts.boot_id_file)
        .with_context(|| {
            format!(
                "cannot read the boot id from {}",
                opts.boot_id_file.display()
            )
        })?
        .trim()
        .to_string();
    let server = Server::with_limits(engine, opts.nbd_limits);
    if let Some(d) = &opts.nbd_tls_dir {
        let cfg = nbd_proxy::TlsConfig::from_dir(d)?;
        server.set_tls(Some(cfg));
    }
    let store = open_store(&dir, &opts)?;
    let chunk = novabackup_engine::cbt::Granularity::new(opts.chunk_size).map_err(|_| {
        anyhow::anyhow!(
            "invalid --chunk-size {}: use a power of two from 4K to 4M",
            opts.chunk_size
        )
    })?;
    let settings = state::EngineSettings {
        backup: novabackup_engine::backup::BackupOptions {
            chunk_size: chunk.bytes(),
            zstd_level: opts.zstd_level,
            ..Default::default()
        },
        read: match engine {
            IoEngine::Uring => novabackup_engine::read::ReadEngine::Uring,
            IoEngine::Pread => novabackup_engine::read::ReadEngine::Pread,
        },
        workers: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        audit_every: opts.audit_every,
        pages: Default::default(),
        confine: restore_confinement(&dir, &opts)?,
        snapshot_cache: opts.snapshot_cache,
        site: opts.site.clone(),
        placement: opts.placement.clone(),
        sites: opts
            .sites
            .iter()
            .map(|(name, s)| {
                let access = StoreAccess {
                    token_file: s.store_token_file.clone(),
                    fingerprint: s.store_fingerprint.clone(),
                    credentials: s.store_credentials.clone(),
                    cache_dir: Some(dir.join("s3-cache")),
                };
                (name.clone(), (s.store.clone(), access))
            })
            .collect(),
    };
    let policy = policy::Settings::load(&dir)?;
    let schedules = Arc::new(schedule::Schedules::load(&dir)?);
    let agent = Arc::new(Agent::new(
        dir.clone(),
        server.clone(),
        boot_id,
        store,
        settings,
        policy,
        schedules.clone(),
    ));
    agent.set_self();
    agent.restore()?;
    attach_declared(&agent, &opts.disks);
    let stop_scheduler = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scheduler = schedule::spawn(schedules, agent.clone(), stop_scheduler.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(serve(&dir, &opts, agent.clone(), server.clone(), token));
    stop_scheduler.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = scheduler.join();
    // Connections drain on their own threads; wait for them before saving.
    server.shutdown(Duration::from_secs(30));
    agent.shutdown();
    let _ = std::fs::remove_file(dir.join(RUNTIME_FILE));
    result
}

async fn serve(
    dir: &Path,
    opts: &AgentOptions,
    agent: Arc<Agent>,
    server: Arc<Server>,
    token: String,
) -> anyhow::Result<()> {
    let stop = tokio_util_cancel();
    let mut tasks = Vec::new();
    let mut nbd_tcp = None;
    if opts.nbd_listen != "none" {
        if opts.nbd_tls_dir.is_none() {
            check_nbd_tcp(&opts.nbd_listen, opts.nbd_insecure_tcp)?;
        }
        let l = tokio::net::TcpListener::bind(&opts.nbd_listen)
            .await
            .with_context(|| format!("cannot listen for NBD on {}", opts.nbd_listen))?;
        nbd_tcp = Some(l.local_addr()?.to_string());
        tasks.push(tokio::spawn(listen::tcp(l, server.clone(), stop.clone())));
    }
    let socket = match opts.nbd_socket.as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(dir.join("nbd.sock")),
    };
    if let Some(p) = &socket {
        let _ = std::fs::remove_file(p);
        let l = tokio::net::UnixListener::bind(p)
            .with_context(|| format!("cannot listen for NBD on {}", p.display()))?;
        // Connecting needs write permission on the socket: root only,
        // or the configured group.
        socket_access(p, opts.nbd_socket_group.as_deref())?;
        tasks.push(tokio::spawn(listen::unix(l, server.clone(), stop.clone())));
    }
    let tls = api_tls(dir, opts)?;
    let api = tokio::net::TcpListener::bind(opts.api_listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", opts.api_listen))?;
    let api_addr = api.local_addr()?;
    agent.set_endpoints(nbd_tcp.clone(), socket.clone());
    let info = RuntimeInfo {
        pid: std::process::id(),
        api: api_addr.to_string(),
        nbd_tcp: nbd_tcp.clone(),
        nbd_socket: socket.clone(),
        api_fingerprint: tls.as_ref().map(|(fp, _)| fp.clone()),
    };
    fsutil::write_atomic(
        &dir.join(RUNTIME_FILE),
        &serde_json::to_vec_pretty(&info)?,
        0o600,
    )?;
    tracing::info!(api = %api_addr, nbd_tcp = ?nbd_tcp, nbd_socket = ?socket, "agent ready");

    let tokens = novabackup_api::auth::Tokens::open(Some(&dir.join("tokens.json")), &token)
        .context("cannot load the API tokens")?;
    let app = novabackup_api::router(agent.clone(), Arc::new(tokens));
    let stop2 = stop.clone();
    let http = tokio::spawn(novabackup_api::tls::serve_with(
        api,
        app,
        tls.map(|(_, c)| c),
        (opts.api_timeout, opts.api_timeout),
        async move { stop2.notified().await },
    ));
    notify::notify("READY=1");
    if let Some(every) = notify::watchdog_interval() {
        let stop3 = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if fault::take("watchdog-hang") {
                            fault::hang("watchdog-hang");
                        }
                        notify::notify("WATCHDOG=1")
                    }
                    _ = stop3.notified() => return,
                }
            }
        });
    }
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stopping = wait_for_signal();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            r = &mut stopping => { r?; break; }
            _ = hup.recv() => reload(opts, &agent).await,
        }
    }
    notify::notify("STOPPING=1");
    tracing::info!("stopping: closing listeners, draining NBD connections, saving bitmaps");
    stop.notify();
    for t in tasks {
        let _ = t.await;
    }
    if let Some(p) = &socket {
        let _ = std::fs::remove_file(p);
    }
    // In-flight API calls finish; a hung client cannot hold the agent.
    let _ = tokio::time::timeout(Duration::from_secs(10), http).await;
    Ok(())
}

/// The NBD socket is 0600 root, or 0660 root:GROUP with its folder
/// 0710 root:GROUP so members reach it without listing the folder.
fn socket_access(p: &Path, group: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, m: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))
    };
    let Some(group) = group else {
        return mode(p, 0o600);
    };
    let gid = match group.parse::<u32>() {
        Ok(n) => nix::unistd::Gid::from_raw(n),
        Err(_) => nix::unistd::Group::from_name(group)
            .with_context(|| format!("cannot look up the group {group:?}"))?
            .with_context(|| format!("--nbd-socket-group {group}: no such group; create it (groupadd --system {group}) or pick another"))?
            .gid,
    };
    let chown = |path: &Path| {
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to the group {group}", path.display()))
    };
    chown(p)?;
    mode(p, 0o660)?;
    if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        chown(parent)?;
        mode(parent, 0o710)?;
    }
    Ok(())
}

/// NBD over TCP has neither TLS nor client authentication: anyone who can
/// reach the port reads and writes every disk. Only an explicit opt-in on
/// a loopback address is accepted.
fn check_nbd_tcp(addr: &str, insecure: bool) -> anyhow::Result<()> {
    let loopback = addr
        .parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| addr.starts_with("localhost:"));
    if !loopback {
        anyhow::bail!(
            "--nbd-listen {addr}: NBD over TCP without TLS has no authentication, so it may only \
             listen on a loopback address; give --nbd-tls-dir (see docs/SECURITY.md), or let \
             guests on this host use the unix socket"
        );
    }
    if !insecure {
        anyhow::bail!(
            "--nbd-listen {addr}: NBD over TCP without TLS has no authentication, and every \
             local user could read and write the disks; give --nbd-tls-dir, use the unix socket \
             (DATA_DIR/nbd.sock, root only), or pass --nbd-insecure-tcp (nbd_insecure_tcp = \
             true) to accept that"
        );
    }
    tracing::warn!(nbd_tcp = %addr, "NBD over TCP without TLS: every local user can open every disk");
    Ok(())
}

/// A one-shot stop signal that any number of tasks can wait on, before or
/// after it fires.
#[derive(Clone)]
pub(crate) struct Stop(tokio::sync::watch::Sender<bool>);

impl Stop {
    fn notify(&self) {
        self.0.send_replace(true);
    }
    pub(crate) async fn notified(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

fn tokio_util_cancel() -> Stop {
    Stop(tokio::sync::watch::channel(false).0)
}

pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The API's TLS setup, or None; refuses a non-loopback API without TLS
/// unless told to.
fn api_tls(
    dir: &Path,
    opts: &AgentOptions,
) -> anyhow::Result<Option<(String, Arc<rustls::ServerConfig>)>> {
    let Some(id) = crate::tlsopts::identity(
        "the API",
        &opts.tls,
        opts.insecure_listen,
        opts.api_listen,
        dir,
    )?
    else {
        return Ok(None);
    };
    tracing::info!(fingerprint = %id.fingerprint, "the API serves TLS; clients pin this fingerprint");
    Ok(Some((id.fingerprint.clone(), id.server_config()?)))
}

/// SIGHUP: reread the configuration and attach the disks it added. A
/// broken file is reported and changes nothing.
async fn reload(opts: &AgentOptions, agent: &Arc<Agent>) {
    let Some(path) = opts.config.clone() else {
        tracing::info!("SIGHUP: no configuration file to reload (start with --config)");
        return;
    };
    notify::notify("RELOADING=1");
    let agent = agent.clone();
    let done = tokio::task::spawn_blocking(move || match crate::config::FileConfig::load(&path) {
        Ok(c) => {
            tracing::info!(config = %path.display(), "configuration reloaded");
            attach_declared(&agent, &c.disks);
        }
        Err(e) => tracing::error!("SIGHUP: configuration not reloaded: {e:#}"),
    })
    .await;
    if let Err(e) = done {
        tracing::error!("SIGHUP: reload failed: {e}");
    }
    notify::notify("READY=1");
}

/// Attaches the declared disks that are not attached yet; a disk that
/// cannot be attached is logged and skipped, so one bad entry does not
/// stop the others.
fn attach_declared(agent: &Agent, disks: &[crate::config::DiskConfig]) {
    use novabackup_api::DiskService;
    for d in disks {
        if let Ok(info) = agent.get(&d.name) {
            if Path::new(&info.image) != d.image {
                tracing::warn!(disk = %d.name, attached = %info.image, declared = %d.image.display(),
                    "a disk of this name is attached with another image; detach it to use the declared one");
            }
            continue;
        }
        let req = novabackup_api::types::AttachRequest {
            name: d.name.clone(),
            image: d.image.display().to_string(),
            granularity: d
                .granularity
                .as_deref()
                .and_then(|g| novabackup_engine::size::parse_size(g).ok()),
            read_only: d.read_only,
            allow: d.allow.clone(),
        };
        match agent.attach(req) {
            Ok(_) => tracing::info!(disk = %d.name, "declared disk attached"),
            Err(e) => tracing::error!(disk = %d.name, "declared disk not attached: {e}"),
        }
    }
}

/// The folders and devices restores may write to: DATA_DIR/restores
/// (created private) and whatever the configuration adds.
fn restore_confinement(
    dir: &Path,
    opts: &AgentOptions,
) -> anyhow::Result<novabackup_engine::ops::restore::Confinement> {
    let own = dir.join(RESTORES_DIR);
    fsutil::create_private_dir(&own)
        .with_context(|| format!("cannot create the restore folder {}", own.display()))?;
    let mut dirs = vec![own];
    for d in &opts.restore_dirs {
        if !d.is_absolute() || !d.is_dir() {
            anyhow::bail!(
                "restore_dirs: {} is not an absolute path to an existing folder",
                d.display()
            );
        }
        dirs.push(d.clone());
    }
    for d in &opts.restore_devices {
        use std::os::unix::fs::FileTypeExt;
        let ok = std::fs::metadata(d).is_ok_and(|m| m.file_type().is_block_device());
        if !ok {
            anyhow::bail!("restore_devices: {} is not a block device", d.display());
        }
    }
    Ok(novabackup_engine::ops::restore::Confinement {
        dirs,
        devices: opts.restore_devices.clone(),
    })
}

fn open_store(dir: &Path, opts: &AgentOptions) -> anyhow::Result<Arc<dyn Store>> {
    let where_ = opts
        .store
        .clone()
        .unwrap_or_else(|| dir.join("store").display().to_string());
    let access = StoreAccess {
        token_file: opts.store_token_file.clone(),
        fingerprint: opts.store_fingerprint.clone(),
        credentials: opts.store_credentials.clone(),
        cache_dir: Some(dir.join("s3-cache")),
    };
    open_store_at(&where_, &access)
}

/// What reaching a store may need besides its location.
#[derive(Debug, Clone, Default)]
pub struct StoreAccess {
    /// A store server's token file (else NOVABACKUP_STORE_TOKEN).
    pub token_file: Option<PathBuf>,
    /// A TLS store server's pinned certificate.
    pub fingerprint: Option<String>,
    /// An `s3://` store's credentials file (else the environment).
    pub credentials: Option<PathBuf>,
    /// Where an `s3://` store's metadata cache goes (one folder per
    /// bucket and prefix below it); none: read from the bucket each time.
    pub cache_dir: Option<PathBuf>,
}

/// Opens a store folder, a store server's URL or an `s3://` bucket.
pub fn open_store_at(where_: &str, access: &StoreAccess) -> anyhow::Result<Arc<dyn Store>> {
    if novabackup_api::objstore::is_s3(where_) {
        let loc =
            novabackup_api::objstore::S3Location::parse(where_, access.credentials.as_deref())?;
        // One private cache folder per bucket and prefix.
        let cache = access.cache_dir.as_ref().map(|d| {
            let tag = novabackup_engine::digest::ChunkDigest::of(loc.display().as_bytes()).hex();
            d.join(&tag[..16])
        });
        let s = novabackup_api::objstore::ObjectStore::open(&loc, cache.as_deref())
            .with_context(|| format!("cannot open the store at {}", loc.display()))?;
        tracing::info!(store = %loc.display(), "object store opened");
        return Ok(Arc::new(s));
    }
    if where_.starts_with("http://") || where_.starts_with("https://") {
        let token = match &access.token_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the store token {}", p.display()))?
                .trim()
                .to_string(),
            None => std::env::var("NOVABACKUP_STORE_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "--store {where_} needs the store server's token: \
                     pass --store-token-file (the server's server.token) or set NOVABACKUP_STORE_TOKEN"
                )
            })?,
        };
        let s = novabackup_api::remote::RemoteStore::connect_pinned(
            where_,
            &token,
            access.fingerprint.as_deref(),
        )
        .with_context(|| format!("cannot use the store server {where_}"))?;
        tracing::info!(store = %where_, "store server connected");
        return Ok(Arc::new(s));
    }
    let s = LocalStore::open(Path::new(where_))
        .with_context(|| format!("cannot open the store at {where_}"))?;
    for d in s.damaged_packs() {
        tracing::warn!(pack = %d, "damaged pack");
    }
    tracing::info!(store = %where_, "store opened");
    Ok(Arc::new(s))
}

fn load_or_create_token(dir: &Path) -> anyhow::Result<String> {
    load_or_create_token_at(&dir.join(TOKEN_FILE))
}

/// Reads the token at `p`, or creates a random one there (mode 0600).
pub(crate) fn load_or_create_token_at(p: &Path) -> anyhow::Result<String> {
    let p = p.to_path_buf();
    match std::fs::read_to_string(&p) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw)
        .map_err(|e| anyhow::anyhow!("no randomness for the API token: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    fsutil::write_atomic(&p, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", p.display()))?;
    tracing::info!(path = %p.display(), "created the API token");
    Ok(token)
}
