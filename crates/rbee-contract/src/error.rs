use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable, machine-readable error codes, shared by HTTP error bodies and `error` events.
///
/// Clients match on these; the message beside them is for humans and may change.
/// A code this build does not know deserializes as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a value is out of range.
    BadRequest,
    /// The daemon does not carry out this operation.
    UnsupportedOperation,
    /// Missing or wrong credentials.
    Unauthorized,
    /// Valid credentials that do not allow this request (e.g. an API key where an admin key
    /// is needed).
    Forbidden,
    /// No such job, worker, hive or route.
    NotFound,
    /// The requested model is not served here.
    ModelNotFound,
    /// The model could not be loaded.
    ModelLoadFailed,
    /// The prompt (plus requested tokens) does not fit the model's context.
    ContextLengthExceeded,
    /// Every slot is taken and the queue is full; retry later.
    Busy,
    /// The job was cancelled by its client or by shutdown.
    Cancelled,
    /// The worker went away after generation had started.
    WorkerLost,
    /// No hive or device has room for the request.
    NoCapacity,
    /// A component this job depends on could not be reached.
    Unavailable,
    /// The daemon is shutting down and takes no new work.
    ShuttingDown,
    /// A timeout elapsed.
    Timeout,
    /// The feature exists in the protocol but this build does not provide it yet.
    NotImplemented,
    /// A bug or an unexpected failure; details are in the daemon's log.
    Internal,
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedOperation => "unsupported_operation",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::ModelLoadFailed => "model_load_failed",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::Busy => "busy",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::WorkerLost => "worker_lost",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status this code maps to when it is the answer to a request.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::UnsupportedOperation
            | ErrorCode::ContextLengthExceeded => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::ModelNotFound => 404,
            ErrorCode::Busy => 429,
            ErrorCode::NotImplemented => 501,
            ErrorCode::WorkerLost | ErrorCode::ModelLoadFailed => 502,
            ErrorCode::NoCapacity | ErrorCode::Unavailable | ErrorCode::ShuttingDown => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Cancelled => 499,
            ErrorCode::Internal | ErrorCode::Unknown => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every non-2xx answer from rbee's own (non-OpenAI) routes:
/// `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}
