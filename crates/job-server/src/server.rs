//! The job registry: creating, finding, cancelling and retiring jobs.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::StatusCode;
use futures::FutureExt;
use rbee_contract::{ErrorCode, JobCreated, JobEvent, Operation, job_stream_path};
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::{ApiError, JobFailure};
use crate::executor::{JobContext, JobExecutor};
use crate::job::{CancelReason, EventSink, Job, JobSubscription};
use crate::log::{LogLimits, OpenError};

/// How long shutdown waits for the jobs it cancelled at the end of the grace period.
const CUT_JOBS_LIMIT: Duration = Duration::from_secs(5);

/// Limits and timings of a [`JobServer`]; `Default` holds the production values.
#[derive(Debug, Clone)]
pub struct JobServerConfig {
    /// Events a running job buffers for its clients. When all of them are still unread, the
    /// job's `emit` waits; events some client already received are evicted to make room.
    pub buffer_capacity: usize,
    /// Bytes (of the events' JSON) a running job buffers for its clients, on top of
    /// [`buffer_capacity`](Self::buffer_capacity): whichever is reached first holds the job
    /// back the same way. An event is taken while the buffer holds less, so one event larger
    /// than this still goes through.
    pub buffer_bytes: usize,
    /// Bytes (of the events' JSON) of the newest non-terminal events a finished job keeps for
    /// late readers and resumes; its terminal event is always kept. Older events are dropped
    /// once some stream has received them and no attached stream still has to, and resuming
    /// before them is a `410`. Events no stream has received yet are kept (they are bounded
    /// by the running buffer), so a job that ends before its stream is opened is read whole.
    pub retained_tail_bytes: usize,
    /// How long a finished job stays readable (for late readers and resumes) before removal.
    pub retention: Duration,
    /// A job whose stream is not opened within this time is cancelled.
    pub unclaimed_timeout: Duration,
    /// A job created with `cancel_on_disconnect = false` is cancelled when no stream has been
    /// attached for this long after the last one closed: the time a client has to resume. It
    /// also bounds how long a job outlives a client that died without cancelling it (the
    /// queen relaying it to a worker, say), holding the worker's slot, so it is seconds more
    /// than a resume takes, not minutes.
    pub detached_timeout: Duration,
    /// Jobs the registry holds at most, running and retained together. Retained finished jobs
    /// are dropped early to make room; when every slot holds a running job, creation answers
    /// `503 busy`. `None` means no limit beyond retention, where memory grows with the rate
    /// of jobs times the retention period.
    pub max_jobs: Option<usize>,
    /// Interval of SSE keep-alive comments on an idle stream.
    pub keep_alive: Duration,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
}

impl Default for JobServerConfig {
    fn default() -> Self {
        JobServerConfig {
            buffer_capacity: 1024,
            buffer_bytes: 256 * 1024,
            retained_tail_bytes: 64 * 1024,
            retention: Duration::from_secs(300),
            unclaimed_timeout: Duration::from_secs(60),
            detached_timeout: Duration::from_secs(30),
            max_jobs: Some(4096),
            keep_alive: Duration::from_secs(15),
            body_limit: 4 * 1024 * 1024,
        }
    }
}

/// Per-job choices of the client. On `POST /v1/jobs` they come from the query string,
/// e.g. `POST /v1/jobs?cancel_on_disconnect=false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct JobOptions {
    /// Closing the stream before the terminal event cancels the job (default `true`).
    /// With `false` the job keeps running and a client may resume with `Last-Event-ID`
    /// within [`JobServerConfig::detached_timeout`].
    pub cancel_on_disconnect: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            cancel_on_disconnect: true,
        }
    }
}

/// The answer to a cancellation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was running; its stream ends with an `error` event of code `cancelled`.
    Cancelling,
    /// The job had already ended; nothing changed.
    AlreadyEnded,
}

/// A snapshot of the registry, e.g. for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobStats {
    pub running: usize,
    /// Finished jobs still retained.
    pub finished: usize,
}

/// The job protocol of one daemon: a registry of jobs run by the executor `E`.
///
/// Cheap to clone (shared state). Serve it with [`JobServer::router`].
pub struct JobServer<E> {
    inner: Arc<Inner<E>>,
}

