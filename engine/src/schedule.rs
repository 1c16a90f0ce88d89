//! Cron arithmetic for schedules: pure functions of an expression, a time
//! zone and the clock the caller passes in.
//!
//! A schedule fires at the first time its expression matches after the
//! later of its last run and the moment it was created or changed (its
//! anchor). An agent that was down when runs were due finds, at start,
//! that the next time after the last run has passed, and runs it once:
//! however many were missed, the next one after that is in the future.

use std::str::FromStr;

use chrono::TimeZone;
use croner::Cron;

/// A parsed schedule time.
#[derive(Debug, Clone)]
pub struct When {
    cron: Cron,
    tz: chrono_tz::Tz,
}

impl When {
    /// Parses a cron expression (5 fields, an optional leading seconds
    /// field, or a nickname such as `@daily`) in a time zone (UTC if none).
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<When, String> {
        let cron = Cron::from_str(expr).map_err(|e| {
            format!("cron expression {expr:?} is not valid ({e}); write it like \"30 2 * * *\" (02:30 every day)")
        })?;
        let tz = crate::retention::parse_timezone(timezone).map_err(|e| e.to_string())?;
        Ok(When { cron, tz })
    }

    /// The first matching time strictly after `after` (Unix seconds).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let t = self.tz.timestamp_opt(after as i64, 0).single()?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|n| n.timestamp() as u64)
    }

    /// The next run of a schedule last run at `last_run` (if ever) and
    /// created or changed at `anchor` (possibly past: a run not yet made).
    pub fn next_run(&self, anchor: u64, last_run: Option<u64>) -> Option<u64> {
        self.next_after(last_run.map_or(anchor, |l| l.max(anchor)))
    }

    /// Whether a run is due at `now` (see [`Self::next_run`]).
    pub fn due(&self, anchor: u64, last_run: Option<u64>, now: u64) -> bool {
        self.next_run(anchor, last_run).is_some_and(|n| n <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .unwrap()
            .timestamp() as u64
    }

    #[test]
    fn next_times_in_utc_and_in_a_zone() {
        let w = When::parse("30 2 * * *", None).unwrap();
        assert_eq!(
            w.next_after(t(2026, 3, 1, 0, 0)),
            Some(t(2026, 3, 1, 2, 30))
        );
        assert_eq!(
            w.next_after(t(2026, 3, 1, 2, 30)),
            Some(t(2026, 3, 2, 2, 30))
        );
        // 02:30 in New York is 07:30 UTC in winter.
        let ny = When::parse("30 2 * * *", Some("America/New_York")).unwrap();
        assert_eq!(
            ny.next_after(t(2026, 1, 10, 0, 0)),
            Some(t(2026, 1, 10, 7, 30))
        );
        let weekly = When::parse("0 3 * * SUN", None).unwrap();
        // Thu 2026-11-26 -> Sun 2026-11-29.
        assert_eq!(
            weekly.next_after(t(2026, 11, 26, 12, 0)),
            Some(t(2026, 11, 29, 3, 0))
        );
        assert!(When::parse("@daily", None).is_ok());
        assert!(When::parse("*/5 * * * * *", None).is_ok(), "seconds field");
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_advice() {
        let e = When::parse("61 * * * *", None).unwrap_err();
        assert!(e.contains("02:30 every day"), "{e}");
        assert!(When::parse("every day", None).is_err());
        let e = When::parse("0 3 * * *", Some("Nowhere/Town")).unwrap_err();
        assert!(e.contains("IANA"), "{e}");
    }

    /// The injected clock: nothing is due before the first match after the
    /// anchor; a run missed while the agent was down is due once at start,
    /// and after that run the next is in the future.
    #[test]
    fn due_with_an_injected_clock() {
        let w = When::parse("0 * * * *", None).unwrap(); // hourly
        let created = t(2026, 11, 26, 10, 15);
        assert!(!w.due(created, None, t(2026, 11, 26, 10, 59)));
        assert!(w.due(created, None, t(2026, 11, 26, 11, 0)));
        // Ran at 11:00; the agent was down from 11:30 to 15:10.
        let ran = t(2026, 11, 26, 11, 0);
        assert!(!w.due(created, Some(ran), t(2026, 11, 26, 11, 30)));
        let start = t(2026, 11, 26, 15, 10);
        assert!(
            w.due(created, Some(ran), start),
            "missed runs: run once at start"
        );
        assert!(!w.due(created, Some(start), start + 60), "only once");
        assert!(w.due(created, Some(start), t(2026, 11, 26, 16, 0)));
        // A schedule changed at 15:20 (its anchor) does not fire for the
        // hours before the change.
        assert!(!w.due(t(2026, 11, 26, 15, 20), Some(ran), t(2026, 11, 26, 15, 30)));
    }
}
