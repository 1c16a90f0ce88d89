//! NBD over TLS (`NBD_OPT_STARTTLS`) with X.509 client certificates.
//!
//! The credentials follow QEMU's and libnbd's folder convention, so one
//! folder made for `qemu-nbd --object tls-creds-x509,dir=...` works here:
//! `ca-cert.pem` (the CA that signs client certificates), `server-cert.pem`
//! and `server-key.pem`. A client must present a certificate signed by that
//! CA; its subject is the identity that export allow lists name.
//!
//! After STARTTLS the connection thread hands the TCP socket to a pump
//! thread that runs rustls on one side and a unix socket pair on the
//! other. The handshake and both data engines then carry on over the
//! plaintext end of the pair exactly as they would over a unix-socket
//! client, so io_uring and the request handler know nothing of TLS.

use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::AsyncWriteExt;

use crate::access::Peer;

/// Bytes the TLS pump moves at once in each direction.
const PUMP_BUFFER: usize = 256 << 10;

/// File names inside the credentials folder.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";

/// Errors loading TLS credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file is missing, unreadable or not PEM.
    #[error("{path}: {why} (the NBD TLS folder holds ca-cert.pem, server-cert.pem and server-key.pem, as for qemu-nbd's tls-creds-x509)")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the credentials.
    #[error("NBD TLS credentials are not usable: {0}")]
    Rustls(String),
}

/// A loaded TLS server configuration for NBD.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

impl TlsConfig {
    /// Loads `dir/{ca-cert,server-cert,server-key}.pem`; clients must
    /// present a certificate the CA signed.
    pub fn from_dir(dir: &Path) -> Result<TlsConfig, TlsSetupError> {
        let bad = |path: PathBuf, why: String| TlsSetupError::File { path, why };
        let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
            let path = dir.join(name);
            let v: Vec<_> = CertificateDer::pem_file_iter(&path)
                .map_err(|e| bad(path.clone(), e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(path.clone(), e.to_string()))?;
            if v.is_empty() {
                return Err(bad(path, "no certificate in the file".into()));
            }
            Ok(v)
        };
        let ca = certs(CA_CERT)?;
        let chain = certs(SERVER_CERT)?;
        let key_path = dir.join(SERVER_KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| bad(key_path.clone(), e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| bad(dir.join(CA_CERT), e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        Ok(TlsConfig {
            config: Arc::new(config),
        })
    }
}

/// Runs the TLS handshake on `tcp` within `timeout` and starts the pump.
/// Returns the plaintext end and the client's identity.
pub(super) fn upgrade(
    tcp: TcpStream,
    cfg: &TlsConfig,
    timeout: Duration,
) -> io::Result<(UnixStream, Peer)> {
    let (plain, inner) = UnixStream::pair()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Peer>>(1);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.config.clone());
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(pump(tcp, inner, acceptor, timeout, tx));
        })?;
    let peer = rx
        .recv()
        .map_err(|_| io::Error::other("the TLS thread ended early"))??;
    Ok((plain, peer))
}

async fn pump(
    tcp: TcpStream,
    inner: UnixStream,
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    tx: std::sync::mpsc::SyncSender<io::Result<Peer>>,
) {
    let setup = async {
        tcp.set_nonblocking(true)?;
        inner.set_nonblocking(true)?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let inner = tokio::net::UnixStream::from_std(inner)?;
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = peer_of(tls.get_ref().1)?;
        Ok::<_, io::Error>((tls, inner, peer))
    };
    let (tls, inner, peer) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    if tx.send(Ok(peer)).is_err() {
        return;
    }
    let (tls_r, mut tls_w) = tokio::io::split(tls);
    let (in_r, mut in_w) = inner.into_split();
    // Large buffers: tokio's plain copy moves 8 KiB at a time, a syscall
    // and a TLS record each for every 8 KiB of a 1 MiB read.
    let mut tls_r = tokio::io::BufReader::with_capacity(PUMP_BUFFER, tls_r);
    let mut in_r = tokio::io::BufReader::with_capacity(PUMP_BUFFER, in_r);
    // Client to server: at the client's end (or a broken record) the
    // server side sees end of input and answers what is in flight.
    let up = async {
        let _ = tokio::io::copy_buf(&mut tls_r, &mut in_w).await;
        let _ = in_w.shutdown().await;
    };
    // Server to client: when the server side closes, the connection is
    // over whatever the client still sends.
    let down = async {
        let _ = tokio::io::copy_buf(&mut in_r, &mut tls_w).await;
        let _ = tls_w.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => down.await,
    }
}

/// The subject of the client's verified certificate.
fn peer_of(conn: &rustls::ServerConnection) -> io::Result<Peer> {
    let der = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "no client certificate"))?;
    let subject = subject_of(der).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the client certificate's subject cannot be read",
        )
    })?;
    Ok(Peer::Tls { subject })
}

/// `(attribute, value)` pairs of a DER certificate's subject, attribute
/// names abbreviated as OpenSSL prints them (CN, O, OU, C, ST, L, ...).
pub fn subject_of(der: &[u8]) -> Option<Vec<(String, String)>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut out = Vec::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            let oid = attr.attr_type();
            let name = x509_parser::objects::oid2abbrev(oid, x509_parser::objects::oid_registry())
                .map(str::to_string)
                .unwrap_or_else(|_| oid.to_id_string());
            let value = attr.as_str().ok()?.to_string();
            out.push((name, value));
        }
    }
    Some(out)
}
