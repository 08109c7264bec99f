use rbee_contract::{ChatMessage, ChatRole, ErrorCode};
use serde_json::{Value, json};

use super::*;

fn chat(body: Value) -> Result<ValidRequest, OpenAiError> {
    parse_chat(body.to_string().as_bytes())
}

fn text(body: Value) -> Result<ValidRequest, OpenAiError> {
    parse_completion(body.to_string().as_bytes())
}

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

/// The refused parameter and the message of a `400`.
fn refused(result: Result<ValidRequest, OpenAiError>) -> (String, String) {
    let err = result.expect_err("a 400");
    assert_eq!(err.status, 400, "{err:?}");
    assert_eq!(
        err.body.code.as_deref(),
        Some(ErrorCode::BadRequest.as_str())
    );
    (err.body.param.unwrap_or_default(), err.body.message)
}

#[test]
fn a_chat_request_becomes_an_infer_operation() {
    let request = chat(json!({
        "model": " smol ",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello."},
            user("Capital of France?"),
        ],
        "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "seed": 42,
        "stop": "\n", "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "n": 1, "user": "u-1", "stream": true, "stream_options": {"include_usage": true},
        "logprobs": false, "tools": [], "logit_bias": {}, "response_format": {"type": "text"},
        "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
    }))
    .unwrap();
    assert_eq!(request.kind, Kind::Chat);
    assert_eq!(
        request.stream,
        Some(StreamMode {
            include_usage: true
        })
    );
    assert_eq!(request.user.as_deref(), Some("u-1"));
    let message = |role, content: &str| ChatMessage::new(role, content);
    assert_eq!(
        request.infer,
        InferRequest {
            model: "smol".into(),
            messages: Some(vec![
                message(ChatRole::System, "Be brief."),
                message(ChatRole::System, "Answer in English."),
                message(ChatRole::User, "Hi\nthere"),
                message(ChatRole::Assistant, "Hello."),
                message(ChatRole::User, "Capital of France?"),
            ]),
            max_tokens: Some(12),
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(40),
            min_p: Some(0.05),
            repeat_penalty: Some(1.1),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            seed: Some(42),
            stop: vec!["\n".into()],
            prompt: None,
            logprobs: None,
            response_format: None,
            tools: Vec::new(),
        }
    );
}

#[test]
fn nulls_are_the_same_as_leaving_a_parameter_out() {
    let request = chat(json!({
        "model": "m", "messages": [user("hi")], "temperature": null, "stop": null,
        "stream": null, "logprobs": null, "tools": null, "n": null, "seed": null,
    }))
    .unwrap();
    assert_eq!(request.stream, None);
    assert_eq!(request.infer.temperature, None);
    assert!(request.infer.stop.is_empty());
}

#[test]
fn max_completion_tokens_wins_and_must_agree_with_max_tokens() {
    let both = |a: u32, b: u32| {
        chat(
            json!({"model": "m", "messages": [user("hi")], "max_tokens": a, "max_completion_tokens": b}),
        )
    };
    assert_eq!(both(5, 5).unwrap().infer.max_tokens, Some(5));
    assert_eq!(refused(both(5, 6)).0, "max_completion_tokens");
    let only = chat(json!({"model": "m", "messages": [user("hi")], "max_completion_tokens": 7}));
    assert_eq!(only.unwrap().infer.max_tokens, Some(7));
}

