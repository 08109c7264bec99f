//! Structured output through the engine's public API: a generation constrained to a JSON
//! Schema yields JSON that parses and validates, from a generated model whose random weights
//! produce garbage unconstrained, sampled, batched four slots with four schemas, after a prefix
//! the prompt cache reused, and from SmolLM2 (a byte-level vocabulary, where the generated
//! models have a byte-fallback one). A budget that runs out first ends with `Length`; a schema
//! that does not compile is refused when the request is prepared.

// Each test file uses part of what the engine's tests share.
#[allow(dead_code)]
mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;

use common::{alone, generated, load};
use model_gen::{GgufType, ModelFormat};
use rbee_engine::{
    Completion, Engine, EngineError, FinishReason, GenerationParams, OutputFormat, PreparedRequest,
    Prompt, PromptCacheOptions, Sequence,
};
use serde_json::{Value, json};

/// A person: every field bounded (short strings, a number range, an enum, a short list), so a
/// model of random weights, which never chooses to close a string, still finishes.
fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "member": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        },
        "required": ["name", "age", "member", "color", "tags"],
        "additionalProperties": false,
    })
}

fn point() -> Value {
    json!({
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"],
        "additionalProperties": false,
    })
}

fn choice() -> Value {
    json!({
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["answer", "confidence"],
        "additionalProperties": false,
    })
}

fn list() -> Value {
    json!({
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 2,
        "maxItems": 4,
    })
}

/// Whether `value` is valid against `schema`, for the keywords the schemas above use; the
/// reason when not.
fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options
            .contains(value)
            .then_some(())
            .ok_or(format!("{value} is not one of {options:?}"));
    }
    let ty = schema["type"].as_str().unwrap_or_default();
    let bad = |what: &str| Err(format!("{value} is not {what}"));
    match ty {
        "object" => {
            let Some(object) = value.as_object() else {
                return bad("an object");
            };
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for required in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(required.as_str().unwrap()) {
                    return Err(format!("{value} lacks {required}"));
                }
            }
            for (key, v) in object {
                match properties.get(key) {
                    Some(s) => validate(s, v)?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{value} has the extra key {key}"));
                    }
                    None => {}
                }
            }
        }
        "array" => {
            let Some(items) = value.as_array() else {
                return bad("an array");
            };
            let min = schema["minItems"].as_u64().unwrap_or(0) as usize;
            let max = schema["maxItems"].as_u64().unwrap_or(u64::MAX) as usize;
            if !(min..=max).contains(&items.len()) {
                return Err(format!("{value} has {} items", items.len()));
            }
            for item in items {
                validate(&schema["items"], item)?;
            }
        }
        "string" => {
            let Some(s) = value.as_str() else {
                return bad("a string");
            };
            let n = s.chars().count() as u64;
            let min = schema["minLength"].as_u64().unwrap_or(0);
            let max = schema["maxLength"].as_u64().unwrap_or(u64::MAX);
            if !(min..=max).contains(&n) {
                return Err(format!("{value} has {n} characters"));
            }
        }
        "integer" | "number" => {
            let ok = if ty == "integer" {
                value.is_i64() || value.is_u64()
            } else {
                value.is_number()
            };
            if !ok {
                return bad(ty);
            }
            let n = value.as_f64().unwrap();
            let min = schema["minimum"].as_f64().unwrap_or(f64::MIN);
            let max = schema["maximum"].as_f64().unwrap_or(f64::MAX);
            if !(min..=max).contains(&n) {
                return Err(format!("{value} is out of [{min}, {max}]"));
            }
        }
        "boolean" if !value.is_boolean() => return bad("a boolean"),
        _ => {}
    }
    Ok(())
}

fn params(format: Option<OutputFormat>, seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens: Some(200),
        temperature: 1.0,
        top_k: None,
        top_p: None,
        min_p: None,
        seed,
        response_format: format,
        ..Default::default()
    }
}

fn generate(engine: &mut Engine, req: &PreparedRequest) -> anyhow::Result<Completion> {
    alone(engine, req).map(|(_, completion)| completion)
}

/// The small generated model, Q4_0.
fn small() -> anyhow::Result<PathBuf> {
    generated(ModelFormat::Gguf(GgufType::Q4_0))
}

fn parsed(completion: &Completion) -> Value {
    serde_json::from_str(&completion.text)
        .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", completion.text))
}

