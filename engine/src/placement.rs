//! Placement: which sites may hold each disk's backups (data
//! sovereignty). A site is a name an operator gives a store (`site =
//! "eu-1"` in the agent's configuration, `--to-site` for a sync); a rule
//! names, per disk, the sites allowed. A disk without a rule may go
//! anywhere. Backups and replication check the rule before they write a
//! byte, so a forbidden site never holds any of the disk's data.

use std::collections::BTreeMap;

/// A disk's backups may not go to a site.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placement forbids storing disk {disk} at {site}: its backups may only be kept at {allowed}; change the placement rule or pick another store")]
pub struct Forbidden {
    /// The disk.
    pub disk: String,
    /// The site refused (or "a store with no site name").
    pub site: String,
    /// The sites the rule allows.
    pub allowed: String,
}

/// Per disk, the sites allowed to hold its backups.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Placement(pub BTreeMap<String, Vec<String>>);

impl Placement {
    /// Whether `disk`'s backups may be kept at `site` (`None`: a store
    /// whose site is not named, which only unruled disks may use).
    pub fn check(&self, disk: &str, site: Option<&str>) -> Result<(), Forbidden> {
        let Some(allowed) = self.0.get(disk) else {
            return Ok(());
        };
        if site.is_some_and(|s| allowed.iter().any(|a| a == s)) {
            return Ok(());
        }
        Err(Forbidden {
            disk: disk.to_string(),
            site: site.map_or(
                "a store with no site name (set `site` in the configuration)".into(),
                |s| format!("site {s}"),
            ),
            allowed: if allowed.is_empty() {
                "no site".into()
            } else {
                allowed.join(", ")
            },
        })
    }

    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_names_the_only_sites_allowed() {
        let p = Placement(BTreeMap::from([(
            "secret".to_string(),
            vec!["eu-1".to_string()],
        )]));
        assert!(p.check("secret", Some("eu-1")).is_ok());
        let e = p.check("secret", Some("us-1")).unwrap_err().to_string();
        assert!(
            e.contains("disk secret at site us-1") && e.contains("only be kept at eu-1"),
            "{e}"
        );
        assert!(p.check("secret", None).is_err());
        assert!(p.check("other", Some("us-1")).is_ok());
        assert!(p.check("other", None).is_ok());
    }
}
