use serde::{Deserialize, Serialize};

/// A unit of work submitted to any daemon with `POST /v1/jobs`.
///
/// Tagged by `operation`, e.g. `{"operation":"infer","model":"...","prompt":"..."}`.
/// A daemon accepts the subset it can carry out and answers `400 unsupported_operation`
/// for the rest.
// `Infer` is much larger than the other variants; an operation is parsed once per request and
// moved a few times, so it is not boxed (which would change every construction and match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "operation", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum Operation {
    Infer(InferRequest),
    WorkerSpawn(WorkerSpawnRequest),
    WorkerList(HiveTarget),
    WorkerGet(WorkerTarget),
    WorkerDelete(WorkerTarget),
    ModelDownload(ModelTarget),
    ModelList(HiveTarget),
    ModelGet(ModelTarget),
    ModelDelete(ModelTarget),
}

impl Operation {
    /// The stable name of the operation, as it appears in the `operation` tag.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Infer(_) => "infer",
            Operation::WorkerSpawn(_) => "worker_spawn",
            Operation::WorkerList(_) => "worker_list",
            Operation::WorkerGet(_) => "worker_get",
            Operation::WorkerDelete(_) => "worker_delete",
            Operation::ModelDownload(_) => "model_download",
            Operation::ModelList(_) => "model_list",
            Operation::ModelGet(_) => "model_get",
            Operation::ModelDelete(_) => "model_delete",
        }
    }
}

/// A model reference as the user wrote it: `hf:org/repo`, `hf:org/repo:file.gguf` or a path.
/// Daemons resolve it; on the wire it is a plain string.
pub type ModelRef = String;

/// Text generation. Exactly one of `prompt` (raw completion) and `messages` (chat, rendered
/// with the model's template) must be given; sampling fields left out take the daemon's defaults.
/// Every daemon checks the fields with [`InferRequest::validate`] (the limits are in
/// [`crate::validation`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// A model name, a path or an `hf:` reference; not blank.
    pub model: ModelRef,
    /// Raw text to continue; not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A conversation, at least one message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Functions the model may call, with `messages` only: the model's chat template writes
    /// them into the prompt in its own format (a template without tool support gets them
    /// described in a system message). The calls come back as text in that format; the
    /// queen's OpenAI API parses them into `tool_calls`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// At least 1; capped by the room the prompt leaves in the context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// 0 to 2; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Above 0, at most 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// 0 turns the filter off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Above 0; 1 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// The same seed gives the same text; without one, each request samples with a fresh
    /// random seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Up to 16 non-empty sequences of at most 256 bytes; the text ends before the first one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Asks for log-probabilities: every `token` event then carries the token's
    /// log-probability and those of the `logprobs` most likely tokens at its step (0 to 20;
    /// 0 gives the token's own only). Left out, nothing is computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
    /// Constrains the answer to JSON, enforced while sampling (tokens that would break the
    /// JSON or the schema are never chosen): `{"type": "json_object"}` for any JSON object,
    /// `{"type": "json_schema", "schema": {...}}` for JSON valid against a JSON Schema. Left
    /// out, the answer is free text. A schema that cannot be compiled is refused with `400`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

/// The shape an `infer` answer must have (see [`InferRequest::response_format`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Any JSON object. (A struct variant, so that a stray field such as `schema` is refused
    /// rather than ignored.)
    JsonObject {},
    /// JSON valid against `schema`, a JSON Schema (an object).
    JsonSchema {
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        schema: serde_json::Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChatRole {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: ChatRole,
    /// May be empty, e.g. for an assistant message that only calls tools.
    pub content: String,
    /// An assistant message's function calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the id of the call whose result it carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` message: the name of the function that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message of plain text.
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A function call an assistant message made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, as JSON text.
    pub arguments: String,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Letters, digits, `_` and `-`, at most 64.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema (an object) of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub parameters: Option<serde_json::Value>,
}

/// Spawn a worker for `model` on `device` (`cpu`, `cuda:N`, `metal:N`) of a hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerSpawnRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive_id: Option<String>,
    pub model: ModelRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Names a hive; `None` means the only hive (an error when there are several).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HiveTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive_id: Option<String>,
    pub worker_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive_id: Option<String>,
    pub model: ModelRef,
}

/// The answer to `POST /v1/jobs` (status 201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobCreated {
    pub job_id: String,
    pub sse_url: String,
}
