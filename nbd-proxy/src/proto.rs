//! The NBD wire protocol as pure functions over byte buffers (sans-io): the
//! fixed-newstyle handshake and option haggling ([`handshake`]), request
//! decoding with every bounds check done once ([`request`]), and reply
//! encoding ([`reply`]). Nothing here touches a socket, a file or a clock;
//! connection code only buffers bytes and calls in. The reference is
//! `doc/proto.md` of the NetworkBlockDevice/nbd repository, and QEMU's
//! `docs/interop/nbd.rst` for `qemu:dirty-bitmap:<name>`.

pub mod consts;
pub mod handshake;
pub mod reply;
pub mod request;

use thiserror::Error;

/// A violation of the protocol that ends the connection: the peer cannot be
/// trusted to be in sync with us any more.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// A magic number was wrong.
    #[error("bad {what} magic {got:#x}: the peer does not speak fixed-newstyle NBD")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// The client set flags we do not know during the handshake.
    #[error("client flags {0:#x} are not supported (the client must use fixed newstyle)")]
    BadClientFlags(u32),
    /// A write carried more data than the advertised maximum.
    #[error("write of {len} bytes exceeds the advertised maximum payload of {max} bytes")]
    PayloadTooLarge {
        /// Length sent.
        len: u32,
        /// Our maximum.
        max: u32,
    },
}

/// Errors sent to clients in replies (NBD error values, errno-like).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    /// Operation not permitted (e.g. a write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left (a write past the end, or a full backing store).
    NoSpc = 28,
    /// Value too large (a read above the maximum block size).
    Overflow = 75,
    /// Not supported (e.g. a fast zero that would not be fast).
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

impl NbdError {
    /// Maps an OS error from the backing file to the closest NBD error.
    pub fn from_io(e: &std::io::Error) -> NbdError {
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => NbdError::Perm,
            Some(libc::ENOMEM) => NbdError::NoMem,
            Some(libc::EINVAL) => NbdError::Inval,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdError::NoSpc,
            Some(libc::EOPNOTSUPP) => NbdError::NotSup,
            _ => NbdError::Io,
        }
    }
}
