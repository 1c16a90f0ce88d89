//! systemd's notify protocol (`Type=notify`): one datagram per state
//! change to `$NOTIFY_SOCKET` ("READY=1", "RELOADING=1", "STOPPING=1",
//! "WATCHDOG=1"). A few lines, so no crate: outside systemd the variable
//! is unset and every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` to systemd if it asked for notifications.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(socket = %path, "cannot notify systemd ({state}): {e}");
    }
}

/// How often to send "WATCHDOG=1": half of `$WATCHDOG_USEC`, when the
/// watchdog is on and meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
