//! What a connection does with each decoded request, shared by both data
//! engines: commands that need no data I/O are answered here (block
//! status, cache, trim, write-zeroes, errors); reads, writes and flushes
//! become [`Work`] for the engine, and their completions are turned into
//! replies here too. CBT marking happens in [`Session::handle`], before any
//! write is handed to an engine.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::export::{Export, MAX_PAYLOAD};
use crate::proto::handshake::{MetaContext, Negotiated};
use crate::proto::reply;
use crate::proto::request::{decode, Command, Decoded, Limits, Request, HEADER_LEN};
use crate::proto::NbdError;
use crate::tracking::WriteTicket;

/// Extents per context in one BLOCK_STATUS reply; clients ask again for
/// the rest.
const MAX_EXTENTS: usize = 2048;

/// Data I/O for an engine to perform.
pub(crate) enum Work {
    Read {
        cookie: u64,
        offset: u64,
        len: u32,
        started: Instant,
    },
    Write {
        cookie: u64,
        offset: u64,
        data: Bytes,
        fua: bool,
        ticket: WriteTicket,
        started: Instant,
    },
    Flush {
        cookie: u64,
        started: Instant,
    },
}

/// What to do next with a connection's buffered input.
pub(crate) enum Next {
    /// Hand this I/O to the engine.
    Work(Work),
    /// Send this reply.
    Reply(Vec<u8>),
    /// Answer what is in flight, then close (DISC, or a protocol error).
    Disconnect,
    /// Read more bytes.
    NeedMore,
}

pub(crate) struct Session {
    pub(crate) export: Arc<Export>,
    structured: bool,
    contexts: Vec<(u32, MetaContext)>,
    pub(crate) limits: Limits,
}

impl Session {
    pub(crate) fn new(export: Arc<Export>, n: &Negotiated) -> Session {
        let limits = Limits {
            size: export.image.size,
            read_only: export.image.read_only,
            structured: n.structured,
            has_contexts: !n.contexts.is_empty(),
            max_payload: MAX_PAYLOAD,
        };
        Session {
            export,
            structured: n.structured,
            contexts: n.contexts.clone(),
            limits,
        }
    }

