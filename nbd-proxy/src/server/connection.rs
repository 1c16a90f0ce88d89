//! One client connection: drives the sans-io handshake over blocking I/O
//! (upgrading to TLS when the client asks and the listener offers it),
//! then hands the socket to the data engine for the transmission phase.
//! The whole handshake has one deadline, not one per read, so a client
//! that trickles bytes cannot hold the connection open.

use std::io::{self, Read, Write};
use std::time::Instant;

use bytes::{Buf, BytesMut};

use super::session::Session;
use super::{pread, tls, uring, Conn, IoEngine, Server, Slot};
use crate::access::Peer;
use crate::proto::handshake::{Handshake, Step, Tls};

pub(super) fn serve(server: &Server, id: u64, conn: Conn, slot: &mut Slot) -> io::Result<()> {
    let deadline = Instant::now() + server.limits.handshake;
    let tls_cfg = match &conn {
        Conn::Tcp(s) => {
            s.set_nodelay(true)?;
            server.tls()
        }
        Conn::Unix(_) => None,
    };
    let peer = peer_of(&conn);
    let mut hs = Handshake::for_peer(
        peer,
        if tls_cfg.is_some() {
            Tls::Required
        } else {
            Tls::Off
        },
    );
    let mut conn = conn;
    (&conn).write_all(&Handshake::greeting())?;
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
                server
                    .log
                    .warn(format_args!("NBD handshake from {} failed: {e}", hs.peer()));
                return Ok(());
            }
            Ok((n, step)) => {
                buf.advance(n);
                match step {
                    Step::Continue => {}
                    Step::NeedMore => {
                        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                            return timed_out(server, &hs);
                        };
                        conn.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))?;
                        let n = match (&conn).read(&mut tmp) {
                            Ok(n) => n,
                            Err(e) if is_timeout(&e) => return timed_out(server, &hs),
                            Err(e) => return Err(e),
                        };
                        if n == 0 {
                            return Ok(());
                        }
                        buf.extend_from_slice(&tmp[..n]);
                    }
                    Step::Close => return Ok(()),
                    Step::StartTls => {
                        // A client waits for the ACK before its ClientHello;
                        // bytes already here mean it did not.
                        let (Conn::Tcp(tcp), Some(cfg), true) =
                            (conn, tls_cfg.as_ref(), buf.is_empty())
                        else {
                            return Ok(());
                        };
                        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                            return timed_out(server, &hs);
                        };
                        tcp.set_read_timeout(None)?;
                        match tls::upgrade(tcp, cfg, left) {
                            Ok((plain, peer)) => {
                                tracing::debug!(client = %peer, "TLS established");
                                conn = Conn::Unix(plain);
                                hs.tls_started(peer);
                            }
                            Err(e) => {
                                server
                                    .log
                                    .warn(format_args!("NBD TLS handshake failed: {e}"));
                                return Ok(());
                            }
                        }
                    }
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
    slot.negotiated();
    tracing::debug!(
        export = %export.name,
        client = %hs.peer(),
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

fn timed_out(server: &Server, hs: &Handshake) -> io::Result<()> {
    server.log.warn(format_args!(
        "NBD client {} did not finish its handshake within {:?}; disconnected",
        hs.peer(),
        server.limits.handshake
    ));
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A unix peer by its credentials (an unknown one as `nobody`, which no
/// allow list names by accident); TCP without TLS as unauthenticated.
fn peer_of(conn: &Conn) -> Peer {
    match conn {
        Conn::Unix(s) => {
            nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
                .map(|c| Peer::Unix {
                    uid: c.uid(),
                    gid: c.gid(),
                })
                .unwrap_or(Peer::Unix {
                    uid: u32::MAX,
                    gid: u32::MAX,
                })
        }
        Conn::Tcp(_) => Peer::PlainTcp,
    }
}
