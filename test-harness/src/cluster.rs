//! A whole cluster on loopback: a real queen, a real hive registered with it, and the worker
//! the hive spawns for a model when the first job asks for it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rbee_contract::{JobEvent, WorkerInfo, WorkerState};
use serde_json::{Value, json};

use crate::daemon::{Daemon, free_port};
use crate::hive::scratch_dir;
use crate::jobs::JobApi;

/// The cluster token every daemon of a [`TestCluster`] shares.
pub const CLUSTER_TOKEN: &str = "test-cluster-token";

/// A queen (100 ms heartbeats, no API keys), a hive and one ready worker for `model`.
/// Worker logs live in a scratch directory, removed on drop when the test passed.
pub struct TestCluster {
    pub queen: Daemon,
    pub hive: Daemon,
    pub worker: WorkerInfo,
    /// The model as jobs name it (the model file's path).
    pub model: String,
    log_dir: PathBuf,
}

impl TestCluster {
    /// Starts the queen with `queen_args` added to its defaults, then the hive, then sends
    /// one short job for `model` so the hive starts its worker (a cold start).
    pub async fn start(model: &Path, queen_args: &[&str]) -> TestCluster {
        TestCluster::start_with(model, queen_args, &[]).await
    }

    /// [`start`](Self::start), with `hive_args` added to the hive's defaults (flags the
    /// defaults do not set, e.g. `--stop-grace`).
    pub async fn start_with(model: &Path, queen_args: &[&str], hive_args: &[&str]) -> TestCluster {
        let mut args = vec!["--heartbeat-interval", "100ms"];
        args.extend_from_slice(queen_args);
        let queen = Daemon::queen(&args, &[("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)]).await;

        let hive_port = free_port();
        let first_worker_port = free_port().min(65_000);
        let log_dir = scratch_dir("cluster-logs");
        let extra_hive_args = hive_args;
        let mut hive_args: Vec<String> = [
            ("--port", hive_port.to_string()),
            ("--queen-url", queen.url.clone()),
            ("--hive-id", "hive-test".to_string()),
            ("--heartbeat-interval", "100ms".to_string()),
            ("--log-dir", log_dir.display().to_string()),
            (
                "--worker-port-range",
                format!("{first_worker_port}-{}", first_worker_port + 20),
            ),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
        hive_args.extend(extra_hive_args.iter().map(|a| a.to_string()));
        let mut hive = Daemon::start(
            "rbee-hive",
            &hive_args,
            &[("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)],
            format!("http://127.0.0.1:{hive_port}"),
        )
        .expect("start rbee-hive");
        hive.wait_for("/health", None, Duration::from_secs(30))
            .await
            .expect("the hive answers /health");
        let deadline = Instant::now() + Duration::from_secs(30);
        while queen_get(&queen.url, "/v1/hives").await["hives"][0]["status"] != "healthy" {
            assert!(
                Instant::now() < deadline,
                "the hive never registered; hive log:\n{}",
                hive.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let model = model.display().to_string();
        let first = JobApi::new(&queen.url, None)
            .run(
                "/v1/jobs",
                &json!({"operation": "infer", "model": model, "prompt": "hello", "max_tokens": 2}),
            )
            .await;
        first.assert_one_terminal_then_done("queen");
        assert!(
            matches!(first.terminal(), Some(JobEvent::Done { .. })),
            "the cold start failed: {:?}\nhive log:\n{}",
            first.events,
            hive.log_text()
        );
        let workers: Vec<WorkerInfo> =
            serde_json::from_value(queen_get(&queen.url, "/v1/workers").await["workers"].clone())
                .expect("a worker list");
        let worker = workers
            .into_iter()
            .find(|w| w.state == WorkerState::Ready)
            .expect("the spawned worker is listed ready");
        TestCluster {
            queen,
            hive,
            worker,
            model,
            log_dir,
        }
    }

    /// The queen's job API.
    pub fn jobs(&self) -> JobApi {
        JobApi::new(&self.queen.url, None)
    }

    /// `GET {queen}{path}` as JSON.
    pub async fn queen_json(&self, path: &str) -> Value {
        queen_get(&self.queen.url, path).await
    }

    /// The worker's own `/v1/info`: its state and free slots right now.
    pub async fn worker_info(&self) -> WorkerInfo {
        reqwest::Client::new()
            .get(format!("{}/v1/info", self.worker.url))
            .bearer_auth(CLUSTER_TOKEN)
            .send()
            .await
            .expect("GET the worker's /v1/info")
            .json()
            .await
            .expect("a WorkerInfo")
    }

    /// The worker's log, as the hive writes it.
    pub fn worker_log(&self) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{}.log", self.worker.worker_id)))
            .unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

async fn queen_get(url: &str, path: &str) -> Value {
    reqwest::get(format!("{url}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
}
