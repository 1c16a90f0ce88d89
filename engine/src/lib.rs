//! novabackup's engine: the changed-block-tracking bitmap, the backup
//! planner and pipeline, the store formats and the local store, restore and
//! verify. The engine knows nothing about NBD sockets or HTTP; the proxy and
//! the agent build on it.

pub mod backup;
pub mod bufpool;
pub mod cbt;
pub mod digest;
pub mod fault;
pub mod files;
pub mod format;
pub mod fsutil;
pub mod ids;
pub mod ops;
pub mod pagecache;
pub mod partitions;
pub mod placement;
pub mod plan;
pub mod progress;
pub mod read;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod size;
pub mod snapshot_reader;
pub mod store;
pub mod time;
pub mod verify;
