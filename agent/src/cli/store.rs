//! `novabackup store serve`: a store server for many agents (see
//! `novabackup_api::store_server` for the protocol).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use novabackup_engine::store::local::LocalStore;

/// Store server commands.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Serve a store folder to agents over HTTP (same format as a local store).
    Serve(ServeArgs),
}

/// Options of `store serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The store folder (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7820")]
    pub listen: SocketAddr,
    /// The token agents must present (default: DIR/server.token, created 0600 at first start).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// TLS; the fingerprint is logged and written to DIR/server.fingerprint.
    #[command(flatten)]
    pub tls: crate::tlsopts::TlsArgs,
}

/// Runs the store server until SIGTERM or SIGINT.
pub fn run(c: StoreCommand) -> anyhow::Result<()> {
    let StoreCommand::Serve(a) = c;
    let store = LocalStore::open(&a.dir)
        .with_context(|| format!("cannot open the store at {}", a.dir.display()))?;
    for d in store.damaged_packs() {
        tracing::warn!(pack = %d, "damaged pack");
    }
    let token_file = a.token_file.unwrap_or_else(|| a.dir.join("server.token"));
    let token = crate::daemon::load_or_create_token_at(&token_file)?;
    let id = crate::tlsopts::identity(
        "the store",
        &a.tls.mode(None, false),
        a.tls.insecure_listen,
        a.listen,
        &a.dir,
    )?;
    let tls = match &id {
        Some(id) => {
            let p = a.dir.join("server.fingerprint");
            novabackup_engine::fsutil::write_atomic(
                &p,
                format!("{}\n", id.fingerprint).as_bytes(),
                0o644,
            )
            .with_context(|| format!("cannot write {}", p.display()))?;
            tracing::info!(fingerprint = %id.fingerprint, "TLS on; agents pin this fingerprint (--store-fingerprint)");
            Some(id.server_config()?)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        tracing::info!(
            listen = %l.local_addr()?,
            store = %a.dir.display(),
            token = %token_file.display(),
            "store server ready"
        );
        let app = novabackup_api::store_server::router(store, token);
        novabackup_api::tls::serve(l, app, tls, async {
            let _ = crate::daemon::wait_for_signal().await;
            tracing::info!("stopping the store server");
        })
        .await
        .context("the store server failed")
    })
}
