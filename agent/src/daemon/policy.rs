//! Retention policies and quotas as the operator configured them
//! (DATA_DIR/retention.json and DATA_DIR/quotas.json, written through the
//! crash-safe helper). What prune and the quota budget do with them is
//! the engine's (`novabackup_engine::ops`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use novabackup_api::types::{Quotas, RetentionPolicy};
use novabackup_engine::fsutil;
use novabackup_engine::ids::DiskName;
use novabackup_engine::ops::quota::Limits;
use novabackup_engine::ops::{ErrorKind, OpError};
use novabackup_engine::retention::Policy;

const POLICIES_FILE: &str = "retention.json";
const QUOTAS_FILE: &str = "quotas.json";
/// The name under which the built-in default policy is reported.
pub const BUILT_IN: &str = "built-in default";

fn err(kind: ErrorKind, msg: impl Into<String>) -> OpError {
    OpError::new(kind, msg)
}

fn load<T: serde::de::DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            anyhow::anyhow!(
                "{} is damaged ({e}); fix or remove it (its settings are then gone)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn save<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), OpError> {
    let bytes = serde_json::to_vec_pretty(v).expect("settings serialize");
    fsutil::write_atomic(path, &bytes, 0o600).map_err(|e| {
        err(
            ErrorKind::Internal,
            format!("cannot save {}: {e}", path.display()),
        )
    })
}

/// Policies and quotas.
pub struct Settings {
    dir: PathBuf,
    policies: Mutex<Vec<RetentionPolicy>>,
    quotas: Mutex<Quotas>,
}

/// Checks a policy name or schedule id (the rules of disk names).
pub fn check_name(what: &str, name: &str) -> Result<(), OpError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorKind::Invalid,
            format!("{what} {name:?} is not valid: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"),
        ))
    }
}

impl Settings {
    /// Loads what DATA_DIR holds.
    pub fn load(dir: &Path) -> anyhow::Result<Settings> {
        Ok(Settings {
            dir: dir.to_path_buf(),
            policies: Mutex::new(load(&dir.join(POLICIES_FILE))?),
            quotas: Mutex::new(load(&dir.join(QUOTAS_FILE))?),
        })
    }

    /// The configured policies.
    pub fn policies(&self) -> Vec<RetentionPolicy> {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Creates or replaces a policy.
    pub fn put_policy(&self, p: RetentionPolicy, create: bool) -> Result<RetentionPolicy, OpError> {
        check_name("policy name", &p.name)?;
        if let Some(d) = &p.disk {
            d.parse::<DiskName>()
                .map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
        }
        p.rules
            .validate()
            .map_err(|e| err(ErrorKind::Invalid, e.to_string()))?;
        let mut all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        let exists = all.iter().position(|x| x.name == p.name);
        match (create, exists) {
            (true, Some(_)) => {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("a policy named {} exists; update it instead", p.name),
                ))
            }
            (false, None) => {
                return Err(err(
                    ErrorKind::NotFound,
                    format!("no policy named {:?}; create it first", p.name),
                ))
            }
            _ => {}
        }
        if let Some(other) = all.iter().find(|x| x.name != p.name && x.disk == p.disk) {
            let scope = p
                .disk
                .as_deref()
                .map_or("all disks".to_string(), |d| format!("disk {d}"));
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "policy {} already covers {scope}; update or delete it instead",
                    other.name
                ),
            ));
        }
        let mut next = all.clone();
        match exists {
            Some(i) => next[i] = p.clone(),
            None => next.push(p.clone()),
        }
        save(&self.dir.join(POLICIES_FILE), &next)?;
        *all = next;
        Ok(p)
    }

    /// Deletes a policy.
    pub fn delete_policy(&self, name: &str) -> Result<(), OpError> {
        let mut all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        let next: Vec<RetentionPolicy> = all.iter().filter(|p| p.name != name).cloned().collect();
        if next.len() == all.len() {
            return Err(err(
                ErrorKind::NotFound,
                format!("no policy named {name:?}; `novabackup retention list` shows them"),
            ));
        }
        save(&self.dir.join(POLICIES_FILE), &next)?;
        *all = next;
        Ok(())
    }

    /// The policy that applies to `disk`: its own, else the all-disks one,
    /// else the built-in default. Returns the policy's name too.
    pub fn effective(&self, disk: &str) -> (String, Policy) {
        let all = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .find(|p| p.disk.as_deref() == Some(disk))
            .or_else(|| all.iter().find(|p| p.disk.is_none()))
            .map(|p| (p.name.clone(), p.rules.clone()))
            .unwrap_or_else(|| (BUILT_IN.to_string(), Policy::default()))
    }

    /// The limits.
    pub fn quotas(&self) -> Quotas {
        self.quotas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the limits.
    pub fn set_quotas(&self, q: Quotas) -> Result<Quotas, OpError> {
        Limits::from(&q).validate()?;
        let mut cur = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        save(&self.dir.join(QUOTAS_FILE), &q)?;
        *cur = q.clone();
        Ok(q)
    }

    /// The limits, as the engine's operations take them.
    pub fn limits(&self) -> Limits {
        Limits::from(&self.quotas())
    }
}
