//! `queen-rbee` as a process: registries fed by heartbeats, inference relayed to real workers,
//! failover, forwarding to hives, auth, cancellation and shutdown. Each test starts its own
//! queen on a free loopback port; workers are the real `llm-worker-rbee`, and a
//! `ScriptedUpstream` stands in where a peer must fail in a precise way.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{
    ErrorCode, FinishReason, HiveHeartbeat, HiveInfo, JobCreated, JobEvent, WorkerHeartbeat,
    WorkerInfo, WorkerState,
};
use serde_json::{Value, json};
use test_harness::{
    Daemon, JobApi, RawStream, Script, ScriptedUpstream, eventually, free_port, read_raw_stream,
    smollm2, tiny_model,
};

const TOKEN: &str = "queen-test-cluster-token";
/// Process start-up and scheduling on a busy test machine, on top of the protocol's own timing.
const SLACK: Duration = Duration::from_millis(700);

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn start_queen_on(port: u16, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
    Daemon::queen_on(port, args, envs).await
}

async fn start_queen(args: &[&str], envs: &[(&str, &str)]) -> Daemon {
    Daemon::queen(args, envs).await
}

/// A real worker that sends heartbeats to `queen_url` every 100 ms, with the cluster token.
fn start_worker(model: &Path, model_ref: &str, queen_url: &str, worker_id: &str) -> Daemon {
    let args = [
        "--model-ref",
        model_ref,
        "--queen-url",
        queen_url,
        "--heartbeat-interval",
        "100ms",
    ];
    Daemon::worker_as(model, worker_id, 2, TOKEN, &args)
}

