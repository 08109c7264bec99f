//! The one set of rules an `infer` request must meet, applied alike by the queen's job API,
//! its OpenAI routes and the worker, so that a value one accepts is never refused by another.
//!
//! What depends on the model (the prompt fitting the context, a chat template rendering) is
//! the worker's to check; everything here needs only the request.
//!
//! The ranges follow OpenAI where OpenAI defines the parameter (temperature, top_p, the
//! penalties) and llama-server for the rest (top_k, min_p, repeat_penalty). Stop sequences
//! are the exception: OpenAI's API takes at most 4, llama-server any number; rbee takes up
//! to [`MAX_STOP_SEQUENCES`], so an OpenAI client's request always fits and a job API client
//! gets room for a chat format's several end markers.

use std::fmt;

use crate::InferRequest;

/// Most stop sequences a request may carry.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes. The worker holds back up to this much generated text
/// while it could still be the start of a stop sequence, so a longer one would delay
/// streaming by that much.
pub const MAX_STOP_BYTES: usize = 256;
/// Highest `temperature` (OpenAI's bound; above it sampling is close to uniform noise).
pub const MAX_TEMPERATURE: f32 = 2.0;
/// `presence_penalty` and `frequency_penalty` lie in `[-MAX_PENALTY, MAX_PENALTY]`, as in OpenAI.
pub const MAX_PENALTY: f32 = 2.0;
/// Most alternatives `logprobs` may ask for at each token (OpenAI's `top_logprobs` bound).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// A field of an [`InferRequest`] that breaks a rule: `field` is the contract's name for it
/// (callers with other names, such as OpenAI's `repetition_penalty`, translate it) and
/// `reason` completes a sentence about it, e.g. "must be between 0 and 2, got 3".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidField {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidField {
            field,
            reason: reason.into(),
        }
    }

    /// The message for a client that calls the field `name`.
    pub fn message_for(&self, name: &str) -> String {
        format!("`{name}` {}", self.reason)
    }
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message_for(self.field))
    }
}

impl std::error::Error for InvalidField {}

impl InferRequest {
    /// Checks every field against rbee's limits; the first field that breaks one is returned.
    ///
    /// `model` must hold a non-blank name (its grammar is [`crate::model_ref`]'s); exactly
    /// one of `prompt` (non-empty) and `messages` (at least one) is given; `max_tokens` is at
    /// least 1; `temperature` in `[0, 2]`; `top_p` in `(0, 1]`; `top_k` any (0 turns the
    /// filter off); `min_p` in `[0, 1]`; `repeat_penalty` above 0; the presence and frequency
    /// penalties in `[-2, 2]`; `seed` any; `stop` at most 16 non-empty sequences of at most
    /// 256 bytes each; `logprobs` at most 20; a `response_format` schema is a JSON object
    /// (whether it compiles is checked where the constraint is built, at the queen and the
    /// worker). A non-finite number is refused wherever a number is taken.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.model.trim().is_empty() {
            return Err(InvalidField::new("model", "must not be empty"));
        }
        match (&self.prompt, &self.messages) {
            (Some(_), Some(_)) => {
                return Err(InvalidField::new(
                    "messages",
                    "cannot be given together with `prompt`: give one of them",
                ));
            }
            (None, None) => {
                return Err(InvalidField::new(
                    "prompt",
                    "is required (or `messages`, for a chat)",
                ));
            }
            (Some(prompt), None) if prompt.is_empty() => {
                return Err(InvalidField::new("prompt", "must not be empty"));
            }
            (None, Some(messages)) if messages.is_empty() => {
                return Err(InvalidField::new(
                    "messages",
                    "must hold at least one message",
                ));
            }
            _ => {}
        }
        if self.max_tokens == Some(0) {
            return Err(InvalidField::new("max_tokens", "must be at least 1"));
        }
        within("temperature", self.temperature, 0.0, MAX_TEMPERATURE)?;
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(InvalidField::new(
                "top_p",
                format!("must be above 0 and at most 1, got {p}"),
            ));
        }
        within("min_p", self.min_p, 0.0, 1.0)?;
        if let Some(r) = self.repeat_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return Err(InvalidField::new(
                "repeat_penalty",
                format!("must be above 0 (1 turns it off), got {r}"),
            ));
        }
        within(
            "presence_penalty",
            self.presence_penalty,
            -MAX_PENALTY,
            MAX_PENALTY,
        )?;
        within(
            "frequency_penalty",
            self.frequency_penalty,
            -MAX_PENALTY,
            MAX_PENALTY,
        )?;
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(InvalidField::new(
                "stop",
                format!(
                    "takes at most {MAX_STOP_SEQUENCES} sequences, got {}",
                    self.stop.len()
                ),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(InvalidField::new("stop", "sequences must not be empty"));
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(InvalidField::new(
                "stop",
                format!(
                    "sequences may be at most {MAX_STOP_BYTES} bytes long, got one of {}",
                    long.len()
                ),
            ));
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(InvalidField::new(
                "logprobs",
                format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ));
        }
        if let Some(crate::ResponseFormat::JsonSchema { schema }) = &self.response_format
            && !schema.is_object()
        {
            return Err(InvalidField::new(
                "response_format",
                "needs a `schema` that is a JSON Schema object",
            ));
        }
        self.validate_tools()
    }

    /// `tools` come with `messages`, each named by letters, digits, `_` and `-` (at most 64,
    /// names distinct) with `parameters` a JSON Schema object; only assistant messages carry
    /// `tool_calls`, and a `tool` message names the call it answers.
    fn validate_tools(&self) -> Result<(), InvalidField> {
        if !self.tools.is_empty() && self.messages.is_none() {
            return Err(InvalidField::new(
                "tools",
                "are offered in a chat: give `messages`, not `prompt`",
            ));
        }
        for (i, tool) in self.tools.iter().enumerate() {
            if !is_function_name(&tool.name) {
                return Err(InvalidField::new(
                    "tools",
                    format!(
                        "has a function named {:?}: a name is 1 to {MAX_FUNCTION_NAME} letters, digits, `_` or `-`",
                        tool.name
                    ),
                ));
            }
            if self.tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(InvalidField::new(
                    "tools",
                    format!("names the function `{}` twice", tool.name),
                ));
            }
            if tool.parameters.as_ref().is_some_and(|p| !p.is_object()) {
                return Err(InvalidField::new(
                    "tools",
                    format!(
                        "gives function `{}` `parameters` that are not a JSON Schema object",
                        tool.name
                    ),
                ));
            }
        }
        for message in self.messages.iter().flatten() {
            if !message.tool_calls.is_empty() && message.role != crate::ChatRole::Assistant {
                return Err(InvalidField::new(
                    "messages",
                    "has `tool_calls` on a message that is not the assistant's",
                ));
            }
            if message.role == crate::ChatRole::Tool && message.tool_call_id.is_none() {
                return Err(InvalidField::new(
                    "messages",
                    "has a `tool` message without `tool_call_id`",
                ));
            }
        }
        Ok(())
    }
}

