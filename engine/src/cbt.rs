//! Changed block tracking: the dirty bitmap ([`DirtyBitmap`]) and its on-disk
//! form with the trust rules of DESIGN.md ([`persist`]). This is a leaf
//! module: the NBD proxy and the eBPF probe both record writes into it.

mod bitmap;
pub mod persist;

pub use bitmap::{DirtyBitmap, Extent, Granularity};

use thiserror::Error;

/// Errors of the CBT module.
#[derive(Debug, Error)]
pub enum CbtError {
    /// The granularity is not a power of two between 4 KiB and 4 MiB.
    #[error("invalid CBT granularity {0} bytes: use a power of two from 4 KiB to 4 MiB (default 64 KiB)")]
    BadGranularity(u64),
    /// The bitmap file could not be read or written.
    #[error("CBT bitmap file {path}: {source}")]
    Io {
        /// The bitmap file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bitmap file is not a bitmap of ours, or is damaged.
    #[error("CBT bitmap file {path} is damaged ({why}); reset it with `novabackup disk cbt NAME --reset` (the next backup then reads the whole disk)")]
    Corrupt {
        /// The bitmap file.
        path: std::path::PathBuf,
        /// What was wrong.
        why: String,
    },
}
