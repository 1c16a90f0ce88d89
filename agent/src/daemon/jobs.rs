//! The job table: long work (backup, restore, verify) runs on its own
//! thread with an id, progress (done, total, rate, ETA), and a final result
//! or error; it can be cancelled. Finished jobs are kept (the last 200) so
//! that clients can read their outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use novabackup_api::types::{JobInfo, JobState};
use novabackup_engine::ops::{backup, prune, restore, verify, OpError};
use novabackup_engine::progress::Progress;
use novabackup_engine::store::GcReport;

const KEEP: usize = 200;

/// What a job that succeeded produced: each operation's own report,
/// rendered as JSON only when a client asks for the job.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Report {
    /// A backup.
    Backup(Box<backup::BackupReport>),
    /// A restore.
    Restore(restore::RestoreReport),
    /// A verify.
    Verify(verify::VerifyJobReport),
    /// A prune.
    Prune(prune::PruneReport),
    /// A garbage collection.
    Gc(GcReport),
    /// A replication to another site.
    Sync(novabackup_engine::ops::sync::SyncReport),
    /// A background fill (live restore or promotion) that completed.
    Fill(FillReport),
}

/// What a completed background fill did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FillReport {
    /// The disk or mount filled.
    pub export: String,
    /// The snapshot its bytes came from.
    pub snapshot: String,
    /// The image's bytes, now all local.
    pub bytes: u64,
    /// How long the fill took (this run, after a resume).
    pub seconds: f64,
}

/// How a job ended: its state, its report or error, and seconds taken.
type Outcome = (JobState, Result<Arc<Report>, Arc<OpError>>, f64);

struct Job {
    id: String,
    kind: String,
    target: String,
    /// The disks it acts on; empty for host-wide work (gc, verify all).
    disks: Vec<String>,
    started_unix: u64,
    started: Instant,
    progress: Arc<Progress>,
    /// Set by a user's cancel; the engine also raises the progress's
    /// cancel switch itself to stop its threads after an error.
    cancelled: std::sync::atomic::AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    /// Signalled once `outcome` is set, for long polls.
    ended: std::sync::Condvar,
}

/// The table.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<Vec<Arc<Job>>>,
    next: AtomicU64,
    totals: Arc<Mutex<Totals>>,
}

/// Upper bounds (seconds) of the job-duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 7] = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];

/// What finished jobs add up to, for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Finished jobs by (kind, state).
    pub outcomes: std::collections::BTreeMap<(String, String), u64>,
    /// Per kind: counts per bucket of [`DURATION_BUCKETS`] (cumulative is
    /// computed when rendered), the count above the last, and the sum.
    pub durations: std::collections::BTreeMap<String, ([u64; 8], f64)>,
    /// Successful backups' bytes read, new and stored.
    pub backup_bytes: [u64; 3],
    /// Backups that audited change tracking.
    pub audits: u64,
    /// Chunks those audits found changed behind tracking's back.
    pub audit_mismatches: u64,
}

