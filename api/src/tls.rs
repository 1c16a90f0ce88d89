//! TLS for the agent's API and the store server (rustls, aws-lc-rs provider):
//! a certificate and key from PEM files, or a self-signed pair made at
//! first start and kept next to the state. Clients pin the server's
//! certificate by its SHA-256 fingerprint instead of trusting a CA, which
//! is what a fleet of self-signed hosts needs; `agent.json` carries the
//! fingerprint so the local CLI pins it without being told.

use std::path::{Path, PathBuf};
use std::sync::Arc;

mod buffered;
pub use buffered::BufferedConnector;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM or the key is not usable.
    #[error("{path}: {why}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server's certificate chain and key, and the fingerprint clients pin.
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// `sha256:` and the hex SHA-256 of the leaf certificate.
    pub fingerprint: String,
}

/// The fingerprint of a DER certificate, as printed and pinned.
pub fn fingerprint(cert: &[u8]) -> String {
    let h = Sha256::digest(cert);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// aws-lc-rs, AES-128-GCM first. Every uploaded byte is sealed by the
/// agent and opened by the server, the agent's largest cost after SHA-256
/// in a small backup to a store server, and this pair seals fastest
/// (benches/RESULTS.md, "TLS"). AES-128 is TLS 1.3's mandatory suite;
/// AES-256 and ChaCha20 stay offered.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs as p;
    let mut suites = p::DEFAULT_CIPHER_SUITES.to_vec();
    suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..p::default_provider()
    })
}

impl Identity {
    /// Loads `cert` and `key` (PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let bad = |path: &Path, why: String| TlsError::Bad {
            path: path.into(),
            why,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        let Some(leaf) = certs.first() else {
            return Err(bad(cert, "no certificate in the file".into()));
        };
        let fingerprint = fingerprint(leaf);
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        Ok(Identity {
            certs,
            key,
            fingerprint,
        })
    }

    /// `dir/tls.crt` and `dir/tls.key`, made (self-signed, key 0600) if
    /// they do not exist yet.
    pub fn self_signed(dir: &Path, names: &[String]) -> Result<Identity, TlsError> {
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        if !cert.exists() {
            let ck =
                rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Bad {
                    path: cert.clone(),
                    why: e.to_string(),
                })?;
            let io = |path: &Path| {
                let path = path.to_path_buf();
                move |source| TlsError::Io { path, source }
            };
            novabackup_engine::fsutil::write_atomic(
                &key,
                ck.key_pair.serialize_pem().as_bytes(),
                0o600,
            )
            .map_err(io(&key))?;
            novabackup_engine::fsutil::write_atomic(&cert, ck.cert.pem().as_bytes(), 0o644)
                .map_err(io(&cert))?;
        }
        Identity::load(&cert, &key)
    }

    /// The rustls server configuration.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// A client configuration that accepts exactly the certificate with
/// `fingerprint` (`sha256:hex`), whatever name or issuer it carries.
pub fn pinned_client(fingerprint: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let want = fingerprint.trim().to_ascii_lowercase();
    let c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            want,
            provider: provider(),
        }))
        .with_no_client_auth();
    Ok(Arc::new(c))
}

/// A client that checks a server's certificate against the public
/// certificate authorities (webpki's roots, as ureq does): for an
/// `https://` store server whose certificate a CA signed, given no pin.
pub fn ca_client() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(c))
}

#[derive(Debug)]
struct Pinned {
    want: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is {got}, not the pinned {}; \
                 if the server's certificate changed on purpose, pin the new fingerprint",
                self.want
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Bytes read from a TLS connection's socket at once.
const READ_BUFFER: usize = 256 << 10;
/// A request's headers (and a TLS handshake) must arrive within this.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A request body may pause no longer than this between pieces.
pub const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` on `listener`, over TLS when `tls` is given, until
/// `shutdown` completes, with the default [`HEADER_TIMEOUT`] and
/// [`BODY_IDLE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, tls, (HEADER_TIMEOUT, BODY_IDLE), shutdown).await
}

/// [`serve`] with `(header, body_idle)` timeouts of its own.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    (header_timeout, body_idle): (std::time::Duration, std::time::Duration),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // A client that sends half a request must not hold a connection (and
    // its task) forever: headers must arrive within HEADER_TIMEOUT, and a
    // body may pause no longer than BODY_IDLE between pieces.
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_idle));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => {
                // In-flight calls get a moment to finish; long polls and
                // event streams do not hold the stop.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    while conns.join_next().await.is_some() {}
                })
                .await;
                return Ok(());
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        // Without NODELAY a response's last small segment waits for the
        // peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        conns.spawn(async move {
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let mut b =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let Some(acceptor) = acceptor else {
                let _ = b
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                return;
            };
            // rustls reads the socket 4 KiB at a time: a buffer under it
            // turns the ~5,000 reads of a 40 MB upload into a few hundred.
            let tcp = tokio::io::BufReader::with_capacity(READ_BUFFER, tcp);
            let stream = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let _ = b
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Whether `addr` only accepts connections from this host.
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_is_made_once_and_pinned_by_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::self_signed(dir.path(), &["localhost".into()]).unwrap();
        let b = Identity::self_signed(dir.path(), &["localhost".into()]).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "kept, not remade");
        assert!(a.fingerprint.starts_with("sha256:") && a.fingerprint.len() == 7 + 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        a.server_config().unwrap();
        pinned_client(&a.fingerprint).unwrap();
        let e = Identity::load(&dir.path().join("tls.key"), &dir.path().join("tls.key"));
        assert!(e.is_err(), "a key is not a certificate");
    }

    /// Runs a handshake in memory; the client's error if it fails.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<rustls::ClientConnection, rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            // The server's refusal of a bad client is not what is tested.
            s.process_new_packets().unwrap();
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets()?;
        }
        Ok(c)
    }

    #[test]
    fn pinned_clients_agree_on_aes_128_gcm_and_refuse_another_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::self_signed(dir.path(), &["localhost".into()]).unwrap();
        let server = id.server_config().unwrap();
        let c = handshake(pinned_client(&id.fingerprint).unwrap(), server.clone()).unwrap();
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);

        let other = format!("sha256:{}", "ab".repeat(32));
        let e = handshake(pinned_client(&other).unwrap(), server).unwrap_err();
        assert!(e.to_string().contains("not the pinned"), "{e}");
    }
}
