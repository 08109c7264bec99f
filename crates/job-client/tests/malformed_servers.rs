//! job-client against servers that break the protocol: it must fail loudly, never end silently.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures::StreamExt;
use job_client::{ClientError, JobClient, JobHandle};
use rbee_contract::{ErrorCode, HiveTarget, JobCreated, JobEvent, Operation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = r#"{"event":"token","text":"a","token_id":1,"index":0}"#;
const TOKEN2: &str = r#"{"event":"token","text":"b","token_id":2,"index":1}"#;
const DONE: &str = r#"{"event":"done","finish_reason":"stop"}"#;

async fn serve(app: Router) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

fn sse(body: impl Into<String>) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(body.into()))
        .expect("a valid response")
}

fn handle(client: &JobClient) -> JobHandle {
    client.handle(JobCreated {
        job_id: "j1".into(),
        sse_url: "/v1/jobs/j1/stream".into(),
    })
}

/// Every item of the job's stream, failing the test if it does not end.
async fn collect(handle: JobHandle) -> Vec<Result<JobEvent, ClientError>> {
    tokio::time::timeout(Duration::from_secs(10), handle.events().collect())
        .await
        .expect("the event stream ended")
}

fn op() -> Operation {
    Operation::ModelList(HiveTarget::default())
}

