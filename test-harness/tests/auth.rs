//! The queen's credentials, as a client and a daemon meet them: API keys on every public
//! route but `/health`, the cluster token on the heartbeat routes, and neither standing in
//! for the other; admin keys, when configured, for shutdown and the operations that change a
//! hive. The queen is the real binary with two API keys and a cluster token.

use std::time::Duration;

use rbee_contract::{ErrorCode, JobCreated, JobEvent, WorkerHeartbeat, WorkerInfo, WorkerState};
use reqwest::Method;
use serde_json::{Value, json};
use test_harness::{Daemon, JobApi, read_raw_stream};

const CLUSTER_TOKEN: &str = "auth-test-cluster-token";
const KEY_ONE: &str = "auth-test-key-one";
const KEY_TWO: &str = "auth-test-key-two";
const ADMIN_KEY: &str = "auth-test-admin-key";

async fn start_queen() -> Daemon {
    start_queen_with(&[]).await
}

async fn start_queen_with(extra_env: &[(&str, &str)]) -> Daemon {
    let api_keys = format!("{KEY_ONE}, {KEY_TWO}");
    let mut env = vec![
        ("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN),
        ("RBEE_API_KEYS", api_keys.as_str()),
    ];
    env.extend_from_slice(extra_env);
    Daemon::queen(&[], &env).await
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
        cached_prefixes: Vec::new(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_client_routes_and_the_cluster_token_guards_heartbeats() {
    let queen = start_queen().await;
    // A hub reference: with no admin keys an API key may name one (no path, though).
    let infer =
        json!({"operation": "infer", "model": "hf:org/repo", "prompt": "hi", "max_tokens": 2});

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

/// A `403` with rbee's error body: the key is valid, but not for this.
async fn assert_forbidden(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 403, "{what}");
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "forbidden", "{what}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("admin key"), "{what}: {body}");
}

/// Registers a hive that answers nothing, so that hive operations are admitted (their jobs
/// then end with an error) instead of being refused for want of any hive. Its catalog holds
/// `hf:org/repo`, a model an API key may name.
async fn register_dead_hive(queen: &Daemon) {
    let beat = json!({"hive": {
        "hive_id": "h-auth", "url": "http://127.0.0.1:1", "devices": [], "workers": [],
        "models": [{"id": "hf:org/repo:m.gguf", "source": "hf:org/repo", "state": "ready",
                    "size_bytes": 1}],
    }});
    let response = call(
        queen,
        Method::POST,
        "/v1/hive-heartbeat",
        Some(&beat),
        Some(CLUSTER_TOKEN),
    )
    .await;
    assert_eq!(response.status(), 204);
}

/// Jobs the queen holds, running and finished, from `/metrics`.
async fn jobs_held(queen: &Daemon) -> u64 {
    let page = call(queen, Method::GET, "/metrics", None, Some(ADMIN_KEY))
        .await
        .text()
        .await
        .unwrap();
    page.lines()
        .filter(|line| line.starts_with("rbee_jobs{"))
        .map(|line| {
            let count = line.rsplit(' ').next().unwrap_or_default();
            count.parse::<u64>().unwrap_or_else(|_| panic!("{line}"))
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_admin_keys_only_an_admin_key_changes_the_cluster() {
    let mut queen = start_queen_with(&[("RBEE_ADMIN_KEYS", ADMIN_KEY)]).await;
    register_dead_hive(&queen).await;
    // A model of the cluster's catalog: an API key may name it.
    let infer =
        json!({"operation": "infer", "model": "hf:org/repo", "prompt": "hi", "max_tokens": 2});
    let admin_operations = [
        json!({"operation": "worker_spawn", "model": "hf:org/repo", "device": "cpu"}),
        json!({"operation": "worker_delete", "worker_id": "w-1"}),
        json!({"operation": "model_download", "model": "hf:org/repo"}),
        json!({"operation": "model_delete", "model": "hf:org/repo"}),
    ];
    // The job server reads the last of two tags; so must the check.
    let smuggled = r#"{"operation":"infer","operation":"model_delete","model":"hf:org/repo"}"#;

    // An API key reads the cluster and runs inference...
    for (method, path) in [
        (Method::GET, "/v1/workers"),
        (Method::GET, "/v1/hives"),
        (Method::GET, "/metrics"),
        (Method::GET, "/v1/models"),
    ] {
        let response = call(&queen, method.clone(), path, None, Some(KEY_ONE)).await;
        assert_eq!(response.status(), 200, "{method} {path} with an API key");
    }
    for body in [
        &infer,
        &json!({"operation": "model_list"}),
        &json!({"operation": "worker_list"}),
    ] {
        let response = call(&queen, Method::POST, "/v1/jobs", Some(body), Some(KEY_TWO)).await;
        assert_eq!(response.status(), 201, "{body} with an API key");
    }

    // ...but cannot change it: `403`, and no job is created.
    let held = jobs_held(&queen).await;
    for body in &admin_operations {
        let response = call(&queen, Method::POST, "/v1/jobs", Some(body), Some(KEY_ONE)).await;
        assert_forbidden(response, &format!("{body} with an API key")).await;
    }
    let response = reqwest::Client::new()
        .post(format!("{}/v1/jobs", queen.url))
        .bearer_auth(KEY_ONE)
        .header("content-type", "application/json")
        .body(smuggled)
        .send()
        .await
        .unwrap();
    assert_forbidden(response, "a second `operation` tag").await;
    assert_eq!(
        jobs_held(&queen).await,
        held,
        "a refused operation created a job"
    );
    let response = call(&queen, Method::POST, "/v1/shutdown", None, Some(KEY_ONE)).await;
    assert_forbidden(response, "shutdown with an API key").await;

    // Without a valid key it is still a `401`, and the cluster token is still no client key.
    for bearer in [None, Some("not-a-key"), Some(CLUSTER_TOKEN)] {
        let response = call(&queen, Method::POST, "/v1/shutdown", None, bearer).await;
        assert_refused(response, &format!("shutdown with {bearer:?}")).await;
        let response = call(
            &queen,
            Method::POST,
            "/v1/jobs",
            Some(&admin_operations[3]),
            bearer,
        )
        .await;
        assert_refused(response, &format!("model_delete with {bearer:?}")).await;
    }
    // An admin key is no cluster token either.
    let response = call(
        &queen,
        Method::POST,
        "/v1/worker-heartbeat",
        Some(&heartbeat()),
        Some(ADMIN_KEY),
    )
    .await;
    assert_refused(response, "a heartbeat with the admin key").await;

    // An admin key does everything an API key does, and administers.
    for path in ["/v1/workers", "/v1/hives", "/metrics", "/v1/models"] {
        let response = call(&queen, Method::GET, path, None, Some(ADMIN_KEY)).await;
        assert_eq!(response.status(), 200, "{path} with the admin key");
    }
    let chat =
        json!({"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]});
    let response = call(
        &queen,
        Method::POST,
        "/v1/chat/completions",
        Some(&chat),
        Some(ADMIN_KEY),
    )
    .await;
    assert!(
        ![401, 403].contains(&response.status().as_u16()),
        "chat with the admin key: {}",
        response.status()
    );
    let held = jobs_held(&queen).await;
    for body in std::iter::once(&infer).chain(&admin_operations) {
        let response = call(
            &queen,
            Method::POST,
            "/v1/jobs",
            Some(body),
            Some(ADMIN_KEY),
        )
        .await;
        assert_eq!(response.status(), 201, "{body} with the admin key");
        let created: JobCreated = response.json().await.unwrap();
        // The job ran to a clear end (there is no hive to act on), readable by any client key.
        let stream = read_raw_stream(
            JobApi::new(&queen.url, Some(KEY_ONE))
                .open_stream(&created)
                .await,
        )
        .await
        .unwrap();
        stream.assert_one_terminal_then_done("queen");
    }
    assert_eq!(
        jobs_held(&queen).await,
        held + 1 + admin_operations.len() as u64,
        "every admitted operation is a job"
    );

    let response = call(&queen, Method::POST, "/v1/shutdown", None, Some(ADMIN_KEY)).await;
    assert_eq!(response.status(), 202, "shutdown with the admin key");
    let status = queen
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the queen exits");
    assert_eq!(status, Some(0));

    let log = queen.log_text();
    assert!(
        !log.contains("every API key can shut the cluster down"),
        "no warning with admin keys:\n{log}"
    );
    for secret in [ADMIN_KEY, KEY_ONE, KEY_TWO] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_admin_keys_an_api_key_administers_and_the_queen_warns() {
    let mut queen = start_queen().await;
    register_dead_hive(&queen).await;
    let response = call(
        &queen,
        Method::POST,
        "/v1/jobs",
        Some(&json!({"operation": "model_delete", "model": "hf:org/repo"})),
        Some(KEY_ONE),
    )
    .await;
    assert_eq!(response.status(), 201, "model_delete with an API key");
    let response = call(&queen, Method::POST, "/v1/shutdown", None, Some(KEY_TWO)).await;
    assert_eq!(response.status(), 202, "shutdown with an API key");
    let status = queen
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the queen exits");
    assert_eq!(status, Some(0));
    let log = queen.log_text();
    assert_eq!(
        log.matches("every API key can shut the cluster down")
            .count(),
        1,
        "one warning at startup:\n{log}"
    );
}
