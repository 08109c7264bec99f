//! rbee's wire contract: every type that crosses a process boundary.
//!
//! This crate is data only: serde types, no I/O and no async runtime, so that every
//! component (and every test) can depend on it cheaply. The JSON shape of each type is
//! pinned by fixtures under `tests/fixtures`; changing a shape is a protocol change.
//!
//! It is not the place for validation beyond what the types themselves express: daemons
//! parse these types into their own validated forms at the edge. The one exception is the
//! grammar of model references ([`model_ref`]), which the queen and the hive must read alike
//! so that a reference one refuses never reaches the other.

mod capacity;
mod error;
mod event;
mod info;
pub mod model_ref;
mod operation;
pub mod prefix;

pub use capacity::{CapacityEstimate, DevicesResponse, NoCapacityBody};
pub use error::{ApiErrorBody, ErrorCode, ErrorDetail};
pub use event::{FinishReason, JobEvent, Usage};
pub use info::{
    DeviceInfo, DeviceKind, HiveHeartbeat, HiveInfo, MAX_WORKER_SLOTS, ModelDetails, ModelEntry,
    ModelState, WorkerHeartbeat, WorkerInfo, WorkerState,
};
pub use operation::{
    ChatMessage, ChatRole, HiveTarget, InferRequest, JobCreated, ModelRef, ModelTarget, Operation,
    WorkerSpawnRequest, WorkerTarget,
};

/// The SSE `data:` payload that follows the terminal event of every job stream.
pub const DONE_SENTINEL: &str = "[DONE]";

/// Path of the job creation route on every daemon.
pub const JOBS_PATH: &str = "/v1/jobs";

/// Path of a job's event stream.
pub fn job_stream_path(job_id: &str) -> String {
    format!("/v1/jobs/{job_id}/stream")
}
