//! Schedules (DATA_DIR/schedules.json) and the scheduler thread.
//!
//! Each second the scheduler asks which schedules are due
//! ([`novabackup_engine::schedule::When::due`], with the clock passed in),
//! records their run time at once (so a crash does not repeat them), and
//! queues one run per disk. A queued run starts when its disk is free: two
//! jobs never run on one disk at once, and a run waits rather than fails.
//! A run missed while the agent was down is due at start, once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use novabackup_api::types::{ScheduleAction, ScheduleInfo, ScheduleRequest};
use novabackup_engine::fsutil;
use novabackup_engine::ops::{ErrorKind, OpError};
use novabackup_engine::schedule::When;
use novabackup_engine::time::rfc3339;
use serde::{Deserialize, Serialize};

const FILE: &str = "schedules.json";

/// A schedule as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    /// Id.
    pub id: String,
    /// What the operator asked for.
    pub spec: ScheduleRequest,
    /// When it was created or last changed (runs before do not count).
    pub anchor_unix: u64,
    /// When it last fired.
    pub last_run_unix: Option<u64>,
}

/// One run waiting for its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The schedule.
    pub schedule: String,
    /// What it runs, and how.
    pub spec: ScheduleRequest,
    /// The disk (`None`: store-wide, gc).
    pub disk: Option<String>,
}

/// Whether a run could start.
pub enum Start {
    /// It runs.
    Started,
    /// Its disk (or the store, for gc) is busy: try again later.
    Busy,
    /// It cannot run (the disk is gone...): logged and dropped.
    Failed(String),
}

/// What the scheduler needs from the agent.
pub trait Runner: Send + Sync {
    /// The disks a schedule without a disk covers for this action.
    fn disks_for(&self, action: ScheduleAction) -> Vec<String>;
    /// Starts a run.
    fn start(&self, run: &Run) -> Start;
}

/// The schedules.
pub struct Schedules {
    path: std::path::PathBuf,
    list: Mutex<Vec<Stored>>,
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> OpError {
    OpError::new(kind, msg)
}

/// Checks a request; returns its parsed time.
pub fn validate(r: &ScheduleRequest) -> Result<When, OpError> {
    let bad = |m: String| err(ErrorKind::Invalid, m);
    let when = When::parse(&r.cron, r.timezone.as_deref()).map_err(bad)?;
    if let Some(d) = &r.disk {
        d.parse::<novabackup_engine::ids::DiskName>()
            .map_err(|e| bad(e.to_string()))?;
    }
    if (r.action == ScheduleAction::Sync) != r.site.is_some() {
        return Err(bad(
            "a sync schedule names its target `site`, and only a sync schedule does".into(),
        ));
    }
    if r.action == ScheduleAction::Gc && r.disk.is_some() {
        return Err(bad(
            "garbage collection works on the whole store; leave `disk` out".into(),
        ));
    }
    if (r.full || r.audit) && r.action != ScheduleAction::Backup {
        return Err(bad(
            "`full` and `audit` apply to backup schedules only".into()
        ));
    }
    if r.full && r.audit {
        return Err(bad(
            "choose `full` or `audit`, not both (an audit reads everything too)".into(),
        ));
    }
    if let Some(p) = r.min_garbage_percent {
        if r.action != ScheduleAction::Gc || p > 100 {
            return Err(bad(
                "`min_garbage_percent` (0-100) applies to gc schedules only".into(),
            ));
        }
    }
    if let Some(w) = &r.skip_verified_within {
        if r.action != ScheduleAction::Verify {
            return Err(bad(
                "`skip_verified_within` applies to verify schedules only".into(),
            ));
        }
        novabackup_engine::retention::parse_duration(w).map_err(|e| bad(e.to_string()))?;
    }
    Ok(when)
}

fn info(s: &Stored) -> ScheduleInfo {
    let next = if s.spec.enabled {
        validate(&s.spec)
            .ok()
            .and_then(|w| w.next_run(s.anchor_unix, s.last_run_unix))
    } else {
        None
    };
    ScheduleInfo {
        id: s.id.clone(),
        spec: s.spec.clone(),
        last_run: s.last_run_unix.map(rfc3339),
        next_run: next.map(rfc3339),
    }
}

impl Schedules {
    /// Loads DATA_DIR/schedules.json.
    pub fn load(dir: &std::path::Path) -> anyhow::Result<Schedules> {
        let path = dir.join(FILE);
        let list: Vec<Stored> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{} is damaged ({e}); fix or remove it (the schedules are then gone)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for s in &list {
            if let Err(e) = validate(&s.spec) {
                tracing::error!(schedule = %s.id, "schedule cannot run: {e}");
            }
        }
        Ok(Schedules {
            path,
            list: Mutex::new(list),
        })
    }

