use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use rbee_contract::WorkerHeartbeat;

use crate::loopback::serve_on_loopback;

/// A stand-in for the queen's heartbeat route that records what it receives, with the
/// `Authorization` header of each request.
pub struct HeartbeatReceiver {
    pub url: String,
    received: Log,
    task: tokio::task::JoinHandle<()>,
}

impl HeartbeatReceiver {
    pub async fn start() -> HeartbeatReceiver {
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/worker-heartbeat", post(record))
            .with_state(Arc::clone(&received));
        let (url, task) = serve_on_loopback(app).await;
        HeartbeatReceiver {
            url,
            received,
            task,
        }
    }

    pub fn received(&self) -> Vec<(WorkerHeartbeat, Option<String>)> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for HeartbeatReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Each heartbeat with the `Authorization` header it came with.
type Log = Arc<Mutex<Vec<(WorkerHeartbeat, Option<String>)>>>;

async fn record(
    State(log): State<Log>,
    headers: HeaderMap,
    Json(beat): Json<WorkerHeartbeat>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    log.lock().expect("lock").push((beat, auth));
    StatusCode::NO_CONTENT
}
