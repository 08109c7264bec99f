//! Reading a job's `JobEvent`s and answering in OpenAI's shapes.
//!
//! The job's [`JobSubscription`] is held by whatever answers the client: the handler's future
//! for a JSON answer, the response body for a stream. When the client goes away, that is
//! dropped, the subscription with it, and the job server cancels the job; the cancellation
//! travels on to the worker. Progress events (`queued`, `spawning`, `loading`, narration)
//! are not content and are not sent.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use job_server::JobSubscription;
use rbee_contract::{DONE_SENTINEL, ErrorCode, FinishReason, JobEvent};

use super::error::OpenAiError;
use super::render::{Renderer, Tally, TokenEntry, error_chunk};
use super::tools::{CallParser, Piece, ToolUse};

/// Interval of SSE keep-alive comments while a stream waits for its next token.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Response header naming the queen job behind an answer, for logs and `DELETE /v1/jobs/{id}`.
pub(crate) const JOB_ID_HEADER: &str = "x-rbee-job-id";

/// Waits for the first event that is not progress (`started`, a token or `done`). A job that
/// fails before generating is an error answer with the right status, not a stream.
pub(crate) async fn opening(subscription: &mut JobSubscription) -> Result<JobEvent, OpenAiError> {
    loop {
        let Some(item) = subscription.next().await else {
            return Err(ended_silently());
        };
        match &*item.event {
            JobEvent::Error { code, message } => {
                return Err(OpenAiError::from_job(subscription.job_id(), *code, message));
            }
            event @ (JobEvent::Started { .. } | JobEvent::Token { .. } | JobEvent::Done { .. }) => {
                return Ok(event.clone());
            }
            progress => {
                tracing::debug!(job_id = subscription.job_id(), event = ?progress, "progress before generation");
            }
        }
    }
}

/// Reads the job to its end and answers with one JSON body.
pub(crate) async fn json(
    subscription: JobSubscription,
    renderer: &Renderer,
    first: JobEvent,
) -> Result<Response, OpenAiError> {
    Ok(json_body(answer(subscription, renderer, first).await?))
}

/// A `200` with a JSON body.
pub(crate) fn json_body(body: String) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Reads the job to its end: the JSON body of its whole answer.
pub(crate) async fn answer(
    mut subscription: JobSubscription,
    renderer: &Renderer,
    first: JobEvent,
) -> Result<String, OpenAiError> {
    let mut tally = Tally::default();
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut event = first;
    loop {
        match event {
            JobEvent::Started { prompt_tokens } => tally.prompt_tokens = prompt_tokens,
            JobEvent::Token {
                text: piece,
                logprobs,
                ..
            } => {
                tally.completion_tokens += 1;
                if let Some(logprobs) = logprobs {
                    tokens.push(TokenEntry {
                        logprobs,
                        offset: char_count(&text),
                    });
                }
                text.push_str(&piece);
            }
            JobEvent::Done {
                finish_reason,
                usage,
            } => {
                let usage = tally.usage(usage);
                return Ok(match &renderer.tools {
                    Some(tools) => {
                        let (content, calls) = read_calls(tools, &text);
                        renderer.chat_response(content, calls, finish_reason, usage, &tokens)
                    }
                    None => renderer.response_with(text, finish_reason, usage, &tokens),
                });
            }
            JobEvent::Error { code, message } => {
                return Err(OpenAiError::from_job(subscription.job_id(), code, &message));
            }
            _ => {}
        }
        event = match subscription.next().await {
            Some(item) => (*item.event).clone(),
            None => return Err(ended_silently()),
        };
    }
}

/// The content and the calls (name, arguments) of a whole answer to a request that offered
/// tools. Content that is only the whitespace around calls is no content.
fn read_calls(tools: &ToolUse, text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in CallParser::parse_all(tools.names.clone(), text) {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(call) if tools.parallel || calls.is_empty() => {
                calls.push((call.name, call.arguments));
            }
            // `parse_all` joins a streamed call into one `Call`.
            Piece::Call(_) | Piece::CallStart { .. } | Piece::Arguments(_) => {}
        }
    }
    let content = if !calls.is_empty() && content.trim().is_empty() {
        None
    } else {
        Some(content)
    };
    (content, calls)
}

/// Answers with an SSE stream of chunks: the opening chunk, content chunks, the finish
/// chunk, the usage chunk when asked for, then `data: [DONE]`. A job that fails mid-stream
/// sends an error chunk, then `[DONE]`.
pub(crate) fn stream(
    subscription: JobSubscription,
    renderer: Renderer,
    first: JobEvent,
) -> Response {
    sse(lines(subscription, renderer, first))
}

/// The `data:` payloads of [`stream`], ending with `[DONE]`; dropping it cancels the job.
pub(crate) fn lines(
    subscription: JobSubscription,
    renderer: Renderer,
    first: JobEvent,
) -> impl Stream<Item = String> + Send + 'static {
    let calls = renderer.tools.as_ref().map(|tools| Calls {
        parser: CallParser::new(tools.names.clone()),
        parallel: tools.parallel,
        made: 0,
        streaming: None,
    });
    let mut state = StreamState {
        subscription: Some(subscription),
        pending: VecDeque::new(),
        tally: Tally::default(),
        renderer,
        held: Vec::new(),
        chars: 0,
        calls,
    };
    state.pending.extend(state.renderer.opening_chunk());
    state.take(first);
    futures::stream::unfold(state, |mut state| async move {
        state.next_line().await.map(|line| (line, state))
    })
}

