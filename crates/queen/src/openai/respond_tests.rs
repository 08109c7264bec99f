use std::sync::Mutex;

use futures::StreamExt;

use job_server::{
    ApiError, JobContext, JobExecutor, JobFailure, JobOptions, JobOutcome, JobResult, JobServer,
    JobServerConfig,
};
use rbee_contract::{FinishReason, InferRequest, Operation, Usage};

use super::*;
use crate::openai::request::Kind;

type Script = (Vec<JobEvent>, JobResult);

/// Admits one job, which plays the script's events and ends with its result.
struct Scripted(Mutex<Option<Script>>);

impl JobExecutor for Scripted {
    type Job = Script;

    fn admit(&self, _: Operation) -> Result<Script, ApiError> {
        self.0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| ApiError::internal("one job per test"))
    }

    async fn run(&self, (events, result): Script, ctx: JobContext) -> JobResult {
        for event in events {
            ctx.emit(event).await?;
        }
        result
    }
}

async fn subscribed(events: Vec<JobEvent>, result: JobResult) -> JobSubscription {
    let server = JobServer::new(
        Scripted(Mutex::new(Some((events, result)))),
        JobServerConfig::default(),
    );
    let created = server
        .create(
            Operation::Infer(InferRequest::default()),
            JobOptions::default(),
        )
        .unwrap();
    server.subscribe(&created.job_id, None).unwrap()
}

/// The `data:` payloads of a stream over a job that emits `events` and ends with `result`.
async fn stream_lines(kind: Kind, events: Vec<JobEvent>, result: JobResult) -> Vec<String> {
    stream_lines_with(kind, false, events, result).await
}

async fn stream_lines_with(
    kind: Kind,
    logprobs: bool,
    events: Vec<JobEvent>,
    result: JobResult,
) -> Vec<String> {
    let mut subscription = subscribed(events, result).await;
    let first = opening(&mut subscription).await.unwrap();
    let mut state = StreamState {
        subscription: Some(subscription),
        pending: VecDeque::new(),
        tally: Tally::default(),
        renderer: Renderer::new(kind, "j", 1, "m".into(), true).with_logprobs(logprobs),
        held: Vec::new(),
        chars: 0,
        calls: None,
    };
    state.pending.extend(state.renderer.opening_chunk());
    state.take(first);
    let mut lines = Vec::new();
    while let Some(line) = state.next_line().await {
        lines.push(line);
    }
    lines
}

fn token(text: &str, index: u32) -> JobEvent {
    JobEvent::Token {
        text: text.into(),
        token_id: 1,
        index,
        logprobs: None,
    }
}

/// A token with log-probabilities: its own text `token`, and itself as the only alternative.
fn scored(text: &str, index: u32, token: &str, logprob: f32) -> JobEvent {
    JobEvent::Token {
        text: text.into(),
        token_id: index,
        index,
        logprobs: Some(rbee_contract::TokenLogprobs {
            token: token.into(),
            logprob,
            bytes: None,
            top_logprobs: vec![rbee_contract::TopLogprob {
                token_id: index,
                token: token.into(),
                bytes: None,
                logprob,
            }],
        }),
    }
}

