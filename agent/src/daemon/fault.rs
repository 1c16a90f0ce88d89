//! Test-only fault points. They are armed only when the environment
//! variable `NOVABACKUP_TEST_FAULTS` names a folder, which no packaged
//! configuration sets: the package test sets it in a unit drop-in to prove
//! that systemd's watchdog restarts a hung agent. A fault fires once, when
//! a file of its name appears in that folder, and the file is removed so
//! the restarted agent runs normally.

use std::path::PathBuf;

/// Where fault files are looked for, when armed.
fn folder() -> Option<PathBuf> {
    std::env::var_os("NOVABACKUP_TEST_FAULTS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Whether the fault `name` was asked for; consumes the request.
pub fn take(name: &str) -> bool {
    let Some(dir) = folder() else {
        return false;
    };
    std::fs::remove_file(dir.join(name)).is_ok()
}

/// Whether the standing fault `name` is set (not consumed: it lasts while
/// its file exists).
pub fn armed(name: &str) -> bool {
    folder().is_some_and(|d| d.join(name).exists())
}

/// Blocks the calling thread for good: what a deadlock looks like from
/// outside.
pub fn hang(what: &str) -> ! {
    tracing::warn!("test fault {what}: this thread hangs now");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fault_fires_once_and_only_when_armed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), b"").unwrap();
        // No other test in this binary reads the variable.
        assert!(!super::take("x"), "unarmed");
        std::env::set_var("NOVABACKUP_TEST_FAULTS", dir.path());
        assert!(super::take("x"));
        assert!(!super::take("x"), "consumed");
        std::env::remove_var("NOVABACKUP_TEST_FAULTS");
    }
}