impl<E> Clone for JobServer<E> {
    fn clone(&self) -> Self {
        JobServer {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E> std::fmt::Debug for JobServer<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobServer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner<E> {
    executor: E,
    config: JobServerConfig,
    jobs: Mutex<Jobs>,
    /// Fired when shutdown begins: from then on new jobs are refused.
    closed: CancellationToken,
    /// Parent of every job's token: cancelling it cancels all jobs still running and ends the
    /// retention of finished ones.
    shutdown: CancellationToken,
    /// Jobs created and not yet ended; shutdown waits for it to reach zero.
    running: watch::Sender<usize>,
    tracker: TaskTracker,
    /// Whether the reaper of finished jobs runs (it starts with the first finished job).
    reaper_started: AtomicBool,
    /// Wakes the reaper when a job finishes (it may be waiting with none retained).
    finished_added: Notify,
}

/// The registry proper.
#[derive(Default)]
struct Jobs {
    by_id: HashMap<String, Arc<Job>>,
    /// Finished jobs, oldest first, with the end of their retention: the job dropped early
    /// when the registry is full is found at once, not by a scan of every job under the lock
    /// on each creation, and one reaper removes jobs as their retention ends (every job is
    /// retained for the same time, so they end in this order). Ids whose job has already left
    /// are skipped.
    finished: VecDeque<(String, tokio::time::Instant)>,
}

impl Jobs {
    /// Removes the finished job that finished first; `None` when every job still runs.
    fn drop_oldest_finished(&mut self) -> Option<Arc<Job>> {
        while let Some((id, _)) = self.finished.pop_front() {
            if let Some(job) = self.remove_finished(&id) {
                return Some(job);
            }
        }
        None
    }

    fn remove_finished(&mut self, id: &str) -> Option<Arc<Job>> {
        if self.by_id.get(id).is_some_and(|job| job.is_finished()) {
            self.by_id.remove(id)
        } else {
            None
        }
    }

    /// Removes the jobs whose retention ended by `now`; returns when the next one ends.
    fn reap(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        while let Some((id, until)) = self.finished.front() {
            if *until > now {
                return Some(*until);
            }
            let id = id.clone();
            self.finished.pop_front();
            if self.remove_finished(&id).is_some() {
                tracing::debug!(job_id = %id, "finished job removed");
            }
        }
        None
    }

    /// Removes every finished job (shutdown ends their retention).
    fn reap_all(&mut self) {
        while self.drop_oldest_finished().is_some() {}
    }
}

impl<E> Inner<E> {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<E: JobExecutor> JobServer<E> {
    pub fn new(executor: E, config: JobServerConfig) -> Self {
        JobServer {
            inner: Arc::new(Inner {
                executor,
                config,
                jobs: Mutex::new(Jobs::default()),
                closed: CancellationToken::new(),
                shutdown: CancellationToken::new(),
                running: watch::Sender::new(0),
                tracker: TaskTracker::new(),
                reaper_started: AtomicBool::new(false),
                finished_added: Notify::new(),
            }),
        }
    }

    pub fn executor(&self) -> &E {
        &self.inner.executor
    }

    pub fn config(&self) -> &JobServerConfig {
        &self.inner.config
    }

    /// Admits `operation` and starts the job at once. This is what `POST /v1/jobs` does;
    /// daemons call it from their own routes (e.g. the worker's `POST /v1/inference`).
    ///
    /// Must be called within a Tokio runtime. If the registry is full the admitted job is
    /// dropped and the answer is `503 busy`.
    pub fn create(
        &self,
        operation: Operation,
        options: JobOptions,
    ) -> Result<JobCreated, ApiError> {
        if self.inner.closed.is_cancelled() {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            ));
        }
        let operation_name = operation.name();
        let work = self.inner.executor.admit(operation)?;

        let id = uuid::Uuid::new_v4().to_string();
        let job = Arc::new(Job::new(
            id.clone(),
            self.inner.shutdown.child_token(),
            options.cancel_on_disconnect,
            LogLimits {
                capacity: self.inner.config.buffer_capacity,
                bytes: self.inner.config.buffer_bytes,
                tail_bytes: self.inner.config.retained_tail_bytes,
            },
        ));
        {
            let mut jobs = self.inner.jobs();
            if let Some(max) = self.inner.config.max_jobs
                && jobs.by_id.len() >= max
                && jobs.drop_oldest_finished().is_none()
            {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!("this daemon already runs {max} jobs; retry later"),
                )
                .with_status(StatusCode::SERVICE_UNAVAILABLE));
            }
            jobs.by_id.insert(id.clone(), Arc::clone(&job));
            self.inner.running.send_modify(|n| *n += 1);
        }

        let span = tracing::info_span!("job", job_id = %id, operation = operation_name);
        self.inner
            .tracker
            .spawn(supervise(Arc::clone(&self.inner), job, work).instrument(span));
        Ok(JobCreated {
            sse_url: job_stream_path(&id),
            job_id: id,
        })
    }

