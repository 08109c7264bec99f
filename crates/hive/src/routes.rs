//! The hive's HTTP surface: `/health` is public; everything else needs the cluster token when
//! one is configured.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use job_server::{ApiError, JobServer};
use rbee_contract::ErrorCode;
use serde_json::{Value, json};

use crate::Hive;
use crate::executor::HiveExecutor;

pub(crate) fn router(
    hive: Arc<Hive>,
    jobs: JobServer<HiveExecutor>,
    auth: daemon_kit::BearerAuth,
) -> Router {
    let protected = auth.protect(
        Router::new()
            .route("/v1/workers", get(workers))
            .route("/v1/shutdown", post(shutdown))
            .route("/v1/devices", get(devices))
            .route("/v1/capacity", get(capacity))
            .with_state(Arc::clone(&hive))
            .merge(jobs.router()),
    );
    Router::new()
        .route("/health", get(health))
        .with_state(hive)
        .merge(protected)
        .fallback(not_found)
}

async fn health(State(hive): State<Arc<Hive>>) -> Json<Value> {
    Json(json!({ "status": "ok", "hive_id": hive.config.hive_id }))
}

/// `{"workers": [WorkerInfo...]}`, each as the worker describes itself right now.
async fn workers(State(hive): State<Arc<Hive>>) -> Json<Value> {
    hive.children.refresh().await;
    Json(json!({ "workers": hive.children.list() }))
}

/// `202`, then every worker is stopped and the hive exits.
async fn shutdown(State(hive): State<Arc<Hive>>) -> (StatusCode, Json<Value>) {
    tracing::info!("shutdown requested over HTTP");
    let workers = hive.children.list().len();
    hive.shutdown.cancel();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "status": "shutting_down", "workers": workers })),
    )
}

async fn devices() -> ApiError {
    ApiError::new(
        ErrorCode::NotImplemented,
        "device listing is not available yet; the hive's heartbeats carry its CPU",
    )
}

async fn capacity() -> ApiError {
    ApiError::new(
        ErrorCode::NotImplemented,
        "capacity checks are not available yet",
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route on this hive")
}
