//! `novabackup agent`: the daemon. It restores attached disks from the state
//! folder, serves them over NBD (TCP and a unix socket) with change
//! tracking, serves the API, and on SIGTERM or SIGINT stops cleanly: the
//! listeners close, every NBD connection answers what is in flight, and
//! every bitmap is saved with the clean-shutdown mark.

mod jobs;
mod listen;
mod metrics;
mod state;
mod work;

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

/// Options of `novabackup agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentOptions {
    /// NBD over TCP ("none" to disable).
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// NBD unix socket (default DATA_DIR/nbd.sock; "none" to disable).
    #[arg(long)]
    pub nbd_socket: Option<String>,
    /// The REST API.
    #[arg(long, default_value = "127.0.0.1:7810")]
    pub api_listen: SocketAddr,
    /// NBD data engine: auto (io_uring when the kernel allows it), uring or pread.
    #[arg(long, default_value = "auto")]
    pub io_engine: String,
    /// The backup store: a folder (default DATA_DIR/store), or the URL of a
    /// store server (`http://host:7820`, see `novabackup store serve`).
    #[arg(long)]
    pub store: Option<String>,
    /// The store server's token (default: the NOVABACKUP_STORE_TOKEN variable).
    #[arg(long)]
    pub store_token_file: Option<PathBuf>,
    /// Chunk size of new snapshots (at least the disk's CBT granularity).
    #[arg(long, default_value = "64K", value_parser = novabackup_engine::size::parse_size)]
    pub chunk_size: u64,
    /// zstd compression level (1-19; negative levels are faster).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// Where the boot id is read (tests point it at a file to simulate a reboot).
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id", hide = true)]
    pub boot_id_file: PathBuf,
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
}

/// Reads DATA_DIR/agent.json, if an agent wrote one.
pub fn runtime_info(dir: &Path) -> Option<RuntimeInfo> {
    let s = std::fs::read(dir.join(RUNTIME_FILE)).ok()?;
    serde_json::from_slice(&s).ok()
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(dir: PathBuf, opts: AgentOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("cbt"))
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
    let server = Server::new(engine);
    let store = open_store(&dir, &opts)?;
    let chunk = novabackup_engine::cbt::Granularity::new(opts.chunk_size).map_err(|_| {
        anyhow::anyhow!(
            "invalid --chunk-size {}: use a power of two from 4K to 4M",
            opts.chunk_size
        )
    })?;
    let settings = work::EngineSettings {
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
    };
    let agent = Arc::new(Agent::new(
        dir.clone(),
        server.clone(),
        boot_id,
        store,
        settings,
    ));
    agent.restore()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(serve(&dir, &opts, agent.clone(), server.clone(), token));
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
        tasks.push(tokio::spawn(listen::unix(l, server.clone(), stop.clone())));
    }
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
    };
    fsutil::write_atomic(
        &dir.join(RUNTIME_FILE),
        &serde_json::to_vec_pretty(&info)?,
        0o644,
    )?;
    tracing::info!(api = %api_addr, nbd_tcp = ?nbd_tcp, nbd_socket = ?socket, "agent ready");

    let tokens = novabackup_api::auth::Tokens::open(Some(&dir.join("tokens.json")), &token)
        .context("cannot load the API tokens")?;
    let app = novabackup_api::router(agent.clone(), Arc::new(tokens));
    let stop2 = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(api, app)
            .with_graceful_shutdown(async move { stop2.notified().await })
            .await
    });
    wait_for_signal().await?;
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

fn open_store(dir: &Path, opts: &AgentOptions) -> anyhow::Result<Arc<dyn Store>> {
    let where_ = opts
        .store
        .clone()
        .unwrap_or_else(|| dir.join("store").display().to_string());
    if where_.starts_with("http://") || where_.starts_with("https://") {
        let token = match &opts.store_token_file {
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
        let s = novabackup_api::remote::RemoteStore::connect(&where_, &token)
            .with_context(|| format!("cannot use the store server {where_}"))?;
        tracing::info!(store = %where_, "store server connected");
        return Ok(Arc::new(s));
    }
    let s = LocalStore::open(Path::new(&where_))
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