#[tokio::test]
async fn streamed_chunks_carry_the_logprobs_of_the_tokens_that_released_their_text() {
    // "é" is two byte tokens: the first releases nothing, the second both halves. The last
    // token starts a stop sequence that completes: its text is never sent.
    let events = vec![
        JobEvent::Started { prompt_tokens: 2 },
        scored("", 0, "\u{fffd}", -1.0),
        scored("é", 1, "\u{fffd}", -0.5),
        scored(" ok", 2, " ok", -0.25),
        scored("", 3, "\n", -2.0),
    ];
    let done = Ok(JobOutcome::new(FinishReason::Stop, None));
    let lines = stream_lines_with(Kind::Text, true, events, done).await;
    let logprobs = |line: &str| {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["choices"][0]["logprobs"].clone()
    };
    assert_eq!(
        logprobs(&lines[0]),
        serde_json::json!({
            "tokens": ["\u{fffd}", "\u{fffd}"],
            "token_logprobs": [-1.0, -0.5],
            "top_logprobs": [{"\u{fffd}": -1.0}, {"\u{fffd}": -0.5}],
            "text_offset": [0, 0],
        })
    );
    assert_eq!(logprobs(&lines[1])["text_offset"], serde_json::json!([1]));
    assert_eq!(logprobs(&lines[1])["tokens"], serde_json::json!([" ok"]));
    // The finish chunk carries the token whose text was cut with the stop sequence.
    assert_eq!(logprobs(&lines[2])["tokens"], serde_json::json!(["\n"]));
    assert_eq!(logprobs(&lines[2])["text_offset"], serde_json::json!([4]));

    let events = vec![
        JobEvent::Started { prompt_tokens: 2 },
        scored("Hi", 0, "Hi", -0.125),
    ];
    let done = Ok(JobOutcome::new(FinishReason::Length, None));
    let lines = stream_lines_with(Kind::Chat, true, events, done).await;
    // The opening chunk has no tokens; the content chunk has OpenAI's chat shape.
    assert_eq!(logprobs(&lines[0]), serde_json::Value::Null);
    assert_eq!(
        logprobs(&lines[1]),
        serde_json::json!({"content": [{
            "token": "Hi", "logprob": -0.125, "bytes": [72, 105],
            "top_logprobs": [{"token": "Hi", "logprob": -0.125, "bytes": [72, 105]}],
        }]})
    );
    assert_eq!(logprobs(&lines[2]), serde_json::Value::Null);
}

#[tokio::test]
async fn a_whole_answer_lists_the_logprobs_of_every_token() {
    let events = vec![
        JobEvent::Started { prompt_tokens: 2 },
        scored("", 0, "\u{fffd}", -1.0),
        scored("é!", 1, "\u{fffd}", -0.5),
        scored("?", 2, "?", -0.25),
    ];
    let done = Ok(JobOutcome::new(FinishReason::Length, None));
    let mut subscription = subscribed(events, done).await;
    let first = opening(&mut subscription).await.unwrap();
    let renderer = Renderer::new(Kind::Text, "j", 1, "m".into(), false).with_logprobs(true);
    let response = json(subscription, &renderer, first).await.unwrap();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], "é!?");
    assert_eq!(
        v["choices"][0]["logprobs"]["token_logprobs"],
        serde_json::json!([-1.0, -0.5, -0.25])
    );
    assert_eq!(
        v["choices"][0]["logprobs"]["text_offset"],
        serde_json::json!([0, 0, 2])
    );
}

fn progress() -> Vec<JobEvent> {
    vec![
        JobEvent::Queued { position: 1 },
        JobEvent::narration("spawning a worker"),
        JobEvent::Loading {
            model: "m".into(),
            fraction: 0.5,
            message: None,
        },
    ]
}

