//! The agent's disks: attach, detach, restore at start and save at stop,
//! persisted in DATA_DIR/disks.json (through the crash-safe helper) with
//! one bitmap per disk under DATA_DIR/cbt/. Implements the API's
//! [`DiskService`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nbd_proxy::export::ExportError;
use nbd_proxy::server::ServerError;
use nbd_proxy::{Export, Image, Server, Tracker};
use novabackup_api::types::{AttachRequest, CbtInfo, DiskInfo, Health};
use novabackup_api::{ApiError, DiskService, ErrorCode};
use novabackup_engine::cbt::Granularity;
use novabackup_engine::fsutil;
use novabackup_engine::ids::DiskName;
use serde::{Deserialize, Serialize};

const DISKS_FILE: &str = "disks.json";

/// One attached disk as saved in disks.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskRecord {
    name: DiskName,
    image: PathBuf,
    granularity: Granularity,
    read_only: bool,
}

#[derive(Debug, Default, Clone)]
struct Endpoints {
    tcp: Option<String>,
    socket: Option<PathBuf>,
}

/// The agent's state.
pub struct Agent {
    dir: PathBuf,
    server: Arc<Server>,
    boot_id: String,
    /// Serializes attach and detach, and holds what disks.json says.
    records: Mutex<Vec<DiskRecord>>,
    endpoints: Mutex<Endpoints>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl Agent {
    /// An agent with no disks yet.
    pub fn new(dir: PathBuf, server: Arc<Server>, boot_id: String) -> Agent {
        Agent {
            dir,
            server,
            boot_id,
            records: Mutex::new(Vec::new()),
            endpoints: Mutex::new(Endpoints::default()),
        }
    }

    pub(super) fn set_endpoints(&self, tcp: Option<String>, socket: Option<PathBuf>) {
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = Endpoints { tcp, socket };
    }

    fn bitmap_path(&self, name: &DiskName) -> PathBuf {
        self.dir.join("cbt").join(format!("{name}.cbt"))
    }

    /// Re-attaches the disks of disks.json. A disk whose image is gone is
    /// reported and kept in the file, so it comes back once the image does.
    pub fn restore(&self) -> anyhow::Result<()> {
        let path = self.dir.join(DISKS_FILE);
        let records: Vec<DiskRecord> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{} is damaged ({e}); fix or remove it, then re-attach the disks",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for r in &records {
            match self.open(r) {
                Ok(export) => {
                    let st = export.tracker.status();
                    if !st.trusted {
                        tracing::warn!(disk = %r.name, reason = st.reason.as_deref().unwrap_or(""), "change tracking is not trusted");
                    }
                    self.server.add(export)?;
                    tracing::info!(disk = %r.name, image = %r.image.display(), dirty_blocks = st.dirty_blocks, "disk attached");
                }
                Err(e) => tracing::error!(disk = %r.name, "cannot attach disk at start-up: {e}"),
            }
        }
        *self.records.lock().unwrap_or_else(|p| p.into_inner()) = records;
        Ok(())
    }

    fn open(&self, r: &DiskRecord) -> Result<Arc<Export>, ApiError> {
        let image = Image::open(&r.image, r.read_only).map_err(|e| match &e {
            ExportError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                err(
                    ErrorCode::Unprocessable,
                    format!("image {} does not exist", r.image.display()),
                )
            }
            _ => err(ErrorCode::Unprocessable, e.to_string()),
        })?;
        let tracker = Tracker::open(
            &self.bitmap_path(&r.name),
            image.size,
            r.granularity,
            &self.boot_id,
        )
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        Ok(Arc::new(Export {
            name: r.name.to_string(),
            image,
            tracker: Arc::new(tracker),
        }))
    }

    fn save(&self, records: &[DiskRecord]) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec_pretty(records).expect("records serialize");
        fsutil::write_atomic(&self.dir.join(DISKS_FILE), &bytes, 0o600).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("cannot save {DISKS_FILE}: {e}"),
            )
        })
    }

    fn export(&self, name: &str) -> Result<Arc<Export>, ApiError> {
        self.server.get(name).ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("no disk named {name:?}; `novabackup disk list` shows the attached disks"),
            )
        })
    }

    fn info(&self, e: &Export) -> DiskInfo {
        let ep = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut uris = Vec::new();
        if let Some(s) = &ep.socket {
            uris.push(format!("nbd+unix:///{}?socket={}", e.name, s.display()));
        }
        if let Some(t) = &ep.tcp {
            uris.push(format!("nbd://{t}/{}", e.name));
        }
        DiskInfo {
            name: e.name.clone(),
            image: e.image.path.display().to_string(),
            backing: match e.image.kind {
                nbd_proxy::BackingKind::File => "file".into(),
                nbd_proxy::BackingKind::BlockDevice => "block_device".into(),
            },
            size: e.image.size,
            read_only: e.image.read_only,
            connections: self.server.connections(&e.name),
            uris,
            cbt: cbt_info(&e.tracker),
        }
    }

    /// Saves every bitmap with the clean-shutdown mark.
    pub fn shutdown(&self) {
        for e in self.server.all() {
            match e.tracker.shutdown() {
                Ok(()) => tracing::info!(disk = %e.name, "bitmap saved"),
                Err(err) => tracing::error!(disk = %e.name, "saving the bitmap failed: {err}"),
            }
        }
    }
}

