//! Index pages and manifests from arbitrary bytes: decode or a clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novabackup_engine::format::{index, manifest::Manifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = index::decode_page(data, data.len() / 32) {
        assert_eq!(index::encode_page(&d), data);
    }
    if let Ok(m) = Manifest::decode(data) {
        // What decodes re-encodes to something that decodes the same.
        let again = Manifest::decode(&m.encode()).expect("a re-encoded manifest decodes");
        assert_eq!(again.encode(), m.encode());
        let _ = m.chunks();
    }
});