#[tokio::test]
async fn a_stream_that_ends_without_a_terminal_event_is_an_error() -> anyhow::Result<()> {
    let app = Router::new().route(
        "/v1/jobs/j1/stream",
        get(|| async { sse(format!("id: 1\ndata: {TOKEN}\n\n")) }),
    );
    let client = JobClient::new(serve(app).await?).with_reconnects(0, Duration::ZERO);
    let items = collect(handle(&client)).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(matches!(items[0], Ok(JobEvent::Token { index: 0, .. })));
    assert!(
        matches!(&items[1], Err(ClientError::StreamEnded { job_id }) if job_id == "j1"),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn done_sentinel_before_a_terminal_event_is_an_error() -> anyhow::Result<()> {
    let body = format!("id: 1\ndata: {TOKEN}\n\ndata: [DONE]\n\n");
    let app = Router::new().route("/v1/jobs/j1/stream", get(move || async move { sse(body) }));
    let client = JobClient::new(serve(app).await?).with_reconnects(3, Duration::from_millis(1));
    let items = collect(handle(&client)).await;
    assert!(
        matches!(
            items.as_slice(),
            [Ok(_), Err(ClientError::StreamEnded { .. })]
        ),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn garbage_data_is_an_error() -> anyhow::Result<()> {
    let app = Router::new().route(
        "/v1/jobs/j1/stream",
        get(|| async { sse("id: 1\ndata: hello world\n\n") }),
    );
    let client = JobClient::new(serve(app).await?);
    let items = collect(handle(&client)).await;
    match items.as_slice() {
        [Err(ClientError::InvalidEvent { reason, .. })] => {
            assert!(reason.contains("hello world"), "{reason}")
        }
        other => panic!("expected one invalid-event error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_non_numeric_event_id_is_an_error() -> anyhow::Result<()> {
    let body = format!("id: seven\ndata: {TOKEN}\n\n");
    let app = Router::new().route("/v1/jobs/j1/stream", get(move || async move { sse(body) }));
    let client = JobClient::new(serve(app).await?);
    let items = collect(handle(&client)).await;
    assert!(
        matches!(items.as_slice(), [Err(ClientError::InvalidEvent { .. })]),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_event_after_the_terminal_event_is_an_error() -> anyhow::Result<()> {
    let body = format!("id: 1\ndata: {DONE}\n\nid: 2\ndata: {TOKEN}\n\ndata: [DONE]\n\n");
    let app = Router::new().route("/v1/jobs/j1/stream", get(move || async move { sse(body) }));
    let client = JobClient::new(serve(app).await?);
    let items = collect(handle(&client)).await;
    assert!(
        matches!(
            items.as_slice(),
            [
                Ok(JobEvent::Done { .. }),
                Err(ClientError::InvalidEvent { .. })
            ]
        ),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_well_formed_stream_ends_after_the_sentinel() -> anyhow::Result<()> {
    // Comments (keep-alives) are ignored; the stream ends cleanly after [DONE].
    let body = format!(
        ": keep-alive\n\nid: 1\ndata: {TOKEN}\n\n: keep-alive\n\nid: 2\ndata: {DONE}\n\ndata: [DONE]\n\n"
    );
    let app = Router::new().route("/v1/jobs/j1/stream", get(move || async move { sse(body) }));
    let client = JobClient::new(serve(app).await?);
    let items = collect(handle(&client)).await;
    assert!(
        matches!(
            items.as_slice(),
            [Ok(JobEvent::Token { .. }), Ok(JobEvent::Done { .. })]
        ),
        "{items:?}"
    );
    Ok(())
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Option<String>>>>);

impl Seen {
    fn record(&self, headers: &HeaderMap) -> usize {
        let mut seen = self.0.lock().unwrap();
        seen.push(
            headers
                .get("last-event-id")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        seen.len()
    }

    fn get(&self) -> Vec<Option<String>> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_broken_stream_is_resumed_with_last_event_id() -> anyhow::Result<()> {
    async fn stream(State(seen): State<Seen>, headers: HeaderMap) -> Response {
        match seen.record(&headers) {
            1 => sse(format!("id: 1\ndata: {TOKEN}\n\nid: 2\ndata: {TOKEN2}\n\n")),
            _ => sse(format!("id: 3\ndata: {DONE}\n\ndata: [DONE]\n\n")),
        }
    }
    let seen = Seen::default();
    let app = Router::new()
        .route("/v1/jobs/j1/stream", get(stream))
        .with_state(seen.clone());
    let client = JobClient::new(serve(app).await?).with_reconnects(2, Duration::from_millis(1));
    let items = collect(handle(&client)).await;
    let events: Vec<JobEvent> = items.into_iter().collect::<Result<_, _>>()?;
    assert_eq!(events.len(), 3);
    assert!(matches!(events[2], JobEvent::Done { .. }));
    assert_eq!(seen.get(), vec![None, Some("2".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn resuming_is_bounded_and_replayed_events_are_not_repeated() -> anyhow::Result<()> {
    async fn stream(State(seen): State<Seen>, headers: HeaderMap) -> Response {
        seen.record(&headers);
        sse(format!("id: 1\ndata: {TOKEN}\n\nid: 2\ndata: {TOKEN2}\n\n"))
    }
    let seen = Seen::default();
    let app = Router::new()
        .route("/v1/jobs/j1/stream", get(stream))
        .with_state(seen.clone());
    let client = JobClient::new(serve(app).await?).with_reconnects(2, Duration::from_millis(1));
    let items = collect(handle(&client)).await;
    assert!(
        matches!(
            items.as_slice(),
            [
                Ok(JobEvent::Token { index: 0, .. }),
                Ok(JobEvent::Token { index: 1, .. }),
                Err(ClientError::StreamEnded { .. })
            ]
        ),
        "{items:?}"
    );
    assert_eq!(seen.get().len(), 3, "one connection and two resumes");
    Ok(())
}

#[tokio::test]
async fn a_stream_that_came_with_the_creation_is_resumed_at_its_location() -> anyhow::Result<()> {
    // The creation answers with the job's stream, which breaks off after two events (a server
    // whose connection was cut); the resume goes to the `Location` it named, after event 2, and
    // a server that replays event 2 anyway does not get it yielded twice.
    async fn create() -> Response {
        let mut response = sse(format!("id: 1\ndata: {TOKEN}\n\nid: 2\ndata: {TOKEN2}\n\n"));
        *response.status_mut() = StatusCode::CREATED;
        let headers = response.headers_mut();
        headers.insert("x-rbee-job-id", "j7".parse().unwrap());
        headers.insert("location", "/v1/jobs/j7/stream".parse().unwrap());
        response
    }
    async fn stream(State(seen): State<Seen>, headers: HeaderMap) -> Response {
        seen.record(&headers);
        sse(format!(
            "id: 2\ndata: {TOKEN2}\n\nid: 3\ndata: {DONE}\n\ndata: [DONE]\n\n"
        ))
    }
    let seen = Seen::default();
    let app = Router::new()
        .route("/v1/jobs", post(create))
        .route("/v1/jobs/j7/stream", get(stream))
        .with_state(seen.clone());
    let client = JobClient::new(serve(app).await?).with_reconnects(2, Duration::from_millis(1));
    let (handle, events) = client
        .submit_and_follow("/v1/jobs?cancel_on_disconnect=false", &op())
        .await?;
    assert_eq!(handle.job_id, "j7");
    let items: Vec<_> = tokio::time::timeout(Duration::from_secs(10), events.collect())
        .await
        .expect("the event stream ended");
    assert!(
        matches!(
            items.as_slice(),
            [
                Ok(JobEvent::Token { index: 0, .. }),
                Ok(JobEvent::Token { index: 1, .. }),
                Ok(JobEvent::Done { .. })
            ]
        ),
        "{items:?}"
    );
    assert_eq!(seen.get(), vec![Some("2".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn a_connection_cut_mid_stream_is_a_transport_error() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the client went away");
            request.extend_from_slice(&buf[..n]);
        }
        let event = format!("id: 1\ndata: {TOKEN}\n\n");
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        socket
            .write_all(format!("{head}{chunk}").as_bytes())
            .await?;
        // Closing without the final chunk cuts the body short.
        socket.shutdown().await?;
        anyhow::Ok(())
    });
    let client = JobClient::new(base).with_reconnects(0, Duration::ZERO);
    let items = collect(handle(&client)).await;
    assert!(
        matches!(
            items.as_slice(),
            [
                Ok(JobEvent::Token { .. }),
                Err(ClientError::Transport { .. })
            ]
        ),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stream_route_that_is_not_an_event_stream_is_an_error() -> anyhow::Result<()> {
    let app = Router::new().route(
        "/v1/jobs/j1/stream",
        get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
    );
    let client = JobClient::new(serve(app).await?);
    let items = collect(handle(&client)).await;
    assert!(
        matches!(items.as_slice(), [Err(ClientError::InvalidResponse { .. })]),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn submit_errors_are_classified() -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/v1/jobs",
            post(|| async { (StatusCode::BAD_GATEWAY, "<html>Bad Gateway</html>") }),
        )
        .route(
            "/busy",
            post(|| async {
                let body = rbee_contract::ApiErrorBody::new(ErrorCode::Busy, "all slots taken");
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body))
            }),
        )
        .route(
            "/garbage",
            post(|| async { (StatusCode::CREATED, "job created!") }),
        )
        .route(
            "/v1/jobs/gone/stream",
            get(|| async { (StatusCode::NOT_FOUND, "") }),
        );
    let client = JobClient::new(serve(app).await?);

    match client.submit(&op()).await {
        Err(err @ ClientError::UnexpectedStatus { status: 502, .. }) => {
            assert!(err.to_string().contains("Bad Gateway"), "{err}");
            assert_eq!(err.status(), Some(502));
            assert_eq!(err.code(), ErrorCode::Internal);
        }
        other => panic!("expected an unexpected-status error, got {other:?}"),
    }
    match client.submit_to("/busy", &op()).await {
        Err(
            err @ ClientError::Rejected {
                status: 503,
                code: ErrorCode::Busy,
                ..
            },
        ) => {
            assert!(err.to_string().contains("all slots taken"), "{err}");
            assert_eq!(err.code(), ErrorCode::Busy);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(matches!(
        client.submit_to("/garbage", &op()).await,
        Err(ClientError::InvalidResponse { .. })
    ));

    let gone = client.handle(JobCreated {
        job_id: "gone".into(),
        sse_url: "/v1/jobs/gone/stream".into(),
    });
    let items = collect(gone).await;
    assert!(
        matches!(
            items.as_slice(),
            [Err(ClientError::UnexpectedStatus { status: 404, .. })]
        ),
        "{items:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_daemon_is_a_transport_error() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    drop(listener);
    let err = JobClient::new(base).submit(&op()).await.unwrap_err();
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
    assert_eq!(err.code(), ErrorCode::Unavailable);
    Ok(())
}

#[tokio::test]
async fn the_bearer_token_goes_with_every_request() -> anyhow::Result<()> {
    fn authorized(headers: &HeaderMap) -> bool {
        headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer s3cret")
    }
    let app = Router::new()
        .route(
            "/v1/jobs",
            post(|headers: HeaderMap| async move {
                if !authorized(&headers) {
                    return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({})))
                        .into_response();
                }
                let created = JobCreated {
                    job_id: "j1".into(),
                    sse_url: "/v1/jobs/j1/stream".into(),
                };
                (
                    StatusCode::CREATED,
                    axum::Json(serde_json::to_value(created).unwrap()),
                )
                    .into_response()
            }),
        )
        .route(
            "/v1/jobs/j1/stream",
            get(|headers: HeaderMap| async move {
                if authorized(&headers) {
                    sse(format!("id: 1\ndata: {DONE}\n\ndata: [DONE]\n\n"))
                } else {
                    Response::builder().status(401).body(Body::empty()).unwrap()
                }
            }),
        )
        .route(
            "/v1/jobs/j1",
            delete(|headers: HeaderMap| async move {
                if authorized(&headers) {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::UNAUTHORIZED
                }
            }),
        );
    let base = serve(app).await?;

    let anonymous = JobClient::new(&base);
    assert_eq!(
        anonymous.submit(&op()).await.unwrap_err().status(),
        Some(401)
    );

    let client = JobClient::new(&base).with_token("s3cret");
    let handle = client.submit(&op()).await?;
    handle.cancel().await?;
    let items = collect(handle).await;
    assert!(
        matches!(items.as_slice(), [Ok(JobEvent::Done { .. })]),
        "{items:?}"
    );
    Ok(())
}
