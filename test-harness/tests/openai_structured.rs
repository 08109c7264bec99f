//! Structured output end to end through a real queen, hive and worker: `response_format` on
//! the job API's `infer` and on the OpenAI routes gives JSON that parses and validates, from a
//! generated model whose random weights write garbage unconstrained, four requests with four
//! schemas at once on a worker with four slots (none waits for another's slot); a schema that
//! does not compile is a 400 naming the problem before any job; and the official `openai`
//! Python package's `parse` with a Pydantic model, streaming, `json_object`, completions and
//! the 400, against SmolLM2.

use rbee_contract::{FinishReason, JobEvent};
use serde_json::{Value, json};
use test_harness::{TestCluster, read_raw_stream, run_openai_script, smollm2, tiny_model};

/// A person: every field bounded, so that a model of random weights, which never chooses to
/// close a string, still finishes the object.
fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "member", "color"],
        "additionalProperties": false,
    })
}

fn schemas() -> Vec<Value> {
    vec![
        person(),
        json!({"type": "object",
               "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                              "ok": {"type": "boolean"}},
               "required": ["x", "ok"], "additionalProperties": false}),
        json!({"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}),
        json!({"type": "object",
               "properties": {"answer": {"enum": ["yes", "no"]},
                              "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                       "maxItems": 2}},
               "required": ["answer", "tags"], "additionalProperties": false}),
    ]
}

/// Whether `value` is valid against `schema`, for the keywords the schemas above use.
fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options
            .contains(value)
            .then_some(())
            .ok_or(format!("{value} is not one of {options:?}"));
    }
    let count = |key: &str, default: u64| schema[key].as_u64().unwrap_or(default);
    match schema["type"].as_str().unwrap_or_default() {
        "object" => {
            let object = value
                .as_object()
                .ok_or(format!("{value} is not an object"))?;
            for key in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(key.as_str().unwrap()) {
                    return Err(format!("{value} lacks {key}"));
                }
            }
            for (key, v) in object {
                let property = schema["properties"]
                    .get(key)
                    .ok_or(format!("{value} has the extra key {key}"))?;
                validate(property, v)?;
            }
        }
        "array" => {
            let items = value.as_array().ok_or(format!("{value} is not an array"))?;
            let n = items.len() as u64;
            if n < count("minItems", 0) || n > count("maxItems", u64::MAX) {
                return Err(format!("{value} has {n} items"));
            }
            for item in items {
                validate(&schema["items"], item)?;
            }
        }
        "string" => {
            let s = value.as_str().ok_or(format!("{value} is not a string"))?;
            let n = s.chars().count() as u64;
            if n < count("minLength", 0) || n > count("maxLength", u64::MAX) {
                return Err(format!("{value} has {n} characters"));
            }
        }
        "integer" => {
            let n = value.as_i64().ok_or(format!("{value} is not an integer"))?;
            let (min, max) = (schema["minimum"].as_i64(), schema["maximum"].as_i64());
            if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
                return Err(format!("{value} is out of range"));
            }
        }
        "boolean" if !value.is_boolean() => return Err(format!("{value} is not a boolean")),
        _ => {}
    }
    Ok(())
}