    pub(crate) fn error(&self, cookie: u64, err: NbdError, msg: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + msg.len());
        reply::error(&mut v, self.structured, cookie, err, msg);
        v
    }

    fn ok(cookie: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        reply::ok(&mut v, cookie);
        v
    }

    fn io_error(&self, cookie: u64, e: &io::Error) -> Vec<u8> {
        self.error(cookie, NbdError::from_io(e), &e.to_string())
    }

    /// Space in front of read data for the reply header.
    pub(crate) fn read_header_len(&self) -> usize {
        reply::read_header_len(self.structured)
    }

    /// Decodes the request at the front of `rbuf` and takes it (and its
    /// payload, zero-copy) out of the buffer.
    pub(crate) fn next(&self, rbuf: &mut BytesMut) -> Next {
        match decode(rbuf, &self.limits) {
            Ok(Decoded::Incomplete(_)) => Next::NeedMore,
            Ok(Decoded::Reject {
                cookie,
                error,
                total,
                why,
            }) => {
                let _ = rbuf.split_to(total);
                self.export.stats.count(7, 0, 0);
                Next::Reply(self.error(cookie, error, why))
            }
            Ok(Decoded::Request { req, total }) => {
                let payload = rbuf.split_to(total).freeze().slice(HEADER_LEN..);
                self.handle(req, payload)
            }
            Err(e) => {
                tracing::warn!("closing connection: {e}");
                Next::Disconnect
            }
        }
    }

    /// Fetches the chunks a request touches from the snapshot first when
    /// the export is still being filled; an error reply if that fails.
    fn ensure(&self, cookie: u64, offset: u64, len: u32, write: bool) -> Option<Vec<u8>> {
        let f = self.export.filler.as_ref()?;
        match f.ensure(offset, len as u64, write) {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(export = %self.export.name, "cannot fetch blocks from the snapshot: {e}");
                Some(self.io_error(cookie, &e))
            }
        }
    }

    fn handle(&self, req: Request, payload: Bytes) -> Next {
        let Request {
            cookie,
            offset,
            len,
            ..
        } = req;
        let image = &self.export.image;
        let (which, read, written) = match req.command {
            Command::Read => (0, len as u64, 0),
            Command::Write { .. } => (1, 0, len as u64),
            Command::Flush => (2, 0, 0),
            Command::Trim { .. } => (3, 0, len as u64),
            Command::WriteZeroes { .. } => (4, 0, len as u64),
            Command::Cache => (5, 0, 0),
            Command::BlockStatus { .. } => (6, 0, 0),
            Command::Disc => (usize::MAX, 0, 0),
        };
        if which != usize::MAX {
            self.export.stats.count(which, read, written);
        }
        let touches = match req.command {
            Command::Read => Some(false),
            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. } => {
                Some(true)
            }
            _ => None,
        };
        if let Some(write) = touches.filter(|_| len > 0) {
            if let Some(reply) = self.ensure(cookie, offset, len, write) {
                return Next::Reply(reply);
            }
        }
        if let (Command::Flush, Some(f)) = (&req.command, &self.export.filler) {
            if let Err(e) = f.flush() {
                return Next::Reply(self.io_error(cookie, &e));
            }
        }
        match req.command {
            Command::Disc => Next::Disconnect,
            // No data chunk for an empty read: the spec forbids an
            // OFFSET_DATA chunk of no data, so the reply is a plain done.
            Command::Read if len == 0 => {
                let mut v = Vec::with_capacity(20);
                if self.structured {
                    reply::none_done(&mut v, cookie);
                } else {
                    reply::ok(&mut v, cookie);
                }
                Next::Reply(v)
            }
            Command::Read => Next::Work(Work::Read {
                cookie,
                offset,
                len,
                started: Instant::now(),
            }),
            Command::Flush => Next::Work(Work::Flush {
                cookie,
                started: Instant::now(),
            }),
            Command::Write { .. } if len == 0 => Next::Reply(Self::ok(cookie)),
            Command::Write { fua } => {
                match self
                    .export
                    .tracker
                    .before_write(offset, len as u64, &image.file)
                {
                    Ok(ticket) => Next::Work(Work::Write {
                        cookie,
                        offset,
                        data: payload,
                        fua,
                        ticket,
                        started: Instant::now(),
                    }),
                    Err(e) => {
                        tracing::error!("write refused: change tracking failed: {e}");
                        Next::Reply(self.error(cookie, NbdError::Io, "change tracking failed"))
                    }
                }
            }
            Command::Trim { fua } => Next::Reply(
                self.modify(cookie, offset, len, fua, || image.trim(offset, len as u64)),
            ),
            Command::WriteZeroes { fua, no_hole, fast } => {
                Next::Reply(self.modify(cookie, offset, len, fua, || {
                    image.write_zeroes(offset, len as u64, no_hole, fast)
                }))
            }
            Command::Cache => {
                image.cache(offset, len as u64);
                Next::Reply(Self::ok(cookie))
            }
            Command::BlockStatus { req_one } => {
                Next::Reply(self.block_status(cookie, offset, len, req_one))
            }
        }
    }

    /// Trim and write-zeroes: tracked like writes, done synchronously
    /// (they are rare and cheap: one fallocate).
    fn modify(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        fua: bool,
        op: impl FnOnce() -> io::Result<()>,
    ) -> Vec<u8> {
        if len == 0 {
            return Self::ok(cookie);
        }
        let tracker = &self.export.tracker;
        let ticket = match tracker.before_write(offset, len as u64, &self.export.image.file) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("request refused: change tracking failed: {e}");
                return self.error(cookie, NbdError::Io, "change tracking failed");
            }
        };
        let r = op().and_then(|()| {
            if fua {
                self.export.image.sync()
            } else {
                Ok(())
            }
        });
        let tracked = tracker.after_write(ticket, offset, len as u64);
        match (r, tracked) {
            (Err(e), _) => self.io_error(cookie, &e),
            (Ok(()), Err(e)) => {
                tracing::error!("change tracking failed after a write: {e}");
                self.error(cookie, NbdError::Io, "change tracking failed")
            }
            (Ok(()), Ok(())) => Self::ok(cookie),
        }
    }

    fn block_status(&self, cookie: u64, offset: u64, len: u32, req_one: bool) -> Vec<u8> {
        let max = if req_one { 1 } else { MAX_EXTENTS };
        let mut out = Vec::new();
        for (i, (id, ctx)) in self.contexts.iter().enumerate() {
            let mut extents = match ctx {
                // Unfilled chunks are holes in the image but data in the
                // snapshot: report all data rather than let a client skip
                // them as zeroes.
                MetaContext::BaseAllocation if self.export.filling().is_some() => {
                    let end = (offset + len as u64).min(self.export.image.size);
                    vec![((end - offset) as u32, 0)]
                }
                MetaContext::BaseAllocation => self.export.image.allocation(offset, len, max),
                MetaContext::DirtyBitmap(_) => self.export.tracker.dirty_extents(offset, len, max),
            };
            extents.truncate(max);
            let done = i + 1 == self.contexts.len();
            reply::block_status(&mut out, cookie, *id, &extents, done);
        }
        out
    }

    /// Turns a finished read into its reply; `buf` holds the header space
    /// followed by the data.
    pub(crate) fn read_done(
        &self,
        cookie: u64,
        offset: u64,
        mut buf: Vec<u8>,
        r: io::Result<()>,
        started: Instant,
    ) -> Vec<u8> {
        self.export.stats.observe(0, started.elapsed());
        match r {
            Ok(()) => {
                let h = self.read_header_len();
                let len = (buf.len() - h) as u32;
                reply::write_read_header(&mut buf[..h], self.structured, cookie, offset, len);
                buf
            }
            Err(e) => self.io_error(cookie, &e),
        }
    }

    pub(crate) fn write_done(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        ticket: WriteTicket,
        r: io::Result<()>,
        started: Instant,
    ) -> Vec<u8> {
        self.export.stats.observe(1, started.elapsed());
        let tracked = self.export.tracker.after_write(ticket, offset, len as u64);
        match (r, tracked) {
            (Err(e), _) => self.io_error(cookie, &e),
            (Ok(()), Err(e)) => {
                tracing::error!("change tracking failed after a write: {e}");
                self.error(cookie, NbdError::Io, "change tracking failed")
            }
            (Ok(()), Ok(())) => Self::ok(cookie),
        }
    }

    pub(crate) fn flush_done(&self, cookie: u64, r: io::Result<()>, started: Instant) -> Vec<u8> {
        self.export.stats.observe(2, started.elapsed());
        match r {
            Ok(()) => Self::ok(cookie),
            Err(e) => self.io_error(cookie, &e),
        }
    }
}
