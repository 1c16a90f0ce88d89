//! A ureq TLS connector that batches system calls. ureq sends a body in
//! 8 KiB writes and rustls turns each into a record and a `writev`; rustls
//! also reads the socket 4 KiB at a time. For a 40 MB upload that was
//! about 5,500 calls each way. Here plaintext is gathered into 256 KiB
//! before rustls sees it (sent when full, when ureq flushes, or before the
//! first read of the answer), and the socket is read through a 256 KiB
//! buffer.

use std::io::{self, BufReader, BufWriter, Read, Write};
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
        Ok(Box::new(Buffered(BufWriter::with_capacity(
            BUFFER,
            rustls::StreamOwned::new(conn, sock),
        ))))
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
#[derive(Debug)]
struct Buffered(BufWriter<rustls::StreamOwned<rustls::ClientConnection, Socket>>);

impl Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // An answer is read only once the request is out.
        if !self.0.buffer().is_empty() {
            self.0.flush()?;
        }
        self.0.get_mut().read(buf)
    }
}

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl ureq::ReadWrite for Buffered {
    fn socket(&self) -> Option<&TcpStream> {
        // Timeouts are set on the socket itself.
        self.0.get_ref().sock.0.get_ref().socket()
    }
}
