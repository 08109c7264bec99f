//! Reading a job's SSE stream into typed events, resuming a broken connection.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::stream::{BoxStream, Stream, StreamExt};
use rbee_contract::{DONE_SENTINEL, JobEvent};
use reqwest::header::{ACCEPT, CONTENT_TYPE};

use crate::client::{JobHandle, ok_or_error};
use crate::error::ClientError;

/// The typed events of one job; see [`JobHandle::events`].
pub type JobEventStream = BoxStream<'static, Result<JobEvent, ClientError>>;

/// How long a stream dropped after its terminal event may go on reading the rest of its
/// answer (`[DONE]` and the end of the body) in the background.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

type SseSource =
    Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

pub(crate) fn stream(handle: JobHandle, last_event_id: Option<u64>) -> JobEventStream {
    unfold(handle, None, last_event_id)
}

/// The events of a job whose stream `response` already is (a creation answered with it).
pub(crate) fn stream_from(handle: JobHandle, response: reqwest::Response) -> JobEventStream {
    unfold(
        handle,
        Some(Box::pin(response.bytes_stream().eventsource())),
        None,
    )
}

pub(crate) fn is_event_stream(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"))
}

fn unfold(handle: JobHandle, source: Option<SseSource>, last_id: Option<u64>) -> JobEventStream {
    let reader = Reader {
        url: handle.client.url(&handle.sse_url),
        handle,
        source,
        last_id,
        received_without_id: false,
        attempts: 0,
        phase: Phase::Events,
    };
    futures::stream::unfold(reader, |mut reader| async move {
        let item = reader.next().await?;
        Some((item, reader))
    })
    .boxed()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the terminal event.
    Events,
    /// The terminal event was yielded; only `[DONE]` (or the end) may follow.
    Terminal,
    Finished,
}

struct Reader {
    handle: JobHandle,
    url: String,
    source: Option<SseSource>,
    /// Sequence id of the newest event yielded: the resume point.
    last_id: Option<u64>,
    /// An event without an id was yielded, so a reconnect could not tell new from seen.
    received_without_id: bool,
    /// Reconnects made since the last event was received.
    attempts: u32,
    phase: Phase,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<JobEvent, ClientError>> {
        loop {
            if self.phase == Phase::Finished {
                return None;
            }
            if self.source.is_none() {
                match self.connect().await {
                    Ok(source) => self.source = Some(source),
                    Err(err @ ClientError::Transport { .. }) if self.may_resume() => {
                        self.back_off(&err).await;
                        continue;
                    }
                    Err(err) => return self.fail(err),
                }
            }
            let Some(source) = self.source.as_mut() else {
                continue;
            };
            let broken = match source.next().await {
                Some(Ok(event)) => match self.accept(event) {
                    Accepted::Event(event) => return Some(Ok(event)),
                    Accepted::Skip => continue,
                    Accepted::End => {
                        self.finish();
                        return None;
                    }
                    Accepted::Fail(err) => return self.fail(err),
                },
                Some(Err(EventStreamError::Transport(source))) => ClientError::Transport {
                    url: self.url.clone(),
                    source,
                },
                Some(Err(err)) => {
                    let reason = format!("the stream is not valid SSE: {err}");
                    return self.fail(self.invalid(reason));
                }
                None => ClientError::StreamEnded {
                    job_id: self.handle.job_id.clone(),
                },
            };
            self.source = None;
            if self.phase == Phase::Terminal {
                // The terminal event arrived; a connection lost before `[DONE]` loses nothing.
                self.finish();
                return None;
            }
            if !self.may_resume() {
                return self.fail(broken);
            }
            self.back_off(&broken).await;
        }
    }

    async fn back_off(&mut self, cause: &ClientError) {
        self.attempts += 1;
        tracing::debug!(
            job_id = %self.handle.job_id,
            attempt = self.attempts,
            last_id = ?self.last_id,
            error = %cause,
            "job stream broken; resuming"
        );
        tokio::time::sleep(self.handle.client.reconnect.delay * self.attempts).await;
    }

    fn accept(&mut self, event: Event) -> Accepted {
        if event.data == DONE_SENTINEL {
            return match self.phase {
                Phase::Terminal => Accepted::End,
                _ => Accepted::Fail(ClientError::StreamEnded {
                    job_id: self.handle.job_id.clone(),
                }),
            };
        }
        if self.phase == Phase::Terminal {
            return Accepted::Fail(self.invalid("an event followed the terminal event".into()));
        }
        let id = match event.id.trim() {
            "" => None,
            text => match text.parse::<u64>() {
                Ok(id) => Some(id),
                Err(_) => {
                    return Accepted::Fail(
                        self.invalid(format!("event id `{text}` is not a number")),
                    );
                }
            },
        };
        if let (Some(id), Some(last)) = (id, self.last_id)
            && id <= last
        {
            // Replayed by a server that ignored our Last-Event-ID.
            return Accepted::Skip;
        }
        let job_event: JobEvent = match serde_json::from_str(&event.data) {
            Ok(job_event) => job_event,
            Err(e) => {
                return Accepted::Fail(
                    self.invalid(format!("`{}` is not a job event: {e}", clip(&event.data))),
                );
            }
        };
        match id {
            Some(id) => self.last_id = Some(id),
            None => self.received_without_id = true,
        }
        self.attempts = 0;
        if job_event.is_terminal() {
            self.phase = Phase::Terminal;
        }
        Accepted::Event(job_event)
    }

    async fn connect(&mut self) -> Result<SseSource, ClientError> {
        let client = &self.handle.client;
        let mut request = client.get(&self.url).header(ACCEPT, "text/event-stream");
        if let Some(id) = self.last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = client.send(request, &self.url).await?;
        let response = ok_or_error(response, &self.url).await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !content_type.starts_with("text/event-stream") {
            return Err(ClientError::InvalidResponse {
                url: self.url.clone(),
                reason: format!("expected an event stream, got content type `{content_type}`"),
            });
        }
        Ok(Box::pin(response.bytes_stream().eventsource()))
    }

    fn may_resume(&self) -> bool {
        self.attempts < self.handle.client.reconnect.max_attempts && !self.received_without_id
    }

    fn fail(&mut self, err: ClientError) -> Option<Result<JobEvent, ClientError>> {
        self.finish();
        Some(Err(err))
    }

    fn finish(&mut self) {
        self.phase = Phase::Finished;
        self.source = None;
    }

    fn invalid(&self, reason: String) -> ClientError {
        ClientError::InvalidEvent {
            job_id: self.handle.job_id.clone(),
            reason,
        }
    }
}

/// A caller that stops reading at the terminal event (the queen relaying a worker, a client
/// waiting for a result) would otherwise close the connection with `[DONE]` and the end of
/// the body still unread, and the next request to the same daemon would pay for a new
/// connection. The rest is read in the background instead, so the connection goes back to
/// the pool.
impl Drop for Reader {
    fn drop(&mut self) {
        if self.phase != Phase::Terminal {
            return;
        }
        let (Some(mut source), Ok(runtime)) =
            (self.source.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(DRAIN_LIMIT, async {
                while let Some(Ok(_)) = source.next().await {}
            })
            .await;
        });
    }
}

enum Accepted {
    Event(JobEvent),
    Skip,
    End,
    Fail(ClientError),
}

fn clip(text: &str) -> &str {
    match text.char_indices().nth(120) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}
