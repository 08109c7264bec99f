//! rbee's wire contract: every type that crosses a process boundary.
//!
//! This crate is data only: serde types, no I/O and no async runtime, so that every
//! component (and every test) can depend on it cheaply. The JSON shape of each type is
//! pinned by fixtures under `tests/fixtures`; changing a shape is a protocol change.
//!
//! It is not the place for validation beyond what the types themselves express: daemons
//! parse these types into their own validated forms at the edge. The exceptions are rules
//! that several daemons must apply alike, so that a value one accepts never fails at another:
//! the grammar of model references ([`model_ref`]), read by the queen and the hive, and the
//! limits of an `infer` request ([`validation`]), applied by the queen's job API, its OpenAI
//! routes and the worker.

mod capacity;
mod error;
mod event;
mod info;
pub mod model_ref;
mod operation;
pub mod prefix;
pub mod validation;

pub use capacity::{CapacityEstimate, DevicesResponse, NoCapacityBody};
pub use error::{ApiErrorBody, ErrorCode, ErrorDetail};
pub use event::{FinishReason, JobEvent, TokenLogprobs, TopLogprob, Usage};
pub use info::{
    DeviceInfo, DeviceKind, HiveHeartbeat, HiveInfo, MAX_WORKER_SLOTS, ModelDetails, ModelEntry,
    ModelState, WorkerHeartbeat, WorkerInfo, WorkerState,
};
pub use operation::{
    ChatMessage, ChatRole, HiveTarget, InferRequest, JobCreated, ModelRef, ModelTarget, Operation,
    ResponseFormat, Tool, ToolCall, WorkerSpawnRequest, WorkerTarget,
};
pub use validation::InvalidField;

/// The SSE `data:` payload that follows the terminal event of every job stream.
pub const DONE_SENTINEL: &str = "[DONE]";

/// Path of the job creation route on every daemon.
pub const JOBS_PATH: &str = "/v1/jobs";

/// Path of a job's event stream.
pub fn job_stream_path(job_id: &str) -> String {
    format!("/v1/jobs/{job_id}/stream")
}
