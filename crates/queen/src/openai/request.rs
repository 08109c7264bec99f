//! Request bodies of `POST /v1/chat/completions` and `POST /v1/completions`, parsed into a
//! [`ValidRequest`]: the contract's `infer` operation plus what only the OpenAI boundary needs
//! (streaming, usage chunk, the echo of `model`).
//!
//! The body is deserialized with the failing field's path recorded, so every `400` names the
//! parameter. OpenAI parameters rbee cannot honour are refused by name; each is accepted only
//! with the value that asks for nothing (e.g. `best_of: 1`, `logit_bias: {}`),
//! because ignoring any other value would change the answer without telling the client.
//!
//! The limits of the sampling parameters are the contract's ([`InferRequest::validate`]), the
//! same the job API applies, so the same value gets the same verdict on either API; only the
//! names in the error differ where OpenAI's differ (`repetition_penalty`,
//! `max_completion_tokens`).

use rbee_contract::{ChatMessage, ChatRole, InferRequest};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::body::{
    ChatCompletionRequest, ChatMessageIn, CompletionRequest, ContentIn, PromptIn, RoleIn,
    SamplingParams, StopIn, sampling_of,
};
use super::error::OpenAiError;
use super::format;
use super::tools::{self, ToolUse};

/// Most alternatives per token `POST /v1/completions` takes in `logprobs` (OpenAI's bound).
const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// A count of alternatives within the contract's bound (20).
fn capped(n: u32, param: &str) -> Result<u8, OpenAiError> {
    let max = rbee_contract::validation::MAX_TOP_LOGPROBS;
    u8::try_from(n).ok().filter(|&n| n <= max).ok_or_else(|| {
        OpenAiError::invalid(
            param,
            format!("`{param}` must be between 0 and {max}, got {n}"),
        )
    })
}

/// Which endpoint a request came to; it decides the chunk and response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

/// A request that can be run: nothing downstream re-checks it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidRequest {
    pub kind: Kind,
    /// The `infer` operation to run; its `model` is the one echoed in responses.
    pub infer: InferRequest,
    /// `None`: one JSON answer. `Some`: an SSE stream of chunks.
    pub stream: Option<StreamMode>,
    /// OpenAI's end-user id: logged, never used.
    pub user: Option<String>,
    /// Set when the model is offered tools: its answer is read for calls.
    pub tools: Option<ToolUse>,
    /// How many choices to generate (`n`, 1 to [`MAX_CHOICES`](super::choices::MAX_CHOICES)).
    pub n: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamMode {
    /// `stream_options.include_usage`: a last chunk with `usage` and no choices.
    pub include_usage: bool,
}

/// Parses a chat completion body.
pub(crate) fn parse_chat(body: &[u8]) -> Result<ValidRequest, OpenAiError> {
    let request: ChatCompletionRequest = deserialize(body)?;
    // OpenAI's rule: alternatives are only given with the sampled tokens' own logprobs.
    let logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (true, top) => Some(capped(top.unwrap_or(0), "top_logprobs")?),
        (false, None | Some(0)) => None,
        (false, Some(_)) => {
            return Err(OpenAiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            ));
        }
    };
    let tool_plan = tools::plan(
        request.tools,
        request.tool_choice,
        request.parallel_tool_calls,
    )?;
    refuse_unless(
        request.functions.as_ref().is_none_or(Vec::is_empty),
        "functions",
    )?;
    refuse_unless(
        request
            .function_call
            .as_ref()
            .is_none_or(|c| c.as_str() == Some("none")),
        "function_call",
    )?;
    // The call that `required` or a named function constrains the answer to is compiled from
    // the functions' `parameters`: a schema that does not compile is the tools' fault, which
    // the later check of the request's format would blame on a `response_format` the client
    // never gave.
    if let Some(constraint) = &tool_plan.constraint {
        format::check_compiles(constraint).map_err(|err| {
            let err = err.strip_prefix("response_format: ").unwrap_or(&err);
            OpenAiError::invalid(
                "tools",
                format!(
                    "`tool_choice` constrains the answer to a call, but the called function's \
                     `parameters` do not compile as a JSON Schema: {err}"
                ),
            )
        })?;
    }
    let response_format = format::response_format(request.response_format);
    // A required call is itself a constraint on the answer's shape: two cannot both hold.
    if tool_plan.constraint.is_some() && response_format.is_some() {
        return Err(OpenAiError::invalid(
            "tool_choice",
            "`tool_choice` `required` or a named function makes the answer a call, which \
             cannot also follow `response_format`: give one of them",
        ));
    }
    refuse_unless(
        request
            .modalities
            .as_ref()
            .is_none_or(|m| m.iter().all(|m| m == "text")),
        "modalities",
    )?;
    refuse_unless(request.store.is_none_or(|s| !s), "store")?;

    let max_tokens = match (request.max_tokens, request.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(OpenAiError::invalid(
                "max_completion_tokens",
                "give `max_completion_tokens` or `max_tokens`, not two different values",
            ));
        }
        (a, b) => b.or(a),
    };
    let messages = parse_messages(request.messages)?;
    let infer = InferRequest {
        model: request.model,
        messages: Some(messages),
        max_tokens,
        logprobs,
        tools: tool_plan.offered,
        response_format: tool_plan.constraint.or(response_format),
        ..InferRequest::default()
    };
    let mut valid = finish(Kind::Chat, infer, request.n, sampling_of!(request))?;
    valid.tools = tool_plan.tool_use;
    Ok(valid)
}