pub(crate) fn sse(lines: impl Stream<Item = String> + Send + 'static) -> Response {
    use futures::StreamExt;
    let events = lines.map(|line| Ok::<_, Infallible>(Event::default().data(line)));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

struct StreamState {
    /// `None` once the terminal event was read; dropping it earlier cancels the job.
    subscription: Option<JobSubscription>,
    /// `data:` payloads ready to send.
    pending: VecDeque<String>,
    tally: Tally,
    renderer: Renderer,
    /// Log-probabilities of tokens whose text has not been sent yet: they ride on the chunk
    /// that carries it.
    held: Vec<TokenEntry>,
    /// Characters of text sent so far, for the completions' `text_offset`.
    chars: u32,
    /// Set when the request offered tools: the text goes through the call parser.
    calls: Option<Calls>,
}

/// Reading a streamed answer for calls.
struct Calls {
    parser: CallParser,
    parallel: bool,
    /// Calls streamed so far.
    made: usize,
    /// The index of the call whose arguments are arriving, if one is being streamed (and
    /// reported).
    streaming: Option<usize>,
}

impl StreamState {
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            let subscription = self.subscription.as_mut()?;
            match subscription.next().await {
                Some(item) => self.take((*item.event).clone()),
                None => {
                    self.subscription = None;
                    self.fail(&ended_silently());
                }
            }
        }
    }

    /// Queues what one event adds to the stream.
    fn take(&mut self, event: JobEvent) {
        match event {
            JobEvent::Started { prompt_tokens } => self.tally.prompt_tokens = prompt_tokens,
            JobEvent::Token { text, logprobs, .. } => {
                self.tally.completion_tokens += 1;
                if let Some(logprobs) = logprobs {
                    self.held.push(TokenEntry {
                        logprobs,
                        offset: self.chars,
                    });
                }
                // Empty text (a token inside a multi-byte character or a possible stop
                // sequence) arrives with a later token; an empty delta says nothing.
                if text.is_empty() {
                } else if let Some(calls) = self.calls.as_mut() {
                    let pieces = calls.parser.push(&text);
                    self.send_pieces(pieces);
                } else {
                    self.send_text(&text);
                }
            }
            JobEvent::Done {
                finish_reason,
                usage,
            } => {
                self.subscription = None;
                let mut reason = super::render::finish_reason(finish_reason);
                if let Some(calls) = self.calls.as_mut() {
                    let pieces = calls.parser.finish();
                    self.send_pieces(pieces);
                    // An answer cut by the token limit is `length` even after a call (as
                    // OpenAI and llama-server report it): its last call's arguments may be
                    // unfinished JSON, which `tool_calls` would tell a client to run.
                    if finish_reason != FinishReason::Length
                        && self.calls.as_ref().is_some_and(|c| c.made > 0)
                    {
                        reason = "tool_calls";
                    }
                }
                self.pending
                    .push_back(self.renderer.finish_chunk_as(reason, &self.held));
                self.held.clear();
                if self.renderer.include_usage {
                    self.pending
                        .push_back(self.renderer.usage_chunk(self.tally.usage(usage)));
                }
                self.pending.push_back(DONE_SENTINEL.to_string());
            }
            JobEvent::Error { code, message } => {
                let job_id = self
                    .subscription
                    .take()
                    .map(|s| s.job_id().to_owned())
                    .unwrap_or_default();
                self.fail(&OpenAiError::from_job(&job_id, code, &message));
            }
            JobEvent::Queued { .. }
            | JobEvent::Narration { .. }
            | JobEvent::Downloading { .. }
            | JobEvent::Spawning { .. }
            | JobEvent::Loading { .. }
            | JobEvent::Data { .. } => {}
        }
    }

    /// Queues a content chunk, carrying the log-probabilities held so far.
    fn send_text(&mut self, text: &str) {
        self.chars += char_count(text);
        self.pending
            .push_back(self.renderer.content_chunk_with(text, &self.held));
        self.held.clear();
    }

    /// Queues what the call parser released: content, and each call as its two chunks.
    fn send_pieces(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Text(text) => self.send_text(&text),
                Piece::Call(call) => {
                    let Some(calls) = self.calls.as_mut() else {
                        continue;
                    };
                    if calls.made > 0 && !calls.parallel {
                        continue;
                    }
                    let index = calls.made;
                    calls.made += 1;
                    calls.streaming = None;
                    self.pending.extend(self.renderer.tool_call_chunks(
                        index,
                        &call.name,
                        &call.arguments,
                    ));
                }
                Piece::CallStart { name } => {
                    let Some(calls) = self.calls.as_mut() else {
                        continue;
                    };
                    if calls.made > 0 && !calls.parallel {
                        calls.streaming = None;
                        continue;
                    }
                    let index = calls.made;
                    calls.made += 1;
                    calls.streaming = Some(index);
                    self.pending
                        .push_back(self.renderer.tool_call_start_chunk(index, &name));
                }
                Piece::Arguments(text) => {
                    if let Some(index) = self.calls.as_ref().and_then(|c| c.streaming)
                        && !text.is_empty()
                    {
                        self.pending
                            .push_back(self.renderer.tool_call_arguments_chunk(index, &text));
                    }
                }
            }
        }
    }

    fn fail(&mut self, err: &OpenAiError) {
        tracing::warn!(status = %err.status, code = ?err.body.code, message = %err.body.message,
            "OpenAI stream failed after it started");
        self.pending.push_back(error_chunk(&err.body()));
        self.pending.push_back(DONE_SENTINEL.to_string());
    }
}

fn char_count(text: &str) -> u32 {
    u32::try_from(text.chars().count()).unwrap_or(u32::MAX)
}

/// A subscription never ends without its terminal event; if one did, say so.
fn ended_silently() -> OpenAiError {
    OpenAiError::from_code(
        ErrorCode::Internal,
        "the job's stream ended without a result; details are in the queen's log",
    )
}

#[cfg(test)]
#[path = "respond_tests.rs"]
mod tests;
