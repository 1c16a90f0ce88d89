//! The fixed-newstyle handshake: greeting, client flags, then options until
//! the client picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! [`Handshake::step`] consumes bytes from the front of a buffer, appends
//! whatever must be sent to `out`, and says what happened. Errors in an
//! option's contents get an `NBD_REP_ERR_*` reply and the connection stays
//! usable; only a broken frame (bad magic, unknown client flags) ends it.
//!
//! On a listener that requires TLS, every option but `NBD_OPT_STARTTLS` and
//! `NBD_OPT_ABORT` is answered `NBD_REP_ERR_TLS_REQD` until the client
//! starts TLS ([`Step::StartTls`]; the caller runs the TLS handshake and
//! calls [`Handshake::tls_started`] with the client's identity). Every
//! option that names or lists exports sees only those the client may open
//! ([`crate::access::permits`]): the others answer as if they did not exist.

use super::consts::*;
use super::ProtoError;
use crate::access::{self, Peer};

/// Options longer than this are answered with NBD_REP_ERR_TOO_BIG and
/// skipped; no legitimate option comes close (strings are ≤ 4 KiB).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A metadata context the server can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeroes of the image.
    BaseAllocation,
    /// `qemu:dirty-bitmap:<name>`: the live CBT bitmap.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".into(),
            MetaContext::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{n}"),
        }
    }

    fn namespace(&self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => "base:",
            MetaContext::DirtyBitmap(_) => "qemu:",
        }
    }

    /// Whether a LIST query selects this context (exact name, a whole
    /// namespace such as `base:`, or every bitmap with `qemu:dirty-bitmap:`).
    fn matches_list_query(&self, q: &str) -> bool {
        q == self.name()
            || q == self.namespace()
            || (q == "qemu:dirty-bitmap:" && matches!(self, MetaContext::DirtyBitmap(_)))
    }
}

/// What the handshake needs to know about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name.
    pub name: String,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (see [`super::consts::tflag`]).
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes.
    pub block_size: (u32, u32, u32),
    /// Metadata contexts this export serves.
    pub contexts: Vec<MetaContext>,
    /// Client identities that may open it (empty: any client the
    /// listener admits); see [`crate::access`].
    pub allow: Vec<String>,
}

/// Where the handshake looks exports up. Implementations only read a map.
pub trait ExportCatalog {
    /// The export called `name` (the empty name means the default export).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportInfo>;
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export the client chose.
    pub export: ExportInfo,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Selected metadata contexts with the ids the client knows them by.
    pub contexts: Vec<(u32, MetaContext)>,
}

/// What a call to [`Handshake::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not enough bytes buffered; read more and call again.
    NeedMore,
    /// Progress was made; call again with the rest of the buffer.
    Continue,
    /// Transmission begins with this export.
    Done(Negotiated),
    /// Send `out`, then close the connection.
    Close,
    /// Send `out`, then run the TLS handshake on the connection and call
    /// [`Handshake::tls_started`]; every later byte travels inside TLS.
    StartTls,
}

/// Whether this listener offers TLS, and whether it has begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Not offered (the unix socket, or the plain-TCP opt-in).
    Off,
    /// Required and not started yet.
    Required,
    /// Running.
    Active,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Skip(u32),
    Finished,
}

