//! The worker's half of the job protocol: admit `infer` operations, run them on the
//! inference thread.

use std::sync::Arc;

use job_server::{ApiError, JobContext, JobExecutor, JobFailure, JobOutcome, JobResult};
use rbee_contract::{ChatRole, ErrorCode, FinishReason, InferRequest, JobEvent, Operation, Usage};
use rbee_engine::{
    ChatTool, ChatToolCall, ChatTurn, EngineError, ErrorKind, GenerationParams, PreparedRequest,
    Prompt,
};
use tokio::sync::{mpsc, oneshot};

use crate::inference::Task;
use crate::state::{InFlight, LoadState, WorkerShared};

pub(crate) struct InferExecutor {
    shared: Arc<WorkerShared>,
}

impl InferExecutor {
    pub fn new(shared: Arc<WorkerShared>) -> Self {
        InferExecutor { shared }
    }
}

/// An admitted generation: the prompt is tokenized and fits the context, the parameters are
/// in range, and the request holds its place in the queue.
pub(crate) struct InferJob {
    request: PreparedRequest,
    /// The request's prefix keys, kept with what its KV cache leaves in the prompt cache.
    prefix_keys: Vec<u64>,
    /// Whether the request is a chat (its answer gets a prefix key of its own).
    chat: bool,
    in_flight: InFlight,
}

impl JobExecutor for InferExecutor {
    type Job = InferJob;

    fn admit(&self, operation: Operation) -> Result<InferJob, ApiError> {
        if self.shared.is_stopping() {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the worker is shutting down",
            ));
        }
        let Operation::Infer(req) = operation else {
            return Err(ApiError::unsupported_operation(format!(
                "a worker only runs `infer`, not `{}`; worker and model operations go to a hive",
                operation.name()
            )));
        };
        let prompter = match (self.shared.load_state(), self.shared.prompter()) {
            (LoadState::Ready { .. }, Some(prompter)) => prompter,
            (LoadState::Failed { message }, _) => {
                return Err(ApiError::new(
                    ErrorCode::ModelLoadFailed,
                    format!("the worker cannot serve: {message}"),
                ));
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the model is still loading; retry shortly",
                ));
            }
        };
        let prefix_keys = rbee_contract::prefix::prefix_keys(&req);
        let chat = req.messages.is_some();
        let (prompt, params) = parse_request(req)?;
        // Tokenizing a long prompt takes milliseconds: keep it off the reactor's other tasks.
        let prepare = || prompter.prepare(prompt, params);
        let prepared = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(prepare)
            }
            _ => prepare(),
        };
        let request = prepared.map_err(engine_api_error)?;
        let in_flight = self.shared.try_enter().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Busy,
                format!(
                    "the worker is busy: {} generating and {} waiting; retry later",
                    self.shared.slots(),
                    self.shared.queue_capacity
                ),
            )
        })?;
        Ok(InferJob {
            request,
            prefix_keys,
            chat,
            in_flight,
        })
    }

    async fn run(&self, job: InferJob, ctx: JobContext) -> JobResult {
        // Every slot was taken when this request entered: it waits behind the ones that
        // were already waiting.
        let slots = self.shared.slots();
        if job.in_flight.ahead >= slots {
            let position = u32::try_from(job.in_flight.ahead + 1 - slots).unwrap_or(u32::MAX);
            ctx.emit(JobEvent::Queued { position })
                .await
                .map_err(|_| cancelled())?;
        }
        let queue = self.shared.queue().ok_or_else(|| {
            JobFailure::new(ErrorCode::ShuttingDown, "the worker is shutting down")
        })?;
        let (done, outcome) = oneshot::channel();
        let task = Task {
            request: job.request,
            prefix_keys: job.prefix_keys,
            chat: job.chat,
            sink: ctx.events.clone(),
            cancel: ctx.cancel.clone(),
            done,
            in_flight: job.in_flight,
            span: tracing::Span::current(),
        };
        queue.try_send(task).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => {
                JobFailure::new(ErrorCode::Busy, "the worker's queue is full; retry later")
            }
            mpsc::error::TrySendError::Closed(_) => {
                JobFailure::new(ErrorCode::ShuttingDown, "the worker is shutting down")
            }
        })?;
        let completion = outcome
            .await
            .map_err(|_| {
                // The inference thread drops a task unanswered only for a job already
                // cancelled; anything else is a fault of the worker's, not the client's.
                if ctx.cancel.is_cancelled() {
                    cancelled()
                } else {
                    JobFailure::internal(
                        "the generation ended without an outcome; see the worker's log",
                    )
                }
            })?
            .map_err(engine_failure)?;
        let usage = Usage::new(
            u32::try_from(completion.prompt_tokens).unwrap_or(u32::MAX),
            u32::try_from(completion.completion_tokens).unwrap_or(u32::MAX),
        )
        .with_cached_tokens(u32::try_from(completion.cached_tokens).unwrap_or(u32::MAX));
        let finish_reason = match completion.finish_reason {
            rbee_engine::FinishReason::Stop => FinishReason::Stop,
            rbee_engine::FinishReason::Length => FinishReason::Length,
            rbee_engine::FinishReason::Cancelled => return Err(cancelled()),
        };
        Ok(JobOutcome::new(finish_reason, Some(usage)))
    }
}