/// Parses a (legacy) completion body.
pub(crate) fn parse_completion(body: &[u8]) -> Result<ValidRequest, OpenAiError> {
    let request: CompletionRequest = deserialize(body)?;
    let logprobs = match request.logprobs {
        Some(n) if n > MAX_COMPLETION_LOGPROBS => {
            return Err(OpenAiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {n}"),
            ));
        }
        Some(n) => Some(capped(n, "logprobs")?),
        None => None,
    };
    refuse_unless(request.echo.is_none_or(|e| !e), "echo")?;
    refuse_unless(request.best_of.is_none_or(|n| n == 1), "best_of")?;
    refuse_unless(
        request.suffix.as_ref().is_none_or(String::is_empty),
        "suffix",
    )?;
    let prompt = match request.prompt {
        PromptIn::One(prompt) => prompt,
        PromptIn::Many(mut prompts) if prompts.len() == 1 => prompts.remove(0),
        PromptIn::Many(prompts) => {
            return Err(OpenAiError::invalid(
                "prompt",
                format!(
                    "`prompt` is a list of {} strings; rbee completes exactly one prompt per request",
                    prompts.len()
                ),
            ));
        }
    };
    let infer = InferRequest {
        model: request.model,
        prompt: Some(prompt),
        max_tokens: request.max_tokens,
        logprobs,
        response_format: format::response_format(request.response_format),
        ..InferRequest::default()
    };
    finish(Kind::Text, infer, request.n, sampling_of!(request))
}

/// What both endpoints check and fill in the same way.
fn finish(
    kind: Kind,
    mut infer: InferRequest,
    n: Option<u32>,
    sampling: SamplingParams,
) -> Result<ValidRequest, OpenAiError> {
    infer.model = infer.model.trim().to_string();
    let max = super::choices::MAX_CHOICES;
    let n = match n.map(u8::try_from) {
        None => 1,
        Some(Ok(n)) if (1..=max).contains(&n) => n,
        Some(_) => {
            return Err(OpenAiError::invalid(
                "n",
                format!(
                    "`n` must be between 1 and {max}: each choice is a sequence of a worker's \
                     batch (got {})",
                    n.unwrap_or_default()
                ),
            ));
        }
    };
    let SamplingParams {
        temperature,
        top_p,
        seed,
        stop,
        presence_penalty,
        frequency_penalty,
        stream,
        stream_options,
        user,
        top_k,
        min_p,
        repetition_penalty,
        logit_bias,
        metadata,
        service_tier,
    } = sampling;
    refuse_unless(logit_bias.as_ref().is_none_or(Map::is_empty), "logit_bias")?;
    // Metadata and the service tier describe billing and storage, not the answer.
    let _ = (metadata, service_tier);

    let stop = match stop {
        None => Vec::new(),
        Some(StopIn::One(s)) => vec![s],
        Some(StopIn::Many(list)) => list,
    };
    let stream = match (stream.unwrap_or(false), stream_options) {
        (false, Some(_)) => {
            return Err(OpenAiError::invalid(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        (false, None) => None,
        (true, options) => Some(StreamMode {
            include_usage: options.and_then(|o| o.include_usage).unwrap_or(false),
        }),
    };
    infer.temperature = temperature;
    infer.top_p = top_p;
    infer.seed = seed;
    infer.stop = stop;
    infer.presence_penalty = presence_penalty;
    infer.frequency_penalty = frequency_penalty;
    infer.top_k = top_k;
    infer.min_p = min_p;
    infer.repeat_penalty = repetition_penalty;
    infer.validate().map_err(|err| {
        let param = match (err.field, kind) {
            ("repeat_penalty", _) => "repetition_penalty",
            ("max_tokens", Kind::Chat) => "max_completion_tokens",
            ("logprobs", Kind::Chat) => "top_logprobs",
            (field, _) => field,
        };
        OpenAiError::invalid(param, err.message_for(param))
    })?;
    Ok(ValidRequest {
        kind,
        infer,
        stream,
        user,
        tools: None,
        n,
    })
}

fn parse_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, OpenAiError> {
    let mut parsed: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let message = parse_message(i, message)?;
        // OpenAI's rule: a tool result answers a call an earlier assistant message made.
        if let Some(id) = &message.tool_call_id
            && !parsed
                .iter()
                .any(|m| m.tool_calls.iter().any(|c| &c.id == id))
        {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].tool_call_id"),
                format!(
                    "`messages[{i}].tool_call_id` is `{id}`, which no earlier assistant \
                     message's `tool_calls` has"
                ),
            ));
        }
        parsed.push(message);
    }
    Ok(parsed)
}

