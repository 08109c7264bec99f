use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use rbee_contract::{DONE_SENTINEL, JobEvent};
use serde_json::{Value, json};

use crate::loopback::serve_on_loopback;

/// What a [`ScriptedUpstream`]'s job streams send.
#[derive(Debug, Clone)]
pub struct Script {
    pub events: Vec<JobEvent>,
    /// Whether the stream ends with `data: [DONE]`. Without it (and without a terminal event
    /// among `events`) the connection just closes: a peer that died mid-job.
    pub complete: bool,
}

/// One request a [`ScriptedUpstream`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
    /// The `Authorization` header, if any.
    pub auth: Option<String>,
}

/// A peer of the queen whose behaviour a test controls exactly: it stands in for a hive or a
/// worker that must fail in a precise way (die after one token, say), which the real binaries
/// cannot be made to do on cue. It speaks the job protocol's wire format: `POST /v1/jobs` and
/// `POST /v1/inference` create a job whose stream plays the script once (a resume attempt gets
/// `404`), `DELETE /v1/jobs/{id}` and `POST /v1/shutdown` are accepted. Every request is
/// recorded.
pub struct ScriptedUpstream {
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Script>,
    next_job: Arc<AtomicU64>,
    streamed: Arc<Mutex<HashSet<String>>>,
}

impl ScriptedUpstream {
    pub async fn start(script: Script) -> ScriptedUpstream {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            requests: Arc::clone(&requests),
            script: Arc::new(script),
            next_job: Arc::new(AtomicU64::new(1)),
            streamed: Arc::new(Mutex::new(HashSet::new())),
        };
        let app = Router::new()
            .route("/v1/jobs", post(create))
            .route("/v1/inference", post(create))
            .route("/v1/jobs/{job_id}/stream", get(stream))
            .route("/v1/jobs/{job_id}", delete(cancel))
            .route("/v1/shutdown", post(shutdown))
            .with_state(shared);
        let (url, task) = serve_on_loopback(app).await;
        ScriptedUpstream {
            url,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    /// The recorded requests with this method and path.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(shared: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    shared.requests.lock().expect("lock").push(Recorded {
        method: method.to_string(),
        path: uri.path().to_string(),
        body: serde_json::from_slice(body).ok(),
        auth,
    });
}

async fn create(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&shared, &method, &uri, &headers, &body);
    let job_id = format!(
        "scripted-{}",
        shared.next_job.fetch_add(1, Ordering::SeqCst)
    );
    let sse_url = format!("/v1/jobs/{job_id}/stream");
    (
        StatusCode::CREATED,
        Json(json!({ "job_id": job_id, "sse_url": sse_url })),
    )
        .into_response()
}

async fn stream(
    State(shared): State<Shared>,
    Path(job_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&shared, &method, &uri, &headers, &[]);
    if !shared.streamed.lock().expect("lock").insert(job_id.clone()) {
        let body =
            json!({"error": {"code": "not_found", "message": format!("job {job_id} is gone")}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let mut text = String::new();
    for (seq, event) in shared.script.events.iter().enumerate() {
        let data = serde_json::to_string(event).expect("encode event");
        text.push_str(&format!("id: {}\ndata: {data}\n\n", seq + 1));
    }
    if shared.script.complete {
        text.push_str(&format!("data: {DONE_SENTINEL}\n\n"));
    }
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from(text))
        .expect("response")
}

async fn cancel(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> StatusCode {
    record(&shared, &method, &uri, &headers, &[]);
    StatusCode::NO_CONTENT
}

async fn shutdown(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> StatusCode {
    record(&shared, &method, &uri, &headers, &[]);
    StatusCode::ACCEPTED
}