fn cancelled() -> JobFailure {
    JobFailure::new(ErrorCode::Cancelled, "the generation was cancelled")
}

/// Checks the wire request against the contract's limits (the same the queen applies) and
/// turns it into the engine's prompt and parameters; which model `model` names is not
/// checked, since a worker serves exactly one.
fn parse_request(req: InferRequest) -> Result<(Prompt, GenerationParams), ApiError> {
    req.validate()
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
    // `validate` admits exactly one of the two prompt forms.
    let prompt = match req.prompt {
        Some(text) => Prompt::Text(text),
        None => {
            let turns: Vec<ChatTurn> = req
                .messages
                .unwrap_or_default()
                .into_iter()
                .map(|m| ChatTurn {
                    tool_calls: m
                        .tool_calls
                        .into_iter()
                        .map(|c| ChatToolCall {
                            id: c.id,
                            name: c.name,
                            arguments: c.arguments,
                        })
                        .collect(),
                    tool_call_id: m.tool_call_id,
                    name: m.name,
                    ..ChatTurn::new(role_name(m.role), m.content)
                })
                .collect();
            if req.tools.is_empty() {
                Prompt::Chat(turns)
            } else {
                let tools = req
                    .tools
                    .into_iter()
                    .map(|t| ChatTool {
                        name: t.name,
                        description: t.description,
                        parameters: t.parameters,
                    })
                    .collect();
                Prompt::ChatWithTools { turns, tools }
            }
        }
    };
    let defaults = GenerationParams::default();
    let params = GenerationParams {
        max_tokens: req.max_tokens.map(|n| n as usize),
        temperature: req.temperature.unwrap_or(defaults.temperature),
        top_k: req
            .top_k
            .map(|k| k as usize)
            .or(defaults.top_k)
            .filter(|&k| k > 0),
        top_p: req.top_p.or(defaults.top_p),
        min_p: req.min_p.or(defaults.min_p),
        repeat_penalty: req.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        presence_penalty: req.presence_penalty.unwrap_or(defaults.presence_penalty),
        frequency_penalty: req.frequency_penalty.unwrap_or(defaults.frequency_penalty),
        // `defaults` is made for this request: without a seed it samples with a fresh one.
        seed: req.seed.unwrap_or(defaults.seed),
        stop: req.stop,
        logprobs: req.logprobs.map(usize::from),
        response_format: req.response_format.map(output_format),
        ..defaults
    };
    Ok((prompt, params))
}

/// The engine's form of a response format; the engine compiles it when the request is
/// prepared, so a schema that does not compile is refused at admission.
fn output_format(format: rbee_contract::ResponseFormat) -> rbee_engine::OutputFormat {
    use rbee_contract::ResponseFormat;
    use rbee_engine::OutputFormat;
    match format {
        ResponseFormat::JsonObject {} => OutputFormat::JsonObject,
        ResponseFormat::JsonSchema { schema } => OutputFormat::JsonSchema(schema),
    }
}

fn role_name(role: ChatRole) -> &'static str {
    match role {
        ChatRole::System => "system",
        ChatRole::User => "user",
        ChatRole::Assistant => "assistant",
        ChatRole::Tool => "tool",
    }
}

fn error_code(err: &EngineError) -> ErrorCode {
    match err.kind() {
        ErrorKind::ContextLengthExceeded => ErrorCode::ContextLengthExceeded,
        kind if kind.is_client_error() => ErrorCode::BadRequest,
        ErrorKind::Load | ErrorKind::UnsupportedModel | ErrorKind::Device => {
            ErrorCode::ModelLoadFailed
        }
        _ => ErrorCode::Internal,
    }
}

fn engine_api_error(err: EngineError) -> ApiError {
    ApiError::new(error_code(&err), err.to_string())
}

fn engine_failure(err: EngineError) -> JobFailure {
    let code = error_code(&err);
    if code == ErrorCode::Internal {
        tracing::error!(error = %err, "generation failed");
        return JobFailure::internal("generation failed; see the worker's log");
    }
    JobFailure::new(code, err.to_string())
}
