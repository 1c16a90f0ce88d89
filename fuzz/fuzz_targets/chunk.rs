//! Chunk files as a damaged or hostile store holds them: decoding checks
//! the header, the xxh3 sum and (when asked) the SHA-256, and fails with an
//! error, never a panic or an allocation the header alone asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novabackup_engine::format::chunk;
use novabackup_engine::digest::ChunkDigest;

fuzz_target!(|data: &[u8]| {
    let _ = chunk::decode(data);
    let digest = ChunkDigest::of(data.get(24..).unwrap_or_default());
    if let Ok(plain) = chunk::decode_verified(data, &digest) {
        assert_eq!(ChunkDigest::of(&plain), digest);
    }
    // A valid file with the fuzzer's bytes as payload round-trips.
    let mut c = chunk::compressor(1).unwrap();
    let (file, _) = chunk::encode(data, &mut c);
    assert_eq!(chunk::decode(&file).unwrap(), data);
});
