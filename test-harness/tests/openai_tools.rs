//! Tool calls through the queen's OpenAI API, as clients see them.
//!
//! Each model family writes calls in its own syntax; a scripted worker sends each family's
//! text token by token and the answers must come back as OpenAI's `message.tool_calls` and
//! streamed `delta.tool_calls` (the markup never as content), with the tools and the
//! conversation's calls passed on to the worker in the `infer` operation. Then the official
//! `openai` Python package drives SmolLM2 on a real hive: a call, its result sent back, the
//! final answer; a streamed call assembled from deltas; refusals as 400s. `tool_choice`
//! required or named constrains the small model's answer to a valid call.

use rbee_contract::{FinishReason, JobEvent};
use serde_json::{Value, json};
use test_harness::{
    OpenAiCluster, OpenAiHive, Script, chunks, model_id, run_openai_script, smollm2,
};

const KEY: &str = "openai-tools-key";
const TOKEN: &str = "openai-tools-cluster-token";
const CHAT: &str = "/v1/chat/completions";

/// A queen with an API key, no hive.
async fn queen_only() -> OpenAiCluster {
    OpenAiCluster::queen_only(KEY, TOKEN).await
}

/// A queen and a hive allowed to load SmolLM2; the hive starts its worker on demand.
async fn with_hive() -> OpenAiCluster {
    let hive = OpenAiHive {
        hive_id: "hive-tools",
        log_dir: "openai-tools-logs",
        model_dirs: vec![smollm2().parent().expect("a directory").to_path_buf()],
    };
    OpenAiCluster::with_hive(KEY, TOKEN, hive).await
}

/// A worker's events for an answer whose text is `pieces`, one token each.
fn answer(pieces: &[&str]) -> Script {
    let mut events = vec![JobEvent::Started { prompt_tokens: 12 }];
    for (index, piece) in pieces.iter().enumerate() {
        events.push(JobEvent::Token {
            text: (*piece).into(),
            token_id: 100 + index as u32,
            index: index as u32,
            logprobs: None,
        });
    }
    events.push(JobEvent::Done {
        finish_reason: FinishReason::Stop,
        usage: None,
    });
    Script {
        events,
        complete: true,
    }
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}
        }}
    ])
}

