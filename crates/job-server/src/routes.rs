//! The HTTP face of a [`JobServer`]: routes, extractors and the SSE rendering.

use std::convert::Infallible;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{HeaderMap, LOCATION};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use futures::Stream;
use rbee_contract::{DONE_SENTINEL, JobCreated, Operation};

use crate::error::ApiError;
use crate::executor::JobExecutor;
use crate::job::JobSubscription;
use crate::server::{CancelOutcome, JobOptions, JobServer};

/// The header of a streamed creation answer (`POST /v1/jobs?stream=true`) that names the job.
pub const JOB_ID_HEADER: &str = "x-rbee-job-id";

/// How `POST /v1/jobs` answers, from its query string: `stream=true` answers with the job's
/// event stream itself (`201`, `text/event-stream`, the job's id in [`JOB_ID_HEADER`] and its
/// stream's path in `Location`), sparing a client that will read the stream at once (the queen
/// relaying a worker) the round trip of opening it.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(default)]
struct Answer {
    stream: bool,
}

impl<E: JobExecutor> JobServer<E> {
    /// `POST /v1/jobs`, `GET /v1/jobs/{job_id}/stream` and `DELETE /v1/jobs/{job_id}`.
    /// Merge it into the daemon's router; authentication is the daemon's layer.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        Router::new()
            .route(rbee_contract::JOBS_PATH, self.create_route())
            .route("/v1/jobs/{job_id}/stream", get(stream_job::<E>))
            .route("/v1/jobs/{job_id}", delete(cancel_job::<E>))
            .with_state(self.clone())
    }

    /// The `POST /v1/jobs` handler, to mount under another path (the worker's
    /// `POST /v1/inference`). The job's stream is still served by [`router`](Self::router).
    pub fn create_route<S: Clone + Send + Sync + 'static>(&self) -> MethodRouter<S> {
        post(create_job::<E>)
            .layer(DefaultBodyLimit::max(self.config().body_limit))
            .with_state(self.clone())
    }
}

async fn create_job<E: JobExecutor>(
    State(server): State<JobServer<E>>,
    options: JobOptions,
    uri: axum::http::Uri,
    OperationJson(operation): OperationJson,
) -> Result<Response, ApiError> {
    let Query(answer) = Query::<Answer>::try_from_uri(&uri)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let created = server.create(operation, options)?;
    if !answer.stream {
        return Ok(Created(created).into_response());
    }
    // Subscribed before the answer leaves, as a client opening the stream at once would be:
    // the job cannot count as unclaimed meanwhile.
    let subscription = server.subscribe(&created.job_id, None)?;
    let mut response = event_stream(&server, subscription);
    *response.status_mut() = StatusCode::CREATED;
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&created.sse_url) {
        headers.insert(LOCATION, location);
    }
    if let Ok(id) = HeaderValue::from_str(&created.job_id) {
        headers.insert(JOB_ID_HEADER, id);
    }
    Ok(response)
}

async fn stream_job<E: JobExecutor>(
    State(server): State<JobServer<E>>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last_event_id = last_event_id(&headers)?;
    let subscription = server.subscribe(&job_id, last_event_id)?;
    tracing::debug!(job_id, ?last_event_id, "job stream opened");
    Ok(event_stream(&server, subscription))
}

fn event_stream<E: JobExecutor>(server: &JobServer<E>, subscription: JobSubscription) -> Response {
    let keep_alive = KeepAlive::new().interval(server.config().keep_alive);
    Sse::new(sse_events(subscription))
        .keep_alive(keep_alive)
        .into_response()
}

async fn cancel_job<E: JobExecutor>(
    State(server): State<JobServer<E>>,
    Path(job_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    Ok(match server.cancel(&job_id)? {
        CancelOutcome::Cancelling => StatusCode::ACCEPTED,
        CancelOutcome::AlreadyEnded => StatusCode::NO_CONTENT,
    })
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("Last-Event-ID is not valid text"))?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("Last-Event-ID `{text}` is not an event id")))
}

