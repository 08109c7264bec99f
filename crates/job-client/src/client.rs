use std::sync::OnceLock;
use std::time::Duration;

use rbee_contract::{ApiErrorBody, JOBS_PATH, JobCreated, JobEvent, Operation};
use reqwest::header::{ACCEPT, LOCATION};
use reqwest::{RequestBuilder, Response};
use serde::Serialize;

use crate::error::ClientError;
use crate::events::{self, JobEventStream};

/// The header of a streamed creation answer that names the job (job-server's `JOB_ID_HEADER`).
const JOB_ID_HEADER: &str = "x-rbee-job-id";

/// A client of one daemon's job protocol. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct JobClient {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
    pub(crate) reconnect: Reconnect,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Reconnect {
    pub max_attempts: u32,
    pub delay: Duration,
}

/// Bodies of error answers quoted in a [`ClientError`] are cut to this many characters.
const QUOTED_BODY_LIMIT: usize = 512;

impl JobClient {
    /// A client of the daemon at `base_url` (e.g. `http://127.0.0.1:7833`).
    ///
    /// It gives up on a connection that sends nothing for 60 s (servers send keep-alive
    /// comments far more often) and resumes a broken stream up to 3 times.
    ///
    /// Every client made this way shares one HTTP client, and so its pool of connections: a
    /// client per call (the queen makes one for each job it relays) neither builds an HTTP
    /// client nor opens a connection of its own.
    pub fn new(base_url: impl Into<String>) -> Self {
        static SHARED: OnceLock<reqwest::Client> = OnceLock::new();
        let http = SHARED
            .get_or_init(|| {
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(60))
                    .build()
                    .unwrap_or_else(|_| reqwest::Client::new())
            })
            .clone();
        JobClient {
            http,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token: None,
            reconnect: Reconnect {
                max_attempts: 3,
                delay: Duration::from_millis(200),
            },
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Uses this HTTP client (its timeouts, pool, proxy settings) instead of the default one.
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// How often a broken event stream is resumed with `Last-Event-ID` before the stream
    /// fails, and the delay before the first attempt (it grows linearly). `0` disables resuming.
    pub fn with_reconnects(mut self, max_attempts: u32, delay: Duration) -> Self {
        self.reconnect = Reconnect {
            max_attempts,
            delay,
        };
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v1/jobs` with `operation`.
    pub async fn submit(&self, operation: &Operation) -> Result<JobHandle, ClientError> {
        self.submit_to(JOBS_PATH, operation).await
    }

    /// Posts `body` to another job-creating route, e.g. the worker's `/v1/inference`, or
    /// `/v1/jobs?cancel_on_disconnect=false`.
    pub async fn submit_to<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<JobHandle, ClientError> {
        let url = self.url(path);
        let response = self.send(self.http.post(&url).json(body), &url).await?;
        let response = ok_or_error(response, &url).await?;
        let created: JobCreated =
            response
                .json()
                .await
                .map_err(|e| ClientError::InvalidResponse {
                    url: url.clone(),
                    reason: format!("not a job creation answer: {e}"),
                })?;
        tracing::debug!(job_id = %created.job_id, url, "job submitted");
        Ok(self.handle(created))
    }

    /// [`submit_to`](Self::submit_to), with the job's events read from the creation answer
    /// itself (`?stream=true`): one round trip where submitting and then opening the stream
    /// take two. A server that answers with the job's JSON instead has its stream opened as
    /// [`JobHandle::events`] does.
    pub async fn submit_and_follow<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(JobHandle, JobEventStream), ClientError> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let url = self.url(&format!("{path}{separator}stream=true"));
        let request = self
            .http
            .post(&url)
            .header(ACCEPT, "text/event-stream, application/json")
            .json(body);
        let response = ok_or_error(self.send(request, &url).await?, &url).await?;
        if !events::is_event_stream(&response) {
            let created: JobCreated =
                response
                    .json()
                    .await
                    .map_err(|e| ClientError::InvalidResponse {
                        url: url.clone(),
                        reason: format!("not a job creation answer: {e}"),
                    })?;
            let handle = self.handle(created);
            return Ok((handle.clone(), handle.events()));
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| ClientError::InvalidResponse {
                    url: url.clone(),
                    reason: format!("a job's event stream without its `{name}` header"),
                })
        };
        let created = JobCreated {
            job_id: header(JOB_ID_HEADER)?,
            sse_url: header(LOCATION.as_str())?,
        };
        tracing::debug!(job_id = %created.job_id, url, "job submitted, stream open");
        let handle = self.handle(created);
        let events = events::stream_from(handle.clone(), response);
        Ok((handle, events))
    }

    /// A handle on a job that already exists.
    pub fn handle(&self, created: JobCreated) -> JobHandle {
        JobHandle {
            job_id: created.job_id,
            sse_url: created.sse_url,
            client: self.clone(),
        }
    }

    /// Submits `operation` and follows its stream to the end: `on_event` sees every
    /// non-terminal event, the terminal event (`done` or `error`) is returned.
    pub async fn run_to_end(
        &self,
        operation: &Operation,
        mut on_event: impl FnMut(&JobEvent),
    ) -> Result<JobEvent, ClientError> {
        use futures::StreamExt;

        let handle = self.submit(operation).await?;
        let job_id = handle.job_id.clone();
        let mut events = handle.events();
        while let Some(event) = events.next().await {
            let event = event?;
            if event.is_terminal() {
                return Ok(event);
            }
            on_event(&event);
        }
        Err(ClientError::StreamEnded { job_id })
    }

    pub(crate) fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else if path_or_url.starts_with('/') {
            format!("{}{path_or_url}", self.base_url)
        } else {
            format!("{}/{path_or_url}", self.base_url)
        }
    }

    pub(crate) fn get(&self, url: &str) -> RequestBuilder {
        self.http.get(url)
    }

    pub(crate) async fn send(
        &self,
        request: RequestBuilder,
        url: &str,
    ) -> Result<Response, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        request
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.to_owned(),
                source,
            })
    }
}

/// A submitted job.
#[derive(Debug, Clone)]
pub struct JobHandle {
    pub job_id: String,
    /// The stream's path (or URL) as the server announced it.
    pub sse_url: String,
    pub(crate) client: JobClient,
}

impl JobHandle {
    /// The job's events, up to and including its terminal event; the stream ends after the
    /// server's `[DONE]`. A stream that ends without a terminal event yields
    /// [`ClientError::StreamEnded`]; after an error it yields nothing more.
    ///
    /// A broken connection is resumed with `Last-Event-ID` (see
    /// [`JobClient::with_reconnects`]). Dropping the stream closes the connection, which
    /// cancels a job created with the default `cancel_on_disconnect`.
    pub fn events(self) -> JobEventStream {
        events::stream(self, None)
    }

    /// Like [`events`](Self::events), starting after the event with sequence id
    /// `last_event_id` (e.g. to take over a job another process was following).
    pub fn events_after(self, last_event_id: u64) -> JobEventStream {
        events::stream(self, Some(last_event_id))
    }

    /// `DELETE /v1/jobs/{job_id}`. A job that already ended is not an error.
    pub async fn cancel(&self) -> Result<(), ClientError> {
        let url = self.client.url(&format!("{JOBS_PATH}/{}", self.job_id));
        let response = self
            .client
            .send(self.client.http.delete(&url), &url)
            .await?;
        ok_or_error(response, &url).await.map(drop)
    }
}

/// Passes a 2xx answer through; turns any other into the matching [`ClientError`].
pub(crate) async fn ok_or_error(response: Response, url: &str) -> Result<Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response
        .bytes()
        .await
        .map_err(|source| ClientError::Transport {
            url: url.to_owned(),
            source,
        })?;
    Err(match serde_json::from_slice::<ApiErrorBody>(&body) {
        Ok(ApiErrorBody { error }) => ClientError::Rejected {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
        },
        Err(_) => ClientError::UnexpectedStatus {
            url: url.to_owned(),
            status: status.as_u16(),
            body: quote(&body),
        },
    })
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTED_BODY_LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