/// The calls of a streamed answer assembled from its deltas: (id, name, arguments), the
/// streamed content, and the finish reason. Each call's first delta must carry its id, type
/// and name.
fn assemble(chunks: &[Value]) -> (Vec<(String, String, String)>, String, String) {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut content = String::new();
    let mut finish = String::new();
    for chunk in chunks {
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str() {
            content.push_str(text);
        }
        for delta in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = delta["index"].as_u64().expect("an index") as usize;
            if index == calls.len() {
                assert_eq!(delta["type"], "function", "{delta}");
                calls.push((
                    delta["id"]
                        .as_str()
                        .expect("the first delta has the id")
                        .into(),
                    delta["function"]["name"]
                        .as_str()
                        .expect("and the name")
                        .into(),
                    String::new(),
                ));
            } else {
                assert!(delta.get("id").is_none(), "the id comes once: {delta}");
            }
            calls[index].2 += delta["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.into();
        }
    }
    (calls, content, finish)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_familys_calls_come_back_as_tool_calls_streamed_and_not() {
    let cluster = queen_only().await;
    // (model, the text as the worker sends it, the content a client must see)
    let families: [(&str, &[&str], &str); 3] = [
        (
            "hermes",
            &[
                "Let me look",
                " that up.\n<tool",
                "_call>\n{\"name\": \"get_weather\", \"argu",
                "ments\": {\"city\": \"Pa",
                "ris\"}}\n</tool_call>\n<tool_call>\n{\"name\": ",
                "\"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>",
            ],
            "Let me look that up.\n",
        ),
        (
            // Mistral's `[TOOL_CALLS]` is a control token the worker leaves out of the text.
            "mistral",
            &[
                "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, ",
                "\"id\": \"a1B2c3D4e\"}, {\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}]",
            ],
            "",
        ),
        (
            "llama",
            &[
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
                "; {\"name\": \"get_time\", \"parameters\": {\"zone\": \"CET\"}}",
            ],
            "",
        ),
    ];
    for (model, pieces, content) in families {
        let worker = cluster.scripted_worker(model, 4096, answer(pieces)).await;
        let request = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
            "tools": tools(),
        });
        let (status, body) = cluster.call(CHAT, &request).await;
        assert_eq!(status, 200, "{body}\n{}", cluster.logs());
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{model}: {body}");
        let message = &choice["message"];
        if content.is_empty() {
            assert_eq!(message["content"], Value::Null, "{model}: {body}");
        } else {
            assert_eq!(message["content"], content, "{model}: {body}");
        }
        let calls = message["tool_calls"].as_array().expect("tool_calls");
        assert_eq!(calls.len(), 2, "{model}: {body}");
        for (call, (name, arguments)) in calls.iter().zip([
            ("get_weather", json!({"city": "Paris"})),
            ("get_time", json!({"zone": "CET"})),
        ]) {
            assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], name);
            let parsed: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(parsed, arguments, "{model}: {call}");
        }
        assert_ne!(calls[0]["id"], calls[1]["id"]);

        let mut streaming = request.clone();
        streaming["stream"] = json!(true);
        let chunks = chunks(&cluster.stream(CHAT, &streaming).await);
        let (streamed, streamed_content, finish) = assemble(&chunks);
        assert_eq!(finish, "tool_calls", "{model}: {chunks:?}");
        assert_eq!(streamed_content, content, "{model}: {chunks:?}");
        if model == "hermes" {
            // A call whose arguments are still being generated streams them in pieces.
            let pieces = chunks
                .iter()
                .filter(|c| {
                    let call = &c["choices"][0]["delta"]["tool_calls"][0];
                    call["index"] == 0
                        && call["function"]["arguments"]
                            .as_str()
                            .is_some_and(|a| !a.is_empty())
                })
                .count();
            assert!(pieces >= 2, "{chunks:?}");
        }
        let names: Vec<&str> = streamed.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(names, ["get_weather", "get_time"], "{model}");
        let arguments: Vec<Value> = streamed
            .iter()
            .map(|c| serde_json::from_str(&c.2).unwrap())
            .collect();
        assert_eq!(
            arguments,
            [json!({"city": "Paris"}), json!({"zone": "CET"})],
            "{model}"
        );

        // The worker was offered the tools in the contract's shape.
        let infer = worker.requests_to("POST", "/v1/inference");
        let sent = infer.last().and_then(|r| r.body.clone()).expect("a job");
        assert_eq!(sent["tools"][0]["name"], "get_weather", "{sent}");
        assert_eq!(
            sent["tools"][0]["parameters"]["required"],
            json!(["city"]),
            "{sent}"
        );
        assert!(
            sent.get("response_format").is_none(),
            "auto is free: {sent}"
        );
    }

    // `parallel_tool_calls: false` reports the first call only; `tool_choice: none` offers
    // no tools and reads nothing, so the same text is content. (Fresh workers: a scripted
    // one beats once, and the queen forgets it after a while.)
    let _hermes = cluster
        .scripted_worker("hermes", 4096, answer(families[0].1))
        .await;
    let _llama = cluster
        .scripted_worker("llama", 4096, answer(families[2].1))
        .await;
    let (_, one) = cluster
        .call(
            CHAT,
            &json!({
                "model": "hermes", "messages": [{"role": "user", "content": "hi"}],
                "tools": tools(), "parallel_tool_calls": false,
            }),
        )
        .await;
    assert_eq!(
        one["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{one}"
    );
    let (_, none) = cluster
        .call(
            CHAT,
            &json!({
                "model": "llama", "messages": [{"role": "user", "content": "hi"}],
                "tools": tools(), "tool_choice": "none",
            }),
        )
        .await;
    assert_eq!(none["choices"][0]["finish_reason"], "stop", "{none}");
    assert!(
        none["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("{\"name\": \"get_weather\""),
        "{none}"
    );
    assert!(none["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_with_calls_and_results_reaches_the_worker() {
    let cluster = queen_only().await;
    let worker = cluster
        .scripted_worker("hermes", 4096, answer(&["It is 18 C in Paris."]))
        .await;
    let (status, body) = cluster
        .call(
            CHAT,
            &json!({
                "model": "hermes",
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_7", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "call_7", "content": "18 C"},
                ],
                "tools": tools(),
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "It is 18 C in Paris."
    );
    let sent = worker.requests_to("POST", "/v1/inference")[0]
        .body
        .clone()
        .unwrap();
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
        ]}),
        "{sent}"
    );
    assert_eq!(
        sent["messages"][2],
        json!({"role": "tool", "content": "18 C", "tool_call_id": "call_7"}),
        "{sent}"
    );

    // Refusals name the parameter.
    for (request, param) in [
        (
            json!({"model": "hermes", "messages": [{"role": "user", "content": "hi"}],
                   "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}),
            "tool_choice",
        ),
        (
            json!({"model": "hermes", "messages": [{"role": "user", "content": "hi"},
                   {"role": "tool", "content": "18 C"}]}),
            "messages[1].tool_call_id",
        ),
        (
            json!({"model": "hermes", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
            "tools[0].function.parameters",
        ),
    ] {
        let (status, error) = cluster.call(CHAT, &request).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_calls_tools_on_smollm2() {
    let cluster = with_hive().await;
    let model = model_id(&smollm2());
    let base_url = cluster.url("/v1");
    let run = run_openai_script("openai_tools.py", &[base_url.as_str(), KEY, model.as_str()]).await;
    assert!(run.passed(), "{run}\n{}", cluster.logs());
}
