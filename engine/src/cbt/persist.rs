//! The CBT bitmap on disk, and when to trust it.
//!
//! Layout (all integers little-endian), frozen by a golden test:
//!
//! ```text
//! 0    8  magic "NBCBTMAP"
//! 8    4  format version (1)
//! 12   4  flags: bit 0 = clean shutdown, bit 1 = untrusted
//! 16   8  granularity in bytes
//! 24   8  image size in bytes
//! 32   8  number of u64 words that follow the header
//! 40   1  boot id length (≤ 64), 41..105 boot id bytes
//! 105  1  base length (≤ 120), 106..226 base snapshot id: the snapshot
//!         whose checkpoint these bits start from (empty: none)
//! 226  2  reason length (≤ 276), 228..504 why the bitmap is untrusted
//! 504  8  xxh3-64 of bytes 0..504
//! 512  …  the bitmap words, one bit per block, least significant bit first
//! ```
//!
//! While the proxy runs, the header says "not clean" and every word that
//! gains a dirty bit is written in place with `pwrite` *before* the guest's
//! write is issued. No fsync: the page cache keeps those words across a
//! crash of the process (kill -9) on the same boot, which is all the rule
//! asks. A clean shutdown rewrites the whole file through
//! [`crate::fsutil::write_atomic`] with the clean flag set. At start-up, the
//! bitmap is trusted if the boot id is unchanged (the page cache survived)
//! or if the last shutdown was clean; otherwise the host crashed with
//! writes possibly unrecorded, and the bitmap is untrusted until the next
//! full read of the disk (or an operator reset).

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::{CbtError, DirtyBitmap, Granularity};
use crate::fsutil;

const MAGIC: &[u8; 8] = b"NBCBTMAP";
const VERSION: u32 = 1;
/// Size of the header that precedes the words.
pub const HEADER_LEN: usize = 512;
const FLAG_CLEAN: u32 = 1;
const FLAG_UNTRUSTED: u32 = 2;
const BOOT_ID_MAX: usize = 64;
const BASE_MAX: usize = 120;
const REASON_MAX: usize = 276;

/// Whether the bits can be relied on, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum Trust {
    /// Every write since the last reset or checkpoint is recorded.
    Trusted,
    /// Writes may be missing; the next backup must read the whole disk.
    Untrusted(String),
}

impl Trust {
    /// Whether the bitmap is trusted.
    pub fn is_trusted(&self) -> bool {
        matches!(self, Trust::Trusted)
    }
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Granularity in bytes.
    pub granularity: u64,
    /// Image size.
    pub size: u64,
    /// Boot id of the host that last wrote the file.
    pub boot_id: String,
    /// The last writer shut down cleanly.
    pub clean: bool,
    /// Why the bits are not trusted, if they are not.
    pub untrusted: Option<String>,
    /// The snapshot whose checkpoint started these bits: every write since
    /// that checkpoint is in the bitmap. `None` for a new or reset bitmap.
    pub base: Option<String>,
}

