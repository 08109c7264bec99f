//! `rbee-hive` as a process, spawning real `llm-worker-rbee` children: the spawn stream, worker
//! listing and deletion, supervision of workers that die, heartbeats, bad requests, and
//! shutdown. Each test starts its own hive on a free loopback port with a stand-in queen that
//! records heartbeats.
//!
//! A model path that does not exist is refused with `400 bad_request` naming the path, before a
//! job exists; a model that exists but cannot be loaded ends the spawn job with an `error` event
//! (`model_load_failed`). A few tests use a shell script as the worker binary to play a worker
//! that never answers or ignores SIGTERM.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{ErrorCode, FinishReason, JobEvent, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    RawStream, TestHive, child_pids, fake_worker, process_gone, read_raw_stream, scratch_dir,
    tiny_model,
};

const TOKEN: &str = "hive-test-token";
const HIVE_ID: &str = "test-hive";

async fn start_hive(extra: &[&str]) -> TestHive {
    TestHive::start(HIVE_ID, TOKEN, extra).await
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Runs a job to its end and checks the protocol's promises on its stream.
async fn run_job(hive: &TestHive, body: &Value) -> RawStream {
    let stream = hive.run_job(body).await;
    assert_well_formed(&stream);
    stream
}

/// The stream's ending promises, and event ids that only go up.
fn assert_well_formed(stream: &RawStream) {
    stream.assert_one_terminal_then_done("hive");
    stream.assert_ids_increase();
}

fn spawn_op(model: &Path) -> Value {
    json!({"operation": "worker_spawn", "model": model.display().to_string()})
}

/// Spawns a worker for the tiny model and returns its info from the spawn job's `data` event.
async fn spawn_tiny(hive: &TestHive) -> WorkerInfo {
    hive.spawn_worker(&tiny_model()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn spawn_streams_progress_and_the_worker_then_delete_stops_it() {
    let hive = start_hive(&[]).await;
    let model = tiny_model();
    let stream = run_job(&hive, &spawn_op(&model)).await;
    let events: Vec<&JobEvent> = stream.events.iter().map(|(_, e)| e).collect();

    // spawning, loading…, data, done.
    let JobEvent::Spawning { worker_id, hive_id } = events[0] else {
        panic!("expected spawning first: {events:?}");
    };
    assert_eq!(hive_id.as_deref(), Some(HIVE_ID));
    assert!(
        worker_id.starts_with(&format!("{HIVE_ID}-")) && worker_id.ends_with("-w1"),
        "{worker_id}"
    );
    let n = events.len();
    assert!(n >= 4, "{events:?}");
    let loading = &events[1..n - 2];
    assert!(!loading.is_empty(), "{events:?}");
    let mut last_fraction = 0.0;
    for event in loading {
        match event {
            JobEvent::Loading {
                model: m, fraction, ..
            } => {
                assert_eq!(m, &model.display().to_string());
                assert!(*fraction >= last_fraction, "{events:?}");
                last_fraction = *fraction;
            }
            other => panic!("expected loading, got {other:?}"),
        }
    }
    assert_eq!(last_fraction, 1.0, "{events:?}");
    assert!(matches!(events[n - 2], JobEvent::Data { .. }), "{events:?}");
    assert_eq!(
        events[n - 1],
        &JobEvent::Done {
            finish_reason: FinishReason::Complete,
            usage: None
        }
    );

    let worker = stream.worker();
    assert_eq!(&worker.worker_id, worker_id);
    assert_eq!(worker.state, WorkerState::Ready);
    assert_eq!(worker.hive_id.as_deref(), Some(HIVE_ID));
    assert_eq!(worker.model, model.display().to_string());
    assert_eq!(worker.device, "cpu");
    let ready = http()
        .get(format!("{}/v1/ready", worker.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "the worker's url answers /v1/ready");
    let log = hive.log_dir.join(format!("{}.log", worker.worker_id));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("model loaded"), "{log_text}");
    assert!(
        !log_text.contains('\u{1b}'),
        "no colour codes in worker logs"
    );

    // Listed by the job, by the route and by worker_get.
    let listed = run_job(&hive, &json!({"operation": "worker_list"})).await;
    let workers: Vec<WorkerInfo> =
        serde_json::from_value(listed.data()["workers"].clone()).unwrap();
    assert_eq!(workers, vec![worker.clone()]);
    assert_eq!(hive.workers().await, vec![worker.clone()]);
    let got = run_job(
        &hive,
        &json!({"operation": "worker_get", "worker_id": worker.worker_id}),
    )
    .await;
    assert_eq!(got.data()["worker"]["worker_id"], json!(worker.worker_id));

    // Heartbeats carry the hive, its CPU and its worker; the worker beats to the same queen.
    hive.wait_until(
        Duration::from_secs(10),
        "a heartbeat with the ready worker",
        || {
            hive.queen.hive_beats().iter().any(|(b, _)| {
                b.hive
                    .workers
                    .iter()
                    .any(|w| w.worker_id == worker.worker_id && w.state == WorkerState::Ready)
            })
        },
    )
    .await;
    let (beat, auth) = hive.queen.hive_beats().pop().unwrap();
    assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(beat.hive.hive_id, HIVE_ID);
    assert_eq!(beat.hive.url, hive.daemon.url);
    // The CPU first, then any GPU (tests/capacity.rs checks the devices in detail).
    assert_eq!(beat.hive.devices[0].id, "cpu");
    assert!(beat.hive.devices[0].cores.is_some_and(|c| c > 0));
    assert!(beat.hive.devices[0].memory_total_bytes > 0);
    assert!(beat.hive.models.is_empty());
    hive.wait_until(Duration::from_secs(10), "a worker heartbeat", || {
        hive.queen.worker_beats().iter().any(|b| {
            b.worker.worker_id == worker.worker_id && b.worker.hive_id.as_deref() == Some(HIVE_ID)
        })
    })
    .await;

    // worker_delete stops the process and the worker leaves the list.
    let pids = child_pids(hive.daemon.pid());
    assert_eq!(pids.len(), 1, "one child: {pids:?}");
    let deleted = run_job(
        &hive,
        &json!({"operation": "worker_delete", "worker_id": worker.worker_id}),
    )
    .await;
    assert!(
        matches!(
            deleted.terminal(),
            Some(JobEvent::Done {
                finish_reason: FinishReason::Complete,
                ..
            })
        ),
        "{:?}",
        deleted.events
    );
    assert!(
        process_gone(pids[0]),
        "the worker process is gone once delete is done"
    );
    assert!(
        http()
            .get(format!("{}/health", worker.url))
            .send()
            .await
            .is_err(),
        "the worker's port no longer answers"
    );
    assert!(hive.workers().await.is_empty());
    let again = hive
        .submit(&json!({"operation": "worker_get", "worker_id": worker.worker_id}))
        .await;
    assert_eq!(again.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_with_sigkill_is_noticed() {
    let hive = start_hive(&[]).await;
    let worker = spawn_tiny(&hive).await;
    let pids = child_pids(hive.daemon.pid());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let beats_before = hive.queen.hive_beats().len();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(10);
    while !hive.workers().await.is_empty() {
        assert!(Instant::now() < deadline, "the dead worker is still listed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let listed = run_job(&hive, &json!({"operation": "worker_list"})).await;
    assert_eq!(listed.data()["workers"], json!([]));
    hive.wait_until(
        Duration::from_secs(10),
        "a heartbeat without the dead worker",
        || {
            hive.queen.hive_beats()[beats_before..]
                .iter()
                .any(|(b, _)| b.hive.workers.is_empty())
        },
    )
    .await;
    // Once gone from a heartbeat it never comes back.
    hive.wait_until(Duration::from_secs(10), "more heartbeats", || {
        hive.queen.hive_beats().len() > beats_before + 3
    })
    .await;
    let beats = hive.queen.hive_beats();
    let first_empty = beats_before
        + beats[beats_before..]
            .iter()
            .position(|(b, _)| b.hive.workers.is_empty())
            .unwrap();
    assert!(beats[first_empty..].iter().all(|(b, _)| {
        b.hive
            .workers
            .iter()
            .all(|w| w.worker_id != worker.worker_id)
    }));
    let log = hive.daemon.log_text();
    assert!(
        log.contains("worker exited on its own") && log.contains("SIGKILL"),
        "the death is logged with its cause:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_before_a_job_exists() {
    let hive = start_hive(&[]).await;
    let junk_path = "/nonexistent/rbee/model.gguf";
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "missing model path",
            json!({"operation": "worker_spawn", "model": junk_path}),
            404,
            "model_not_found",
        ),
        (
            "hub reference out of the model directory",
            json!({"operation": "worker_spawn", "model": "hf:org/repo:../../etc/passwd"}),
            400,
            "bad_request",
        ),
        (
            "unknown device",
            json!({"operation": "worker_spawn", "model": tiny_model().display().to_string(), "device": "tpu:0"}),
            400,
            "bad_request",
        ),
        (
            "another hive",
            json!({"operation": "worker_spawn", "hive_id": "elsewhere", "model": tiny_model().display().to_string()}),
            404,
            "not_found",
        ),
        (
            "unknown worker",
            json!({"operation": "worker_get", "worker_id": "nobody"}),
            404,
            "not_found",
        ),
        (
            "delete unknown worker",
            json!({"operation": "worker_delete", "worker_id": "nobody"}),
            404,
            "not_found",
        ),
        (
            "model_download of a malformed reference",
            json!({"operation": "model_download", "model": "hf:../x"}),
            400,
            "bad_request",
        ),
        (
            "model_get of a local path",
            json!({"operation": "model_get", "model": "m"}),
            400,
            "bad_request",
        ),
        (
            "model_delete of a model not in the catalog",
            json!({"operation": "model_delete", "model": "hf:org/repo"}),
            404,
            "model_not_found",
        ),
        (
            "infer",
            json!({"operation": "infer", "model": "m", "prompt": "hi"}),
            400,
            "unsupported_operation",
        ),
        (
            "missing field",
            json!({"operation": "worker_spawn"}),
            400,
            "bad_request",
        ),
    ];
    for (name, body, status, code) in cases {
        let response = hive.submit(&body).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        if name == "missing model path" {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(junk_path),
                "the error names the path: {body}"
            );
        }
    }

    // A capacity question without a model (more in tests/capacity.rs).
    let response = http()
        .get(format!("{}/v1/capacity", hive.daemon.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    // Only /health is open without the cluster token.
    let health = http()
        .get(format!("{}/health", hive.daemon.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["hive_id"], HIVE_ID);
    for (method, path) in [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/workers"),
        ("POST", "/v1/shutdown"),
        ("GET", "/v1/jobs/x/stream"),
        ("GET", "/v1/devices"),
    ] {
        let request = match method {
            "POST" => http()
                .post(format!("{}{path}", hive.daemon.url))
                .json(&json!({"operation": "worker_list"})),
            _ => http().get(format!("{}{path}", hive.daemon.url)),
        };
        let response = request.bearer_auth("wrong").send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path}");
        assert_eq!(
            response.json::<Value>().await.unwrap()["error"]["code"],
            "unauthorized"
        );
    }

    assert!(
        child_pids(hive.daemon.pid()).is_empty(),
        "no worker was started"
    );
    assert!(hive.workers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_garbage_gguf_fails_with_the_workers_reason_and_the_log_keeps_the_detail() {
    let hive = start_hive(&[]).await;
    let dir = scratch_dir("garbage");
    let model = dir.join("garbage.gguf");
    std::fs::write(
        &model,
        (0..4096u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();

    let created = hive.submit_ok(&spawn_op(&model)).await;
    let stream = test_harness::read_raw_stream(hive.open_stream(&created).await)
        .await
        .unwrap();
    assert_well_formed(&stream);
    assert!(
        matches!(stream.events[0].1, JobEvent::Spawning { .. }),
        "{:?}",
        stream.events
    );
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::ModelLoadFailed,
            message,
        }) => {
            // One line for the client: the worker's reason, the model as it was named, and
            // neither the worker's log nor where it lives.
            assert!(message.contains(&model.display().to_string()), "{message}");
            assert!(
                message.contains("not a readable GGUF file"),
                "the worker's own reason: {message}"
            );
            assert!(!message.contains('\n'), "one line: {message}");
            assert!(!message.contains("last lines of"), "no log tail: {message}");
            assert!(!message.contains(".log"), "no log path: {message}");
        }
        other => panic!("expected model_load_failed, got {other:?}"),
    }
    // The operator finds the details in the hive's log, by the job's id.
    hive.wait_until(
        Duration::from_secs(10),
        "the report in the hive's log",
        || {
            hive.daemon.log_text().lines().any(|line| {
                line.contains(&created.job_id) && line.contains("not a readable GGUF file")
            })
        },
    )
    .await;
    assert!(
        hive.daemon.log_text().contains("last lines of its log"),
        "{}",
        hive.daemon.log_text()
    );
    // The failed worker is not left behind.
    hive.wait_until(Duration::from_secs(10), "the failed worker gone", || {
        child_pids(hive.daemon.pid()).is_empty()
    })
    .await;
    assert!(hive.workers().await.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_every_worker_and_the_hive_exits_zero() {
    let mut hive = start_hive(&[]).await;
    spawn_tiny(&hive).await;
    spawn_tiny(&hive).await;
    let pids = child_pids(hive.daemon.pid());
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(hive.workers().await.len(), 2);

    hive.daemon.signal("TERM").unwrap();
    assert_eq!(
        hive.daemon
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap(),
        Some(0)
    );
    for pid in pids {
        assert!(process_gone(pid), "worker {pid} outlived the hive");
    }
    assert!(hive.daemon.log_text().contains("worker stopped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn post_shutdown_stops_the_workers_and_the_hive_exits_zero() {
    let mut hive = start_hive(&[]).await;
    let worker = spawn_tiny(&hive).await;
    let pids = child_pids(hive.daemon.pid());
    assert_eq!(pids.len(), 1);

    let response = http()
        .post(format!("{}/v1/shutdown", hive.daemon.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        hive.daemon
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap(),
        Some(0)
    );
    assert!(process_gone(pids[0]), "the worker outlived the hive");
    assert!(
        http()
            .get(format!("{}/health", worker.url))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_spawn_stops_its_worker() {
    let script = fake_worker("exec sleep 30");
    let hive = start_hive(&["--worker-binary", &script.display().to_string()]).await;
    let created = hive.submit_ok(&spawn_op(&tiny_model())).await;
    let mut events = hive.open_stream(&created).await.bytes_stream();
    let mut received = String::new();
    while !received.contains("\"event\":\"spawning\"") {
        received.push_str(std::str::from_utf8(&events.next().await.unwrap().unwrap()).unwrap());
    }
    hive.wait_until(
        Duration::from_secs(10),
        "the worker process started",
        || child_pids(hive.daemon.pid()).len() == 1,
    )
    .await;
    assert_eq!(hive.workers().await[0].state, WorkerState::Loading);

    let response = http()
        .delete(format!("{}/v1/jobs/{}", hive.daemon.url, created.job_id))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    while let Some(chunk) = events.next().await {
        received.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(received.contains("\"code\":\"cancelled\""), "{received}");
    hive.wait_until(
        Duration::from_secs(10),
        "the abandoned worker stopped",
        || child_pids(hive.daemon.pid()).is_empty(),
    )
    .await;
    assert!(hive.workers().await.is_empty());
    let _ = std::fs::remove_dir_all(script.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_ignores_sigterm_is_killed_after_the_grace() {
    let script = fake_worker("trap '' TERM\nexec sleep 30");
    let hive = start_hive(&[
        "--worker-binary",
        &script.display().to_string(),
        "--stop-grace",
        "1s",
    ])
    .await;
    let created = hive.submit_ok(&spawn_op(&tiny_model())).await;
    let spawn_stream = tokio::spawn(read_raw_stream(hive.open_stream(&created).await));
    let deadline = Instant::now() + Duration::from_secs(10);
    let worker = loop {
        if let Some(worker) = hive.workers().await.pop() {
            break worker;
        }
        assert!(Instant::now() < deadline, "the worker was never listed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let pids = child_pids(hive.daemon.pid());
    assert_eq!(pids.len(), 1);
    // Let the script install its trap before it is signalled.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let deleted = run_job(
        &hive,
        &json!({"operation": "worker_delete", "worker_id": worker.worker_id}),
    )
    .await;
    assert!(
        matches!(deleted.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        deleted.events
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "SIGKILL came only after the grace"
    );
    assert!(process_gone(pids[0]));
    assert!(hive.workers().await.is_empty());
    assert!(hive.daemon.log_text().contains("ignored SIGTERM"));

    // The spawn that was following it ends as cancelled, not as a load failure.
    let spawn_stream = spawn_stream.await.unwrap().unwrap();
    assert_well_formed(&spawn_stream);
    assert!(
        matches!(
            spawn_stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{:?}",
        spawn_stream.events
    );
    let _ = std::fs::remove_dir_all(script.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_never_loads_times_out_and_is_stopped() {
    let script = fake_worker("exec sleep 30");
    let hive = start_hive(&[
        "--worker-binary",
        &script.display().to_string(),
        "--load-timeout",
        "1s",
    ])
    .await;
    let stream = run_job(&hive, &spawn_op(&tiny_model())).await;
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::Timeout,
            message,
        }) => assert!(message.contains("did not finish loading"), "{message}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    hive.wait_until(Duration::from_secs(10), "the stuck worker stopped", || {
        child_pids(hive.daemon.pid()).is_empty()
    })
    .await;
    assert!(hive.workers().await.is_empty());
    let _ = std::fs::remove_dir_all(script.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_free_worker_port_is_a_no_capacity_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let hive = start_hive(&["--worker-port-range", &port]).await;
    let stream = run_job(&hive, &spawn_op(&tiny_model())).await;
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::NoCapacity,
            message,
        }) => assert!(message.contains(&port), "{message}"),
        other => panic!("expected no_capacity, got {other:?}"),
    }
    assert!(child_pids(hive.daemon.pid()).is_empty());
}
