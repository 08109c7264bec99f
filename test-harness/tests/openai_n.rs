//! `n` choices on the queen's OpenAI API, as clients see them: a queen, a hive whose worker
//! has four slots, and the tiny generated model. Choice `i` of a request with a seed is what
//! one choice with `seed + i` samples, so the choices differ and come back the same on every
//! run; streamed, the chunks of the choices interleave by `index` and assemble into the same
//! texts; `n` of 8, the limit, gets eight choices (more than the worker's slots: the rest wait
//! their turn), and above it is a 400. Then the official `openai` Python package asks for them.
//! Log-probabilities' `bytes` are each token's own: a character split across tokens is
//! rebuilt by joining them.

use std::time::Duration;

use rbee_contract::{ErrorCode, JobEvent};
use serde_json::{Value, json};
use test_harness::{
    TestCluster, eventually, read_raw_stream, run_openai_script, slow_model, tiny_model,
};

async fn cluster() -> TestCluster {
    TestCluster::start_with(&tiny_model(), &[], &["--worker-slots", "4"]).await
}

fn url(cluster: &TestCluster, path: &str) -> String {
    format!("{}{path}", cluster.queen.url)
}

async fn post(cluster: &TestCluster, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url(cluster, path))
        .json(body)
        .send()
        .await
        .expect("POST")
}

/// A non-streaming request: the status and the JSON body.
async fn call(cluster: &TestCluster, path: &str, body: &Value) -> (u16, Value) {
    let response = post(cluster, path, body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A streaming request: every `data:` payload, in order.
async fn stream(cluster: &TestCluster, path: &str, body: &Value) -> Vec<String> {
    let response = post(cluster, path, body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("the stream's body");
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.trim().to_string())
        .collect()
}

fn chat_body(model: &str, n: u32, seed: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "tell me a story"}],
           "max_tokens": 12, "temperature": 1.0, "seed": seed, "n": n})
}