/// Each event as `id: <seq>` + `data: <json>`; after the terminal event one `data: [DONE]`,
/// then the end. The subscription travels inside the stream, so the response body being
/// dropped (the client went away) drops it and cancels the job at once.
fn sse_events(subscription: JobSubscription) -> impl Stream<Item = Result<Event, Infallible>> {
    enum Phase {
        Events(JobSubscription),
        Done,
        Closed,
    }
    futures::stream::unfold(Phase::Events(subscription), |phase| async move {
        match phase {
            Phase::Events(mut subscription) => {
                let item = subscription.next().await;
                match item {
                    Some(item) => {
                        let event = Event::default().id(item.seq.to_string()).data(&*item.json);
                        let next = if item.event.is_terminal() {
                            Phase::Done
                        } else {
                            Phase::Events(subscription)
                        };
                        Some((Ok(event), next))
                    }
                    None => Some((Ok(Event::default().data(DONE_SENTINEL)), Phase::Closed)),
                }
            }
            Phase::Done => Some((Ok(Event::default().data(DONE_SENTINEL)), Phase::Closed)),
            Phase::Closed => None,
        }
    })
}

/// A request body parsed as an [`Operation`], with every failure answered as an [`ApiError`]:
/// invalid JSON, a missing or mistyped field → `400 bad_request`; an operation name this
/// build does not know → `400 unsupported_operation`; a body over the limit → `413`.
///
/// The `Content-Type` is not checked, so `curl -d` works as well as a JSON client.
#[derive(Debug, Clone)]
pub struct OperationJson(pub Operation);

impl<S: Send + Sync> FromRequest<S> for OperationJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            ApiError::bad_request(rejection.body_text()).with_status(rejection.status())
        })?;
        parse_operation(&bytes).map(OperationJson)
    }
}

fn parse_operation(body: &[u8]) -> Result<Operation, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let tag = match value.get("operation") {
        Some(serde_json::Value::String(tag)) => tag.clone(),
        Some(_) => return Err(ApiError::bad_request("`operation` must be a string")),
        None if value.is_object() => {
            return Err(ApiError::bad_request(
                "the request body has no `operation` field",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
    };
    serde_json::from_value(value).map_err(|e| {
        // serde reports an unknown tag of an internally tagged enum as an unknown variant
        // naming the tag itself; any other error is about the operation's fields.
        if e.to_string()
            .starts_with(&format!("unknown variant `{tag}`"))
        {
            ApiError::unsupported_operation(format!("unknown operation `{tag}`"))
        } else {
            ApiError::bad_request(format!("invalid `{tag}` operation: {e}"))
        }
    })
}

impl<S: Send + Sync> FromRequestParts<S> for JobOptions {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<JobOptions>::try_from_uri(&parts.uri)
            .map(|Query(options)| options)
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// `201 Created` with a [`JobCreated`] body and the stream's path in `Location`.
#[derive(Debug, Clone)]
pub struct Created(pub JobCreated);

impl IntoResponse for Created {
    fn into_response(self) -> Response {
        let mut response = (StatusCode::CREATED, Json(&self.0)).into_response();
        if let Ok(location) = HeaderValue::from_str(&self.0.sse_url) {
            response.headers_mut().insert(LOCATION, location);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use rbee_contract::ErrorCode;

    use super::*;

    fn code(body: &str) -> ErrorCode {
        parse_operation(body.as_bytes()).unwrap_err().code
    }

    #[test]
    fn operation_bodies_are_classified() {
        assert!(parse_operation(br#"{"operation":"infer","model":"m","prompt":"hi"}"#).is_ok());
        assert_eq!(code("{not json"), ErrorCode::BadRequest);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"model":"m"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"operation":7}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"operation":"infer","model":5}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"operation":"infer","model":"m","bogus":1}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(
                r#"{"operation":"infer","model":"m","messages":[{"role":"robot","content":"x"}]}"#
            ),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"operation":"dance"}"#),
            ErrorCode::UnsupportedOperation
        );
    }
}
