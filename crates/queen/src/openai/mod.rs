//! The queen's OpenAI-compatible API: `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /v1/chat/completions` and `POST /v1/completions`, streaming and not.
//!
//! It is a boundary, not a second pipeline. A request body is parsed into the contract's
//! `infer` operation (every parameter checked and named in errors), run as a job of the
//! queen's own job server (so scheduling, cold starts, failover, queueing and cancellation
//! are those of `POST /v1/jobs`), and the job's `JobEvent`s are rendered here into OpenAI's
//! JSON answers and SSE chunks. Failures use OpenAI's error object, mapped once from rbee's
//! error codes. A client that goes away cancels its job.
//!
//! Tool calls (`tools`, `tool_choice`) are `tools`'s: the worker's chat template offers the
//! functions, and the answer's text is read back into calls here.
//!
//! `n` choices are `n` jobs whose answers are merged (`choices`).
//!
//! It is not the rest of OpenAI's API (embeddings, audio, images): parameters rbee cannot
//! honour are refused by name, never silently ignored.

mod body;
mod choices;
mod error;
pub(crate) mod format;
mod models;
mod render;
mod request;
mod respond;
mod routes;
mod tools;

pub(crate) use routes::router;

/// What the OpenAPI document needs from this module: the routes and the types they use.
pub(crate) mod doc {
    pub(crate) use super::body::{
        ChatCompletionRequest, ChatMessageIn, ChatToolCallIn, CompletionRequest, ContentIn,
        ContentPart, FunctionCallIn, FunctionIn, NamedFunction, NamedToolChoice, PromptIn, RoleIn,
        StopIn, StreamOptions, ToolChoiceIn, ToolIn,
    };
    pub(crate) use super::error::{ErrorObject, ErrorResponse};
    pub(crate) use super::format::{JsonSchemaIn, ResponseFormatIn};
    pub(crate) use super::models::{Model, ModelList};
    pub(crate) use super::render::{
        AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, Completion,
        CompletionChunk, Delta, PromptTokensDetails, TextChoice, UsageOut,
    };
    pub(crate) use super::routes::{
        __path_chat_completions, __path_completions, __path_get_model, __path_list_models,
    };
    pub(crate) use super::tools::{FunctionCallOut, FunctionDelta, ToolCallDelta, ToolCallOut};
}
