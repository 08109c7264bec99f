//! The inference thread: loads the model, then runs one generation at a time.
//!
//! The engine is blocking, so it lives on a thread of its own; handlers only send it
//! [`Task`]s through a bounded channel and await the outcome. Tokens go straight from this
//! thread into the job's event sink, whose back-pressure paces generation to the slowest
//! reader, and whose cancellation stops generation within one token.

use std::any::Any;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use job_server::EventSink;
use rbee_contract::JobEvent;
use rbee_engine::{Completion, Engine, EngineError, LoadOptions, PreparedRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::WorkerError;
use crate::config::WorkerConfig;
use crate::state::{InFlight, LoadState, WorkerShared};

/// One generation handed to the inference thread.
pub(crate) struct Task {
    pub request: PreparedRequest,
    pub sink: EventSink,
    pub cancel: CancellationToken,
    pub done: oneshot::Sender<Result<Completion, EngineError>>,
    /// Held until the generation has really stopped, so the worker reports itself free
    /// only when it is.
    pub in_flight: InFlight,
    /// The job's span, entered on the inference thread so its log lines carry the job id.
    pub span: tracing::Span,
}

/// Starts the inference thread. `load_failed` fires if the model cannot be loaded.
pub(crate) fn start(
    config: &WorkerConfig,
    shared: Arc<WorkerShared>,
    load_failed: CancellationToken,
) -> Result<(), WorkerError> {
    let options = LoadOptions {
        model_path: config.model_path.clone(),
        device: config.device,
    };
    let queue_capacity = config.queue_capacity.max(1);
    std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            let Some(engine) = load(&options, &shared) else {
                load_failed.cancel();
                return;
            };
            // Admission allows one running plus `queue_capacity` waiting; the running one may
            // still sit in the channel for a moment after the previous task freed its slot.
            let (tx, rx) = mpsc::channel(queue_capacity + 1);
            let context_length = u32::try_from(engine.info().context_length).unwrap_or(u32::MAX);
            shared.set_ready(engine.prompter(), tx, context_length);
            run(engine, rx, &shared);
        })?;
    Ok(())
}

fn load(options: &LoadOptions, shared: &WorkerShared) -> Option<Engine> {
    let mut progress = |p: rbee_engine::LoadProgress| {
        shared.set_load_state(LoadState::Loading {
            fraction: p.fraction,
            message: p.message,
        });
    };
    match Engine::load(options, &mut progress) {
        Ok(engine) => Some(engine),
        Err(err) => {
            tracing::error!(error = %err, "model failed to load");
            shared.set_load_state(LoadState::Failed {
                message: err.to_string(),
            });
            None
        }
    }
}

fn run(mut engine: Engine, mut rx: mpsc::Receiver<Task>, shared: &WorkerShared) {
    while let Some(task) = rx.blocking_recv() {
        let Task {
            request,
            sink,
            cancel,
            done,
            in_flight,
            span,
        } = task;
        let _job = span.enter();
        if cancel.is_cancelled() {
            // Cancelled while it waited; the job has already ended.
            continue;
        }
        let prompt_tokens = u32::try_from(request.prompt_tokens().len()).unwrap_or(u32::MAX);
        if sink
            .blocking_emit(JobEvent::Started { prompt_tokens })
            .is_err()
        {
            continue;
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            engine.generate(&request, &mut |token| {
                if cancel.is_cancelled() {
                    return ControlFlow::Break(());
                }
                let event = JobEvent::Token {
                    text: token.text,
                    token_id: token.token_id,
                    index: u32::try_from(token.index).unwrap_or(u32::MAX),
                };
                match sink.blocking_emit(event) {
                    Ok(_) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            })
        }));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(panic) => {
                // The engine's state is unknown after a panic: report the failure and stop
                // taking work, so the hive and the queen see a failed worker, not a ready one.
                let message = panic_message(&*panic);
                tracing::error!(error = %message, "generation crashed; the worker stops serving");
                drop(in_flight);
                let _ = done.send(Err(EngineError::Inference(format!(
                    "the engine crashed: {message}"
                ))));
                shared.set_load_state(LoadState::Failed {
                    message: format!("the engine crashed: {message}"),
                });
                return;
            }
        };
        if let Ok(completion) = &outcome {
            tracing::info!(
                finish_reason = ?completion.finish_reason,
                prompt_tokens = completion.prompt_tokens,
                completion_tokens = completion.completion_tokens,
                prefill_ms = completion.prefill_time.as_millis() as u64,
                decode_ms = completion.decode_time.as_millis() as u64,
                "generation ended"
            );
        }
        // Free the slot before the outcome is reported, so a client that sees the terminal
        // event and at once asks for the next generation finds the worker free.
        drop(in_flight);
        // The job may be gone (cancelled); its outcome then has no reader.
        let _ = done.send(outcome);
    }
    tracing::debug!("inference thread ends: queue closed");
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
