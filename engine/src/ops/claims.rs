//! Per-disk claims: a backup, prune or verify of one disk never overlap.
//! A claim is a value; dropping it releases the disk.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::progress::Progress;

/// The disks a job holds. Cloning shares the set.
#[derive(Debug, Default, Clone)]
pub struct Claims(Arc<Mutex<HashSet<String>>>);

/// A disk's claim; released when dropped.
#[derive(Debug)]
pub struct Claim {
    claims: Claims,
    disk: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims.set().remove(&self.disk);
    }
}

impl Claims {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `disk` if no job holds it.
    pub fn try_claim(&self, disk: &str) -> Option<Claim> {
        self.set().insert(disk.to_string()).then(|| Claim {
            claims: self.clone(),
            disk: disk.to_string(),
        })
    }

    /// Claims `disk`, waiting for the job that holds it; `None` if the
    /// waiting job was cancelled meanwhile.
    pub fn claim(&self, disk: &str, progress: &Progress) -> Option<Claim> {
        loop {
            if let Some(c) = self.try_claim(disk) {
                return Some(c);
            }
            if progress.cancelled() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether a job holds `disk`.
    pub fn is_busy(&self, disk: &str) -> bool {
        self.set().contains(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_excludes_a_second_until_dropped_and_a_waiter_can_be_cancelled() {
        let c = Claims::default();
        let a = c.try_claim("vm").unwrap();
        assert!(c.try_claim("vm").is_none());
        assert!(c.is_busy("vm"));
        assert!(c.try_claim("db").is_some());
        let p = Progress::default();
        p.cancel();
        assert!(c.claim("vm", &p).is_none());
        drop(a);
        assert!(!c.is_busy("vm"));
        assert!(c.claim("vm", &Progress::default()).is_some());
    }
}
