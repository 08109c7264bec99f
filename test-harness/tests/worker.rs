//! `llm-worker-rbee` as a process: readiness, heartbeats, streaming, cancellation, bad input,
//! shutdown. Each test starts its own worker on a free loopback port.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{ErrorCode, FinishReason, JobCreated, JobEvent, Operation, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    Daemon, HeartbeatReceiver, JobApi, free_port, read_raw_stream, smollm2, tiny_model,
};

const TOKEN: &str = "test-cluster-token";

fn start_worker(model: &std::path::Path, extra: &[&str]) -> Daemon {
    Daemon::worker(model, TOKEN, extra)
}

async fn ready_worker(model: &std::path::Path, extra: &[&str]) -> Daemon {
    Daemon::ready_worker(model, TOKEN, extra).await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn jobs(worker: &Daemon) -> JobApi {
    JobApi::new(&worker.url, Some(TOKEN))
}

async fn submit(worker: &Daemon, body: &Value) -> reqwest::Response {
    jobs(worker).submit("/v1/inference", body).await
}

async fn submit_ok(worker: &Daemon, body: &Value) -> JobCreated {
    jobs(worker).submit_ok("/v1/inference", body).await
}

async fn open_stream(worker: &Daemon, created: &JobCreated) -> reqwest::Response {
    jobs(worker).open_stream(created).await
}

async fn worker_info(worker: &Daemon) -> rbee_contract::WorkerInfo {
    client()
        .get(format!("{}/v1/info", worker.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until the worker reports its slot free again.
async fn wait_until_free(worker: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while worker_info(worker).await.slots_free != 1 {
        assert!(
            Instant::now() < deadline,
            "the worker never became free; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn long_request() -> Value {
    json!({"operation": "infer", "model": "smollm2", "prompt": "Count from one to one thousand: one, two, three,",
           "max_tokens": 1500, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_streams_paris_through_the_job_protocol() {
    let worker = ready_worker(&smollm2(), &[]).await;
    let created = submit_ok(
        &worker,
        &json!({"operation": "infer", "model": "smollm2", "prompt": "The capital of France is",
                "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert!(!created.job_id.is_empty());
    assert_eq!(
        created.sse_url,
        format!("/v1/jobs/{}/stream", created.job_id)
    );

    let stream = read_raw_stream(open_stream(&worker, &created).await)
        .await
        .unwrap();
    let text = stream.text();
    assert!(text.contains("Paris"), "completion: {text:?}");
    assert_eq!(stream.terminal_count(), 1, "{:?}", stream.events);
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Done { usage: Some(_), .. })
        ),
        "{:?}",
        stream.terminal()
    );
    assert!(
        matches!(stream.events.last(), Some((_, e)) if e.is_terminal()),
        "terminal event is last"
    );
    assert_eq!((stream.done_frames, stream.frames_after_done), (1, 0));
    let ids: Vec<u64> = stream
        .events
        .iter()
        .map(|(id, _)| id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids must increase: {ids:?}"
    );
    let tokens = stream
        .events
        .iter()
        .filter(|(_, e)| matches!(e, JobEvent::Token { .. }))
        .count();
    assert!(tokens > 0 && tokens <= 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_turns_true_after_loading_and_progress_stream_ends() {
    let mut worker = start_worker(&smollm2(), &[]);
    worker
        .wait_for("/health", None, Duration::from_secs(30))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = client()
            .get(format!("{}/v1/ready", worker.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["ready"], json!(status == 200), "{body}");
        if seen.last() != Some(&status) {
            seen.push(status);
        }
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, vec![503, 200], "ready must go from false to true");

    // Once loaded, the progress stream reports the outcome at once and ends with [DONE].
    let response = client()
        .get(format!("{}/v1/loading/progress", worker.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let stream = read_raw_stream(response).await.unwrap();
    assert!(matches!(
        stream.terminal(),
        Some(JobEvent::Done {
            finish_reason: FinishReason::Complete,
            ..
        })
    ));
    assert_eq!(stream.done_frames, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_carry_worker_info_with_the_cluster_token() {
    let receiver = HeartbeatReceiver::start().await;
    let _worker = ready_worker(
        &tiny_model(),
        &[
            "--queen-url",
            &receiver.url,
            "--heartbeat-interval",
            "100ms",
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let beats = receiver.received();
        if beats
            .iter()
            .any(|(b, _)| b.worker.state == WorkerState::Ready)
        {
            let (beat, auth) = beats
                .iter()
                .find(|(b, _)| b.worker.state == WorkerState::Ready)
                .unwrap();
            assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
            assert_eq!(beat.worker.worker_id, "w-test");
            assert_eq!(beat.worker.device, "cpu");
            assert_eq!((beat.worker.slots_total, beat.worker.slots_free), (1, 1));
            assert!(beat.worker.url.starts_with("http://127.0.0.1:"));
            assert_eq!(beat.worker.context_length, Some(512));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ready heartbeat in 10 s: {beats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queen_that_is_down_does_not_stop_the_worker() {
    let dead_queen = format!("http://127.0.0.1:{}", free_port());
    let worker = ready_worker(
        &tiny_model(),
        &["--queen-url", &dead_queen, "--heartbeat-interval", "50ms"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let created = submit_ok(
        &worker,
        &json!({"operation": "infer", "model": "m", "prompt": "hello", "max_tokens": 4}),
    )
    .await;
    let stream = read_raw_stream(open_stream(&worker, &created).await)
        .await
        .unwrap();
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        stream.events
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_the_stream_stops_the_generation() {
    let worker = ready_worker(&smollm2(), &[]).await;
    let created = submit_ok(&worker, &long_request()).await;
    let mut events = open_stream(&worker, &created).await.bytes_stream();
    let mut received = String::new();
    while received.matches("\"event\":\"token\"").count() < 3 {
        received.push_str(std::str::from_utf8(&events.next().await.unwrap().unwrap()).unwrap());
    }
    assert_eq!(
        worker_info(&worker).await.slots_free,
        0,
        "busy while generating"
    );
    drop(events);
    wait_until_free(&worker).await;
    let log = worker.log_text();
    assert!(
        log.contains("finish_reason=Cancelled"),
        "generation was not cancelled:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_cancels_with_one_terminal_error() {
    let worker = ready_worker(&smollm2(), &[]).await;
    let created = submit_ok(&worker, &long_request()).await;
    let client = job_client::JobClient::new(&worker.url).with_token(TOKEN);
    let mut events = Box::pin(client.handle(created.clone()).events());
    let mut tokens = 0;
    while tokens < 2 {
        if let JobEvent::Token { .. } = events.next().await.unwrap().unwrap() {
            tokens += 1;
        }
    }
    let response = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/{}", worker.url, created.job_id))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let mut terminal = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.is_terminal() {
            assert!(terminal.is_none(), "second terminal event {event:?}");
            terminal = Some(event);
        }
    }
    assert!(
        matches!(
            terminal,
            Some(JobEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{terminal:?}"
    );
    wait_until_free(&worker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_queue_then_get_a_busy_error() {
    let worker = ready_worker(&smollm2(), &["--queue-capacity", "1"]).await;
    let running = submit_ok(&worker, &long_request()).await;
    let _running_stream = open_stream(&worker, &running).await;
    let queued = submit_ok(&worker, &long_request()).await;
    let response = submit(&worker, &long_request()).await;
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "busy");

    let mut queued_events = open_stream(&worker, &queued).await.bytes_stream();
    let first = std::str::from_utf8(&queued_events.next().await.unwrap().unwrap())
        .unwrap()
        .to_string();
    assert!(
        first.contains(r#""event":"queued","position":1"#),
        "{first}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_4xx_json_errors() {
    let worker = ready_worker(&tiny_model(), &[]).await;
    let long_prompt = "word ".repeat(4000);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "wrong type",
            json!({"operation": "infer", "model": "m", "prompt": "hi", "max_tokens": "ten"}),
            400,
            "bad_request",
        ),
        (
            "negative max_tokens",
            json!({"operation": "infer", "model": "m", "prompt": "hi", "max_tokens": -5}),
            400,
            "bad_request",
        ),
        (
            "zero max_tokens",
            json!({"operation": "infer", "model": "m", "prompt": "hi", "max_tokens": 0}),
            400,
            "bad_request",
        ),
        (
            "unknown field",
            json!({"operation": "infer", "model": "m", "prompt": "hi", "temprature": 1}),
            400,
            "bad_request",
        ),
        (
            "missing model",
            json!({"operation": "infer", "prompt": "hi"}),
            400,
            "bad_request",
        ),
        (
            "empty prompt",
            json!({"operation": "infer", "model": "m", "prompt": ""}),
            400,
            "bad_request",
        ),
        (
            "no prompt",
            json!({"operation": "infer", "model": "m"}),
            400,
            "bad_request",
        ),
        (
            "prompt and messages",
            json!({"operation": "infer", "model": "m", "prompt": "a",
            "messages": [{"role": "user", "content": "b"}]}),
            400,
            "bad_request",
        ),
        (
            "negative temperature",
            json!({"operation": "infer", "model": "m", "prompt": "hi", "temperature": -1}),
            400,
            "bad_request",
        ),
        (
            "top_p out of range",
            json!({"operation": "infer", "model": "m", "prompt": "hi", "top_p": 1.5}),
            400,
            "bad_request",
        ),
        (
            "prompt over the context",
            json!({"operation": "infer", "model": "m", "prompt": long_prompt}),
            400,
            "context_length_exceeded",
        ),
        (
            "not an infer",
            json!({"operation": "worker_list"}),
            400,
            "unsupported_operation",
        ),
        (
            "unknown operation",
            json!({"operation": "teleport"}),
            400,
            "unsupported_operation",
        ),
        (
            "no operation",
            json!({"model": "m", "prompt": "hi"}),
            400,
            "bad_request",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = submit(&worker, &body).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
    }

    let raw = client()
        .post(format!("{}/v1/inference", worker.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"operation\": \"infer\", ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    assert_eq!(
        raw.json::<Value>().await.unwrap()["error"]["code"],
        "bad_request"
    );

    let ok = json!({"operation": "infer", "model": "m", "prompt": "hi", "max_tokens": 2});
    let no_token = client()
        .post(format!("{}/v1/inference", worker.url))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(
        no_token.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    let wrong = client()
        .post(format!("{}/v1/inference", worker.url))
        .bearer_auth("nope")
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    for path in ["/v1/ready", "/v1/loading/progress", "/v1/jobs/x/stream"] {
        let response = client()
            .get(format!("{}{path}", worker.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path} must need the token");
    }

    let unknown_job = client()
        .get(format!("{}/v1/jobs/nope/stream", worker.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_job.status(), 404);
    assert_eq!(
        unknown_job.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );

    // Nothing above hurt the worker.
    let created = submit_ok(&worker, &ok).await;
    let stream = read_raw_stream(open_stream(&worker, &created).await)
        .await
        .unwrap();
    assert!(matches!(stream.terminal(), Some(JobEvent::Done { .. })));
    let health = client()
        .get(format!("{}/health", worker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_messages_and_the_job_route_work_too() {
    let worker = ready_worker(&smollm2(), &[]).await;
    let client = job_client::JobClient::new(&worker.url).with_token(TOKEN);
    let op: Operation = serde_json::from_value(json!({
        "operation": "infer", "model": "smollm2", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Name the capital of France."}]
    }))
    .unwrap();
    let handle = client.submit(&op).await.unwrap();
    let mut events = Box::pin(handle.events());
    let mut text = String::new();
    let mut terminal = None;
    while let Some(event) = events.next().await {
        match event.unwrap() {
            JobEvent::Token { text: t, .. } => text.push_str(&t),
            e if e.is_terminal() => terminal = Some(e),
            _ => {}
        }
    }
    assert!(text.contains("Paris"), "{text:?}");
    assert!(!text.contains("<|im_end|>"), "{text:?}");
    assert!(
        matches!(terminal, Some(JobEvent::Done { .. })),
        "{terminal:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_a_generation_outliving_the_grace_with_shutting_down_and_exits_cleanly() {
    let mut worker = ready_worker(&smollm2(), &["--shutdown-grace", "300ms"]).await;
    let created = submit_ok(&worker, &long_request()).await;
    let response = open_stream(&worker, &created).await;
    let reader = tokio::spawn(read_raw_stream(response));
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.signal("TERM").unwrap();
    let stream = reader.await.unwrap().unwrap();
    assert_eq!(stream.terminal_count(), 1);
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::ShuttingDown,
                ..
            })
        ),
        "{:?}",
        stream.terminal()
    );
    assert_eq!(stream.done_frames, 1);
    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)).await.unwrap(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_fails_to_load_says_why() {
    let mut worker = start_worker(std::path::Path::new("/nonexistent/model.gguf"), &[]);
    worker
        .wait_for("/health", None, Duration::from_secs(30))
        .await
        .unwrap();
    let response = client()
        .get(format!("{}/v1/loading/progress", worker.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let stream = read_raw_stream(response).await.unwrap();
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::ModelLoadFailed,
            message,
        }) => {
            assert!(message.contains("/nonexistent/model.gguf"), "{message}")
        }
        other => panic!("expected model_load_failed, got {other:?}"),
    }
    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)).await.unwrap(),
        Some(1)
    );
    assert!(worker.log_text().contains("/nonexistent/model.gguf"));
}
