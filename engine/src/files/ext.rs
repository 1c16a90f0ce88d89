//! ext2/3/4 through the `ext4` crate, read-only over a [`Volume`], with
//! what the crate leaves out done here:
//!
//! - Directories are parsed here: the crate's reader stops at the end of a
//!   directory's first block when metadata checksums are on.
//! - Inline data (small files, folders and links kept inside the inode, in
//!   `i_block` and the `system.data` attribute). The crate refuses a file
//!   system with the feature, so it is given a view of the superblock with
//!   the feature bit cleared (and the superblock checksum made again).
//! - Inodes are located and parsed here ([`InodeTable`]); the crate only
//!   reads the blocks of files, folders and links that are not inline.

use std::io::{self, Read, Write};
use std::sync::Arc;

use positioned_io::ReadAt;

use super::{header, read_err, tar_err, FileEntry, FilesError, TarStats, Volume};

/// Where the superblock sits in its volume, and its size.
const SB_AT: u64 = 1024;
const SB_LEN: usize = 1024;
/// `s_feature_incompat`: data kept inside inodes.
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
/// `s_feature_incompat`: 64-bit block numbers and group descriptors.
const INCOMPAT_64BIT: u32 = 0x80;
/// `s_feature_ro_compat`: metadata checksums (the superblock's included).
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// `i_flags`: this inode's data is inline.
const INODE_INLINE_DATA: u32 = 0x1000_0000;
/// `i_block`: 60 bytes at 0x28 of an inode.
const I_BLOCK: std::ops::Range<usize> = 0x28..0x64;

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// crc32c as ext4 stores it: the register after the data, not inverted.
fn ext4_crc32c(data: &[u8]) -> u32 {
    !crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(data)
}

/// An inode's metadata and, when inline, its data.
pub(super) struct Node {
    number: u32,
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    /// `i_block`: a fast symlink's target lives here.
    block: [u8; 60],
    /// `i_block` followed by the `system.data` attribute, for an inode
    /// whose data is inline.
    inline: Option<Vec<u8>>,
}

impl Node {
    fn kind(&self) -> &'static str {
        match self.mode & 0xF000 {
            0x4000 => "dir",
            0x8000 => "file",
            0xA000 => "symlink",
            0x2000 => "char",
            0x6000 => "block",
            0x1000 => "fifo",
            0xC000 => "socket",
            _ => "unknown",
        }
    }
}

/// An ext2/3/4 file system.
pub(super) struct Ext<'a> {
    sb: ext4::SuperBlock<Volume<'a>>,
    table: InodeTable<'a>,
}