fn texts(answer: &Value) -> Vec<String> {
    answer["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            c["message"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .expect("a choice's text")
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_are_the_seeds_choices_reproducible_streamed_and_capped() {
    let cluster = cluster().await;
    let model = cluster.model.clone();
    let logs = || format!("worker log:\n{}", cluster.worker_log());

    let (status, three) = call(&cluster, "/v1/chat/completions", &chat_body(&model, 3, 7)).await;
    assert_eq!(status, 200, "{three}\n{}", logs());
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{three}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i, "{three}");
        assert_eq!(choice["finish_reason"], "length", "{three}");
        assert_eq!(choice["message"]["role"], "assistant");
    }
    let texts_of_three = texts(&three);
    assert!(
        texts_of_three[0] != texts_of_three[1] && texts_of_three[1] != texts_of_three[2],
        "the choices sample with different seeds: {texts_of_three:?}"
    );
    // The prompt is counted once; every choice generated its 12 tokens.
    let (_, one) = call(&cluster, "/v1/chat/completions", &chat_body(&model, 1, 7)).await;
    assert_eq!(
        three["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    assert_eq!(three["usage"]["completion_tokens"], 36, "{three}");
    assert_eq!(
        three["usage"]["total_tokens"].as_u64(),
        Some(one["usage"]["prompt_tokens"].as_u64().unwrap() + 36)
    );
    // Choice i is what one choice with seed + i samples; the same request gives them again.
    assert_eq!(texts(&one), vec![texts_of_three[0].clone()]);
    let (_, eight) = call(&cluster, "/v1/chat/completions", &chat_body(&model, 1, 8)).await;
    assert_eq!(texts(&eight), vec![texts_of_three[1].clone()]);
    let (_, again) = call(&cluster, "/v1/chat/completions", &chat_body(&model, 3, 7)).await;
    assert_eq!(texts(&again), texts_of_three);
    // Without a seed each choice draws its own.
    let mut unseeded = chat_body(&model, 2, 0);
    unseeded.as_object_mut().unwrap().remove("seed");
    let (status, random) = call(&cluster, "/v1/chat/completions", &unseeded).await;
    assert_eq!(status, 200, "{random}");
    let random = texts(&random);
    assert_ne!(random[0], random[1]);

    // Streamed: chunks of both choices, each with its index, assemble into the same texts;
    // each choice ends with its finish_reason; one usage chunk, one [DONE].
    let mut body = chat_body(&model, 2, 7);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let lines = stream(&cluster, "/v1/chat/completions", &body).await;
    assert_eq!(
        lines.last().map(String::as_str),
        Some("[DONE]"),
        "{lines:?}"
    );
    assert_eq!(lines.iter().filter(|l| *l == "[DONE]").count(), 1);
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON chunk"))
        .collect();
    let mut assembled = [String::new(), String::new()];
    let mut finished = [0, 0];
    let mut ids = std::collections::HashSet::new();
    for chunk in &chunks {
        ids.insert(chunk["id"].as_str().unwrap().to_owned());
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().unwrap() as usize;
            assert!(index < 2, "{chunk}");
            if let Some(text) = choice["delta"]["content"].as_str() {
                assembled[index].push_str(text);
            }
            if choice["finish_reason"].is_string() {
                assert_eq!(choice["finish_reason"], "length");
                finished[index] += 1;
            }
        }
    }
    assert_eq!(ids.len(), 1, "one answer, one id: {ids:?}");
    assert_eq!(finished, [1, 1], "{lines:?}");
    assert_eq!(assembled.to_vec(), texts_of_three[..2].to_vec());
    let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "{lines:?}");
    assert_eq!(usage[0]["choices"], json!([]));
    assert_eq!(usage[0]["usage"]["completion_tokens"], 24);
    assert_eq!(
        usage[0]["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );

    // Completions take n too.
    let text_body = json!({"model": model, "prompt": "once upon a time", "max_tokens": 6,
                           "temperature": 1.0, "seed": 3, "n": 2});
    let (status, text_answer) = call(&cluster, "/v1/completions", &text_body).await;
    assert_eq!(status, 200, "{text_answer}");
    assert_eq!(text_answer["choices"][1]["index"], 1);
    assert_eq!(text_answer["usage"]["completion_tokens"], 12);
    let mut streamed_text = text_body.clone();
    streamed_text["stream"] = json!(true);
    let lines = stream(&cluster, "/v1/completions", &streamed_text).await;
    let mut assembled = [String::new(), String::new()];
    for line in lines.iter().filter(|l| *l != "[DONE]") {
        let chunk: Value = serde_json::from_str(line).unwrap();
        let choice = &chunk["choices"][0];
        assembled[choice["index"].as_u64().unwrap() as usize]
            .push_str(choice["text"].as_str().unwrap());
    }
    assert_eq!(assembled.to_vec(), texts(&text_answer));

    // The limit itself is served: eight choices, each with its index, text and
    // finish_reason, and every one generated its tokens.
    let mut body = chat_body(&model, 8, 20);
    body["max_tokens"] = json!(3);
    let (status, eight) = call(&cluster, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{eight}\n{}", logs());
    let choices = eight["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 8, "{eight}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i, "{eight}");
        assert_eq!(choice["finish_reason"], "length", "{eight}");
        assert_eq!(choice["message"]["role"], "assistant", "{eight}");
    }
    assert_eq!(eight["usage"]["completion_tokens"], 24, "{eight}");
    assert_eq!(
        eight["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    // The last choice is the last seed's, as alone.
    let mut last = chat_body(&model, 1, 27);
    last["max_tokens"] = json!(3);
    let (_, last) = call(&cluster, "/v1/chat/completions", &last).await;
    assert_eq!(texts(&last), vec![texts(&eight)[7].clone()]);

    // Above the limit: a 400 naming `n` and the limit, before any job.
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = if path == "/v1/completions" {
            json!({"model": model, "prompt": "hi", "n": 9})
        } else {
            chat_body(&model, 9, 1)
        };
        let (status, refused) = call(&cluster, path, &body).await;
        assert_eq!(status, 400, "{refused}");
        assert_eq!(refused["error"]["param"], "n");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("between 1 and 8"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_cancels_every_choice() {
    // A model slow enough that the choices are still generating when the client leaves.
    let cluster = TestCluster::start_with(&slow_model(), &[], &["--worker-slots", "4"]).await;
    let mut body = chat_body(&cluster.model, 3, 11);
    body["stream"] = json!(true);
    body["max_tokens"] = json!(1500);
    let response = post(&cluster, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let ids: Vec<String> = response
        .headers()
        .get("x-rbee-job-id")
        .and_then(|v| v.to_str().ok())
        .expect("the jobs' ids")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut response = response;
    response.chunk().await.expect("a first chunk");
    drop(response);
    for id in &ids {
        let events = reqwest::Client::new()
            .get(url(&cluster, &format!("/v1/jobs/{id}/stream")))
            .send()
            .await
            .expect("GET the job's stream");
        let events = read_raw_stream(events).await.expect("the job's events");
        assert!(
            matches!(
                events.terminal(),
                Some(JobEvent::Error {
                    code: ErrorCode::Cancelled,
                    ..
                })
            ),
            "job {id}: {:?}",
            events.terminal()
        );
    }
    eventually(
        "the worker's slots are free again",
        Duration::from_secs(30),
        async || {
            let worker = cluster.worker_info().await;
            (worker.slots_free == worker.slots_total).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_asks_for_n_choices() {
    let cluster = cluster().await;
    let base_url = url(&cluster, "/v1");
    let run = run_openai_script(
        "openai_n.py",
        &[base_url.as_str(), "no-key", cluster.model.as_str()],
    )
    .await;
    assert!(run.passed(), "{run}\nworker log:\n{}", cluster.worker_log());
}

/// Each logprobs entry's `bytes` as a byte string, and whether any is not UTF-8 alone.
fn joined_bytes(entries: &[Value]) -> (Vec<u8>, bool) {
    let mut joined = Vec::new();
    let mut split = false;
    for entry in entries {
        let bytes: Vec<u8> = serde_json::from_value(entry["bytes"].clone()).expect("bytes");
        split |= std::str::from_utf8(&bytes).is_err();
        joined.extend_from_slice(&bytes);
    }
    (joined, split)
}

#[tokio::test(flavor = "multi_thread")]
async fn logprobs_bytes_of_a_split_character_join_into_its_utf8() {
    // SmolLM2's byte-level BPE has no piece for the emoji: it is split into tokens whose bytes
    // are not UTF-8 alone. The schema makes the answer that string.
    let cluster = TestCluster::start(&test_harness::smollm2(), &[]).await;
    let format = json!({"type": "json_schema", "json_schema": {"name": "bee",
        "schema": {"type": "string", "enum": ["🐝 é"]}}});
    let body = json!({"model": cluster.model,
        "messages": [{"role": "user", "content": "Say bee."}],
        "max_tokens": 16, "temperature": 0, "logprobs": true, "top_logprobs": 2,
        "response_format": format});
    let (status, answer) = call(&cluster, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, "\"🐝 é\"", "{answer}");
    let entries = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let (joined, split) = joined_bytes(entries);
    assert_eq!(joined, content.as_bytes(), "{entries:?}");
    assert!(split, "the emoji is split across tokens: {entries:?}");
    assert!(
        entries.iter().any(|e| e["token"] == "\u{fffd}"),
        "a partial token's text is the lossy one: {entries:?}"
    );
    for entry in entries {
        for top in entry["top_logprobs"].as_array().unwrap() {
            assert!(top["bytes"].is_array(), "{top}");
        }
    }

    // The job API's token events carry the same bytes.
    let job = cluster
        .jobs()
        .run(
            "/v1/jobs",
            &json!({"operation": "infer", "model": cluster.model,
                    "messages": [{"role": "user", "content": "Say bee."}],
                    "max_tokens": 16, "temperature": 0, "logprobs": 1,
                    "response_format": {"type": "json_schema",
                                        "schema": format["json_schema"]["schema"]}}),
        )
        .await;
    let mut joined = Vec::new();
    for (_, event) in &job.events {
        if let JobEvent::Token {
            logprobs: Some(lp), ..
        } = event
        {
            joined.extend_from_slice(lp.bytes.as_deref().expect("the worker sends bytes"));
            assert!(lp.top_logprobs.iter().all(|t| t.bytes.is_some()));
        }
    }
    assert_eq!(joined, content.as_bytes(), "{:?}", job.events);
}
