//! One client connection: drives the sans-io handshake over blocking I/O,
//! then hands the socket to the data engine for the transmission phase.

use std::io::{self, Read, Write};
use std::time::Duration;

use bytes::{Buf, BytesMut};

use super::session::Session;
use super::{pread, uring, Conn, IoEngine, Server};
use crate::proto::handshake::{Handshake, Step};

/// A client that has not chosen an export by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn serve(server: &Server, id: u64, conn: Conn) -> io::Result<()> {
    if let Conn::Tcp(s) = &conn {
        s.set_nodelay(true)?;
    }
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    (&conn).write_all(&Handshake::greeting())?;
    let mut hs = Handshake::new();
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::new();
    let mut tmp = [0u8; 4096];
    let negotiated = loop {
        let r = hs.step(&buf, server, &mut out);
        if !out.is_empty() {
            (&conn).write_all(&out)?;
            out.clear();
        }
        match r {
            Err(e) => {
                tracing::warn!("handshake failed: {e}");
                return Ok(());
            }
            Ok((n, step)) => {
                buf.advance(n);
                match step {
                    Step::Continue => {}
                    Step::NeedMore => {
                        let n = (&conn).read(&mut tmp)?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    Step::Close => return Ok(()),
                    Step::Done(n) => break n,
                }
            }
        }
    };
    conn.set_read_timeout(None)?;
    let Some(export) = server.get(&negotiated.export.name) else {
        return Ok(());
    };
    server.register(id, &export.name, &conn)?;
    tracing::debug!(
        export = %export.name,
        structured = negotiated.structured,
        contexts = negotiated.contexts.len(),
        "transmission begins"
    );
    let session = Session::new(export, &negotiated);
    match server.engine {
        IoEngine::Uring => uring::run(&conn, &session, buf),
        IoEngine::Pread => pread::run(&conn, &session, buf),
    }
}