impl<'a> Ext<'a> {
    pub(super) fn open(vol: Volume<'a>) -> Result<Ext<'a>, FilesError> {
        let mut raw = vec![0u8; SB_LEN];
        vol.read_exact_at(SB_AT, &mut raw).map_err(read_err)?;
        let table = InodeTable::new(&raw, vol.clone())?;
        let view = if le32(&raw, 0x60) & INCOMPAT_INLINE_DATA != 0 {
            vol.with_superblock(hide_inline_data(raw))
        } else {
            vol
        };
        let sb = ext4::SuperBlock::new(view).map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("unsupported") {
                FilesError::Unsupported(format!("this ext4 uses a feature not read yet ({text})"))
            } else {
                FilesError::Read(text)
            }
        })?;
        Ok(Ext { sb, table })
    }

    /// The whole data of a node kept in blocks, read by the crate.
    fn blocks(&self, node: &Node) -> Result<impl Read + '_, FilesError> {
        let inode = self.sb.load_inode(node.number).map_err(read_err)?;
        let reader = self.sb.open(&inode).map_err(read_err)?;
        Ok(reader.take(node.size))
    }

    fn entries(&self, node: &Node) -> Result<Vec<(u32, String)>, FilesError> {
        if let Some(data) = &node.inline {
            return inline_dirents(node.number, data);
        }
        let mut data = Vec::new();
        self.blocks(node)?
            .read_to_end(&mut data)
            .map_err(read_err)?;
        dirents(&data)
    }

    pub(super) fn resolve(&self, path: &str) -> Result<Node, FilesError> {
        let mut cur = self.table.node(2)?;
        let mut walked = String::new();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            walked.push('/');
            walked.push_str(part);
            if cur.kind() != "dir" {
                return Err(FilesError::NotADirectory(walked));
            }
            let (ino, _) = self
                .entries(&cur)?
                .into_iter()
                .find(|(_, n)| n == part)
                .ok_or_else(|| FilesError::NotFound(walked.clone()))?;
            cur = self.table.node(ino)?;
        }
        Ok(cur)
    }

    pub(super) fn list(&self, path: &str) -> Result<Vec<FileEntry>, FilesError> {
        let dir = self.resolve(path)?;
        if dir.kind() != "dir" {
            return Err(FilesError::NotADirectory(path.to_string()));
        }
        let mut out = Vec::new();
        for (ino, name) in self.entries(&dir)? {
            if name != "." && name != ".." {
                out.push(self.entry(name, &self.table.node(ino)?)?);
            }
        }
        Ok(out)
    }

    /// Where a symbolic link points: inline data, `i_block` for a short
    /// ("fast") link, or its data block.
    fn link_target(&self, node: &Node) -> Result<String, FilesError> {
        let size = usize::try_from(node.size).unwrap_or(usize::MAX);
        let bytes = match &node.inline {
            Some(d) => d[..size.min(d.len())].to_vec(),
            None if size < node.block.len() => node.block[..size].to_vec(),
            None => {
                let mut d = Vec::new();
                self.blocks(node)?.read_to_end(&mut d).map_err(read_err)?;
                d
            }
        };
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn entry(&self, name: String, node: &Node) -> Result<FileEntry, FilesError> {
        let target = match node.kind() {
            "symlink" => Some(self.link_target(node)?),
            _ => None,
        };
        Ok(FileEntry {
            name,
            kind: node.kind().into(),
            mode: u32::from(node.mode & 0o7777),
            uid: node.uid,
            gid: node.gid,
            size: node.size,
            mtime: node.mtime,
            target,
        })
    }

    pub(super) fn add_tree<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        name: &str,
        node: Node,
        stats: &mut TarStats,
    ) -> Result<(), FilesError> {
        let e = self.entry(name.to_string(), &node)?;
        let mut h = header(&e);
        match e.kind.as_str() {
            "file" => {
                match &node.inline {
                    Some(data) => {
                        if (data.len() as u64) < e.size {
                            return Err(FilesError::Read(format!(
                                "{name}: its inline data holds {} of its {} bytes",
                                data.len(),
                                e.size
                            )));
                        }
                        tar.append_data(&mut h, name, &data[..e.size as usize])
                            .map_err(tar_err)?;
                    }
                    None => {
                        let data = self.blocks(&node)?;
                        tar.append_data(&mut h, name, data).map_err(tar_err)?;
                    }
                }
                stats.files += 1;
                stats.bytes += e.size;
            }
            "symlink" => {
                let target = e.target.clone().unwrap_or_default();
                tar.append_link(&mut h, name, target).map_err(tar_err)?;
                stats.symlinks += 1;
            }
            "dir" => {
                tar.append_data(&mut h, name, io::empty())
                    .map_err(tar_err)?;
                stats.dirs += 1;
                for (ino, child) in self.entries(&node)? {
                    if child == "." || child == ".." {
                        continue;
                    }
                    let c = self.table.node(ino)?;
                    self.add_tree(tar, &format!("{name}/{child}"), c, stats)?;
                }
            }
            _ => stats.skipped += 1,
        }
        Ok(())
    }
}

/// The superblock with the inline-data feature bit cleared, and its
/// checksum made again when it has one, for the crate's eyes only.
fn hide_inline_data(mut sb: Vec<u8>) -> Arc<[u8]> {
    let incompat = le32(&sb, 0x60) & !INCOMPAT_INLINE_DATA;
    sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
    if le32(&sb, 0x64) & RO_COMPAT_METADATA_CSUM != 0 {
        let sum = ext4_crc32c(&sb[..SB_LEN - 4]);
        sb[SB_LEN - 4..].copy_from_slice(&sum.to_le_bytes());
    }
    sb.into()
}

