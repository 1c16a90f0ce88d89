//! Retention (grandfather-father-son): which snapshots of a disk to keep.
//!
//! A pure function of the snapshots and the policy: [`plan`] returns one
//! [`Decision`] per snapshot with every rule that kept it, and deleting is
//! the caller's business. The rules are restic's (`restic forget`), which
//! Proxmox Backup Server documents the same way for its period rules:
//!
//! - `keep_last N`: the N newest snapshots;
//! - `keep_hourly/daily/weekly/monthly/yearly N`: walking from the newest
//!   snapshot back, the newest snapshot of each of the last N periods *that
//!   have a snapshot* (a week is an ISO 8601 week, periods are calendar
//!   periods in the policy's time zone, UTC by default);
//! - `keep_within D`: every snapshot taken within D of the newest one
//!   (relative to the newest snapshot, not to the clock, so a disk whose
//!   backups stopped does not lose its last month of history to the
//!   calendar);
//! - all rules combined: a snapshot is kept if any rule keeps it.
//!
//! On top of the policy, the newest snapshot of a disk and protected
//! snapshots are always kept.

use std::collections::HashSet;

use chrono::{Datelike, TimeZone, Timelike};
use serde::{Deserialize, Serialize};

/// A retention policy. `None` leaves a rule out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Keep the N newest snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Same, days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Same, ISO weeks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Same, months.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Same, years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Keep everything within this duration of the newest snapshot
    /// (`30d`, `12h`, `2w`, `6m`, `1y`, or combined: `1y6m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
    /// IANA time zone of the calendar periods (`Europe/Paris`); UTC if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

impl Default for Policy {
    /// Daily 7, weekly 4, monthly 12, yearly 7, within 30 days.
    fn default() -> Self {
        Policy {
            keep_last: None,
            keep_hourly: None,
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            keep_yearly: Some(7),
            keep_within: Some("30d".into()),
            timezone: None,
        }
    }
}

/// A policy that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `keep_within` does not parse.
    #[error("keep_within {0:?} is not a duration; write it like 30d, 12h, 2w, 6m or 1y6m")]
    Duration(String),
    /// Unknown time zone.
    #[error("time zone {0:?} is unknown; use an IANA name such as UTC or Europe/Paris")]
    TimeZone(String),
    /// No rule at all would prune everything but the newest snapshot.
    #[error("the policy has no keep rule; set at least one (keep_last, keep_daily, ...)")]
    Empty,
}

impl Policy {
    /// Checks the policy and returns its parsed parts.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.parsed().map(|_| ())
    }

    fn parsed(&self) -> Result<(chrono_tz::Tz, Option<u64>), PolicyError> {
        let tz = parse_timezone(self.timezone.as_deref())?;
        let within = self
            .keep_within
            .as_deref()
            .map(parse_duration)
            .transpose()?;
        let any = [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
        .iter()
        .any(|r| r.is_some_and(|n| n > 0))
            || within.is_some();
        if !any {
            return Err(PolicyError::Empty);
        }
        Ok((tz, within))
    }
}

/// An IANA time zone; UTC for `None`.
pub fn parse_timezone(name: Option<&str>) -> Result<chrono_tz::Tz, PolicyError> {
    match name {
        None => Ok(chrono_tz::UTC),
        Some(n) => n
            .parse::<chrono_tz::Tz>()
            .map_err(|_| PolicyError::TimeZone(n.into())),
    }
}

/// Parses `30d`, `12h`, `2w`, `6m` (30-day months), `1y` (365 days),
/// `90s`, `15min`, or a sequence of them (`1y6m`), to seconds.
pub fn parse_duration(s: &str) -> Result<u64, PolicyError> {
    let bad = || PolicyError::Duration(s.into());
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "m" => 30 * 86_400,
            "y" => 365 * 86_400,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

/// A snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Snapshot id.
    pub id: String,
    /// Checkpoint time, Unix seconds.
    pub time_unix: u64,
    /// Protected by the operator.
    pub protected: bool,
}

/// What retention decided for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Snapshot id.
    pub id: String,
    /// Checkpoint time, Unix seconds.
    pub time_unix: u64,
    /// Keep (true) or remove.
    pub keep: bool,
    /// Every rule that keeps it (`daily 2/7`, `protected`, ...); empty
    /// when it goes.
    pub reasons: Vec<String>,
}

/// The calendar periods of the bucket rules, in rule order.
const PERIODS: [&str; 5] = ["hourly", "daily", "weekly", "monthly", "yearly"];

