//! The `rbee-hive` service: one per machine, it spawns and supervises `llm-worker-rbee`
//! processes and reports the machine and its workers to the queen.
//!
//! [`serve`] answers the job protocol for worker operations (`worker_spawn`, `worker_list`,
//! `worker_get`, `worker_delete`), `GET /v1/workers` and `POST /v1/shutdown`, and sends a
//! [`HiveHeartbeat`](rbee_contract::HiveHeartbeat) to the queen every interval. Each worker is
//! a child process started from an argument vector, with its output in its own log file, owned
//! by one supervising task that notices its exit; a worker that dies is removed at once. Only
//! children the hive spawned are ever signalled, and shutdown stops all of them before
//! [`serve`] returns.
//!
//! It also owns the machine's models: `model_download`, `model_list`, `model_get` and
//! `model_delete` work on a persistent catalog in the model directory, and `worker_spawn` with
//! an `hf:` reference downloads the model first (see `models`).
//!
//! It is not a worker (inference lives in `rbee-worker`) and not a scheduler (the queen decides
//! where work goes). It reports its devices (`GET /v1/devices`, and in every heartbeat) and
//! checks that a model fits on a device before a worker starts (`GET /v1/capacity`). It is not
//! a command line either: the `rbee-hive` binary builds a [`HiveConfig`] and calls [`serve`].

mod capacity;
mod children;
mod config;
mod devices;
mod executor;
mod heartbeat;
mod logs;
mod models;
mod process;
mod routes;
mod spawn;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rbee_contract::HiveInfo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    DEFAULT_HF_ENDPOINT, DEFAULT_HIVE_MAX_JOBS, HiveConfig, MAX_WORKER_SLOTS, PortRange,
    WORKER_BINARY_NAME, default_hive_id, default_log_dir, default_model_dir, default_worker_binary,
};

pub use models::ModelsError;

use crate::children::Children;
use crate::executor::HiveExecutor;

/// After every worker is gone, clients still reading a stream get this long before the
/// hive closes their connections.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(2);

