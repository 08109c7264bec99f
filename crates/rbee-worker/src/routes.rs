//! The worker's HTTP surface (DESIGN.md): `/health` is public; everything else needs the
//! cluster token when one is configured.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use job_server::{ApiError, JobServer};
use rbee_contract::{DONE_SENTINEL, ErrorCode, FinishReason, JobEvent};
use serde_json::json;

use crate::executor::InferExecutor;
use crate::state::{LoadState, WorkerShared};

pub(crate) fn router(
    shared: Arc<WorkerShared>,
    jobs: JobServer<InferExecutor>,
    auth: daemon_kit::BearerAuth,
) -> Router {
    let protected = auth.protect(
        Router::new()
            .route("/v1/ready", get(ready))
            .route("/v1/info", get(info))
            .route("/metrics", get(metrics))
            .route("/v1/loading/progress", get(loading_progress))
            .route("/v1/inference", jobs.create_route())
            .with_state(Arc::clone(&shared))
            .merge(jobs.router()),
    );
    Router::new()
        .route("/health", get(health))
        .with_state(shared)
        .merge(protected)
        .fallback(not_found)
}

async fn health(State(shared): State<Arc<WorkerShared>>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "worker_id": shared.worker_id }))
}

/// `200 {"ready": true, ...}` once the model is loaded; `503 {"ready": false, ...}` before,
/// and after a failed load (with the reason).
async fn ready(State(shared): State<Arc<WorkerShared>>) -> Response {
    let (status, body) = match shared.load_state() {
        LoadState::Ready { .. } if !shared.is_stopping() => {
            (StatusCode::OK, json!({ "ready": true, "state": "ready" }))
        }
        LoadState::Ready { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ready": false, "state": "stopping" }),
        ),
        LoadState::Loading { fraction, message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ready": false, "state": "loading", "fraction": fraction, "message": message }),
        ),
        LoadState::Failed { message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ready": false, "state": "failed", "error": message }),
        ),
    };
    (status, Json(body)).into_response()
}

async fn info(State(shared): State<Arc<WorkerShared>>) -> Json<rbee_contract::WorkerInfo> {
    Json(shared.info())
}

/// The worker's counters in the Prometheus text format (OpenMetrics flavour): what the prompt
/// cache saved.
async fn metrics(State(shared): State<Arc<WorkerShared>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let c = &shared.prompt_cache;
    let mut page = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: u64| {
        let sample = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_owned()
        };
        let _ = write!(
            page,
            "# TYPE {name} {kind}\n# HELP {name} {help}\n{sample} {value}\n"
        );
    };
    family(
        "rbee_worker_generations",
        "counter",
        "Generations that ended, but for errors",
        c.generations.load(Relaxed),
    );
    family(
        "rbee_worker_prompt_tokens",
        "counter",
        "Prompt tokens of those generations",
        c.prompt_tokens.load(Relaxed),
    );
    family(
        "rbee_worker_prompt_cache_hits",
        "counter",
        "Generations that found the start of their prompt in the prompt cache",
        c.hits.load(Relaxed),
    );
    family(
        "rbee_worker_prompt_cached_tokens",
        "counter",
        "Prompt tokens taken from the prompt cache rather than evaluated",
        c.cached_tokens.load(Relaxed),
    );
    family(
        "rbee_worker_prompt_cache_store_bytes",
        "gauge",
        "Bytes the prompt cache's store of prefixes holds",
        c.store_bytes.load(Relaxed),
    );
    page.push_str("# EOF\n");
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

/// Load progress in the job stream format: `loading` events, then `done` (loaded) or
/// `error` (`model_load_failed`), then `[DONE]`. A client that connects after loading
/// ended gets the outcome at once.
async fn loading_progress(
    State(shared): State<Arc<WorkerShared>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    enum Phase {
        Watching(tokio::sync::watch::Receiver<LoadState>, bool),
        Done,
        Closed,
    }
    let model = shared.model_ref.clone();
    let mut seq = 0u64;
    let stream =
        futures::stream::unfold(Phase::Watching(shared.watch_load(), true), move |phase| {
            let model = model.clone();
            let shared = Arc::clone(&shared);
            seq += 1;
            let id = seq.to_string();
            async move {
                match phase {
                    Phase::Watching(mut rx, first) => {
                        // Shutdown ends the stream, so that the server's graceful shutdown
                        // does not wait for a load that will never be reported.
                        let gone = || {
                            let event = JobEvent::error(
                                ErrorCode::ShuttingDown,
                                "the worker stopped while loading",
                            );
                            Some((Ok(sse(&id, &event)), Phase::Done))
                        };
                        if !first {
                            tokio::select! {
                                changed = rx.changed() => if changed.is_err() { return gone() },
                                _ = shared.stopping() => return gone(),
                            }
                        }
                        let state = rx.borrow_and_update().clone();
                        let (event, next) = match state {
                            LoadState::Loading { fraction, message } => (
                                JobEvent::Loading {
                                    model,
                                    fraction,
                                    message: Some(message),
                                },
                                Phase::Watching(rx, false),
                            ),
                            LoadState::Ready { .. } => (
                                JobEvent::Done {
                                    finish_reason: FinishReason::Complete,
                                    usage: None,
                                },
                                Phase::Done,
                            ),
                            LoadState::Failed { message } => (
                                JobEvent::error(ErrorCode::ModelLoadFailed, message),
                                Phase::Done,
                            ),
                        };
                        Some((Ok(sse(&id, &event)), next))
                    }
                    Phase::Done => Some((Ok(Event::default().data(DONE_SENTINEL)), Phase::Closed)),
                    Phase::Closed => None,
                }
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn sse(id: &str, event: &JobEvent) -> Event {
    let data = serde_json::to_string(event).unwrap_or_else(|_| String::from("{}"));
    Event::default().id(id).data(data)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route on this worker")
}
