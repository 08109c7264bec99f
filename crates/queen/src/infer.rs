//! Running `infer`: choose a worker with a free slot (waiting in the model's line while
//! every slot is taken, or having a hive start a worker when none serves the model), submit
//! the inference to it and relay its events unchanged. A worker lost before its first token
//! is replaced once; after the first token, losing it ends the job with `worker_lost`, never
//! with a silent truncation. A worker that hangs counts as lost once its silence outlasts the
//! stall timeout and it does not answer a check (`stall`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};

use job_client::ClientError;
use job_server::{ApiError, JobContext, JobFailure, JobResult, terminal_to_result};
use rbee_contract::model_ref::ParsedModelRef;
use rbee_contract::{ErrorCode, InferRequest, JobEvent, Operation, WorkerInfo};
use tokio::time::Instant;

use crate::admin::{self, ModelAccess};
use crate::dispatch::{ColdStarts, choose};
use crate::registry::InFlight;
use crate::relay::{self, RelayEnd, relay};
use crate::scheduler::RequestPrefix;
use crate::stall::StallWatch;
use crate::state::{Queen, upstream_failure};

/// The worker's job-creating route for inference.
const INFERENCE_PATH: &str = "/v1/inference";
/// Workers a job is offered to at most (busy or unfit ones count too).
const MAX_ATTEMPTS: usize = 8;

/// An admitted `infer`: it meets [`InferRequest::validate`]'s rules and its model reference
/// parses. What depends on the model (the prompt fitting the context)
/// is the worker's to check.
#[derive(Debug)]
pub(crate) struct ValidInfer {
    request: InferRequest,
    /// Whether the request may have any hive open any path (`admin`), rather than only the
    /// hives that hold it.
    any_path: bool,
}

impl ValidInfer {
    pub fn parse(mut request: InferRequest) -> Result<Self, ApiError> {
        // Workers report the model as the hive recorded it, trimmed; scheduling compares
        // exactly, so the request is normalized the same way once, here.
        request.model = request.model.trim().to_string();
        // The limits every daemon applies alike; the worker checks them again, so a request
        // that reaches it some other way meets the same rules.
        request
            .validate()
            .map_err(|err| ApiError::bad_request(err.to_string()))?;
        // A hub reference (or an unknown scheme) that a hive would refuse is refused here,
        // before a cold start; a plain name or a local path is for the registry and the hive.
        ParsedModelRef::parse(&request.model)
            .map_err(|err| ApiError::bad_request(err.to_string()))?;
        // A response format that does not compile would be refused by the worker: refuse it
        // here, before a job or a cold start exists.
        if let Some(format) = &request.response_format {
            crate::openai::format::check_compiles(format).map_err(ApiError::bad_request)?;
        }
        Ok(ValidInfer {
            request,
            any_path: admin::current_access() == ModelAccess::Any,
        })
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

/// What happened to the job so far, for the metrics; the job's outcome is recorded when it
/// is dropped, so a cancelled job (whose future is dropped) counts too.
struct Progress<'a> {
    queen: &'a Queen,
    model: &'a str,
    started: Instant,
    first_token: bool,
    outcome: Option<String>,
}

impl Progress<'_> {
    fn token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            self.queen.metrics.first_token(self.started.elapsed());
        }
        self.queen.metrics.tokens(self.model, 1);
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        let outcome = self.outcome.as_deref().unwrap_or("cancelled");
        self.queen
            .metrics
            .infer_ended(outcome, self.started.elapsed());
    }
}

pub(crate) async fn run(queen: &Queen, job: ValidInfer, ctx: &JobContext) -> JobResult {
    let model = job.request.model.clone();
    let mut progress = Progress {
        queen,
        model: &model,
        started: Instant::now(),
        first_token: false,
        outcome: None,
    };
    // Computed once: every worker the job is offered to is ranked by how much of it it holds.
    let prefix = RequestPrefix::of(&job.request);
    let operation = Operation::Infer(job.request);
    let result = schedule(queen, operation, &prefix, job.any_path, ctx, &mut progress).await;
    progress.outcome = Some(match &result {
        Ok(_) => "done".to_owned(),
        Err(failure) => failure.code.to_string(),
    });
    result
}

