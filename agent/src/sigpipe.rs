//! Output into a closed pipe (`novabackup status | head -1`) ends a
//! command quietly, as it does for every Unix tool, instead of a panic on
//! the failed write: the CLI puts SIGPIPE back to its default action. The
//! daemons keep Rust's "ignore", where a closed client socket must only
//! fail that write.
#![allow(unsafe_code)]

/// Restores SIGPIPE's default action (terminate).
pub fn default_action() {
    // SAFETY: called first thing in main, before any thread starts;
    // SIG_DFL installs no handler, so no code of ours runs in signal
    // context.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
