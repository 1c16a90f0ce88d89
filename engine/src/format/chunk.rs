//! Chunk files: a 24-byte header and the payload.
//!
//! ```text
//! 0   8  magic "NBCHUNK1"
//! 8   1  format version (1)
//! 9   1  codec: 0 = stored raw, 1 = zstd
//! 10  2  reserved, zero
//! 12  4  plain length in bytes (u32 LE)
//! 16  8  xxh3-64 of the payload as stored (u64 LE)
//! 24  …  payload
//! ```
//!
//! The xxh3 catches damage cheaply before decompression; the SHA-256 of the
//! decoded contents, which is the chunk's name, is checked by every reader
//! ([`decode_verified`]) before the data is used.

use xxhash_rust::xxh3::xxh3_64;

use crate::digest::ChunkDigest;

const MAGIC: &[u8; 8] = b"NBCHUNK1";
/// Header length.
pub const HEADER_LEN: usize = 24;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// Largest plain chunk we accept when decoding (guards allocations).
pub const MAX_PLAIN: usize = 64 << 20;

/// Why a chunk file could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Not a chunk file, or a damaged header.
    #[error("bad chunk header: {0}")]
    Header(String),
    /// The stored bytes do not match their checksum.
    #[error("chunk payload checksum mismatch (the file is damaged)")]
    Checksum,
    /// zstd failed or the size is wrong.
    #[error("chunk payload does not decompress: {0}")]
    Decompress(String),
    /// The contents do not hash to the chunk's name.
    #[error("chunk contents do not match digest {0}")]
    Digest(ChunkDigest),
}

/// How a chunk was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored raw: compression did not pay.
    Raw,
    /// zstd.
    Zstd,
}

/// The default zstd level: faster levels save CPU once but cost store
/// space in every snapshot kept (benches/RESULTS.md, "Compression
/// level"); `--zstd-level -3` is there for hosts short of CPU.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// The shortest match zstd looks for at the default level
/// ([`DEFAULT_ZSTD_LEVEL`]): zstd's longest (7) instead of level 1's 6,
/// which trades a little size for noticeably less time on disk images
/// (benches/RESULTS.md, "Compression level").
const DEFAULT_LEVEL_MIN_MATCH: u32 = 7;

/// A compressor for chunks at zstd `level`, tuned as
/// [`DEFAULT_LEVEL_MIN_MATCH`] says at the default level. Any level's
/// output is a plain zstd frame, and chunks of any level mix in a store.
pub fn compressor(level: i32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    if level == DEFAULT_ZSTD_LEVEL {
        c.set_parameter(zstd::zstd_safe::CParameter::MinMatch(
            DEFAULT_LEVEL_MIN_MATCH,
        ))?;
    }
    Ok(c)
}

/// Encodes `plain` as a chunk file, compressed with `compressor` unless
/// that does not make it smaller.
pub fn encode(plain: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> (Vec<u8>, Codec) {
    encode_with(plain, compressor, true)
}

/// [`encode`], leaving the checksum field zero unless `sum`: for a store
/// that sums what it is given (`FastPaths::sums_chunks` of the store module).
/// A zero checksum is one [`fill_sum`] fills in.
pub fn encode_with(
    plain: &[u8],
    compressor: &mut zstd::bulk::Compressor<'_>,
    sum: bool,
) -> (Vec<u8>, Codec) {
    if let Some(file) = compressed(plain, compressor, sum, looks_incompressible(plain)) {
        return (file, Codec::Zstd);
    }
    // From the pool the stores give chunk files back to.
    let mut out = crate::bufpool::FILES.take_empty(HEADER_LEN + plain.len());
    out.extend_from_slice(&raw_head(plain, sum));
    out.extend_from_slice(plain);
    (out, Codec::Raw)
}

/// The zstd chunk file of `plain` (its checksum zero unless `sum`), or
/// `None` when the chunk is to be kept raw: zstd would not shrink it by
/// 1/32, or, `incompressible` being [`looks_incompressible`]'s verdict,
/// it is not worth trying.
pub fn compressed(
    plain: &[u8],
    compressor: &mut zstd::bulk::Compressor<'_>,
    sum: bool,
    incompressible: bool,
) -> Option<Vec<u8>> {
    thread_local! {
        /// zstd's output, reused: a fresh buffer per chunk costs page
        /// faults and page clearing, most of all in a backup to a store
        /// server, where chunk files wait for their upload while new
        /// ones are made.
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if incompressible {
        return None;
    }
    let limit = plain.len() - plain.len() / 32;
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        let n = match compressor.compress_to_buffer(plain, scratch) {
            Ok(n) if n < limit => n,
            _ => return None,
        };
        let payload = &scratch[..n];
        let mut out = crate::bufpool::FILES.take_empty(HEADER_LEN + n);
        out.extend_from_slice(&head(CODEC_ZSTD, plain.len(), payload, sum));
        out.extend_from_slice(payload);
        Some(out)
    })
}