#[test]
fn a_completion_request_takes_one_prompt() {
    let request = text(
        json!({"model": "m", "prompt": "The capital", "max_tokens": 3,
                             "stop": ["a", "b"], "echo": false, "best_of": 1, "logprobs": null}),
    )
    .unwrap();
    assert_eq!(request.kind, Kind::Text);
    assert_eq!(request.infer.prompt.as_deref(), Some("The capital"));
    assert_eq!(request.infer.messages, None);
    assert_eq!(request.infer.stop, ["a", "b"]);
    let listed = text(json!({"model": "m", "prompt": ["one"]})).unwrap();
    assert_eq!(listed.infer.prompt.as_deref(), Some("one"));

    assert_eq!(
        refused(text(json!({"model": "m", "prompt": ["a", "b"]}))).0,
        "prompt"
    );
    assert_eq!(
        refused(text(json!({"model": "m", "prompt": [1, 2, 3]}))).0,
        "prompt"
    );
    assert_eq!(
        refused(text(json!({"model": "m", "prompt": ""}))).0,
        "prompt"
    );
    assert_eq!(refused(text(json!({"model": "m"}))).0, "prompt");
    assert_eq!(
        refused(text(json!({"model": "m", "prompt": "x", "echo": true}))).0,
        "echo"
    );
    assert_eq!(
        refused(text(json!({"model": "m", "prompt": "x", "best_of": 2}))).0,
        "best_of"
    );
    assert_eq!(
        refused(text(json!({"model": "m", "prompt": "x", "suffix": "!"}))).0,
        "suffix"
    );
}

#[test]
fn logprobs_map_to_the_infer_operation_within_openais_bounds() {
    let chat_with = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [user("hi")]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        chat(body)
    };
    let asked = |r: Result<ValidRequest, OpenAiError>| r.unwrap().infer.logprobs;
    assert_eq!(asked(chat_with(json!({"logprobs": true}))), Some(0));
    assert_eq!(
        asked(chat_with(json!({"logprobs": true, "top_logprobs": 20}))),
        Some(20)
    );
    assert_eq!(asked(chat_with(json!({"logprobs": false}))), None);
    assert_eq!(
        asked(chat_with(json!({"logprobs": false, "top_logprobs": 0}))),
        None
    );
    let (param, message) = refused(chat_with(json!({"logprobs": true, "top_logprobs": 21})));
    assert_eq!(param, "top_logprobs");
    assert!(message.contains("between 0 and 20"), "{message}");

    let text_with = |n: u32| text(json!({"model": "m", "prompt": "x", "logprobs": n}));
    assert_eq!(asked(text_with(0)), Some(0));
    assert_eq!(asked(text_with(5)), Some(5));
    let (param, message) = refused(text_with(6));
    assert_eq!(param, "logprobs");
    assert!(message.contains("between 0 and 5"), "{message}");
}

#[test]
fn unsupported_parameters_are_refused_by_name() {
    let base = || json!({"model": "m", "messages": [user("hi")]});
    let with = |key: &str, value: Value| {
        let mut body = base();
        body[key] = value;
        refused(chat(body)).0
    };
    // Alternatives without the tokens' own logprobs: OpenAI refuses them too.
    assert_eq!(with("top_logprobs", json!(3)), "top_logprobs");
    // OpenAI's deprecated function calling; tools are the way.
    assert_eq!(with("functions", json!([{"name": "f"}])), "functions");
    // A call is required but no tool is offered.
    assert_eq!(with("tool_choice", json!("required")), "tool_choice");
    assert_eq!(
        with("response_format", json!({"type": "yaml"})),
        "response_format.type"
    );
    assert_eq!(with("logit_bias", json!({"50256": -100})), "logit_bias");
    assert_eq!(with("modalities", json!(["audio"])), "modalities");
    assert_eq!(with("store", json!(true)), "store");
    assert_eq!(with("temprature", json!(0.5)), "temprature");
    for n in [0, 9, 100_000] {
        let (param, message) = refused(chat(
            json!({"model": "m", "messages": [user("hi")], "n": n}),
        ));
        assert_eq!(param, "n");
        assert!(message.contains("between 1 and 8"), "{message}");
    }
    let eight = chat(json!({"model": "m", "messages": [user("hi")], "n": 8})).unwrap();
    assert_eq!(eight.n, 8);
    let three = text(json!({"model": "m", "prompt": "hi", "n": 3})).unwrap();
    assert_eq!(three.n, 3);
}