/// The longest function name, OpenAI's limit.
pub const MAX_FUNCTION_NAME: usize = 64;

/// Whether `name` is a valid function name (OpenAI's rule: `^[a-zA-Z0-9_-]{1,64}$`).
pub fn is_function_name(name: &str) -> bool {
    (1..=MAX_FUNCTION_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn within(field: &'static str, value: Option<f32>, min: f32, max: f32) -> Result<(), InvalidField> {
    match value {
        Some(v) if !(v.is_finite() && (min..=max).contains(&v)) => Err(InvalidField::new(
            field,
            format!("must be between {min} and {max}, got {v}"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatMessage, ChatRole};

    fn prompt() -> InferRequest {
        InferRequest {
            model: "m".into(),
            prompt: Some("hi".into()),
            ..InferRequest::default()
        }
    }

    fn chat(messages: Vec<ChatMessage>) -> InferRequest {
        InferRequest {
            prompt: None,
            messages: Some(messages),
            ..prompt()
        }
    }

    fn tool(name: &str) -> crate::Tool {
        crate::Tool {
            name: name.into(),
            description: None,
            parameters: Some(serde_json::json!({"type": "object"})),
        }
    }

    fn user() -> ChatMessage {
        ChatMessage::new(ChatRole::User, "hi")
    }

    /// Each row: a request and the field it is refused for, or `None` when it is accepted.
    /// Every limit is probed on both sides of its edge.
    #[test]
    fn the_rules_table() {
        let stops = |n: usize, len: usize| InferRequest {
            stop: vec!["x".repeat(len); n],
            ..prompt()
        };
        let rows: Vec<(&str, InferRequest, Option<&str>)> = vec![
            ("a plain prompt", prompt(), None),
            ("a chat", chat(vec![user()]), None),
            (
                "a chat message may be empty",
                chat(vec![ChatMessage::new(ChatRole::Assistant, "")]),
                None,
            ),
            (
                "tools in a chat",
                InferRequest {
                    tools: vec![tool("get_weather"), tool("a-b_9")],
                    ..chat(vec![user()])
                },
                None,
            ),
            (
                "tools with a prompt",
                InferRequest {
                    tools: vec![tool("get_weather")],
                    ..prompt()
                },
                Some("tools"),
            ),
            (
                "a function name with a space",
                InferRequest {
                    tools: vec![tool("get weather")],
                    ..chat(vec![user()])
                },
                Some("tools"),
            ),
            (
                "a function name of 65 characters",
                InferRequest {
                    tools: vec![tool(&"f".repeat(65))],
                    ..chat(vec![user()])
                },
                Some("tools"),
            ),
            (
                "a function named twice",
                InferRequest {
                    tools: vec![tool("f"), tool("f")],
                    ..chat(vec![user()])
                },
                Some("tools"),
            ),
            (
                "parameters that are not an object",
                InferRequest {
                    tools: vec![crate::Tool {
                        parameters: Some(serde_json::json!("object")),
                        ..tool("f")
                    }],
                    ..chat(vec![user()])
                },
                Some("tools"),
            ),
            (
                "a tool message without its call's id",
                chat(vec![user(), ChatMessage::new(ChatRole::Tool, "42")]),
                Some("messages"),
            ),
            (
                "a tool message with its call's id",
                chat(vec![
                    user(),
                    ChatMessage {
                        tool_calls: vec![crate::ToolCall {
                            id: "call_1".into(),
                            name: "f".into(),
                            arguments: "{}".into(),
                        }],
                        ..ChatMessage::new(ChatRole::Assistant, "")
                    },
                    ChatMessage {
                        tool_call_id: Some("call_1".into()),
                        ..ChatMessage::new(ChatRole::Tool, "42")
                    },
                ]),
                None,
            ),
            (
                "tool calls on a user message",
                chat(vec![ChatMessage {
                    tool_calls: vec![crate::ToolCall {
                        id: "call_1".into(),
                        name: "f".into(),
                        arguments: "{}".into(),
                    }],
                    ..user()
                }]),
                Some("messages"),
            ),
            (
                "blank model",
                InferRequest {
                    model: " \t".into(),
                    ..prompt()
                },
                Some("model"),
            ),
            (
                "empty model",
                InferRequest {
                    model: String::new(),
                    ..prompt()
                },
                Some("model"),
            ),
            (
                "no prompt form",
                InferRequest {
                    prompt: None,
                    ..prompt()
                },
                Some("prompt"),
            ),
            (
                "both prompt forms",
                InferRequest {
                    messages: Some(vec![user()]),
                    ..prompt()
                },
                Some("messages"),
            ),
            (
                "empty prompt",
                InferRequest {
                    prompt: Some(String::new()),
                    ..prompt()
                },
                Some("prompt"),
            ),
            ("no messages", chat(Vec::new()), Some("messages")),
            (
                "max_tokens 0",
                InferRequest {
                    max_tokens: Some(0),
                    ..prompt()
                },
                Some("max_tokens"),
            ),
            (
                "max_tokens 1",
                InferRequest {
                    max_tokens: Some(1),
                    ..prompt()
                },
                None,
            ),
            (
                "max_tokens huge (the worker caps it by the context)",
                InferRequest {
                    max_tokens: Some(u32::MAX),
                    ..prompt()
                },
                None,
            ),
            (
                "temperature 0",
                InferRequest {
                    temperature: Some(0.0),
                    ..prompt()
                },
                None,
            ),
            (
                "temperature 2",
                InferRequest {
                    temperature: Some(2.0),
                    ..prompt()
                },
                None,
            ),
            (
                "temperature 2.01",
                InferRequest {
                    temperature: Some(2.01),
                    ..prompt()
                },
                Some("temperature"),
            ),
            (
                "temperature -0.1",
                InferRequest {
                    temperature: Some(-0.1),
                    ..prompt()
                },
                Some("temperature"),
            ),
            (
                "temperature NaN",
                InferRequest {
                    temperature: Some(f32::NAN),
                    ..prompt()
                },
                Some("temperature"),
            ),
            (
                "temperature inf",
                InferRequest {
                    temperature: Some(f32::INFINITY),
                    ..prompt()
                },
                Some("temperature"),
            ),
            (
                "top_p 1",
                InferRequest {
                    top_p: Some(1.0),
                    ..prompt()
                },
                None,
            ),
            (
                "top_p 0.01",
                InferRequest {
                    top_p: Some(0.01),
                    ..prompt()
                },
                None,
            ),
            (
                "top_p 0",
                InferRequest {
                    top_p: Some(0.0),
                    ..prompt()
                },
                Some("top_p"),
            ),
            (
                "top_p 1.5",
                InferRequest {
                    top_p: Some(1.5),
                    ..prompt()
                },
                Some("top_p"),
            ),
            (
                "top_p NaN",
                InferRequest {
                    top_p: Some(f32::NAN),
                    ..prompt()
                },
                Some("top_p"),
            ),
            (
                "top_k 0 turns the filter off",
                InferRequest {
                    top_k: Some(0),
                    ..prompt()
                },
                None,
            ),
            (
                "top_k 1",
                InferRequest {
                    top_k: Some(1),
                    ..prompt()
                },
                None,
            ),
            (
                "top_k huge",
                InferRequest {
                    top_k: Some(u32::MAX),
                    ..prompt()
                },
                None,
            ),
            (
                "min_p 0",
                InferRequest {
                    min_p: Some(0.0),
                    ..prompt()
                },
                None,
            ),
            (
                "min_p 1",
                InferRequest {
                    min_p: Some(1.0),
                    ..prompt()
                },
                None,
            ),
            (
                "min_p -0.1",
                InferRequest {
                    min_p: Some(-0.1),
                    ..prompt()
                },
                Some("min_p"),
            ),
            (
                "min_p 1.1",
                InferRequest {
                    min_p: Some(1.1),
                    ..prompt()
                },
                Some("min_p"),
            ),
            (
                "repeat_penalty 1",
                InferRequest {
                    repeat_penalty: Some(1.0),
                    ..prompt()
                },
                None,
            ),
            (
                "repeat_penalty 5",
                InferRequest {
                    repeat_penalty: Some(5.0),
                    ..prompt()
                },
                None,
            ),
            (
                "repeat_penalty 0",
                InferRequest {
                    repeat_penalty: Some(0.0),
                    ..prompt()
                },
                Some("repeat_penalty"),
            ),
            (
                "repeat_penalty inf",
                InferRequest {
                    repeat_penalty: Some(f32::INFINITY),
                    ..prompt()
                },
                Some("repeat_penalty"),
            ),
            (
                "presence_penalty -2",
                InferRequest {
                    presence_penalty: Some(-2.0),
                    ..prompt()
                },
                None,
            ),
            (
                "presence_penalty 2",
                InferRequest {
                    presence_penalty: Some(2.0),
                    ..prompt()
                },
                None,
            ),
            (
                "presence_penalty 2.5",
                InferRequest {
                    presence_penalty: Some(2.5),
                    ..prompt()
                },
                Some("presence_penalty"),
            ),
            (
                "frequency_penalty -2.5",
                InferRequest {
                    frequency_penalty: Some(-2.5),
                    ..prompt()
                },
                Some("frequency_penalty"),
            ),
            (
                "frequency_penalty NaN",
                InferRequest {
                    frequency_penalty: Some(f32::NAN),
                    ..prompt()
                },
                Some("frequency_penalty"),
            ),
            (
                "any seed",
                InferRequest {
                    seed: Some(u64::MAX),
                    ..prompt()
                },
                None,
            ),
            ("16 stop sequences", stops(MAX_STOP_SEQUENCES, 1), None),
            (
                "17 stop sequences",
                stops(MAX_STOP_SEQUENCES + 1, 1),
                Some("stop"),
            ),
            ("an empty stop sequence", stops(1, 0), Some("stop")),
            (
                "a stop sequence of 256 bytes",
                stops(1, MAX_STOP_BYTES),
                None,
            ),
            (
                "a stop sequence of 257 bytes",
                stops(1, MAX_STOP_BYTES + 1),
                Some("stop"),
            ),
            (
                "logprobs 20",
                InferRequest {
                    logprobs: Some(MAX_TOP_LOGPROBS),
                    ..prompt()
                },
                None,
            ),
            (
                "logprobs 21",
                InferRequest {
                    logprobs: Some(MAX_TOP_LOGPROBS + 1),
                    ..prompt()
                },
                Some("logprobs"),
            ),
        ];
        for (name, request, refused) in rows {
            match (request.validate(), refused) {
                (Ok(()), None) => {}
                (Err(err), Some(field)) => {
                    assert_eq!(err.field, field, "{name}: {err}");
                    assert!(
                        err.to_string().starts_with(&format!("`{field}` ")),
                        "{name}: the message names the field: {err}"
                    );
                }
                (verdict, expected) => {
                    panic!("{name}: got {verdict:?}, expected a refusal for {expected:?}")
                }
            }
        }
    }

    #[test]
    fn a_json_schema_must_be_an_object() {
        let with = |schema: serde_json::Value| InferRequest {
            response_format: Some(crate::ResponseFormat::JsonSchema { schema }),
            ..prompt()
        };
        with(serde_json::json!({"type": "object"}))
            .validate()
            .unwrap();
        for not_an_object in [serde_json::json!(true), serde_json::json!("object")] {
            let err = with(not_an_object).validate().unwrap_err();
            assert_eq!(err.field, "response_format");
            assert!(err.reason.contains("JSON Schema object"), "{err}");
        }
    }

    #[test]
    fn a_caller_can_name_the_field_its_own_way() {
        let err = InferRequest {
            repeat_penalty: Some(-1.0),
            ..prompt()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.message_for("repetition_penalty"),
            "`repetition_penalty` must be above 0 (1 turns it off), got -1"
        );
    }
}
