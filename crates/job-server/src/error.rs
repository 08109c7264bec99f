//! The one mapping from an error to an HTTP answer, and the failures a job can end with.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rbee_contract::{ApiErrorBody, ErrorCode, FinishReason, JobEvent, Usage};

/// An error answered to an HTTP request: a status and an [`ApiErrorBody`] JSON body.
///
/// Every rbee route renders its errors through this type, so a client always gets the same
/// body shape and a stable [`ErrorCode`]. The message is for humans; keep internal details
/// (paths, upstream bodies, backtraces) in the log, not here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    /// An error whose status is the code's default ([`ErrorCode::http_status`]).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The same error answered with another status (e.g. `410` for an evicted resume point).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn unsupported_operation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnsupportedOperation, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn body(&self) -> ApiErrorBody {
        ApiErrorBody::new(self.code, self.message.clone())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = %self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, code = %self.code, message = %self.message, "request rejected");
        }
        (self.status, Json(self.body())).into_response()
    }
}

/// How a job ended well; becomes the [`JobEvent::Done`] terminal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOutcome {
    pub finish_reason: FinishReason,
    pub usage: Option<Usage>,
}

impl JobOutcome {
    pub fn new(finish_reason: FinishReason, usage: Option<Usage>) -> Self {
        JobOutcome {
            finish_reason,
            usage,
        }
    }

    /// A non-generating operation that completed.
    pub fn complete() -> Self {
        JobOutcome {
            finish_reason: FinishReason::Complete,
            usage: None,
        }
    }

    pub fn into_event(self) -> JobEvent {
        JobEvent::Done {
            finish_reason: self.finish_reason,
            usage: self.usage,
        }
    }
}

/// How a job ended badly; becomes the [`JobEvent::Error`] terminal event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct JobFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl JobFailure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        JobFailure {
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn into_event(self) -> JobEvent {
        JobEvent::Error {
            code: self.code,
            message: self.message,
        }
    }
}

impl From<ApiError> for JobFailure {
    fn from(err: ApiError) -> Self {
        JobFailure {
            code: err.code,
            message: err.message,
        }
    }
}

/// What [`JobExecutor::run`](crate::JobExecutor::run) returns: the job's one terminal event.
pub type JobResult = Result<JobOutcome, JobFailure>;

/// Turns a terminal [`JobEvent`] back into a [`JobResult`], so that a relaying executor can
/// return the terminal event it received from the hop below. A non-terminal event is handed
/// back unchanged in `Err`.
pub fn terminal_to_result(event: JobEvent) -> Result<JobResult, JobEvent> {
    match event {
        JobEvent::Done {
            finish_reason,
            usage,
        } => Ok(Ok(JobOutcome {
            finish_reason,
            usage,
        })),
        JobEvent::Error { code, message } => Ok(Err(JobFailure { code, message })),
        other => Err(other),
    }
}

/// Why [`EventSink::emit`](crate::EventSink::emit) refused an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The job was cancelled (by `DELETE`, a client that went away, a timeout or shutdown).
    #[error("the job was cancelled")]
    Cancelled,
    /// The job already has its terminal event.
    #[error("the job has already ended")]
    Ended,
    /// Terminal events come only from the value `run` returns, so that a job has exactly one.
    #[error("terminal events are produced from the result of `run`, not emitted")]
    Terminal,
    /// The event could not be encoded as JSON.
    #[error("the event cannot be encoded: {0}")]
    Encode(String),
}

impl From<EmitError> for JobFailure {
    fn from(err: EmitError) -> Self {
        match err {
            EmitError::Cancelled | EmitError::Ended => {
                JobFailure::new(ErrorCode::Cancelled, err.to_string())
            }
            EmitError::Terminal | EmitError::Encode(_) => JobFailure::internal(err.to_string()),
        }
    }
}
