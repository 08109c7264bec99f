//! The hive's HTTP surface: `/health` is public; everything else needs the cluster token when
//! one is configured.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use job_server::{ApiError, JobServer};
use rbee_contract::DevicesResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::executor::HiveExecutor;
use crate::models::reference::{self, ModelRef};
use crate::{Hive, capacity, devices};

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

/// `{"hive_id", "cpu": DeviceInfo, "gpus": [DeviceInfo...]}`, read now.
async fn devices(State(hive): State<Arc<Hive>>) -> Json<DevicesResponse> {
    let devices = devices::read_async(Arc::clone(&hive.gpus)).await;
    Json(DevicesResponse {
        hive_id: hive.config.hive_id.clone(),
        cpu: devices.cpu,
        gpus: devices.gpus,
    })
}

#[derive(Debug, Deserialize)]
struct CapacityQuery {
    model: Option<String>,
    device: Option<String>,
}

/// `204` when the model fits on the device, `409` with the numbers when it does not.
async fn capacity(
    State(hive): State<Arc<Hive>>,
    query: Result<Query<CapacityQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(mut query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    // A local path is held to the allowed model directories before anything looks at it,
    // and is asked about by the file it resolves to.
    if let Some(model) = query
        .model
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        && let Ok(ModelRef::Local(path)) = reference::parse(model)
    {
        let resolved = hive.models.local_path(&path, model)?;
        query.model = Some(resolved.to_string_lossy().into_owned());
    }
    let question =
        capacity::Question::parse(query.model.as_deref(), query.device.as_deref(), |hub| {
            capacity::catalog_path(&hive.models, hub)
        })?;
    let estimate = capacity::estimate(&hive, question).await?;
    Ok(if estimate.fits() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::CONFLICT,
            Json(capacity::no_capacity_body(estimate)),
        )
            .into_response()
    })
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route on this hive")
}
