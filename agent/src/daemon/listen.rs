//! NBD accept loops. Accepted streams become blocking std sockets handed
//! to the NBD server, which serves each on its own thread.

use std::sync::Arc;

use nbd_proxy::server::Conn;
use nbd_proxy::Server;

use super::Stop;

pub(super) async fn tcp(l: tokio::net::TcpListener, server: Arc<Server>, stop: Stop) {
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            r = l.accept() => match r.and_then(|(s, _)| s.into_std()) {
                Ok(s) => match s.set_nonblocking(false) {
                    Ok(()) => server.handle(Conn::Tcp(s)),
                    Err(e) => tracing::warn!("cannot use accepted NBD connection: {e}"),
                },
                Err(e) => accept_failed(e).await,
            },
        }
    }
}

pub(super) async fn unix(l: tokio::net::UnixListener, server: Arc<Server>, stop: Stop) {
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            r = l.accept() => match r.and_then(|(s, _)| s.into_std()) {
                Ok(s) => match s.set_nonblocking(false) {
                    Ok(()) => server.handle(Conn::Unix(s)),
                    Err(e) => tracing::warn!("cannot use accepted NBD connection: {e}"),
                },
                Err(e) => accept_failed(e).await,
            },
        }
    }
}

/// Out of file descriptors and similar: log, back off, keep serving.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accepting an NBD connection failed: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