impl Jobs {
    /// Starts `work` on a new thread and returns its job.
    pub fn spawn(
        &self,
        kind: &str,
        target: &str,
        disks: Vec<String>,
        work: impl FnOnce(&Progress) -> Result<Report, OpError> + Send + 'static,
    ) -> JobInfo {
        let id = format!("job-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let job = Arc::new(Job {
            id: id.clone(),
            kind: kind.into(),
            target: target.into(),
            disks,
            started_unix: novabackup_engine::time::now_unix(),
            started: Instant::now(),
            progress: Arc::new(Progress::default()),
            cancelled: Default::default(),
            outcome: Mutex::new(None),
            ended: Default::default(),
        });
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.push(job.clone());
            let excess = jobs.len().saturating_sub(KEEP);
            let mut removed = 0;
            jobs.retain(|j| {
                let finished = j.outcome.lock().map(|o| o.is_some()).unwrap_or(true);
                if removed < excess && finished {
                    removed += 1;
                    return false;
                }
                true
            });
        }
        let j = job.clone();
        let totals = self.totals.clone();
        let span = tracing::info_span!("job", id = %id, kind, target);
        std::thread::spawn(move || {
            let _g = span.enter();
            tracing::info!("job started");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&j.progress)))
                .unwrap_or_else(|_| Err(OpError::internal("the job crashed; see the agent's log")))
                .map(Arc::new)
                .map_err(Arc::new);
            let state = match &r {
                Ok(_) => JobState::Succeeded,
                Err(_) if j.cancelled.load(std::sync::atomic::Ordering::Relaxed) => {
                    JobState::Cancelled
                }
                Err(_) => JobState::Failed,
            };
            match &r {
                Ok(_) => tracing::info!(elapsed = ?j.started.elapsed(), "job succeeded"),
                Err(e) => tracing::warn!(?state, "job ended: {e}"),
            }
            let secs = j.started.elapsed().as_secs_f64();
            {
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                let st = serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                *t.outcomes.entry((j.kind.clone(), st)).or_default() += 1;
                let d = t.durations.entry(j.kind.clone()).or_default();
                let b = DURATION_BUCKETS
                    .iter()
                    .position(|&u| secs <= u)
                    .unwrap_or(DURATION_BUCKETS.len());
                d.0[b] += 1;
                d.1 += secs;
                if let Ok(Report::Backup(b)) = r.as_deref() {
                    let st = &b.stats;
                    for (i, n) in [st.bytes_read, st.bytes_new, st.bytes_stored]
                        .into_iter()
                        .enumerate()
                    {
                        t.backup_bytes[i] += n;
                    }
                    if let Some(a) = &b.audit {
                        t.audits += 1;
                        t.audit_mismatches += a.mismatches;
                    }
                }
            }
            *j.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some((state, r, secs));
            j.ended.notify_all();
        });
        info(&job)
    }

    /// What finished jobs add up to.
    pub fn totals(&self) -> Totals {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<JobInfo> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|j| info(j))
            .collect()
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<JobInfo> {
        self.find(id).map(|j| info(&j))
    }

    /// One job, once it has ended or after `timeout`.
    pub fn wait(&self, id: &str, timeout: std::time::Duration) -> Option<JobInfo> {
        let j = self.find(id)?;
        let outcome = j.outcome.lock().unwrap_or_else(|p| p.into_inner());
        // The guard must go before `info` locks the outcome again.
        drop(
            j.ended
                .wait_timeout_while(outcome, timeout, |o| o.is_none()),
        );
        Some(info(&j))
    }

    /// Asks a job to stop.
    pub fn cancel(&self, id: &str) -> Option<JobInfo> {
        let j = self.find(id)?;
        j.cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        j.progress.cancel();
        Some(info(&j))
    }

    fn find(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }
}

fn info(j: &Job) -> JobInfo {
    let (done, total) = j.progress.get();
    let outcome = j.outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let elapsed = outcome
        .as_ref()
        .map(|o| o.2)
        .unwrap_or_else(|| j.started.elapsed().as_secs_f64());
    let rate = if elapsed > 0.0 {
        done as f64 / elapsed
    } else {
        0.0
    };
    let (state, result, error) = match outcome {
        None => (JobState::Running, None, None),
        Some((s, Ok(r), _)) => (
            s,
            Some(serde_json::to_value(&*r).expect("reports serialize")),
            None,
        ),
        Some((s, Err(e), _)) => (s, None, Some(e.to_string())),
    };
    let eta_seconds = (state == JobState::Running && rate > 0.0 && total >= done)
        .then(|| (total - done) as f64 / rate);
    JobInfo {
        id: j.id.clone(),
        kind: j.kind.clone(),
        target: j.target.clone(),
        disks: j.disks.clone(),
        state,
        done,
        total,
        rate,
        eta_seconds,
        started: novabackup_engine::time::rfc3339(j.started_unix),
        elapsed_seconds: elapsed,
        result,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wait_returns_at_the_timeout_while_running_and_at_once_when_the_job_ends() {
        let jobs = Jobs::default();
        let (go, gate) = std::sync::mpsc::sync_channel::<()>(0);
        let j = jobs.spawn("backup", "vm", vec!["vm".into()], move |_| {
            gate.recv().ok();
            Ok(Report::Gc(Default::default()))
        });
        let t = Instant::now();
        let r = jobs.wait(&j.id, Duration::from_millis(100)).unwrap();
        assert_eq!(r.state, JobState::Running);
        assert!(t.elapsed() >= Duration::from_millis(100));

        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            go.send(()).unwrap();
        });
        let t = Instant::now();
        let r = jobs.wait(&j.id, Duration::from_secs(60)).unwrap();
        assert_eq!(r.state, JobState::Succeeded);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        releaser.join().unwrap();

        // Ended: no wait at all; unknown: none.
        let t = Instant::now();
        assert_eq!(
            jobs.wait(&j.id, Duration::from_secs(60)).unwrap().state,
            JobState::Succeeded
        );
        assert!(t.elapsed() < Duration::from_secs(30));
        assert!(jobs.wait("job-99", Duration::from_secs(60)).is_none());
    }
}
