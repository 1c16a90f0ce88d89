//! A pack's header, trailer and table of contents from arbitrary bytes:
//! every entry decoded lies inside the file, nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novabackup_engine::format::pack;

fuzz_target!(|data: &[u8]| {
    let _ = pack::check_header(data);
    let len = data.len() as u64;
    let Some(tail) = data.len().checked_sub(pack::TRAILER_LEN as usize) else {
        return;
    };
    let Ok(trailer) = pack::decode_trailer(&data[tail..], len) else {
        return;
    };
    let start = tail.saturating_sub(trailer.toc_len());
    if let Ok(entries) = pack::decode_toc(&data[start..tail], &trailer) {
        for e in entries {
            assert!(e.offset.checked_add(e.len as u64).is_some_and(|end| end <= len));
        }
    }
});
