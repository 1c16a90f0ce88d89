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
    /// Tenant tokens of a store server (run on the server's host).
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `novabackup store token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token for a tenant (one host, usually); the secret is printed once.
    Create {
        /// The tenant: 1 to 32 lowercase letters, digits or '-'.
        tenant: String,
        /// The store folder.
        #[arg(long)]
        dir: PathBuf,
        /// agent (its own snapshots) or admin (also garbage collection).
        #[arg(long, default_value = "agent", value_parser = ["agent", "admin"])]
        role: String,
        /// Trust group: deduplication happens only among its tenants [default: the tenant alone].
        #[arg(long)]
        group: Option<String>,
        /// Bytes the tenant's snapshots may add to the store (e.g. 500G).
        #[arg(long, value_parser = novabackup_engine::size::parse_size)]
        quota: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (never their secrets).
    List {
        /// The store folder.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token; the server refuses it from its next request.
    Revoke {
        /// The token id (from `store token list`).
        id: String,
        /// The store folder.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn token(c: TokenCommand) -> anyhow::Result<()> {
    use novabackup_api::store_server::tenants::{self, StoreRole};
    match c {
        TokenCommand::Create {
            tenant,
            dir,
            role,
            group,
            quota,
            json,
        } => {
            let role = if role == "admin" {
                StoreRole::Admin
            } else {
                StoreRole::Agent
            };
            let (t, secret) = tenants::create(&dir, &tenant, role, group.as_deref(), quota)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": t.id, "tenant": t.tenant, "group": t.group, "token": secret})
                );
            } else {
                println!(
                    "token {} for tenant {} (group {}):",
                    t.id, t.tenant, t.group
                );
                println!("{secret}");
                println!("give it to the agent in a 0600 file (--store-token-file); it is not shown again");
            }
        }
        TokenCommand::List { dir, json } => {
            let list = tenants::load(&dir.join(tenants::TENANTS_FILE))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<10} {:<20} {:<8} {:<20} {:>12} CREATED",
                    "ID", "TENANT", "ROLE", "GROUP", "QUOTA"
                );
                for t in list {
                    println!(
                        "{:<10} {:<20} {:<8} {:<20} {:>12} {}",
                        t.id,
                        t.tenant,
                        format!("{:?}", t.role).to_lowercase(),
                        t.group,
                        t.quota
                            .map_or("-".into(), novabackup_engine::size::format_size),
                        t.created
                    );
                }
            }
        }
        TokenCommand::Revoke { id, dir } => {
            if !tenants::revoke(&dir, &id)? {
                anyhow::bail!(
                    "no token {id}; `novabackup store token list --dir {}` shows them",
                    dir.display()
                );
            }
            println!("revoked {id}");
        }
    }
    Ok(())
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
    let a = match c {
        StoreCommand::Serve(a) => a,
        StoreCommand::Token(t) => return token(t),
    };
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
