//! Upload batches sent on connections of their own, past ureq. ureq copies
//! a request body through an 8 KiB stack buffer, and the TLS connector
//! then gathered those pieces again before rustls encrypted them: three
//! copies of every uploaded byte on the agent. Here a batch's chunk files go
//! to rustls as one vectored write, whose encryption is the only copy, or
//! straight to the socket with `writev` on plain HTTP.
//!
//! One [`Uploader`] per upload thread keeps one connection alive from
//! batch to batch. Only `POST /store/v1/chunks` goes this way; every other
//! request stays with ureq.

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use novabackup_engine::digest::ChunkDigest;

use super::Upload;
use crate::store_wire::{record_head, BATCH_BYTES, RECORD_HEAD};

/// How long a connection may take to open.
const CONNECT: Duration = Duration::from_secs(5);
/// How long the server may take to take a write or to answer (it checks
/// every chunk's digest before it answers).
const IO: Duration = Duration::from_secs(300);
/// Most bytes of an answer's head and body read (an error's JSON body).
const ANSWER_MAX: u64 = 1 << 20;
/// Plaintext rustls encrypts before the records are written out: a whole
/// batch ([`BATCH_BYTES`] and its heads), so that it leaves in one or two
/// `writev` calls, not one per 256 KiB. Each call on loopback also runs
/// the receiver's network stack and wakes the server.
const TLS_BUFFER: usize = BATCH_BYTES + (64 << 10);

/// Why an upload failed.
#[derive(Debug)]
pub(super) enum UploadError {
    /// The connection failed: worth a retry on a new one.
    Transport(io::Error),
    /// The server answered with an error status and this body.
    Status(u16, Vec<u8>),
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// Sends upload batches to one store server, on one kept connection.
pub(super) struct Uploader {
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    host: String,
    /// The request line's path.
    path: String,
    token: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<Conn>,
}

impl Uploader {
    /// For the store server at `base` (`http://`, or `https://` with
    /// `tls` given).
    pub(super) fn new(
        base: &str,
        token: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Uploader, String> {
        let url = url::Url::parse(base).map_err(|e| format!("{base:?} is not a URL: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("{base:?} names no host"))?
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{base:?} names no port"))?;
        // Plain HTTP ignores TLS settings, as ureq does.
        let tls = match (url.scheme(), tls) {
            ("https", Some(t)) => Some(t),
            ("https", None) => return Err(format!("{base:?}: https needs TLS settings")),
            ("http", _) => None,
            (other, _) => return Err(format!("{base:?}: {other} is not http or https")),
        };
        Ok(Uploader {
            authority: format!("{host}:{port}"),
            host,
            path: format!("{}/store/v1/chunks", url.path().trim_end_matches('/')),
            token: token.to_string(),
            tls,
            conn: None,
        })
    }

    /// Uploads `batch` as one request, on the kept connection or a new
    /// one. A transport error drops the connection.
    pub(super) fn send(&mut self, batch: &[(ChunkDigest, Upload)]) -> Result<(), UploadError> {
        if let Some(conn) = self.conn.take() {
            match self.send_on(conn, batch) {
                // The server may have closed a kept connection since (an
                // idle timeout, a restart): once more, on a new one, at
                // once.
                Err(UploadError::Transport(_)) => {}
                r => return r,
            }
        }
        let conn = self.connect().map_err(UploadError::Transport)?;
        self.send_on(conn, batch)
    }

    fn send_on(
        &mut self,
        mut conn: Conn,
        batch: &[(ChunkDigest, Upload)],
    ) -> Result<(), UploadError> {
        let (status, body, keep) = self
            .exchange(&mut conn, batch)
            .map_err(UploadError::Transport)?;
        if keep {
            self.conn = Some(conn);
        }
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(UploadError::Status(status, body))
        }
    }

    fn connect(&self) -> io::Result<Conn> {
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} resolves to no address", self.authority),
        );
        for addr in self.authority.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT) {
                Ok(sock) => {
                    sock.set_nodelay(true)?;
                    sock.set_read_timeout(Some(IO))?;
                    sock.set_write_timeout(Some(IO))?;
                    return self.wrap(sock);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn wrap(&self, mut sock: TcpStream) -> io::Result<Conn> {
        let Some(config) = &self.tls else {
            return Ok(Conn::Plain(sock));
        };
        // rustls takes an IPv6 address without its brackets.
        let name = self.host.trim_start_matches('[').trim_end_matches(']');
        let sni = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?}: {e}")))?
            .to_owned();
        let mut conn = rustls::ClientConnection::new(config.clone(), sni)
            .map_err(|e| io::Error::other(format!("TLS setup failed: {e}")))?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
    }

    fn request_head(&self, batch: &[(ChunkDigest, Upload)]) -> String {
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            self.path,
            self.authority,
            self.token,
            batch
                .iter()
                .map(|(_, f)| RECORD_HEAD + f.len())
                .sum::<usize>()
        )
    }

