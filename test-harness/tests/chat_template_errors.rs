//! A model whose chat template does not compile: every chat request fails with a clear
//! `bad_request` naming the problem, at the worker (a `400` with a JSON body), through the
//! queen's job API (an `error` event) and its OpenAI route (a `400` OpenAI error object,
//! streaming or not), and in the keeper; raw prompts to the same model still work.

use std::path::PathBuf;
use std::time::Duration;

use rbee_contract::{ErrorCode, JobEvent};
use serde_json::{Value, json};
use test_harness::{CLUSTER_TOKEN, JobApi, KeeperEnv, TestCluster, scratch_dir, tiny_model};

/// The tiny model with its chat template's last block tag left open: a syntax error, written
/// over the template in place (same length, so nothing else in the file moves).
fn broken_template_model() -> PathBuf {
    let mut bytes = std::fs::read(tiny_model()).unwrap();
    // GGUF metadata: the key, then the value's type (8: string), its length and its bytes.
    let key = b"tokenizer.chat_template";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(bytes[at..at + 4], 8u32.to_le_bytes(), "a string value");
    let len = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap()) as usize;
    let start = at + 12;
    let template = std::str::from_utf8(&bytes[start..start + len]).unwrap();
    let close = template.rfind("%}").unwrap();
    let broken = format!("{}% {}", &template[..close], &template[close + 2..]);
    bytes[start..start + len].copy_from_slice(broken.as_bytes());
    let path = scratch_dir("broken-template").join("broken-template.gguf");
    std::fs::write(&path, &bytes).unwrap();
    path
}

fn names_the_problem(message: &str) {
    assert!(
        message.contains("chat template does not compile") && message.contains("syntax error"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_requests_fail_clearly_and_raw_prompts_work() {
    let model = broken_template_model();
    // The cluster's first job, a raw prompt, cold-starts the worker and must succeed.
    let cluster = TestCluster::start(&model, &[]).await;
    let messages = json!([{"role": "user", "content": "Hello"}]);
    let infer = json!({"operation": "infer", "model": cluster.model, "messages": messages,
                       "max_tokens": 2});

    // The worker refuses the job: 400 with the job protocol's error body.
    let worker = JobApi::new(&cluster.worker.url, Some(CLUSTER_TOKEN));
    let refused = worker.submit("/v1/inference", &infer).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    names_the_problem(body["error"]["message"].as_str().unwrap());

    // The queen's job ends with that error.
    let run = cluster.jobs().run("/v1/jobs", &infer).await;
    run.assert_one_terminal_then_done("queen");
    match run.terminal() {
        Some(JobEvent::Error { code, message }) => {
            assert_eq!(*code, ErrorCode::BadRequest);
            names_the_problem(message);
        }
        other => panic!("expected an error, got {other:?}"),
    }

    // The OpenAI route answers 400 with an OpenAI error object, streaming or not.
    let http = reqwest::Client::new();
    for stream in [false, true] {
        let response = http
            .post(format!("{}/v1/chat/completions", cluster.queen.url))
            .json(
                &json!({"model": cluster.model, "messages": messages, "max_tokens": 2,
                          "stream": stream}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "stream: {stream}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
        names_the_problem(body["error"]["message"].as_str().unwrap());
    }

    // The keeper prints the reason and fails.
    let keeper = KeeperEnv::new(&[]);
    let out = keeper
        .run(
            &[
                "--queen-url",
                &cluster.queen.url,
                "infer",
                "--model",
                &cluster.model,
                "--chat",
                "Hello",
            ],
            Duration::from_secs(60),
        )
        .await;
    assert_ne!(out.code, Some(0), "{out:?}");
    names_the_problem(&out.stderr);

    // Raw prompts still work.
    let raw = cluster
        .jobs()
        .run(
            "/v1/jobs",
            &json!({"operation": "infer", "model": cluster.model, "prompt": "Hello",
                    "max_tokens": 2}),
        )
        .await;
    assert!(
        matches!(raw.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        raw.events
    );
}