/// Finds and parses inodes. The crate's own inode parser is not used for
/// metadata: it reads past the end of an inode's attribute list when the
/// attribute space is full, which inline data always makes it.
struct InodeTable<'a> {
    vol: Volume<'a>,
    block_size: u64,
    inodes_count: u32,
    inodes_per_group: u32,
    inode_size: u64,
    /// Byte offset of the group descriptor table.
    gdt: u64,
    desc_size: u64,
}

impl<'a> InodeTable<'a> {
    fn new(sb: &[u8], vol: Volume<'a>) -> Result<InodeTable<'a>, FilesError> {
        let bad = |what: &str| FilesError::Read(format!("the superblock's {what} is damaged"));
        if le16(sb, 0x38) != 0xEF53 {
            return Err(FilesError::Read("no ext2/3/4 superblock there".into()));
        }
        let log = le32(sb, 0x18);
        if log > 6 {
            return Err(bad("block size"));
        }
        let block_size = 1024u64 << log;
        let desc_size = if le32(sb, 0x60) & INCOMPAT_64BIT != 0 {
            le16(sb, 0xFE)
        } else {
            32
        };
        // Revision 0 has 128-byte inodes and no size field.
        let inode_size = if le32(sb, 0x4C) == 0 {
            128
        } else {
            le16(sb, 0x58)
        };
        let inodes_per_group = le32(sb, 0x28);
        if desc_size < 32 {
            return Err(bad("group descriptor size"));
        }
        if inode_size < 128 || inode_size > block_size {
            return Err(bad("inode size"));
        }
        if inodes_per_group == 0 {
            return Err(bad("inodes per group"));
        }
        Ok(InodeTable {
            vol,
            block_size,
            inodes_count: le32(sb, 0x00),
            inodes_per_group,
            inode_size,
            gdt: (u64::from(le32(sb, 0x14)) + 1) * block_size,
            desc_size,
        })
    }

    /// The on-disk bytes of inode `ino`.
    fn raw(&self, ino: u32) -> Result<Vec<u8>, FilesError> {
        if ino == 0 || ino > self.inodes_count {
            return Err(FilesError::Read(format!("inode {ino} is out of range")));
        }
        let (group, index) = (
            u64::from((ino - 1) / self.inodes_per_group),
            u64::from((ino - 1) % self.inodes_per_group),
        );
        let mut desc = vec![0u8; self.desc_size as usize];
        self.vol
            .read_exact_at(self.gdt + group * self.desc_size, &mut desc)
            .map_err(read_err)?;
        let mut table = u64::from(le32(&desc, 0x08));
        if self.desc_size >= 64 {
            table |= u64::from(le32(&desc, 0x28)) << 32;
        }
        let at = table
            .checked_mul(self.block_size)
            .and_then(|t| t.checked_add(index * self.inode_size))
            .ok_or_else(|| FilesError::Read(format!("inode {ino}'s table is out of range")))?;
        let mut raw = vec![0u8; self.inode_size as usize];
        self.vol.read_exact_at(at, &mut raw).map_err(read_err)?;
        Ok(raw)
    }

    fn node(&self, ino: u32) -> Result<Node, FilesError> {
        let raw = self.raw(ino)?;
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[I_BLOCK]);
        let inline = if le32(&raw, 0x20) & INODE_INLINE_DATA != 0 {
            let mut data = block.to_vec();
            data.extend_from_slice(system_data(&raw).map_err(|e| {
                FilesError::Read(format!("inode {ino}'s attributes are damaged: {e}"))
            })?);
            Some(data)
        } else {
            None
        };
        Ok(Node {
            number: ino,
            mode: le16(&raw, 0x00) as u16,
            uid: (le16(&raw, 0x02) | le16(&raw, 0x78) << 16) as u32,
            gid: (le16(&raw, 0x18) | le16(&raw, 0x7A) << 16) as u32,
            size: u64::from(le32(&raw, 0x04)) | u64::from(le32(&raw, 0x6C)) << 32,
            mtime: i64::from(le32(&raw, 0x10)),
            block,
            inline,
        })
    }
}