#[test]
fn values_out_of_range_and_wrong_types_name_the_parameter() {
    let with = |key: &str, value: Value| {
        let mut body = json!({"model": "m", "messages": [user("hi")]});
        body[key] = value;
        refused(chat(body))
    };
    for (key, value) in [
        ("temperature", json!(2.5)),
        ("temperature", json!(-1)),
        ("temperature", json!("hot")),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!(-3)),
        ("seed", json!(-1)),
        ("seed", json!(1.5)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(-5)),
        ("max_tokens", json!(1e12)),
        ("stream", json!("yes")),
        ("stop", json!(7)),
        ("stop", json!(vec!["a"; 17])),
        ("stop", json!([""])),
        ("repetition_penalty", json!(0)),
        ("model", json!(5)),
        ("model", json!("  ")),
        ("messages", json!("hi")),
    ] {
        let (param, message) = with(key, value.clone());
        let expected = if key == "max_tokens" && value == json!(0) {
            "max_completion_tokens"
        } else {
            key
        };
        assert_eq!(param, expected, "{key}={value}: {message}");
    }
    let (param, message) = with("stream_options", json!({"include_usage": true}));
    assert_eq!(param, "stream_options");
    assert!(message.contains("only allowed when `stream` is true"));
    let mut body = json!({"model": "m", "messages": [user("hi")], "stream": true});
    body["stream_options"] = json!({"include_usage": true, "extra": 1});
    assert_eq!(refused(chat(body)).0, "stream_options.extra");
}

#[test]
fn messages_are_checked_part_by_part() {
    let with_messages =
        |messages: Value| refused(chat(json!({"model": "m", "messages": messages})));
    assert_eq!(with_messages(json!([])).0, "messages");
    assert_eq!(
        with_messages(json!([{"role": "robot", "content": "x"}])).0,
        "messages[0].role"
    );
    assert_eq!(
        with_messages(json!([user("a"), {"role": "function", "content": "x", "name": "f"}])).0,
        "messages[1].role"
    );
    assert_eq!(
        with_messages(json!([{"role": "user"}])).0,
        "messages[0].content"
    );
    assert_eq!(
        with_messages(json!([{"role": "user", "content": 5}])).0,
        "messages[0].content"
    );
    let (param, message) = with_messages(json!([{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    ]}]));
    assert_eq!(param, "messages[0].content[1].type");
    assert!(message.contains("image_url"), "{message}");
    assert_eq!(
        with_messages(json!([{"role": "user", "content": [{"type": "text"}]}])).0,
        "messages[0].content[0].text"
    );
    assert_eq!(
        with_messages(json!([{"role": "user", "content": "x", "name": "bob"}])).0,
        "messages[0].name"
    );
    assert_eq!(
        with_messages(json!([{"role": "user", "content": "x", "colour": "red"}])).0,
        "messages[0].colour"
    );
    assert_eq!(refused(chat(json!({"model": "m"}))).0, "messages");
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
    }})
}

fn weather_call(id: &str) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": id, "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    ]})
}

