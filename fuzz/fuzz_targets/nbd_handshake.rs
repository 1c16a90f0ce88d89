//! The NBD handshake state machine over arbitrary client bytes, for every
//! kind of peer and TLS state: a step or a protocol error, never a panic,
//! and every step consumes only what it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proxy::access::Peer;
use nbd_proxy::proto::handshake::{ExportCatalog, ExportInfo, Handshake, MetaContext, Step, Tls};

struct Two;

impl ExportCatalog for Two {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let allow = match name {
            "vm" | "" => vec![],
            "locked" => vec!["uid:1000".into(), "CN=a,O=b".into()],
            _ => return None,
        };
        Some(ExportInfo {
            name: if name.is_empty() { "vm".into() } else { name.into() },
            description: "fuzz".into(),
            size: 1 << 30,
            flags: 1,
            block_size: (1, 4096, 32 << 20),
            contexts: vec![
                MetaContext::BaseAllocation,
                MetaContext::DirtyBitmap("cbt".into()),
            ],
            allow,
        })
    }
    fn list(&self) -> Vec<ExportInfo> {
        ["vm", "locked"].iter().filter_map(|n| self.lookup(n)).collect()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let peer = match mode % 4 {
        0 => Peer::Unix { uid: 1000, gid: 1 },
        1 => Peer::Unix { uid: 0, gid: 0 },
        2 => Peer::PlainTcp,
        _ => Peer::Tls { subject: vec![("CN".into(), "a".into()), ("O".into(), "b".into())] },
    };
    let tls = match (mode >> 2) % 3 {
        0 => Tls::Off,
        1 => Tls::Required,
        _ => Tls::Active,
    };
    let mut h = Handshake::for_peer(peer, tls);
    let mut out = Vec::new();
    // Feed in pieces whose sizes come from the input too, as a socket
    // would; `start` marks what the machine consumed (no copying).
    let split = (mode as usize >> 4) + 1;
    let mut end = 0;
    let mut start = 0;
    while end < input.len() {
        end = (end + split).min(input.len());
        loop {
            match h.step(&input[start..end], &Two, &mut out) {
                Err(_) => return,
                Ok((n, step)) => {
                    assert!(n <= end - start);
                    start += n;
                    match step {
                        Step::NeedMore => break,
                        Step::Continue => {}
                        Step::StartTls => h.tls_started(Peer::Unix { uid: 7, gid: 7 }),
                        Step::Close | Step::Done(_) => return,
                    }
                }
            }
        }
        out.clear();
    }
});
