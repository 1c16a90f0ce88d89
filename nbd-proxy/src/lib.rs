//! novabackup's NBD proxy: it serves each attached disk image over NBD and
//! records every block written (changed block tracking), so that backups
//! read only what changed.
//!
//! - [`proto`]: the wire protocol as pure functions over bytes;
//! - [`server`]: listeners' connections, the handshake driver and the two
//!   data engines (io_uring, positional I/O);
//! - [`export`]: image files and block devices;
//! - [`fill`]: images filled from a snapshot on first touch (mounts and
//!   live restores);
//! - [`access`]: client identities and per-export allow lists;
//! - [`tracking`], [`checkpoint`], [`cbw`]: CBT, checkpoints and
//!   copy-before-write.

pub mod access;
pub mod cbw;
pub mod checkpoint;
pub mod client;
pub mod export;
pub mod fill;
pub mod proto;
pub mod server;
pub mod stats;
pub mod tracking;

/// The name of the CBT bitmap as NBD clients see it:
/// `qemu:dirty-bitmap:cbt`.
pub const CBT_BITMAP_NAME: &str = "cbt";

pub use checkpoint::Checkpoint;
pub use export::{BackingKind, Export, ExportError, Image};
pub use server::{IoEngine, Server, TlsConfig};
pub use tracking::{CbtStatus, TrackError, Tracker};
