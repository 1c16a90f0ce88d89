//! Chunk digests: SHA-256 of a chunk's plain contents (sha2 uses the CPU's
//! SHA extensions when present). The all-zero digest marks an all-zero
//! chunk in an index; such chunks are never stored.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

mod pair;

/// The SHA-256 of a chunk's plain contents.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    /// The marker of an all-zero chunk in an index.
    pub const ZERO: ChunkDigest = ChunkDigest([0; 32]);

    /// Hashes `data`.
    pub fn of(data: &[u8]) -> ChunkDigest {
        ChunkDigest(Sha256::digest(data).into())
    }

    /// Hashes every buffer; neighbours of the same length are hashed as a
    /// pair ([`pair`]), which is faster than one after the other.
    pub fn of_each(bufs: &[&[u8]]) -> Vec<ChunkDigest> {
        let mut out = Vec::with_capacity(bufs.len());
        let mut i = 0;
        while i < bufs.len() {
            if let Some([a, b]) = bufs
                .get(i + 1)
                .and_then(|next| pair::sha256_pair(bufs[i], next))
            {
                out.push(ChunkDigest(a));
                out.push(ChunkDigest(b));
                i += 2;
            } else {
                out.push(ChunkDigest::of(bufs[i]));
                i += 1;
            }
        }
        out
    }

    /// Whether this is the zero-chunk marker.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    /// Lowercase hex.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// Whether every byte is zero (the fast path of the chunker).
pub fn is_all_zero(data: &[u8]) -> bool {
    // Word-wide ORs over 256-byte blocks (the compiler vectorises each
    // block's loop), stopping at the first non-zero block: most chunks of
    // data end the test in their first block, where a full scan would
    // read every byte.
    data.chunks(256).all(|block| {
        let mut words = block.chunks_exact(8);
        let any = words
            .by_ref()
            .fold(0u64, |a, w| a | u64::from_ne_bytes(w.try_into().unwrap()));
        any == 0 && words.remainder().iter().all(|b| *b == 0)
    })
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkDigest({})", self.hex())
    }
}

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk digest {0:?}: expected 64 hex digits")]
pub struct BadDigest(pub String);

impl FromStr for ChunkDigest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(BadDigest(s.into()));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = (b[2 * i] as char).to_digit(16);
            let lo = (b[2 * i + 1] as char).to_digit(16);
            match (hi, lo) {
                (Some(h), Some(l)) => *o = (h * 16 + l) as u8,
                _ => return Err(BadDigest(s.into())),
            }
        }
        Ok(ChunkDigest(out))
    }
}

impl TryFrom<String> for ChunkDigest {
    type Error = BadDigest;
    fn try_from(s: String) -> Result<Self, BadDigest> {
        s.parse()
    }
}

impl From<ChunkDigest> for String {
    fn from(d: ChunkDigest) -> String {
        d.hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_hex() {
        let d = ChunkDigest::of(b"abc");
        assert_eq!(
            d.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.hex().parse::<ChunkDigest>().unwrap(), d);
        assert!("xyz".parse::<ChunkDigest>().is_err());
        assert!(ChunkDigest::ZERO.is_zero());
        assert!(is_all_zero(&[0; 100]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_all_zero(&v));
    }

    #[test]
    fn is_all_zero_sees_a_byte_anywhere() {
        // Block edges, a block's word remainder and the last short block.
        let len = 65536 + 13;
        assert!(is_all_zero(&vec![0u8; len]));
        assert!(is_all_zero(&[]));
        for at in [0, 7, 8, 255, 256, 257, 4095, 65535, 65536, 65540, len - 1] {
            let mut v = vec![0u8; len];
            v[at] = 0x80;
            assert!(!is_all_zero(&v), "missed a byte at {at}");
        }
    }

    #[test]
    fn of_each_hashes_every_buffer_whatever_the_lengths() {
        let bufs: Vec<Vec<u8>> = [64, 64, 10, 64, 65536, 65536, 65536, 0]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8 + 1; n])
            .collect();
        let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        let want: Vec<ChunkDigest> = refs.iter().map(|b| ChunkDigest::of(b)).collect();
        assert_eq!(ChunkDigest::of_each(&refs), want);
        assert_eq!(ChunkDigest::of_each(&[]), vec![]);
    }
}
