//! Index pages. A snapshot's index lists one digest per chunk of the image;
//! it is cut into pages of [`PAGE_DIGESTS`] digests (the last page may be
//! shorter), and each page is stored as a chunk itself, named by the
//! SHA-256 of its bytes. A page whose chunks did not change has the same
//! bytes, hence the same name, as in the previous snapshot, so it costs
//! nothing to store again.
//!
//! Page layout: the digests, 32 bytes each, back to back; the all-zero
//! digest marks an all-zero chunk. Nothing else: the manifest gives the
//! chunk size and image size that place each digest.

use crate::digest::ChunkDigest;

/// Digests per page: 128 KiB pages.
pub const PAGE_DIGESTS: usize = 4096;

/// Encodes a page.
pub fn encode_page(digests: &[ChunkDigest]) -> Vec<u8> {
    let mut v = Vec::with_capacity(digests.len() * 32);
    for d in digests {
        v.extend_from_slice(&d.0);
    }
    v
}

/// Decodes a page; `expected` is the number of digests the manifest says
/// this page holds.
pub fn decode_page(bytes: &[u8], expected: usize) -> Result<Vec<ChunkDigest>, String> {
    if bytes.len() != expected * 32 {
        return Err(format!(
            "index page holds {} bytes, expected {} digests",
            bytes.len(),
            expected
        ));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| ChunkDigest(c.try_into().unwrap()))
        .collect())
}

/// Number of pages for `chunks` chunks.
pub fn page_count(chunks: u64) -> u64 {
    chunks.div_ceil(PAGE_DIGESTS as u64)
}

/// Number of digests in page `page` of an index of `chunks` chunks.
pub fn page_len(chunks: u64, page: u64) -> usize {
    let start = page * PAGE_DIGESTS as u64;
    (chunks.saturating_sub(start)).min(PAGE_DIGESTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_page() {
        let p = encode_page(&[ChunkDigest::ZERO, ChunkDigest([0xab; 32])]);
        assert_eq!(p.len(), 64);
        assert_eq!(&p[..32], &[0; 32]);
        assert_eq!(&p[32..], &[0xab; 32]);
        assert_eq!(decode_page(&p, 2).unwrap()[1], ChunkDigest([0xab; 32]));
        assert!(decode_page(&p, 3).is_err());
        assert_eq!(page_count(4097), 2);
        assert_eq!(page_len(4097, 1), 1);
        assert_eq!(page_len(4097, 0), 4096);
    }

    proptest! {
        #[test]
        fn decode_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300), n in 0usize..10) {
            if let Ok(v) = decode_page(&bytes, n) {
                prop_assert_eq!(encode_page(&v), bytes);
            }
        }
    }
}
