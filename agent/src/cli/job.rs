//! Waiting for a job with a progress bar (bytes, rate, ETA) on stderr.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use novabackup_api::types::{JobInfo, JobState};
use novabackup_api::Client;

/// Polls `job` until it ends; shows a bar unless `quiet`. Units are bytes
/// unless `unit` says otherwise.
pub fn wait(client: &Client, mut job: JobInfo, quiet: bool, unit: &str) -> anyhow::Result<JobInfo> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    let template = if unit == "bytes" {
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}"
            .to_string()
    } else {
        format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}")
    };
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} {}", job.kind, job.target));
    loop {
        bar.set_length(job.total);
        bar.set_position(job.done);
        if job.state != JobState::Running {
            bar.finish_and_clear();
            return Ok(job);
        }
        // A long poll: the agent answers at once when the job ends, else
        // after the pause, which paces the bar.
        job = client.wait_job(&job.id, Duration::from_millis(200))?;
    }
}

/// Turns a failed or cancelled job into an error.
pub fn result(job: &JobInfo) -> anyhow::Result<&serde_json::Value> {
    match job.state {
        JobState::Succeeded => Ok(job.result.as_ref().expect("a succeeded job has a result")),
        JobState::Cancelled => anyhow::bail!(
            "{} {} was cancelled: {}",
            job.kind,
            job.target,
            job.error.as_deref().unwrap_or("")
        ),
        _ => anyhow::bail!(
            "{} {} failed: {}",
            job.kind,
            job.target,
            job.error.as_deref().unwrap_or("unknown error")
        ),
    }
}

/// `novabackup job ...`.
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Wait for a job to end, showing its progress; fails if it failed.
    Wait {
        /// Job id (see `novabackup jobs`).
        id: String,
        /// Print the ended job as JSON (and succeed whatever its state).
        #[arg(long)]
        json: bool,
    },
    /// Ask a job to stop. A live restore or a promotion pauses: its
    /// export stays up, and `job resume` goes on with the copy.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Go on with the copy of a paused (cancelled) or failed live restore
    /// or promotion, as a new job.
    Resume {
        /// Id of the paused job.
        id: String,
        /// Return at once instead of following the new job.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Runs a `job` subcommand.
pub fn run(client: &Client, c: JobCommand) -> anyhow::Result<()> {
    match c {
        JobCommand::Wait { id, json } => {
            let j = wait(client, client.job(&id)?, json, "bytes")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&j)?);
                return Ok(());
            }
            result(&j)?;
            println!("{} {} {}: succeeded", j.id, j.kind, j.target);
        }
        JobCommand::Cancel { id } => {
            let j = client.cancel(&id)?;
            println!("{} {} {}: cancel asked", j.id, j.kind, j.target);
        }
        JobCommand::Resume { id, no_wait } => {
            let j = client.resume(&id)?;
            if no_wait {
                println!("{} {} {}: resumed", j.id, j.kind, j.target);
                return Ok(());
            }
            let j = wait(client, j, false, "bytes")?;
            result(&j)?;
            println!("{} {} {}: succeeded", j.id, j.kind, j.target);
        }
    }
    Ok(())
}
