//! The queen under load and under bad input, through a real cluster (queen, hive, worker on
//! the tiny generated model): hundreds of concurrent jobs each end with exactly one terminal
//! event (a completion or an explicit `busy`) and the metrics agree with what the clients
//! saw; a corpus of malformed requests gets clean JSON `4xx` answers and leaves the queen
//! healthy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rbee_contract::{ErrorCode, JobCreated, JobEvent};
use serde_json::{Value, json};
use test_harness::{JobApi, RawStream, TestCluster, read_raw_stream, tiny_model};

const REQUESTS: usize = 300;
const CONCURRENCY: usize = 16;
/// Smaller than the concurrency, so that clients sometimes find the line full.
const QUEUE_LEN: &str = "12";
/// How long a client refused as `busy` waits before its next request, as a client honouring
/// `Retry-After` would (without it, refused clients spin and take most of the requests).
const BACK_OFF: Duration = Duration::from_millis(250);

fn infer(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": 1})
}

/// How one job ended, as its client saw it.
enum Ended {
    Done,
    Failed(ErrorCode),
}

/// One client's view of one job.
struct Seen {
    ended: Ended,
    /// It waited in the queen's line.
    queued: bool,
    tokens: usize,
}

async fn one_job(api: &JobApi, model: &str, n: usize) -> Seen {
    let created = api
        .submit_ok("/v1/jobs", &infer(model, &format!("request number {n}"), 6))
        .await;
    let stream = read_raw_stream(api.open_stream(&created).await)
        .await
        .unwrap_or_else(|e| panic!("job {n}: the stream broke: {e}"));
    stream.assert_one_terminal_then_done(&format!("job {n}"));
    let queued = stream.queued();
    let ended = match stream.terminal() {
        Some(JobEvent::Done { .. }) => Ended::Done,
        Some(JobEvent::Error { code, message }) => {
            assert!(
                !message.is_empty(),
                "job {n}: an error says what went wrong"
            );
            Ended::Failed(*code)
        }
        other => panic!("job {n}: {other:?}"),
    };
    let tokens = stream
        .events
        .iter()
        .filter(|(_, e)| matches!(e, JobEvent::Token { .. }))
        .count();
    Seen {
        ended,
        queued,
        tokens,
    }
}

/// The value of the sample `name` (with its labels, as printed) on a metrics page; 0 when absent.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_concurrent_jobs_all_end_and_the_totals_add_up() {
    let cluster = TestCluster::start(&tiny_model(), &["--queue-len", QUEUE_LEN]).await;
    let api = cluster.jobs();
    let before = metrics(&cluster).await;

    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CONCURRENCY {
        let (api, model, next) = (api.clone(), cluster.model.clone(), Arc::clone(&next));
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= REQUESTS {
                    return seen;
                }
                let job = one_job(&api, &model, n).await;
                if matches!(job.ended, Ended::Failed(ErrorCode::Busy)) {
                    tokio::time::sleep(BACK_OFF).await;
                }
                seen.push(job);
            }
        }));
    }
    let mut done = 0usize;
    let mut queued = 0usize;
    let mut tokens = 0usize;
    let mut with_tokens = 0usize;
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for client in clients {
        for job in client.await.expect("a client task") {
            queued += usize::from(job.queued);
            tokens += job.tokens;
            with_tokens += usize::from(job.tokens > 0);
            match job.ended {
                Ended::Done => done += 1,
                Ended::Failed(code) => *failed.entry(code.to_string()).or_default() += 1,
            }
        }
    }
    let busy = failed.get("busy").copied().unwrap_or(0);
    eprintln!("{REQUESTS} jobs: {done} done, {failed:?} failed, {queued} waited in line");
    assert_eq!(
        done + failed.values().sum::<usize>(),
        REQUESTS,
        "every job ended: {done} done, {failed:?}"
    );
    assert_eq!(
        failed.keys().collect::<Vec<_>>(),
        if busy > 0 { vec!["busy"] } else { vec![] },
        "the only failure under load is a full line: {failed:?}"
    );
    assert!(done > 0, "{failed:?}");
    assert!(
        queued > 0,
        "{CONCURRENCY} clients on one slot: some jobs waited in line"
    );

    // The queen's metrics count what the clients saw.
    let after = metrics(&cluster).await;
    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        delta(r#"rbee_http_requests_total{route="/v1/jobs",method="POST",status="201"}"#),
        REQUESTS as f64,
        "{after}"
    );
    assert_eq!(
        delta(r#"rbee_infer_duration_seconds_count{outcome="done"}"#),
        done as f64,
        "{after}"
    );
    assert_eq!(
        delta(r#"rbee_queue_refused_total{reason="queue_full"}"#),
        busy as f64,
        "{after}"
    );
    assert_eq!(
        delta("rbee_time_to_first_token_seconds_count"),
        with_tokens as f64,
        "{after}"
    );
    assert_eq!(
        delta(&format!(
            "rbee_tokens_generated_total{{model=\"{}\"}}",
            cluster.model
        )),
        tokens as f64,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            &format!("rbee_queue_depth{{model=\"{}\"}}", cluster.model)
        ),
        0.0,
        "nothing waits once every client is done: {after}"
    );
    assert_eq!(
        sample(&after, r#"rbee_workers{state="ready"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"rbee_hives{state="healthy"}"#),
        1.0,
        "{after}"
    );

    // The worker is free again and serves the next request.
    let info = cluster.worker_info().await;
    assert_eq!(info.slots_free, info.slots_total);
    let next = one_job(&api, &cluster.model, REQUESTS).await;
    assert!(matches!(next.ended, Ended::Done));
}

async fn metrics(cluster: &TestCluster) -> String {
    let response = reqwest::get(format!("{}/metrics", cluster.queen.url))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/openmetrics-text")),
        "{:?}",
        response.headers()
    );
    response.text().await.expect("a metrics page")
}