/// The header of `plain`'s raw chunk file (its checksum zero unless
/// `sum`): the file is this, then `plain`. A store server is sent the two
/// as they lie, with no copy into one file (`FastPaths::put_raw_chunk` of the store module).
pub fn raw_head(plain: &[u8], sum: bool) -> [u8; HEADER_LEN] {
    head(CODEC_RAW, plain.len(), plain, sum)
}

fn head(codec: u8, plain_len: usize, payload: &[u8], sum: bool) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = 1;
    h[9] = codec;
    h[12..16].copy_from_slice(&(plain_len as u32).to_le_bytes());
    if sum {
        h[16..24].copy_from_slice(&xxh3_64(payload).to_le_bytes());
    }
    h
}

/// Fills in the checksum of a chunk file whose checksum field is zero (see
/// [`encode_with`]); any other file is left as it is. Whether the bytes
/// are right is for the digest check to say.
pub fn fill_sum(file: &mut [u8]) {
    if unsummed(file) {
        let sum = xxh3_64(&file[HEADER_LEN..]);
        file[16..24].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Whether `file` has a header whose checksum is left zero.
fn unsummed(file: &[u8]) -> bool {
    file.len() >= HEADER_LEN && file[16..24] == [0; 8]
}

/// Strips of bytes [`looks_incompressible`] samples, and their width.
const SAMPLE_STRIPS: usize = 32;
const SAMPLE_WIDTH: usize = 64;
/// The largest sum of squared byte counts, over the 2 KiB sample, taken
/// for random bytes. Uniform bytes give 2048 + 2048 × 2047 / 256 = 18,424
/// on average, with a spread of about 220; text, code, file system
/// metadata and anything else zstd shrinks by 1/32 give more (their bytes
/// are less even). On the shared corpus this threshold caught 9,584 of
/// the 9,651 chunks zstd could not shrink, and took 71 chunks that it
/// could for random ones, which cost 0.21 MiB of 1,485 MiB of store.
const UNIFORM_MAX: u64 = 20_000;

/// Whether `plain` looks like random bytes (encrypted or already
/// compressed data) from a byte histogram of a sample: a 2 KiB sample in
/// 32 strips spread over the chunk, so every 4 KiB file system block of a
/// 64 KiB chunk is looked at. zstd spends 12-15 µs on a 64 KiB chunk it
/// cannot shrink (a third of what hashing it takes), the sample about
/// 1.5 µs on a chunk just hashed (in cache). What this misses is data
/// that is random byte by byte yet repeats itself within the chunk (the
/// same random block twice), which is stored raw.
pub fn looks_incompressible(plain: &[u8]) -> bool {
    if plain.len() < SAMPLE_STRIPS * SAMPLE_WIDTH * 4 {
        return false;
    }
    let step = plain.len() / SAMPLE_STRIPS;
    let mut counts = [0u16; 256];
    for strip in plain.chunks(step).take(SAMPLE_STRIPS) {
        for &b in &strip[..SAMPLE_WIDTH] {
            counts[b as usize] += 1;
        }
    }
    let squares: u64 = counts.iter().map(|&c| u64::from(c) * u64::from(c)).sum();
    squares <= UNIFORM_MAX
}

/// Decodes a chunk file (checksum, decompression, length). Any bytes give
/// a value or an error, never a panic.
pub fn decode(file: &[u8]) -> Result<Vec<u8>, ChunkError> {
    decode_as(file, Sum::Check)
}

fn decode_as(file: &[u8], sum: Sum) -> Result<Vec<u8>, ChunkError> {
    let (codec, plain_len, payload) = parts(file, sum)?;
    let plain = match codec {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => zstd::bulk::decompress(payload, plain_len)
            .map_err(|e| ChunkError::Decompress(e.to_string()))?,
        c => return Err(ChunkError::Header(format!("unknown codec {c}"))),
    };
    if plain.len() != plain_len {
        return Err(ChunkError::Decompress(format!(
            "{} bytes, header says {plain_len}",
            plain.len()
        )));
    }
    Ok(plain)
}

/// [`decode`] into `out` (which must be exactly the plain length the
/// caller expects), reusing `dctx` and the buffer between calls (restore
/// decodes every chunk of a disk). No digest check: for callers that
/// check many chunks' digests at once ([`ChunkDigest::of_each`]); the
/// contents must not be used before that check.
pub fn decode_into(
    file: &[u8],
    out: &mut [u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
) -> Result<(), ChunkError> {
    decode_into_as(file, out, dctx, Sum::Check)
}

/// Whether a chunk file's checksum is checked: not where the caller is
/// about to fill it in ([`Verifier::check_each_filling`]).
#[derive(Clone, Copy, PartialEq)]
enum Sum {
    Check,
    Skip,
}

fn decode_into_as(
    file: &[u8],
    out: &mut [u8],
    dctx: &mut zstd::bulk::Decompressor<'_>,
    sum: Sum,
) -> Result<(), ChunkError> {
    let (codec, payload) = checked_payload(file, out.len(), sum)?;
    let plain_len = out.len();
    match codec {
        CODEC_RAW if payload.len() == plain_len => out.copy_from_slice(payload),
        CODEC_RAW => {
            return Err(ChunkError::Decompress(
                "raw payload of the wrong length".into(),
            ))
        }
        CODEC_ZSTD => {
            let n = dctx
                .decompress_to_buffer(payload, out)
                .map_err(|e| ChunkError::Decompress(e.to_string()))?;
            if n != plain_len {
                return Err(ChunkError::Decompress(format!(
                    "{n} bytes, header says {plain_len}"
                )));
            }
        }
        c => return Err(ChunkError::Header(format!("unknown codec {c}"))),
    }
    Ok(())
}

/// A chunk file's codec, plain length and payload, once its header and
/// (unless `sum` says skip) checksum are found sound.
fn parts(file: &[u8], sum: Sum) -> Result<(u8, usize, &[u8]), ChunkError> {
    if file.len() < HEADER_LEN {
        return Err(ChunkError::Header(format!(
            "{} bytes, shorter than the header",
            file.len()
        )));
    }
    if &file[0..8] != MAGIC {
        return Err(ChunkError::Header("bad magic".into()));
    }
    if file[8] != 1 {
        return Err(ChunkError::Header(format!("unknown version {}", file[8])));
    }
    let plain_len = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
    if plain_len > MAX_PLAIN {
        return Err(ChunkError::Header(format!(
            "plain length {plain_len} too large"
        )));
    }
    let stated = u64::from_le_bytes(file[16..24].try_into().unwrap());
    let payload = &file[HEADER_LEN..];
    if sum == Sum::Check && xxh3_64(payload) != stated {
        return Err(ChunkError::Checksum);
    }
    Ok((file[9], plain_len, payload))
}

/// [`parts`] of a chunk file that must hold `plain_len` plain bytes.
fn checked_payload(file: &[u8], plain_len: usize, sum: Sum) -> Result<(u8, &[u8]), ChunkError> {
    let (codec, claimed, payload) = parts(file, sum)?;
    if claimed != plain_len {
        return Err(ChunkError::Decompress(format!(
            "{claimed} bytes, the index needs {plain_len}"
        )));
    }
    Ok((codec, payload))
}

/// [`decode`], then checks that the contents hash to `digest`.
pub fn decode_verified(file: &[u8], digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
    let plain = decode(file)?;
    if ChunkDigest::of(&plain) != *digest {
        return Err(ChunkError::Digest(*digest));
    }
    Ok(plain)
}

/// [`decode_verified`] of an upload whose checksum may be left zero for
/// the receiver ([`fill_sum`]): such a file's checksum is filled in once
/// its contents are found to hash to `digest`, with one xxh3 pass.
pub fn decode_verified_filling(
    file: &mut [u8],
    digest: &ChunkDigest,
) -> Result<Vec<u8>, ChunkError> {
    let sum = if unsummed(file) {
        Sum::Skip
    } else {
        Sum::Check
    };
    let plain = decode_as(file, sum)?;
    if ChunkDigest::of(&plain) != *digest {
        return Err(ChunkError::Digest(*digest));
    }
    if sum == Sum::Skip {
        fill_sum(file);
    }
    Ok(plain)
}

/// Checks chunk files against their digests with one reused zstd context
/// and buffer (a store server checks every upload).
pub struct Verifier {
    dctx: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
    /// A second buffer, so that two chunks can be hashed as a pair.
    buf2: Vec<u8>,
}

impl Verifier {
    /// A verifier.
    pub fn new() -> Result<Verifier, ChunkError> {
        Ok(Verifier {
            dctx: zstd::bulk::Decompressor::new()
                .map_err(|e| ChunkError::Decompress(e.to_string()))?,
            buf: Vec::new(),
            buf2: Vec::new(),
        })
    }

    /// What [`decode_verified`] checks, without keeping the data; the
    /// plain length on success.
    pub fn check(&mut self, file: &[u8], digest: &ChunkDigest) -> Result<usize, ChunkError> {
        self.check_as(file, digest, Sum::Check)
    }

    fn check_as(
        &mut self,
        file: &[u8],
        digest: &ChunkDigest,
        sum: Sum,
    ) -> Result<usize, ChunkError> {
        let Some(plain_len) = plain_len_of(file) else {
            // `decode` names what is wrong with the header.
            return decode(file).map(|p| p.len());
        };
        self.buf.resize(plain_len, 0);
        decode_into_as(file, &mut self.buf, &mut self.dctx, sum)?;
        if ChunkDigest::of(&self.buf) != *digest {
            return Err(ChunkError::Digest(*digest));
        }
        Ok(plain_len)
    }

    /// [`Verifier::check`] of every (file, digest), two at a time so that
    /// equal-sized chunks are hashed as a pair.
    pub fn check_each(&mut self, items: &[(&[u8], ChunkDigest)]) -> Vec<Result<usize, ChunkError>> {
        self.check_all(items, |_| Sum::Check)
    }

    /// [`Verifier::check_each`] of uploads, filling in the checksums left
    /// zero ([`encode_with`]) of the files found sound: one xxh3 pass over
    /// those, where [`fill_sum`] and then a check would take two. Their
    /// digest check is what vouches for them.
    pub fn check_each_filling(
        &mut self,
        items: &mut [(&mut [u8], ChunkDigest)],
    ) -> Vec<Result<usize, ChunkError>> {
        let unsummed: Vec<bool> = items.iter().map(|(f, _)| unsummed(f)).collect();
        let view: Vec<(&[u8], ChunkDigest)> = items.iter().map(|(f, d)| (&f[..], *d)).collect();
        let verdicts = self.check_all(&view, |i| if unsummed[i] { Sum::Skip } else { Sum::Check });
        for (((f, _), unsummed), v) in items.iter_mut().zip(unsummed).zip(&verdicts) {
            if unsummed && v.is_ok() {
                fill_sum(f);
            }
        }
        verdicts
    }

    /// The verdicts on `items`, checking item `i`'s checksum as `sum(i)` says.
    fn check_all(
        &mut self,
        items: &[(&[u8], ChunkDigest)],
        sum: impl Fn(usize) -> Sum,
    ) -> Vec<Result<usize, ChunkError>> {
        let mut out = Vec::with_capacity(items.len());
        for (pair, two) in items.chunks(2).enumerate() {
            let sa = sum(2 * pair);
            let [(fa, da), (fb, db)] = two else {
                out.push(self.check_as(two[0].0, &two[0].1, sa));
                continue;
            };
            let sb = sum(2 * pair + 1);
            let (la, lb) = (plain_len_of(fa), plain_len_of(fb));
            let (Some(la), Some(lb)) = (la, lb) else {
                out.push(self.check_as(fa, da, sa));
                out.push(self.check_as(fb, db, sb));
                continue;
            };
            let (ra, pa) = plain_of(fa, la, &mut self.buf, &mut self.dctx, sa);
            let (rb, pb) = plain_of(fb, lb, &mut self.buf2, &mut self.dctx, sb);
            // A buffer that failed to decode is hashed too (its verdict is
            // already the decode error): rare, and simpler than a third path.
            let sums = ChunkDigest::of_each(&[pa, pb]);
            for (r, (sum, (want, len))) in [ra, rb]
                .into_iter()
                .zip(sums.into_iter().zip([(da, la), (db, lb)]))
            {
                out.push(r.and_then(|()| {
                    if sum == *want {
                        Ok(len)
                    } else {
                        Err(ChunkError::Digest(*want))
                    }
                }));
            }
        }
        out
    }
}

/// The plain bytes of `file` (`len` of them) to hash, and whether it
/// decoded: a raw chunk's payload where it lies, anything else decoded
/// into `buf`. A store server checks every upload; copying the raw ones
/// out first would be pure overhead.
fn plain_of<'a>(
    file: &'a [u8],
    len: usize,
    buf: &'a mut Vec<u8>,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    sum: Sum,
) -> (Result<(), ChunkError>, &'a [u8]) {
    match checked_payload(file, len, sum) {
        Ok((CODEC_RAW, payload)) if payload.len() == len => (Ok(()), payload),
        _ => {
            buf.resize(len, 0);
            (decode_into_as(file, buf, dctx, sum), &buf[..])
        }
    }
}

/// The plain length a chunk file's header claims, if the header is sane.
fn plain_len_of(file: &[u8]) -> Option<usize> {
    if file.len() < HEADER_LEN {
        return None;
    }
    let n = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
    (n <= MAX_PLAIN).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text-like bytes with many 6-byte repeats, where zstd's minimum
    /// match length changes what it finds.
    fn text(len: usize) -> Vec<u8> {
        let words = ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta "];
        let mut x = 12345u32;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            out.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
            out.extend_from_slice(&x.to_le_bytes()[..1]);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn the_default_level_is_tuned_and_every_level_round_trips() {
        let plain = text(65536);
        let stock = zstd::bulk::compress(&plain, DEFAULT_ZSTD_LEVEL).unwrap();
        let mut tuned = compressor(DEFAULT_ZSTD_LEVEL).unwrap();
        let ours = tuned.compress(&plain).unwrap();
        // The minimum match applies: the frame differs from stock level 1.
        assert_ne!(ours, stock);
        for level in [-3, 1, 3] {
            let (file, codec) = encode(&plain, &mut compressor(level).unwrap());
            assert_eq!(codec, Codec::Zstd, "level {level}");
            assert_eq!(decode(&file).unwrap(), plain, "level {level}");
        }
        // Encoding reuses its scratch buffer: a raw chunk after a
        // compressed one carries nothing of it.
        let noise = noise(65536, 0x9e37_79b9_7f4a_7c15);
        let (a, _) = encode(&plain, &mut tuned);
        let (b, codec) = encode(&noise, &mut tuned);
        assert_eq!(codec, Codec::Raw);
        assert_eq!(b.len(), HEADER_LEN + noise.len());
        assert_eq!(decode(&b).unwrap(), noise);
        assert_eq!(decode(&a).unwrap(), plain);
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    #[test]
    fn random_chunks_skip_zstd_and_anything_it_would_shrink_does_not() {
        for seed in 1..200 {
            assert!(looks_incompressible(&noise(65536, seed)), "seed {seed}");
        }
        let mut tuned = compressor(1).unwrap();
        let random = noise(65536, 7);
        let (file, codec) = encode(&random, &mut tuned);
        assert_eq!(codec, Codec::Raw);
        assert_eq!(decode(&file).unwrap(), random);
        // Half random, half text; random with every fourth byte zero;
        // random bytes drawn from half the byte values: zstd shrinks each
        // by more than 1/32, so each is compressed.
        let mut half = noise(32768, 3);
        half.extend_from_slice(&text(32768));
        let mut sparse = noise(65536, 5);
        sparse.iter_mut().step_by(4).for_each(|b| *b = 0);
        let narrow: Vec<u8> = noise(65536, 9).iter().map(|b| b & 0x7f).collect();
        for (name, plain) in [("half", &half), ("sparse", &sparse), ("narrow", &narrow)] {
            assert!(!looks_incompressible(plain), "{name}");
            let (file, codec) = encode(plain, &mut tuned);
            assert_eq!(codec, Codec::Zstd, "{name}");
            assert_eq!(&decode(&file).unwrap(), plain, "{name}");
        }
        // Chunks too small to sample are always offered to zstd.
        assert!(!looks_incompressible(&noise(4096, 11)));
    }

    #[test]
    fn a_file_left_unsummed_is_summed_by_fill_sum_and_no_other_is_touched() {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        for plain in [text(65536), noise(65536, 5), b"x".to_vec()] {
            let (summed, _) = encode(&plain, &mut z);
            let (mut bare, _) = encode_with(&plain, &mut z, false);
            assert_eq!(bare[16..24], [0; 8]);
            assert_eq!(decode(&bare), Err(ChunkError::Checksum));
            fill_sum(&mut bare);
            assert_eq!(bare, summed);
            // A summed file, even a damaged one, is left for the checks.
            let mut damaged = summed.clone();
            *damaged.last_mut().unwrap() ^= 1;
            let before = damaged.clone();
            fill_sum(&mut damaged);
            assert_eq!(damaged, before);
        }
        fill_sum(&mut [0u8; 10]);
    }

    #[test]
    fn uploads_left_unsummed_are_summed_once_found_sound() {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut v = Verifier::new().unwrap();
        // Raw and compressed, summed and not, sound and not; five items,
        // so both the paired and the single path judge some.
        let plains = [
            noise(65536, 1),
            text(65536),
            noise(65536, 2),
            text(4000),
            b"x".to_vec(),
        ];
        let summed: Vec<Vec<u8>> = plains.iter().map(|p| encode(p, &mut z).0).collect();
        let mut files: Vec<Vec<u8>> = plains
            .iter()
            .enumerate()
            .map(|(i, p)| encode_with(p, &mut z, i % 2 == 1).0)
            .collect();
        // Unsummed, with a flipped payload byte: its digest gives it away.
        let last = files[0].len() - 1;
        files[0][last] ^= 1;
        // Summed, with a wrong sum: refused as before.
        files[3][16] ^= 1;
        let digests: Vec<ChunkDigest> = plains.iter().map(|p| ChunkDigest::of(p)).collect();
        let mut items: Vec<(&mut [u8], ChunkDigest)> = files
            .iter_mut()
            .zip(&digests)
            .map(|(f, d)| (&mut f[..], *d))
            .collect();
        let got = v.check_each_filling(&mut items);
        assert_eq!(got[0], Err(ChunkError::Digest(digests[0])));
        assert_eq!(got[1], Ok(65536));
        assert_eq!(got[2], Ok(65536));
        assert_eq!(got[3], Err(ChunkError::Checksum));
        assert_eq!(got[4], Ok(1));
        // The sound ones are now the files `encode` makes; the refused
        // unsummed one is left unsummed.
        for i in [1, 2, 4] {
            assert_eq!(files[i], summed[i], "file {i}");
            assert!(decode_verified(&files[i], &digests[i]).is_ok());
        }
        assert_eq!(files[0][16..24], [0; 8]);
    }

    #[test]
    fn decode_verified_filling_sums_only_sound_unsummed_files() {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        for plain in [noise(65536, 3), text(65536)] {
            let d = ChunkDigest::of(&plain);
            let summed = encode(&plain, &mut z).0;
            let mut file = encode_with(&plain, &mut z, false).0;
            assert_eq!(decode_verified_filling(&mut file, &d).unwrap(), plain);
            assert_eq!(file, summed);
            // Already summed: checked, left as it is.
            assert_eq!(decode_verified_filling(&mut file, &d).unwrap(), plain);
            assert_eq!(file, summed);
            // Unsummed and damaged: refused by its digest, left unsummed.
            let mut bad = encode_with(&plain, &mut z, false).0;
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(decode_verified_filling(&mut bad, &d).is_err());
            assert_eq!(bad[16..24], [0; 8]);
            // Summed with a wrong sum: refused by the sum.
            let mut wrong = summed.clone();
            wrong[16] ^= 1;
            assert_eq!(
                decode_verified_filling(&mut wrong, &d),
                Err(ChunkError::Checksum)
            );
        }
    }

    #[test]
    fn check_each_judges_every_chunk_like_check() {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut v = Verifier::new().unwrap();
        // Compressed chunks at even places, raw ones (hashed where they
        // lie) at odd places.
        let plains: Vec<Vec<u8>> = (0..9u8)
            .map(|i| match i % 2 {
                0 => vec![i; 65536],
                _ => noise(65536, i as u64),
            })
            .collect();
        let files: Vec<Vec<u8>> = plains.iter().map(|p| encode(p, &mut z).0).collect();
        assert_eq!(files[1].len(), HEADER_LEN + 65536, "stored raw");
        let mut items: Vec<(&[u8], ChunkDigest)> = files
            .iter()
            .zip(&plains)
            .map(|(f, p)| (&f[..], ChunkDigest::of(p)))
            .collect();
        // Wrong digests, damaged files and a short one, at both places of
        // a pair; the odd one out at the end is checked alone.
        items[1].1 = ChunkDigest::of(b"other");
        let mut bad = files[2].clone();
        bad[30] ^= 1;
        items[2].0 = &bad;
        items[5].0 = &files[5][..10];
        let mut bad_raw = files[7].clone();
        bad_raw[HEADER_LEN + 100] ^= 1;
        items[7].0 = &bad_raw;
        let got = v.check_each(&items);
        let want: Vec<_> = items.iter().map(|(f, d)| v.check(f, d)).collect();
        assert_eq!(got, want);
        let ok: Vec<bool> = got.iter().map(Result::is_ok).collect();
        assert_eq!(
            ok,
            [true, false, false, true, true, false, true, false, true]
        );
        assert_eq!(got[0], Ok(65536));
        assert_eq!(got[3], Ok(65536));
        assert_eq!(got[1], Err(ChunkError::Digest(items[1].1)));
        assert_eq!(got[7], Err(ChunkError::Checksum));
    }

    #[test]
    fn the_verifier_agrees_with_decode_verified() {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut v = Verifier::new().unwrap();
        for data in [&b"hello hello hello hello"[..], &[0u8; 70000][..], b"x"] {
            let (file, _) = encode(data, &mut z);
            let d = ChunkDigest::of(data);
            v.check(&file, &d).unwrap();
            assert!(v.check(&file, &ChunkDigest::of(b"other")).is_err());
            let mut bad = file.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(v.check(&bad, &d).is_err());
            assert!(v.check(&file[..10], &d).is_err());
        }
    }

    fn comp() -> zstd::bulk::Compressor<'static> {
        zstd::bulk::Compressor::new(3).unwrap()
    }

    #[test]
    fn golden_raw_chunk() {
        // Incompressible 4 bytes: stored raw.
        let (f, codec) = encode(b"\x01\x02\x03\x04", &mut comp());
        assert_eq!(codec, Codec::Raw);
        assert_eq!(&f[..16], b"NBCHUNK1\x01\x00\x00\x00\x04\x00\x00\x00");
        assert_eq!(&f[16..24], &xxh3_64(b"\x01\x02\x03\x04").to_le_bytes());
        assert_eq!(&f[24..], b"\x01\x02\x03\x04");
        assert_eq!(decode(&f).unwrap(), b"\x01\x02\x03\x04");
    }

    #[test]
    fn compressible_chunk_is_zstd_and_verified() {
        let plain = b"hello hello hello hello ".repeat(1000);
        let (f, codec) = encode(&plain, &mut comp());
        assert_eq!(codec, Codec::Zstd);
        assert_eq!(f[9], 1);
        assert!(f.len() < plain.len() / 10);
        let d = ChunkDigest::of(&plain);
        assert_eq!(decode_verified(&f, &d).unwrap(), plain);
        assert_eq!(
            decode_verified(&f, &ChunkDigest::of(b"other")),
            Err(ChunkError::Digest(ChunkDigest::of(b"other")))
        );
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&bad), Err(ChunkError::Checksum));
    }

    proptest! {
        #[test]
        fn decode_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_damaged_chunks(plain in proptest::collection::vec(0u8..4, 0..3000), flip in any::<usize>(), val in any::<u8>()) {
            let (mut f, _) = encode(&plain, &mut comp());
            let i = flip % f.len();
            f[i] = val;
            if let Ok(p) = decode_verified(&f, &ChunkDigest::of(&plain)) {
                prop_assert_eq!(p, plain);
            }
        }
    }
}