fn parses_and_validates(schema: &Value, text: &str) {
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
    if let Err(e) = validate(schema, &value) {
        panic!("{text:?} does not validate: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_with_a_json_schema_gives_valid_json_from_a_random_model() {
    let cluster = TestCluster::start(&tiny_model(), &[]).await;
    let jobs = cluster.jobs();
    let infer = |format: Option<Value>, seed: u64| {
        let mut body = json!({"operation": "infer", "model": cluster.model,
            "prompt": "Describe a person:", "max_tokens": 120, "temperature": 1.0, "seed": seed});
        if let Some(format) = format {
            body["response_format"] = format;
        }
        body
    };
    for seed in [1, 2] {
        // Unconstrained, the random weights write no JSON: the format is what makes it parse.
        let free = jobs.run("/v1/jobs", &infer(None, seed)).await;
        assert!(
            serde_json::from_str::<Value>(&free.text()).is_err(),
            "{:?}",
            free.text()
        );
        let format = json!({"type": "json_schema", "schema": person()});
        let constrained = jobs.run("/v1/jobs", &infer(Some(format), seed)).await;
        constrained.assert_one_terminal_then_done("queen");
        assert!(
            matches!(
                constrained.terminal(),
                Some(JobEvent::Done {
                    finish_reason: FinishReason::Stop,
                    ..
                })
            ),
            "{:?}",
            constrained.events
        );
        parses_and_validates(&person(), &constrained.text());
    }

    // A schema that does not compile is refused before any job exists.
    let refused = jobs
        .submit(
            "/v1/jobs",
            &infer(
                Some(json!({"type": "json_schema", "schema": {"type": "object",
                    "properties": {"a": {"$ref": "#/$defs/Missing"}}}})),
                1,
            ),
        )
        .await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("response_format") && message.contains("Missing"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn four_openai_requests_with_four_schemas_at_once_each_validate() {
    // Four slots: the four requests run side by side in the worker's batch, each slot with
    // its own schema's constraint, rather than one after another.
    let cluster = TestCluster::start_with(&tiny_model(), &[], &["--worker-slots", "4"]).await;
    assert_eq!(cluster.worker.slots_total, 4, "{:?}", cluster.worker);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", cluster.queen.url);
    let requests = schemas().into_iter().enumerate().map(|(i, schema)| {
        let body = json!({
            "model": cluster.model,
            "messages": [{"role": "user", "content": format!("Request {i}")}],
            "max_tokens": 150,
            "temperature": 1.0,
            "seed": i,
            "response_format": {"type": "json_schema",
                "json_schema": {"name": format!("S{i}"), "schema": schema, "strict": true}},
        });
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http.post(&url).json(&body).send().await.expect("POST");
            let status = response.status().as_u16();
            let job_id = response
                .headers()
                .get("x-rbee-job-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (
                schema,
                status,
                job_id,
                response.json::<Value>().await.expect("JSON"),
            )
        }
    });
    for (i, (schema, status, job_id, answer)) in futures::future::join_all(requests)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
        parses_and_validates(
            &schema,
            answer["choices"][0]["message"]["content"].as_str().unwrap(),
        );
        // The job's events, read again from the queen: it went to a free slot at once, never
        // waiting in line for another request's slot (with one slot, three of them would).
        let job_id = job_id.expect("the answer names its job");
        let events = http
            .get(format!("{}/v1/jobs/{job_id}/stream", cluster.queen.url))
            .send()
            .await
            .expect("GET the job's stream");
        let events = read_raw_stream(events).await.expect("the job's events");
        events.assert_one_terminal_then_done("queen");
        assert_eq!(
            events.token_ids().len() as u64,
            answer["usage"]["completion_tokens"].as_u64().unwrap(),
            "request {i}: the job's events are all there: {:?}",
            events.events
        );
        assert!(
            !events.queued(),
            "request {i} waited in line with four slots: {:?}",
            events.events
        );
    }

    // OpenAI's shape of the refusal: an error object naming the problem.
    let refused = http
        .post(&url)
        .json(
            &json!({"model": cluster.model, "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "Bad", "schema": {"type": "strin"}}}}),
        )
        .send()
        .await
        .expect("POST");
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("strin"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_parses_answers_into_pydantic_models() {
    let cluster = TestCluster::start(&smollm2(), &[]).await;
    let base_url = format!("{}/v1", cluster.queen.url);
    let run = run_openai_script(
        "openai_structured.py",
        &[base_url.as_str(), "no-key", cluster.model.as_str()],
    )
    .await;
    assert!(run.passed(), "{run}\nworker log:\n{}", cluster.worker_log());
}