    /// Reads a job's events after `last_event_id` (from the first when `None`).
    /// Dropping the subscription early cancels the job as a closed stream does.
    pub fn subscribe(
        &self,
        job_id: &str,
        last_event_id: Option<u64>,
    ) -> Result<JobSubscription, ApiError> {
        let job = self.find(job_id)?;
        job.subscribe(last_event_id).map_err(|err| match err {
            OpenError::Gone { oldest } => ApiError::not_found(format!(
                "the events of job {job_id} before id {oldest} are no longer buffered"
            ))
            .with_status(StatusCode::GONE),
            OpenError::Ahead { newest } => ApiError::bad_request(format!(
                "Last-Event-ID {} is past the newest event of job {job_id} ({newest})",
                last_event_id.unwrap_or_default()
            )),
        })
    }

    pub fn cancel(&self, job_id: &str) -> Result<CancelOutcome, ApiError> {
        let job = self.find(job_id)?;
        if job.is_finished() {
            return Ok(CancelOutcome::AlreadyEnded);
        }
        tracing::info!(job_id, "job cancelled by request");
        job.cancel(CancelReason::Request);
        Ok(CancelOutcome::Cancelling)
    }

    pub fn stats(&self) -> JobStats {
        let jobs = self.inner.jobs();
        let finished = jobs.by_id.values().filter(|j| j.is_finished()).count();
        JobStats {
            running: jobs.by_id.len() - finished,
            finished,
        }
    }