/// Sends `body` with `content_type` to `POST {queen}{path}`; returns the status and the JSON
/// error body, which every refusal must have.
async fn post_raw(url: &str, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    // A body over the limit is refused from its Content-Length, before it is read, and the
    // connection is closed with the rest unread: a client still sending may see that reset
    // before it reads the answer (HTTP/1.1's early-response race, which curl avoids with
    // `Expect: 100-continue`). Such a send is retried; the answer must still be the refusal.
    let mut attempts = 0;
    let response = loop {
        attempts += 1;
        match reqwest::Client::new()
            .post(format!("{url}{path}"))
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
        {
            Ok(response) => break response,
            Err(e) if e.is_request() && attempts < 5 => continue,
            Err(e) => panic!("POST {path}: {e}"),
        }
    };
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("POST {path} answered {status} with a non-JSON body: {text:?}"));
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_clean_json_refusals_and_the_queen_stays_healthy() {
    let cluster = TestCluster::start(&tiny_model(), &[]).await;
    let url = cluster.queen.url.clone();
    let model = cluster.model.clone();
    let json_body = |value: Value| serde_json::to_vec(&value).unwrap();
    let base = infer(&model, "hello", 4);
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        json_body(body)
    };
    let mut huge = b"{\"operation\":\"infer\",\"model\":\"m\",\"prompt\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 10 * 1024 * 1024));
    huge.extend(b"\"}");
    let mut not_utf8 = b"{\"operation\":\"infer\",\"model\":\"".to_vec();
    not_utf8.extend([0xff, 0xfe, 0xfd]);
    not_utf8.extend(b"\",\"prompt\":\"hi\"}");

    let json = "application/json";
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", json, b"{not json".to_vec(), 400, "bad_request"),
        ("empty body", json, Vec::new(), 400, "bad_request"),
        ("an array", json, b"[1,2]".to_vec(), 400, "bad_request"),
        (
            "no operation",
            json,
            json_body(json!({"model": model})),
            400,
            "bad_request",
        ),
        (
            "operation not a string",
            json,
            json_body(json!({"operation": 7})),
            400,
            "bad_request",
        ),
        (
            "unknown operation",
            json,
            json_body(json!({"operation": "dance"})),
            400,
            "unsupported_operation",
        ),
        (
            "model of the wrong type",
            json,
            with("model", json!(5)),
            400,
            "bad_request",
        ),
        (
            "max_tokens of the wrong type",
            json,
            with("max_tokens", json!("many")),
            400,
            "bad_request",
        ),
        (
            "max_tokens 10^12",
            json,
            with("max_tokens", json!(1_000_000_000_000u64)),
            400,
            "bad_request",
        ),
        (
            "max_tokens negative",
            json,
            with("max_tokens", json!(-1)),
            400,
            "bad_request",
        ),
        (
            "max_tokens 0",
            json,
            with("max_tokens", json!(0)),
            400,
            "bad_request",
        ),
        (
            "temperature beyond f32",
            json,
            with("temperature", json!(1e39)),
            400,
            "bad_request",
        ),
        (
            "temperature negative",
            json,
            with("temperature", json!(-1.0)),
            400,
            "bad_request",
        ),
        (
            "top_p above 1",
            json,
            with("top_p", json!(2.0)),
            400,
            "bad_request",
        ),
        (
            "an unknown field",
            json,
            with("bogus", json!(1)),
            400,
            "bad_request",
        ),
        (
            "empty model",
            json,
            with("model", json!("  ")),
            400,
            "bad_request",
        ),
        (
            "empty prompt",
            json,
            with("prompt", json!("")),
            400,
            "bad_request",
        ),
        (
            "empty messages",
            json,
            json_body(json!({"operation": "infer", "model": model, "messages": []})),
            400,
            "bad_request",
        ),
        (
            "a message with an unknown role",
            json,
            json_body(
                json!({"operation": "infer", "model": model, "messages": [{"role": "robot", "content": "x"}]}),
            ),
            400,
            "bad_request",
        ),
        (
            "both prompt and messages",
            json,
            with("messages", json!([{"role": "user", "content": "x"}])),
            400,
            "bad_request",
        ),
        ("a 10 MB body", json, huge, 413, "bad_request"),
        ("not UTF-8", json, not_utf8, 400, "bad_request"),
        (
            "a form instead of JSON",
            "application/x-www-form-urlencoded",
            b"operation=infer&model=m".to_vec(),
            400,
            "bad_request",
        ),
    ];
    for (what, content_type, body, status, code) in cases {
        let (got, error) = post_raw(&url, "/v1/jobs", content_type, body).await;
        assert_eq!(got, status, "{what}: {error}");
        assert_eq!(error["error"]["code"], code, "{what}: {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
    }

    // A few of the same mistakes on the OpenAI routes, answered in OpenAI's error shape.
    let openai_cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("/v1/chat/completions", "not JSON", b"{not json".to_vec()),
        (
            "/v1/chat/completions",
            "no messages",
            json_body(json!({"model": model})),
        ),
        (
            "/v1/chat/completions",
            "n = 9",
            json_body(
                json!({"model": model, "n": 9, "messages": [{"role": "user", "content": "hi"}]}),
            ),
        ),
        (
            "/v1/completions",
            "max_tokens 10^12",
            json_body(json!({"model": model, "prompt": "hi", "max_tokens": 1_000_000_000_000u64})),
        ),
    ];
    for (path, what, body) in openai_cases {
        let (got, error) = post_raw(&url, path, json, body).await;
        assert_eq!(got, 400, "{path} {what}: {error}");
        assert_eq!(
            error["error"]["type"], "invalid_request_error",
            "{path} {what}: {error}"
        );
    }

    // The protocol's other routes refuse what they cannot serve, in JSON too.
    let http = reqwest::Client::new();
    for (method, path, status) in [
        (reqwest::Method::GET, "/v1/jobs/no-such-job/stream", 404),
        (reqwest::Method::DELETE, "/v1/jobs/no-such-job", 404),
        (reqwest::Method::GET, "/no/such/route", 404),
    ] {
        let response = http
            .request(method.clone(), format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let body: Value = response.json().await.expect("a JSON error body");
        assert!(body["error"]["code"].is_string(), "{method} {path}: {body}");
    }

    // Requests that are well formed but cannot be served become jobs that end clearly.
    let api = cluster.jobs();
    let unknown = api
        .run("/v1/jobs", &infer("/no/such/model.gguf", "hello", 4))
        .await;
    unknown.assert_one_terminal_then_done("unknown model");
    match unknown.terminal() {
        Some(JobEvent::Error { code, message }) => {
            // The hive has no such file; the error names the model.
            assert_eq!(*code, ErrorCode::ModelNotFound, "{message}");
            assert!(message.contains("/no/such/model.gguf"), "{message}");
        }
        other => panic!("unknown model: {other:?}"),
    }
    // The largest max_tokens there is: the worker stops at its context, with an answer.
    let longest = api.run("/v1/jobs", &infer(&model, "hello", u32::MAX)).await;
    longest.assert_one_terminal_then_done("max_tokens u32::MAX");
    // A resume point that is not an event id.
    let created: JobCreated = api.submit_ok("/v1/jobs", &infer(&model, "hi", 2)).await;
    let bad_resume = http
        .get(format!("{url}{}", created.sse_url))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_resume.status(), 400);
    let body: Value = bad_resume.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let stream: RawStream = read_raw_stream(api.open_stream(&created).await)
        .await
        .unwrap();
    stream.assert_one_terminal_then_done("after a bad resume");

    // The queen is still healthy and serves a normal job.
    let health = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let fine = api.run("/v1/jobs", &infer(&model, "hello again", 4)).await;
    fine.assert_one_terminal_then_done("a normal job afterwards");
    assert!(
        matches!(fine.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        fine.events
    );
}
