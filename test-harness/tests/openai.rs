//! The queen's OpenAI-compatible API as a client sees it, over raw HTTP: the exact shapes of
//! answers and stream chunks, usage, stop sequences, errors as OpenAI error objects with the
//! right status, a stream that fails after it started, a client that goes away, and the
//! official `openai` Python package. Each test runs its own queen (with an API key) and,
//! where it needs a worker, a real hive that cold-starts one for the first request.

use std::time::Duration;

use futures::StreamExt;
use rbee_contract::{JobEvent, WorkerInfo};
use serde_json::{Value, json};
use test_harness::{
    JobApi, OpenAiCluster, OpenAiHive, Script, chunks, eventually, model_id, read_raw_stream,
    run_openai_script, smollm2, tiny_model,
};

const KEY: &str = "openai-test-key";
const TOKEN: &str = "openai-test-cluster-token";

/// A queen with an API key, no hive.
async fn queen_only() -> OpenAiCluster {
    OpenAiCluster::queen_only(KEY, TOKEN).await
}

/// A queen and a hive allowed to load the test models; the hive starts workers on demand.
async fn with_hive() -> OpenAiCluster {
    let models = std::iter::once(tiny_model()).chain(model_gen::paths::smollm2_gguf());
    let model_dirs = models
        .map(|model| model.parent().expect("the model's directory").to_path_buf())
        .collect();
    let hive = OpenAiHive {
        hive_id: "hive-openai",
        log_dir: "openai-logs",
        model_dirs,
    };
    OpenAiCluster::with_hive(KEY, TOKEN, hive).await
}