#[test]
fn a_tool_round_trip_reaches_the_contract() {
    let request = chat(json!({
        "model": "m",
        "messages": [
            user("Weather in Paris?"),
            weather_call("call_1"),
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ],
        "tools": [weather_tool()],
        "parallel_tool_calls": false,
    }))
    .unwrap();
    let tools = request.tools.unwrap();
    assert_eq!(tools.names, ["get_weather"]);
    assert!(!tools.parallel);
    assert_eq!(request.infer.tools.len(), 1);
    assert_eq!(request.infer.tools[0].name, "get_weather");
    assert_eq!(
        request.infer.tools[0].parameters.as_ref().unwrap()["type"],
        "object"
    );
    // `auto` constrains nothing.
    assert_eq!(request.infer.response_format, None);
    let messages = request.infer.messages.unwrap();
    assert_eq!(messages[1].role, ChatRole::Assistant);
    assert_eq!(messages[1].content, "");
    assert_eq!(messages[1].tool_calls[0].id, "call_1");
    assert_eq!(messages[1].tool_calls[0].name, "get_weather");
    assert_eq!(messages[1].tool_calls[0].arguments, r#"{"city": "Paris"}"#);
    assert_eq!(messages[2].role, ChatRole::Tool);
    assert_eq!(messages[2].tool_call_id.as_deref(), Some("call_1"));
}

#[test]
fn required_and_named_tool_choices_constrain_the_answer_and_none_offers_nothing() {
    let with_choice = |choice: Value| {
        chat(json!({
            "model": "m", "messages": [user("Weather in Paris?")],
            "tools": [weather_tool()], "tool_choice": choice,
        }))
        .unwrap()
    };
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let request = with_choice(choice);
        let Some(rbee_contract::ResponseFormat::JsonSchema { schema }) =
            request.infer.response_format
        else {
            panic!("a required call is constrained");
        };
        assert_eq!(
            schema["properties"]["name"],
            json!({"const": "get_weather"})
        );
        assert_eq!(schema["required"], json!(["name", "arguments"]));
    }
    // A required call and a response format cannot both shape the answer.
    let (param, message) = refused(chat(json!({
        "model": "m", "messages": [user("hi")], "tools": [weather_tool()],
        "tool_choice": "required", "response_format": {"type": "json_object"},
    })));
    assert_eq!(param, "tool_choice");
    assert!(message.contains("response_format"), "{message}");
    let none = with_choice(json!("none"));
    assert!(none.tools.is_none());
    assert!(none.infer.tools.is_empty());
    assert_eq!(none.infer.response_format, None);
}

#[test]
fn malformed_tools_and_tool_messages_name_the_parameter() {
    let with = |body: Value| refused(chat(body)).0;
    let base = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [user("hi")]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    assert_eq!(
        with(base(
            json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
        )),
        "tool_choice"
    );
    assert_eq!(
        with(base(
            json!({"tools": [{"type": "function", "function": {"description": "no name"}}]})
        )),
        "tools[0].function.name"
    );
    assert_eq!(
        with(base(
            json!({"tools": [{"type": "function", "function": {"name": "has space"}}]})
        )),
        "tools[0].function.name"
    );
    assert_eq!(
        with(base(
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]})
        )),
        "tools[0].function.parameters"
    );
    assert_eq!(
        with(base(json!({"tools": [{"type": "function"}]}))),
        "tools[0].function"
    );
    // A tool message without the id of the call it answers, or with an id no call had.
    assert_eq!(
        with(
            json!({"model": "m", "messages": [user("hi"), weather_call("call_1"), {"role": "tool", "content": "18 C"}]})
        ),
        "messages[2].tool_call_id"
    );
    assert_eq!(
        with(
            json!({"model": "m", "messages": [user("hi"), weather_call("call_1"), {"role": "tool", "content": "18 C", "tool_call_id": "call_9"}]})
        ),
        "messages[2].tool_call_id"
    );
    // Calls only on assistant messages; a call needs its function's name and arguments.
    assert_eq!(
        with(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]}]})
        ),
        "messages[0].tool_calls"
    );
    assert_eq!(
        with(
            json!({"model": "m", "messages": [user("hi"), {"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f"}}
            ]}]})
        ),
        "messages[1].tool_calls[0].function.arguments"
    );
    // Parameters that cannot constrain a required call are the tools' fault, not a
    // `response_format` the request does not have.
    let bad = json!({"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}});
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "f"}}),
    ] {
        let (param, message) = refused(chat(base(json!({"tools": [bad], "tool_choice": choice}))));
        assert_eq!(param, "tools", "{message}");
        assert!(!message.contains("response_format"), "{message}");
    }
    // With `auto` nothing is compiled: the model only reads the schema.
    assert!(chat(base(json!({"tools": [bad]}))).is_ok());
}

#[test]
fn bodies_that_are_not_json_objects_are_refused() {
    for body in [&b"{not json"[..], b"", b"[1]", b"\"text\""] {
        let err = parse_chat(body).unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(err.body.param, None);
        assert_eq!(err.body.kind, "invalid_request_error");
    }
}

/// The job API's verdict on an `infer` operation: `Ok` or the message of its `400`.
fn job_api(infer: InferRequest) -> Result<(), String> {
    crate::infer::ValidInfer::parse(infer)
        .map(drop)
        .map_err(|err| {
            assert_eq!(err.code, ErrorCode::BadRequest, "{err:?}");
            err.message
        })
}

