//! The JSON bodies of `POST /v1/chat/completions` and `POST /v1/completions` as clients send
//! them: what serde reads (recording the path of a failing field) and what the OpenAPI
//! document describes. Checking and converting them is `request`'s job.
//!
//! OpenAI parameters rbee cannot honour are fields here too, hidden from the document, so
//! that they are refused by name rather than reported as unknown. The fields both requests
//! share are written out in each: serde cannot combine `flatten` with `deny_unknown_fields`.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::format::ResponseFormatIn;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// A model id from `GET /v1/models`, or a model reference a hive can load.
    pub model: String,
    /// The conversation, rendered with the model's chat template.
    pub messages: Vec<ChatMessageIn>,
    /// 0 to 2; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// In (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// With a temperature above 0, the same seed gives the same text; without one, each
    /// request samples with a fresh random seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Up to 16 non-empty sequences of at most 256 bytes; generation stops before the first
    /// one produced.
    #[serde(default)]
    pub stop: Option<StopIn>,
    /// -2 to 2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An end-user id; logged only.
    #[serde(default)]
    pub user: Option<String>,
    /// rbee extension (as in vLLM): sample among the `top_k` most likely tokens; 0 is off.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// rbee extension (as in vLLM): drop tokens below `min_p` times the top probability.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// rbee extension (as in vLLM): penalize tokens already in the context; 1 is none.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Only `{}`.
    #[serde(default)]
    #[schema(ignore)]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(ignore)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(ignore)]
    pub service_tier: Option<String>,
    /// How many choices to generate, 1 to 8 (default 1). Each is a sequence of its own, run
    /// in one batch where a worker has the slots; with `seed`, choice `i` samples with
    /// `seed + i`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<u32>,
    /// Deprecated alias of `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Report each generated token's log-probability in `choices[].logprobs.content`: the
    /// log-softmax of the model's logits at that step, before temperature, penalties and
    /// sampling filters.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0 to 20, with `logprobs` true: also the most likely tokens at each step.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Functions the model may call (at most 128). They are written into the prompt by the
    /// model's chat template; calls come back in `message.tool_calls` (`delta.tool_calls`
    /// when streaming) with `finish_reason` `tool_calls`.
    #[serde(default)]
    pub tools: Option<Vec<ToolIn>>,
    /// `auto` (the default with tools): the model answers or calls; `none`: the tools are
    /// not offered; `required`, or `{"type": "function", "function": {"name": ...}}`: the
    /// answer is one call (of that function), constrained while sampling so that its
    /// arguments are valid JSON for the function's `parameters`.
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceIn>,
    /// Default true; false reports only the first call of an answer.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    #[schema(ignore)]
    pub functions: Option<Vec<Value>>,
    #[serde(default)]
    #[schema(ignore)]
    pub function_call: Option<Value>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"name": ..., "schema": {...}}}`: the answer is JSON (valid against the
    /// schema), enforced while sampling.
    #[serde(default)]
    pub response_format: Option<ResponseFormatIn>,
    #[serde(default)]
    #[schema(ignore)]
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    #[schema(ignore)]
    pub store: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    /// Raw text, not templated: a string or a list of exactly one string.
    pub prompt: PromptIn,
    /// 0 to 2; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// In (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// With a temperature above 0, the same seed gives the same text; without one, each
    /// request samples with a fresh random seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Up to 16 non-empty sequences of at most 256 bytes; generation stops before the first
    /// one produced.
    #[serde(default)]
    pub stop: Option<StopIn>,
    /// -2 to 2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An end-user id; logged only.
    #[serde(default)]
    pub user: Option<String>,
    /// rbee extension (as in vLLM): sample among the `top_k` most likely tokens; 0 is off.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// rbee extension (as in vLLM): drop tokens below `min_p` times the top probability.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// rbee extension (as in vLLM): penalize tokens already in the context; 1 is none.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Only `{}`.
    #[serde(default)]
    #[schema(ignore)]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(ignore)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(ignore)]
    pub service_tier: Option<String>,
    /// How many choices to generate, 1 to 8 (default 1). Each is a sequence of its own, run
    /// in one batch where a worker has the slots; with `seed`, choice `i` samples with
    /// `seed + i`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<u32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// 0 to 5: report each generated token's log-probability and those of the `logprobs`
    /// most likely tokens at its step, in `choices[].logprobs` (the log-softmax of the
    /// model's logits, before temperature, penalties and sampling filters).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Only `false`.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Only `1`.
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    #[schema(ignore)]
    pub suffix: Option<String>,
    /// As in chat completions (an extension to OpenAI's legacy endpoint, as in llama-server
    /// and vLLM): the completion is JSON (valid against the schema), enforced while sampling.
    #[serde(default)]
    pub response_format: Option<ResponseFormatIn>,
}

/// Parameters both endpoints share, taken out of either body. `null` in the body is the
/// same as leaving a parameter out.
pub(super) struct SamplingParams {
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<u64>,
    pub(super) stop: Option<StopIn>,
    pub(super) presence_penalty: Option<f32>,
    pub(super) frequency_penalty: Option<f32>,
    pub(super) stream: Option<bool>,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) user: Option<String>,
    pub(super) top_k: Option<u32>,
    pub(super) min_p: Option<f32>,
    pub(super) repetition_penalty: Option<f32>,
    pub(super) logit_bias: Option<Map<String, Value>>,
    pub(super) metadata: Option<Map<String, Value>>,
    pub(super) service_tier: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    /// `system`, `developer` (the same as `system`), `user`, `assistant` or `tool`.
    pub role: RoleIn,
    /// A string, or a list of `{"type": "text", "text": "..."}` parts.
    #[serde(default)]
    pub content: Option<ContentIn>,
    /// A `tool` message: the function that answered.
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant message's calls (its `content` may then be `null`).
    #[serde(default)]
    pub tool_calls: Option<Vec<ChatToolCallIn>>,
    /// A `tool` message: the `id` of the call whose result its `content` is.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    #[schema(ignore)]
    pub function_call: Option<Value>,
    #[serde(default)]
    #[schema(ignore)]
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoleIn {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ContentIn {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A function the model may call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolIn {
    /// `function`
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionIn,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionIn {
    /// 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON Schema object of the arguments.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// Accepted and not needed: a call is constrained to the schema whenever `tool_choice`
    /// requires one.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `none`, `auto`, `required`, or one function.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Function(NamedToolChoice),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    /// `function`
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

/// A call an assistant message made, as `message.tool_calls` returned it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatToolCallIn {
    pub id: String,
    /// `function`
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCallIn {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// One part of a message's content. Only `text` parts are supported.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// Moves the shared fields out of a request body.
macro_rules! sampling_of {
    ($request:expr) => {
        SamplingParams {
            temperature: $request.temperature,
            top_p: $request.top_p,
            seed: $request.seed,
            stop: $request.stop,
            presence_penalty: $request.presence_penalty,
            frequency_penalty: $request.frequency_penalty,
            stream: $request.stream,
            stream_options: $request.stream_options,
            user: $request.user,
            top_k: $request.top_k,
            min_p: $request.min_p,
            repetition_penalty: $request.repetition_penalty,
            logit_bias: $request.logit_bias,
            metadata: $request.metadata,
            service_tier: $request.service_tier,
        }
    };
}
pub(super) use sampling_of;
