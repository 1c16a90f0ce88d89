//! A minimal blocking NBD client (fixed newstyle, NBD_OPT_GO, simple
//! replies, one request at a time). novabackup's own tools use it, such as
//! `novabackup demo` writing through the proxy like a guest would; tests
//! use real clients (qemu-io, nbdsh, ...) instead.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::proto::consts::*;
use crate::proto::request::encode_header;

/// A connection to one export.
#[derive(Debug)]
pub struct Client {
    s: UnixStream,
    size: u64,
    cookie: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// Connects to `export` over a unix socket.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let mut s = UnixStream::connect(socket)?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        if u64::from_be_bytes(g[0..8].try_into().unwrap()) != NBDMAGIC
            || u64::from_be_bytes(g[8..16].try_into().unwrap()) != IHAVEOPT
        {
            return Err(bad("not an NBD server"));
        }
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&opt::GO.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(&data);
        s.write_all(&o)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            if len > 1 << 16 {
                return Err(bad("option reply too long"));
            }
            let mut d = vec![0u8; len];
            s.read_exact(&mut d)?;
            match kind {
                rep::ACK => break,
                rep::INFO if d.len() >= 12 && d[0..2] == info::EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                }
                rep::INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(bad(format!(
                        "server refused export {export:?}: {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
                _ => return Err(bad("unexpected option reply")),
            }
        }
        Ok(Client {
            s,
            size: size.ok_or_else(|| bad("no export size"))?,
            cookie: 0,
        })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<()> {
        self.cookie += 1;
        self.s
            .write_all(&encode_header(0, kind, self.cookie, offset, len))?;
        self.s.write_all(payload)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if u32::from_be_bytes(r[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC
            || u64::from_be_bytes(r[8..16].try_into().unwrap()) != self.cookie
        {
            return Err(bad("bad reply"));
        }
        match u32::from_be_bytes(r[4..8].try_into().unwrap()) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e as i32)),
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (i, part) in data.chunks(16 << 20).enumerate() {
            self.request(
                cmd::WRITE,
                offset + (i as u64) * (16 << 20),
                part.len() as u32,
                part,
            )?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.request(cmd::READ, offset, buf.len() as u32, &[])?;
        self.s.read_exact(buf)
    }

    /// Makes written data durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.request(cmd::FLUSH, 0, 0, &[])
    }

    /// Says goodbye.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.s.write_all(&encode_header(0, cmd::DISC, 0, 0, 0))
    }
}
