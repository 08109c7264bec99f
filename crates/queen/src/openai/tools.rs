//! Tool calls on the OpenAI API: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls` turned into the contract's `tools` (the worker's chat template writes
//! them into the prompt), and the model's answer read back into `tool_calls`.
//!
//! Models write calls in their family's syntax, and the worker sends them as plain text.
//! [`CallParser`] reads every family's syntax, incrementally, so the markup is never sent as
//! content (the families' markers do not collide):
//! - Hermes / Qwen2.5 / Qwen3 (and the generic prompt the worker gives a template without
//!   tool support): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
//!   call, possibly after some text;
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]`;
//! - Llama 3.1+: `{"name": ..., "parameters": {...}}`, possibly after `<|python_tag|>`, several
//!   separated by `;`.
//!
//! `[TOOL_CALLS]` and `<|python_tag|>` are control tokens, which the worker leaves out of the
//! text, so a Mistral or Llama answer arrives as bare JSON. A bare JSON value at the start of
//! the answer is therefore read as calls when every object in it names an offered function;
//! any other JSON is content.
//!
//! `tool_choice` `required` or a named function constrains decoding (the contract's
//! `response_format` with a JSON Schema): the answer is then exactly one JSON object
//! `{"name": ..., "arguments": {...}}` whose arguments match that function's `parameters`,
//! which the parser reads as a bare call. `none` offers no tools and parses nothing, so the
//! model answers in text, as OpenAI's `none` means.

use rbee_contract::{ResponseFormat, Tool, ToolCall};
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::body::{ChatToolCallIn, ToolChoiceIn, ToolIn};
use super::error::OpenAiError;

/// The most functions a request may offer (OpenAI's limit).
const MAX_TOOLS: usize = 128;

/// What the model may do with the tools it is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// Answer in text or call, as it sees fit.
    Auto,
    /// Call some function.
    Required,
    /// Call this function.
    Named(String),
}

/// The tools of a request that offers them (`tool_choice` is not `none`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolUse {
    /// The offered functions' names: bare JSON is a call only when it names one of them.
    pub names: Vec<String>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): when false, only the first call is reported.
    pub parallel: bool,
}

/// What the request's tool parameters amount to.
#[derive(Debug, Default)]
pub(crate) struct ToolPlan {
    /// The tools the worker offers the model.
    pub offered: Vec<Tool>,
    /// How the answer is read; `None` when no tools are offered.
    pub tool_use: Option<ToolUse>,
    /// The constraint that makes the answer a valid call (`required` or a named function).
    pub constraint: Option<ResponseFormat>,
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls` and plans the request.
pub(crate) fn plan(
    tools: Option<Vec<ToolIn>>,
    tool_choice: Option<ToolChoiceIn>,
    parallel: Option<bool>,
) -> Result<ToolPlan, OpenAiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(OpenAiError::invalid(
            "tools",
            format!(
                "`tools` offers {} functions; at most {MAX_TOOLS} are allowed",
                tools.len()
            ),
        ));
    }
    let mut offered: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        let at = |field: &str| format!("tools[{i}].{field}");
        if tool.kind != "function" {
            return Err(OpenAiError::invalid(
                at("type"),
                format!(
                    "`{}` must be `function` (got `{}`): rbee offers function tools only",
                    at("type"),
                    tool.kind
                ),
            ));
        }
        let function = tool.function;
        // Calls are constrained to the schema whenever `tool_choice` requires one; with
        // `auto` the model is free, `strict` or not.
        let _ = function.strict;
        if !rbee_contract::validation::is_function_name(&function.name) {
            return Err(OpenAiError::invalid(
                at("function.name"),
                format!(
                    "`{}` must be 1 to {} letters, digits, `_` or `-` (got {:?})",
                    at("function.name"),
                    rbee_contract::validation::MAX_FUNCTION_NAME,
                    function.name
                ),
            ));
        }
        if offered.iter().any(|t| t.name == function.name) {
            return Err(OpenAiError::invalid(
                at("function.name"),
                format!("two tools are named `{}`", function.name),
            ));
        }
        if let Some(parameters) = &function.parameters
            && !parameters.is_object()
        {
            return Err(OpenAiError::invalid(
                at("function.parameters"),
                format!(
                    "`{}` must be a JSON Schema object",
                    at("function.parameters")
                ),
            ));
        }
        offered.push(Tool {
            name: function.name,
            description: function.description,
            parameters: function.parameters,
        });
    }

    let choice = match tool_choice {
        None if offered.is_empty() => return Ok(ToolPlan::default()),
        None => ToolChoice::Auto,
        Some(ToolChoiceIn::Mode(mode)) => match mode.as_str() {
            // The model is told nothing of the tools, so it answers in text.
            "none" => return Ok(ToolPlan::default()),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(OpenAiError::invalid(
                    "tool_choice",
                    format!(
                        "`tool_choice` must be `none`, `auto`, `required` or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (got `{other}`)"
                    ),
                ));
            }
        },
        Some(ToolChoiceIn::Function(named)) => {
            if named.kind != "function" {
                return Err(OpenAiError::invalid(
                    "tool_choice.type",
                    format!(
                        "`tool_choice.type` must be `function` (got `{}`)",
                        named.kind
                    ),
                ));
            }
            ToolChoice::Named(named.function.name)
        }
    };
    if offered.is_empty() {
        // `auto` without tools asks for nothing; `required` or a name cannot be met.
        return match choice {
            ToolChoice::Auto => Ok(ToolPlan::default()),
            _ => Err(OpenAiError::invalid(
                "tool_choice",
                "`tool_choice` requires a tool call but `tools` offers none",
            )),
        };
    }
    if let ToolChoice::Named(name) = &choice
        && !offered.iter().any(|t| &t.name == name)
    {
        return Err(OpenAiError::invalid(
            "tool_choice",
            format!("`tool_choice` names the function `{name}`, which `tools` does not offer"),
        ));
    }
    let constraint = match &choice {
        ToolChoice::Auto => None,
        ToolChoice::Required => Some(call_schema(&offered)),
        ToolChoice::Named(name) => Some(call_schema(
            &offered
                .iter()
                .filter(|t| &t.name == name)
                .cloned()
                .collect::<Vec<_>>(),
        )),
    }
    .map(|schema| ResponseFormat::JsonSchema { schema });
    let tool_use = ToolUse {
        names: offered.iter().map(|t| t.name.clone()).collect(),
        choice,
        parallel: parallel.unwrap_or(true),
    };
    Ok(ToolPlan {
        offered,
        tool_use: Some(tool_use),
        constraint,
    })
}

