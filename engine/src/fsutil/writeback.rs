//! Early writeback of data a restore has written: `sync_file_range` with
//! `SYNC_FILE_RANGE_WRITE` starts the disk writes now, while later chunks
//! are still being decoded, so the final fsync has little left to wait for
//! (it ran alone for about a second at the end of a 4 GiB restore). nix
//! does not wrap the call, hence this one small unsafe block.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// Starts writing back `len` bytes at `off` of `f`; best effort (the final
/// fsync is what guarantees durability), so errors are ignored.
pub fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // valid for the life of the borrow of `f`.
    let _ = unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}
