//! The NBD request decoder: any bytes give a request that is valid by
//! construction (inside the export, within the payload bound), a reject,
//! "need more" or a protocol error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proxy::proto::request::{decode, Command, Decoded, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut buf)) = data.split_first() else {
        return;
    };
    let lim = Limits {
        size: if mode & 1 == 0 { 1 << 20 } else { u64::MAX - 4096 },
        read_only: mode & 2 != 0,
        structured: mode & 4 != 0,
        has_contexts: mode & 8 != 0,
        max_payload: 1 << 16,
    };
    loop {
        match decode(buf, &lim) {
            Err(_) => return,
            Ok(Decoded::Incomplete(n)) => {
                assert!(n > buf.len());
                return;
            }
            Ok(Decoded::Request { req, total }) => {
                assert!(total <= buf.len() && total >= 28);
                // Offset and length mean nothing to FLUSH and DISC.
                if !matches!(req.command, Command::Flush | Command::Disc) {
                    let end = req.offset.checked_add(req.len as u64);
                    assert!(end.is_some_and(|e| e <= lim.size));
                }
                buf = &buf[total..];
            }
            Ok(Decoded::Reject { total, .. }) => {
                assert!(total <= buf.len() && total >= 28);
                buf = &buf[total..];
            }
        }
    }
});
