//! The `queen-rbee` service: the single entry point of an rbee cluster.
//!
//! [`serve`] runs the job API for clients and keeps registries of hives and workers fed only
//! by their heartbeats (in memory: a restarted queen rebuilds them from the next heartbeats).
//! An `infer` job goes to the least loaded ready worker serving its model that has a free
//! slot, waits in the model's bounded line while every slot is taken, or goes to a worker a
//! hive starts for it (a cold start); the worker's events are relayed unchanged. Worker and
//! model operations are forwarded to the hive they concern and their events relayed likewise.
//! Every call to a hive or a worker goes through `job-client`; every wait is bounded.
//! `GET /metrics` serves Prometheus metrics; client routes take API keys, heartbeats the
//! cluster token.
//!
//! The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`, `/v1/completions`) runs
//! each request as an `infer` job of the same job server and renders its events as OpenAI's
//! answers and chunks; [`openapi_json`] is the generated OpenAPI document of the public API.
//!
//! It is not a hive (it never starts processes) and not a command line (the `queen-rbee`
//! binary only builds a [`QueenConfig`] and calls [`serve`]).

mod admin;
mod cascade;
mod config;
mod dispatch;
mod executor;
mod forward;
mod infer;
mod metrics;
mod openai;
mod openapi;
mod queue;
mod registry;
mod relay;
mod routes;
mod scheduler;
mod spawn;
mod stall;
mod state;
mod wire;

use std::sync::Arc;

use job_server::{JobServer, JobServerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    ConfigError, DEFAULT_BIND, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MAX_JOBS, DEFAULT_PORT,
    DEFAULT_QUEUE_LEN, DEFAULT_QUEUE_TIMEOUT, DEFAULT_SHUTDOWN_GRACE, DEFAULT_SPAWN_TIMEOUT,
    QueenConfig, QueenSecrets, QueenSettings, parse_api_keys,
};
pub use openapi::openapi_json;
pub use wire::{Health, HiveList, HiveStatus, WorkerList};

use crate::executor::QueenExecutor;
use crate::state::Queen;

/// After the drain, clients still reading a stream get this long before the queen closes
/// their connections.
const CONNECTIONS_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long shutdown waits for the cancellations of the jobs it cut to reach their workers
/// and hives (a `DELETE` each, usually answered in a millisecond).
const CANCELLATIONS_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the queen stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum QueenError {
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the queen on `listener` until `shutdown` fires or a client asks for
/// `POST /v1/shutdown`.
///
/// Either way the queen drains: new jobs are refused (`503 shutting_down`), running jobs get
/// up to `config.shutdown_grace` to finish, and the ones still running then end with an
/// `error` event of code `shutting_down` (the cancellation travels to the workers below).
/// `POST /v1/shutdown` then asks every known hive to shut down and waits (bounded) until they
/// are gone, so that the workers could finish the streams first; `shutdown` (a signal, e.g. a
/// restart under systemd) leaves the hives and their workers running.
pub async fn serve(
    listener: TcpListener,
    config: QueenConfig,
    shutdown: CancellationToken,
) -> Result<(), QueenError> {
    let local = listener.local_addr()?;
    let grace = config.shutdown_grace;
    tracing::info!(%local, heartbeat_interval = ?config.heartbeat_interval,
        cluster_token = config.cluster_token.is_some(), api_keys = config.api_keys.len(),
        admin_keys = config.admin_keys.len(), "queen listening");
    if config.admin_keys.is_empty() && !config.api_keys.is_empty() {
        tracing::warn!(
            "no admin keys (RBEE_ADMIN_KEYS): every API key can shut the cluster down and \
             spawn or delete workers and models"
        );
    }
    let queen = Arc::new(Queen::new(config));
    let jobs = JobServer::new(
        QueenExecutor::new(Arc::clone(&queen)),
        JobServerConfig {
            max_jobs: Some(queen.config.max_jobs),
            ..JobServerConfig::default()
        },
    );
    let stop_cluster = CancellationToken::new();
    let sweeper = tokio::spawn(registry::sweep_every(
        Arc::clone(&queen.registry),
        shutdown.clone(),
    ));
    let app = routes::router(Arc::clone(&queen), jobs.clone(), stop_cluster.clone());

    let stop = {
        let shutdown = shutdown.clone();
        let queen = Arc::clone(&queen);
        async move {
            let whole_cluster = tokio::select! {
                () = shutdown.cancelled() => false,
                () = stop_cluster.cancelled() => true,
            };
            jobs.shutdown(grace).await;
            relay::cancellations_sent(CANCELLATIONS_GRACE).await;
            if whole_cluster {
                cascade::stop_hives(&queen).await;
            }
        }
    };
    daemon_kit::serve_until(listener, app, stop, CONNECTIONS_GRACE).await?;
    shutdown.cancel();
    let _ = sweeper.await;
    tracing::info!("queen stopped");
    Ok(())
}
