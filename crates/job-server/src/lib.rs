//! The rbee job protocol, server side: one implementation for every daemon that accepts work.
//!
//! A daemon implements [`JobExecutor`] (admit an [`Operation`](rbee_contract::Operation) into
//! its validated job, then run it while emitting [`JobEvent`](rbee_contract::JobEvent)s) and
//! mounts [`JobServer::router`]. The server owns the protocol: `POST /v1/jobs` (admission
//! before any job exists), eager start, a bounded per-job buffer with back-pressure, the SSE
//! stream with sequence ids and `Last-Event-ID` resume, `[DONE]` after exactly one terminal
//! event, cancellation by `DELETE` or by a closed stream, timeouts for unclaimed jobs,
//! retention of finished jobs and a draining shutdown (refuse new jobs, let running ones finish
//! within a deadline, end the rest with an explicit `shutting_down` error). [`ApiError`] is the one mapping from an error to
//! an HTTP answer, for the job routes and for the daemon's own routes alike.
//!
//! It is not a client (the `job-client` crate is), and it knows nothing about what operations
//! mean or about authentication: both are the daemon's business.

mod error;
mod executor;
mod job;
mod log;
mod routes;
mod server;

pub use error::{ApiError, EmitError, JobFailure, JobOutcome, JobResult, terminal_to_result};
pub use executor::{JobContext, JobExecutor};
pub use job::{EventSink, JobSubscription, SequencedEvent};
pub use routes::{Created, JOB_ID_HEADER, OperationJson};
pub use server::{CancelOutcome, JobOptions, JobServer, JobServerConfig, JobStats};