/// What every chunk of one answer repeats.
fn assert_same_envelope(chunks: &[Value], object: &str, model: &str) {
    let id = chunks[0]["id"].as_str().expect("an id");
    for chunk in chunks {
        assert_eq!(chunk["id"], id, "{chunk}");
        assert_eq!(chunk["object"], object, "{chunk}");
        assert_eq!(chunk["model"], model, "{chunk}");
        assert!(
            chunk["created"].as_u64().unwrap() > 1_600_000_000,
            "{chunk}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_and_completions_stream_and_not_in_openai_shapes() {
    let cluster = with_hive().await;
    let model = model_id(&tiny_model());
    let (status, listed) = cluster.get("/v1/models").await;
    assert_eq!(
        (status, &listed),
        (200, &json!({"object": "list", "data": []}))
    );

    // The first request starts a worker through the hive; the answer is a whole chat.
    let (status, answer) = cluster
        .call(
            "/v1/chat/completions",
            &json!({"model": model, "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    assert!(answer["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], model);
    let choice = &answer["choices"][0];
    assert_eq!(answer["choices"].as_array().unwrap().len(), 1);
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    let usage = &answer["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    match choice["finish_reason"].as_str() {
        Some("length") => assert_eq!(completion_tokens, 5),
        Some("stop") => assert!(completion_tokens <= 5),
        other => panic!("finish_reason {other:?}"),
    }

    // Now the worker is ready, the model is listed, and findable by its id (it has slashes).
    let (_, listed) = cluster.get("/v1/models").await;
    assert_eq!(
        listed["data"],
        json!([{"id": model, "object": "model", "created": 0, "owned_by": "rbee"}])
    );
    for path in [
        format!("/v1/models/{model}"),
        format!("/v1/models/%2F{}", &model[1..]),
    ] {
        let (status, one) = cluster.get(&path).await;
        assert_eq!((status, &one["id"]), (200, &json!(model)), "{path}");
    }

    // The same request streamed, with usage: role chunk, content, finish, usage, [DONE].
    let data = cluster
        .stream(
            "/v1/chat/completions",
            &json!({"model": model, "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 5, "temperature": 0, "stream": true,
                    "stream_options": {"include_usage": true}}),
        )
        .await;
    let chunks_ = chunks(&data);
    assert_same_envelope(&chunks_, "chat.completion.chunk", &model);
    let n = chunks_.len();
    assert_eq!(
        chunks_[0]["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])
    );
    let mut streamed = String::new();
    for chunk in &chunks_[1..n - 2] {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["finish_reason"], Value::Null, "{chunk}");
        assert_eq!(chunk["usage"], Value::Null, "{chunk}");
        streamed.push_str(choice["delta"]["content"].as_str().expect("content"));
    }
    assert_eq!(streamed, choice["message"]["content"].as_str().unwrap());
    assert_eq!(
        chunks_[n - 2]["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": choice["finish_reason"]}])
    );
    assert_eq!(chunks_[n - 1]["choices"], json!([]));
    // The same prompt again: the worker's prompt cache held all of it but the last token,
    // which is always evaluated; the first request found nothing cached.
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens_details"], json!({"cached_tokens": 0}));
    let mut again = usage.clone();
    again["prompt_tokens_details"]["cached_tokens"] = json!(prompt_tokens - 1);
    assert_eq!(chunks_[n - 1]["usage"], again);

    // Completions: text, no role chunk, no usage chunk unless asked for.
    let request = json!({"model": model, "prompt": "once upon", "max_tokens": 4, "temperature": 0});
    let (status, whole) = cluster.call("/v1/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    assert!(
        whole["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(),
        "{whole}"
    );
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let data = cluster.stream("/v1/completions", &streaming).await;
    let pieces = chunks(&data);
    assert_same_envelope(&pieces, "text_completion", &model);
    let last = pieces.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(last["choices"][0]["text"], "");
    assert!(pieces.iter().all(|p| p.get("usage").is_none()));
    let streamed: String = pieces
        .iter()
        .map(|p| p["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
}

/// Log-probabilities through real binaries: chat and completions, whole and streamed, in
/// OpenAI's shapes, the same numbers either way, greedy picking the most likely token.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_come_in_openais_shapes_streamed_and_not() {
    let cluster = with_hive().await;
    let model = model_id(&tiny_model());
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "hello"}],
                      "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (status, answer) = cluster.call("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .clone();
    let tokens = answer["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    // Every token but an end-of-sequence token that ended the answer.
    assert!(
        content.len() == tokens || content.len() + 1 == tokens,
        "{answer}"
    );
    for t in &content {
        let token = t["token"].as_str().unwrap();
        // The token's own bytes: its text when they are whole characters (a SentencePiece
        // word's leading space, which decoding the token alone drops, aside); a byte of a
        // multi-byte character alone, whose text is then U+FFFD.
        let bytes: Vec<u8> = serde_json::from_value(t["bytes"].clone()).unwrap();
        match String::from_utf8(bytes) {
            Ok(text) => assert_eq!(text.trim_start(), token.trim_start(), "{t}"),
            Err(_) => assert_eq!(token, "\u{fffd}", "{t}"),
        }
        let logprob = t["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(
            top[0]["token"], t["token"],
            "greedy takes the most likely: {t}"
        );
        assert_eq!(top[0]["logprob"], t["logprob"]);
        let lps: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{t}");
        assert!(
            lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-6,
            "{t}"
        );
    }
    let mut streamed_chat = chat.clone();
    streamed_chat["stream"] = json!(true);
    let data = cluster.stream("/v1/chat/completions", &streamed_chat).await;
    let streamed: Vec<Value> = chunks(&data)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content, "{data:?}");

    let text = json!({"model": model, "prompt": "hello", "max_tokens": 6, "temperature": 0,
                      "logprobs": 2});
    let (status, answer) = cluster.call("/v1/completions", &text).await;
    assert_eq!(status, 200, "{answer}");
    let lp = &answer["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().unwrap().len();
    assert!(n > 0, "{answer}");
    for list in ["token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[list].as_array().unwrap().len(), n, "{list}: {answer}");
    }
    assert!(
        lp["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d.as_object().is_some_and(|d| !d.is_empty() && d.len() <= 2)),
        "{answer}"
    );
    let mut streamed_text = text.clone();
    streamed_text["stream"] = json!(true);
    let data = cluster.stream("/v1/completions", &streamed_text).await;
    let streamed: Vec<Value> = chunks(&data)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&Value::from(streamed), &lp["tokens"], "{data:?}");

    let (status, refused) = cluster
        .call(
            "/v1/completions",
            &json!({"model": model, "prompt": "hello", "logprobs": 6}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "logprobs");
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_answers_and_stops_at_a_stop_sequence() {
    let cluster = with_hive().await;
    let model = model_id(&smollm2());
    let prompt = "The capital of France is";
    let (status, whole) = cluster
        .call(
            "/v1/completions",
            &json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{whole}\n{}", cluster.logs());
    let text = whole["choices"][0]["text"].as_str().unwrap();
    let at = text.find("Paris").unwrap_or_else(|| panic!("{whole}"));

    let (status, stopped) = cluster
        .call(
            "/v1/completions",
            &json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "stop": "Paris"}),
        )
        .await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["choices"][0]["text"], &text[..at], "{stopped}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    let (status, chat) = cluster
        .call(
            "/v1/chat/completions",
            &json!({"model": model, "max_completion_tokens": 24, "temperature": 0,
                    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": [{"type": "text", "text": "Name the capital of France."}]}]}),
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    let content = chat["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{chat}");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_openai_error_objects_with_the_right_status() {
    let cluster = queen_only().await;
    let chat = cluster.url("/v1/chat/completions");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});

    // 401: no key, a wrong key, and the cluster token (which is for daemons, not clients).
    for bearer in [None, Some("wrong"), Some(TOKEN)] {
        for request in [
            cluster.http.post(&chat).json(&body),
            cluster.http.get(cluster.url("/v1/models")),
        ] {
            let request = match bearer {
                Some(key) => request.bearer_auth(key),
                None => request,
            };
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{bearer:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
            assert_eq!(error["error"]["type"], "authentication_error");
            assert!(error["error"]["message"].is_string());
            assert!(error["error"].get("param").is_some());
        }
    }

    // 400: the body, every bad value and every unsupported parameter is named.
    let raw = cluster
        .http
        .post(&chat)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let error: Value = raw.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    for (key, value, param) in [
        ("temperature", json!("hot"), "temperature"),
        ("temperature", json!(5), "temperature"),
        ("n", json!(9), "n"),
        ("top_logprobs", json!(2), "top_logprobs"),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "not a name"}}]),
            "tools[0].function.name",
        ),
        (
            "response_format",
            json!({"type": "yaml"}),
            "response_format.type",
        ),
        ("logit_bias", json!({"1": 5}), "logit_bias"),
        ("stop", json!(vec!["a"; 17]), "stop"),
        ("messages", json!([]), "messages"),
        (
            "messages",
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "messages[0].content[0].type",
        ),
        ("frobnicate", json!(1), "frobnicate"),
    ] {
        let mut request = body.clone();
        request[key] = value.clone();
        let (status, error) = cluster.call("/v1/chat/completions", &request).await;
        assert_eq!(status, 400, "{key}={value}: {error}");
        assert_eq!(error["error"]["param"], param, "{key}={value}: {error}");
        assert_eq!(error["error"]["code"], "bad_request");
    }
    let (status, error) = cluster
        .call(
            "/v1/completions",
            &json!({"model": "m", "prompt": ["a", "b"]}),
        )
        .await;
    assert_eq!((status, &error["error"]["param"]), (400, &json!("prompt")));

    // 404: a model no worker or hive knows, for the lists and for completions.
    let (status, error) = cluster.get("/v1/models/gpt-4").await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "model_not_found");
    let mut unknown = body.clone();
    unknown["model"] = json!("gpt-4");
    let (status, error) = cluster.call("/v1/chat/completions", &unknown).await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(
        (&error["error"]["code"], &error["error"]["param"]),
        (&json!("model_not_found"), &json!("model"))
    );

    // 403: a path the cluster does not have, for a key that is not an admin key.
    let mut path = body.clone();
    path["model"] = json!("/models/somewhere.gguf");
    let (status, error) = cluster.call("/v1/chat/completions", &path).await;
    assert_eq!(status, 403, "{error}");
    assert_eq!(error["error"]["type"], "permission_error", "{error}");

    // 503 with Retry-After: a hub model could be fetched (no admin keys, so any key may have
    // one downloaded), but no hive is there to do it.
    let mut nowhere = body.clone();
    nowhere["model"] = json!("hf:org/repo");
    let response = cluster.post("/v1/chat/completions", &nowhere).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "no_capacity", "{error}");
    assert_eq!(error["error"]["type"], "server_error");

    // A wrong method is refused in the same shape.
    let response = cluster
        .http
        .get(&chat)
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");

    // The queen is still healthy and the job API still answers in rbee's own shape.
    let response = cluster
        .http
        .post(cluster.url("/v1/jobs"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unauthorized");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_fails_after_it_started_ends_with_an_error_chunk() {
    let cluster = queen_only().await;
    let _dying = cluster
        .scripted_worker(
            "dying",
            512,
            Script {
                events: vec![
                    JobEvent::Started { prompt_tokens: 3 },
                    JobEvent::Token {
                        text: "Hel".into(),
                        token_id: 7,
                        index: 0,
                        logprobs: None,
                    },
                ],
                complete: false,
            },
        )
        .await;
    let request = json!({"model": "dying", "messages": [{"role": "user", "content": "hi"}],
                         "stream": true});
    let data = cluster.stream("/v1/chat/completions", &request).await;
    assert_eq!(data.len(), 4, "{data:?}");
    let role: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    let content: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(content["choices"][0]["delta"]["content"], "Hel");
    let error: Value = serde_json::from_str(&data[2]).unwrap();
    assert_eq!(error["error"]["code"], "worker_lost", "{error}");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(data[3], "[DONE]");

    // Not streaming, the same failure is a 502.
    let mut whole = request.clone();
    whole["stream"] = json!(false);
    let (status, error) = cluster.call("/v1/chat/completions", &whole).await;
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["error"]["code"], "worker_lost");

    // A saturated worker: 429 with Retry-After, before any stream starts.
    let _busy = cluster
        .scripted_worker(
            "busy",
            512,
            Script {
                events: vec![JobEvent::error(
                    rbee_contract::ErrorCode::Busy,
                    "every slot is taken",
                )],
                complete: true,
            },
        )
        .await;
    let response = cluster
        .post(
            "/v1/completions",
            &json!({"model": "busy", "prompt": "x", "stream": true}),
        )
        .await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "busy", "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_cancels_the_generation() {
    let cluster = with_hive().await;
    let model = model_id(&smollm2());
    let request = json!({"model": model, "stream": true, "max_tokens": 1500, "temperature": 0,
                         "prompt": "Count from one to one thousand: one, two, three,"});
    let response = cluster.post("/v1/completions", &request).await;
    assert_eq!(response.status(), 200, "{}", cluster.logs());
    let job_id = response.headers()["x-rbee-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = response.bytes_stream();
    let mut received = String::new();
    while received.matches("\"text\":").count() < 3 {
        received.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    let busy_worker = async || -> Option<WorkerInfo> {
        let (_, list) = cluster.get("/v1/workers").await;
        serde_json::from_value::<Vec<WorkerInfo>>(list["workers"].clone())
            .ok()?
            .into_iter()
            .next()
    };
    drop(body);

    // The queen's job ended `cancelled`, and the worker's slot frees long before 1500 tokens.
    let stream = JobApi::new(&cluster.queen.url, Some(KEY))
        .open_stream(&rbee_contract::JobCreated {
            sse_url: rbee_contract::job_stream_path(&job_id),
            job_id: job_id.clone(),
        })
        .await;
    let stream = read_raw_stream(stream).await.unwrap();
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Error { code, .. }) if *code == rbee_contract::ErrorCode::Cancelled),
        "{:?}",
        stream.events
    );
    eventually(
        "the worker's slot is free again",
        Duration::from_secs(30),
        async || {
            let worker = busy_worker().await?;
            (worker.slots_free == worker.slots_total).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_python_client_works_against_the_queen() {
    let cluster = with_hive().await;
    let model = model_id(&smollm2());
    // Start the worker first, so that the script's model list has the model in it.
    let (status, warm) = cluster
        .call(
            "/v1/completions",
            &json!({"model": model, "prompt": "Hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200, "{warm}\n{}", cluster.logs());
    let base_url = cluster.url("/v1");
    let run = run_openai_script(
        "openai_client.py",
        &[base_url.as_str(), KEY, model.as_str()],
    )
    .await;
    assert!(run.passed(), "{run}\n{}", cluster.logs());
}
