//! Sampling as a client of a real worker sees it: a request without `seed` samples afresh
//! each time, the same `seed` gives the same text, greedy decoding needs no seed; and the
//! worker applies the contract's limits to parameters (the queen's job API and OpenAI routes
//! apply the same ones; their unit tests compare the two verdicts).

use rbee_contract::JobEvent;
use serde_json::{Value, json};

use test_harness::{Daemon, JobApi, RawStream, tiny_model};

const TOKEN: &str = "sampling-token";
const TOKENS: u32 = 24;

/// Temperature 1 over the whole vocabulary (every filter off), so each step draws from the
/// model's full distribution.
fn sampled(seed: Option<u64>) -> Value {
    let mut body = json!({"operation": "infer", "model": "tiny", "prompt": "Once upon a time",
                          "max_tokens": TOKENS, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                          "min_p": 0.0});
    if let Some(seed) = seed {
        body["seed"] = json!(seed);
    }
    body
}

fn ids(stream: &RawStream) -> Vec<u32> {
    stream.assert_one_terminal_then_done("worker");
    stream.token_ids()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_seed_each_request_samples_afresh_and_a_seed_reproduces() {
    let worker = Daemon::ready_worker(&tiny_model(), TOKEN, &[]).await;
    let api = JobApi::new(&worker.url, Some(TOKEN));
    let run = |body: Value| {
        let api = &api;
        async move { ids(&api.run("/v1/inference", &body).await) }
    };

    let seeded = run(sampled(Some(7))).await;
    assert_eq!(seeded.len(), TOKENS as usize, "{seeded:?}");
    assert_eq!(
        run(sampled(Some(7))).await,
        seeded,
        "the same seed, the same tokens"
    );

    // Two unseeded requests coincide only if every one of the 24 independent draws does. The
    // generated model's random weights spread each step's probability over its 512 tokens
    // (no token near certainty), so the chance that two draws agree is far below 1 per step
    // and below 1e-6 over 24 steps. Before seeds were drawn per request, these were equal.
    let first = run(sampled(None)).await;
    let second = run(sampled(None)).await;
    assert_eq!(first.len(), TOKENS as usize);
    assert_ne!(
        first, second,
        "two requests without a seed gave the same text"
    );
    assert_ne!(first, seeded);

    // Greedy decoding draws nothing: without a seed it is still the same every time.
    let greedy = json!({"operation": "infer", "model": "tiny", "prompt": "Once upon a time",
                        "max_tokens": TOKENS, "temperature": 0});
    assert_eq!(run(greedy.clone()).await, run(greedy).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_applies_the_contracts_limits() {
    let worker = Daemon::ready_worker(&tiny_model(), TOKEN, &[]).await;
    let api = JobApi::new(&worker.url, Some(TOKEN));
    let with = |key: &str, value: Value| {
        let mut body = json!({"operation": "infer", "model": "tiny", "prompt": "hi",
                              "max_tokens": 2});
        body[key] = value;
        body
    };
    // Accepted: values on which the APIs used to disagree.
    for body in [
        with("top_k", json!(0)),
        with("stop", json!(vec!["zzz"; 16])),
        with("temperature", json!(2.0)),
    ] {
        let stream = api.run("/v1/inference", &body).await;
        stream.assert_one_terminal_then_done("worker");
        assert!(
            matches!(stream.terminal(), Some(JobEvent::Done { .. })),
            "{body}: {:?}",
            stream.events
        );
    }
    // Refused with a 400 that names the field.
    for (key, value) in [
        ("temperature", json!(2.5)),
        ("stop", json!(vec!["zzz"; 17])),
        ("stop", json!(["x".repeat(257)])),
        ("presence_penalty", json!(-3)),
    ] {
        let body = with(key, value);
        let response = api.submit("/v1/inference", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.expect("a JSON error");
        assert_eq!(error["error"]["code"], "bad_request", "{error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(&format!("`{key}` ")),
            "{body}: {message}"
        );
    }
}
