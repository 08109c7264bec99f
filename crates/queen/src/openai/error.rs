//! OpenAI's error object, and the one mapping from rbee's [`ErrorCode`] to it.
//!
//! Every failure of an OpenAI route, whether found while parsing the request, by the job
//! server refusing the job, or in the job's terminal `error` event, becomes an
//! [`OpenAiError`] through [`OpenAiError::from_code`], so a code always gets the same status,
//! `type` and `Retry-After`.

use axum::Json;
use axum::http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use job_server::ApiError;
use rbee_contract::ErrorCode;
use serde::Serialize;
use utoipa::ToSchema;

/// Seconds a client should wait before retrying a saturated cluster.
const RETRY_BUSY_SECS: u32 = 1;
/// Seconds before retrying when no worker or hive could take the request.
const RETRY_UNAVAILABLE_SECS: u32 = 5;

/// The body of every error answer of the OpenAI routes, and of the error chunk of a stream
/// that fails after it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorObject {
    /// For humans; may change.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, e.g. `temperature` or `messages[0].content`.
    pub param: Option<String>,
    /// Stable and machine-readable: rbee's error code (`model_not_found`, `busy`,
    /// `worker_lost` …), or `invalid_api_key` for a missing or wrong key.
    pub code: Option<String>,
}

/// An error answered by an OpenAI route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenAiError {
    pub status: StatusCode,
    pub body: ErrorObject,
    pub retry_after: Option<u32>,
}

impl OpenAiError {
    /// The one mapping from an rbee error code to OpenAI's status, `type` and `Retry-After`.
    pub fn from_code(code: ErrorCode, message: impl Into<String>) -> Self {
        use ErrorCode as C;
        let (status, kind, retry_after) = match code {
            C::BadRequest | C::UnsupportedOperation | C::ContextLengthExceeded => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            C::Unauthorized => (StatusCode::UNAUTHORIZED, "authentication_error", None),
            C::Forbidden => (StatusCode::FORBIDDEN, "permission_error", None),
            C::NotFound | C::ModelNotFound => (StatusCode::NOT_FOUND, "not_found_error", None),
            C::Busy => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some(RETRY_BUSY_SECS),
            ),
            C::NoCapacity | C::Unavailable | C::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some(RETRY_UNAVAILABLE_SECS),
            ),
            C::WorkerLost | C::ModelLoadFailed => (StatusCode::BAD_GATEWAY, "server_error", None),
            C::Timeout => (StatusCode::GATEWAY_TIMEOUT, "server_error", None),
            C::NotImplemented => (StatusCode::NOT_IMPLEMENTED, "server_error", None),
            // A job cancelled while its client still waits was cancelled by the queen
            // (shutdown) or by an operator's DELETE: the service did not answer.
            C::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            C::Internal | C::Unknown => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let param = (code == C::ModelNotFound).then(|| "model".to_string());
        OpenAiError {
            status,
            body: ErrorObject {
                message: message.into(),
                kind: kind.to_string(),
                param,
                code: Some(code.as_str().to_string()),
            },
            retry_after,
        }
    }

    /// A job's terminal `error` event, for an OpenAI client: the message's first line only.
    /// Later lines are reports for operators (a worker's log tail, the log's path on its
    /// hive); they go to the queen's log with the job id, not to API clients.
    pub fn from_job(job_id: &str, code: ErrorCode, message: &str) -> Self {
        let first = message.lines().next().unwrap_or_default().trim_end();
        if first.len() < message.trim_end().len() {
            tracing::warn!(job_id, %code, message, "job failed; its details are only logged");
        }
        Self::from_code(code, first)
    }

    /// A `400` about the request parameter `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::bad_request(Some(param.into()), message)
    }

    pub fn bad_request(param: Option<String>, message: impl Into<String>) -> Self {
        let mut err = Self::from_code(ErrorCode::BadRequest, message);
        err.body.param = param;
        err
    }

    /// A `401`; `code` is OpenAI's `invalid_api_key`, which clients recognise.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut err = Self::from_code(ErrorCode::Unauthorized, message);
        err.body.code = Some("invalid_api_key".to_string());
        err
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.body.clone(),
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(err: ApiError) -> Self {
        OpenAiError::from_code(err.code, err.message)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = ?self.body.code, message = %self.body.message, "OpenAI request failed");
        } else {
            tracing::debug!(status = %self.status, code = ?self.body.code, message = %self.body.message, "OpenAI request rejected");
        }
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_an_error_status() {
        let codes = [
            (ErrorCode::BadRequest, 400, None),
            (ErrorCode::UnsupportedOperation, 400, None),
            (ErrorCode::ContextLengthExceeded, 400, None),
            (ErrorCode::Unauthorized, 401, None),
            (ErrorCode::Forbidden, 403, None),
            (ErrorCode::NotFound, 404, None),
            (ErrorCode::ModelNotFound, 404, None),
            (ErrorCode::Busy, 429, Some(1)),
            (ErrorCode::NoCapacity, 503, Some(5)),
            (ErrorCode::Unavailable, 503, Some(5)),
            (ErrorCode::ShuttingDown, 503, Some(5)),
            (ErrorCode::Cancelled, 503, None),
            (ErrorCode::WorkerLost, 502, None),
            (ErrorCode::ModelLoadFailed, 502, None),
            (ErrorCode::Timeout, 504, None),
            (ErrorCode::NotImplemented, 501, None),
            (ErrorCode::Internal, 500, None),
            (ErrorCode::Unknown, 500, None),
        ];
        for (code, status, retry) in codes {
            let err = OpenAiError::from_code(code, "m");
            assert_eq!(err.status.as_u16(), status, "{code}");
            assert_eq!(err.retry_after, retry, "{code}");
            assert_eq!(err.body.code.as_deref(), Some(code.as_str()));
        }
    }

    #[test]
    fn the_body_is_openais_error_object() {
        let err = OpenAiError::from_code(ErrorCode::ModelNotFound, "no model `x`");
        assert_eq!(
            serde_json::to_value(err.body()).unwrap(),
            serde_json::json!({"error": {"message": "no model `x`", "type": "not_found_error",
                                         "param": "model", "code": "model_not_found"}})
        );
        let bad = OpenAiError::invalid("n", "`n` must be 1");
        assert_eq!(
            serde_json::to_value(bad.body()).unwrap(),
            serde_json::json!({"error": {"message": "`n` must be 1", "type": "invalid_request_error",
                                         "param": "n", "code": "bad_request"}})
        );
    }

    #[test]
    fn saturation_answers_carry_retry_after() {
        let response = OpenAiError::from_code(ErrorCode::Busy, "full").into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let response = OpenAiError::unauthorized("no key").into_response();
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
    }
}
