//! TLS options shared by the agent's API and the store server: the flags,
//! and the rule that a non-loopback listener without TLS is refused unless
//! the operator says `--insecure-listen`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use novabackup_api::tls::{is_loopback, Identity};

/// The TLS flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Serve TLS (a self-signed certificate made in the state or store
    /// folder unless --tls-cert/--tls-key).
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

/// What a listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP.
    Plain,
    /// A self-signed certificate kept in the folder.
    SelfSigned,
    /// This PEM certificate chain and key.
    Pem(PathBuf, PathBuf),
}

impl TlsArgs {
    /// The mode, with a configuration file's settings under the flags.
    pub fn mode(&self, file_pem: Option<(PathBuf, PathBuf)>, file_tls: bool) -> TlsMode {
        match (self.tls_cert.clone(), self.tls_key.clone(), file_pem) {
            (Some(c), Some(k), _) => TlsMode::Pem(c, k),
            (_, _, Some((c, k))) => TlsMode::Pem(c, k),
            _ if self.tls || file_tls => TlsMode::SelfSigned,
            _ => TlsMode::Plain,
        }
    }
}

/// The certificate a listener serves, or `None` for plain HTTP; refuses a
/// plain non-loopback listener unless `insecure`. `what` names it in the
/// error ("the API", "the store").
pub fn identity(
    what: &str,
    mode: &TlsMode,
    insecure: bool,
    listen: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Option<Identity>> {
    Ok(match mode {
        TlsMode::Plain if !is_loopback(&listen) && !insecure => anyhow::bail!(
            "refusing to serve {what} on {listen} without TLS: pass --tls (a self-signed \
             certificate) or --tls-cert/--tls-key, or --insecure-listen to accept plain HTTP"
        ),
        TlsMode::Plain => None,
        TlsMode::Pem(cert, key) => Some(Identity::load(cert, key)?),
        TlsMode::SelfSigned => Some(Identity::self_signed(
            dir,
            &["localhost".to_string(), listen.ip().to_string()],
        )?),
    })
}