/// The period of `unix` for rule `i` of [`PERIODS`], in `tz`.
fn period(tz: &chrono_tz::Tz, unix: u64, i: usize) -> (i32, u32, u32) {
    let t = tz
        .timestamp_opt(unix as i64, 0)
        .single()
        .expect("a Unix time maps to one instant");
    match i {
        0 => (t.year(), t.ordinal(), t.hour()),
        1 => (t.year(), t.ordinal(), 0),
        2 => {
            let w = t.iso_week();
            (w.year(), w.week(), 0)
        }
        3 => (t.year(), t.month(), 0),
        _ => (t.year(), 0, 0),
    }
}

/// Decides keep or remove for every snapshot of one disk. The result is
/// newest first.
pub fn plan(snaps: &[Candidate], policy: &Policy) -> Result<Vec<Decision>, PolicyError> {
    let (tz, within) = policy.parsed()?;
    let mut order: Vec<&Candidate> = snaps.iter().collect();
    order.sort_by(|a, b| (b.time_unix, &b.id).cmp(&(a.time_unix, &a.id)));
    let counts = [
        policy.keep_hourly,
        policy.keep_daily,
        policy.keep_weekly,
        policy.keep_monthly,
        policy.keep_yearly,
    ];
    let mut left: Vec<u32> = counts.iter().map(|c| c.unwrap_or(0)).collect();
    let mut last: [Option<(i32, u32, u32)>; 5] = [None; 5];
    let newest = order.first().map(|c| c.time_unix);
    let mut out = Vec::with_capacity(order.len());
    for (n, c) in order.iter().enumerate() {
        let mut reasons = Vec::new();
        if n == 0 {
            reasons.push("newest snapshot".to_string());
        }
        if c.protected {
            reasons.push("protected".to_string());
        }
        if let Some(k) = policy.keep_last {
            if (n as u32) < k {
                reasons.push(format!("last {}/{k}", n + 1));
            }
        }
        if let (Some(w), Some(top)) = (within, newest) {
            if c.time_unix.saturating_add(w) >= top {
                reasons.push(format!(
                    "within {}",
                    policy.keep_within.as_deref().unwrap_or("")
                ));
            }
        }
        for i in 0..PERIODS.len() {
            if left[i] == 0 {
                continue;
            }
            let p = period(&tz, c.time_unix, i);
            if last[i] != Some(p) {
                last[i] = Some(p);
                left[i] -= 1;
                let k = counts[i].unwrap_or(0);
                reasons.push(format!("{} {}/{k}", PERIODS[i], k - left[i]));
            }
        }
        out.push(Decision {
            id: c.id.clone(),
            time_unix: c.time_unix,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    Ok(out)
}

/// The ids a plan removes.
pub fn removals(plan: &[Decision]) -> HashSet<&str> {
    plan.iter()
        .filter(|d| !d.keep)
        .map(|d| d.id.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Unix time of a UTC civil time.
    fn t(y: i32, mo: u32, d: u32, h: u32) -> u64 {
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, 0, 0)
            .unwrap()
            .timestamp() as u64
    }

    fn snaps(times: &[u64]) -> Vec<Candidate> {
        times
            .iter()
            .map(|&u| Candidate {
                id: format!("s{u}"),
                time_unix: u,
                protected: false,
            })
            .collect()
    }

    fn kept(plan: &[Decision]) -> BTreeSet<u64> {
        plan.iter()
            .filter(|d| d.keep)
            .map(|d| d.time_unix)
            .collect()
    }

    fn only(f: impl FnOnce(&mut Policy)) -> Policy {
        let mut p = Policy {
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            keep_yearly: None,
            keep_within: None,
            ..Policy::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("1y6m").unwrap(), (365 + 180) * 86_400);
        assert_eq!(parse_duration("2w12h").unwrap(), 14 * 86_400 + 12 * 3600);
        assert_eq!(parse_duration("15min").unwrap(), 900);
        for bad in ["", "d", "30", "3x", "1d-2h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_empty_or_broken_policy_is_refused() {
        assert_eq!(only(|_| {}).validate(), Err(PolicyError::Empty));
        let p = Policy {
            timezone: Some("Mars/Olympus".into()),
            ..Policy::default()
        };
        assert!(matches!(p.validate(), Err(PolicyError::TimeZone(_))));
        Policy::default().validate().unwrap();
    }

    /// Hand-derived: one snapshot a day at 02:00 UTC from Mon 2026-01-05
    /// to Sun 2026-03-01 (56 days). keep_daily 3 keeps Mar 1, Feb 28, 27.
    /// keep_weekly 2: ISO weeks counted back from the newest: W09 (Feb 23
    /// to Mar 1, newest is Mar 1) and W08 (Feb 16-22, newest is Feb 22).
    /// keep_monthly 2: March (Mar 1) and February (Feb 28).
    #[test]
    fn table_daily_weekly_monthly() {
        let times: Vec<u64> = (0..56).map(|i| t(2026, 1, 5, 2) + i * 86_400).collect();
        let s = snaps(&times);
        let p = only(|p| p.keep_daily = Some(3));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2026, 2, 27, 2), t(2026, 2, 28, 2), t(2026, 3, 1, 2)].into()
        );
        let p = only(|p| p.keep_weekly = Some(2));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2026, 2, 22, 2), t(2026, 3, 1, 2)].into()
        );
        let p = only(|p| p.keep_monthly = Some(2));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2026, 2, 28, 2), t(2026, 3, 1, 2)].into()
        );
        // Combined: the union, each with its reasons.
        let p = only(|p| {
            p.keep_daily = Some(3);
            p.keep_weekly = Some(2);
            p.keep_monthly = Some(2);
        });
        let d = plan(&s, &p).unwrap();
        assert_eq!(
            kept(&d),
            [
                t(2026, 2, 22, 2),
                t(2026, 2, 27, 2),
                t(2026, 2, 28, 2),
                t(2026, 3, 1, 2)
            ]
            .into()
        );
        let newest = &d[0];
        assert_eq!(newest.time_unix, t(2026, 3, 1, 2));
        assert_eq!(
            newest.reasons,
            ["newest snapshot", "daily 1/3", "weekly 1/2", "monthly 1/2"]
        );
        assert_eq!(d[1].reasons, ["daily 2/3", "monthly 2/2"]);
    }

    /// Periods without a snapshot do not count: snapshots on Jan 10,
    /// Mar 3 and Mar 20, Jul 1 (2025) with keep_monthly 3 keep Jul 1,
    /// Mar 20 (newest of March) and Jan 10, though April to June and
    /// February are empty.
    #[test]
    fn table_empty_periods_do_not_count() {
        let s = snaps(&[
            t(2025, 1, 10, 0),
            t(2025, 3, 3, 0),
            t(2025, 3, 20, 0),
            t(2025, 7, 1, 0),
        ]);
        let p = only(|p| p.keep_monthly = Some(3));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2025, 1, 10, 0), t(2025, 3, 20, 0), t(2025, 7, 1, 0)].into()
        );
        // keep_yearly 2 over 2023 (twice), 2025: the newest of each.
        let s = snaps(&[t(2023, 2, 1, 0), t(2023, 11, 1, 0), t(2025, 5, 5, 5)]);
        let p = only(|p| p.keep_yearly = Some(2));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2023, 11, 1, 0), t(2025, 5, 5, 5)].into()
        );
    }

    /// ISO weeks: Sun 2026-01-04 belongs to 2026-W01 (Mon Dec 29, 2025 to
    /// Sun Jan 4), like Mon 2025-12-29; Mon 2026-01-05 starts W02.
    #[test]
    fn table_iso_weeks_across_the_year() {
        let s = snaps(&[
            t(2025, 12, 28, 9),
            t(2025, 12, 29, 9),
            t(2026, 1, 4, 9),
            t(2026, 1, 5, 9),
        ]);
        let p = only(|p| p.keep_weekly = Some(3));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2025, 12, 28, 9), t(2026, 1, 4, 9), t(2026, 1, 5, 9)].into()
        );
    }

    /// Time zones: 23:30 UTC on Jan 1 is already Jan 2 in Berlin, so with
    /// the Berlin calendar it shares a day with a snapshot at 10:00 UTC on
    /// Jan 2, and keep_daily keeps only the later one of that day.
    #[test]
    fn table_time_zone() {
        let s = snaps(&[
            t(2026, 1, 1, 12),
            t(2026, 1, 1, 23) + 1800,
            t(2026, 1, 2, 10),
        ]);
        let mut p = only(|p| p.keep_daily = Some(5));
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2026, 1, 1, 23) + 1800, t(2026, 1, 2, 10)].into()
        );
        p.timezone = Some("Europe/Berlin".into());
        assert_eq!(
            kept(&plan(&s, &p).unwrap()),
            [t(2026, 1, 1, 12), t(2026, 1, 2, 10)].into()
        );
    }

    #[test]
    fn table_last_within_protected_newest() {
        let s0 = snaps(&[
            t(2026, 1, 1, 0),
            t(2026, 1, 1, 1),
            t(2026, 1, 1, 2),
            t(2026, 1, 10, 0),
        ]);
        let p = only(|p| p.keep_last = Some(2));
        assert_eq!(
            kept(&plan(&s0, &p).unwrap()),
            [t(2026, 1, 1, 2), t(2026, 1, 10, 0)].into()
        );
        // Within 9 days of the newest (Jan 10 00:00): Jan 1 00:00 is
        // exactly 9 days before, so it is kept; nothing is older.
        let p = only(|p| p.keep_within = Some("9d".into()));
        assert_eq!(kept(&plan(&s0, &p).unwrap()).len(), 4);
        let p = only(|p| p.keep_within = Some("8d23h".into()));
        assert_eq!(
            kept(&plan(&s0, &p).unwrap()),
            [t(2026, 1, 1, 1), t(2026, 1, 1, 2), t(2026, 1, 10, 0)].into()
        );
        // Protected and newest survive a policy that keeps nothing else.
        let mut s = s0.clone();
        s[0].protected = true;
        let p = only(|p| p.keep_hourly = Some(1));
        let d = plan(&s, &p).unwrap();
        assert_eq!(kept(&d), [t(2026, 1, 1, 0), t(2026, 1, 10, 0)].into());
        assert!(d.iter().any(|x| x.reasons == ["protected"]));
    }

    /// The model: for each period rule, group by period, take the newest N
    /// periods that have snapshots, keep the newest snapshot of each.
    fn model(s: &[Candidate], p: &Policy) -> BTreeSet<String> {
        let (tz, within) = p.parsed().unwrap();
        let mut keep = BTreeSet::new();
        let mut by_time: Vec<&Candidate> = s.iter().collect();
        by_time.sort_by_key(|c| std::cmp::Reverse((c.time_unix, c.id.clone())));
        if let Some(n) = by_time.first() {
            keep.insert(n.id.clone());
        }
        for c in s.iter().filter(|c| c.protected) {
            keep.insert(c.id.clone());
        }
        for c in by_time.iter().take(p.keep_last.unwrap_or(0) as usize) {
            keep.insert(c.id.clone());
        }
        if let (Some(w), Some(n)) = (within, by_time.first()) {
            for c in &by_time {
                if c.time_unix + w >= n.time_unix {
                    keep.insert(c.id.clone());
                }
            }
        }
        let counts = [
            p.keep_hourly,
            p.keep_daily,
            p.keep_weekly,
            p.keep_monthly,
            p.keep_yearly,
        ];
        for (i, n) in counts.iter().enumerate() {
            let mut groups: BTreeMap<(i32, u32, u32), &Candidate> = BTreeMap::new();
            for c in &by_time {
                groups.entry(period(&tz, c.time_unix, i)).or_insert(c);
            }
            for (_, c) in groups.iter().rev().take(n.unwrap_or(0) as usize) {
                keep.insert(c.id.clone());
            }
        }
        keep
    }

    proptest! {
        #[test]
        fn plan_matches_the_model(
            times in proptest::collection::btree_set(1_600_000_000u64..1_700_000_000, 0..60),
            dense in proptest::collection::vec(0u64..200_000, 0..40),
            prot in proptest::collection::vec(any::<bool>(), 100),
            rules in proptest::collection::vec(proptest::option::of(0u32..6), 6),
            within in proptest::option::of(0u64..40),
            berlin in any::<bool>(),
        ) {
            // Sparse years-long history plus a burst of close snapshots.
            let base = times.iter().next_back().copied().unwrap_or(1_650_000_000);
            let mut all: Vec<u64> = times.iter().copied().collect();
            all.extend(dense.iter().map(|d| base + d * 7));
            all.sort();
            all.dedup();
            let s: Vec<Candidate> = all.iter().enumerate().map(|(i, &u)| Candidate {
                id: format!("s{u}"), time_unix: u, protected: prot[i % prot.len()] && i % 7 == 0,
            }).collect();
            let p = Policy {
                keep_last: rules[0], keep_hourly: rules[1], keep_daily: rules[2],
                keep_weekly: rules[3], keep_monthly: rules[4], keep_yearly: rules[5],
                keep_within: within.map(|d| format!("{d}d")),
                timezone: berlin.then(|| "Europe/Berlin".to_string()),
            };
            prop_assume!(p.validate().is_ok());
            let d = plan(&s, &p).unwrap();
            prop_assert_eq!(d.len(), s.len());
            let got: BTreeSet<String> = d.iter().filter(|x| x.keep).map(|x| x.id.clone()).collect();
            prop_assert_eq!(got, model(&s, &p));
            for x in &d {
                prop_assert_eq!(x.keep, !x.reasons.is_empty());
            }
        }
    }
}
