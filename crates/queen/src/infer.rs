//! Running `infer`: choose a worker (or have a hive start one), submit the inference to it
//! and relay its events unchanged. A worker lost before its first token is replaced once;
//! after the first token, losing it ends the job with `worker_lost`, never with a silent
//! truncation.

use std::collections::HashSet;

use job_client::ClientError;
use job_server::{ApiError, JobContext, JobFailure, JobResult, terminal_to_result};
use rbee_contract::{ErrorCode, InferRequest, JobEvent, Operation, WorkerInfo};
use tokio::time::Instant;

use crate::relay::{RelayEnd, relay};
use crate::scheduler::{self, Placement};
use crate::spawn;
use crate::state::{Queen, upstream_failure};

/// The worker's job-creating route for inference.
const INFERENCE_PATH: &str = "/v1/inference";
/// Workers a job is offered to at most (busy or unfit ones count too).
const MAX_ATTEMPTS: usize = 8;
/// Cold starts one job may cause at most: the first and one replacement.
const MAX_COLD_STARTS: u32 = 2;

/// An admitted `infer`: it names a model and exactly one non-empty prompt form, and its
/// sampling values are in range. What depends on the model (the prompt fitting the context)
/// is the worker's to check.
#[derive(Debug)]
pub(crate) struct ValidInfer {
    request: InferRequest,
}

impl ValidInfer {
    pub fn parse(mut request: InferRequest) -> Result<Self, ApiError> {
        let bad = |message: &str| Err(ApiError::bad_request(message));
        // Workers report the model as the hive recorded it, trimmed; scheduling compares
        // exactly, so the request is normalized the same way once, here.
        request.model = request.model.trim().to_string();
        if request.model.is_empty() {
            return bad("`model` must not be empty");
        }
        match (&request.prompt, &request.messages) {
            (Some(_), Some(_)) => return bad("give either `prompt` or `messages`, not both"),
            (None, None) => return bad("`prompt` or `messages` is required"),
            (Some(prompt), None) if prompt.is_empty() => return bad("`prompt` must not be empty"),
            (None, Some(messages)) if messages.is_empty() => {
                return bad("`messages` must not be empty");
            }
            _ => {}
        }
        if request.max_tokens == Some(0) {
            return bad("`max_tokens` must be at least 1");
        }
        if let Some(t) = request.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return bad("`temperature` must be >= 0");
        }
        if let Some(p) = request.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("`top_p` must be in (0, 1]");
        }
        if let Some(p) = request.min_p
            && !(0.0..=1.0).contains(&p)
        {
            return bad("`min_p` must be in [0, 1]");
        }
        Ok(ValidInfer { request })
    }
}

/// What one worker made of the job.
enum Attempt {
    /// The worker produced the job's result.
    Finished(JobResult),
    /// Every slot and queue place is taken; another worker may have room.
    Busy,
    /// The worker cannot take jobs (still loading, stopping); try another.
    Unfit,
    /// The worker went away before its first token.
    Lost,
}

pub(crate) async fn run(queen: &Queen, job: ValidInfer, ctx: &JobContext) -> JobResult {
    let model = job.request.model.clone();
    let operation = Operation::Infer(job.request);
    let mut excluded = HashSet::new();
    let mut busy = Vec::new();
    let mut cold_starts = 0;
    let mut replaced_lost = false;
    for _ in 0..MAX_ATTEMPTS {
        let worker = choose(queen, &model, &excluded, &busy, &mut cold_starts, ctx).await?;
        let id = worker.worker_id.clone();
        match attempt(queen, &worker, &operation, ctx).await? {
            Attempt::Finished(result) => return result,
            Attempt::Busy => busy.push(id.clone()),
            Attempt::Unfit => {}
            Attempt::Lost if !replaced_lost => {
                replaced_lost = true;
                ctx.emit(JobEvent::narration(format!(
                    "worker {id} went away before the first token; trying another worker"
                )))
                .await?;
            }
            Attempt::Lost => {
                return Err(JobFailure::new(
                    ErrorCode::Unavailable,
                    format!(
                        "worker {id} went away before the first token, as did the worker tried before it"
                    ),
                ));
            }
        }
        excluded.insert(id);
    }
    Err(JobFailure::new(
        ErrorCode::Unavailable,
        format!("no worker serving {model} could take the job"),
    ))
}

/// The worker to try next: the best one registered, a loading one once it is ready, or a
/// new one from a hive.
async fn choose(
    queen: &Queen,
    model: &str,
    excluded: &HashSet<String>,
    busy: &[String],
    cold_starts: &mut u32,
    ctx: &JobContext,
) -> Result<WorkerInfo, JobFailure> {
    let limit = queen.config.spawn_timeout;
    let deadline = Instant::now() + limit;
    let mut changes = queen.registry.changes();
    let mut waiting_for: Option<String> = None;
    loop {
        changes.borrow_and_update();
        match scheduler::place(model, &queen.registry.worker_views(), excluded) {
            Placement::Worker(info) => return Ok(info),
            Placement::Spawn if !busy.is_empty() => {
                return Err(JobFailure::new(
                    ErrorCode::Busy,
                    format!(
                        "every worker serving {model} is busy ({}); retry later",
                        busy.join(", ")
                    ),
                ));
            }
            Placement::Spawn if *cold_starts >= MAX_COLD_STARTS => {
                return Err(JobFailure::new(
                    ErrorCode::Unavailable,
                    format!("no worker started for {model} could take the job"),
                ));
            }
            Placement::Spawn => {
                *cold_starts += 1;
                return spawn::cold_start(queen, model, ctx).await;
            }
            Placement::Wait { worker_id } => {
                if waiting_for.as_deref() != Some(worker_id.as_str()) {
                    ctx.emit(JobEvent::narration(format!(
                        "worker {worker_id} is loading {model}; waiting for it"
                    )))
                    .await?;
                    waiting_for = Some(worker_id);
                }
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(JobFailure::internal("the registry went away")),
                    Err(_) => {
                        return Err(JobFailure::new(
                            ErrorCode::Timeout,
                            format!("no worker for {model} became ready within {limit:?}"),
                        ));
                    }
                }
            }
        }
    }
}

