//! Tenants of a store server: per-agent credentials, the namespace each
//! tenant's snapshots live in, and the trust groups deduplication may
//! cross.
//!
//! Credentials live in `DIR/tenants.json` (0600): one entry per token
//! with its tenant, role (`agent` or `admin`), trust group and quota; only
//! each secret's SHA-256 is kept. `novabackup store token ...` edits the
//! file; the server rereads it when it changes, so a revoked token stops
//! working at its next request. The store's original shared token
//! (`DIR/server.token`) keeps working as an admin of the tenant `default`,
//! whose snapshots are the ones the store held before tenants existed:
//! existing stores need no migration.
//!
//! On disk, tenant `T`'s disk `D` is the store's disk `_T_D`; the default
//! tenant's disks keep their names (and may not begin with `_`). The
//! server translates every disk name and snapshot id it receives and
//! sends, so agents never see another tenant's names.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use novabackup_engine::ids::{DiskName, SnapshotId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode};

/// The file of tenant tokens in the store folder.
pub const TENANTS_FILE: &str = "tenants.json";
/// The tenant of the store's original shared token.
pub const DEFAULT_TENANT: &str = "default";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreRole {
    /// Back up, restore, list, prune and lock its tenant's snapshots.
    Agent,
    /// All an agent may, and garbage collection of the whole store.
    Admin,
}

/// One token as kept in `tenants.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantToken {
    /// Short id, to revoke it.
    pub id: String,
    /// The tenant (usually one host).
    pub tenant: String,
    /// Its role.
    pub role: StoreRole,
    /// The trust group: deduplication happens only among its tenants.
    pub group: String,
    /// Bytes the tenant's snapshots may add to the store at most.
    #[serde(default)]
    pub quota: Option<u64>,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// When it was made (RFC 3339).
    pub created: String,
}

/// Who is calling, after the token was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// The tenant's name.
    pub name: String,
    /// The token's role.
    pub role: StoreRole,
    /// Its trust group.
    pub group: String,
    /// Its quota.
    pub quota: Option<u64>,
}

/// Why a tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error(
        "{path} is damaged ({why}); restore it from a backup or remove it and make new tokens"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A name is not usable.
    #[error("{0}")]
    Invalid(String),
}

/// Checks a tenant or group name: 1 to 32 lowercase letters, digits or '-'.
pub fn check_name(what: &str, s: &str) -> Result<(), TenantError> {
    let ok = (1..=32).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TenantError::Invalid(format!(
            "invalid {what} name {s:?}: use 1 to 32 lowercase letters, digits or '-'"
        )))
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads `tenants.json` (empty when it does not exist).
pub fn load(path: &Path) -> Result<Vec<TenantToken>, TenantError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| TenantError::Damaged {
            path: path.into(),
            why: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(TenantError::Io {
            path: path.into(),
            source,
        }),
    }
}

fn save(path: &Path, list: &[TenantToken]) -> Result<(), TenantError> {
    let bytes = serde_json::to_vec_pretty(list).expect("tokens serialize");
    novabackup_engine::fsutil::write_atomic(path, &bytes, 0o600).map_err(|source| TenantError::Io {
        path: path.into(),
        source,
    })
}

/// Makes a token for `tenant` in the store folder `dir`; returns it and
/// the secret, which is shown once.
pub fn create(
    dir: &Path,
    tenant: &str,
    role: StoreRole,
    group: Option<&str>,
    quota: Option<u64>,
) -> Result<(TenantToken, String), TenantError> {
    check_name("tenant", tenant)?;
    let group = group.unwrap_or(tenant);
    check_name("group", group)?;
    let path = dir.join(TENANTS_FILE);
    let mut list = load(&path)?;
    if let Some(other) = list.iter().find(|t| t.tenant == tenant && t.group != group) {
        return Err(TenantError::Invalid(format!(
            "tenant {tenant} is in trust group {}; a tenant has one group",
            other.group
        )));
    }
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw).map_err(|e| TenantError::Invalid(e.to_string()))?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let id = secret[..8].to_string();
    let t = TenantToken {
        id,
        tenant: tenant.into(),
        role,
        group: group.into(),
        quota,
        hash: sha256_hex(&secret),
        created: novabackup_engine::time::rfc3339(novabackup_engine::time::now_unix()),
    };
    list.push(t.clone());
    save(&path, &list)?;
    Ok((t, secret))
}

/// Removes the token `id`; false if there is none.
pub fn revoke(dir: &Path, id: &str) -> Result<bool, TenantError> {
    let path = dir.join(TENANTS_FILE);
    let mut list = load(&path)?;
    let before = list.len();
    list.retain(|t| t.id != id);
    if list.len() == before {
        return Ok(false);
    }
    save(&path, &list)?;
    Ok(true)
}

/// The server's view of the tokens: the file, reread when it changes, and
/// the original shared token.
pub struct Tenants {
    path: PathBuf,
    legacy: String,
    cache: RwLock<(Option<SystemTime>, Arc<Vec<TenantToken>>)>,
}

impl Tenants {
    /// The tokens of the store folder `dir`, with `legacy` the shared token.
    pub fn open(dir: &Path, legacy: String) -> Result<Tenants, TenantError> {
        let path = dir.join(TENANTS_FILE);
        let list = load(&path)?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok(Tenants {
            path,
            legacy,
            cache: RwLock::new((mtime, Arc::new(list))),
        })
    }

