//! SHA-256 of two messages of the same length at once, with the x86 SHA
//! extensions.
//!
//! Why: one SHA-256 is a chain of dependent `sha256rnds2` instructions, so
//! a single stream leaves the unit idle between rounds. Two independent
//! streams interleaved fill those gaps, so two chunks hash faster as a
//! pair than one after the other with `sha2` (`benches/pipeline.rs`,
//! `sha256 pair`; figures in benches/RESULTS.md). Every reader and writer of chunks hashes whole batches
//! of equal-sized chunks, so pairs are the common case.
//!
//! The round structure follows `sha2`'s own SHA-NI backend
//! (`sha2::sha256::x86`), with two states instead of one. The result is
//! checked against `sha2` in the tests, for every length class of the
//! padding.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub const H0: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// Whether this CPU has what [`compress2`] uses (cached by std).
    pub fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    }

    /// Runs the compression function over `a` into `sa` and over `b` into
    /// `sb`, block by block in lockstep. `a` and `b` have the same length,
    /// a multiple of 64.
    ///
    /// # Safety
    /// The CPU must support SHA, SSE2, SSSE3 and SSE4.1 ([`available`]).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn compress2(sa: &mut [u32; 8], sb: &mut [u32; 8], a: &[u8], b: &[u8]) {
        debug_assert!(a.len() == b.len() && a.len() & 63 == 0);
        let mask = _mm_set_epi64x(
            0x0C0D_0E0F_0809_0A0Bu64 as i64,
            0x0405_0607_0001_0203u64 as i64,
        );
        // SAFETY (whole function): the loads read 16 bytes at offsets below
        // `a.len()` and `b.len()` (blocks are whole, checked by the callers'
        // slicing), the state loads and stores stay inside the 32-byte
        // arrays, and `K` has 64 entries for the 16 loads of 4.
        let (mut abef1, mut cdgh1) = load(sa);
        let (mut abef2, mut cdgh2) = load(sb);
        let kp = K.as_ptr() as *const __m128i;
        // Four rounds of both streams: message words `$w` and `$v` plus
        // the constants of group `$g`. Written out (not a loop over an
        // array) so every word stays in a register.
        macro_rules! rounds4 {
            ($w:expr, $v:expr, $g:expr) => {{
                let k = _mm_loadu_si128(kp.add($g));
                let t1 = _mm_add_epi32($w, k);
                let t2 = _mm_add_epi32($v, k);
                cdgh1 = _mm_sha256rnds2_epu32(cdgh1, abef1, t1);
                cdgh2 = _mm_sha256rnds2_epu32(cdgh2, abef2, t2);
                abef1 = _mm_sha256rnds2_epu32(abef1, cdgh1, _mm_shuffle_epi32(t1, 0x0E));
                abef2 = _mm_sha256rnds2_epu32(abef2, cdgh2, _mm_shuffle_epi32(t2, 0x0E));
            }};
        }
        // The next four words of each stream, then their rounds.
        macro_rules! next4 {
            ($w0:ident, $w1:ident, $w2:ident, $w3:ident, $v0:ident, $v1:ident, $v2:ident, $v3:ident, $g:expr) => {{
                $w0 = schedule($w0, $w1, $w2, $w3);
                $v0 = schedule($v0, $v1, $v2, $v3);
                rounds4!($w0, $v0, $g);
            }};
        }
        for (x, y) in a.chunks_exact(64).zip(b.chunks_exact(64)) {
            let (s_abef1, s_cdgh1, s_abef2, s_cdgh2) = (abef1, cdgh1, abef2, cdgh2);
            let px = x.as_ptr() as *const __m128i;
            let py = y.as_ptr() as *const __m128i;
            let mut w0 = _mm_shuffle_epi8(_mm_loadu_si128(px), mask);
            let mut w1 = _mm_shuffle_epi8(_mm_loadu_si128(px.add(1)), mask);
            let mut w2 = _mm_shuffle_epi8(_mm_loadu_si128(px.add(2)), mask);
            let mut w3 = _mm_shuffle_epi8(_mm_loadu_si128(px.add(3)), mask);
            let mut v0 = _mm_shuffle_epi8(_mm_loadu_si128(py), mask);
            let mut v1 = _mm_shuffle_epi8(_mm_loadu_si128(py.add(1)), mask);
            let mut v2 = _mm_shuffle_epi8(_mm_loadu_si128(py.add(2)), mask);
            let mut v3 = _mm_shuffle_epi8(_mm_loadu_si128(py.add(3)), mask);
            rounds4!(w0, v0, 0);
            rounds4!(w1, v1, 1);
            rounds4!(w2, v2, 2);
            rounds4!(w3, v3, 3);
            for g in [4, 8, 12] {
                next4!(w0, w1, w2, w3, v0, v1, v2, v3, g);
                next4!(w1, w2, w3, w0, v1, v2, v3, v0, g + 1);
                next4!(w2, w3, w0, w1, v2, v3, v0, v1, g + 2);
                next4!(w3, w0, w1, w2, v3, v0, v1, v2, g + 3);
            }
            abef1 = _mm_add_epi32(abef1, s_abef1);
            cdgh1 = _mm_add_epi32(cdgh1, s_cdgh1);
            abef2 = _mm_add_epi32(abef2, s_abef2);
            cdgh2 = _mm_add_epi32(cdgh2, s_cdgh2);
        }
        store(sa, abef1, cdgh1);
        store(sb, abef2, cdgh2);
    }

    /// The next four message words from the previous sixteen.
    #[inline(always)]
    unsafe fn schedule(v0: __m128i, v1: __m128i, v2: __m128i, v3: __m128i) -> __m128i {
        let t = _mm_add_epi32(_mm_sha256msg1_epu32(v0, v1), _mm_alignr_epi8(v3, v2, 4));
        _mm_sha256msg2_epu32(t, v3)
    }

    /// The state in the ABEF/CDGH order the instructions want.
    #[inline(always)]
    unsafe fn load(s: &[u32; 8]) -> (__m128i, __m128i) {
        let p = s.as_ptr() as *const __m128i;
        let dcba = _mm_loadu_si128(p);
        let efgh = _mm_loadu_si128(p.add(1));
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(efgh, 0x1B);
        (
            _mm_alignr_epi8(cdab, efgh, 8),
            _mm_blend_epi16(efgh, cdab, 0xF0),
        )
    }

    #[inline(always)]
    unsafe fn store(s: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let p = s.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(p, _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128(p.add(1), _mm_alignr_epi8(dchg, feba, 8));
    }
}

