//! Transmission-phase requests. [`decode`] checks everything once: magic,
//! command, flags against what the command and the negotiation allow,
//! lengths against the advertised maximum, and `offset + length` against the
//! export size with checked arithmetic. A request it returns as
//! [`Decoded::Request`] is valid by construction; a bad one becomes the NBD
//! error the spec names, with its payload (if any) consumed so the stream
//! stays in sync; only a bad magic or an oversized write ends the connection.

use super::consts::*;
use super::{NbdError, ProtoError};

/// Size of a request header.
pub const HEADER_LEN: usize = 28;

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes.
    Read,
    /// Write the payload; `fua` forces it to stable storage first.
    Write {
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// Disconnect after in-flight requests are answered.
    Disc,
    /// Make completed writes durable.
    Flush,
    /// Discard the range (reads back as zeroes here).
    Trim {
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// Prefetch the range.
    Cache,
    /// Write zeroes.
    WriteZeroes {
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
        /// NBD_CMD_FLAG_NO_HOLE: allocate, do not punch.
        no_hole: bool,
        /// NBD_CMD_FLAG_FAST_ZERO: fail rather than be slow.
        fast: bool,
    },
    /// Report extents of the selected metadata contexts.
    BlockStatus {
        /// NBD_CMD_FLAG_REQ_ONE: one extent per context.
        req_one: bool,
    },
}

/// A request that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// What to do.
    pub command: Command,
    /// First byte. `offset + len <= size` holds.
    pub offset: u64,
    /// Length in bytes (the payload length for writes).
    pub len: u32,
}

/// What the decoder needs to know about the negotiated connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// The export is read-only.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// At least one metadata context was selected.
    pub has_contexts: bool,
    /// Largest READ or WRITE payload.
    pub max_payload: u32,
}

/// The result of [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Need at least this many bytes in the buffer.
    Incomplete(usize),
    /// A valid request; it and its payload occupy the first `total` bytes.
    Request {
        /// The request.
        req: Request,
        /// Header plus payload length.
        total: usize,
    },
    /// An invalid request: reply `error` to `cookie` and drop `total` bytes.
    Reject {
        /// The client's cookie.
        cookie: u64,
        /// The error to send.
        error: NbdError,
        /// Bytes to drop, payload included.
        total: usize,
        /// A short reason for the structured error message and the log.
        why: &'static str,
    },
}

/// Decodes the request at the front of `buf` (module doc).
pub fn decode(buf: &[u8], lim: &Limits) -> Result<Decoded, ProtoError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(Decoded::Incomplete(HEADER_LEN));
    };
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            got: magic as u64,
        });
    }
    let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
    let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
    let len = u32::from_be_bytes(h[24..28].try_into().unwrap());

    let payload = if kind == cmd::WRITE {
        if len > lim.max_payload {
            return Err(ProtoError::PayloadTooLarge {
                len,
                max: lim.max_payload,
            });
        }
        len as usize
    } else {
        0
    };
    let total = HEADER_LEN + payload;
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total));
    }
    let reject = |error, why| {
        Ok(Decoded::Reject {
            cookie,
            error,
            total,
            why,
        })
    };

    // The spec: a server that advertises FUA accepts it on every command
    // (it means nothing for those that write nothing); a DISC ends the
    // connection whatever its flags.
    let allowed = match kind {
        cmd::READ => cflag::DF | cflag::FUA,
        cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::REQ_ONE | cflag::FUA,
        cmd::DISC => u16::MAX,
        _ => return reject(NbdError::Inval, "unknown command"),
    };
    if flags & !allowed != 0 {
        return reject(NbdError::Inval, "flag not valid for this command");
    }
    if flags & cflag::DF != 0 && !lim.structured {
        return reject(NbdError::Inval, "DF needs structured replies");
    }
    let has = |f| flags & f != 0;
    let command = match kind {
        cmd::READ => Command::Read,
        cmd::WRITE => Command::Write {
            fua: has(cflag::FUA),
        },
        cmd::DISC => Command::Disc,
        cmd::FLUSH => Command::Flush,
        cmd::TRIM => Command::Trim {
            fua: has(cflag::FUA),
        },
        cmd::CACHE => Command::Cache,
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            fua: has(cflag::FUA),
            no_hole: has(cflag::NO_HOLE),
            fast: has(cflag::FAST_ZERO),
        },
        _ => Command::BlockStatus {
            req_one: has(cflag::REQ_ONE),
        },
    };

    let modifies = matches!(
        command,
        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
    );
    match command {
        Command::Disc | Command::Flush => {}
        _ => {
            if matches!(command, Command::Read) && len > lim.max_payload {
                let e = if lim.structured {
                    NbdError::Overflow
                } else {
                    NbdError::Inval
                };
                return reject(e, "read longer than the maximum block size");
            }
            let in_range = offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= lim.size);
            if !in_range {
                // ENOSPC for writes past the end, EINVAL for the rest (a
                // trim too), as the spec says.
                let e = if matches!(command, Command::Write { .. } | Command::WriteZeroes { .. }) {
                    NbdError::NoSpc
                } else {
                    NbdError::Inval
                };
                return reject(e, "range past the end of the export");
            }
        }
    }
    if modifies && lim.read_only {
        return reject(NbdError::Perm, "export is read-only");
    }
    if let Command::BlockStatus { .. } = command {
        if !lim.structured || !lim.has_contexts {
            return reject(
                NbdError::Inval,
                "block status needs a selected meta context",
            );
        }
        if len == 0 {
            return reject(NbdError::Inval, "block status of zero length");
        }
    }
    Ok(Decoded::Request {
        req: Request {
            cookie,
            command,
            offset,
            len,
        },
        total,
    })
}

