//! The NBD server: the export registry, one thread per connection, and the
//! choice of data engine. Listening sockets belong to the caller (the
//! agent); it hands each accepted stream to [`Server::handle`].
//!
//! Each connection negotiates with the sans-io handshake over blocking I/O,
//! then runs its transmission phase on the engine chosen at start-up:
//! [`IoEngine::Uring`] (one io_uring per connection; socket and file I/O
//! all go through the ring, so requests are answered out of order as they
//! complete) or [`IoEngine::Pread`] (a reader thread and a small pool of
//! workers doing positional I/O), for kernels where io_uring is unavailable.
//!
//! Connections are bounded ([`Limits`]): a total, a share of it for clients
//! still negotiating, and one deadline for the whole handshake, TLS
//! included, so neither many idle sockets nor one slow one holds a thread
//! for long. A TCP listener with [`TlsConfig`] set requires TLS.

mod conn;
mod connection;
pub mod loglimit;
mod pread;
mod session;
pub mod tls;
mod uring;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use conn::Conn;
pub use tls::{TlsConfig, TlsSetupError};

use crate::export::Export;
use crate::proto::handshake::{ExportCatalog, ExportInfo};

/// How a connection does its data I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngine {
    /// io_uring: batched, asynchronous, out-of-order completion.
    Uring,
    /// pread/pwrite on worker threads.
    Pread,
}

impl IoEngine {
    /// io_uring if this kernel lets us create a ring and run an operation
    /// on it, else the positional-I/O fallback.
    pub fn probe() -> IoEngine {
        match uring::probe() {
            Ok(()) => IoEngine::Uring,
            Err(e) => {
                tracing::warn!("io_uring is unavailable ({e}); using positional I/O for NBD data");
                IoEngine::Pread
            }
        }
    }
}

impl std::str::FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(IoEngine::Uring),
            "pread" => Ok(IoEngine::Pread),
            _ => Err(format!("unknown I/O engine {s:?}: use uring or pread")),
        }
    }
}

/// Errors managing exports.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The name is taken.
    #[error("an export named {0:?} already exists")]
    Exists(String),
    /// No such export.
    #[error("no export named {0:?}")]
    NotFound(String),
    /// Clients are connected.
    #[error("disk {name:?} has {count} connected NBD client(s); disconnect them first")]
    Busy {
        /// The export.
        name: String,
        /// Open connections.
        count: usize,
    },
}

struct ConnEntry {
    export: String,
    conn: Conn,
}

/// Bounds on connections (module doc).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole handshake, TLS included, must end within this.
    pub handshake: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Of those, connections still in the handshake at most.
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake: Duration::from_secs(10),
            max_connections: 256,
            max_handshakes: 32,
        }
    }
}

/// The export registry and connection bookkeeping.
pub struct Server {
    engine: IoEngine,
    limits: Limits,
    tls: RwLock<Option<TlsConfig>>,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_conn: AtomicU64,
    live: AtomicUsize,
    negotiating: AtomicUsize,
    stopping: AtomicBool,
    log: loglimit::LogLimiter,
}

impl Server {
    /// A server with no exports and the default [`Limits`].
    pub fn new(engine: IoEngine) -> Arc<Server> {
        Self::with_limits(engine, Limits::default())
    }

    /// A server with no exports.
    pub fn with_limits(engine: IoEngine, limits: Limits) -> Arc<Server> {
        Arc::new(Server {
            engine,
            limits,
            tls: RwLock::new(None),
            exports: RwLock::new(BTreeMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            negotiating: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            log: Default::default(),
        })
    }

    /// Requires TLS with these credentials on every TCP connection.
    pub fn set_tls(&self, cfg: Option<TlsConfig>) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    fn tls(&self) -> Option<TlsConfig> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The data engine in use.
    pub fn engine(&self) -> IoEngine {
        self.engine
    }

    /// Adds an export.
    pub fn add(&self, export: Arc<Export>) -> Result<(), ServerError> {
        let mut m = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&export.name) {
            return Err(ServerError::Exists(export.name.clone()));
        }
        m.insert(export.name.clone(), export);
        Ok(())
    }

