//! What a disk image holds: its partition table (GPT behind its protective
//! MBR, or MBR with the logical partitions of an extended one) and the
//! file system found at the start of each partition, or of the whole disk
//! when it has no table. Read through any `Read + Seek` (a snapshot's
//! [`crate::snapshot_reader::Cursor`] reads only the few chunks involved).
//!
//! The tables are parsed by gptman and mbrman; the file systems are told
//! apart by their superblock signatures, which is all a listing needs.

use std::io::{self, Read, Seek, SeekFrom};

/// The partition table of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PartitionTable {
    /// "gpt", "mbr", or "none" (a file system, or nothing known, on the
    /// whole disk).
    pub scheme: String,
    /// Bytes per sector the table counts in.
    pub sector_size: u64,
    /// The image's size.
    pub disk_size: u64,
    /// The file system on the whole disk, when there is no table.
    pub filesystem: Option<String>,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Partition {
    /// Its number as Linux counts: GPT entries from 1, MBR primaries 1-4,
    /// logical partitions from 5.
    pub number: u32,
    /// First byte in the image.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// The type: a GPT type GUID, or an MBR type byte ("0x83").
    pub type_id: String,
    /// The type in words ("Linux filesystem", "EFI System").
    pub type_name: String,
    /// The GPT partition name ("" on MBR).
    pub name: String,
    /// An MBR logical partition.
    pub logical: bool,
    /// The MBR boot flag.
    pub bootable: bool,
    /// The file system found at its start ("ext4", "vfat", "ntfs",
    /// "xfs", "btrfs", "LVM2_member", "swap", "crypto_LUKS"...).
    pub filesystem: Option<String>,
}

/// Errors reading a partition table.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading the image failed.
    #[error("cannot read the disk image: {0}")]
    Io(#[from] io::Error),
    /// The table is damaged.
    #[error("the {scheme} partition table is damaged: {why}")]
    Damaged {
        /// "gpt" or "mbr".
        scheme: &'static str,
        /// What the parser said.
        why: String,
    },
}

/// Reads the partition table of an image of `size` bytes.
pub fn read<R: Read + Seek>(r: &mut R, size: u64) -> Result<PartitionTable, PartitionError> {
    let mut sector0 = [0u8; 512];
    if size < 512 || read_at(r, 0, &mut sector0).is_err() {
        return Ok(none(r, size));
    }
    let has_mbr = sector0[510..512] == [0x55, 0xAA];
    let protective = has_mbr && (0..4).any(|i| sector0[446 + i * 16 + 4] == 0xEE);
    let gpt_sig = |r: &mut R, at: u64| {
        let mut b = [0u8; 8];
        read_at(r, at, &mut b).is_ok() && &b == b"EFI PART"
    };
    if protective || gpt_sig(r, 512) || gpt_sig(r, 4096) {
        r.seek(SeekFrom::Start(0))?;
        let gpt = gptman::GPT::find_from(r).map_err(|e| PartitionError::Damaged {
            scheme: "gpt",
            why: e.to_string(),
        })?;
        let ss = gpt.sector_size;
        let mut partitions = Vec::new();
        for (n, e) in gpt.iter().filter(|(_, e)| e.is_used()) {
            let start = e.starting_lba * ss;
            let type_id = guid(&e.partition_type_guid);
            partitions.push(Partition {
                number: n,
                start,
                size: (e.ending_lba + 1 - e.starting_lba) * ss,
                type_name: gpt_type_name(&type_id).to_string(),
                type_id,
                name: e.partition_name.as_str().to_string(),
                logical: false,
                bootable: false,
                filesystem: filesystem_at(r, start),
            });
        }
        return Ok(PartitionTable {
            scheme: "gpt".into(),
            sector_size: ss,
            disk_size: size,
            filesystem: None,
            partitions,
        });
    }
    // A boot sector with a file system on it (a FAT or NTFS volume has the
    // same 55 AA signature) is not a table.
    if has_mbr && filesystem_at(r, 0).is_none() {
        r.seek(SeekFrom::Start(0))?;
        let mbr = mbrman::MBR::read_from(r, 512).map_err(|e| PartitionError::Damaged {
            scheme: "mbr",
            why: e.to_string(),
        })?;
        let mut partitions = Vec::new();
        for (n, e) in mbr.iter().filter(|(_, e)| e.is_used()) {
            let start = u64::from(e.starting_lba) * 512;
            let extended = matches!(e.sys, 0x05 | 0x0f | 0x85);
            partitions.push(Partition {
                number: n as u32,
                start,
                size: u64::from(e.sectors) * 512,
                type_id: format!("0x{:02x}", e.sys),
                type_name: mbr_type_name(e.sys).to_string(),
                name: String::new(),
                logical: n > 4,
                bootable: e.boot == 0x80,
                filesystem: if extended {
                    None
                } else {
                    filesystem_at(r, start)
                },
            });
        }
        return Ok(PartitionTable {
            scheme: "mbr".into(),
            sector_size: 512,
            disk_size: size,
            filesystem: None,
            partitions,
        });
    }
    Ok(none(r, size))
}

