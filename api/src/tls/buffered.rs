//! A ureq TLS connector that batches system calls. ureq sends a body in
//! 8 KiB writes and rustls turns each into a record and a `writev`; rustls
//! also reads the socket 4 KiB at a time. For a 40 MB upload that was
//! about 5,500 calls each way. Here plaintext is gathered into 256 KiB
//! before rustls sees it (sent when full, when ureq flushes, or before the
//! first read of the answer), and the socket is read through a 256 KiB
//! buffer.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

/// Bytes gathered before they are encrypted and sent, and read from the
/// socket at once.
const BUFFER: usize = 256 << 10;

/// Connects with `config`, buffered (module doc).
pub struct BufferedConnector(pub Arc<rustls::ClientConfig>);

impl ureq::TlsConnector for BufferedConnector {
    fn connect(
        &self,
        dns_name: &str,
        io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        // rustls takes an IPv6 address without its brackets.
        let name = dns_name.trim_start_matches('[').trim_end_matches(']');
        let sni = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?}: {e}")))?
            .to_owned();
        let mut conn = rustls::ClientConnection::new(self.0.clone(), sni)
            .map_err(|e| io::Error::other(format!("TLS setup failed: {e}")))?;
        // Room for one whole gathered write, so rustls sends it in a
        // single vectored write instead of 64 KiB at a time.
        conn.set_buffer_limit(Some(2 * BUFFER));
        let mut sock = Socket(BufReader::with_capacity(BUFFER, io));
        conn.complete_io(&mut sock)?;
        Ok(Box::new(Buffered {
            tls: rustls::StreamOwned::new(conn, sock),
            out: Vec::with_capacity(BUFFER),
        }))
    }
}

/// The socket under rustls: reads come from a buffer, writes go straight
/// through.
#[derive(Debug)]
struct Socket(BufReader<Box<dyn ureq::ReadWrite>>);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

/// A TLS stream whose plaintext writes are gathered.
struct Buffered {
    tls: rustls::StreamOwned<rustls::ClientConnection, Socket>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Buffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffered")
            .field("socket", &self.tls.sock)
            .field("gathered", &self.out.len())
            .finish()
    }
}

impl Buffered {
    fn send(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.tls.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }
}

impl Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // An answer is read only once the request is out.
        self.send()?;
        self.tls.read(buf)
    }
}

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > BUFFER {
            self.send()?;
            if buf.len() >= BUFFER {
                return self.tls.write(buf);
            }
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()?;
        self.tls.flush()
    }
}

impl ureq::ReadWrite for Buffered {
    fn socket(&self) -> Option<&TcpStream> {
        // Timeouts are set on the socket itself.
        self.tls.sock.0.get_ref().socket()
    }
}
