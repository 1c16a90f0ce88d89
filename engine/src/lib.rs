//! novabackup's engine: the changed-block-tracking bitmap and its on-disk
//! form, and the one crash-safe helper through which every durable file is
//! written. The engine knows nothing about NBD sockets or HTTP; the proxy and
//! the agent build on it.

pub mod cbt;
pub mod fsutil;
pub mod ids;
pub mod size;