/// The JSON Schema of one call to one of `tools`: `{"name": <the name>, "arguments": <its
/// parameters>}`, the shape [`CallParser`] reads as a bare call.
fn call_schema(tools: &[Tool]) -> Value {
    let one = |tool: &Tool| {
        let mut parameters = tool
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object"}));
        // Arguments are an object (OpenAI's rule): a schema without a type (`{}`, or
        // `properties` alone, which JSON Schema applies to objects only) would otherwise
        // let the constrained answer carry a string or a number as its arguments.
        if let Some(schema) = parameters.as_object_mut()
            && !schema.contains_key("type")
        {
            schema.insert("type".into(), json!("object"));
        }
        json!({
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                "arguments": parameters,
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    match tools {
        [tool] => one(tool),
        tools => json!({"anyOf": tools.iter().map(one).collect::<Vec<_>>()}),
    }
}

/// An assistant message's `tool_calls`, checked: `messages[i].tool_calls[j]`.
pub(crate) fn message_calls(
    i: usize,
    calls: Vec<ChatToolCallIn>,
) -> Result<Vec<ToolCall>, OpenAiError> {
    calls
        .into_iter()
        .enumerate()
        .map(|(j, call)| {
            let at = |field: &str| format!("messages[{i}].tool_calls[{j}].{field}");
            if call.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(OpenAiError::invalid(
                    at("type"),
                    format!("`{}` must be `function`", at("type")),
                ));
            }
            if call.id.is_empty() {
                return Err(OpenAiError::invalid(
                    at("id"),
                    format!("`{}` must not be empty", at("id")),
                ));
            }
            Ok(ToolCall {
                id: call.id,
                name: call.function.name,
                arguments: call.function.arguments,
            })
        })
        .collect()
}

/// `choices[].message.tool_calls[]`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallOut {
    /// `call_...`
    pub id: String,
    /// `function`
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCallOut {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// `choices[].delta.tool_calls[]` of a stream: the first delta of a call has its `id`,
/// `type` and `function.name`; later ones add to `function.arguments`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    /// Which call of the message this adds to, from 0.
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// The id of call `index` of job `job_id`: unique per answer, stable across retries of
/// the rendering.
pub(crate) fn call_id(job_id: &str, index: usize) -> String {
    let digits: String = job_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(22)
        .collect();
    format!("call_{digits}{index}")
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// What the parser releases: text to send as content, a complete call, or a call released
/// as it is generated (its start, then pieces of its arguments' JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Text(String),
    Call(ParsedCall),
    CallStart { name: String },
    Arguments(String),
}

const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";
const MARKERS: [&str; 3] = [TOOL_CALL_OPEN, MISTRAL_CALLS, PYTHON_TAG];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: the answer may be bare JSON.
    Start,
    /// Content; watching for a marker.
    Text,
    /// Inside `<tool_call>`, until `</tool_call>`.
    Tagged,
    /// Inside `<tool_call>`, the call's start released: its arguments object is streamed
    /// until its brackets balance, then the rest of the block is dropped.
    TaggedArguments(JsonScan),
    /// After `[TOOL_CALLS]` or `<|python_tag|>`: a JSON value of calls follows.
    Listed(&'static str),
    /// After a streamed call's arguments: the rest of its block, up to `</tool_call>`, is
    /// dropped.
    TaggedTail,
    /// A bare JSON value that may be calls.
    Bare,
    /// After a call: whitespace and `;` are dropped; more calls may follow.
    AfterCall,
}

/// Reads an answer's text, piece by piece as it is generated, into content and calls.
#[derive(Debug)]
pub(crate) struct CallParser {
    names: Vec<String>,
    state: State,
    /// Text received and not released yet.
    held: String,
}

impl CallParser {
    pub fn new(names: Vec<String>) -> Self {
        CallParser {
            names,
            state: State::Start,
            held: String::new(),
        }
    }

    /// Takes the next piece of text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out, false) {}
        out
    }

    /// The generation ended: releases everything still held.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        while self.step(&mut out, true) {}
        out
    }

    /// The whole of `text` at once.
    pub fn parse_all(names: Vec<String>, text: &str) -> Vec<Piece> {
        let mut parser = CallParser::new(names);
        let mut pieces = parser.push(text);
        pieces.extend(parser.finish());
        merge_text(pieces)
    }

    /// Advances over the held text; `true` when it changed state and should run again.
    fn step(&mut self, out: &mut Vec<Piece>, end: bool) -> bool {
        match self.state {
            State::Start | State::AfterCall => {
                let after_call = self.state == State::AfterCall;
                let skip: &[char] = if after_call {
                    &[' ', '\t', '\r', '\n', ';']
                } else {
                    &[]
                };
                let trimmed = self.held.trim_start_matches(skip).trim_start();
                // `[TOOL_CALLS]` starts like a JSON list: a marker is looked for first.
                if MARKERS.iter().any(|m| trimmed.starts_with(m)) {
                    self.held = trimmed.to_owned();
                    self.state = State::Text;
                    return true;
                }
                if !end && !trimmed.is_empty() && MARKERS.iter().any(|m| m.starts_with(trimmed)) {
                    return false;
                }
                match trimmed.chars().next() {
                    None => {
                        if end {
                            if !after_call {
                                push_text(out, std::mem::take(&mut self.held));
                            }
                            self.held.clear();
                        }
                        false
                    }
                    Some('{' | '[') => {
                        if after_call {
                            self.held = trimmed.to_owned();
                        }
                        self.state = State::Bare;
                        true
                    }
                    Some(_) => {
                        if after_call {
                            self.held = trimmed.to_owned();
                        }
                        self.state = State::Text;
                        true
                    }
                }
            }
            State::Text => {
                let found = MARKERS
                    .iter()
                    .filter_map(|m| self.held.find(m).map(|at| (at, *m)))
                    .min_by_key(|(at, _)| *at);
                if let Some((at, marker)) = found {
                    let rest = self.held.split_off(at);
                    push_text(out, std::mem::take(&mut self.held));
                    self.held = rest[marker.len()..].to_owned();
                    self.state = if marker == TOOL_CALL_OPEN {
                        State::Tagged
                    } else {
                        State::Listed(marker)
                    };
                    return true;
                }
                // Hold back an ending that may be the start of a marker.
                let keep = if end {
                    0
                } else {
                    marker_prefix_len(&self.held)
                };
                let release = self.held.len() - keep;
                let rest = self.held.split_off(release);
                push_text(out, std::mem::replace(&mut self.held, rest));
                false
            }
            State::Tagged => {
                if let Some(at) = self.held.find(TOOL_CALL_CLOSE) {
                    let inner = self.held[..at].to_owned();
                    self.held = self.held[at + TOOL_CALL_CLOSE.len()..].to_owned();
                    match calls_in(&inner, None) {
                        Some(calls) => {
                            out.extend(calls.into_iter().map(Piece::Call));
                            self.state = State::AfterCall;
                        }
                        None => {
                            push_text(out, format!("{TOOL_CALL_OPEN}{inner}{TOOL_CALL_CLOSE}"));
                            self.state = State::Text;
                        }
                    }
                    return true;
                }
                // `{"name": "f", "arguments": {` is enough to start the call and stream its
                // arguments as they come.
                if let Some((name, arguments_at)) = call_start(&self.held) {
                    out.push(Piece::CallStart { name });
                    self.held = self.held[arguments_at..].to_owned();
                    self.state = State::TaggedArguments(JsonScan::default());
                    return true;
                }
                if end {
                    // The generation stopped before the closing tag (an end-of-turn token or
                    // the token limit): a complete object inside is still the call.
                    let inner = std::mem::take(&mut self.held);
                    match calls_in(&inner, None) {
                        Some(calls) => out.extend(calls.into_iter().map(Piece::Call)),
                        None => push_text(out, format!("{TOOL_CALL_OPEN}{inner}")),
                    }
                    self.state = State::AfterCall;
                }
                false
            }
            State::TaggedArguments(mut scan) => {
                let closed_at = scan.feed(&self.held);
                match closed_at {
                    Some(at) => {
                        let rest = self.held.split_off(at);
                        out.push(Piece::Arguments(std::mem::replace(&mut self.held, rest)));
                        // What is left of the block (`}` and the closing tag) is markup.
                        self.held = match self.held.find(TOOL_CALL_CLOSE) {
                            Some(close) => {
                                self.state = State::AfterCall;
                                self.held[close + TOOL_CALL_CLOSE.len()..].to_owned()
                            }
                            None => {
                                self.state = State::TaggedTail;
                                std::mem::take(&mut self.held)
                            }
                        };
                        true
                    }
                    None => {
                        if !self.held.is_empty() {
                            out.push(Piece::Arguments(std::mem::take(&mut self.held)));
                        }
                        self.state = State::TaggedArguments(scan);
                        false
                    }
                }
            }
            State::TaggedTail => {
                if let Some(close) = self.held.find(TOOL_CALL_CLOSE) {
                    self.held = self.held[close + TOOL_CALL_CLOSE.len()..].to_owned();
                    self.state = State::AfterCall;
                    return true;
                }
                if end {
                    self.held.clear();
                }
                false
            }
            State::Listed(marker) => {
                let body = self.held.trim_start();
                match body.chars().next() {
                    None if !end => false,
                    Some('{' | '[') => match json_end(body) {
                        Some(len) => {
                            let value = body[..len].to_owned();
                            let rest = body[len..].to_owned();
                            match calls_in(&value, None) {
                                Some(calls) => {
                                    out.extend(calls.into_iter().map(Piece::Call));
                                    self.held = rest;
                                    self.state = State::AfterCall;
                                }
                                None => {
                                    push_text(out, format!("{marker}{value}"));
                                    self.held = rest;
                                    self.state = State::Text;
                                }
                            }
                            true
                        }
                        None if end => {
                            push_text(out, format!("{marker}{}", std::mem::take(&mut self.held)));
                            false
                        }
                        None => false,
                    },
                    _ => {
                        // Not JSON (e.g. a built-in tool's `name.call(...)`): plain text.
                        let held = std::mem::take(&mut self.held);
                        push_text(out, format!("{marker}{held}"));
                        self.state = State::Text;
                        true
                    }
                }
            }
            State::Bare => match json_end(self.held.trim_start()) {
                Some(len) => {
                    let lead = self.held.len() - self.held.trim_start().len();
                    let value = self.held[..lead + len].to_owned();
                    let rest = self.held[lead + len..].to_owned();
                    match calls_in(&value, Some(&self.names)) {
                        Some(calls) => {
                            out.extend(calls.into_iter().map(Piece::Call));
                            self.state = State::AfterCall;
                        }
                        None => {
                            push_text(out, value);
                            self.state = State::Text;
                        }
                    }
                    self.held = rest;
                    true
                }
                None => {
                    if end {
                        push_text(out, std::mem::take(&mut self.held));
                    }
                    false
                }
            },
        }
    }
}

fn push_text(out: &mut Vec<Piece>, text: String) {
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
}

/// Joins consecutive texts, and a streamed call's start and arguments into one call.
fn merge_text(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (merged.last_mut(), piece) {
            (Some(Piece::Text(last)), Piece::Text(text)) => last.push_str(&text),
            (Some(Piece::Call(call)), Piece::Arguments(text)) => call.arguments.push_str(&text),
            (_, Piece::CallStart { name }) => merged.push(Piece::Call(ParsedCall {
                name,
                arguments: String::new(),
            })),
            (_, piece) => merged.push(piece),
        }
    }
    merged
}

