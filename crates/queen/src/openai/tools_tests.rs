use super::*;

fn names() -> Vec<String> {
    vec!["get_weather".into(), "get_time".into()]
}

fn call(name: &str, arguments: &str) -> Piece {
    Piece::Call(ParsedCall {
        name: name.into(),
        arguments: arguments.into(),
    })
}

fn text(text: &str) -> Piece {
    Piece::Text(text.into())
}

/// Every family's answers, as the worker's text has them, and what a client must get.
fn cases() -> Vec<(&'static str, Vec<Piece>)> {
    vec![
        // Qwen2.5 / Hermes: text, then calls in tags.
        (
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            vec![
                text("Let me check.\n"),
                call("get_weather", r#"{"city":"Paris"}"#),
            ],
        ),
        (
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>",
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("get_time", r#"{"zone":"CET"}"#),
            ],
        ),
        // The generation ended before the closing tag.
        (
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}",
            vec![call("get_time", "{}")],
        ),
        // Llama 3.1: bare JSON with `parameters`, with or without `<|python_tag|>`.
        (
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            vec![call("get_weather", r#"{"city":"Oslo"}"#)],
        ),
        (
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            vec![call("get_weather", r#"{"city":"Oslo"}"#)],
        ),
        (
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"get_time\", \"parameters\": {}}",
            vec![
                call("get_weather", r#"{"city":"Oslo"}"#),
                call("get_time", "{}"),
            ],
        ),
        // Mistral: a list after `[TOOL_CALLS]`, or bare when the control token is not text.
        (
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}, \"id\": \"a1B2c3D4e\"}, {\"name\": \"get_time\", \"arguments\": {}}]",
            vec![
                call("get_weather", r#"{"city":"Rome"}"#),
                call("get_time", "{}"),
            ],
        ),
        (
            " [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
            vec![call("get_weather", r#"{"city":"Rome"}"#)],
        ),
        // The constrained shape, with arguments already JSON text and a brace in a string.
        (
            "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"}{\\\"}\"}",
            vec![call("get_weather", r#"{"city": "}{"}"#)],
        ),
        // Content: JSON that calls no offered function, text with `<` and `[`, an
        // unterminated marker, a marker followed by what is not a call.
        (
            "{\"name\": \"launch_rockets\", \"arguments\": {}}",
            vec![text("{\"name\": \"launch_rockets\", \"arguments\": {}}")],
        ),
        (
            "{\"answer\": 42} is the JSON.",
            vec![text("{\"answer\": 42} is the JSON.")],
        ),
        ("a < b and [x] <tool", vec![text("a < b and [x] <tool")]),
        (
            "<|python_tag|>brave_search.call(query=\"x\")",
            vec![text("<|python_tag|>brave_search.call(query=\"x\")")],
        ),
        (
            "<tool_call>not json</tool_call> done",
            vec![text("<tool_call>not json</tool_call> done")],
        ),
        ("", vec![]),
        ("  \n", vec![text("  \n")]),
    ]
}

#[test]
fn each_family_is_read_whole() {
    for (answer, expected) in cases() {
        assert_eq!(
            CallParser::parse_all(names(), answer),
            expected,
            "answer: {answer:?}"
        );
    }
}

/// Streams `answer` cut at `cuts` (byte offsets on character boundaries).
fn streamed(answer: &str, cuts: &[usize]) -> Vec<Piece> {
    let mut parser = CallParser::new(names());
    let mut pieces = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&answer.len())) {
        pieces.extend(parser.push(&answer[from..cut]));
        from = cut;
    }
    pieces.extend(parser.finish());
    pieces
}

/// Pieces joined, with each call's arguments as compact JSON: a call streamed as it comes
/// carries the model's own spacing.
fn normalized(pieces: Vec<Piece>) -> Vec<Piece> {
    merge_text(pieces)
        .into_iter()
        .map(|piece| match piece {
            Piece::Call(mut call) => {
                if let Ok(value) = serde_json::from_str::<Value>(&call.arguments) {
                    call.arguments = value.to_string();
                }
                Piece::Call(call)
            }
            other => other,
        })
        .collect()
}

#[test]
fn each_family_is_read_the_same_however_the_stream_is_cut() {
    for (answer, expected) in cases() {
        let boundaries: Vec<usize> = (1..answer.len())
            .filter(|&i| answer.is_char_boundary(i))
            .collect();
        let mut splits: Vec<Vec<usize>> = boundaries.iter().map(|&i| vec![i]).collect();
        for size in 1..=5 {
            splits.push(
                boundaries
                    .iter()
                    .copied()
                    .filter(|i| i % size == 0)
                    .collect(),
            );
        }
        // A pseudo-random cut pattern per answer.
        let mut seed = answer.len() as u64 * 2_654_435_761 + 1;
        splits.push(
            boundaries
                .iter()
                .copied()
                .filter(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    seed >> 62 == 0
                })
                .collect(),
        );
        for cuts in splits {
            let pieces = streamed(answer, &cuts);
            assert_eq!(
                normalized(pieces.clone()),
                normalized(expected.clone()),
                "answer {answer:?} cut at {cuts:?}"
            );
            // Markup of a call that was read is never released as content.
            if expected.iter().any(|p| matches!(p, Piece::Call(_))) {
                for piece in &pieces {
                    if let Piece::Text(t) = piece {
                        for marker in ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "\"name\""] {
                            assert!(
                                !t.contains(marker),
                                "{t:?} leaked from {answer:?} at {cuts:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn text_before_a_call_is_released_before_the_call_completes() {
    let mut parser = CallParser::new(names());
    assert_eq!(
        parser.push("Checking the weather"),
        vec![text("Checking the weather")]
    );
    // A possible marker start is held back, then released once it is not one.
    assert_eq!(parser.push(" <tool"), vec![text(" ")]);
    assert_eq!(parser.push("_call>\n{\"name\": \"get_weather\", "), vec![]);
    assert_eq!(
        parser.push("\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        vec![call("get_weather", r#"{"city":"Paris"}"#)]
    );
    assert_eq!(parser.finish(), vec![]);
}

#[test]
fn a_tagged_call_streams_its_arguments_as_they_come() {
    let mut parser = CallParser::new(names());
    assert_eq!(
        parser.push("<tool_call>\n{\"name\": \"get_weather\", \"argu"),
        vec![]
    );
    assert_eq!(
        parser.push("ments\": {\"city\": \"Par"),
        vec![
            Piece::CallStart {
                name: "get_weather".into()
            },
            Piece::Arguments("{\"city\": \"Par".into())
        ]
    );
    // A brace inside a string does not close the arguments.
    assert_eq!(
        parser.push("is }\"}"),
        vec![Piece::Arguments("is }\"}".into())]
    );
    // The rest of the block is markup; text after it is content.
    assert_eq!(parser.push("}\n</tool"), vec![]);
    assert_eq!(parser.push("_call> Done."), vec![text("Done.")]);
    assert_eq!(parser.finish(), vec![]);
}

#[test]
fn plain_text_streams_as_it_comes() {
    let mut parser = CallParser::new(names());
    assert_eq!(parser.push("Paris is"), vec![text("Paris is")]);
    assert_eq!(parser.push(" sunny."), vec![text(" sunny.")]);
    assert_eq!(parser.finish(), vec![]);
}

fn tool(name: &str) -> ToolIn {
    serde_json::from_value(json!({
        "type": "function",
        "function": {
            "name": name,
            "description": "d",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }
    }))
    .unwrap()
}

fn choice(value: Value) -> Option<ToolChoiceIn> {
    Some(serde_json::from_value(value).unwrap())
}

#[test]
fn tool_choice_decides_what_is_offered_and_constrained() {
    let auto = plan(Some(vec![tool("get_weather")]), None, None).unwrap();
    assert_eq!(auto.offered.len(), 1);
    assert_eq!(auto.tool_use.as_ref().unwrap().choice, ToolChoice::Auto);
    assert!(auto.tool_use.unwrap().parallel);
    assert_eq!(auto.constraint, None);

    let none = plan(Some(vec![tool("get_weather")]), choice(json!("none")), None).unwrap();
    assert!(none.offered.is_empty() && none.tool_use.is_none() && none.constraint.is_none());

    let required = plan(
        Some(vec![tool("get_weather"), tool("get_time")]),
        choice(json!("required")),
        Some(false),
    )
    .unwrap();
    assert!(!required.tool_use.as_ref().unwrap().parallel);
    let Some(ResponseFormat::JsonSchema { schema }) = required.constraint else {
        panic!("required is constrained");
    };
    assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);
    assert_eq!(
        schema["anyOf"][1]["properties"]["name"],
        json!({"const": "get_time"})
    );
    assert_eq!(
        schema["anyOf"][0]["properties"]["arguments"]["required"],
        json!(["city"])
    );

    let named = plan(
        Some(vec![tool("get_weather"), tool("get_time")]),
        choice(json!({"type": "function", "function": {"name": "get_time"}})),
        None,
    )
    .unwrap();
    assert_eq!(
        named.tool_use.unwrap().choice,
        ToolChoice::Named("get_time".into())
    );
    let Some(ResponseFormat::JsonSchema { schema }) = named.constraint else {
        panic!("a named function is constrained");
    };
    assert_eq!(schema["properties"]["name"], json!({"const": "get_time"}));
}

#[test]
fn a_required_call_has_object_arguments_whatever_the_schema_leaves_out() {
    // `{}`, or `properties` alone (which JSON Schema applies to objects only), would let the
    // constrained answer's arguments be a string or a number.
    for parameters in [
        json!({}),
        json!({"properties": {"city": {"type": "string"}}}),
    ] {
        let tool: ToolIn = serde_json::from_value(json!({"type": "function",
            "function": {"name": "f", "parameters": parameters}}))
        .unwrap();
        let required = plan(Some(vec![tool]), choice(json!("required")), None).unwrap();
        let Some(ResponseFormat::JsonSchema { schema }) = required.constraint else {
            panic!("required is constrained");
        };
        let arguments = &schema["properties"]["arguments"];
        assert_eq!(arguments["type"], "object", "{parameters}");
        assert_eq!(
            arguments["properties"], parameters["properties"],
            "{parameters}"
        );
    }
}

#[test]
fn bad_tools_and_choices_name_the_parameter() {
    let refused = |tools: Option<Vec<ToolIn>>, choice: Option<ToolChoiceIn>| {
        plan(tools, choice, None).unwrap_err().body.param.unwrap()
    };
    assert_eq!(
        refused(
            Some(vec![tool("get_weather")]),
            choice(json!({"type": "function", "function": {"name": "nope"}}))
        ),
        "tool_choice"
    );
    assert_eq!(refused(None, choice(json!("required"))), "tool_choice");
    assert_eq!(
        refused(Some(vec![tool("get_weather")]), choice(json!("sometimes"))),
        "tool_choice"
    );
    assert_eq!(
        refused(Some(vec![tool("get weather")]), None),
        "tools[0].function.name"
    );
    assert_eq!(
        refused(Some(vec![tool("f"), tool("f")]), None),
        "tools[1].function.name"
    );
    let mut not_object = tool("f");
    not_object.function.parameters = Some(json!([]));
    assert_eq!(
        refused(Some(vec![not_object]), None),
        "tools[0].function.parameters"
    );
    let many: Vec<ToolIn> = (0..129).map(|i| tool(&format!("f{i}"))).collect();
    assert_eq!(refused(Some(many), None), "tools");
    let mut retrieval = tool("f");
    retrieval.kind = "retrieval".into();
    assert_eq!(refused(Some(vec![retrieval]), None), "tools[0].type");
}

#[test]
fn call_ids_are_openai_shaped_and_distinct() {
    let job = "5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    assert_eq!(call_id(job, 0), "call_5f0c1a2b3c4d4e5f8a9b0c0");
    assert_ne!(call_id(job, 0), call_id(job, 1));
}