    /// Removes an export that has no connected clients.
    pub fn remove(&self, name: &str) -> Result<Arc<Export>, ServerError> {
        let mut m = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(name) {
            return Err(ServerError::NotFound(name.into()));
        }
        let count = self.connections(name);
        if count > 0 {
            return Err(ServerError::Busy {
                name: name.into(),
                count,
            });
        }
        Ok(m.remove(name).expect("checked above"))
    }

    /// The export called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let m = self.exports.read().unwrap_or_else(|p| p.into_inner());
        m.get(name).cloned()
    }

    /// Every export, by name.
    pub fn all(&self) -> Vec<Arc<Export>> {
        let m = self.exports.read().unwrap_or_else(|p| p.into_inner());
        m.values().cloned().collect()
    }

    /// Connected clients of an export.
    pub fn connections(&self, name: &str) -> usize {
        let c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.values().filter(|e| e.export == name).count()
    }

    /// Disconnects every client of `name` (requests in flight are answered
    /// or dropped with the socket) and waits up to `timeout` for them to
    /// go. Returns how many were connected.
    pub fn disconnect(&self, name: &str, timeout: Duration) -> usize {
        let n = {
            let c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let mine: Vec<_> = c.values().filter(|e| e.export == name).collect();
            for e in &mine {
                e.conn.shutdown_both();
            }
            mine.len()
        };
        let deadline = Instant::now() + timeout;
        while self.connections(name) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    }

    /// Serves an accepted stream on a new thread, unless the connection
    /// limits are reached (then the stream is closed at once).
    pub fn handle(self: &Arc<Self>, conn: Conn) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let live = self.live.fetch_add(1, Ordering::SeqCst);
        let negotiating = self.negotiating.fetch_add(1, Ordering::SeqCst);
        let guard = Slot(self.clone(), true);
        if live >= self.limits.max_connections || negotiating >= self.limits.max_handshakes {
            self.log.warn(format_args!(
                "refused an NBD connection from {}: {} open, {} negotiating (limits {} and {})",
                conn.peer(),
                live,
                negotiating,
                self.limits.max_connections,
                self.limits.max_handshakes
            ));
            return;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let mut guard = guard;
                let me = guard.0.clone();
                let span = tracing::info_span!("nbd", conn = id, peer = %conn.peer());
                let _g = span.enter();
                if let Err(e) = connection::serve(&me, id, conn, &mut guard) {
                    tracing::debug!("connection ended with an error: {e}");
                }
                me.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a connection thread: {e}");
        }
    }

    fn register(&self, id: u64, export: &str, conn: &Conn) -> std::io::Result<()> {
        let clone = conn.try_clone()?;
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            ConnEntry {
                export: export.into(),
                conn: clone,
            },
        );
        // A stop that began before we registered would have missed us.
        if self.stopping.load(Ordering::SeqCst) {
            conn.shutdown_read();
        }
        Ok(())
    }

    /// Stops serving: no new connections; every connection stops reading
    /// requests, answers those in flight and closes. Waits up to `timeout`.
    pub fn shutdown(&self, timeout: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        for e in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            e.conn.shutdown_read();
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("some NBD connections did not finish within {timeout:?}");
    }
}

/// A connection's place in the counts; given back when it ends.
pub(crate) struct Slot(Arc<Server>, bool);

impl Slot {
    /// The handshake is over: the connection no longer counts as
    /// negotiating.
    pub(crate) fn negotiated(&mut self) {
        if std::mem::replace(&mut self.1, false) {
            self.0.negotiating.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.negotiated();
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ExportCatalog for Server {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let m = self.exports.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() && m.len() == 1 {
            return m.values().next().map(|e| e.info());
        }
        m.get(name).map(|e| e.info())
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.all().iter().map(|e| e.info()).collect()
    }
}