async fn attempt(
    queen: &Queen,
    worker: &WorkerInfo,
    operation: &Operation,
    ctx: &JobContext,
) -> Result<Attempt, JobFailure> {
    let _in_flight = queen.registry.enter(&worker.worker_id);
    let id = &worker.worker_id;
    let handle = match queen
        .client(&worker.url)
        .submit_to(INFERENCE_PATH, operation)
        .await
    {
        Ok(handle) => handle,
        Err(err) => return Ok(refused(queen, worker, err)),
    };
    let relayed = relay(handle, ctx, |_| true).await?;
    match relayed.end {
        // A worker that cancels a job the queen did not cancel is shutting down: as good as gone.
        RelayEnd::Terminal(JobEvent::Error {
            code: code @ (ErrorCode::Cancelled | ErrorCode::ShuttingDown),
            message,
        }) if !ctx.cancel.is_cancelled() => {
            tracing::warn!(worker_id = %id, %code, message, "worker ended the job itself");
        }
        RelayEnd::Terminal(event) => {
            let result = terminal_to_result(event)
                .unwrap_or_else(|_| Err(JobFailure::internal("a relayed event was not terminal")));
            return Ok(Attempt::Finished(result));
        }
        RelayEnd::Broken(err) => {
            tracing::warn!(worker_id = %id, error = %err, tokens = relayed.tokens, "lost the worker's stream");
        }
    }
    if relayed.tokens == 0 {
        return Ok(Attempt::Lost);
    }
    Ok(Attempt::Finished(Err(JobFailure::new(
        ErrorCode::WorkerLost,
        format!(
            "worker {id} went away after {} tokens; the answer is incomplete",
            relayed.tokens
        ),
    ))))
}

/// Classifies a worker's refusal to create the job.
fn refused(queen: &Queen, worker: &WorkerInfo, err: ClientError) -> Attempt {
    let id = &worker.worker_id;
    tracing::info!(worker_id = %id, error = %err, "worker did not take the job");
    match &err {
        ClientError::Rejected { code, .. } => match code {
            ErrorCode::Busy => Attempt::Busy,
            ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::ModelLoadFailed => {
                Attempt::Unfit
            }
            // Something else answers at the worker's address now.
            ErrorCode::NotFound | ErrorCode::UnsupportedOperation => {
                queen.registry.forget_worker(id);
                Attempt::Unfit
            }
            ErrorCode::Unauthorized => Attempt::Finished(Err(JobFailure::new(
                ErrorCode::Unavailable,
                format!("worker {id} refused the queen's cluster token; check RBEE_CLUSTER_TOKEN"),
            ))),
            // The request itself is at fault (e.g. the prompt does not fit the context).
            _ => Attempt::Finished(Err(upstream_failure(&format!("worker {id}"), &err))),
        },
        ClientError::Transport { source, .. } => {
            if source.is_connect() {
                queen.registry.forget_worker(id);
            }
            Attempt::Lost
        }
        _ => Attempt::Lost,
    }
}

#[cfg(test)]
mod tests {
    use rbee_contract::{ChatMessage, ChatRole};

    use super::*;

    fn request() -> InferRequest {
        InferRequest {
            model: "m".into(),
            prompt: Some("hi".into()),
            ..InferRequest::default()
        }
    }

    #[test]
    fn admission_checks_what_needs_no_model() {
        assert!(ValidInfer::parse(request()).is_ok());
        let chat = InferRequest {
            prompt: None,
            messages: Some(vec![ChatMessage {
                role: ChatRole::User,
                content: "hi".into(),
            }]),
            ..request()
        };
        assert!(ValidInfer::parse(chat.clone()).is_ok());

        let cases = [
            InferRequest {
                model: " ".into(),
                ..request()
            },
            InferRequest {
                prompt: Some(String::new()),
                ..request()
            },
            InferRequest {
                prompt: None,
                ..request()
            },
            InferRequest {
                prompt: Some("x".into()),
                ..chat.clone()
            },
            InferRequest {
                messages: Some(Vec::new()),
                ..chat
            },
            InferRequest {
                max_tokens: Some(0),
                ..request()
            },
            InferRequest {
                temperature: Some(-1.0),
                ..request()
            },
            InferRequest {
                top_p: Some(1.5),
                ..request()
            },
            InferRequest {
                min_p: Some(-0.1),
                ..request()
            },
        ];
        for case in cases {
            let err = ValidInfer::parse(case.clone()).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{case:?}");
        }
    }
}
