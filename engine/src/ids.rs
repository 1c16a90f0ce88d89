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
}