async fn workers(queen: &Daemon) -> Vec<WorkerInfo> {
    let body: Value = client()
        .get(format!("{}/v1/workers", queen.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    serde_json::from_value(body["workers"].clone()).expect("a worker list")
}

async fn worker_state(queen: &Daemon, worker_id: &str) -> Option<WorkerState> {
    workers(queen)
        .await
        .into_iter()
        .find(|w| w.worker_id == worker_id)
        .map(|w| w.state)
}

async fn hives(queen: &Daemon) -> Vec<Value> {
    let body: Value = client()
        .get(format!("{}/v1/hives", queen.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["hives"].as_array().expect("a hive list").clone()
}

/// Starts a queen and a real worker reporting to it; returns once the queen lists the worker
/// as ready.
async fn queen_with_worker(model: &Path, model_ref: &str) -> (Daemon, Daemon) {
    let queen = start_queen(
        &["--heartbeat-interval", "100ms"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let worker = start_worker(model, model_ref, &queen.url, "w-queen");
    eventually(
        "the worker is listed ready",
        Duration::from_secs(60),
        async || (worker_state(&queen, "w-queen").await == Some(WorkerState::Ready)).then_some(()),
    )
    .await;
    (queen, worker)
}

async fn post_json(url: String, body: &Value, bearer: Option<&str>) -> reqwest::Response {
    let mut request = client().post(url).json(body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn submit(queen: &Daemon, body: &Value) -> JobCreated {
    JobApi::new(&queen.url, None)
        .submit_ok("/v1/jobs", body)
        .await
}

async fn open_stream(queen: &Daemon, created: &JobCreated, key: Option<&str>) -> reqwest::Response {
    JobApi::new(&queen.url, key).open_stream(created).await
}

async fn run_job(queen: &Daemon, body: &Value) -> RawStream {
    JobApi::new(&queen.url, None).run("/v1/jobs", body).await
}

fn worker_beat(worker_id: &str, url: &str, model: &str, slots: u32) -> Value {
    json!(WorkerHeartbeat {
        worker: WorkerInfo {
            worker_id: worker_id.into(),
            url: url.into(),
            model: model.into(),
            device: "cpu".into(),
            state: WorkerState::Ready,
            slots_total: slots,
            slots_free: slots,
            hive_id: None,
            context_length: Some(512),
        },
        cached_prefixes: Vec::new(),
    })
}

fn hive_beat(hive_id: &str, url: &str) -> Value {
    json!(HiveHeartbeat {
        hive: HiveInfo {
            hive_id: hive_id.into(),
            url: url.into(),
            devices: Vec::new(),
            workers: Vec::new(),
            models: Vec::new(),
            model_dirs: Vec::new(),
        },
    })
}

fn infer(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_register_a_worker_and_silence_removes_it() {
    let queen = start_queen(
        &["--heartbeat-interval", "100ms"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let mut worker = start_worker(&tiny_model(), "tiny", &queen.url, "w-beats");
    worker
        .wait_for("/health", None, Duration::from_secs(30))
        .await
        .unwrap();
    let up = Instant::now();
    eventually("the worker is listed", Duration::from_secs(5), async || {
        worker_state(&queen, "w-beats").await
    })
    .await;
    assert!(
        up.elapsed() <= Duration::from_millis(300) + SLACK,
        "listed only after {:?}",
        up.elapsed()
    );
    let listed = eventually("the worker is ready", Duration::from_secs(30), async || {
        workers(&queen)
            .await
            .into_iter()
            .find(|w| w.worker_id == "w-beats" && w.state == WorkerState::Ready)
    })
    .await;
    assert_eq!(listed.url, worker.url);
    assert_eq!((listed.model.as_str(), listed.slots_free), ("tiny", 1));

    worker.signal("KILL").unwrap();
    let killed = Instant::now();
    eventually(
        "the killed worker goes stale",
        Duration::from_secs(3),
        async || (worker_state(&queen, "w-beats").await == Some(WorkerState::Stale)).then_some(()),
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(150),
        "stale too early: {:?}",
        killed.elapsed()
    );
    eventually(
        "the killed worker is forgotten",
        Duration::from_secs(5),
        async || {
            worker_state(&queen, "w-beats")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(850),
        "forgotten before 10 intervals: {:?}",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hive_heartbeat_registers_the_hive_until_it_goes_quiet() {
    let queen = start_queen(&["--heartbeat-interval", "100ms"], &[]).await;
    let beat = hive_beat("hive-a", "http://127.0.0.1:7835");
    let url = format!("{}/v1/hive-heartbeat", queen.url);
    for _ in 0..5 {
        assert_eq!(post_json(url.clone(), &beat, None).await.status(), 204);
        let listed = hives(&queen).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let hive = &listed[0];
        assert_eq!(hive["hive_id"], "hive-a");
        assert_eq!(hive["url"], "http://127.0.0.1:7835");
        assert_eq!(hive["status"], "healthy", "{hive}");
        assert!(hive["last_seen_ms_ago"].as_u64().unwrap() < 300, "{hive}");
        for field in ["devices", "workers", "models"] {
            assert!(hive[field].is_array(), "{field} in {hive}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(
        "the silent hive goes stale",
        Duration::from_secs(3),
        async || {
            let listed = hives(&queen).await;
            (listed.first()?["status"] == "stale").then_some(())
        },
    )
    .await;
    eventually(
        "the silent hive is forgotten",
        Duration::from_secs(5),
        async || hives(&queen).await.is_empty().then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_queen_relearns_workers_from_heartbeats() {
    let port = free_port();
    let envs = [("RBEE_CLUSTER_TOKEN", TOKEN)];
    let mut first = start_queen_on(port, &["--heartbeat-interval", "100ms"], &envs).await;
    let _worker = start_worker(&tiny_model(), "tiny", &first.url, "w-restart");
    eventually(
        "the worker is listed",
        Duration::from_secs(30),
        async || {
            (worker_state(&first, "w-restart").await == Some(WorkerState::Ready)).then_some(())
        },
    )
    .await;
    first.signal("TERM").unwrap();
    assert_eq!(
        first.wait_exit(Duration::from_secs(15)).await.unwrap(),
        Some(0)
    );

    let second = start_queen_on(port, &["--heartbeat-interval", "100ms"], &envs).await;
    let up = Instant::now();
    eventually(
        "the restarted queen lists the worker",
        Duration::from_secs(5),
        async || {
            (worker_state(&second, "w-restart").await == Some(WorkerState::Ready)).then_some(())
        },
    )
    .await;
    assert!(
        up.elapsed() <= Duration::from_millis(300) + SLACK,
        "{:?}",
        up.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_through_the_queen_to_a_real_worker() {
    let (queen, _worker) = queen_with_worker(&tiny_model(), "tiny").await;
    let stream = run_job(&queen, &infer("tiny", "hello there", 6)).await;
    stream.assert_one_terminal_then_done("queen");
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { usage: Some(u), .. }) if u.completion_tokens > 0),
        "{:?}",
        stream.events
    );
    let tokens = stream
        .events
        .iter()
        .filter(|(_, e)| matches!(e, JobEvent::Token { .. }))
        .count();
    assert!((1..=6).contains(&tokens), "{tokens} tokens");
    let ids: Vec<u64> = stream
        .events
        .iter()
        .map(|(id, _)| id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    // A model no worker serves, with no hive to start one, is an error event, not a hang.
    let started = Instant::now();
    let stream = run_job(&queen, &infer("another-model", "hi", 2)).await;
    stream.assert_one_terminal_then_done("queen");
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::NoCapacity,
                ..
            })
        ),
        "{:?}",
        stream.events
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_says_paris_through_the_queen() {
    let (queen, _worker) = queen_with_worker(&smollm2(), "smollm2").await;
    let stream = run_job(&queen, &infer("smollm2", "The capital of France is", 12)).await;
    stream.assert_one_terminal_then_done("queen");
    let text = stream.text();
    assert!(text.contains("Paris"), "completion: {text:?}");
    assert!(matches!(stream.terminal(), Some(JobEvent::Done { .. })));
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_without_worker_or_hive_is_no_capacity() {
    let queen = start_queen(&[], &[]).await;
    let started = Instant::now();
    let stream = run_job(&queen, &infer("smollm2", "hello", 4)).await;
    stream.assert_one_terminal_then_done("queen");
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::NoCapacity,
            message,
        }) => assert!(message.contains("rbee-keeper hive start"), "{message}"),
        other => panic!("expected no_capacity, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Malformed requests are refused before a job exists.
    for bad in [
        json!({"operation": "infer", "model": "m"}),
        json!({"operation": "infer", "model": "", "prompt": "x"}),
        json!({"operation": "infer", "model": "m", "prompt": "x", "max_tokens": 0}),
        json!({"operation": "teleport"}),
    ] {
        let response = post_json(format!("{}/v1/jobs", queen.url), &bad, None).await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_for_unknown_or_ambiguous_hives_are_refused_before_a_job() {
    let queen = start_queen(&[], &[]).await;
    let jobs = format!("{}/v1/jobs", queen.url);
    let list = json!({"operation": "worker_list"});
    let response = post_json(jobs.clone(), &list, None).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_capacity", "{body}");

    let beats = format!("{}/v1/hive-heartbeat", queen.url);
    post_json(
        beats.clone(),
        &hive_beat("hive-a", "http://127.0.0.1:1"),
        None,
    )
    .await;
    for op in [
        json!({"operation": "worker_list", "hive_id": "nope"}),
        json!({"operation": "worker_spawn", "hive_id": "nope", "model": "/m.gguf"}),
        json!({"operation": "model_list", "hive_id": "nope"}),
    ] {
        let response = post_json(jobs.clone(), &op, None).await;
        assert_eq!(response.status(), 404, "{op}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("nope") && message.contains("hive-a"),
            "{message}"
        );
    }

    post_json(beats, &hive_beat("hive-b", "http://127.0.0.1:2"), None).await;
    let response = post_json(jobs, &list, None).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("hive-a") && message.contains("hive-b"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_model_references_are_refused_before_a_job_with_or_without_a_hive() {
    let hive = ScriptedUpstream::start(Script {
        events: vec![JobEvent::Done {
            finish_reason: FinishReason::Complete,
            usage: None,
        }],
        complete: true,
    })
    .await;
    let queen = start_queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
    let jobs = format!("{}/v1/jobs", queen.url);
    let refused = [
        (
            json!({"operation": "model_download", "model": "hf:../b"}),
            "hf:../b",
        ),
        (
            infer("hf:a/b:../../etc/passwd", "hi", 4),
            "hf:a/b:../../etc/passwd",
        ),
        (
            json!({"operation": "worker_spawn", "model": "hf:a/b:../../etc/passwd"}),
            "hf:a/b:../../etc/passwd",
        ),
        (infer("s3:bucket/m", "hi", 4), "s3:bucket/m"),
    ];
    let refuse_all = async || {
        for (op, named) in &refused {
            let response = post_json(jobs.clone(), op, None).await;
            assert_eq!(response.status(), 400, "{op}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "bad_request", "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(named), "{message}");
        }
    };

    refuse_all().await;
    let registered = post_json(
        format!("{}/v1/hive-heartbeat", queen.url),
        &hive_beat("hive-s", &hive.url),
        Some(TOKEN),
    )
    .await;
    assert_eq!(registered.status(), 204);
    refuse_all().await;
    assert!(hive.requests_to("POST", "/v1/jobs").is_empty());

    // A well-formed reference goes on to the same hive.
    let ok = json!({"operation": "model_download", "model": "hf:org/repo:m.gguf"});
    run_job(&queen, &ok)
        .await
        .assert_one_terminal_then_done("queen");
    let submitted = hive.requests_to("POST", "/v1/jobs");
    assert_eq!(submitted.len(), 1, "{:?}", hive.requests());
    assert_eq!(submitted[0].body.as_ref(), Some(&ok));
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_are_forwarded_and_their_events_relayed_unchanged() {
    let script = vec![
        JobEvent::narration("listing workers"),
        JobEvent::Data {
            data: json!({"workers": [{"worker_id": "x"}]}),
        },
        JobEvent::Done {
            finish_reason: FinishReason::Complete,
            usage: None,
        },
    ];
    let hive = ScriptedUpstream::start(Script {
        events: script.clone(),
        complete: true,
    })
    .await;
    let queen = start_queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
    let registered = post_json(
        format!("{}/v1/hive-heartbeat", queen.url),
        &hive_beat("hive-s", &hive.url),
        Some(TOKEN),
    )
    .await;
    assert_eq!(registered.status(), 204);

    let op = json!({"operation": "worker_list"});
    let stream = run_job(&queen, &op).await;
    stream.assert_one_terminal_then_done("queen");
    let relayed: Vec<JobEvent> = stream.events.iter().map(|(_, e)| e.clone()).collect();
    assert_eq!(relayed, script);

    let submitted = hive.requests_to("POST", "/v1/jobs");
    assert_eq!(submitted.len(), 1, "{:?}", hive.requests());
    assert_eq!(submitted[0].body.as_ref(), Some(&op));
    assert_eq!(
        submitted[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_lost_before_the_first_token_is_replaced() {
    let (queen, _worker) = queen_with_worker(&tiny_model(), "tiny").await;
    // Two free slots put it ahead of the real worker; its stream dies after `started`.
    let dying = ScriptedUpstream::start(Script {
        events: vec![JobEvent::Started { prompt_tokens: 3 }],
        complete: false,
    })
    .await;
    let registered = post_json(
        format!("{}/v1/worker-heartbeat", queen.url),
        &worker_beat("w-dying", &dying.url, "tiny", 2),
        Some(TOKEN),
    )
    .await;
    assert_eq!(registered.status(), 204);

    let stream = run_job(&queen, &infer("tiny", "hello", 4)).await;
    stream.assert_one_terminal_then_done("queen");
    assert_eq!(dying.requests_to("POST", "/v1/inference").len(), 1);
    assert!(
        stream.events.iter().any(|(_, e)| matches!(e,
            JobEvent::Narration { message } if message.contains("w-dying went away before the first token"))),
        "{:?}",
        stream.events
    );
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        stream.events
    );
    assert!(
        stream
            .events
            .iter()
            .any(|(_, e)| matches!(e, JobEvent::Token { .. }))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_lost_after_the_first_token_is_worker_lost() {
    let queen = start_queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
    let dying = ScriptedUpstream::start(Script {
        events: vec![
            JobEvent::Started { prompt_tokens: 3 },
            JobEvent::Token {
                text: "Hel".into(),
                token_id: 7,
                index: 0,
                logprobs: None,
            },
        ],
        complete: false,
    })
    .await;
    post_json(
        format!("{}/v1/worker-heartbeat", queen.url),
        &worker_beat("w-dying", &dying.url, "m", 1),
        Some(TOKEN),
    )
    .await;
    let stream = run_job(&queen, &infer("m", "hello", 8)).await;
    stream.assert_one_terminal_then_done("queen");
    assert_eq!(stream.text(), "Hel");
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::WorkerLost,
                ..
            })
        ),
        "{:?}",
        stream.events
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_need_the_cluster_token_when_one_is_set() {
    let queen = start_queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
    let url = format!("{}/v1/worker-heartbeat", queen.url);
    let beat = worker_beat("w-auth", "http://127.0.0.1:1", "m", 1);
    for bearer in [None, Some("wrong-token")] {
        let response = post_json(url.clone(), &beat, bearer).await;
        assert_eq!(response.status(), 401, "{bearer:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let hive = post_json(
        format!("{}/v1/hive-heartbeat", queen.url),
        &hive_beat("h", "http://127.0.0.1:1"),
        None,
    )
    .await;
    assert_eq!(hive.status(), 401);
    assert!(
        workers(&queen).await.is_empty(),
        "a refused heartbeat registers nothing"
    );

    assert_eq!(
        post_json(url.clone(), &beat, Some(TOKEN)).await.status(),
        204
    );
    assert_eq!(
        worker_state(&queen, "w-auth").await,
        Some(WorkerState::Ready)
    );

    let malformed = post_json(url, &json!({"worker": {"worker_id": "x"}}), Some(TOKEN)).await;
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_routes_need_an_api_key_when_keys_are_set() {
    let queen = start_queen(&[], &[("RBEE_API_KEYS", "key-one, key-two")]).await;
    let jobs = format!("{}/v1/jobs", queen.url);
    // A hub reference: without admin keys an API key may name one (a path it may not).
    let op = infer("hf:org/repo", "hello", 2);
    for bearer in [None, Some("wrong-key")] {
        let response = post_json(jobs.clone(), &op, bearer).await;
        assert_eq!(response.status(), 401, "{bearer:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    for path in ["/v1/workers", "/v1/hives", "/v1/jobs/x/stream"] {
        let response = client()
            .get(format!("{}{path}", queen.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
    }
    let refused_shutdown = client()
        .post(format!("{}/v1/shutdown", queen.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused_shutdown.status(), 401);

    let health = client()
        .get(format!("{}/health", queen.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let listed = client()
        .get(format!("{}/v1/workers", queen.url))
        .bearer_auth("key-one")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    let response = post_json(jobs, &op, Some("key-two")).await;
    assert_eq!(response.status(), 201);
    let created: JobCreated = response.json().await.unwrap();
    let stream = read_raw_stream(open_stream(&queen, &created, Some("key-two")).await)
        .await
        .unwrap();
    stream.assert_one_terminal_then_done("queen");
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_the_client_stream_cancels_the_worker_generation() {
    let (queen, worker) = queen_with_worker(&smollm2(), "smollm2").await;
    let created = submit(
        &queen,
        &infer(
            "smollm2",
            "Count from one to one thousand: one, two, three,",
            1500,
        ),
    )
    .await;
    let mut events = open_stream(&queen, &created, None).await.bytes_stream();
    let mut received = String::new();
    while received.matches("\"event\":\"token\"").count() < 3 {
        received.push_str(std::str::from_utf8(&events.next().await.unwrap().unwrap()).unwrap());
    }
    let info = async || -> WorkerInfo {
        client()
            .get(format!("{}/v1/info", worker.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    assert_eq!(info().await.slots_free, 0, "busy while generating");
    drop(events);
    eventually(
        "the worker's slot is free again",
        Duration::from_secs(20),
        async || (info().await.slots_free == 1).then_some(()),
    )
    .await;
    let log = worker.log_text();
    assert!(
        log.contains("finish_reason=Cancelled"),
        "the generation was not cancelled:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_cascades_to_the_hives_and_ends_the_queen() {
    let hive = ScriptedUpstream::start(Script {
        events: Vec::new(),
        complete: true,
    })
    .await;
    let mut queen = start_queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
    post_json(
        format!("{}/v1/hive-heartbeat", queen.url),
        &hive_beat("hive-s", &hive.url),
        Some(TOKEN),
    )
    .await;
    let response = client()
        .post(format!("{}/v1/shutdown", queen.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        queen.wait_exit(Duration::from_secs(15)).await.unwrap(),
        Some(0)
    );
    let asked = hive.requests_to("POST", "/v1/shutdown");
    assert_eq!(asked.len(), 1, "{:?}", hive.requests());
    assert_eq!(
        asked[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_queen_but_leaves_the_hives_running() {
    let hive = ScriptedUpstream::start(Script {
        events: Vec::new(),
        complete: true,
    })
    .await;
    let mut queen = start_queen(&[], &[]).await;
    post_json(
        format!("{}/v1/hive-heartbeat", queen.url),
        &hive_beat("hive-s", &hive.url),
        None,
    )
    .await;
    queen.signal("TERM").unwrap();
    assert_eq!(
        queen.wait_exit(Duration::from_secs(15)).await.unwrap(),
        Some(0)
    );
    assert!(hive.requests_to("POST", "/v1/shutdown").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_start_through_a_real_hive_then_shutdown_stops_the_cluster() {
    let mut queen = start_queen(
        &["--heartbeat-interval", "100ms", "--spawn-timeout", "60s"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let hive_port = free_port();
    let first_worker_port = free_port().min(65_000);
    let log_dir = std::env::temp_dir().join(format!(
        "rbee-queen-test-{}-{hive_port}",
        std::process::id()
    ));
    let args: Vec<String> = [
        "--port",
        &hive_port.to_string(),
        "--queen-url",
        &queen.url,
        "--hive-id",
        "hive-cold",
        "--heartbeat-interval",
        "100ms",
        "--log-dir",
        &log_dir.display().to_string(),
        "--worker-port-range",
        &format!("{first_worker_port}-{}", first_worker_port + 50),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut hive = Daemon::start(
        "rbee-hive",
        &args,
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
        format!("http://127.0.0.1:{hive_port}"),
    )
    .expect("start hive");
    eventually("the hive registers", Duration::from_secs(30), async || {
        let listed = hives(&queen).await;
        (listed.first()?["hive_id"] == "hive-cold").then_some(())
    })
    .await;

    // Two jobs for a model no worker serves yet: one cold start serves both.
    let model = tiny_model().display().to_string();
    let (hello, morning) = (infer(&model, "hello", 4), infer(&model, "good morning", 4));
    let (first, second) = tokio::join!(run_job(&queen, &hello), run_job(&queen, &morning));
    for stream in [&first, &second] {
        stream.assert_one_terminal_then_done("queen");
        assert!(
            matches!(stream.terminal(), Some(JobEvent::Done { .. })),
            "{:?}\nhive log:\n{}",
            stream.events,
            hive.log_text()
        );
        assert!(
            !stream
                .events
                .iter()
                .any(|(_, e)| matches!(e, JobEvent::Data { .. })),
            "the spawn's result is the queen's, not the client's: {:?}",
            stream.events
        );
    }
    let spawned = |stream: &RawStream| {
        stream
            .events
            .iter()
            .any(|(_, e)| matches!(e, JobEvent::Spawning { .. }))
    };
    assert!(
        spawned(&first) != spawned(&second),
        "exactly one job shows the cold start:\n{:?}\n{:?}",
        first.events,
        second.events
    );
    let stream = if spawned(&first) { &first } else { &second };
    let position =
        |wanted: fn(&JobEvent) -> bool| stream.events.iter().position(|(_, e)| wanted(e));
    let spawning = position(|e| matches!(e, JobEvent::Spawning { .. })).expect("a spawning event");
    let token = position(|e| matches!(e, JobEvent::Token { .. })).expect("a token");
    assert!(spawning < token, "{:?}", stream.events);

    let worker = eventually(
        "the spawned worker is listed",
        Duration::from_secs(5),
        async || {
            workers(&queen).await.into_iter().find(|w| {
                w.hive_id.as_deref() == Some("hive-cold") && w.state == WorkerState::Ready
            })
        },
    )
    .await;
    assert_eq!(worker.model, model);

    // The next job finds the worker: no second cold start.
    let stream = run_job(&queen, &infer(&model, "hello again", 2)).await;
    stream.assert_one_terminal_then_done("queen");
    assert!(matches!(stream.terminal(), Some(JobEvent::Done { .. })));
    assert!(
        !stream
            .events
            .iter()
            .any(|(_, e)| matches!(e, JobEvent::Spawning { .. })),
        "{:?}",
        stream.events
    );
    assert_eq!(workers(&queen).await.len(), 1);

    let response = client()
        .post(format!("{}/v1/shutdown", queen.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        queen.wait_exit(Duration::from_secs(15)).await.unwrap(),
        Some(0)
    );
    assert_eq!(
        hive.wait_exit(Duration::from_secs(30)).await.unwrap(),
        Some(0)
    );
    let worker_health = client().get(format!("{}/health", worker.url)).send().await;
    assert!(worker_health.is_err(), "the hive stopped its worker");
    let _ = std::fs::remove_dir_all(&log_dir);
}
