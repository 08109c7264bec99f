use rbee_contract::ErrorCode;

/// Everything that can go wrong talking to a job server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be sent or the connection broke.
    #[error("cannot talk to {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server refused the request with an rbee error body.
    #[error("request refused ({status} {code}): {message}")]
    Rejected {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// A non-2xx answer without an rbee error body (a proxy, another service, a crash).
    #[error("{url} answered HTTP {status}: {body}")]
    UnexpectedStatus {
        url: String,
        status: u16,
        body: String,
    },
    /// A 2xx answer that is not what the protocol says it is.
    #[error("invalid answer from {url}: {reason}")]
    InvalidResponse { url: String, reason: String },
    /// The job stream carried something that is not a job event.
    #[error("invalid event in the stream of job {job_id}: {reason}")]
    InvalidEvent { job_id: String, reason: String },
    /// The job stream ended before its terminal event (and could not be resumed).
    #[error("the stream of job {job_id} ended before the job's terminal event")]
    StreamEnded { job_id: String },
}

impl ClientError {
    /// The code to report when this error ends a job one hop up (e.g. the queen relaying a
    /// worker): the server's own code when it sent one, `unavailable` when the other side
    /// could not be reached or went away, `internal` when it broke the protocol.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Rejected { code, .. } => *code,
            ClientError::Transport { .. } | ClientError::StreamEnded { .. } => {
                ErrorCode::Unavailable
            }
            ClientError::UnexpectedStatus { .. }
            | ClientError::InvalidResponse { .. }
            | ClientError::InvalidEvent { .. } => ErrorCode::Internal,
        }
    }

    /// The HTTP status of a refused request.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Rejected { status, .. } | ClientError::UnexpectedStatus { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}