    /// The tokens as the file holds them now; shared, not copied, since
    /// every request of a store server asks.
    fn current(&self) -> Arc<Vec<TenantToken>> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        {
            let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
            if c.0 == mtime {
                return c.1.clone();
            }
        }
        match load(&self.path) {
            Ok(list) => {
                let list = Arc::new(list);
                let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
                *c = (mtime, list.clone());
                list
            }
            Err(e) => {
                // Keep serving with what was valid; say why once per change.
                tracing::error!("tenant tokens not reloaded: {e}");
                let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
                c.0 = mtime;
                c.1.clone()
            }
        }
    }

    /// The tenant a bearer secret belongs to.
    pub fn check(&self, secret: &str) -> Option<Tenant> {
        if crate::auth::constant_time_eq(secret.as_bytes(), self.legacy.as_bytes()) {
            return Some(Tenant {
                name: DEFAULT_TENANT.into(),
                role: StoreRole::Admin,
                group: DEFAULT_TENANT.into(),
                quota: None,
            });
        }
        let h = sha256_hex(secret);
        self.current()
            .iter()
            .find(|t| crate::auth::constant_time_eq(t.hash.as_bytes(), h.as_bytes()))
            .map(|t| Tenant {
                name: t.tenant.clone(),
                role: t.role,
                group: t.group.clone(),
                quota: t.quota,
            })
    }

    /// The trust group of each tenant, as `group(tenant)` (a tenant no
    /// token names is a group of its own); read once for many questions.
    pub fn groups(&self) -> impl Fn(&str) -> String {
        let tokens = self.current();
        move |tenant: &str| {
            if tenant == DEFAULT_TENANT {
                return DEFAULT_TENANT.into();
            }
            tokens
                .iter()
                .find(|t| t.tenant == tenant)
                .map_or_else(|| tenant.to_string(), |t| t.group.clone())
        }
    }

    /// Whether every tenant with a token shares one trust group: then
    /// deduplication is open and answers need no filtering.
    pub fn one_group(&self) -> bool {
        self.current().iter().all(|t| t.group == DEFAULT_TENANT)
    }
}

impl Tenant {
    /// The store's name for this tenant's disk `d`.
    pub fn internal(&self, d: &DiskName) -> Result<DiskName, ApiError> {
        if self.name == DEFAULT_TENANT {
            if d.as_str().starts_with('_') {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("disk names beginning with '_' are reserved on a store server ({d})"),
                ));
            }
            return Ok(d.clone());
        }
        format!("_{}_{d}", self.name).parse().map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!(
                    "disk name {d} is too long for tenant {}: at most {} characters",
                    self.name,
                    62 - self.name.len()
                ),
            )
        })
    }

    /// This tenant's name for the store's disk `d`, if it is this tenant's.
    pub fn external(&self, d: &DiskName) -> Option<DiskName> {
        let s = d.as_str();
        if self.name == DEFAULT_TENANT {
            return (!s.starts_with('_')).then(|| d.clone());
        }
        s.strip_prefix('_')?
            .strip_prefix(self.name.as_str())?
            .strip_prefix('_')?
            .parse()
            .ok()
    }

    /// The store's id for this tenant's snapshot `id`.
    pub fn internal_id(&self, id: &SnapshotId) -> Result<SnapshotId, ApiError> {
        let disk = self.internal(id.disk())?;
        format!("{disk}@{}", id.time())
            .parse()
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("{e}")))
    }

    /// This tenant's id for the store's snapshot `id`.
    pub fn external_id(&self, id: &SnapshotId) -> Option<SnapshotId> {
        let disk = self.external(id.disk())?;
        format!("{disk}@{}", id.time()).parse().ok()
    }
}

/// The tenant whose disk the store calls `d` (`default` for plain names).
pub fn owner_of(d: &DiskName) -> String {
    match d.as_str().strip_prefix('_').and_then(|s| s.split_once('_')) {
        Some((t, _)) => t.to_string(),
        None => DEFAULT_TENANT.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Tenant {
        Tenant {
            name: name.into(),
            role: StoreRole::Agent,
            group: name.into(),
            quota: None,
        }
    }

    #[test]
    fn names_translate_both_ways_and_never_cross() {
        let vm: DiskName = "vm".parse().unwrap();
        let h1 = t("host1");
        let inside = h1.internal(&vm).unwrap();
        assert_eq!(inside.as_str(), "_host1_vm");
        assert_eq!(h1.external(&inside), Some(vm.clone()));
        assert_eq!(t("host").external(&inside), None);
        assert_eq!(t("host1x").external(&inside), None);
        assert_eq!(t(DEFAULT_TENANT).external(&inside), None);
        assert_eq!(t(DEFAULT_TENANT).internal(&vm).unwrap(), vm);
        assert!(t(DEFAULT_TENANT)
            .internal(&"_host1_vm".parse().unwrap())
            .is_err());
        assert_eq!(owner_of(&inside), "host1");
        assert_eq!(owner_of(&vm), DEFAULT_TENANT);
        let long: DiskName = "a".repeat(60).parse().unwrap();
        assert!(h1.internal(&long).is_err());
    }

    #[test]
    fn tokens_are_made_checked_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, secret) = create(dir.path(), "host1", StoreRole::Agent, None, None).unwrap();
        let ts = Tenants::open(dir.path(), "legacy".into()).unwrap();
        assert_eq!(ts.check(&secret).unwrap().name, "host1");
        assert_eq!(ts.check("legacy").unwrap().name, DEFAULT_TENANT);
        assert!(ts.check("nope").is_none());
        assert!(!ts.one_group());
        assert!(create(dir.path(), "Bad_Name", StoreRole::Agent, None, None).is_err());
        assert!(create(dir.path(), "host1", StoreRole::Agent, Some("other"), None).is_err());
        assert!(revoke(dir.path(), &tok.id).unwrap());
        // The file changed: the server notices without a restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _ = std::fs::File::options()
            .append(true)
            .open(dir.path().join(TENANTS_FILE))
            .and_then(|f| f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5)));
        assert!(ts.check(&secret).is_none());
    }
}
