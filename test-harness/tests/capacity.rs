//! `rbee-hive`'s devices and capacity as a client sees them: `GET /v1/devices`, the devices in
//! its heartbeats, `GET /v1/capacity` (`204` fits, `409` with the numbers), bad questions, and
//! a `worker_spawn` refused with `no_capacity` before any worker starts, and the queen placing a
//! cold start on a device its hive reported, moving on to the next placement when a hive refuses.
//!
//! `--memory-reserve` makes "does not fit" deterministic: a reserve larger than any machine's
//! memory leaves nothing available, whatever this machine has free.

use std::path::Path;
use std::time::{Duration, Instant};

use model_gen::ModelSpec;
use rbee_contract::{
    ApiErrorBody, DeviceInfo, DeviceKind, DevicesResponse, ErrorCode, HiveHeartbeat, HiveInfo,
    JobEvent, NoCapacityBody,
};
use serde_json::{Value, json};
use test_harness::{Daemon, JobApi, Script, ScriptedUpstream, TestHive, child_pids, tiny_model};

const TOKEN: &str = "capacity-test-token";

/// Bytes the hive allows on the CPU beyond weights and KV cache (`OVERHEAD_CPU`, documented
/// in docs/hive.md).
const CPU_OVERHEAD: u64 = 256 << 20;

async fn get(hive: &TestHive, path_and_query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}{path_and_query}", hive.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
}

fn capacity_query(model: &Path, device: &str) -> String {
    format!(
        "/v1/capacity?model={}&device={device}",
        model.display().to_string().replace('/', "%2F")
    )
}

