//! OpenAI's response and chunk shapes, built from what a job reported. Pure: no I/O, so the
//! exact wire format is tested here.

use rbee_contract::{FinishReason, TokenLogprobs, Usage};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ErrorResponse;
use super::request::Kind;
use super::tools::{FunctionCallOut, FunctionDelta, ToolCallDelta, ToolCallOut, ToolUse, call_id};

/// `POST /v1/chat/completions` without `stream`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// `null` unless the request set `logprobs`.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length`, or `tool_calls` when the answer called functions.
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`
    pub role: &'static str,
    /// `null` when the answer is only calls.
    pub content: Option<String>,
    /// The functions the answer calls, when the request offered tools and it called any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// `POST /v1/completions` without `stream`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// `text_completion`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    /// `null` unless the request set `logprobs`.
    pub logprobs: Option<TextLogprobs>,
    /// `null` in every streamed chunk but the last.
    pub finish_reason: Option<&'static str>,
}

/// One `data:` line of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// One choice; none in the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Present (`null` but in the last chunk) when `stream_options.include_usage` is true.
    #[serde(skip_serializing_if = "Presence::is_absent")]
    #[schema(value_type = Option<UsageOut>)]
    pub usage: Presence<UsageOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// The log-probabilities of the tokens whose text this chunk carries, when the request
    /// set `logprobs`; else `null`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// OpenAI's `choices[].logprobs` of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    /// One entry per generated token, in order.
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    /// The token's own text, decoded alone (U+FFFD for a token that holds part of a
    /// multi-byte character).
    pub token: String,
    /// Natural log of its probability under the model (before sampling settings); -9999
    /// stands for 0.
    pub logprob: f32,
    /// The token's own bytes: not UTF-8 alone for a token that holds part of a multi-byte
    /// character (whose `token` is then U+FFFD); consecutive tokens' bytes join into it.
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens at this step, most likely first.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// OpenAI's `choices[].logprobs` of a (legacy) completion: parallel lists, one entry per
/// generated token.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// For each token, the `logprobs` most likely tokens as `{token: logprob}`, most likely
    /// first (two tokens with the same text keep the likelier).
    #[schema(value_type = Vec<Object>)]
    pub top_logprobs: Vec<TopMap>,
    /// Where, in characters of the whole completion's `text`, the text released up to the
    /// token ends: a token whose text is held back shares the offset of the next one.
    pub text_offset: Vec<u32>,
}

/// A JSON object of token texts to log-probabilities that keeps its order.
#[derive(Debug, Clone, PartialEq)]
pub struct TopMap(Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

/// A generated token's log-probabilities, with the offset (in characters of the completion's
/// text) at which the text released before it ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenEntry {
    pub logprobs: TokenLogprobs,
    pub offset: u32,
}

fn chat_logprobs(entries: &[TokenEntry]) -> ChatLogprobs {
    ChatLogprobs {
        content: entries
            .iter()
            .map(|e| ChatTokenLogprob {
                token: e.logprobs.token.clone(),
                logprob: e.logprobs.logprob,
                bytes: e
                    .logprobs
                    .bytes
                    .clone()
                    .unwrap_or_else(|| e.logprobs.token.as_bytes().to_vec()),
                top_logprobs: e
                    .logprobs
                    .top_logprobs
                    .iter()
                    .map(|t| ChatTopLogprob {
                        token: t.token.clone(),
                        logprob: t.logprob,
                        bytes: t
                            .bytes
                            .clone()
                            .unwrap_or_else(|| t.token.as_bytes().to_vec()),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn text_logprobs(entries: &[TokenEntry]) -> TextLogprobs {
    TextLogprobs {
        tokens: entries.iter().map(|e| e.logprobs.token.clone()).collect(),
        token_logprobs: entries.iter().map(|e| e.logprobs.logprob).collect(),
        top_logprobs: entries
            .iter()
            .map(|e| {
                let mut top: Vec<(String, f32)> = Vec::new();
                for t in &e.logprobs.top_logprobs {
                    if !top.iter().any(|(token, _)| *token == t.token) {
                        top.push((t.token.clone(), t.logprob));
                    }
                }
                TopMap(top)
            })
            .collect(),
        text_offset: entries.iter().map(|e| e.offset).collect(),
    }
}

/// What a chunk adds to the message: the role in the first chunk, then text.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A call's start (`index`, `id`, `type`, `function.name`) or more of its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One `data:` line of a streamed completion.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionChunk {
    pub id: String,
    /// `text_completion`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Presence::is_absent")]
    #[schema(value_type = Option<UsageOut>)]
    pub usage: Presence<UsageOut>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Present when the worker reported how many prompt tokens its prompt cache supplied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens not evaluated again because the worker's KV cache held them.
    pub cached_tokens: u32,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            prompt_tokens_details: u
                .cached_tokens
                .map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }
    }
}

/// A field that is left out, `null`, or a value: OpenAI's chunks carry `"usage": null` only
/// when the client asked for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence<T> {
    Absent,
    Null,
    Value(T),
}

impl<T> Presence<T> {
    fn is_absent(&self) -> bool {
        matches!(self, Presence::Absent)
    }
}

impl<T: Serialize> Serialize for Presence<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Presence::Value(v) => v.serialize(s),
            Presence::Absent | Presence::Null => s.serialize_none(),
        }
    }
}

/// What the job has told so far about the text's token counts, for `usage` when the
/// terminal event carries none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Tally {
    pub fn usage(self, reported: Option<Usage>) -> UsageOut {
        reported
            .unwrap_or_else(|| Usage::new(self.prompt_tokens, self.completion_tokens))
            .into()
    }
}

pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        // `complete` ends non-generating jobs; an infer job never ends with it.
        FinishReason::Stop | FinishReason::Complete => "stop",
    }
}

/// Renders one request's answer: the ids and echoes every chunk repeats.
#[derive(Debug, Clone)]
pub(crate) struct Renderer {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// `Some` when streaming; whether chunks carry `usage`.
    pub include_usage: bool,
    /// Whether the request asked for log-probabilities (`logprobs` is then never `null` in
    /// an answer or a content chunk).
    pub logprobs: bool,
    /// Set when the model was offered tools: the answer is read for calls.
    pub tools: Option<ToolUse>,
    /// The job's id, from which call ids are made.
    pub job_id: String,
}

impl Renderer {
    pub fn new(kind: Kind, job_id: &str, created: u64, model: String, include_usage: bool) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        Renderer {
            kind,
            id: format!("{prefix}-{job_id}"),
            created,
            model,
            include_usage,
            logprobs: false,
            tools: None,
            job_id: job_id.to_owned(),
        }
    }

    /// The same renderer, reading the answer for calls to `tools`.
    pub fn with_tools(self, tools: Option<ToolUse>) -> Self {
        Renderer { tools, ..self }
    }

    /// The id of the answer's call `index`.
    pub fn call_id(&self, index: usize) -> String {
        call_id(&self.job_id, index)
    }

    /// The two chunks that stream call `index`: its id, type and name, then its arguments.
    pub fn tool_call_chunks(&self, index: usize, name: &str, arguments: &str) -> [String; 2] {
        [
            self.tool_call_start_chunk(index, name),
            self.tool_call_arguments_chunk(index, arguments),
        ]
    }

    /// The chunk that opens call `index`: its id, type and name, and empty arguments.
    pub fn tool_call_start_chunk(&self, index: usize, name: &str) -> String {
        self.tool_call_chunk(ToolCallDelta {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            id: Some(self.call_id(index)),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(name.to_owned()),
                arguments: Some(String::new()),
            },
        })
    }

    /// A chunk that adds `arguments` to call `index`'s arguments.
    pub fn tool_call_arguments_chunk(&self, index: usize, arguments: &str) -> String {
        self.tool_call_chunk(ToolCallDelta {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: Some(arguments.to_owned()),
            },
        })
    }

    fn tool_call_chunk(&self, call: ToolCallDelta) -> String {
        let delta = Delta {
            role: None,
            content: None,
            tool_calls: Some(vec![call]),
        };
        self.chat_chunk(delta, None, None)
    }

    /// The whole answer of a non-streaming chat request that called functions (or was read
    /// for calls): `content` is `None` when the answer is only calls.
    pub fn chat_response(
        &self,
        content: Option<String>,
        calls: Vec<(String, String)>,
        reason: FinishReason,
        usage: UsageOut,
        tokens: &[TokenEntry],
    ) -> String {
        // The token limit is `length` even after a call: see `respond`'s stream.
        let finish_reason = if calls.is_empty() || reason == FinishReason::Length {
            finish_reason(reason)
        } else {
            "tool_calls"
        };
        let tool_calls = calls
            .into_iter()
            .enumerate()
            .map(|(index, (name, arguments))| ToolCallOut {
                id: self.call_id(index),
                kind: "function",
                function: FunctionCallOut { name, arguments },
            })
            .collect();
        encode(&ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    tool_calls,
                },
                logprobs: self.chat_logprobs(tokens),
                finish_reason,
            }],
            usage,
        })
    }

    /// The same renderer, answering with log-probabilities.
    pub fn with_logprobs(self, logprobs: bool) -> Self {
        Renderer { logprobs, ..self }
    }

    fn usage_field(&self) -> Presence<UsageOut> {
        if self.include_usage {
            Presence::Null
        } else {
            Presence::Absent
        }
    }

    /// The first chunk of a chat stream: the role and empty content. Completions have none.
    pub fn opening_chunk(&self) -> Option<String> {
        match self.kind {
            Kind::Chat => Some(self.chat_chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                None,
                None,
            )),
            Kind::Text => None,
        }
    }

    #[cfg(test)]
    pub fn content_chunk(&self, text: &str) -> String {
        self.content_chunk_with(text, &[])
    }

    /// A chunk with `text` and the log-probabilities of the tokens that released it.
    pub fn content_chunk_with(&self, text: &str, tokens: &[TokenEntry]) -> String {
        match self.kind {
            Kind::Chat => self.chat_chunk(
                Delta {
                    role: None,
                    content: Some(text.to_string()),
                    tool_calls: None,
                },
                None,
                self.chat_logprobs(tokens),
            ),
            Kind::Text => self.text_chunk(text, None, self.text_logprobs(tokens)),
        }
    }

    /// The chunk that ends the choice, with an empty delta.
    #[cfg(test)]
    pub fn finish_chunk(&self, reason: FinishReason) -> String {
        self.finish_chunk_with(reason, &[])
    }

    /// The chunk that ends the choice, carrying the log-probabilities of `tokens` whose text
    /// was never released (they ended inside a stop sequence); `null` when there are none.
    #[cfg(test)]
    pub fn finish_chunk_with(&self, reason: FinishReason, tokens: &[TokenEntry]) -> String {
        self.finish_chunk_as(finish_reason(reason), tokens)
    }

    /// [`finish_chunk_with`](Self::finish_chunk_with) with the reason as OpenAI names it
    /// (`tool_calls` after a streamed call).
    pub fn finish_chunk_as(&self, reason: &'static str, tokens: &[TokenEntry]) -> String {
        let reason = Some(reason);
        let tokens = if tokens.is_empty() {
            None
        } else {
            Some(tokens)
        };
        match self.kind {
            Kind::Chat => self.chat_chunk(
                Delta {
                    role: None,
                    content: None,
                    tool_calls: None,
                },
                reason,
                tokens.and_then(|t| self.chat_logprobs(t)),
            ),
            Kind::Text => self.text_chunk("", reason, tokens.and_then(|t| self.text_logprobs(t))),
        }
    }

    fn chat_logprobs(&self, tokens: &[TokenEntry]) -> Option<ChatLogprobs> {
        self.logprobs.then(|| chat_logprobs(tokens))
    }

    fn text_logprobs(&self, tokens: &[TokenEntry]) -> Option<TextLogprobs> {
        self.logprobs.then(|| text_logprobs(tokens))
    }

    /// The last chunk when `include_usage` is set: no choices, the usage.
    pub fn usage_chunk(&self, usage: UsageOut) -> String {
        let usage = Presence::Value(usage);
        match self.kind {
            Kind::Chat => encode(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage,
            }),
            Kind::Text => encode(&CompletionChunk {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage,
            }),
        }
    }

    /// The whole answer of a non-streaming request, as JSON.
    #[cfg(test)]
    pub fn response(&self, text: String, reason: FinishReason, usage: UsageOut) -> String {
        self.response_with(text, reason, usage, &[])
    }

    /// [`response`](Self::response) with the log-probabilities of every generated token.
    pub fn response_with(
        &self,
        text: String,
        reason: FinishReason,
        usage: UsageOut,
        tokens: &[TokenEntry],
    ) -> String {
        let finish_reason = finish_reason(reason);
        match self.kind {
            Kind::Chat => self.chat_response(Some(text), Vec::new(), reason, usage, tokens),
            Kind::Text => encode(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![TextChoice {
                    index: 0,
                    text,
                    logprobs: self.text_logprobs(tokens),
                    finish_reason: Some(finish_reason),
                }],
                usage,
            }),
        }
    }

    fn chat_chunk(
        &self,
        delta: Delta,
        finish_reason: Option<&'static str>,
        logprobs: Option<ChatLogprobs>,
    ) -> String {
        encode(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
        })
    }

    fn text_chunk(
        &self,
        text: &str,
        finish_reason: Option<&'static str>,
        logprobs: Option<TextLogprobs>,
    ) -> String {
        encode(&CompletionChunk {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![TextChoice {
                index: 0,
                text: text.to_string(),
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
        })
    }
}

/// The error chunk of a stream that fails after it started.
pub(crate) fn error_chunk(error: &ErrorResponse) -> String {
    encode(error)
}

fn encode<T: Serialize>(value: &T) -> String {
    // Plain structs of strings and numbers always encode.
    serde_json::to_string(value).unwrap_or_else(|err| {
        tracing::error!(%err, "an OpenAI response could not be encoded");
        r#"{"error":{"message":"the response could not be encoded","type":"server_error","param":null,"code":"internal"}}"#.to_string()
    })
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