#[tokio::test]
async fn progress_is_not_content_and_empty_tokens_send_nothing() {
    let mut events = progress();
    events.extend([
        JobEvent::Started { prompt_tokens: 4 },
        token("Hel", 0),
        token("", 1),
        token("lo", 2),
    ]);
    let done = Ok(JobOutcome::new(FinishReason::Length, None));
    let lines = stream_lines(Kind::Chat, events, done).await;
    let prefix =
        r#"{"id":"chatcmpl-j","object":"chat.completion.chunk","created":1,"model":"m","choices":"#;
    assert_eq!(
        lines,
        [
            format!(
                r#"{prefix}[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            ),
            format!(
                r#"{prefix}[{{"index":0,"delta":{{"content":"Hel"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            ),
            format!(
                r#"{prefix}[{{"index":0,"delta":{{"content":"lo"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            ),
            format!(
                r#"{prefix}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"length"}}],"usage":null}}"#
            ),
            // No usage from the job: counted from `started` and the tokens.
            format!(
                r#"{prefix}[],"usage":{{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}}}"#
            ),
            "[DONE]".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_failure_after_the_start_is_an_error_chunk_then_done() {
    let events = vec![JobEvent::Started { prompt_tokens: 2 }, token("a", 0)];
    let lost = Err(JobFailure::new(
        ErrorCode::WorkerLost,
        "worker w1 went away",
    ));
    let lines = stream_lines(Kind::Text, events, lost).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].contains(r#""text":"a""#), "{lines:?}");
    assert_eq!(
        lines[1],
        r#"{"error":{"message":"worker w1 went away","type":"server_error","param":null,"code":"worker_lost"}}"#
    );
    assert_eq!(lines[2], "[DONE]");
}

#[tokio::test]
async fn operator_details_after_the_first_line_of_a_failure_stay_in_the_log() {
    let report = "worker w1 could not load m: not a GGUF file\nlast lines of its log:\n\
                  ERROR rbee_worker: secret detail\nlog: /var/log/rbee/workers/w1.log";
    let failed = || Err(JobFailure::new(ErrorCode::ModelLoadFailed, report));
    let mut subscription = subscribed(progress(), failed()).await;
    let err = opening(&mut subscription).await.err().unwrap();
    assert_eq!(err.status, axum::http::StatusCode::BAD_GATEWAY);
    assert_eq!(
        err.body.message,
        "worker w1 could not load m: not a GGUF file"
    );

    let events = vec![JobEvent::Started { prompt_tokens: 2 }, token("a", 0)];
    let lines = stream_lines(Kind::Text, events, failed()).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[1].contains("not a GGUF file") && !lines[1].contains("secret detail"),
        "{}",
        lines[1]
    );
    assert!(!lines[1].contains("/var/log"), "{}", lines[1]);
}

#[tokio::test]
async fn a_failure_before_the_start_is_an_error_answer() {
    let busy = Err(JobFailure::new(ErrorCode::Busy, "the queue is full"));
    let mut subscription = subscribed(progress(), busy).await;
    let err = opening(&mut subscription).await.err().unwrap();
    assert_eq!(err.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(err.retry_after, Some(1));
}

#[tokio::test]
async fn a_whole_answer_collects_the_text_and_the_reported_usage() {
    let events = vec![JobEvent::Started { prompt_tokens: 2 }, token(" Paris", 0)];
    let done = Ok(JobOutcome::new(FinishReason::Stop, Some(Usage::new(6, 1))));
    let mut subscription = subscribed(events, done).await;
    let first = opening(&mut subscription).await.unwrap();
    let renderer = Renderer::new(Kind::Chat, "j", 1, "m".into(), false);
    let response = json(subscription, &renderer, first).await.unwrap();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], " Paris");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 6);
}

fn weather_tools() -> ToolUse {
    ToolUse {
        names: vec!["get_weather".into()],
        choice: crate::openai::tools::ToolChoice::Auto,
        parallel: true,
    }
}

/// A call the token limit cut inside its arguments, and one the model finished.
fn call_events(complete: bool) -> Vec<JobEvent> {
    let mut events = vec![
        JobEvent::Started { prompt_tokens: 2 },
        token("<tool_call>\n{\"name\": \"get_weather\", ", 0),
        token("\"arguments\": {\"city\": \"Par", 1),
    ];
    if complete {
        events.push(token("is\"}}\n</tool_call>", 2));
    }
    events
}

/// The `finish_reason` of each choice chunk that has one.
fn finish_reasons(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["finish_reason"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

#[tokio::test]
async fn a_streamed_call_cut_by_the_token_limit_finishes_with_length() {
    for (complete, reason, want) in [
        (true, FinishReason::Stop, "tool_calls"),
        (false, FinishReason::Length, "length"),
    ] {
        let done = Ok(JobOutcome::new(reason, None));
        let mut subscription = subscribed(call_events(complete), done).await;
        let first = opening(&mut subscription).await.unwrap();
        let renderer =
            Renderer::new(Kind::Chat, "j", 1, "m".into(), false).with_tools(Some(weather_tools()));
        let lines: Vec<String> = lines(subscription, renderer, first).collect().await;
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"tool_calls\":[{\"index\":0")),
            "the call was streamed: {lines:?}"
        );
        assert_eq!(finish_reasons(&lines), vec![want], "{lines:?}");
    }
}

#[tokio::test]
async fn a_whole_answer_whose_call_the_token_limit_cut_finishes_with_length() {
    for (complete, reason, want) in [
        (true, FinishReason::Stop, "tool_calls"),
        (false, FinishReason::Length, "length"),
    ] {
        let done = Ok(JobOutcome::new(reason, None));
        let mut subscription = subscribed(call_events(complete), done).await;
        let first = opening(&mut subscription).await.unwrap();
        let renderer =
            Renderer::new(Kind::Chat, "j", 1, "m".into(), false).with_tools(Some(weather_tools()));
        let response = json(subscription, &renderer, first).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let choice = &body["choices"][0];
        assert_eq!(
            choice["message"]["tool_calls"][0]["function"]["name"],
            "get_weather"
        );
        assert_eq!(choice["finish_reason"], want, "{body}");
    }
}
