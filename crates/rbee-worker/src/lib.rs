//! The `llm-worker-rbee` service: one loaded model behind the job protocol.
//!
//! [`serve`] binds the HTTP routes at once, loads the model on the inference thread (the
//! port answers `/health` and `/v1/loading/progress` while it loads), then runs one
//! generation at a time from a small bounded queue. Heartbeats carry a full
//! [`WorkerInfo`](rbee_contract::WorkerInfo) to the queen when one is configured.
//!
//! It is not the engine (that is `rbee-engine`: models, tokenizers, sampling) and not a
//! command line (that is the `llm-worker-rbee` binary, which only builds a [`WorkerConfig`]
//! and calls [`serve`]).

mod config;
mod executor;
mod heartbeat;
mod inference;
#[cfg(unix)]
mod parent;
mod routes;
mod state;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{DEFAULT_PROMPT_CACHE_MIB, WorkerConfig};

use crate::executor::InferExecutor;
use crate::state::WorkerShared;

/// After the drain, clients still reading a stream get this long before the worker closes
/// their connections.
const CONNECTIONS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the worker stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Runs the worker on `listener` until `shutdown` fires (or the model fails to load).
///
/// Shutdown drains: new requests get `503 shutting_down`, the running and queued generations
/// get up to `config.shutdown_grace` to finish, the ones still running then end with an
/// `error` event of code `shutting_down`, and `serve` returns. With `config.hive_pid` set, the
/// worker also shuts down when its parent process is no longer that hive.
pub async fn serve(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let local = listener.local_addr()?;
    let url = config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let shared = Arc::new(WorkerShared::new(&config, url));
    let jobs = job_server::JobServer::new(
        InferExecutor::new(Arc::clone(&shared)),
        job_server::JobServerConfig::default(),
    );

    let load_failed = CancellationToken::new();
    inference::start(&config, Arc::clone(&shared), load_failed.clone())?;
    let heartbeats = tokio::spawn(heartbeat::run(
        Arc::clone(&shared),
        config.clone(),
        shutdown.clone(),
    ));

    #[cfg(unix)]
    if let Some(hive_pid) = config.hive_pid {
        tokio::spawn(parent::watch(hive_pid, shutdown.clone()));
    }

    let auth = daemon_kit::BearerAuth::new(config.cluster_token.clone(), "cluster token");
    let app = routes::router(Arc::clone(&shared), jobs.clone(), auth);
    tracing::info!(%local, worker_id = %config.worker_id, model = %config.model_path.display(), "worker listening");

    let stop = {
        let shutdown = shutdown.clone();
        let load_failed = load_failed.clone();
        let jobs = jobs.clone();
        let grace = config.shutdown_grace;
        let shared = Arc::clone(&shared);
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = load_failed.cancelled() => {
                    // Linger briefly so that whoever follows the loading progress reads the
                    // error event before the port goes away.
                    tokio::time::sleep(config::FAILED_LOAD_LINGER).await;
                }
            }
            shared.begin_stopping();
            jobs.shutdown(grace).await;
        }
    };
    daemon_kit::serve_until(listener, app, stop, CONNECTIONS_GRACE).await?;
    shutdown.cancel();
    shared.close_queue();
    // The last heartbeat says "stopping"; a queen that does not answer quickly is not waited for.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), heartbeats).await;

    match shared.load_error() {
        Some(message) => Err(WorkerError::LoadFailed(message)),
        None => Ok(()),
    }
}
