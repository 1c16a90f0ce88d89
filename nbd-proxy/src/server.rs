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

mod conn;
mod connection;
mod pread;
mod session;
mod uring;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use conn::Conn;

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

/// The export registry and connection bookkeeping.
pub struct Server {
    engine: IoEngine,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
}

impl Server {
    /// A server with no exports.
    pub fn new(engine: IoEngine) -> Arc<Server> {
        Arc::new(Server {
            engine,
            exports: RwLock::new(BTreeMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        })
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

    /// Serves an accepted stream on a new thread.
    pub fn handle(self: &Arc<Self>, conn: Conn) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let span = tracing::info_span!("nbd", conn = id, peer = %conn.peer());
                let _g = span.enter();
                if let Err(e) = connection::serve(&me, id, conn) {
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
