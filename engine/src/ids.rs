//! Identities as newtypes, validated once when parsed.

use std::fmt;
use std::str::FromStr;

/// The name of an attached disk: also its NBD export name and the stem of
/// its files in the state folder, hence the narrow alphabet.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct DiskName(String);

/// Why a disk name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid disk name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'")]
pub struct BadDiskName(pub String);

impl DiskName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DiskName {
    type Err = BadDiskName;
    fn from_str(s: &str) -> Result<Self, BadDiskName> {
        let ok = (1..=64).contains(&s.len())
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(DiskName(s.to_string()))
        } else {
            Err(BadDiskName(s.to_string()))
        }
    }
}

impl TryFrom<String> for DiskName {
    type Error = BadDiskName;
    fn try_from(s: String) -> Result<Self, BadDiskName> {
        s.parse()
    }
}

impl From<DiskName> for String {
    fn from(d: DiskName) -> String {
        d.0
    }
}

impl fmt::Display for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A snapshot: `<disk>@<UTC time as YYYYMMDDTHHMMSSZ>`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotId {
    disk: DiskName,
    time: String,
}

/// Why a snapshot id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid snapshot id {0:?}: expected DISK@YYYYMMDDTHHMMSSZ (see `novabackup snapshots`)")]
pub struct BadSnapshotId(pub String);

impl SnapshotId {
    /// The id of `disk`'s snapshot taken at `unix` seconds.
    pub fn new(disk: &DiskName, unix: u64) -> SnapshotId {
        SnapshotId {
            disk: disk.clone(),
            time: crate::time::compact_utc(unix),
        }
    }

    /// The disk.
    pub fn disk(&self) -> &DiskName {
        &self.disk
    }

    /// The time part, `YYYYMMDDTHHMMSSZ`.
    pub fn time(&self) -> &str {
        &self.time
    }
}

impl FromStr for SnapshotId {
    type Err = BadSnapshotId;
    fn from_str(s: &str) -> Result<Self, BadSnapshotId> {
        let bad = || BadSnapshotId(s.to_string());
        let (disk, time) = s.split_once('@').ok_or_else(bad)?;
        let disk: DiskName = disk.parse().map_err(|_| bad())?;
        let b = time.as_bytes();
        let ok = b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
        if !ok {
            return Err(bad());
        }
        Ok(SnapshotId {
            disk,
            time: time.to_string(),
        })
    }
}

impl TryFrom<String> for SnapshotId {
    type Error = BadSnapshotId;
    fn try_from(s: String) -> Result<Self, BadSnapshotId> {
        s.parse()
    }
}

impl From<SnapshotId> for String {
    fn from(s: SnapshotId) -> String {
        s.to_string()
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.disk, self.time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names() {
        for ok in ["vm", "vm-1.disk_0", "A"] {
            assert!(ok.parse::<DiskName>().is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(bad.parse::<DiskName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_ids() {
        let d: DiskName = "vm".parse().unwrap();
        let id = SnapshotId::new(&d, 1_700_000_000);
        assert_eq!(id.to_string(), "vm@20231114T221320Z");
        assert_eq!(id.to_string().parse::<SnapshotId>().unwrap(), id);
        for bad in [
            "vm",
            "vm@2023",
            "@20231114T221320Z",
            "vm@20231114X221320Z",
            "vm@2023111aT221320Z",
        ] {
            assert!(bad.parse::<SnapshotId>().is_err(), "{bad}");
        }
    }
}