/// The final one or two blocks of a message: its last partial block, the
/// 0x80 marker, zeroes, and the bit length.
fn padded_tail<'a>(m: &[u8], out: &'a mut [u8; 128]) -> &'a [u8] {
    let rest = &m[m.len() / 64 * 64..];
    let len = if rest.len() < 56 { 64 } else { 128 };
    out.fill(0);
    out[..rest.len()].copy_from_slice(rest);
    out[rest.len()] = 0x80;
    out[len - 8..len].copy_from_slice(&(m.len() as u64 * 8).to_be_bytes());
    &out[..len]
}

/// SHA-256 of `a` and of `b`, or `None` when they differ in length or the
/// CPU lacks the SHA extensions (the caller then hashes them one by one).
pub fn sha256_pair(a: &[u8], b: &[u8]) -> Option<[[u8; 32]; 2]> {
    #[cfg(target_arch = "x86_64")]
    {
        if a.len() != b.len() || !x86::available() {
            return None;
        }
        let whole = a.len() / 64 * 64;
        let (mut sa, mut sb) = (x86::H0, x86::H0);
        let (mut ta, mut tb) = ([0u8; 128], [0u8; 128]);
        let (ta, tb) = (padded_tail(a, &mut ta), padded_tail(b, &mut tb));
        // SAFETY: `available()` checked the CPU features `compress2` is
        // compiled for; both pairs of slices have equal lengths that are
        // multiples of 64 (`whole`, and `padded_tail` of equal lengths).
        unsafe {
            x86::compress2(&mut sa, &mut sb, &a[..whole], &b[..whole]);
            x86::compress2(&mut sa, &mut sb, ta, tb);
        }
        let bytes = |s: [u32; 8]| {
            let mut o = [0u8; 32];
            for (o, w) in o.chunks_exact_mut(4).zip(s) {
                o.copy_from_slice(&w.to_be_bytes());
            }
            o
        };
        Some([bytes(sa), bytes(sb)])
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    fn reference(m: &[u8]) -> [u8; 32] {
        Sha256::digest(m).into()
    }

    #[test]
    fn matches_sha2_at_every_padding_boundary() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| i.wrapping_mul(2654435761) as u8)
            .collect();
        for len in [
            0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 1000, 65536, 65537,
        ] {
            let (a, b) = (&data[..len], &data[3..3 + len]);
            let Some([da, db]) = sha256_pair(a, b) else {
                // No SHA extensions here: nothing to compare.
                return;
            };
            assert_eq!(da, reference(a), "len {len}");
            assert_eq!(db, reference(b), "len {len}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn pairs_whenever_the_cpu_has_sha_extensions() {
        assert_eq!(
            sha256_pair(b"ab", b"cd").is_some(),
            is_x86_feature_detected!("sha")
        );
    }

    #[test]
    fn refuses_different_lengths() {
        assert!(sha256_pair(b"ab", b"abc").is_none());
    }

    proptest! {
        #[test]
        fn any_pair_of_equal_length_matches_sha2(
            a in proptest::collection::vec(any::<u8>(), 0..600),
            seed in any::<u8>(),
        ) {
            let b: Vec<u8> = a.iter().map(|x| x ^ seed).collect();
            if let Some([da, db]) = sha256_pair(&a, &b) {
                prop_assert_eq!(da, reference(&a));
                prop_assert_eq!(db, reference(&b));
            }
        }
    }
}
