//! Crash points for tests of crash safety: when the `NOVABACKUP_FAULT`
//! variable names a point, the process aborts there, as a power cut or a
//! `kill -9` would stop it, but at a known step.

/// Aborts the process if `NOVABACKUP_FAULT` is `name`.
pub fn point(name: &str) {
    if std::env::var_os("NOVABACKUP_FAULT").is_some_and(|v| v == name) {
        eprintln!("NOVABACKUP_FAULT={name}: aborting here on purpose");
        std::process::abort();
    }
}