#[test]
fn a_schema_constrained_generation_parses_and_validates() -> anyhow::Result<()> {
    let mut engine = load(&small()?, 1)?;
    let prompt = || Prompt::Text("Describe a person as JSON:".into());
    for seed in [1, 2, 3] {
        // Unconstrained, the random weights produce no JSON at all: the constraint is what
        // makes the answers below parse.
        let free = engine.prepare(prompt(), params(None, seed))?;
        let free = generate(&mut engine, &free)?;
        assert!(
            serde_json::from_str::<Value>(&free.text).is_err(),
            "unconstrained text parsed: {:?}",
            free.text
        );

        let req = engine.prepare(
            prompt(),
            params(Some(OutputFormat::JsonSchema(person())), seed),
        )?;
        let completion = generate(&mut engine, &req)?;
        assert_eq!(
            completion.finish_reason,
            FinishReason::Stop,
            "{:?}",
            completion.text
        );
        let value = parsed(&completion);
        validate(&person(), &value).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[test]
fn any_json_object_is_an_object() -> anyhow::Result<()> {
    let mut engine = load(&small()?, 1)?;
    // Greedy: the object closes as soon as the model's favourite allowed token closes it,
    // or the budget runs out; either way it starts as an object.
    let req = engine.prepare(
        Prompt::Text("{".into()),
        GenerationParams {
            max_tokens: Some(64),
            response_format: Some(OutputFormat::JsonObject),
            ..GenerationParams::greedy()
        },
    )?;
    let completion = generate(&mut engine, &req)?;
    assert!(completion.text.starts_with('{'), "{:?}", completion.text);
    if completion.finish_reason == FinishReason::Stop {
        assert!(parsed(&completion).is_object());
    } else {
        assert_eq!(completion.finish_reason, FinishReason::Length);
    }
    Ok(())
}

#[test]
fn a_budget_spent_before_the_json_closes_ends_with_length() -> anyhow::Result<()> {
    let mut engine = load(&small()?, 1)?;
    let req = engine.prepare(
        Prompt::Text("JSON:".into()),
        GenerationParams {
            max_tokens: Some(3),
            ..params(Some(OutputFormat::JsonSchema(person())), 5)
        },
    )?;
    let completion = generate(&mut engine, &req)?;
    assert_eq!(completion.finish_reason, FinishReason::Length);
    assert_eq!(completion.completion_tokens, 3);
    assert!(completion.text.starts_with("{\""), "{:?}", completion.text);
    assert!(serde_json::from_str::<Value>(&completion.text).is_err());
    Ok(())
}

#[test]
fn a_schema_that_does_not_compile_is_refused_when_prepared() -> anyhow::Result<()> {
    let engine = load(&small()?, 1)?;
    let err = engine
        .prepare(
            Prompt::Text("x".into()),
            params(
                Some(OutputFormat::JsonSchema(
                    json!({"type": "object", "properties": {"a": {"type": "strin"}}}),
                )),
                1,
            ),
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidParams(_)), "{err}");
    assert!(err.to_string().contains("strin"), "{err}");
    assert!(err.kind().is_client_error());
    Ok(())
}

/// Four slots, four schemas, stepped together: every answer validates against its own schema.
#[test]
fn four_slots_each_with_its_own_schema() -> anyhow::Result<()> {
    let mut engine = load(&small()?, 4)?;
    assert_eq!(engine.slots(), 4);
    let schemas = [person(), point(), choice(), list()];
    let reqs = schemas
        .iter()
        .enumerate()
        .map(|(i, schema)| {
            engine.prepare(
                Prompt::Text(format!("Request number {i}, as JSON:")),
                params(
                    Some(OutputFormat::JsonSchema(schema.clone())),
                    10 + i as u64,
                ),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut seqs: Vec<Sequence> = reqs
        .iter()
        .enumerate()
        .map(|(slot, req)| engine.begin(slot, req))
        .collect::<Result<_, _>>()?;
    let mut done: Vec<Option<Completion>> = vec![None; seqs.len()];
    let mut steps = 0;
    while done.iter().any(Option::is_none) {
        steps += 1;
        assert!(steps < 1000, "the sequences did not finish");
        let mut running: Vec<&mut Sequence> = seqs
            .iter_mut()
            .zip(&done)
            .filter(|(_, d)| d.is_none())
            .map(|(s, _)| s)
            .collect();
        engine.step(&mut running)?;
        for (i, seq) in seqs.iter_mut().enumerate() {
            if done[i].is_none() && seq.has_logits() {
                done[i] = engine.advance(seq, &mut |_| ControlFlow::Continue(()))?;
            }
        }
    }
    for (schema, completion) in schemas.iter().zip(done) {
        let completion = completion.unwrap();
        assert_eq!(
            completion.finish_reason,
            FinishReason::Stop,
            "{:?}",
            completion.text
        );
        validate(schema, &parsed(&completion)).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// The prompt cache holds prompt tokens only: a constrained request whose prompt starts with a
/// prefix a slot already holds reuses it, and its answer still validates.
#[test]
fn a_constrained_request_after_a_cached_prefix_still_validates() -> anyhow::Result<()> {
    let mut engine = load(&small()?, 1)?;
    engine.set_prompt_cache(PromptCacheOptions {
        enabled: true,
        store_bytes: 0,
    });
    let history = "The people of the town, one after another, each described as JSON.";
    let first = engine.prepare(Prompt::Text(history.into()), params(None, 1))?;
    generate(&mut engine, &first)?;
    let req = engine.prepare(
        Prompt::Text(format!("{history} Next:")),
        params(Some(OutputFormat::JsonSchema(person())), 2),
    )?;
    let completion = generate(&mut engine, &req)?;
    assert!(completion.cached_tokens > 0, "nothing was reused");
    assert_eq!(completion.finish_reason, FinishReason::Stop);
    validate(&person(), &parsed(&completion)).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// SmolLM2's vocabulary is byte-level (GPT-2 style): the trie built from it constrains a real
/// model's chat answer to the schema.
#[test]
fn smollm2_answers_a_chat_in_the_schema() -> anyhow::Result<()> {
    let path = model_gen::paths::smollm2_gguf()
        .expect("SmolLM2 is missing: run `cargo xtask fetch-smollm2` (or set RBEE_SMOLLM2_GGUF)");
    let mut engine = load(&path, 1)?;
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
        },
        "required": ["city", "country"],
        "additionalProperties": false,
    });
    let req = engine.prepare(
        Prompt::Chat(vec![rbee_engine::ChatTurn::new(
            "user",
            "What is the capital of France? Answer in JSON with the keys city and country.",
        )]),
        GenerationParams {
            max_tokens: Some(60),
            response_format: Some(OutputFormat::JsonSchema(schema.clone())),
            ..GenerationParams::greedy()
        },
    )?;
    let completion = generate(&mut engine, &req)?;
    assert_eq!(
        completion.finish_reason,
        FinishReason::Stop,
        "{:?}",
        completion.text
    );
    let value = parsed(&completion);
    validate(&schema, &value).map_err(anyhow::Error::msg)?;
    assert!(value["city"].as_str().unwrap().contains("Paris"), "{value}");
    Ok(())
}

/// Log-probabilities describe the constrained distribution: a token the format rules out is
/// never listed as an alternative, and the allowed ones share all the probability.
#[test]
fn logprobs_list_only_tokens_the_format_allows() -> anyhow::Result<()> {
    let mut engine = load(&small()?, 1)?;
    let req = engine.prepare(
        Prompt::Text("JSON:".into()),
        GenerationParams {
            max_tokens: Some(40),
            logprobs: Some(5),
            ..params(Some(OutputFormat::JsonSchema(choice())), 4)
        },
    )?;
    let mut steps = Vec::new();
    let completion = engine.generate(&req, &mut |t| {
        steps.push(t.logprobs);
        ControlFlow::Continue(())
    })?;
    validate(&choice(), &parsed(&completion)).map_err(anyhow::Error::msg)?;
    // The first token can only open the object: `{` (the vocabulary has it twice, as a piece
    // and as a byte token), which then carry all the probability.
    let first = steps[0].as_ref().expect("logprobs at the first step");
    assert!(!first.top.is_empty() && first.top.len() < 5, "{first:?}");
    assert!(
        first
            .top
            .iter()
            .all(|lp| lp.text == "{" || lp.text == "<0x7B>"),
        "{first:?}"
    );
    let mass: f32 = first.top.iter().map(|lp| lp.logprob.exp()).sum();
    assert!((mass - 1.0).abs() < 1e-3, "{first:?}");
    Ok(())
}