async fn schedule(
    queen: &Queen,
    operation: Operation,
    prefix: &RequestPrefix,
    any_path: bool,
    ctx: &JobContext,
    progress: &mut Progress<'_>,
) -> JobResult {
    let model = progress.model;
    let mut excluded = HashSet::new();
    let mut busy = Vec::new();
    let mut cold_starts = ColdStarts::new(any_path);
    let mut replaced_lost = false;
    for _ in 0..MAX_ATTEMPTS {
        let (worker, slot) = choose(
            queen,
            model,
            prefix,
            &excluded,
            &busy,
            &mut cold_starts,
            ctx,
        )
        .await?;
        let id = worker.worker_id.clone();
        match attempt(queen, &worker, slot, &operation, ctx, progress).await? {
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

async fn attempt(
    queen: &Queen,
    worker: &WorkerInfo,
    slot: InFlight,
    operation: &Operation,
    ctx: &JobContext,
    progress: &mut Progress<'_>,
) -> Result<Attempt, JobFailure> {
    let id = &worker.worker_id;
    // A worker that hangs (rather than dies) is noticed by its silence: see `stall`.
    let stall = StallWatch::new(queen, worker);
    let tokens = AtomicU32::new(0);
    // The job's prefix keys count as the worker's only once it took the job.
    let acceptance = slot.acceptance();
    // The slot stays the job's until the worker's job is really over, cancellation included:
    // a slot freed before the worker stopped would send the next job into the worker's own
    // queue, or have it refused as busy.
    let submitted = stall
        .guard(relay::submit_holding(
            queen.client(&worker.url),
            INFERENCE_PATH,
            operation.clone(),
            Some(Box::new(slot)),
        ))
        .await;
    let upstream = match submitted {
        Some(Ok(upstream)) => {
            acceptance.accepted();
            upstream
        }
        Some(Err(err)) => return Ok(refused(queen, worker, err)),
        None => return Ok(hung(queen, worker, &stall, 0)),
    };
    tracing::info!(worker_id = %id, upstream_job_id = upstream.job_id(), "inference sent to a worker");
    stall.seen();
    let relaying = relay(upstream, ctx, |event| {
        stall.seen();
        if matches!(event, JobEvent::Token { .. }) {
            tokens.fetch_add(1, Ordering::Relaxed);
            progress.token();
        }
        true
    });
    let Some(relayed) = stall.guard(relaying).await else {
        return Ok(hung(queen, worker, &stall, tokens.into_inner()));
    };
    let relayed = relayed?;
    match relayed.end {
        // A worker that cancels a job the queen did not cancel is shutting down: as good as gone.
        // After tokens went out the answer cannot move to another worker: a worker that is
        // shutting down says so itself, which tells the client more than `worker_lost`.
        RelayEnd::Terminal(JobEvent::Error {
            code: ErrorCode::ShuttingDown,
            message,
        }) if relayed.tokens > 0 => {
            return Ok(Attempt::Finished(Err(JobFailure::new(
                ErrorCode::ShuttingDown,
                format!(
                    "worker {id} is shutting down and stopped after {} tokens: {message}",
                    relayed.tokens
                ),
            ))));
        }
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

/// The worker went silent and did not answer the check: it is not scheduled on until it
/// heartbeats again, and the job goes to another worker if no token went out yet.
fn hung(queen: &Queen, worker: &WorkerInfo, stall: &StallWatch<'_>, tokens: u32) -> Attempt {
    let id = &worker.worker_id;
    queen.registry.mark_unresponsive(id);
    if tokens == 0 {
        return Attempt::Lost;
    }
    Attempt::Finished(Err(JobFailure::new(
        ErrorCode::WorkerLost,
        format!(
            "worker {id} stopped answering after {tokens} tokens (no event for {:?}); the answer is incomplete",
            stall.timeout()
        ),
    )))
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
            messages: Some(vec![ChatMessage::new(ChatRole::User, "hi")]),
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
            InferRequest {
                repeat_penalty: Some(0.0),
                ..request()
            },
            InferRequest {
                presence_penalty: Some(2.5),
                ..request()
            },
            InferRequest {
                frequency_penalty: Some(f32::NAN),
                ..request()
            },
            InferRequest {
                stop: vec!["\n".into(), String::new()],
                ..request()
            },
            InferRequest {
                stop: vec!["x".into(); 17],
                ..request()
            },
        ];
        for case in cases {
            let err = ValidInfer::parse(case.clone()).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{case:?}");
        }
    }

    #[test]
    fn hub_references_are_parsed_and_other_names_pass() {
        let with_model = |model: &str| InferRequest {
            model: model.into(),
            ..request()
        };
        for model in [
            "tinyllama",
            "/models/m.gguf",
            "./m.gguf",
            " hf:org/repo ",
            "hf:org/repo:dir/m.Q4_0.gguf",
        ] {
            assert!(ValidInfer::parse(with_model(model)).is_ok(), "{model}");
        }
        for (model, named) in [
            ("hf:a/b:../../etc/passwd", "hf:a/b:../../etc/passwd"),
            ("hf:../b", "`hf:../b`"),
            ("hf:org/repo:m.safetensors", ".gguf"),
            ("s3:bucket/m", "hf:org/repo"),
        ] {
            let err = ValidInfer::parse(with_model(model)).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{model}");
            assert!(err.message.contains(named), "{model}: {}", err.message);
        }
    }
}