/// Encodes a request header (for tests and fuzzing of the decoder).
pub fn encode_header(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIM: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        structured: true,
        has_contexts: true,
        max_payload: 1 << 16,
    };

    fn dec(h: [u8; 28], extra: &[u8], lim: &Limits) -> Result<Decoded, ProtoError> {
        let mut b = h.to_vec();
        b.extend_from_slice(extra);
        decode(&b, lim)
    }

    fn err(d: Result<Decoded, ProtoError>) -> NbdError {
        match d {
            Ok(Decoded::Reject { error, .. }) => error,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_write_waits_for_payload() {
        let h = encode_header(cflag::FUA, cmd::WRITE, 7, 4096, 512);
        assert_eq!(dec(h, &[0; 100], &LIM), Ok(Decoded::Incomplete(28 + 512)));
        let d = dec(h, &[0; 512], &LIM).unwrap();
        assert_eq!(
            d,
            Decoded::Request {
                req: Request {
                    cookie: 7,
                    command: Command::Write { fua: true },
                    offset: 4096,
                    len: 512
                },
                total: 540
            }
        );
    }

    #[test]
    fn spec_errors() {
        let size = LIM.size;
        assert_eq!(
            err(dec(encode_header(0, cmd::READ, 1, size - 1, 2), &[], &LIM)),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(encode_header(0, cmd::WRITE, 1, size, 1), &[0], &LIM)),
            NbdError::NoSpc
        );
        assert_eq!(
            err(dec(encode_header(0, cmd::TRIM, 1, u64::MAX, 2), &[], &LIM)),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(encode_header(0, 42, 1, 0, 0), &[], &LIM)),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(
                encode_header(cflag::REQ_ONE, cmd::READ, 1, 0, 1),
                &[],
                &LIM
            )),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(encode_header(0x8000, cmd::FLUSH, 1, 0, 0), &[], &LIM)),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(
                encode_header(0, cmd::READ, 1, 0, (1 << 16) + 1),
                &[],
                &LIM
            )),
            NbdError::Overflow
        );
        let ro = Limits {
            read_only: true,
            ..LIM
        };
        assert_eq!(
            err(dec(encode_header(0, cmd::WRITE, 1, 0, 4), &[0; 4], &ro)),
            NbdError::Perm
        );
        assert_eq!(
            err(dec(encode_header(0, cmd::WRITE_ZEROES, 1, 0, 4), &[], &ro)),
            NbdError::Perm
        );
        let simple = Limits {
            structured: false,
            has_contexts: false,
            ..LIM
        };
        assert_eq!(
            err(dec(
                encode_header(0, cmd::BLOCK_STATUS, 1, 0, 4),
                &[],
                &simple
            )),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(
                encode_header(cflag::DF, cmd::READ, 1, 0, 4),
                &[],
                &simple
            )),
            NbdError::Inval
        );
        assert_eq!(
            err(dec(
                encode_header(0, cmd::READ, 1, 0, (1 << 16) + 1),
                &[],
                &simple
            )),
            NbdError::Inval
        );
    }

    #[test]
    fn rejected_write_consumes_its_payload() {
        let h = encode_header(0, cmd::WRITE, 9, LIM.size, 8);
        match dec(h, &[1; 8], &LIM).unwrap() {
            Decoded::Reject { total, .. } => assert_eq!(total, 36),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn fatal_errors() {
        let mut h = encode_header(0, cmd::READ, 1, 0, 1);
        h[0] = 0;
        assert!(matches!(
            dec(h, &[], &LIM),
            Err(ProtoError::BadMagic { .. })
        ));
        let big = encode_header(0, cmd::WRITE, 1, 0, (1 << 16) + 1);
        assert!(matches!(
            dec(big, &[], &LIM),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
    }

    proptest! {
        /// Any bytes decode to a value or an error, never a panic; an
        /// accepted request is always inside the export.
        #[test]
        fn decode_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Decoded::Request { req, total }) = decode(&bytes, &LIM) {
                prop_assert!(total <= bytes.len());
                prop_assert!(matches!(req.command, Command::Flush | Command::Disc) || req.offset.checked_add(req.len as u64).is_some_and(|e| e <= LIM.size));
            }
        }

        #[test]
        fn decode_any_header(flags in any::<u16>(), kind in 0u16..10, off in any::<u64>(), len in any::<u32>(), ro in any::<bool>(), st in any::<bool>()) {
            let lim = Limits { read_only: ro, structured: st, has_contexts: st, ..LIM };
            let mut b = encode_header(flags, kind, 1, off, len).to_vec();
            b.resize(28 + 1024, 0);
            if let Ok(Decoded::Request { req, .. }) = decode(&b, &lim) {
                if !matches!(req.command, Command::Flush | Command::Disc) {
                    prop_assert!(req.offset.checked_add(req.len as u64).unwrap() <= lim.size);
                }
                let modifies = matches!(req.command, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                prop_assert!(!(ro && modifies));
            }
        }
    }
}