fn none<R: Read + Seek>(r: &mut R, size: u64) -> PartitionTable {
    PartitionTable {
        scheme: "none".into(),
        sector_size: 512,
        disk_size: size,
        filesystem: filesystem_at(r, 0),
        partitions: Vec::new(),
    }
}

fn read_at<R: Read + Seek>(r: &mut R, at: u64, buf: &mut [u8]) -> io::Result<()> {
    r.seek(SeekFrom::Start(at))?;
    r.read_exact(buf)
}

/// The file system whose signature starts at `start`, if a known one does.
pub fn filesystem_at<R: Read + Seek>(r: &mut R, start: u64) -> Option<String> {
    let mut head = vec![0u8; 4096];
    read_at(r, start, &mut head).ok()?;
    let has = |at: usize, sig: &[u8]| head.get(at..at + sig.len()) == Some(sig);
    let fs = if has(3, b"NTFS    ") {
        "ntfs"
    } else if has(3, b"EXFAT   ") {
        "exfat"
    } else if has(510, &[0x55, 0xAA]) && (has(54, b"FAT1") || has(82, b"FAT32   ")) {
        "vfat"
    } else if has(0, b"XFSB") {
        "xfs"
    } else if has(0, b"LUKS\xba\xbe") {
        "crypto_LUKS"
    } else if has(512, b"LABELONE") && has(536, b"LVM2 001") {
        "LVM2_member"
    } else if has(4086, b"SWAPSPACE2") || has(4086, b"SWAP-SPACE") {
        "swap"
    } else if has(1080, &[0x53, 0xEF]) {
        let word = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        let (compat, incompat) = (word(1024 + 0x5C), word(1024 + 0x60));
        // extents, 64bit, flex_bg, inline data: ext4; a journal: ext3.
        if incompat & (0x40 | 0x80 | 0x200 | 0x8000) != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        }
    } else {
        let mut b = [0u8; 8];
        if read_at(r, start + 65536 + 64, &mut b).is_ok() && &b == b"_BHRfS_M" {
            "btrfs"
        } else {
            return None;
        }
    };
    Some(fs.to_string())
}

/// A GPT GUID as text: the first three fields are stored little-endian.
fn guid(b: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        b[8],
        b[9],
        b[10..]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

fn gpt_type_name(id: &str) -> &'static str {
    match id {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        _ => "unknown",
    }
}

fn mbr_type_name(sys: u8) -> &'static str {
    match sys {
        0x01 | 0x04 | 0x06 | 0x0e => "FAT",
        0x0b | 0x0c => "W95 FAT32",
        0x07 => "HPFS/NTFS/exFAT",
        0x05 | 0x0f | 0x85 => "Extended",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xfd => "Linux raid autodetect",
        0xef => "EFI (FAT-12/16/32)",
        0xee => "GPT",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_read_as_tools_print_them() {
        // The on-disk bytes of the Linux filesystem type.
        let b = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        assert_eq!(guid(&b), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
        assert_eq!(gpt_type_name(&guid(&b)), "Linux filesystem");
    }

    #[test]
    fn garbage_and_tiny_images_are_not_tables() {
        let mut c = io::Cursor::new(vec![0x5Au8; 8192]);
        let t = read(&mut c, 8192).unwrap();
        assert_eq!((t.scheme.as_str(), t.filesystem), ("none", None));
        let mut c = io::Cursor::new(vec![0u8; 100]);
        assert_eq!(read(&mut c, 100).unwrap().scheme, "none");
        // A boot signature over nonsense entries: an MBR of what is there,
        // never a panic.
        let mut img = vec![0xFFu8; 65536];
        img[510] = 0x55;
        img[511] = 0xAA;
        let mut c = io::Cursor::new(img);
        let _ = read(&mut c, 65536);
    }
}