    /// Whether shutdown has begun (new jobs are refused).
    pub fn is_shutting_down(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Refuses new jobs from now on (`503 shutting_down`), leaving running ones be. A daemon
    /// that answers a shutdown request calls it before answering, so that nothing created
    /// after the answer slips in before [`JobServer::shutdown`] starts draining.
    pub fn close(&self) {
        self.inner.closed.cancel();
        self.inner.tracker.close();
    }

    /// Drains the server: refuses new jobs (`503 shutting_down`) at once, lets running jobs
    /// finish for up to `grace`, then cancels the ones still running, whose streams end with an
    /// `error` event of code `shutting_down` (never a silent cut). Finished jobs stop being
    /// retained. Returns whether every job finished on its own within `grace`.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.close();
        let running = *self.inner.running.borrow();
        tracing::info!(running, ?grace, "job server draining");
        let mut count = self.inner.running.subscribe();
        let drained = tokio::time::timeout(grace, count.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !drained {
            let cut: Vec<Arc<Job>> = self
                .inner
                .jobs()
                .by_id
                .values()
                .filter(|job| !job.is_finished())
                .cloned()
                .collect();
            tracing::warn!(
                jobs = cut.len(),
                ?grace,
                "jobs still running after the shutdown grace period; ending them"
            );
            for job in cut {
                job.cancel(CancelReason::Shutdown);
            }
        }
        self.inner.shutdown.cancel();
        // A cancelled job ends at once (its supervisor stops polling it); the bound only
        // guards against an executor whose drop blocks.
        if tokio::time::timeout(CUT_JOBS_LIMIT, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("jobs did not end after being cancelled for shutdown");
        }
        drained
    }

    fn find(&self, job_id: &str) -> Result<Arc<Job>, ApiError> {
        self.inner
            .jobs()
            .by_id
            .get(job_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no job {job_id}")))
    }
}

/// Runs one job to its terminal event, then keeps it for the retention period.
async fn supervise<E: JobExecutor>(inner: Arc<Inner<E>>, job: Arc<Job>, work: E::Job) {
    tracing::info!(
        cancel_on_disconnect = job.cancel_on_disconnect,
        "job started"
    );
    let config = &inner.config;
    let ctx = JobContext {
        job_id: job.id.clone(),
        events: EventSink::new(Arc::clone(&job)),
        cancel: job.cancel.clone(),
    };
    let run = AssertUnwindSafe(inner.executor.run(work, ctx)).catch_unwind();

    let terminal = tokio::select! {
        biased;
        () = job.cancel.cancelled() => job.cancelled_event(),
        result = run => match result {
            Ok(Ok(outcome)) => outcome.into_event(),
            // Cancelled while `run` was being polled: it saw the cancellation (an emit refused)
            // before this select did, and the job ends for the cancellation's reason, as it
            // would have a moment later (`shutting_down`, not the emit's `cancelled`).
            Ok(Err(_)) if job.cancel.is_cancelled() => job.cancelled_event(),
            Ok(Err(failure)) => failure.into_event(),
            Err(panic) => {
                tracing::error!(panic = panic_message(panic.as_ref()), "job panicked");
                JobFailure::internal("the job failed unexpectedly; details are in the daemon's log")
                    .into_event()
            }
        },
        reason = job.wait_unattended(config.unclaimed_timeout, config.detached_timeout) => {
            job.cancel(reason);
            job.cancelled_event()
        }
    };
    match &terminal {
        JobEvent::Done {
            finish_reason,
            usage,
        } => {
            tracing::info!(?finish_reason, ?usage, elapsed = ?job.created_at.elapsed(), "job done");
        }
        JobEvent::Error { code, message } => {
            tracing::info!(%code, message, elapsed = ?job.created_at.elapsed(), "job failed");
        }
        _ => {}
    }
    {
        // Listed as finished in the same moment its terminal event appears, so that a client
        // that saw the event never finds the job missing from the order of eviction.
        let mut jobs = inner.jobs();
        job.finish(terminal);
        jobs.finished.push_back((
            job.id.clone(),
            tokio::time::Instant::now() + config.retention,
        ));
        if inner.shutdown.is_cancelled() {
            jobs.reap_all();
        }
    }
    inner.running.send_modify(|n| *n = n.saturating_sub(1));
    // Retention is kept by one reaper for all jobs, not by this task (as large as the
    // executor's future) or one of its own per job: a job dropped early to make room in a
    // full registry is freed at once, and a finished job costs only its entry.
    if !inner.reaper_started.swap(true, Ordering::AcqRel) {
        let tracker = inner.tracker.clone();
        tracker.spawn(reap(Arc::clone(&inner)).instrument(tracing::Span::none()));
    }
    inner.finished_added.notify_one();
}

/// Removes finished jobs as their retention ends, until shutdown, which ends it for all.
async fn reap<E>(inner: Arc<Inner<E>>) {
    loop {
        let next = inner.jobs().reap(tokio::time::Instant::now());
        let wait = async {
            match next {
                Some(until) => tokio::time::sleep_until(until).await,
                // `notify_one` stores a permit, so a job finished since the check still wakes.
                None => inner.finished_added.notified().await,
            }
        };
        tokio::select! {
            () = wait => {}
            () = inner.shutdown.cancelled() => break,
        }
    }
    inner.jobs().reap_all();
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LogLimits = LogLimits {
        capacity: 4,
        bytes: 1024,
        tail_bytes: 1024,
    };

    fn finished_job(jobs: &mut Jobs, id: &str, until: tokio::time::Instant) -> Arc<Job> {
        let job = Arc::new(Job::new(id.into(), CancellationToken::new(), true, LIMITS));
        job.finish(JobEvent::error(ErrorCode::Cancelled, "over"));
        jobs.by_id.insert(id.into(), Arc::clone(&job));
        jobs.finished.push_back((id.into(), until));
        job
    }

    #[tokio::test(start_paused = true)]
    async fn retention_ends_in_order_and_skips_jobs_already_gone() {
        let mut jobs = Jobs::default();
        let t0 = tokio::time::Instant::now();
        let second = |n| t0 + Duration::from_secs(n);
        for i in 0..4 {
            finished_job(&mut jobs, &format!("j{i}"), second(i + 1));
        }
        assert_eq!(
            jobs.drop_oldest_finished().map(|j| j.id.clone()),
            Some("j0".into())
        );
        jobs.by_id.remove("j2");
        assert_eq!(jobs.reap(second(2)), Some(second(3)));
        assert_eq!(jobs.reap(second(3)), Some(second(4)));
        assert_eq!(jobs.by_id.keys().collect::<Vec<_>>(), vec!["j3"]);
        assert_eq!(jobs.reap(second(4)), None);
        assert!(jobs.by_id.is_empty() && jobs.finished.is_empty());
    }

    #[test]
    fn a_running_job_is_never_dropped_for_room() {
        let mut jobs = Jobs::default();
        let running = Arc::new(Job::new("r".into(), CancellationToken::new(), true, LIMITS));
        jobs.by_id.insert("r".into(), running);
        assert!(jobs.drop_oldest_finished().is_none());
        finished_job(&mut jobs, "f", tokio::time::Instant::now());
        assert_eq!(
            jobs.drop_oldest_finished().map(|j| j.id.clone()),
            Some("f".into())
        );
        assert!(jobs.by_id.contains_key("r"));
        jobs.reap_all();
        assert!(
            jobs.by_id.contains_key("r"),
            "shutdown leaves running jobs be"
        );
    }
}