/// The handshake state machine (module doc).
#[derive(Debug)]
pub struct Handshake {
    state: State,
    no_zeroes: bool,
    structured: bool,
    /// Export name the selected contexts were negotiated for, and them.
    selected: Option<(String, Vec<MetaContext>)>,
    tls: Tls,
    peer: Peer,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A handshake without TLS for a root unix-socket peer (tests and
    /// tools); servers use [`Self::for_peer`].
    pub fn new() -> Self {
        Self::for_peer(Peer::Unix { uid: 0, gid: 0 }, Tls::Off)
    }

    /// A handshake waiting for the client's flags; send [`Self::greeting`]
    /// first.
    pub fn for_peer(peer: Peer, tls: Tls) -> Self {
        Handshake {
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            selected: None,
            tls,
            peer,
        }
    }

    /// TLS is up and the client proved `peer`. As the spec asks, anything
    /// negotiated before STARTTLS is forgotten.
    pub fn tls_started(&mut self, peer: Peer) {
        self.tls = Tls::Active;
        self.peer = peer;
        self.structured = false;
        self.selected = None;
        if self.state == State::Finished {
            self.state = State::Options;
        }
    }

    /// The client as known so far.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The export `name` if it exists and this client may open it.
    fn find(&self, catalog: &dyn ExportCatalog, name: &str) -> Option<ExportInfo> {
        catalog
            .lookup(name)
            .filter(|e| access::permits(&e.allow, &self.peer))
    }

    /// The server's first 18 bytes.
    pub fn greeting() -> [u8; 18] {
        let mut g = [0u8; 18];
        g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        g
    }

    /// Consumes bytes from the front of `input` (returns how many) and
    /// appends replies to `out`.
    pub fn step(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Step), ProtoError> {
        match self.state {
            State::Finished => Ok((0, Step::Close)),
            State::ClientFlags => {
                let Some(b) = input.get(..4) else {
                    return Ok((0, Step::NeedMore));
                };
                let flags = u32::from_be_bytes(b.try_into().unwrap());
                if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
                    || flags & CLIENT_FIXED_NEWSTYLE == 0
                {
                    self.state = State::Finished;
                    return Err(ProtoError::BadClientFlags(flags));
                }
                self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                self.state = State::Options;
                Ok((4, Step::Continue))
            }
            State::Skip(left) => {
                if input.is_empty() {
                    return Ok((0, Step::NeedMore));
                }
                let n = (left as usize).min(input.len());
                let left = left - n as u32;
                self.state = if left == 0 {
                    State::Options
                } else {
                    State::Skip(left)
                };
                Ok((n, Step::Continue))
            }
            State::Options => {
                let Some(h) = input.get(..16) else {
                    return Ok((0, Step::NeedMore));
                };
                let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
                if magic != IHAVEOPT {
                    self.state = State::Finished;
                    return Err(ProtoError::BadMagic {
                        what: "option",
                        got: magic,
                    });
                }
                let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                if len > MAX_OPTION_LEN {
                    option_reply(out, option, rep::ERR_TOO_BIG, b"option data too long");
                    self.state = State::Skip(len);
                    return Ok((16, Step::Continue));
                }
                let total = 16 + len as usize;
                let Some(data) = input.get(16..total) else {
                    return Ok((0, Step::NeedMore));
                };
                let step = self.option(option, data, catalog, out);
                if !matches!(step, Step::Continue | Step::StartTls) {
                    self.state = State::Finished;
                }
                Ok((total, step))
            }
        }
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        if self.tls == Tls::Required && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                // No way to say why: the spec's answer is to hang up.
                return Step::Close;
            }
            option_reply(
                out,
                option,
                rep::ERR_TLS_REQD,
                b"this server requires TLS: start it first (nbds:// URIs, QEMU tls-creds)",
            );
            return Step::Continue;
        }
        match option {
            opt::STARTTLS => {
                let (kind, msg): (u32, &[u8]) = if !data.is_empty() {
                    (rep::ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
                } else {
                    match self.tls {
                        Tls::Required => (rep::ACK, b""),
                        Tls::Active => (rep::ERR_INVALID, b"TLS is already active"),
                        Tls::Off => (rep::ERR_POLICY, b"this listener does not offer TLS"),
                    }
                };
                option_reply(out, option, kind, msg);
                if kind == rep::ACK {
                    Step::StartTls
                } else {
                    Step::Continue
                }
            }
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some(export) = self.find(catalog, &name) else {
                    // The spec leaves no way to report an error here.
                    return Step::Close;
                };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Step::Done(self.negotiated(export))
            }
            opt::ABORT => {
                option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            opt::LIST => {
                if !data.is_empty() {
                    option_reply(out, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Step::Continue;
                }
                for e in catalog
                    .list()
                    .into_iter()
                    .filter(|e| access::permits(&e.allow, &self.peer))
                {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(out, option, rep::SERVER, &d);
                }
                option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, catalog, out),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(
                        out,
                        option,
                        rep::ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    option_reply(out, option, rep::ACK, &[]);
                }
                Step::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, catalog, out);
                Step::Continue
            }
            _ => {
                option_reply(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    b"option not supported by this server",
                );
                Step::Continue
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        let mut r = Reader(data);
        let parsed = (|| {
            let name = r.string_u32()?;
            let n = r.u16()?;
            let mut infos = Vec::with_capacity(n as usize);
            for _ in 0..n {
                infos.push(r.u16()?);
            }
            r.0.is_empty().then_some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            option_reply(
                out,
                option,
                rep::ERR_INVALID,
                b"malformed NBD_OPT_INFO/GO request",
            );
            return Step::Continue;
        };
        let Some(export) = self.find(catalog, &name) else {
            let msg = format!("no export named {name:?}; `nbdinfo --list` shows them");
            option_reply(out, option, rep::ERR_UNKNOWN, msg.as_bytes());
            return Step::Continue;
        };
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&info::EXPORT.to_be_bytes());
        d.extend_from_slice(&export.size.to_be_bytes());
        d.extend_from_slice(&export.flags.to_be_bytes());
        option_reply(out, option, rep::INFO, &d);
        for i in infos {
            let mut d = i.to_be_bytes().to_vec();
            match i {
                info::NAME => d.extend_from_slice(export.name.as_bytes()),
                info::DESCRIPTION => d.extend_from_slice(export.description.as_bytes()),
                info::BLOCK_SIZE => {
                    let (min, pref, max) = export.block_size;
                    for v in [min, pref, max] {
                        d.extend_from_slice(&v.to_be_bytes());
                    }
                }
                _ => continue,
            }
            option_reply(out, option, rep::INFO, &d);
        }
        option_reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            Step::Done(self.negotiated(export))
        } else {
            Step::Continue
        }
    }

    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) {
        let set = option == opt::SET_META_CONTEXT;
        if set && !self.structured {
            option_reply(
                out,
                option,
                rep::ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let mut r = Reader(data);
        let parsed = (|| {
            let name = r.string_u32()?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(r.string_u32()?);
            }
            r.0.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            option_reply(
                out,
                option,
                rep::ERR_INVALID,
                b"malformed meta context request",
            );
            return;
        };
        let Some(export) = self.find(catalog, &name) else {
            let msg = format!("no export named {name:?}");
            option_reply(out, option, rep::ERR_UNKNOWN, msg.as_bytes());
            return;
        };
        let chosen: Vec<MetaContext> = export
            .contexts
            .iter()
            .filter(|c| {
                if set {
                    queries.iter().any(|q| *q == c.name())
                } else {
                    queries.is_empty() || queries.iter().any(|q| c.matches_list_query(q))
                }
            })
            .cloned()
            .collect();
        for c in &chosen {
            let id = if set { context_id(&export, c) } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(c.name().as_bytes());
            option_reply(out, option, rep::META_CONTEXT, &d);
        }
        option_reply(out, option, rep::ACK, &[]);
        if set {
            self.selected = Some((export.name.clone(), chosen));
        }
    }

    fn negotiated(&mut self, export: ExportInfo) -> Negotiated {
        let contexts = match self.selected.take() {
            Some((name, list)) if name == export.name => list
                .into_iter()
                .map(|c| (context_id(&export, &c), c))
                .collect(),
            _ => Vec::new(),
        };
        Negotiated {
            export,
            structured: self.structured,
            contexts,
        }
    }
}

/// Context ids are the 1-based position in the export's list: stable for
/// the life of the connection, and never 0 (which LIST uses).
fn context_id(export: &ExportInfo, c: &MetaContext) -> u32 {
    export.contexts.iter().position(|x| x == c).unwrap_or(0) as u32 + 1
}

/// Appends one option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string_u32(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > 4096 {
            return None;
        }
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct One;
    impl ExportCatalog for One {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "vm" || name.is_empty()).then(|| ExportInfo {
                name: "vm".into(),
                description: "disk vm".into(),
                size: 1 << 20,
                flags: tflag::HAS_FLAGS | tflag::SEND_FLUSH,
                block_size: (1, 4096, 32 << 20),
                contexts: vec![
                    MetaContext::BaseAllocation,
                    MetaContext::DirtyBitmap("cbt".into()),
                ],
                allow: Vec::new(),
            })
        }
        fn list(&self) -> Vec<ExportInfo> {
            vec![self.lookup("vm").unwrap()]
        }
    }

    fn opt_bytes(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Runs the machine over `input` fed one byte at a time (the hardest
    /// buffering case) and returns the replies and the final step.
    fn run(input: &[u8]) -> (Vec<u8>, Result<Step, ProtoError>) {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut last = Step::NeedMore;
        for b in input {
            buf.push(*b);
            loop {
                match h.step(&buf, &One, &mut out) {
                    Err(e) => return (out, Err(e)),
                    Ok((n, s)) => {
                        buf.drain(..n);
                        match s {
                            Step::NeedMore => break,
                            Step::Continue => continue,
                            s => return (out, Ok(s)),
                        }
                    }
                }
            }
            last = Step::NeedMore;
        }
        (out, Ok(last))
    }

    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut p = out;
        while p.len() >= 20 {
            assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), REPLY_MAGIC);
            let o = u32::from_be_bytes(p[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(p[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize;
            v.push((o, t, p[20..20 + l].to_vec()));
            p = &p[20 + l..];
        }
        assert!(p.is_empty());
        v
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn greeting_is_fixed_newstyle() {
        let g = Handshake::greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn unknown_option_is_unsup_and_connection_continues() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(99, b"junk"));
        input.extend(opt_bytes(opt::LIST, b""));
        let (out, step) = run(&input);
        assert_eq!(step, Ok(Step::NeedMore));
        let r = replies(&out);
        assert_eq!(r[0].0, 99);
        assert_eq!(r[0].1, rep::ERR_UNSUP);
        assert_eq!(r[1].1, rep::SERVER);
        assert_eq!(&r[1].2[4..6], b"vm");
        assert_eq!(r[2].1, rep::ACK);
    }

    #[test]
    fn go_with_meta_contexts() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(opt::STRUCTURED_REPLY, b""));
        input.extend(opt_bytes(
            opt::SET_META_CONTEXT,
            &meta_data("vm", &["qemu:dirty-bitmap:cbt", "nope:x"]),
        ));
        let mut go = 2u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vm");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        input.extend(opt_bytes(opt::GO, &go));
        let (out, step) = run(&input);
        let Ok(Step::Done(n)) = step else {
            panic!("{step:?}")
        };
        assert!(n.structured);
        assert_eq!(
            n.contexts,
            vec![(2, MetaContext::DirtyBitmap("cbt".into()))]
        );
        let r = replies(&out);
        assert_eq!(r[1].1, rep::META_CONTEXT);
        assert_eq!(&r[1].2[0..4], &2u32.to_be_bytes());
        assert_eq!(&r[1].2[4..], b"qemu:dirty-bitmap:cbt");
        // INFO_EXPORT, INFO_BLOCK_SIZE, ACK after the meta context ACK.
        assert_eq!(r[3].2[0..2], info::EXPORT.to_be_bytes());
        assert_eq!(
            r[4].2,
            [
                &[0u8, 3][..],
                &1u32.to_be_bytes(),
                &4096u32.to_be_bytes(),
                &(32u32 << 20).to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(r[5].1, rep::ACK);
    }

    #[test]
    fn list_meta_context_by_namespace() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(
            opt::LIST_META_CONTEXT,
            &meta_data("vm", &["qemu:"]),
        ));
        input.extend(opt_bytes(opt::LIST_META_CONTEXT, &meta_data("vm", &[])));
        let (out, _) = run(&input);
        let names: Vec<_> = replies(&out)
            .into_iter()
            .filter(|r| r.1 == rep::META_CONTEXT)
            .map(|r| String::from_utf8(r.2[4..].to_vec()).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "qemu:dirty-bitmap:cbt",
                "base:allocation",
                "qemu:dirty-bitmap:cbt"
            ]
        );
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(
            opt::SET_META_CONTEXT,
            &meta_data("vm", &["base:allocation"]),
        ));
        let (out, _) = run(&input);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
    }

    #[test]
    fn unknown_export_go_is_err_unknown_export_name_closes() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"zzz");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(opt_bytes(opt::GO, &go));
        input.extend(opt_bytes(opt::EXPORT_NAME, b"zzz"));
        let (out, step) = run(&input);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
        assert_eq!(step, Ok(Step::Close));
    }

    #[test]
    fn export_name_sends_size_flags_and_zeroes() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(opt::EXPORT_NAME, b"vm"));
        let (out, step) = run(&input);
        assert!(matches!(step, Ok(Step::Done(_))));
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[0..8], &(1u64 << 20).to_be_bytes());
    }

    #[test]
    fn oversized_option_is_skipped() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(77, &vec![0u8; MAX_OPTION_LEN as usize + 10]));
        input.extend(opt_bytes(opt::ABORT, b""));
        let (out, step) = run(&input);
        let r = replies(&out);
        assert_eq!(r[0].1, rep::ERR_TOO_BIG);
        assert_eq!(r[1].1, rep::ACK);
        assert_eq!(step, Ok(Step::Close));
    }

    #[test]
    fn bad_magic_and_bad_flags_are_fatal() {
        let (_, s) = run(&[0, 0, 0, 0]);
        assert!(matches!(s, Err(ProtoError::BadClientFlags(0))));
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend([0u8; 16]);
        assert!(matches!(run(&input).1, Err(ProtoError::BadMagic { .. })));
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls() {
        let mut h = Handshake::for_peer(Peer::PlainTcp, Tls::Required);
        let mut out = Vec::new();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt_bytes(opt::LIST, b""));
        input.extend(opt_bytes(opt::STRUCTURED_REPLY, b""));
        input.extend(opt_bytes(opt::STARTTLS, b""));
        let mut buf = &input[..];
        let mut steps = Vec::new();
        while !buf.is_empty() {
            let (n, st) = h.step(buf, &One, &mut out).unwrap();
            buf = &buf[n..];
            steps.push(st);
        }
        assert_eq!(steps.last(), Some(&Step::StartTls));
        let r = replies(&out);
        assert_eq!(r[0].1, rep::ERR_TLS_REQD);
        assert_eq!(r[1].1, rep::ERR_TLS_REQD);
        assert_eq!(r[2].1, rep::ACK);
        // EXPORT_NAME before TLS hangs up; after TLS it works, but only
        // for a client the export admits.
        let mut h2 = Handshake::for_peer(Peer::PlainTcp, Tls::Required);
        let mut o2 = Vec::new();
        let mut i2 = 1u32.to_be_bytes().to_vec();
        i2.extend(opt_bytes(opt::EXPORT_NAME, b"vm"));
        let (n, _) = h2.step(&i2, &One, &mut o2).unwrap();
        assert_eq!(h2.step(&i2[n..], &One, &mut o2).unwrap().1, Step::Close);
        h.tls_started(Peer::Tls {
            subject: vec![("CN".into(), "x".into())],
        });
        let mut o3 = Vec::new();
        let st = h
            .step(&opt_bytes(opt::STARTTLS, b""), &One, &mut o3)
            .unwrap()
            .1;
        assert_eq!(st, Step::Continue);
        assert_eq!(replies(&o3)[0].1, rep::ERR_INVALID);
    }

    /// A catalog whose one export admits only uid 1000.
    struct Guarded;
    impl ExportCatalog for Guarded {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            One.lookup(name).map(|mut e| {
                e.allow = vec!["uid:1000".into()];
                e
            })
        }
        fn list(&self) -> Vec<ExportInfo> {
            vec![self.lookup("vm").unwrap()]
        }
    }

    #[test]
    fn a_client_never_learns_an_export_it_may_not_open() {
        let mut go = 2u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vm");
        go.extend_from_slice(&0u16.to_be_bytes());
        for (uid, allowed) in [(1000, true), (1001, false)] {
            let mut h = Handshake::for_peer(Peer::Unix { uid, gid: 1 }, Tls::Off);
            let mut out = Vec::new();
            let mut input = 1u32.to_be_bytes().to_vec();
            input.extend(opt_bytes(opt::LIST, b""));
            input.extend(opt_bytes(opt::INFO, &go));
            input.extend(opt_bytes(opt::LIST_META_CONTEXT, &meta_data("vm", &[])));
            input.extend(opt_bytes(opt::GO, &go));
            let mut buf = &input[..];
            let mut last = Step::NeedMore;
            while !buf.is_empty() {
                let (n, st) = h.step(buf, &Guarded, &mut out).unwrap();
                buf = &buf[n..];
                last = st;
            }
            let r = replies(&out);
            let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
            if allowed {
                assert_eq!(kinds[0], rep::SERVER);
                assert!(matches!(last, Step::Done(_)));
            } else {
                // LIST: only the ACK; INFO, meta contexts and GO: unknown.
                assert_eq!(
                    kinds,
                    [
                        rep::ACK,
                        rep::ERR_UNKNOWN,
                        rep::ERR_UNKNOWN,
                        rep::ERR_UNKNOWN
                    ]
                );
                assert_eq!(last, Step::Continue);
            }
        }
    }

    proptest! {
        /// Any bytes: a step or an error, never a panic.
        #[test]
        fn never_panics(prefix in any::<bool>(), body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut input = if prefix { 1u32.to_be_bytes().to_vec() } else { vec![] };
            input.extend(body);
            let _ = run(&input);
        }

        #[test]
        fn never_panics_on_framed_options(opts in proptest::collection::vec((0u32..12, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
            let mut input = 1u32.to_be_bytes().to_vec();
            for (o, d) in opts { input.extend(opt_bytes(o, &d)); }
            let _ = run(&input);
        }
    }
}
