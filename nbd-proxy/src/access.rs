//! Who an NBD client is and which exports it may open.
//!
//! A client is known by how it arrived: a unix-socket peer by its uid and
//! gid (`SO_PEERCRED`), a TLS client by the subject of the certificate it
//! proved it holds, and a plain TCP client (the loopback opt-in) by
//! nothing at all. Each export carries an allow list; an empty list leaves
//! the decision to the listener (socket permissions, the TLS CA), as
//! qemu-nbd does without `--tls-authz`. A non-empty list admits:
//!
//! - `uid:N` and `gid:N`: a unix-socket peer with that uid or primary gid
//!   (root on the socket is always admitted: it owns the agent anyway);
//! - a distinguished name such as `CN=backup-host,O=Example`: a TLS client
//!   whose certificate subject has exactly those attributes. Order and the
//!   spaces after commas do not matter, so both OpenSSL's and GnuTLS's
//!   renderings of a subject match.
//!
//! Plain TCP clients are admitted only to exports with an empty list. The
//! handshake consults [`permits`] for every LIST, INFO, GO, EXPORT_NAME and
//! meta-context option, so a client never learns an export it may not open.

use std::fmt;

/// How a client reached the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A unix-socket peer.
    Unix {
        /// Its user id.
        uid: u32,
        /// Its primary group id.
        gid: u32,
    },
    /// A TLS client with a verified certificate.
    Tls {
        /// The certificate's subject, `(attribute, value)` pairs.
        subject: Vec<(String, String)>,
    },
    /// TCP without TLS: unauthenticated.
    PlainTcp,
}

impl Peer {
    /// The subject as `CN=a,O=b`, or the unix ids, for logs.
    pub fn identity(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { uid, gid } => write!(f, "uid:{uid} gid:{gid}"),
            Peer::Tls { subject } => {
                let parts: Vec<String> = subject.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "{}", parts.join(","))
            }
            Peer::PlainTcp => write!(f, "unauthenticated TCP"),
        }
    }
}

/// Why an allow-list entry is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NBD client identity {entry:?}: {why}; use uid:N, gid:N or a certificate subject such as CN=host,O=org")]
pub struct AllowError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Checks an allow-list entry as an operator wrote it.
pub fn check_entry(entry: &str) -> Result<(), AllowError> {
    let bad = |why| AllowError {
        entry: entry.into(),
        why,
    };
    if let Some(n) = entry
        .strip_prefix("uid:")
        .or_else(|| entry.strip_prefix("gid:"))
    {
        return n
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| bad("the id is not a number"));
    }
    match parse_dn(entry) {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(bad("not a distinguished name")),
    }
}

/// Whether `peer` may open an export whose allow list is `allow`.
pub fn permits(allow: &[String], peer: &Peer) -> bool {
    if allow.is_empty() {
        return true;
    }
    match peer {
        Peer::Unix { uid: 0, .. } => true,
        Peer::Unix { uid, gid } => allow.iter().any(|e| {
            e.strip_prefix("uid:").and_then(|n| n.parse().ok()) == Some(*uid)
                || e.strip_prefix("gid:").and_then(|n| n.parse().ok()) == Some(*gid)
        }),
        Peer::Tls { subject } => {
            let have = normalize(subject.clone());
            allow
                .iter()
                .filter_map(|e| parse_dn(e))
                .any(|want| normalize(want) == have)
        }
        Peer::PlainTcp => false,
    }
}

/// `CN=a, O=b` → `[("CN","a"),("O","b")]`. A backslash escapes the next
/// character (RFC 4514), so a value may hold a comma.
fn parse_dn(s: &str) -> Option<Vec<(String, String)>> {
    if s.starts_with("uid:") || s.starts_with("gid:") {
        return None;
    }
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push(chars.next()?),
            ',' | '/' | ';' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Attribute names compared without case (`cn` = `CN`), values exactly;
/// the order of attributes does not matter.
fn normalize(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    for (k, _) in v.iter_mut() {
        *k = k.to_ascii_uppercase();
        if k == "EMAIL" {
            *k = "EMAILADDRESS".into();
        }
    }
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(s: &[(&str, &str)]) -> Peer {
        Peer::Tls {
            subject: s
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn empty_list_admits_everyone() {
        assert!(permits(&[], &Peer::PlainTcp));
        assert!(permits(
            &[],
            &Peer::Unix {
                uid: 65534,
                gid: 65534
            }
        ));
    }

    #[test]
    fn unix_peers_by_uid_and_gid_root_always() {
        let allow = vec!["uid:1000".to_string(), "gid:64".to_string()];
        assert!(permits(&allow, &Peer::Unix { uid: 1000, gid: 5 }));
        assert!(permits(&allow, &Peer::Unix { uid: 7, gid: 64 }));
        assert!(permits(&allow, &Peer::Unix { uid: 0, gid: 0 }));
        assert!(!permits(
            &allow,
            &Peer::Unix {
                uid: 65534,
                gid: 65534
            }
        ));
        assert!(!permits(&allow, &Peer::PlainTcp));
    }

    #[test]
    fn certificate_subjects_match_as_sets() {
        let allow = vec!["CN=alice, O=Example Org".to_string()];
        assert!(permits(
            &allow,
            &tls(&[("O", "Example Org"), ("CN", "alice")])
        ));
        assert!(permits(
            &["o=Example Org,cn=alice".into()],
            &tls(&[("CN", "alice"), ("O", "Example Org")])
        ));
        assert!(!permits(&allow, &tls(&[("CN", "alice")])));
        assert!(!permits(
            &allow,
            &tls(&[("CN", "alice"), ("O", "Example Org"), ("OU", "x")])
        ));
        assert!(!permits(
            &allow,
            &tls(&[("CN", "mallory"), ("O", "Example Org")])
        ));
        // A uid entry never matches a certificate, whatever its subject.
        assert!(!permits(&["uid:0".into()], &tls(&[("uid", "0")])));
    }

    #[test]
    fn escaped_commas_stay_in_the_value() {
        let allow = vec![r"CN=a\,b".to_string()];
        assert!(permits(&allow, &tls(&[("CN", "a,b")])));
        assert!(!permits(&allow, &tls(&[("CN", "a")])));
    }

    #[test]
    fn entries_are_checked() {
        assert!(check_entry("uid:0").is_ok());
        assert!(check_entry("CN=x").is_ok());
        assert!(check_entry("uid:me").is_err());
        assert!(check_entry("alice").is_err());
        assert!(check_entry("").is_err());
    }
}
