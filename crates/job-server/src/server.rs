//! The job registry: creating, finding, cancelling and retiring jobs.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::StatusCode;
use futures::FutureExt;
use rbee_contract::{ErrorCode, JobCreated, JobEvent, Operation, job_stream_path};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::{ApiError, JobFailure};
use crate::executor::{JobContext, JobExecutor};
use crate::job::{CancelReason, EventSink, Job, JobSubscription};
use crate::log::OpenError;

/// How long shutdown waits for the jobs it cancelled at the end of the grace period.
const CUT_JOBS_LIMIT: Duration = Duration::from_secs(5);

/// Limits and timings of a [`JobServer`]; `Default` holds the production values.
#[derive(Debug, Clone)]
pub struct JobServerConfig {
    /// Events a job buffers for its clients. When all of them are still unread, the job's
    /// `emit` waits; events some client already received are evicted to make room.
    pub buffer_capacity: usize,
    /// How long a finished job stays readable (for late readers and resumes) before removal.
    pub retention: Duration,
    /// A job whose stream is not opened within this time is cancelled.
    pub unclaimed_timeout: Duration,
    /// A job created with `cancel_on_disconnect = false` is cancelled when no stream has been
    /// attached for this long after the last one closed: the time a client has to resume.
    pub detached_timeout: Duration,
    /// Jobs the registry holds at most, running and retained together. Retained finished jobs
    /// are dropped early to make room; when every slot holds a running job, creation answers
    /// `503 busy`. `None` means no limit beyond retention.
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
            retention: Duration::from_secs(300),
            unclaimed_timeout: Duration::from_secs(60),
            detached_timeout: Duration::from_secs(300),
            max_jobs: None,
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
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Fired when shutdown begins: from then on new jobs are refused.
    closed: CancellationToken,
    /// Parent of every job's token: cancelling it cancels all jobs still running and ends the
    /// retention of finished ones.
    shutdown: CancellationToken,
    /// Jobs created and not yet ended; shutdown waits for it to reach zero.
    running: watch::Sender<usize>,
    tracker: TaskTracker,
}

impl<E> Inner<E> {
    fn jobs(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
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
                jobs: Mutex::new(HashMap::new()),
                closed: CancellationToken::new(),
                shutdown: CancellationToken::new(),
                running: watch::Sender::new(0),
                tracker: TaskTracker::new(),
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
            self.inner.config.buffer_capacity,
        ));
        {
            let mut jobs = self.inner.jobs();
            if let Some(max) = self.inner.config.max_jobs
                && jobs.len() >= max
            {
                let oldest_finished = jobs
                    .values()
                    .filter_map(|j| j.finished_at().map(|at| (at, j.id.clone())))
                    .min();
                match oldest_finished {
                    Some((_, old)) => {
                        jobs.remove(&old);
                    }
                    None => {
                        return Err(ApiError::new(
                            ErrorCode::Busy,
                            format!("this daemon already runs {max} jobs; retry later"),
                        )
                        .with_status(StatusCode::SERVICE_UNAVAILABLE));
                    }
                }
            }
            jobs.insert(id.clone(), Arc::clone(&job));
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
        let finished = jobs.values().filter(|j| j.is_finished()).count();
        JobStats {
            running: jobs.len() - finished,
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
    job.finish(terminal);
    inner.running.send_modify(|n| *n = n.saturating_sub(1));

    tokio::select! {
        () = tokio::time::sleep(config.retention) => {}
        () = inner.shutdown.cancelled() => {}
    }
    let mut jobs = inner.jobs();
    if jobs.get(&job.id).is_some_and(|j| Arc::ptr_eq(j, &job)) {
        jobs.remove(&job.id);
        tracing::debug!("finished job removed");
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