fn parse_message(i: usize, message: ChatMessageIn) -> Result<ChatMessage, OpenAiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let role = match message.role {
        RoleIn::System | RoleIn::Developer => ChatRole::System,
        RoleIn::User => ChatRole::User,
        RoleIn::Assistant => ChatRole::Assistant,
        RoleIn::Tool => ChatRole::Tool,
        RoleIn::Function => {
            return Err(OpenAiError::invalid(
                at("role"),
                "`function` messages (OpenAI's deprecated function calling) are not supported: \
                 use `tool` messages with `tool_call_id`",
            ));
        }
    };
    let tool_calls = match message.tool_calls {
        Some(calls) if !calls.is_empty() && role != ChatRole::Assistant => {
            return Err(OpenAiError::invalid(
                at("tool_calls"),
                format!(
                    "`{}` is only allowed on assistant messages",
                    at("tool_calls")
                ),
            ));
        }
        Some(calls) => tools::message_calls(i, calls)?,
        None => Vec::new(),
    };
    if role == ChatRole::Tool && message.tool_call_id.is_none() {
        return Err(OpenAiError::invalid(
            at("tool_call_id"),
            format!(
                "`{}` is required: a tool message answers the call with that id",
                at("tool_call_id")
            ),
        ));
    }
    let refused = [
        ("name", message.name.is_some() && role != ChatRole::Tool),
        (
            "tool_call_id",
            message.tool_call_id.is_some() && role != ChatRole::Tool,
        ),
        ("function_call", message.function_call.is_some()),
        ("refusal", message.refusal.is_some()),
    ];
    if let Some((field, _)) = refused.iter().find(|(_, given)| *given) {
        return Err(OpenAiError::invalid(
            at(field),
            format!("`{}` is not supported by rbee", at(field)),
        ));
    }
    let content = match message.content {
        // An assistant message that only calls has no content.
        None if !tool_calls.is_empty() => String::new(),
        None => {
            return Err(OpenAiError::invalid(
                at("content"),
                format!("`{}` is required", at("content")),
            ));
        }
        Some(ContentIn::Text(text)) => text,
        Some(ContentIn::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                let param = format!("messages[{i}].content[{j}]");
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    ("text", None) => {
                        return Err(OpenAiError::invalid(
                            format!("{param}.text"),
                            format!("`{param}.text` is required"),
                        ));
                    }
                    (other, _) => {
                        return Err(OpenAiError::invalid(
                            format!("{param}.type"),
                            format!(
                                "content parts of type `{other}` are not supported: rbee takes text only"
                            ),
                        ));
                    }
                }
            }
            // Parts are one message: joined as lines, the way vLLM and llama-server do.
            texts.join("\n")
        }
    };
    Ok(ChatMessage {
        tool_calls,
        tool_call_id: message.tool_call_id,
        name: message.name,
        ..ChatMessage::new(role, content)
    })
}

/// Deserializes `body`, naming the failing parameter in the error.
fn deserialize<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, OpenAiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        OpenAiError::bad_request(None, format!("the request body is not valid JSON: {e}"))
    })?;
    if !value.is_object() {
        return Err(OpenAiError::bad_request(
            None,
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        field_error(&path, &inner)
    })
}

/// Turns serde's complaint into a message that names the parameter.
fn field_error(path: &str, inner: &str) -> OpenAiError {
    if let Some(rest) = inner.strip_prefix("unknown field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        // The recorded path already ends with the unknown field.
        let param = match path {
            "." | "" => field.to_string(),
            path => path.to_string(),
        };
        return OpenAiError::invalid(
            param.clone(),
            format!("unrecognized request argument: `{param}` (rbee does not support it)"),
        );
    }
    if let Some(rest) = inner.strip_prefix("missing field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        let param = match path {
            "." | "" => field.to_string(),
            parent => format!("{parent}.{field}"),
        };
        return OpenAiError::invalid(param.clone(), format!("`{param}` is required"));
    }
    let hint = match path.rsplit('.').next().unwrap_or(path) {
        "stop" => "a string or a list of strings".to_string(),
        "prompt" => "a string or a list of one string (token lists are not supported)".to_string(),
        p if p.ends_with("content") => "a string or a list of text parts".to_string(),
        _ => inner.to_string(),
    };
    OpenAiError::invalid(path.to_string(), format!("invalid `{path}`: {hint}"))
}

fn refuse_unless(harmless: bool, param: &str) -> Result<(), OpenAiError> {
    if harmless {
        Ok(())
    } else {
        Err(OpenAiError::invalid(
            param,
            format!("`{param}` is not supported by rbee"),
        ))
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