    /// Writes the request, reads the answer: its status, its body, and
    /// whether the connection may be used again.
    fn exchange(
        &self,
        conn: &mut Conn,
        batch: &[(ChunkDigest, Upload)],
    ) -> io::Result<(u16, Vec<u8>, bool)> {
        let head = self.request_head(batch);
        let heads = record_heads(batch);
        let mut slices = request_slices(&head, &heads, batch);
        match conn {
            Conn::Plain(sock) => {
                write_all_vectored(sock, &mut slices)?;
                read_answer(sock)
            }
            Conn::Tls(s) => {
                let mut bufs = &mut slices[..];
                while !bufs.is_empty() {
                    let n = s.conn.writer().write_vectored(bufs)?;
                    if n == 0 && !s.conn.wants_write() {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    IoSlice::advance_slices(&mut bufs, n);
                    while s.conn.wants_write() {
                        s.conn.write_tls(&mut s.sock)?;
                    }
                }
                read_answer(s.as_mut())
            }
        }
    }
}

fn record_heads(batch: &[(ChunkDigest, Upload)]) -> Vec<[u8; RECORD_HEAD]> {
    batch.iter().map(|(d, f)| record_head(d, f.len())).collect()
}

/// The request as slices: its head, then each record's head and file.
fn request_slices<'a>(
    head: &'a str,
    record_heads: &'a [[u8; RECORD_HEAD]],
    batch: &'a [(ChunkDigest, Upload)],
) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::with_capacity(1 + 3 * batch.len());
    slices.push(IoSlice::new(head.as_bytes()));
    for (h, (_, f)) in record_heads.iter().zip(batch) {
        slices.push(IoSlice::new(h));
        // No empty slices: a write of nothing but those would return 0
        // for ever.
        for part in f.parts() {
            if !part.is_empty() {
                slices.push(IoSlice::new(part));
            }
        }
    }
    slices
}

