//! Helpers for testing `rbee-hive`: a stand-in for the queen's heartbeat routes that records
//! what a hive (and the workers it spawns) send, and a look at a process's children in `/proc`.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use rbee_contract::{HiveHeartbeat, WorkerHeartbeat};

#[derive(Default)]
struct Received {
    hives: Vec<(HiveHeartbeat, Option<String>)>,
    workers: Vec<WorkerHeartbeat>,
}

type Log = Arc<Mutex<Received>>;

/// Records `POST /v1/hive-heartbeat` (with each request's `Authorization` header) and
/// `POST /v1/worker-heartbeat`, the two routes a hive and its workers send to.
pub struct HiveHeartbeatReceiver {
    pub url: String,
    received: Log,
    task: tokio::task::JoinHandle<()>,
}

impl HiveHeartbeatReceiver {
    pub async fn start() -> HiveHeartbeatReceiver {
        let received = Log::default();
        let app = Router::new()
            .route("/v1/hive-heartbeat", post(record_hive))
            .route("/v1/worker-heartbeat", post(record_worker))
            .with_state(Arc::clone(&received));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HiveHeartbeatReceiver {
            url,
            received,
            task,
        }
    }

    /// Every hive heartbeat so far, oldest first, with its `Authorization` header.
    pub fn hive_beats(&self) -> Vec<(HiveHeartbeat, Option<String>)> {
        self.received.lock().expect("lock").hives.clone()
    }

    /// Every worker heartbeat so far, oldest first.
    pub fn worker_beats(&self) -> Vec<WorkerHeartbeat> {
        self.received.lock().expect("lock").workers.clone()
    }
}

impl Drop for HiveHeartbeatReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record_hive(
    State(log): State<Log>,
    headers: HeaderMap,
    Json(beat): Json<HiveHeartbeat>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    log.lock().expect("lock").hives.push((beat, auth));
    StatusCode::NO_CONTENT
}

async fn record_worker(State(log): State<Log>, Json(beat): Json<WorkerHeartbeat>) -> StatusCode {
    log.lock().expect("lock").workers.push(beat);
    StatusCode::NO_CONTENT
}

/// `(state, ppid)` of a process from `/proc/<pid>/stat`; `None` when it does not exist.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`, where comm may itself hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The pids of the live (not zombie) child processes of `parent` (Linux `/proc`).
pub fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| matches!(stat(*pid), Some((state, ppid)) if ppid == parent && state != 'Z'))
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether process `pid` has ended: it no longer exists, or is a zombie nobody reaped yet.
pub fn process_gone(pid: u32) -> bool {
    !matches!(stat(pid), Some((state, _)) if state != 'Z')
}