/// Whether this machine has an NVIDIA driver at all; without one the GPU list must be empty.
fn nvidia_driver() -> bool {
    Path::new("/proc/driver/nvidia").exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_list_the_cpu_and_the_gpus_and_ride_in_heartbeats() {
    let hive = TestHive::start("devices-hive", TOKEN, &[]).await;
    let response = get(&hive, "/v1/devices").await;
    assert_eq!(response.status(), 200);
    let devices: DevicesResponse = response.json().await.expect("a devices body");
    assert_eq!(devices.hive_id, "devices-hive");
    let cpu = &devices.cpu;
    assert_eq!((cpu.id.as_str(), cpu.kind), ("cpu", DeviceKind::Cpu));
    assert!(!cpu.name.is_empty());
    assert!(cpu.cores.is_some_and(|n| n > 0), "{cpu:?}");
    assert!(cpu.memory_total_bytes > 0, "{cpu:?}");
    assert!(cpu.memory_free_bytes <= cpu.memory_total_bytes, "{cpu:?}");
    if nvidia_driver() {
        for (n, gpu) in devices.gpus.iter().enumerate() {
            assert_eq!(gpu.id, format!("cuda:{n}"));
            assert!(gpu.memory_total_bytes > 0, "{gpu:?}");
        }
    } else {
        assert!(devices.gpus.is_empty(), "no driver, no GPU: {devices:?}");
    }

    // The same devices ride in every heartbeat.
    hive.wait_until(Duration::from_secs(10), "a heartbeat", || {
        !hive.queen.hive_beats().is_empty()
    })
    .await;
    let (beat, _) = hive.queen.hive_beats().pop().expect("a heartbeat");
    let ids: Vec<&str> = beat.hive.devices.iter().map(|d| d.id.as_str()).collect();
    let expected: Vec<String> = devices.all().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, expected);
    assert!(beat.hive.devices[0].memory_total_bytes > 0);

    // Behind the cluster token like every route but /health.
    let anonymous = reqwest::get(format!("{}/v1/devices", hive.url()))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_model_fits_on_the_cpu() {
    let hive = TestHive::start("fits-hive", TOKEN, &[]).await;
    let response = get(&hive, &capacity_query(&tiny_model(), "cpu")).await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 204, "{body}");
    assert!(body.is_empty(), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_does_not_fit_gets_409_with_the_numbers() {
    let hive = TestHive::start("full-hive", TOKEN, &["--memory-reserve", "1TiB"]).await;
    let model = tiny_model();
    let response = get(&hive, &capacity_query(&model, "cpu")).await;
    assert_eq!(response.status(), 409);
    let body: NoCapacityBody = response.json().await.expect("a no-capacity body");
    assert_eq!(body.error.code, ErrorCode::NoCapacity);
    let e = &body.estimate;
    assert_eq!(e.device, "cpu");
    assert_eq!(e.model, model.display().to_string());
    assert_eq!(e.available_bytes, 0, "a 1 TiB reserve leaves nothing");

    // The tiny model's own numbers: its context, and keys and values in f32 over every layer.
    let spec = ModelSpec::tiny();
    let head_dim = (spec.hidden / spec.heads) as u64;
    let per_position = 2 * spec.layers as u64 * spec.kv_heads as u64 * head_dim * 4;
    assert_eq!(e.context_length, spec.context_length as u64);
    assert_eq!(e.kv_cache_bytes, per_position * e.context_length);
    assert_eq!(e.overhead_bytes, CPU_OVERHEAD);
    let file = std::fs::metadata(&model).unwrap().len();
    assert!(e.weights_bytes >= file / 2, "{e:?} for a {file}-byte file");
    // The worker's prompt cache store, the hive's default.
    assert_eq!(e.prompt_cache_bytes, 256 << 20);
    assert_eq!(
        e.required_bytes,
        e.weights_bytes + e.kv_cache_bytes + e.prompt_cache_bytes + e.overhead_bytes
    );
    for number in [
        e.required_bytes,
        e.available_bytes,
        e.kv_cache_bytes,
        e.prompt_cache_bytes,
    ] {
        assert!(
            body.error.message.contains(&number.to_string()),
            "{number}: {}",
            body.error.message
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_capacity_questions_get_clear_errors() {
    let hive = TestHive::start("questions-hive", TOKEN, &[]).await;
    let model = tiny_model();
    let cases = [
        (
            "/v1/capacity?device=cpu".to_string(),
            400,
            ErrorCode::BadRequest,
            "model",
        ),
        (
            capacity_query(&model, "gpu"),
            400,
            ErrorCode::BadRequest,
            "gpu",
        ),
        (
            capacity_query(&model, "cuda:7"),
            404,
            ErrorCode::NotFound,
            "cuda:7",
        ),
        (
            capacity_query(Path::new("/nonexistent/rbee/m.gguf"), "cpu"),
            404,
            ErrorCode::ModelNotFound,
            "/nonexistent/rbee/m.gguf",
        ),
        (
            "/v1/capacity?model=hf:org/repo".to_string(),
            404,
            ErrorCode::ModelNotFound,
            "hf:org/repo",
        ),
    ];
    for (query, status, code, mentions) in cases {
        let response = get(&hive, &query).await;
        assert_eq!(response.status(), status, "{query}");
        let body: ApiErrorBody = response.json().await.expect("a JSON error body");
        assert_eq!(body.error.code, code, "{query}");
        assert!(body.error.message.contains(mentions), "{query}: {body:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spawn_that_does_not_fit_is_refused_before_a_worker_starts() {
    let hive = TestHive::start("refusing-hive", TOKEN, &["--memory-reserve", "1TiB"]).await;
    let model = tiny_model();
    let stream = hive
        .run_job(&json!({"operation": "worker_spawn", "model": model.display().to_string()}))
        .await;
    stream.assert_one_terminal_then_done("hive");
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::NoCapacity,
            message,
        }) => {
            assert!(message.contains("does not fit on cpu"), "{message}");
            assert!(message.contains("0 bytes are available"), "{message}");
        }
        other => panic!("expected no_capacity, got {other:?}"),
    }
    assert!(
        !stream
            .events
            .iter()
            .any(|(_, e)| matches!(e, JobEvent::Spawning { .. })),
        "nothing was spawned: {:?}",
        stream.events
    );
    assert!(
        child_pids(hive.daemon.pid()).is_empty(),
        "no worker process"
    );
    assert!(hive.workers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queen_places_on_a_reported_device_and_relays_the_hives_refusal() {
    let queen = Daemon::queen(
        &["--heartbeat-interval", "100ms"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let hive = TestHive::start(
        "placed-hive",
        TOKEN,
        &["--queen-url", &queen.url, "--memory-reserve", "1TiB"],
    )
    .await;

    // The queen learns the hive's devices from its heartbeats.
    let deadline = Instant::now() + Duration::from_secs(30);
    let hives = loop {
        let body: Value = reqwest::get(format!("{}/v1/hives", queen.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let hives = body["hives"].as_array().cloned().unwrap_or_default();
        if !hives.is_empty() {
            break hives;
        }
        assert!(Instant::now() < deadline, "the hive never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hives[0]["hive_id"], "placed-hive");
    assert_eq!(hives[0]["devices"][0]["id"], "cpu");
    assert!(hives[0]["devices"][0]["memory_total_bytes"].as_u64() > Some(0));

    // The model's size is unknown to the queen (a local path): it asks the hive, on its CPU,
    // and the hive's own check refuses.
    let model = tiny_model().display().to_string();
    let stream = JobApi::new(&queen.url, None)
        .run(
            "/v1/jobs",
            &json!({"operation": "infer", "model": model, "prompt": "hi", "max_tokens": 4}),
        )
        .await;
    stream.assert_one_terminal_then_done("queen");
    let narrations: Vec<&str> = stream
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            JobEvent::Narration { message } => Some(message.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        narrations
            .iter()
            .any(|m| m.contains("asking hive placed-hive to start one on cpu")),
        "{narrations:?}"
    );
    match stream.terminal() {
        Some(JobEvent::Error {
            code: ErrorCode::NoCapacity,
            message,
        }) => assert!(message.contains("does not fit on cpu"), "{message}"),
        other => panic!("expected no_capacity, got {other:?}\n{:?}", stream.events),
    }
    assert!(
        child_pids(hive.daemon.pid()).is_empty(),
        "no worker process"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hive_without_room_is_passed_over_for_the_next_placement() {
    let queen = Daemon::queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;

    // A hive that reports a big GPU, which the queen tries first, and then refuses.
    let refusing = ScriptedUpstream::start(Script {
        events: vec![JobEvent::Error {
            code: ErrorCode::NoCapacity,
            message: "the model does not fit on cuda:0".into(),
        }],
        complete: true,
    })
    .await;
    let gpu = |id: &str, kind: DeviceKind, free: u64| DeviceInfo {
        id: id.into(),
        kind,
        name: id.into(),
        memory_total_bytes: free,
        memory_free_bytes: free,
        cores: None,
        compute_capability: None,
    };
    let beat = HiveHeartbeat {
        hive: HiveInfo {
            hive_id: "gpu-hive".into(),
            url: refusing.url.clone(),
            devices: vec![
                gpu("cpu", DeviceKind::Cpu, 1 << 20),
                gpu("cuda:0", DeviceKind::Cuda, 80 << 30),
            ],
            workers: Vec::new(),
            models: Vec::new(),
            model_dirs: Vec::new(),
        },
    };
    let registered = reqwest::Client::new()
        .post(format!("{}/v1/hive-heartbeat", queen.url))
        .bearer_auth(TOKEN)
        .json(&beat)
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 204);
    // It keeps beating, as a hive does, so that it is never stale however slow the rest is.
    let beating = {
        let url = format!("{}/v1/hive-heartbeat", queen.url);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = client
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .json(&beat)
                    .send()
                    .await;
            }
        })
    };
    let _stop_beating = AbortOnDrop(beating);

    // A real hive with room on its CPU.
    let hive = TestHive::start("roomy-hive", TOKEN, &["--queen-url", &queen.url]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body: Value = reqwest::get(format!("{}/v1/hives", queen.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["hives"].as_array().is_some_and(|h| h.len() == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "the real hive never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let model = tiny_model().display().to_string();
    let stream = JobApi::new(&queen.url, None)
        .run(
            "/v1/jobs",
            &json!({"operation": "infer", "model": model, "prompt": "hi", "max_tokens": 2}),
        )
        .await;
    stream.assert_one_terminal_then_done("queen");
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { .. })),
        "{:?}\nhive log:\n{}",
        stream.events,
        hive.daemon.log_text()
    );
    let asked = refusing.requests_to("POST", "/v1/jobs");
    assert_eq!(asked.len(), 1, "{:?}", refusing.requests());
    let body = asked[0].body.as_ref().expect("a spawn body");
    assert_eq!(body["operation"], "worker_spawn");
    assert_eq!(body["device"], "cuda:0", "the GPU was tried first: {body}");
    assert!(
        stream.events.iter().any(|(_, e)| matches!(
            e,
            JobEvent::Narration { message } if message.contains("gpu-hive (cuda:0) has no room")
        )),
        "{:?}",
        stream.events
    );
    let workers = hive.workers().await;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].device, "cpu");
}

/// Stops a background task when the test ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
