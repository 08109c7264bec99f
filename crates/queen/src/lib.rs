//! The `queen-rbee` service: the single entry point of an rbee cluster.
//!
//! [`serve`] runs the job API for clients and keeps registries of hives and workers fed only
//! by their heartbeats (in memory: a restarted queen rebuilds them from the next heartbeats).
//! An `infer` job goes to the least loaded ready worker serving its model, or to a worker a
//! hive starts for it (a cold start); the worker's events are relayed unchanged. Worker and
//! model operations are forwarded to the hive they concern and their events relayed likewise.
//! Every call to a hive or a worker goes through `job-client`; every wait is bounded.
//!
//! It is not a hive (it never starts processes) and not a command line (the `queen-rbee`
//! binary only builds a [`QueenConfig`] and calls [`serve`]). The OpenAI-compatible surface
//! and metrics are not part of it yet.

mod cascade;
mod config;
mod executor;
mod forward;
mod infer;
mod registry;
mod relay;
mod routes;
mod scheduler;
mod spawn;
mod state;
mod wire;

use std::sync::Arc;

use job_server::{JobServer, JobServerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    ConfigError, DEFAULT_BIND, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_PORT, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SPAWN_TIMEOUT, QueenConfig, QueenSettings, parse_api_keys,
};
pub use wire::{Health, HiveList, HiveStatus, WorkerList};

use crate::executor::QueenExecutor;
use crate::state::Queen;

/// Why the queen stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum QueenError {
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the queen on `listener` until `shutdown` fires or a client asks for
/// `POST /v1/shutdown`.
///
/// Either way new jobs are refused, running jobs are cancelled (their streams end with an
/// `error` event, and the cancellation travels to the hives and workers below), and the
/// queen waits up to `config.shutdown_grace` for their streams to end. `POST /v1/shutdown`
/// also asks every known hive to shut down; `shutdown` (a signal) leaves them running.
pub async fn serve(
    listener: TcpListener,
    config: QueenConfig,
    shutdown: CancellationToken,
) -> Result<(), QueenError> {
    let local = listener.local_addr()?;
    let grace = config.shutdown_grace;
    tracing::info!(%local, heartbeat_interval = ?config.heartbeat_interval,
        cluster_token = config.cluster_token.is_some(), api_keys = config.api_keys.len(),
        "queen listening");
    let queen = Arc::new(Queen::new(config));
    let jobs = JobServer::new(
        QueenExecutor::new(Arc::clone(&queen)),
        JobServerConfig::default(),
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
            if whole_cluster {
                tokio::join!(cascade::stop_hives(&queen), jobs.shutdown(grace));
            } else {
                jobs.shutdown(grace).await;
            }
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await?;
    shutdown.cancel();
    let _ = sweeper.await;
    tracing::info!("queen stopped");
    Ok(())
}
