//! What a daemon implements to carry out jobs.

use std::future::Future;

use rbee_contract::{JobEvent, Operation};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, EmitError, JobResult};
use crate::job::EventSink;

/// The daemon-specific half of the job protocol.
///
/// `admit` turns a wire [`Operation`] into the daemon's validated job (parse, don't validate:
/// nothing after `admit` re-checks the request); `run` carries it out. The server owns
/// everything else: ids, buffering, streaming, cancellation, retention.
pub trait JobExecutor: Send + Sync + 'static {
    /// The validated form of an operation.
    type Job: Send + 'static;

    /// Runs before a job exists. An error is the HTTP answer to the request (usually `400`
    /// with `bad_request` or `unsupported_operation`) and no job is created.
    fn admit(&self, operation: Operation) -> Result<Self::Job, ApiError>;

    /// Carries out the job. Non-terminal events go through `ctx`; the returned value becomes
    /// the job's one terminal event (`Ok` → `done`, `Err` → `error`).
    ///
    /// When the job is cancelled (`ctx.cancel` fires) the server stops polling this future and
    /// drops it, ending the job with an `error` event of code `cancelled` (`shutting_down`
    /// when the server's shutdown grace period ran out first); work that lives
    /// outside the future (a thread, a process) should watch `ctx.cancel` or use drop guards.
    /// A panic in this future ends the job with an `error` event of code `internal`.
    fn run(&self, job: Self::Job, ctx: JobContext) -> impl Future<Output = JobResult> + Send;
}

/// What a running job gets from the server.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job_id: String,
    pub events: EventSink,
    /// Fires when the job is cancelled; a child token of the server's shutdown token.
    pub cancel: CancellationToken,
}

impl JobContext {
    /// Shorthand for `self.events.emit(event)`.
    pub async fn emit(&self, event: JobEvent) -> Result<u64, EmitError> {
        self.events.emit(event).await
    }
}
