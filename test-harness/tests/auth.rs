//! The queen's two credentials, as a client and a daemon meet them: API keys on every public
//! route but `/health`, the cluster token on the heartbeat routes, and neither standing in
//! for the other. The queen is the real binary with two API keys and a cluster token.

use std::time::Duration;

use rbee_contract::{ErrorCode, JobCreated, JobEvent, WorkerHeartbeat, WorkerInfo, WorkerState};
use reqwest::Method;
use serde_json::{Value, json};
use test_harness::{Daemon, JobApi, free_port, read_raw_stream};

const CLUSTER_TOKEN: &str = "auth-test-cluster-token";
const KEY_ONE: &str = "auth-test-key-one";
const KEY_TWO: &str = "auth-test-key-two";

async fn start_queen() -> Daemon {
    let port = free_port();
    let mut queen = Daemon::start(
        "queen-rbee",
        &["--port".to_string(), port.to_string()],
        &[
            ("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN),
            ("RBEE_API_KEYS", &format!("{KEY_ONE}, {KEY_TWO}")),
        ],
        format!("http://127.0.0.1:{port}"),
    )
    .expect("start queen");
    queen
        .wait_for("/health", None, Duration::from_secs(30))
        .await
        .expect("queen healthy");
    queen
}

async fn call(
    queen: &Daemon,
    method: Method,
    path: &str,
    body: Option<&Value>,
    bearer: Option<&str>,
) -> reqwest::Response {
    let mut request =
        reqwest::Client::new().request(method.clone(), format!("{}{path}", queen.url));
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A `401` with rbee's error body and a `WWW-Authenticate: Bearer` challenge.
async fn assert_refused(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 401, "{what}");
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "{what}"
    );
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
}

fn heartbeat() -> Value {
    json!(WorkerHeartbeat {
        worker: WorkerInfo {
            worker_id: "w-auth".into(),
            url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            device: "cpu".into(),
            state: WorkerState::Ready,
            slots_total: 1,
            slots_free: 1,
            hive_id: None,
            context_length: None,
        },
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_client_routes_and_the_cluster_token_guards_heartbeats() {
    let queen = start_queen().await;
    let infer = json!({"operation": "infer", "model": "nobody-serves-this", "prompt": "hi", "max_tokens": 2});

    // Client routes: no key, a wrong key and the cluster token are all refused.
    let client_routes: [(Method, &str, Option<&Value>); 7] = [
        (Method::POST, "/v1/jobs", Some(&infer)),
        (Method::GET, "/v1/jobs/some-job/stream", None),
        (Method::DELETE, "/v1/jobs/some-job", None),
        (Method::GET, "/v1/workers", None),
        (Method::GET, "/v1/hives", None),
        (Method::GET, "/metrics", None),
        (Method::POST, "/v1/shutdown", None),
    ];
    for (method, path, body) in &client_routes {
        for (bearer, what) in [
            (None, "no key"),
            (Some("not-a-key"), "a wrong key"),
            (Some(CLUSTER_TOKEN), "the cluster token"),
        ] {
            let response = call(&queen, method.clone(), path, *body, bearer).await;
            assert_refused(response, &format!("{method} {path} with {what}")).await;
        }
    }

    // The OpenAI routes take the same keys, refusing in OpenAI's error shape.
    let chat =
        json!({"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]});
    for (method, path, body) in [
        (Method::GET, "/v1/models", None),
        (Method::POST, "/v1/chat/completions", Some(&chat)),
    ] {
        for bearer in [None, Some("not-a-key"), Some(CLUSTER_TOKEN)] {
            let response = call(&queen, method.clone(), path, body, bearer).await;
            assert_eq!(response.status(), 401, "{method} {path} with {bearer:?}");
            let error: Value = response.json().await.expect("a JSON error body");
            assert_eq!(error["error"]["type"], "authentication_error", "{error}");
        }
        let response = call(&queen, method.clone(), path, body, Some(KEY_ONE)).await;
        assert_ne!(response.status(), 401, "{method} {path} with a key");
    }

    // Heartbeats: no token, a wrong one and an API key are refused; nothing registers.
    for bearer in [None, Some("not-a-token"), Some(KEY_ONE)] {
        for path in ["/v1/worker-heartbeat", "/v1/hive-heartbeat"] {
            let response = call(&queen, Method::POST, path, Some(&heartbeat()), bearer).await;
            assert_refused(response, &format!("{path} with {bearer:?}")).await;
        }
    }
    let listed: Value = call(&queen, Method::GET, "/v1/workers", None, Some(KEY_ONE))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["workers"],
        json!([]),
        "a refused heartbeat registers nothing"
    );

    // `/health` is open to all.
    assert_eq!(
        call(&queen, Method::GET, "/health", None, None)
            .await
            .status(),
        200
    );

    // The right credentials get through.
    let beat = call(
        &queen,
        Method::POST,
        "/v1/worker-heartbeat",
        Some(&heartbeat()),
        Some(CLUSTER_TOKEN),
    )
    .await;
    assert_eq!(beat.status(), 204);
    for key in [KEY_ONE, KEY_TWO] {
        let listed: Value = call(&queen, Method::GET, "/v1/workers", None, Some(key))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(listed["workers"][0]["worker_id"], "w-auth", "{listed}");
        let hives = call(&queen, Method::GET, "/v1/hives", None, Some(key)).await;
        assert_eq!(hives.status(), 200);
    }
    let metrics = call(&queen, Method::GET, "/metrics", None, Some(KEY_TWO)).await;
    assert_eq!(metrics.status(), 200);
    let page = metrics.text().await.unwrap();
    assert!(page.contains("rbee_http_requests_total"), "{page}");
    let unknown_job = call(
        &queen,
        Method::DELETE,
        "/v1/jobs/some-job",
        None,
        Some(KEY_ONE),
    )
    .await;
    assert_eq!(
        unknown_job.status(),
        404,
        "past auth, the job is simply unknown"
    );

    // A whole job with a key: created, streamed, ended with one clear terminal event.
    let created: JobCreated = {
        let response = call(
            &queen,
            Method::POST,
            "/v1/jobs",
            Some(&infer),
            Some(KEY_ONE),
        )
        .await;
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    };
    let stream = read_raw_stream(
        JobApi::new(&queen.url, Some(KEY_TWO))
            .open_stream(&created)
            .await,
    )
    .await
    .unwrap();
    stream.assert_one_terminal_then_done("queen");
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::NoCapacity,
                ..
            })
        ),
        "{:?}",
        stream.events
    );

    // Refused requests are counted like any other, under their route template.
    let page = call(&queen, Method::GET, "/metrics", None, Some(KEY_ONE))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.lines().any(|l| l.starts_with(
            r#"rbee_http_requests_total{route="/v1/jobs/{job_id}/stream",method="GET",status="401"}"#
        )),
        "{page}"
    );

    // No credential ever reaches the log.
    let log = queen.log_text();
    for secret in [CLUSTER_TOKEN, KEY_ONE, KEY_TWO, "not-a-key"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}
