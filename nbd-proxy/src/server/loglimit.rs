//! A bound on repeated log lines. Anyone who can connect can make the
//! server log (a bad handshake, a refused connection); without a bound a
//! local user fills the journal. Up to [`BURST`] lines pass per window;
//! the rest are counted and reported in one line when the next window
//! opens.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Counts lines per window (module doc).
#[derive(Debug)]
pub struct LogLimiter {
    state: Mutex<(Instant, u32, u64)>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }
}

impl LogLimiter {
    /// Whether a line may be logged at `now`, and how many were held back
    /// in the window that just closed (to be reported first).
    pub fn admit(&self, now: Instant) -> (bool, u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0;
        if now.duration_since(s.0) >= WINDOW {
            dropped = s.2;
            *s = (now, 0, 0);
        }
        if s.1 < BURST {
            s.1 += 1;
            (true, dropped)
        } else {
            s.2 += 1;
            (false, dropped)
        }
    }

    /// Logs `msg` as a warning unless the window's budget is spent.
    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        let (ok, dropped) = self.admit(Instant::now());
        if dropped > 0 {
            tracing::warn!("{dropped} similar NBD messages were suppressed in the last minute");
        }
        if ok {
            tracing::warn!("{msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        let passed = (0..100).filter(|_| l.admit(t0).0).count();
        assert_eq!(passed, BURST as usize);
        let (ok, dropped) = l.admit(t0 + WINDOW);
        assert!(ok);
        assert_eq!(dropped, 100 - BURST as u64);
    }
}
