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
    /// Serve TLS (a self-signed certificate in DIR unless --tls-cert/--tls-key);
    /// its fingerprint is logged and written to DIR/server.fingerprint.
    #[arg(long)]
    pub tls: bool,
    /// PEM certificate chain (implies --tls).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (implies --tls).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow a non-loopback address without TLS.
    #[arg(long)]
    pub insecure_listen: bool,
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
    use novabackup_api::tls::{is_loopback, Identity};
    let id = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(Identity::load(c, k)?),
        _ if a.tls => Some(Identity::self_signed(
            &a.dir,
            &["localhost".to_string(), a.listen.ip().to_string()],
        )?),
        _ if !is_loopback(&a.listen) && !a.insecure_listen => anyhow::bail!(
            "refusing to serve the store on {} without TLS: pass --tls (self-signed) or \
             --tls-cert/--tls-key, or --insecure-listen to accept plain HTTP",
            a.listen
        ),
        _ => None,
    };
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