fn write_all_vectored(w: &mut impl Write, slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut bufs = slices;
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads an HTTP/1.1 answer with a `Content-Length` body (what the store
/// server sends). Anything else is a transport error.
fn read_answer(r: &mut impl Read) -> io::Result<(u16, Vec<u8>, bool)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    // The server sends nothing past the answer (one request at a time),
    // so a reader buffered for this answer alone loses nothing.
    let mut r = BufReader::new(r.take(ANSWER_MAX));
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the store server closed the connection without an answer",
        ));
    }
    let status: u16 = line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            bad(&format!(
                "not an HTTP/1.1 status line: {:?}",
                line.trim_end()
            ))
        })?;
    let (mut len, mut keep) = (None, true);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the answer's head ended early"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(bad(&format!("bad header line {l:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            len = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| bad("bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep = false;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("a chunked answer (the store server sends none)"));
        }
    }
    let len = len.ok_or_else(|| bad("an answer without Content-Length"))?;
    let mut body = vec![0u8; len.min(ANSWER_MAX) as usize];
    r.read_exact(&mut body)?;
    Ok((status, body, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_or_refused_never_guessed() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"stored\":3}";
        assert_eq!(
            read_answer(&mut &ok[..]).unwrap(),
            (200, b"{\"stored\":3}".to_vec(), true)
        );
        let closing =
            b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            read_answer(&mut &closing[..]).unwrap(),
            (400, b"{}".to_vec(), false)
        );
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab",
            b"SMTP ready\r\n",
            b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        ] {
            assert!(
                read_answer(&mut &bad[..]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_request_body_is_the_encoded_batch() {
        let mut batch: Vec<(ChunkDigest, Upload)> = [&b"first"[..], b"", &[7u8; 20_000]]
            .iter()
            .map(|f| (ChunkDigest::of(f), Upload::File(f.to_vec())))
            .collect();
        // A raw chunk goes as its head and its plain bytes.
        // Incompressible, as a raw chunk is.
        let plain: Vec<u8> = (0u32..1000)
            .flat_map(|i| ChunkDigest::of(&i.to_le_bytes()).0)
            .collect();
        let head = novabackup_engine::format::chunk::raw_head(&plain, true);
        batch.push((ChunkDigest::of(&plain), Upload::Raw(head, plain.clone())));
        let u = Uploader::new("http://127.0.0.1:1", "tok", None).unwrap();
        let head = u.request_head(&batch);
        let heads = record_heads(&batch);
        let sent: Vec<u8> = request_slices(&head, &heads, &batch)
            .iter()
            .flat_map(|s| s.to_vec())
            .collect();
        let files: Vec<Vec<u8>> = batch.iter().map(|(_, f)| f.parts().concat()).collect();
        let built = crate::store_wire::encode_batch(
            batch.iter().zip(&files).map(|((d, _), f)| (d, &f[..])),
        );
        let last = crate::store_wire::decode_batch(&built).unwrap()[3].1;
        let (whole, _) = novabackup_engine::format::chunk::encode(
            &plain,
            &mut novabackup_engine::format::chunk::compressor(1).unwrap(),
        );
        assert!(
            last == &whole[..],
            "the raw record is the file encode makes"
        );
        assert_eq!(&sent[head.len()..], &built[..]);
        assert!(head.starts_with("POST /store/v1/chunks HTTP/1.1\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", built.len())));
        assert!(head.contains("\r\nAuthorization: Bearer tok\r\n") && head.ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_connection_the_server_closed_is_replaced_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (url, rt) = crate::remote::tests_support::serve(dir.path());
        let mut up = Uploader::new(&url, "secret", None).unwrap();
        let plain = vec![5u8; 70_000];
        let mut comp = novabackup_engine::format::chunk::compressor(1).unwrap();
        let (file, _) = novabackup_engine::format::chunk::encode(&plain, &mut comp);
        let batch = vec![(ChunkDigest::of(&plain), Upload::File(file))];
        up.send(&batch).unwrap();
        assert!(up.conn.is_some(), "the connection is kept");
        // The server restarts on the same address: the kept connection is
        // dead, and the next upload must not fail for it.
        drop(rt);
        let rt =
            crate::remote::tests_support::serve_at(dir.path(), url.trim_start_matches("http://"));
        up.send(&batch).unwrap();
        // A server that answers with an error keeps the connection usable.
        let wrong = vec![(
            ChunkDigest::of(b"something else"),
            Upload::File(batch[0].1.parts()[0].to_vec()),
        )];
        match up.send(&wrong) {
            Err(UploadError::Status(400, body)) => {
                assert!(String::from_utf8_lossy(&body).contains("rejected"))
            }
            other => panic!("{other:?}"),
        }
        drop(rt);
        assert!(matches!(up.send(&batch), Err(UploadError::Transport(_))));
    }

    #[test]
    fn an_https_url_needs_tls_settings_and_a_plain_one_ignores_them() {
        assert!(Uploader::new("http://127.0.0.1:1", "t", None).is_ok());
        assert!(Uploader::new("https://127.0.0.1:1", "t", None).is_err());
        let ca = crate::tls::ca_client().unwrap();
        assert!(Uploader::new("https://127.0.0.1:1", "t", Some(ca.clone())).is_ok());
        let plain = Uploader::new("http://127.0.0.1:1", "t", Some(ca)).unwrap();
        assert!(plain.tls.is_none());
        assert!(Uploader::new("not a url", "t", None).is_err());
        assert!(Uploader::new("ftp://127.0.0.1:1", "t", None).is_err());
        let u = Uploader::new("http://[::1]:7829/base/", "t", None).unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("[::1]:7829", "/base/store/v1/chunks")
        );
    }
}
