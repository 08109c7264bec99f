//! job-client keeps its connections: a caller that stops at a job's terminal event does not
//! cost the next request a new connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use job_client::JobClient;
use rbee_contract::{HiveTarget, JobCreated, JobEvent, Operation};

const DONE: &str = r#"{"event":"done","finish_reason":"stop"}"#;

type Peers = Arc<Mutex<Vec<SocketAddr>>>;

/// A job server whose streams send the terminal event at once and `[DONE]` a moment later,
/// so that a caller returning at the terminal event leaves the rest of the answer unread.
/// It records the client address of every request.
async fn server() -> anyhow::Result<(String, Peers)> {
    async fn create(
        State(peers): State<Peers>,
        ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ) -> impl IntoResponse {
        peers.lock().unwrap().push(peer);
        (
            StatusCode::CREATED,
            axum::Json(JobCreated {
                job_id: "j1".into(),
                sse_url: "/v1/jobs/j1/stream".into(),
            }),
        )
    }
    async fn stream(
        State(peers): State<Peers>,
        ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ) -> Response {
        peers.lock().unwrap().push(peer);
        let chunks = futures::stream::unfold(0, |step| async move {
            let chunk = match step {
                0 => format!("id: 1\ndata: {DONE}\n\n"),
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    "data: [DONE]\n\n".to_owned()
                }
                _ => return None,
            };
            Some((Ok::<_, std::io::Error>(chunk), step + 1))
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(chunks))
            .expect("a valid response")
    }
    let peers = Peers::default();
    let app = Router::new()
        .route("/v1/jobs", post(create))
        .route("/v1/jobs/j1/stream", get(stream))
        .with_state(Arc::clone(&peers));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Ok((base, peers))
}

#[tokio::test]
async fn a_stream_left_at_its_terminal_event_gives_its_connection_back() -> anyhow::Result<()> {
    let (base, peers) = server().await?;
    let client = JobClient::new(&base);
    let op = Operation::ModelList(HiveTarget::default());
    for _ in 0..3 {
        let terminal = client.run_to_end(&op, |_| {}).await?;
        assert!(matches!(terminal, JobEvent::Done { .. }), "{terminal:?}");
        // `[DONE]` and the end of the body arrive after the caller has returned; the stream
        // reads them on its own meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let peers = peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 6, "a POST and a GET per job");
    assert!(
        peers.iter().all(|p| *p == peers[0]),
        "every request on one connection: {peers:?}"
    );
    Ok(())
}