/// The value of the `system.data` attribute among an inode's in-inode
/// attributes (empty when it has none): the rest of its inline data.
fn system_data(raw: &[u8]) -> Result<&[u8], &'static str> {
    /// Index of the "system." name prefix.
    const SYSTEM: u8 = 7;
    const MAGIC: u32 = 0xEA02_0000;
    if raw.len() <= 0x82 {
        return Ok(&[]);
    }
    let start = 128 + le16(raw, 0x80) as usize;
    if start + 4 > raw.len() || le32(raw, start) != MAGIC {
        return Ok(&[]);
    }
    // Value offsets count from the first entry, after the magic number.
    let area = &raw[start + 4..];
    let mut at = 0;
    // An entry list ends with four zero bytes; what follows may be values.
    while at + 4 <= area.len() && le32(area, at) != 0 {
        if at + 16 > area.len() {
            return Err("an entry runs past the inode");
        }
        let name_len = usize::from(area[at]);
        let name_end = at + 16 + name_len;
        if name_end > area.len() {
            return Err("a name runs past the inode");
        }
        if area[at + 1] == SYSTEM && &area[at + 16..name_end] == b"data" {
            let off = le16(area, at + 2) as usize;
            let len = le32(area, at + 8) as usize;
            return area
                .get(off..off.saturating_add(len))
                .ok_or("the inline data runs past the inode");
        }
        at = (name_end + 3) & !3;
    }
    Ok(&[])
}

/// The entries of an inline folder: its parent's inode number first, then
/// records filling the rest of `i_block`, then records filling the
/// `system.data` attribute.
fn inline_dirents(me: u32, data: &[u8]) -> Result<Vec<(u32, String)>, FilesError> {
    let block = I_BLOCK.len();
    if data.len() < block {
        return Err(FilesError::Read(format!(
            "inline folder {me} is shorter than its inode's block area"
        )));
    }
    let mut out = vec![(me, ".".to_string()), (le32(data, 0), "..".to_string())];
    out.extend(dirents(&data[4..block])?);
    out.extend(dirents(&data[block..])?);
    Ok(out)
}

