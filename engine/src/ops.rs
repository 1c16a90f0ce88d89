//! The operations a user runs, each a function with typed options, a
//! typed report and one error ([`OpError`], whose [`ErrorKind`] the
//! adapters map: once to an HTTP status in the API, once to an exit code
//! in the CLI, and the scheduler's "busy, retry later"). The agent's
//! registry, the HTTP handlers and the CLI only translate to and from
//! these; none of them decides what a backup, a verify or a prune does.
//!
//! | operation | module | report |
//! |---|---|---|
//! | back up a disk | [`backup`] | [`backup::BackupReport`] |
//! | verify snapshots, recording the verdicts | [`verify`] | [`verify::VerifyJobReport`] |
//! | prune by retention | [`prune`] | [`prune::PruneReport`] |
//! | quota budget and usage | [`quota`] | [`quota::DiskUsage`] |
//! | restore a snapshot | [`restore`] | [`restore::RestoreReport`] |
//! | delete, protect, garbage-collect | [`snapshots`] | [`crate::store::GcReport`] |
//! | a store accepting a snapshot | [`accept`] | — |
//! | replicate snapshots between stores | [`sync`] | [`sync::SyncReport`] |
//!
//! A disk reaches them through [`tracker::TrackedDisk`], which the NBD
//! proxy implements; jobs of one disk exclude each other through
//! [`claims::Claims`].

pub mod accept;
pub mod backup;
pub mod claims;
pub mod error;
pub mod prune;
pub mod quota;
pub mod restore;
pub mod snapshots;
pub mod sync;
pub mod tracker;
pub mod verify;

#[cfg(test)]
mod tests;

pub use error::{ErrorKind, OpError};