/// The name in `{"name": "f", "arguments": {` (or `"parameters"`) at the start of `text`
/// (after whitespace), and where the arguments object starts; `None` until all of that has
/// arrived, or when the text is not that (a name with escapes is left to the whole parse).
fn call_start(text: &str) -> Option<(String, usize)> {
    let mut rest = text.trim_start().strip_prefix('{')?.trim_start();
    rest = rest.strip_prefix("\"name\"")?.trim_start();
    rest = rest.strip_prefix(':')?.trim_start();
    rest = rest.strip_prefix('"')?;
    let end = rest.find(['"', '\\'])?;
    if rest.as_bytes()[end] != b'"' {
        return None;
    }
    let name = rest[..end].to_owned();
    rest = rest[end + 1..].trim_start();
    rest = rest.strip_prefix(',')?.trim_start();
    rest = rest
        .strip_prefix("\"arguments\"")
        .or_else(|| rest.strip_prefix("\"parameters\""))?
        .trim_start();
    rest = rest.strip_prefix(':')?.trim_start();
    rest.starts_with('{')
        .then(|| (name, text.len() - rest.len()))
}

/// The length of the longest ending of `text` that is a proper prefix of a marker.
fn marker_prefix_len(text: &str) -> usize {
    MARKERS
        .iter()
        .flat_map(|m| (1..m.len()).rev().map(move |n| &m[..n]))
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// Where the JSON object or array `text` starts with ends (bytes), once its brackets
/// balance outside strings; `None` while it is incomplete.
fn json_end(text: &str) -> Option<usize> {
    JsonScan::default().feed(text)
}

/// The brackets of a JSON value read so far, outside strings, for a value that arrives in
/// pieces: how many are open, and whether the scan is inside a string or after a backslash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct JsonScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Reads `text` on from where the last piece ended: where (bytes into `text`) the value's
    /// brackets balance, or `None` while they do not yet.
    fn feed(&mut self, text: &str) -> Option<usize> {
        for (at, byte) in text.bytes().enumerate() {
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(at + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// The calls `text` (one JSON value) holds: a call object or a list of them. With `names`,
/// every call must name one of them (bare JSON is only a call when it is clearly one).
fn calls_in(text: &str, names: Option<&[String]>) -> Option<Vec<ParsedCall>> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    let objects = match value {
        Value::Array(items) if !items.is_empty() => items,
        Value::Object(_) => vec![value],
        _ => return None,
    };
    let calls: Vec<ParsedCall> = objects
        .into_iter()
        .map(|object| match object {
            Value::Object(map) => call_of(map),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match names {
        Some(names) if !calls.iter().all(|c| names.contains(&c.name)) => None,
        _ => Some(calls),
    }
}

/// One call object: `{"name", "arguments"}` (Hermes, Mistral), `{"name", "parameters"}`
/// (Llama), or either wrapped as `{"type": "function", "function": {...}}`.
fn call_of(mut map: Map<String, Value>) -> Option<ParsedCall> {
    if let Some(Value::Object(function)) = map.remove("function") {
        return call_of(function);
    }
    let Some(Value::String(name)) = map.remove("name") else {
        return None;
    };
    let arguments = match map.remove("arguments").or_else(|| map.remove("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(text)) => text,
        Some(value @ Value::Object(_)) => value.to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