/// The (inode, name) entries of an ext directory's data, every block of
/// it. Unused records (inode 0) are skipped: deleted entries, the
/// checksum tail of each block, and the interior nodes of a hash-indexed
/// directory, whose index hides behind an empty record; its leaves are
/// ordinary blocks.
fn dirents(data: &[u8]) -> Result<Vec<(u32, String)>, FilesError> {
    let damaged =
        |at: usize| FilesError::Read(format!("a directory record at byte {at} is damaged"));
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= data.len() {
        let ino = le32(data, at);
        let rec_len = le16(data, at + 4) as usize;
        let name_len = usize::from(data[at + 6]);
        if rec_len < 8 || at + rec_len > data.len() || 8 + name_len > rec_len {
            return Err(damaged(at));
        }
        if ino != 0 && name_len > 0 {
            let name = String::from_utf8_lossy(&data[at + 8..at + 8 + name_len]).into_owned();
            out.push((ino, name));
        }
        at += rec_len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ino: u32, name: &str, rec_len: u16) -> Vec<u8> {
        let mut v = ino.to_le_bytes().to_vec();
        v.extend(rec_len.to_le_bytes());
        v.push(name.len() as u8);
        v.push(1);
        v.extend(name.as_bytes());
        v.resize(usize::from(rec_len), 0);
        v
    }

    #[test]
    fn dirents_cross_blocks_and_skip_unused_records() {
        // Two 128-byte blocks: ".", "..", "a", a deleted record, "b" and
        // the checksum tail; then "c" alone.
        let mut tail = rec(0, "", 12);
        tail[7] = 0xDE;
        let block1 = [
            rec(2, ".", 12),
            rec(2, "..", 12),
            rec(12, "a", 16),
            rec(0, "", 24),
            rec(13, "b", 52),
            tail,
        ]
        .concat();
        assert_eq!(block1.len(), 128);
        let data = [block1, rec(14, "c", 128)].concat();
        let names: Vec<(u32, String)> = dirents(&data).unwrap();
        let want: Vec<(u32, String)> = [(2, "."), (2, ".."), (12, "a"), (13, "b"), (14, "c")]
            .iter()
            .map(|(i, n)| (*i, n.to_string()))
            .collect();
        assert_eq!(names, want);
    }

    #[test]
    fn a_bad_record_length_is_an_error_not_a_loop() {
        let mut d = rec(5, "x", 12);
        d[4] = 0;
        d[5] = 0;
        assert!(dirents(&d).is_err());
        let d = rec(5, "x", 200);
        assert!(dirents(&d[..100]).is_err());
    }

    #[test]
    fn an_inline_folder_reads_its_block_area_then_its_attribute() {
        // Parent 2, then "a" filling the 56 bytes left of i_block; then
        // "b" and "c" in the attribute.
        let data = [
            2u32.to_le_bytes().to_vec(),
            rec(12, "a", 56),
            rec(13, "b", 16),
            rec(14, "c", 24),
        ]
        .concat();
        let got = inline_dirents(11, &data).unwrap();
        let want: Vec<(u32, String)> = [(11, "."), (2, ".."), (12, "a"), (13, "b"), (14, "c")]
            .iter()
            .map(|(i, n)| (*i, n.to_string()))
            .collect();
        assert_eq!(got, want);
        assert!(inline_dirents(11, &data[..30]).is_err());
    }

    #[test]
    fn the_superblock_checksum_is_made_again_after_the_bit_is_cleared() {
        // A superblock with metadata checksums and inline data, its sum
        // made the way e2fsprogs makes it (crc32c with seed ~0, stored
        // without the final inversion).
        let mut sb = vec![0u8; SB_LEN];
        sb[0x60..0x64].copy_from_slice(&(INCOMPAT_INLINE_DATA | 0x2c2).to_le_bytes());
        sb[0x64..0x68].copy_from_slice(&RO_COMPAT_METADATA_CSUM.to_le_bytes());
        let hidden = hide_inline_data(sb);
        assert_eq!(le32(&hidden, 0x60), 0x2c2);
        // The known crc32c check value: "123456789" gives 0xE3069283.
        assert_eq!(ext4_crc32c(b"123456789"), !0xE306_9283);
        assert_eq!(
            le32(&hidden, SB_LEN - 4),
            ext4_crc32c(&hidden[..SB_LEN - 4])
        );
    }

    #[test]
    fn system_data_is_found_when_its_value_follows_the_list_end_at_once() {
        // A 256-byte inode, 32 extra bytes: the attribute area is 96 bytes;
        // one entry "system.data" (20 bytes), the four-byte end, then its
        // 68-byte value, as the kernel lays out a full inline folder.
        let mut raw = vec![0u8; 256];
        raw[0x80] = 32;
        raw[160..164].copy_from_slice(&0xEA02_0000u32.to_le_bytes());
        let area = 164;
        raw[area] = 4;
        raw[area + 1] = 7;
        raw[area + 2..area + 4].copy_from_slice(&24u16.to_le_bytes());
        raw[area + 8..area + 12].copy_from_slice(&68u32.to_le_bytes());
        raw[area + 16..area + 20].copy_from_slice(b"data");
        raw[area + 24..].fill(0xAB);
        raw[area + 24] = 1;
        let v = system_data(&raw).unwrap();
        assert_eq!(v.len(), 68);
        assert_eq!(v[0], 1);
        // A value said to run past the inode is an error, not a panic.
        raw[area + 8..area + 12].copy_from_slice(&69u32.to_le_bytes());
        assert!(system_data(&raw).is_err());
        raw[area + 8..area + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(system_data(&raw).is_err());
    }
}