fn cbt_info(t: &Tracker) -> CbtInfo {
    let s = t.status();
    CbtInfo {
        granularity: s.granularity,
        blocks: s.blocks,
        dirty_blocks: s.dirty_blocks,
        dirty_bytes: s.dirty_bytes,
        trusted: s.trusted,
        reason: s.reason,
        checkpoint_active: s.checkpoint_active,
    }
}

impl DiskService for Agent {
    fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            io_engine: match self.server.engine() {
                nbd_proxy::IoEngine::Uring => "uring".into(),
                nbd_proxy::IoEngine::Pread => "pread".into(),
            },
        }
    }

    fn list(&self) -> Vec<DiskInfo> {
        self.server.all().iter().map(|e| self.info(e)).collect()
    }

    fn get(&self, name: &str) -> Result<DiskInfo, ApiError> {
        Ok(self.info(&*self.export(name)?))
    }

    fn attach(&self, req: AttachRequest) -> Result<DiskInfo, ApiError> {
        let name: DiskName =
            req.name
                .parse()
                .map_err(|e: novabackup_engine::ids::BadDiskName| {
                    err(ErrorCode::BadRequest, e.to_string())
                })?;
        let granularity = Granularity::new(req.granularity.unwrap_or(Granularity::DEFAULT.bytes()))
            .map_err(|e| err(ErrorCode::BadRequest, e.to_string()))?;
        let image = PathBuf::from(&req.image);
        if !image.is_absolute() {
            return Err(err(
                ErrorCode::BadRequest,
                format!("image path {:?} must be absolute", req.image),
            ));
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if self.server.get(name.as_str()).is_some() || records.iter().any(|r| r.name == name) {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "a disk named {name} is already attached; detach it first or pick another name"
                ),
            ));
        }
        let canonical = image.canonicalize().unwrap_or_else(|_| image.clone());
        if let Some(other) = records.iter().find(|r| same_file(&r.image, &canonical)) {
            return Err(err(
                ErrorCode::Conflict,
                format!("{} is already attached as disk {}; writes through two exports would escape tracking", image.display(), other.name),
            ));
        }
        let record = DiskRecord {
            name: name.clone(),
            image: canonical,
            granularity,
            read_only: req.read_only,
        };
        // A bitmap left from an earlier attachment says nothing about the
        // writes made while the disk was not tracked.
        let _ = fsutil::remove_durable(&self.bitmap_path(&name));
        let _ = fsutil::remove_durable(&self.bitmap_path(&name).with_extension("frozen"));
        let export = self.open(&record)?;
        let mut next = records.clone();
        next.push(record);
        self.save(&next)?;
        self.server
            .add(export.clone())
            .map_err(|e| err(ErrorCode::Conflict, e.to_string()))?;
        *records = next;
        tracing::info!(disk = %name, image = %export.image.path.display(), "disk attached");
        Ok(self.info(&export))
    }

    fn detach(&self, name: &str) -> Result<(), ApiError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let export = match self.server.remove(name) {
            Ok(e) => Some(e),
            Err(ServerError::Busy { .. }) => {
                let n = self.server.connections(name);
                return Err(err(ErrorCode::Conflict, format!("disk {name} has {n} connected NBD client(s); disconnect them (shut the VM down) first")));
            }
            // Known but not served (its image was missing at start-up).
            Err(_) if records.iter().any(|r| r.name.as_str() == name) => None,
            Err(_) => return Err(self.export(name).unwrap_err()),
        };
        if let Some(e) = &export {
            if let Err(x) = e.tracker.shutdown() {
                tracing::warn!(disk = name, "saving the bitmap at detach failed: {x}");
            }
        }
        let next: Vec<DiskRecord> = records
            .iter()
            .filter(|r| r.name.as_str() != name)
            .cloned()
            .collect();
        self.save(&next)?;
        *records = next;
        if let Ok(n) = name.parse::<DiskName>() {
            let _ = fsutil::remove_durable(&self.bitmap_path(&n));
        }
        tracing::info!(disk = name, "disk detached");
        Ok(())
    }

    fn cbt(&self, name: &str) -> Result<CbtInfo, ApiError> {
        Ok(cbt_info(&self.export(name)?.tracker))
    }

    fn cbt_reset(&self, name: &str) -> Result<CbtInfo, ApiError> {
        let e = self.export(name)?;
        e.tracker
            .reset()
            .map_err(|x| err(ErrorCode::Internal, x.to_string()))?;
        tracing::info!(disk = name, "bitmap reset by the operator");
        Ok(cbt_info(&e.tracker))
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino(), x.rdev()) == (y.dev(), y.ino(), y.rdev()),
        _ => a == b,
    }
}
