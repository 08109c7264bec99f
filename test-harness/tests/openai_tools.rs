//! Tool calls through the queen's OpenAI API, as clients see them.
//!
//! Each model family writes calls in its own syntax; a scripted worker sends each family's
//! text token by token and the answers must come back as OpenAI's `message.tool_calls` and
//! streamed `delta.tool_calls` (the markup never as content), with the tools and the
//! conversation's calls passed on to the worker in the `infer` operation. Then the official
//! `openai` Python package drives SmolLM2 on a real hive: a call, its result sent back, the
//! final answer; a streamed call assembled from deltas; refusals as 400s. `tool_choice`
//! required or named constrains the small model's answer to a valid call.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{FinishReason, JobEvent, WorkerHeartbeat, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    Daemon, Script, ScriptedUpstream, eventually, free_port, process_gone, run_openai_script,
    scratch_dir, smollm2,
};

const KEY: &str = "openai-tools-key";
const TOKEN: &str = "openai-tools-cluster-token";
struct Cluster {
    queen: Daemon,
    hive: Option<Daemon>,
    http: reqwest::Client,
}

impl Cluster {
    async fn queen_only() -> Cluster {
        let queen = Daemon::queen(
            &["--heartbeat-interval", "100ms", "--spawn-timeout", "120s"],
            &[("RBEE_CLUSTER_TOKEN", TOKEN), ("RBEE_API_KEYS", KEY)],
        )
        .await;
        Cluster {
            queen,
            hive: None,
            http: reqwest::Client::new(),
        }
    }

    /// A queen and a hive allowed to load SmolLM2; the hive starts its worker on demand.
    async fn with_hive() -> Cluster {
        let mut cluster = Cluster::queen_only().await;
        let port = free_port();
        let first_worker_port = free_port().min(65_000);
        let smollm2_dir = smollm2().parent().expect("a directory").to_path_buf();
        let args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--queen-url".into(),
            cluster.queen.url.clone(),
            "--hive-id".into(),
            "hive-tools".into(),
            "--heartbeat-interval".into(),
            "100ms".into(),
            "--log-dir".into(),
            scratch_dir("openai-tools-logs").display().to_string(),
            "--worker-port-range".into(),
            format!("{first_worker_port}-{}", first_worker_port + 30),
            "--stop-grace".into(),
            "2s".into(),
            "--allow-model-dir".into(),
            smollm2_dir.display().to_string(),
        ];
        let hive = Daemon::start(
            "rbee-hive",
            &args,
            &[("RBEE_CLUSTER_TOKEN", TOKEN)],
            format!("http://127.0.0.1:{port}"),
        )
        .expect("start hive");
        cluster.hive = Some(hive);
        eventually("the hive registers", Duration::from_secs(30), async || {
            let hives = cluster.get("/v1/hives").await.1;
            (hives["hives"].as_array()?.len() == 1).then_some(())
        })
        .await;
        cluster
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.queen.url)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    async fn call(&self, body: &Value) -> (u16, Value) {
        let response = self.post("/v1/chat/completions", body).await;
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\n{}", self.logs()));
        (status, json)
    }

    /// The chunks of a streamed answer, parsed; `[DONE]` must end it.
    async fn stream(&self, body: &Value) -> Vec<Value> {
        let response = self.post("/v1/chat/completions", body).await;
        assert_eq!(response.status(), 200, "{}", self.logs());
        let mut text = String::new();
        let mut bytes = response.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            text.push_str(std::str::from_utf8(&chunk.expect("a chunk")).expect("UTF-8"));
        }
        let data: Vec<&str> = text
            .split("\n\n")
            .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
            .collect()
    }

    /// Registers a scripted stand-in as the only worker for `model`.
    async fn scripted_worker(&self, model: &str, script: Script) -> ScriptedUpstream {
        let worker = ScriptedUpstream::start(script).await;
        let beat = json!(WorkerHeartbeat {
            worker: WorkerInfo {
                worker_id: format!("w-{model}"),
                url: worker.url.clone(),
                model: model.into(),
                device: "cpu".into(),
                state: WorkerState::Ready,
                slots_total: 1,
                slots_free: 1,
                hive_id: None,
                context_length: Some(4096),
            },
            cached_prefixes: Vec::new(),
        });
        let response = self
            .http
            .post(self.url("/v1/worker-heartbeat"))
            .bearer_auth(TOKEN)
            .json(&beat)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
        worker
    }

    fn logs(&self) -> String {
        let mut logs = format!("queen log:\n{}", self.queen.log_text());
        if let Some(hive) = &self.hive {
            logs.push_str(&format!("\nhive log:\n{}", hive.log_text()));
        }
        logs
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGTERM lets the hive stop the workers it started; a killed hive would leave them.
        if let Some(hive) = &self.hive
            && hive.signal("TERM").is_ok()
        {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !process_gone(hive.pid()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
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
    let cluster = Cluster::queen_only().await;
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
        let worker = cluster.scripted_worker(model, answer(pieces)).await;
        let request = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
            "tools": tools(),
        });
        let (status, body) = cluster.call(&request).await;
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
        let chunks = cluster.stream(&streaming).await;
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
        .scripted_worker("hermes", answer(families[0].1))
        .await;
    let _llama = cluster
        .scripted_worker("llama", answer(families[2].1))
        .await;
    let (_, one) = cluster
        .call(&json!({
            "model": "hermes", "messages": [{"role": "user", "content": "hi"}],
            "tools": tools(), "parallel_tool_calls": false,
        }))
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
        .call(&json!({
            "model": "llama", "messages": [{"role": "user", "content": "hi"}],
            "tools": tools(), "tool_choice": "none",
        }))
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
    let cluster = Cluster::queen_only().await;
    let worker = cluster
        .scripted_worker("hermes", answer(&["It is 18 C in Paris."]))
        .await;
    let (status, body) = cluster
        .call(&json!({
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
        }))
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
        let (status, error) = cluster.call(&request).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
}

fn model_id(path: &Path) -> String {
    path.canonicalize()
        .expect("canonical model path")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_calls_tools_on_smollm2() {
    let cluster = Cluster::with_hive().await;
    let model = model_id(&smollm2());
    let base_url = cluster.url("/v1");
    let run = run_openai_script("openai_tools.py", &[base_url.as_str(), KEY, model.as_str()]).await;
    assert!(run.passed(), "{run}\n{}", cluster.logs());
}