/// Values on which the job API and the OpenAI routes used to disagree, and values at the edge
/// of each limit: both APIs give each the same verdict, and a refusal names the same
/// parameter (under OpenAI's name where it has its own).
#[test]
fn the_job_api_and_the_openai_routes_judge_alike() {
    let long_stop = "x".repeat(rbee_contract::validation::MAX_STOP_BYTES + 1);
    let cases: Vec<(&str, Value, &str, bool)> = vec![
        // (OpenAI name, value, the job API's name, accepted)
        ("top_k", json!(0), "top_k", true),
        ("top_k", json!(1), "top_k", true),
        ("stop", json!(vec!["a"; 5]), "stop", true),
        ("stop", json!(vec!["a"; 16]), "stop", true),
        ("stop", json!(vec!["a"; 17]), "stop", false),
        ("stop", json!([long_stop]), "stop", false),
        ("stop", json!([""]), "stop", false),
        ("temperature", json!(2.0), "temperature", true),
        ("temperature", json!(2.5), "temperature", false),
        ("temperature", json!(-0.5), "temperature", false),
        ("top_p", json!(0), "top_p", false),
        ("top_p", json!(1), "top_p", true),
        ("min_p", json!(1.5), "min_p", false),
        ("repetition_penalty", json!(0), "repeat_penalty", false),
        ("repetition_penalty", json!(3), "repeat_penalty", true),
        ("presence_penalty", json!(-2), "presence_penalty", true),
        ("frequency_penalty", json!(2.5), "frequency_penalty", false),
        ("max_tokens", json!(0), "max_tokens", false),
        ("seed", json!(u64::MAX), "seed", true),
    ];
    for (name, value, field, accepted) in cases {
        let case = format!("{name}={value}");
        let mut body = json!({"model": "m", "prompt": "hi"});
        body[name] = value.clone();
        let openai = text(body.clone());
        let mut operation = body;
        operation["operation"] = json!("infer");
        operation.as_object_mut().unwrap().remove(name);
        operation[field] = value;
        let rbee_contract::Operation::Infer(infer) = serde_json::from_value(operation).unwrap()
        else {
            unreachable!()
        };
        let job = job_api(infer);
        assert_eq!(openai.is_ok(), accepted, "OpenAI, {case}: {openai:?}");
        assert_eq!(job.is_ok(), accepted, "job API, {case}: {job:?}");
        if !accepted {
            let (param, message) = refused(openai);
            assert_eq!(param, name, "{case}: {message}");
            assert!(
                message.starts_with(&format!("`{name}` ")),
                "{case}: {message}"
            );
            let job = job.unwrap_err();
            assert!(job.starts_with(&format!("`{field}` ")), "{case}: {job}");
            // The same reason, after the parameter's name.
            assert_eq!(
                message.split_once(' ').unwrap().1,
                job.split_once(' ').unwrap().1,
                "{case}"
            );
        }
    }
    // A chat names the token limit `max_completion_tokens`, the job API `max_tokens`.
    let (param, _) = refused(chat(
        json!({"model": "m", "messages": [user("hi")], "max_tokens": 0}),
    ));
    assert_eq!(param, "max_completion_tokens");
    // The prompt forms: empty on either API is refused for the same field.
    assert_eq!(
        refused(text(json!({"model": "m", "prompt": ""}))).0,
        "prompt"
    );
    assert!(
        job_api(InferRequest {
            model: "m".into(),
            prompt: Some(String::new()),
            ..InferRequest::default()
        })
        .unwrap_err()
        .starts_with("`prompt` ")
    );
    assert_eq!(
        refused(chat(json!({"model": "m", "messages": []}))).0,
        "messages"
    );
    assert!(
        job_api(InferRequest {
            model: "m".into(),
            messages: Some(Vec::new()),
            ..InferRequest::default()
        })
        .unwrap_err()
        .starts_with("`messages` ")
    );
}