/// Encodes a complete bitmap file.
pub fn encode(header: &Header, bitmap: &DirtyBitmap) -> Vec<u8> {
    let words = bitmap.words();
    let mut out = vec![0u8; HEADER_LEN + words.len() * 8];
    out[0..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let mut flags = 0;
    if header.clean {
        flags |= FLAG_CLEAN;
    }
    if header.untrusted.is_some() {
        flags |= FLAG_UNTRUSTED;
    }
    out[12..16].copy_from_slice(&flags.to_le_bytes());
    out[16..24].copy_from_slice(&header.granularity.to_le_bytes());
    out[24..32].copy_from_slice(&header.size.to_le_bytes());
    out[32..40].copy_from_slice(&(words.len() as u64).to_le_bytes());
    let boot = truncate_utf8(&header.boot_id, BOOT_ID_MAX);
    out[40] = boot.len() as u8;
    out[41..41 + boot.len()].copy_from_slice(boot.as_bytes());
    // A base that does not fit is dropped rather than cut: a cut id would
    // name another snapshot.
    let base = header
        .base
        .as_deref()
        .filter(|b| b.len() <= BASE_MAX)
        .unwrap_or("");
    out[105] = base.len() as u8;
    out[106..106 + base.len()].copy_from_slice(base.as_bytes());
    let reason = truncate_utf8(header.untrusted.as_deref().unwrap_or(""), REASON_MAX);
    out[226..228].copy_from_slice(&(reason.len() as u16).to_le_bytes());
    out[228..228 + reason.len()].copy_from_slice(reason.as_bytes());
    let sum = xxh3_64(&out[..504]);
    out[504..512].copy_from_slice(&sum.to_le_bytes());
    for (i, w) in words.iter().enumerate() {
        out[HEADER_LEN + i * 8..HEADER_LEN + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Decodes a bitmap file. Any bytes give a value or an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<(Header, DirtyBitmap), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "file is {} bytes, shorter than its header",
            bytes.len()
        ));
    }
    if &bytes[0..8] != MAGIC {
        return Err("not a novabackup CBT bitmap (bad magic)".into());
    }
    let sum = u64::from_le_bytes(bytes[504..512].try_into().unwrap());
    if xxh3_64(&bytes[..504]) != sum {
        return Err("header checksum mismatch".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let version = u32_at(8);
    if version != VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let flags = u32_at(12);
    let granularity = Granularity::new(u64_at(16)).map_err(|e| e.to_string())?;
    let size = u64_at(24);
    let nwords = u64_at(32);
    let boot_len = bytes[40] as usize;
    let base_len = bytes[105] as usize;
    let reason_len = u16::from_le_bytes([bytes[226], bytes[227]]) as usize;
    if boot_len > BOOT_ID_MAX || base_len > BASE_MAX || reason_len > REASON_MAX {
        return Err("header string too long".into());
    }
    let boot_id = String::from_utf8_lossy(&bytes[41..41 + boot_len]).into_owned();
    let base = String::from_utf8_lossy(&bytes[106..106 + base_len]).into_owned();
    let reason = String::from_utf8_lossy(&bytes[228..228 + reason_len]).into_owned();
    let body = &bytes[HEADER_LEN..];
    if Some(body.len() as u64) != nwords.checked_mul(8) {
        return Err(format!(
            "file holds {} bytes of bits, header says {nwords} words",
            body.len()
        ));
    }
    let words = body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let bitmap = DirtyBitmap::from_words(size, granularity, words)
        .ok_or_else(|| "word count does not match the image size".to_string())?;
    let header = Header {
        granularity: granularity.bytes(),
        size,
        boot_id,
        clean: flags & FLAG_CLEAN != 0,
        untrusted: (flags & FLAG_UNTRUSTED != 0).then_some(reason),
        base: (!base.is_empty()).then_some(base),
    };
    Ok((header, bitmap))
}

/// Decides whether a bitmap read at start-up can be trusted (module doc).
pub fn decide_trust(header: &Header, boot_id: &str) -> Trust {
    if let Some(reason) = &header.untrusted {
        return Trust::Untrusted(reason.clone());
    }
    if header.boot_id == boot_id || header.clean {
        Trust::Trusted
    } else {
        Trust::Untrusted(format!(
            "the host restarted without a clean shutdown of the agent (boot id {} is now {}), \
             so writes may have gone unrecorded; the next backup reads the whole disk",
            header.boot_id, boot_id
        ))
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bitmap file held open for in-place updates while the proxy runs.
#[derive(Debug)]
pub struct BitmapFile {
    path: PathBuf,
    file: File,
    boot_id: String,
}

/// What [`BitmapFile::open`] found.
#[derive(Debug)]
pub struct Opened {
    /// The file, now marked "running" on disk.
    pub file: BitmapFile,
    /// The bits read back (all clean for a new file).
    pub bitmap: DirtyBitmap,
    /// Whether the bits can be trusted.
    pub trust: Trust,
    /// The snapshot the bits start from (see [`Header::base`]).
    pub base: Option<String>,
}

impl BitmapFile {
    /// Opens the bitmap at `path` for an image of `size` bytes, or creates
    /// it. A file for another size or granularity, or a damaged one, is
    /// replaced by an untrusted all-dirty bitmap, and the reason says why.
    pub fn open(
        path: &Path,
        size: u64,
        granularity: Granularity,
        boot_id: &str,
    ) -> Result<Opened, CbtError> {
        let io = |source| CbtError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut base = None;
        let (bitmap, trust) = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (DirtyBitmap::new(size, granularity), Trust::Trusted)
            }
            Err(e) => return Err(io(e)),
            Ok(bytes) => match decode(&bytes) {
                Ok((h, b)) if h.size == size && h.granularity == granularity.bytes() => {
                    let trust = decide_trust(&h, boot_id);
                    base = h.base;
                    (b, trust)
                }
                Ok((h, _)) => untrusted(
                    size,
                    granularity,
                    format!(
                        "the image is now {size} bytes at granularity {} (the bitmap was for {} bytes at {}); \
                         the next backup reads the whole disk",
                        granularity.bytes(),
                        h.size,
                        h.granularity
                    ),
                ),
                Err(why) => untrusted(
                    size,
                    granularity,
                    format!("the bitmap file was damaged ({why}); the next backup reads the whole disk"),
                ),
            },
        };
        let mut file = BitmapFile {
            path: path.to_path_buf(),
            // Placeholder until the first rewrite opens the real file.
            file: File::open("/dev/null").map_err(io)?,
            boot_id: boot_id.to_string(),
        };
        file.rewrite(&bitmap, &trust, base.as_deref(), false)?;
        Ok(Opened {
            file,
            bitmap,
            trust,
            base,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes back the given words of `bitmap` in place (see module doc).
    pub fn write_words(&self, bitmap: &DirtyBitmap, words: Range<usize>) -> Result<(), CbtError> {
        if words.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(words.len() * 8);
        for w in &bitmap.words()[words.clone()] {
            buf.extend_from_slice(&w.to_le_bytes());
        }
        self.file
            .write_all_at(&buf, (HEADER_LEN + words.start * 8) as u64)
            .map_err(|source| CbtError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the whole file atomically; `clean` marks a clean shutdown.
    pub fn rewrite(
        &mut self,
        bitmap: &DirtyBitmap,
        trust: &Trust,
        base: Option<&str>,
        clean: bool,
    ) -> Result<(), CbtError> {
        let header = Header {
            granularity: bitmap.granularity().bytes(),
            size: bitmap.size(),
            boot_id: self.boot_id.clone(),
            clean,
            untrusted: match trust {
                Trust::Trusted => None,
                Trust::Untrusted(r) => Some(r.clone()),
            },
            base: base.map(str::to_string),
        };
        let io = |source| CbtError::Io {
            path: self.path.clone(),
            source,
        };
        fsutil::write_atomic(&self.path, &encode(&header, bitmap), 0o600).map_err(io)?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        Ok(())
    }
}

fn untrusted(size: u64, g: Granularity, reason: String) -> (DirtyBitmap, Trust) {
    let mut b = DirtyBitmap::new(size, g);
    b.fill();
    (b, Trust::Untrusted(reason))
}

/// Saves a frozen (checkpoint) bitmap durably, so that a crash during a
/// backup can merge it back at the next start.
pub fn save_frozen(path: &Path, bitmap: &DirtyBitmap, boot_id: &str) -> Result<(), CbtError> {
    let header = Header {
        granularity: bitmap.granularity().bytes(),
        size: bitmap.size(),
        boot_id: boot_id.to_string(),
        clean: true,
        untrusted: None,
        base: None,
    };
    fsutil::write_atomic(path, &encode(&header, bitmap), 0o600).map_err(|source| CbtError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a frozen bitmap left by an unfinished backup, if any.
pub fn load_frozen(path: &Path) -> Result<Option<DirtyBitmap>, CbtError> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CbtError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Ok(bytes) => decode(&bytes)
            .map(|(_, b)| Some(b))
            .map_err(|why| CbtError::Corrupt {
                path: path.to_path_buf(),
                why,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g() -> Granularity {
        Granularity::new(4096).unwrap()
    }

    #[test]
    fn golden_layout() {
        let mut b = DirtyBitmap::new(70 * 4096, g());
        b.mark(0, 1);
        b.mark(65 * 4096, 1);
        let h = Header {
            granularity: 4096,
            size: 70 * 4096,
            boot_id: "boot-a".into(),
            clean: true,
            untrusted: None,
            base: Some("vm@20261126T090000Z".into()),
        };
        let bytes = encode(&h, &b);
        assert_eq!(bytes.len(), 512 + 16);
        assert_eq!(&bytes[0..8], b"NBCBTMAP");
        assert_eq!(&bytes[8..16], &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&bytes[16..24], &4096u64.to_le_bytes());
        assert_eq!(&bytes[24..32], &(70u64 * 4096).to_le_bytes());
        assert_eq!(&bytes[32..40], &2u64.to_le_bytes());
        assert_eq!(&bytes[40..47], b"\x06boot-a");
        assert_eq!(&bytes[105..125], b"\x13vm@20261126T090000Z");
        assert_eq!(
            &bytes[512..528],
            &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        // Pin the checksum so a silent layout change fails here.
        assert_eq!(
            u64::from_le_bytes(bytes[504..512].try_into().unwrap()),
            xxh3_64(&bytes[..504])
        );
        let (h2, b2) = decode(&bytes).unwrap();
        assert_eq!(h2, h);
        assert_eq!(b2, b);
    }

    #[test]
    fn trust_rules() {
        let h = |boot: &str, clean| Header {
            granularity: 4096,
            size: 4096,
            boot_id: boot.into(),
            clean,
            untrusted: None,
            base: None,
        };
        assert!(
            decide_trust(&h("a", false), "a").is_trusted(),
            "kill -9 on the same boot"
        );
        assert!(
            decide_trust(&h("a", true), "b").is_trusted(),
            "clean shutdown, then reboot"
        );
        assert!(
            !decide_trust(&h("a", false), "b").is_trusted(),
            "host crash"
        );
        let mut u = h("a", true);
        u.untrusted = Some("x".into());
        assert_eq!(decide_trust(&u, "a"), Trust::Untrusted("x".into()));
    }

    #[test]
    fn open_survives_unclean_stop_on_same_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.cbt");
        let o = BitmapFile::open(&p, 1 << 20, g(), "boot-1").unwrap();
        let mut b = o.bitmap;
        let w = b.mark(8192, 100);
        o.file.write_words(&b, w).unwrap();
        drop(o.file); // "kill -9": no clean rewrite
        let again = BitmapFile::open(&p, 1 << 20, g(), "boot-1").unwrap();
        assert!(again.trust.is_trusted());
        assert!(again.bitmap.is_dirty(2));
        let after_crash = BitmapFile::open(&p, 1 << 20, g(), "boot-2").unwrap();
        assert!(!after_crash.trust.is_trusted());
        // Untrusted sticks across further restarts until reset.
        let mut f = BitmapFile::open(&p, 1 << 20, g(), "boot-2").unwrap();
        assert!(!f.trust.is_trusted());
        f.file
            .rewrite(&f.bitmap, &Trust::Trusted, None, true)
            .unwrap();
        let clean = BitmapFile::open(&p, 1 << 20, g(), "boot-3").unwrap();
        assert!(clean.trust.is_trusted());
    }

    #[test]
    fn size_change_and_damage_are_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.cbt");
        drop(BitmapFile::open(&p, 1 << 20, g(), "b").unwrap());
        let o = BitmapFile::open(&p, 2 << 20, g(), "b").unwrap();
        assert!(!o.trust.is_trusted());
        assert_eq!(o.bitmap.count_dirty(), o.bitmap.blocks());
        std::fs::write(&p, b"garbage").unwrap();
        let o = BitmapFile::open(&p, 2 << 20, g(), "b").unwrap();
        match o.trust {
            Trust::Untrusted(r) => assert!(r.contains("damaged"), "{r}"),
            Trust::Trusted => panic!("damaged file trusted"),
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_valid_header_with_garbage(tail in proptest::collection::vec(any::<u8>(), 0..100), flip in 0usize..512) {
            let b = DirtyBitmap::new(4096 * 100, g());
            let h = Header { granularity: 4096, size: 4096 * 100, boot_id: "x".into(), clean: false, untrusted: None, base: None };
            let mut bytes = encode(&h, &b);
            bytes[flip] ^= 0xff;
            bytes.extend(tail);
            let _ = decode(&bytes);
        }
    }
}
