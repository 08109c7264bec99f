//! Helpers for testing `rbee-hive`: a hive process with a stand-in queen that records what the
//! hive (and the workers it spawns) send, a client for its routes, and shell scripts that play
//! misbehaving workers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use rbee_contract::{HiveHeartbeat, JobCreated, WorkerHeartbeat, WorkerInfo};
use serde_json::Value;

use crate::daemon::{Daemon, free_port};
use crate::jobs::JobApi;
use crate::loopback::serve_on_loopback;
use crate::sse::RawStream;

/// A running `rbee-hive` whose `--queen-url` is a [`HiveHeartbeatReceiver`], with its worker
/// logs in a scratch directory removed on drop.
pub struct TestHive {
    pub daemon: Daemon,
    pub queen: HiveHeartbeatReceiver,
    pub log_dir: PathBuf,
    token: String,
    http: reqwest::Client,
}

impl TestHive {
    /// Starts a hive with `RBEE_CLUSTER_TOKEN=token`, 100 ms heartbeats, a 2 s stop grace and a
    /// port range of its own, and waits for `/health`. A flag in `extra` replaces its default.
    pub async fn start(hive_id: &str, token: &str, extra: &[&str]) -> TestHive {
        let queen = HiveHeartbeatReceiver::start().await;
        let port = free_port();
        let log_dir = scratch_dir("logs");
        // Each hive gets a port range of its own so parallel tests rarely compete for ports;
        // the hive retries on another port when they do.
        let first = free_port().min(65535 - 16);
        let defaults = [
            ("--port", port.to_string()),
            ("--hive-id", hive_id.to_string()),
            ("--queen-url", queen.url.clone()),
            ("--heartbeat-interval", "100ms".to_string()),
            ("--log-dir", log_dir.display().to_string()),
            ("--worker-port-range", format!("{first}-{}", first + 15)),
            ("--stop-grace", "2s".to_string()),
            // The catalog goes with the logs, never into the user's data directory.
            ("--model-dir", log_dir.join("models").display().to_string()),
        ];
        // clap refuses a flag given twice.
        let mut args: Vec<String> = defaults
            .into_iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [flag.to_string(), value])
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = Daemon::start(
            "rbee-hive",
            &args,
            &[("RBEE_CLUSTER_TOKEN", token)],
            format!("http://127.0.0.1:{port}"),
        )
        .expect("start rbee-hive");
        daemon
            .wait_for("/health", None, Duration::from_secs(30))
            .await
            .expect("rbee-hive answers /health");
        TestHive {
            daemon,
            queen,
            log_dir,
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> &str {
        &self.daemon.url
    }

    /// The hive's job API, with the cluster token.
    pub fn jobs(&self) -> JobApi {
        JobApi::new(self.url(), Some(&self.token))
    }

    /// `POST /v1/jobs` with `body`, with the cluster token.
    pub async fn submit(&self, body: &Value) -> reqwest::Response {
        self.jobs().submit("/v1/jobs", body).await
    }

    /// [`submit`](Self::submit), expecting `201`.
    pub async fn submit_ok(&self, body: &Value) -> JobCreated {
        self.jobs().submit_ok("/v1/jobs", body).await
    }

    /// `GET` the job's stream, expecting `200`.
    pub async fn open_stream(&self, created: &JobCreated) -> reqwest::Response {
        self.jobs().open_stream(created).await
    }

    /// Submits `body` and reads its stream to the end.
    pub async fn run_job(&self, body: &Value) -> RawStream {
        self.jobs().run("/v1/jobs", body).await
    }

    /// Runs `worker_spawn` for `model` on the hive's default device and returns the spawned
    /// worker's info; panics with the events and the hive's log unless the job ends `done`.
    pub async fn spawn_worker(&self, model: &std::path::Path) -> WorkerInfo {
        let stream = self
            .run_job(&serde_json::json!({"operation": "worker_spawn", "model": model.display().to_string()}))
            .await;
        stream.assert_one_terminal_then_done("hive");
        stream.assert_ids_increase();
        assert!(
            matches!(
                stream.terminal(),
                Some(rbee_contract::JobEvent::Done { .. })
            ),
            "{:?}\nhive log:\n{}",
            stream.events,
            self.daemon.log_text()
        );
        stream.worker()
    }

    /// `GET /v1/capacity` of `model` on the CPU of a hive with no room for it (e.g. one
    /// started with a reserve of everything): asserts the `409` and returns its body.
    pub async fn no_capacity(&self, model: &std::path::Path) -> rbee_contract::NoCapacityBody {
        let response = self
            .http
            .get(format!(
                "{}/v1/capacity?device=cpu&model={}",
                self.url(),
                model.display().to_string().replace('/', "%2F")
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET /v1/capacity");
        assert_eq!(response.status(), 409);
        response.json().await.expect("a no-capacity body")
    }

    /// `GET /v1/workers`.
    pub async fn workers(&self) -> Vec<WorkerInfo> {
        let body: Value = self
            .http
            .get(format!("{}/v1/workers", self.url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET /v1/workers")
            .json()
            .await
            .expect("a JSON body");
        serde_json::from_value(body["workers"].clone()).expect("a worker list")
    }

    /// Polls `check` until it holds; panics with `what` and the hive's log after `timeout`.
    pub async fn wait_until(&self, timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what} within {timeout:?}; hive log:\n{}",
                self.daemon.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for TestHive {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}

/// A fresh directory under the system temp dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "rbee-test-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("create a scratch dir");
    dir
}

/// An executable shell script with `body`, to stand in for `llm-worker-rbee` (it gets the
/// worker's arguments and may ignore them). It lives in a scratch directory of its own.
pub fn fake_worker(body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = scratch_dir("fake-worker").join("fake-worker.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[derive(Default)]
struct Received {
    hives: Vec<(HiveHeartbeat, Option<String>)>,
    workers: Vec<WorkerHeartbeat>,
}

type Log = Arc<Mutex<Received>>;

/// Records `POST /v1/hive-heartbeat` (with each request's `Authorization` header) and
/// `POST /v1/worker-heartbeat`, the two routes a hive and its workers send to.
pub struct HiveHeartbeatReceiver {
    pub url: String,
    received: Log,
    task: tokio::task::JoinHandle<()>,
}

impl HiveHeartbeatReceiver {
    pub async fn start() -> HiveHeartbeatReceiver {
        let received = Log::default();
        let app = Router::new()
            .route("/v1/hive-heartbeat", post(record_hive))
            .route("/v1/worker-heartbeat", post(record_worker))
            .with_state(Arc::clone(&received));
        let (url, task) = serve_on_loopback(app).await;
        HiveHeartbeatReceiver {
            url,
            received,
            task,
        }
    }

    /// Every hive heartbeat so far, oldest first, with its `Authorization` header.
    pub fn hive_beats(&self) -> Vec<(HiveHeartbeat, Option<String>)> {
        self.received.lock().expect("lock").hives.clone()
    }

    /// Every worker heartbeat so far, oldest first.
    pub fn worker_beats(&self) -> Vec<WorkerHeartbeat> {
        self.received.lock().expect("lock").workers.clone()
    }
}

impl Drop for HiveHeartbeatReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record_hive(
    State(log): State<Log>,
    headers: HeaderMap,
    Json(beat): Json<HiveHeartbeat>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    log.lock().expect("lock").hives.push((beat, auth));
    StatusCode::NO_CONTENT
}

async fn record_worker(State(log): State<Log>, Json(beat): Json<WorkerHeartbeat>) -> StatusCode {
    log.lock().expect("lock").workers.push(beat);
    StatusCode::NO_CONTENT
}
