//! The store server's wire codec from arbitrary request bodies: upload
//! batches, digest lists and commits split or refuse, never panic, and
//! what a batch decodes to lies inside the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novabackup_api::store_wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = store_wire::decode_batch(data) {
        let total: usize = v.iter().map(|(_, b)| b.len()).sum();
        assert!(total <= data.len());
    }
    if let Ok(spans) = store_wire::record_spans(data) {
        for (_, r) in spans {
            assert!(r.end <= data.len());
        }
    }
    let _ = store_wire::decode_digests(data, 0, 4096);
    if let Ok((_, n)) = store_wire::split_commit(data) {
        assert!(n <= data.len());
    }
});