    fn save(&self, list: &[Stored]) -> Result<(), OpError> {
        let bytes = serde_json::to_vec_pretty(list).expect("schedules serialize");
        fsutil::write_atomic(&self.path, &bytes, 0o600).map_err(|e| {
            err(
                ErrorKind::Internal,
                format!("cannot save {}: {e}", self.path.display()),
            )
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Stored>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every schedule with its next run.
    pub fn list(&self) -> Vec<ScheduleInfo> {
        self.lock().iter().map(info).collect()
    }

    /// Creates (`id` None: from `req.id` or a new one) or replaces.
    pub fn put(
        &self,
        mut req: ScheduleRequest,
        id: Option<String>,
        now: u64,
    ) -> Result<ScheduleInfo, OpError> {
        validate(&req)?;
        let mut list = self.lock();
        let mut next = list.clone();
        let stored = match id {
            Some(id) => {
                if req.id.as_ref().is_some_and(|x| *x != id) {
                    return Err(err(
                        ErrorKind::Invalid,
                        format!("the body names schedule {:?}, the path {id:?}", req.id),
                    ));
                }
                req.id = Some(id.clone());
                let s = next.iter_mut().find(|s| s.id == id).ok_or_else(|| {
                    err(
                        ErrorKind::NotFound,
                        format!("no schedule {id:?}; `novabackup schedule list` shows them"),
                    )
                })?;
                s.spec = req;
                s.anchor_unix = now;
                s.clone()
            }
            None => {
                let id = match &req.id {
                    Some(id) => {
                        super::policy::check_name("schedule id", id)?;
                        if next.iter().any(|s| s.id == *id) {
                            return Err(err(
                                ErrorKind::Conflict,
                                format!(
                                    "a schedule {id} exists; change it with PUT or `schedule set`"
                                ),
                            ));
                        }
                        id.clone()
                    }
                    None => (1..)
                        .map(|n| format!("schedule-{n}"))
                        .find(|c| next.iter().all(|s| s.id != *c))
                        .expect("a free id"),
                };
                req.id = Some(id.clone());
                let s = Stored {
                    id,
                    spec: req,
                    anchor_unix: now,
                    last_run_unix: None,
                };
                next.push(s.clone());
                s
            }
        };
        self.save(&next)?;
        *list = next;
        Ok(info(&stored))
    }

    /// Deletes a schedule.
    pub fn delete(&self, id: &str) -> Result<(), OpError> {
        let mut list = self.lock();
        let next: Vec<Stored> = list.iter().filter(|s| s.id != id).cloned().collect();
        if next.len() == list.len() {
            return Err(err(
                ErrorKind::NotFound,
                format!("no schedule {id:?}; `novabackup schedule list` shows them"),
            ));
        }
        self.save(&next)?;
        *list = next;
        Ok(())
    }

    /// The schedules due at `now`, recorded as run at `now`.
    pub fn take_due(&self, now: u64) -> Vec<Stored> {
        let mut list = self.lock();
        let mut due = Vec::new();
        for s in list.iter_mut().filter(|s| s.spec.enabled) {
            let Ok(when) = validate(&s.spec) else {
                continue;
            };
            if when.due(s.anchor_unix, s.last_run_unix, now) {
                s.last_run_unix = Some(now);
                due.push(s.clone());
            }
        }
        if !due.is_empty() {
            if let Err(e) = self.save(&list) {
                tracing::error!("{e}");
            }
        }
        due
    }
}

/// Expands due schedules into runs (one per disk) and adds those not
/// queued already.
pub fn enqueue(queue: &mut Vec<Run>, due: &[Stored], runner: &dyn Runner) {
    for s in due {
        let disks: Vec<Option<String>> = match (&s.spec.disk, s.spec.action) {
            (_, ScheduleAction::Gc) => vec![None],
            // One job for every disk (or the one named).
            (d, ScheduleAction::Sync) => vec![d.clone()],
            (Some(d), _) => vec![Some(d.clone())],
            (None, a) => runner.disks_for(a).into_iter().map(Some).collect(),
        };
        for disk in disks {
            let run = Run {
                schedule: s.id.clone(),
                spec: s.spec.clone(),
                disk,
            };
            if !queue.contains(&run) {
                tracing::info!(schedule = %run.schedule, action = ?run.spec.action, disk = ?run.disk, "scheduled run due");
                queue.push(run);
            }
        }
    }
}

/// Starts what it can of the queue; keeps what waits for a busy disk.
pub fn drain(queue: &mut Vec<Run>, runner: &dyn Runner) {
    queue.retain(|r| match runner.start(r) {
        Start::Started => false,
        Start::Busy => true,
        Start::Failed(e) => {
            tracing::error!(schedule = %r.schedule, disk = ?r.disk, "scheduled run cannot start: {e}");
            false
        }
    });
}

/// The scheduler thread: runs until `stop` is set.
pub fn spawn(
    schedules: Arc<Schedules>,
    runner: Arc<dyn Runner>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut queue = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            // A bug in one tick must not stop every schedule for good.
            let tick = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let due = schedules.take_due(novabackup_engine::time::now_unix());
                enqueue(&mut queue, &due, &*runner);
                drain(&mut queue, &*runner);
            }));
            if tick.is_err() {
                tracing::error!(
                    "the scheduler hit a bug in this tick; it goes on (see the log above)"
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn req(action: ScheduleAction, disk: Option<&str>, cron: &str) -> ScheduleRequest {
        ScheduleRequest {
            id: None,
            action,
            disk: disk.map(String::from),
            cron: cron.into(),
            timezone: None,
            enabled: true,
            full: false,
            audit: false,
            skip_verified_within: None,
            min_garbage_percent: None,
            site: None,
        }
    }

    /// Records what it started; disks in `busy` are busy.
    #[derive(Default)]
    struct Fake {
        busy: Mutex<HashSet<String>>,
        started: Mutex<Vec<(ScheduleAction, Option<String>)>>,
    }

    impl Runner for Fake {
        fn disks_for(&self, _: ScheduleAction) -> Vec<String> {
            vec!["a".into(), "b".into()]
        }
        fn start(&self, run: &Run) -> Start {
            if run
                .disk
                .as_ref()
                .is_some_and(|d| self.busy.lock().unwrap().contains(d))
            {
                return Start::Busy;
            }
            self.started
                .lock()
                .unwrap()
                .push((run.spec.action, run.disk.clone()));
            Start::Started
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(validate(&req(ScheduleAction::Gc, Some("a"), "0 3 * * *")).is_err());
        assert!(validate(&req(ScheduleAction::Backup, Some("a b"), "0 3 * * *")).is_err());
        assert!(validate(&req(ScheduleAction::Backup, None, "0 25 * * *")).is_err());
        let mut r = req(ScheduleAction::Prune, None, "0 3 * * *");
        r.full = true;
        assert!(validate(&r).is_err());
        let mut r = req(ScheduleAction::Verify, None, "0 3 * * *");
        r.skip_verified_within = Some("7d".into());
        assert!(validate(&r).is_ok());
        r.skip_verified_within = Some("soon".into());
        assert!(validate(&r).is_err());
    }

    /// With an injected clock: a schedule fires once per match, expands to
    /// every disk, waits for a busy disk, and is persisted.
    #[test]
    fn due_runs_expand_wait_for_busy_disks_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let s = Schedules::load(dir.path()).unwrap();
        let t0: u64 = 1_800_000_000; // a multiple of 3600: on the hour
        s.put(
            req(ScheduleAction::Backup, None, "0 * * * *"),
            None,
            t0 + 10,
        )
        .unwrap();
        s.put(req(ScheduleAction::Gc, None, "30 * * * *"), None, t0 + 10)
            .unwrap();
        assert!(s.take_due(t0 + 1000).is_empty());
        let fake = Fake::default();
        fake.busy.lock().unwrap().insert("b".into());
        let mut q = Vec::new();
        let due = s.take_due(t0 + 3600);
        assert_eq!(due.len(), 2, "both passed their first match");
        enqueue(&mut q, &due, &fake);
        drain(&mut q, &fake);
        assert_eq!(
            *fake.started.lock().unwrap(),
            [
                (ScheduleAction::Backup, Some("a".into())),
                (ScheduleAction::Gc, None)
            ]
        );
        assert_eq!(q.len(), 1, "b waits");
        // Due again before b is free: b is not queued twice.
        enqueue(&mut q, &s.take_due(t0 + 7200), &fake);
        let disks: Vec<Option<String>> = q.iter().map(|r| r.disk.clone()).collect();
        assert_eq!(disks, [Some("b".into()), Some("a".into()), None]);
        fake.busy.lock().unwrap().clear();
        drain(&mut q, &fake);
        assert!(q.is_empty());
        // Persisted: a restarted agent knows the last run and the ids.
        let again = Schedules::load(dir.path()).unwrap();
        let l = again.list();
        assert_eq!(l[0].id, "schedule-1");
        assert_eq!(l[0].last_run, Some(rfc3339(t0 + 7200)));
        assert_eq!(l[0].next_run, Some(rfc3339(t0 + 3 * 3600)));
        // Down for a day: due once at start, then not again.
        let later = t0 + 30 * 3600 + 5;
        assert_eq!(again.take_due(later).len(), 2);
        assert!(again.take_due(later + 1).is_empty());
    }
}
