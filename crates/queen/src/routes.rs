//! The queen's HTTP surface. `/health` is public; the heartbeat routes need the cluster
//! token; the job API, the lists, `/metrics` and shutdown need a client key (an API key or
//! an admin key) when keys are configured, and with admin keys configured shutdown and the
//! operations that change a hive need an admin key, and what a key may have a hive load is
//! checked ([`crate::admin`]). The cluster token and
//! the client keys never stand in for each other. Every request is counted for `/metrics` by
//! the outermost layer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use daemon_kit::BearerAuth;
use job_server::{ApiError, JobServer};
use rbee_contract::prefix::MAX_REPORTED_PREFIXES;
use rbee_contract::{ErrorCode, HiveHeartbeat, WorkerHeartbeat, WorkerState};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminKeys};
use crate::config::QueenConfig;
use crate::executor::QueenExecutor;
use crate::metrics;
use crate::state::Queen;
use crate::wire::{HiveList, WorkerList};

#[derive(Clone)]
struct AppState {
    queen: Arc<Queen>,
    jobs: JobServer<QueenExecutor>,
    /// Fired by `POST /v1/shutdown`: stop the hives, then the queen.
    stop_cluster: CancellationToken,
}

pub(crate) fn router(
    queen: Arc<Queen>,
    jobs: JobServer<QueenExecutor>,
    stop_cluster: CancellationToken,
) -> Router {
    let cluster_auth = BearerAuth::new(queen.config.cluster_token.clone(), "cluster token");
    let client_auth = client_auth(&queen.config);
    let admin_keys = AdminKeys::new(&queen.config);
    let operation_guard = admin::OperationGuard::new(Arc::clone(&queen));
    let metrics = Arc::clone(&queen.metrics);
    let state = AppState {
        queen,
        jobs: jobs.clone(),
        stop_cluster,
    };
    let internal = cluster_auth.protect(
        Router::new()
            .route("/v1/worker-heartbeat", post(worker_heartbeat))
            .route("/v1/hive-heartbeat", post(hive_heartbeat))
            .with_state(state.clone()),
    );
    // The OpenAI routes check the same keys themselves, answering in OpenAI's error shape.
    let openai = crate::openai::router(Arc::clone(&state.queen), jobs.clone(), client_auth.clone());
    // The admin checks sit inside the client check, so a request without a valid key gets
    // its `401` before anyone looks at what it asks for. The job API's check reads the body,
    // so it gets the job server's body limit.
    let job_api = jobs
        .router()
        .layer(axum::middleware::from_fn_with_state(
            operation_guard,
            admin::guard_operations,
        ))
        .layer(DefaultBodyLimit::max(jobs.config().body_limit));
    let shutdown_route = post(shutdown).layer(axum::middleware::from_fn_with_state(
        admin_keys,
        admin::require_admin,
    ));
    let client = client_auth.protect(
        Router::new()
            .route("/v1/workers", get(list_workers))
            .route("/v1/hives", get(list_hives))
            .route("/v1/shutdown", shutdown_route)
            .route("/metrics", get(metrics_page))
            .with_state(state)
            .merge(job_api),
    );
    Router::new()
        .route("/health", get(health))
        .merge(internal)
        .merge(client)
        .merge(openai)
        .fallback(not_found)
        // Last, so that it wraps every route above, including ones merged in later.
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            metrics::track,
        ))
}

/// Client routes accept the API keys and the admin keys only: the cluster token is for
/// daemons, and a leaked client key must not let anyone pose as a worker. With no client keys
/// configured they are open (the queen then refuses to bind beyond loopback).
fn client_auth(config: &QueenConfig) -> BearerAuth {
    let keys = config.api_keys.iter().chain(&config.admin_keys).cloned();
    BearerAuth::new(keys, "API key")
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn worker_heartbeat(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let heartbeat: WorkerHeartbeat = parse_body(&body)?;
    let worker = &heartbeat.worker;
    if worker.worker_id.is_empty() {
        return Err(ApiError::bad_request("`worker_id` must not be empty"));
    }
    check_url(&worker.url)?;
    if worker.state == WorkerState::Stale {
        return Err(ApiError::bad_request(
            "a worker cannot report itself `stale`; the queen decides that",
        ));
    }
    if heartbeat.cached_prefixes.len() > MAX_REPORTED_PREFIXES {
        return Err(ApiError::bad_request(format!(
            "`cached_prefixes` takes at most {MAX_REPORTED_PREFIXES} keys"
        )));
    }
    state.queen.registry.worker_beat(heartbeat);
    Ok(StatusCode::NO_CONTENT)
}

async fn hive_heartbeat(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let HiveHeartbeat { hive } = parse_body(&body)?;
    if hive.hive_id.is_empty() {
        return Err(ApiError::bad_request("`hive_id` must not be empty"));
    }
    check_url(&hive.url)?;
    state.queen.registry.hive_heartbeat(hive);
    Ok(StatusCode::NO_CONTENT)
}

async fn list_workers(State(state): State<AppState>) -> Json<WorkerList> {
    Json(state.queen.registry.worker_list())
}

async fn list_hives(State(state): State<AppState>) -> Json<HiveList> {
    Json(state.queen.registry.hive_list())
}

async fn metrics_page(State(state): State<AppState>) -> impl IntoResponse {
    let queen = &state.queen;
    let stats = state.jobs.stats();
    let page = queen.metrics.render(&metrics::Snapshot {
        workers: &queen.registry.worker_views(),
        hives: &queen.registry.hive_views(),
        queue_depths: &queen.queues.depths(),
        jobs_running: stats.running,
        jobs_finished: stats.finished,
    });
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], page)
}

/// `202` with what the shutdown will do: running jobs get `grace_ms` to finish, then the
/// `hives` known now are told to stop, then the queen exits.
async fn shutdown(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let grace = state.queen.config.shutdown_grace;
    let hives = state.queen.registry.hive_views().len();
    tracing::info!(
        ?grace,
        hives,
        "shutdown requested; draining jobs, then stopping the hives, then the queen"
    );
    state.jobs.close();
    state.stop_cluster.cancel();
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    (
        StatusCode::ACCEPTED,
        Json(json!({ "status": "shutting_down", "grace_ms": grace_ms, "hives": hives })),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route on the queen")
}

/// JSON bodies are parsed by hand so that a bad one gets rbee's error body, not axum's text.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid heartbeat: {e}")))
}

fn check_url(url: &str) -> Result<(), ApiError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`url` must be an http(s) URL, got `{url}`"
        )))
    }
}