/// Why the hive could not run.
#[derive(Debug, thiserror::Error)]
pub enum HiveError {
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot create the worker log directory {}: {source}", path.display())]
    LogDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open the model store: {0}")]
    Models(#[from] models::ModelsError),
}

/// What the hive's parts share: its configuration, its children and one HTTP client.
pub(crate) struct Hive {
    config: Arc<HiveConfig>,
    /// The URL the queen uses to reach this hive.
    url: String,
    children: Arc<Children>,
    /// Spawns being checked or started, and what each model needs (see `capacity`).
    capacity: Arc<capacity::Ledger>,
    models: Arc<models::Models>,
    /// The machine's NVIDIA GPUs (NVML; fixed answers in tests).
    gpus: Arc<dyn devices::Gpus>,
    http: reqwest::Client,
    /// Cancelled by `POST /v1/shutdown` as by the caller of [`serve`].
    shutdown: CancellationToken,
}

impl Hive {
    /// The hive as its heartbeat describes it, with fresh worker states.
    async fn info(&self) -> HiveInfo {
        self.children.refresh().await;
        HiveInfo {
            hive_id: self.config.hive_id.clone(),
            url: self.url.clone(),
            devices: devices::read_async(Arc::clone(&self.gpus)).await.all(),
            workers: self.children.list(),
            models: self.models.entries(),
            model_dirs: self.models.allowed_dirs(),
        }
    }
}

/// Runs the hive on `listener` until `shutdown` fires or `POST /v1/shutdown` arrives.
///
/// Shutdown refuses new jobs and drains: every worker the hive spawned gets SIGTERM, finishes
/// its running generations within its own grace (a little shorter than `config.stop_grace`,
/// so that a stream cut at the deadline still ends with an explicit `shutting_down` error)
/// and exits, or gets SIGKILL after `config.stop_grace`; the hive's own jobs get the same
/// grace (a spawn in progress fails as its worker stops). Once every worker is reaped, `serve`
/// returns. Workers live on loopback unless the listener is bound elsewhere; a non-loopback
/// listener needs a cluster token.
pub async fn serve(
    listener: TcpListener,
    config: HiveConfig,
    shutdown: CancellationToken,
) -> Result<(), HiveError> {
    let local = listener.local_addr()?;
    if config.cluster_token.is_none() && !local.ip().is_loopback() {
        return Err(HiveError::Config(format!(
            "refusing to serve on {local} without a cluster token: the routes would be open \
             to the network"
        )));
    }
    if config.worker_slots.get() > MAX_WORKER_SLOTS {
        return Err(HiveError::Config(format!(
            "{} worker slots is more than a worker accepts ({MAX_WORKER_SLOTS})",
            config.worker_slots
        )));
    }
    std::fs::create_dir_all(&config.log_dir).map_err(|source| HiveError::LogDir {
        path: config.log_dir.clone(),
        source,
    })?;
    let url = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(|err| HiveError::Config(format!("cannot build an HTTP client: {err}")))?;
    let models = models::Models::open(&config, shutdown.clone()).await?;
    let auth = daemon_kit::BearerAuth::new(config.cluster_token.clone(), "cluster token");
    let config = Arc::new(config);
    let children = Arc::new(Children::new(Arc::clone(&config), local.ip(), http.clone()));
    let hive = Arc::new(Hive {
        config: Arc::clone(&config),
        url,
        children: Arc::clone(&children),
        capacity: Arc::default(),
        models,
        gpus: devices::nvml_gpus(),
        http,
        shutdown: shutdown.clone(),
    });
    let jobs = job_server::JobServer::new(
        HiveExecutor::new(Arc::clone(&hive)),
        job_server::JobServerConfig {
            max_jobs: Some(config.max_jobs.get()),
            ..job_server::JobServerConfig::default()
        },
    );
    let heartbeats = tokio::spawn(heartbeat::run(Arc::clone(&hive), shutdown.clone()));
    let app = routes::router(Arc::clone(&hive), jobs.clone(), auth);
    tracing::info!(%local, hive_id = %config.hive_id, url = %hive.url, log_dir = %config.log_dir.display(), "hive listening");

    let stop = {
        let shutdown = shutdown.clone();
        let children = Arc::clone(&children);
        let stop_grace = config.stop_grace;
        async move {
            shutdown.cancelled().await;
            // The workers drain their own generations (the queen reads those streams
            // directly) while the hive's jobs get the same grace period.
            tokio::join!(jobs.shutdown(stop_grace), children.stop_all());
        }
    };
    let served = daemon_kit::serve_until(listener, app, stop, CONNECTIONS_GRACE).await;
    // Whatever ended the server, no worker outlives it.
    shutdown.cancel();
    children.stop_all().await;
    let _ = heartbeats.await;
    tracing::info!("hive stopped");
    served.map_err(HiveError::from)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use rbee_contract::{ApiErrorBody, ErrorCode};

    use super::*;

    #[tokio::test]
    async fn a_full_hive_refuses_a_new_job_with_a_json_busy_error() {
        // A model hub that takes connections and never answers: its downloads keep running.
        let hub = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hub_url = format!("http://{}", hub.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hub.accept().await {
                held.push(socket);
            }
        });

        let dir = tempfile::tempdir().unwrap();
        let mut config = HiveConfig::new("h");
        config.model_dir = dir.path().join("models");
        config.log_dir = dir.path().join("logs");
        config.hf_endpoint = hub_url;
        config.stop_grace = Duration::from_millis(200);
        config.max_jobs = NonZeroUsize::new(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(listener, config, shutdown.clone()));

        let http = reqwest::Client::new();
        let create = |file: &str| {
            http.post(format!("{base}/v1/jobs"))
                .json(&serde_json::json!({
                    "operation": "model_download",
                    "model": format!("hf:o/r:{file}.gguf"),
                }))
                .send()
        };
        for file in ["a", "b"] {
            let response = create(file).await.unwrap();
            assert_eq!(response.status(), 201, "{:?}", response.text().await);
        }
        let refused = create("c").await.unwrap();
        assert_eq!(refused.status(), 503);
        let body: ApiErrorBody = refused.json().await.unwrap();
        assert_eq!(body.error.code, ErrorCode::Busy);
        assert!(
            body.error.message.contains("2 jobs"),
            "{}",
            body.error.message
        );

        shutdown.cancel();
        served.await.unwrap().unwrap();
    }
}
