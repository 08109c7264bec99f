//! The inference thread: loads the model, then runs up to one generation per slot at once,
//! batched (see [`run`]).
//!
//! The engine is blocking, so it lives on a thread of its own; handlers only send it
//! [`Task`]s through a bounded channel and await the outcome. Tokens go straight from this
//! thread into each job's event sink; a generation whose reader is behind waits for room
//! without holding up the others, and a cancelled job leaves the batch within one step.

use std::any::Any;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use std::time::Duration;

use job_server::EventSink;
use rbee_contract::prefix::next_chat_key;
use rbee_contract::{ChatMessage, ChatRole, JobEvent, TokenLogprobs, TopLogprob};
use rbee_engine::{
    Completion, Engine, EngineError, GeneratedToken, LoadOptions, PreparedRequest,
    PromptCacheOptions, Sequence,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::WorkerError;
use crate::config::WorkerConfig;
use crate::state::{InFlight, LoadState, WorkerShared};

/// One generation handed to the inference thread.
pub(crate) struct Task {
    pub request: PreparedRequest,
    /// The request's prefix keys (`rbee_contract::prefix`), for cache-aware routing.
    pub prefix_keys: Vec<u64>,
    /// Whether the request is a chat: its answer's key then joins the slot's keys at the end.
    pub chat: bool,
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
        slots: config.slots,
        context_length: config.context_length,
    };
    let prompt_cache = PromptCacheOptions {
        enabled: config.prompt_cache,
        store_bytes: config.prompt_cache_bytes,
    };
    let queue_capacity = config.queue_capacity.max(1);
    std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            let Some(mut engine) = load(&options, &shared) else {
                load_failed.cancel();
                return;
            };
            engine.set_prompt_cache(prompt_cache);
            // Admission allows one running per slot plus `queue_capacity` waiting; a running
            // one may still sit in the channel for a moment after the previous task freed its
            // slot.
            let (tx, rx) = mpsc::channel(queue_capacity + engine.slots());
            let context_length = u32::try_from(engine.info().context_length).unwrap_or(u32::MAX);
            shared.set_ready(engine.prompter(), tx, context_length, engine.slots());
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
            // The message travels to clients: its first line only, never a backtrace or a
            // library's further lines, which stay in this log.
            let message = err.to_string();
            let first = message.lines().next().unwrap_or_default().trim().to_owned();
            shared.set_load_state(LoadState::Failed { message: first });
            None
        }
    }
}

/// A generation in a slot, with what it reports to.
struct Active {
    seq: Sequence,
    /// A chat request's prefix keys, which its answer's key extends.
    chat_keys: Option<Vec<u64>>,
    sink: EventSink,
    cancel: CancellationToken,
    done: oneshot::Sender<Result<Completion, EngineError>>,
    in_flight: InFlight,
    span: tracing::Span,
}

/// How long the thread first waits before looking again when every running generation's
/// readers are behind (nothing to feed, nothing to sample); the wait doubles while they stay
/// behind, up to [`READERS_BEHIND_MAX_PAUSE`].
const READERS_BEHIND_PAUSE: Duration = Duration::from_millis(1);
const READERS_BEHIND_MAX_PAUSE: Duration = Duration::from_millis(20);

/// Continuous batching: between steps, waiting tasks take free slots and finished or cancelled
/// generations leave; each step feeds every running sequence (a new one's prompt, the others'
/// last tokens) in one forward pass, then each samples its next token. A generation whose
/// stream buffer is full (its reader is behind) sits out until there is room, rather than
/// holding up the others.
fn run(mut engine: Engine, mut rx: mpsc::Receiver<Task>, shared: &WorkerShared) {
    let slots = engine.slots();
    let mut active: Vec<Active> = Vec::with_capacity(slots);
    let mut open = true;
    let mut pause = READERS_BEHIND_PAUSE;
    loop {
        while open && active.len() < slots {
            let task = if active.is_empty() {
                rx.blocking_recv()
            } else {
                match rx.try_recv() {
                    Ok(task) => Some(task),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let Some(task) = task else {
                open = false;
                break;
            };
            // The free slot whose KV cache holds the longest start of the prompt.
            let free: Vec<usize> = (0..slots)
                .filter(|s| active.iter().all(|a| a.seq.slot() != *s))
                .collect();
            let slot = engine.choose_slot(&free, &task.request).unwrap_or_default();
            if let Some(a) = begin(&mut engine, slot, task, shared) {
                active.push(a);
            }
        }
        if active.is_empty() {
            if open {
                continue;
            }
            break;
        }
        // A cancelled job has already ended; its generation leaves before the next step.
        let (cancelled, running): (Vec<_>, Vec<_>) =
            active.into_iter().partition(|a| a.cancel.is_cancelled());
        active = running;
        let any_cancelled = !cancelled.is_empty();
        for mut a in cancelled {
            let completion = a.seq.cancel();
            finish(a, Ok(completion), shared);
        }
        if any_cancelled {
            report_cache(&engine, shared);
        }

        let mut seqs: Vec<&mut Sequence> = active.iter_mut().map(|a| &mut a.seq).collect();
        let fed = seqs.iter().any(|s| !s.has_logits());
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step(&mut seqs)));
        match stepped {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                // The step's sequences are in an unknown state: end every running one.
                tracing::error!(error = %err, "a generation step failed");
                report_cache(&engine, shared);
                for a in active.drain(..) {
                    finish(a, Err(EngineError::Inference(err.to_string())), shared);
                }
                continue;
            }
            Err(panic) => return crashed(active, rx, shared, &*panic),
        }

        let mut advanced = false;
        let mut still = Vec::with_capacity(active.len());
        let mut pending = std::mem::take(&mut active).into_iter();
        while let Some(mut a) = pending.next() {
            if !a.seq.has_logits() || !a.sink.has_room() {
                still.push(a);
                continue;
            }
            advanced = true;
            let outcome = {
                let _job = a.span.enter();
                let (sink, cancel) = (&a.sink, &a.cancel);
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    engine.advance(&mut a.seq, &mut |token| emit_token(sink, cancel, token))
                }))
            };
            match outcome {
                Ok(Ok(None)) => still.push(a),
                Ok(Ok(Some(completion))) => {
                    // The slot holds the answer's tokens too: the next turn, which sends the
                    // answer back as an assistant message, matches through it.
                    if let Some(keys) = &a.chat_keys {
                        let answer = ChatMessage::new(ChatRole::Assistant, completion.text.clone());
                        engine.add_routing_key(a.seq.slot(), next_chat_key(keys, &answer));
                    }
                    // The slot now holds the tokens fed for this generation (a cold slot held
                    // none when it began): report them before the client hears the end.
                    report_cache(&engine, shared);
                    finish(a, Ok(completion), shared);
                }
                Ok(Err(err)) => {
                    report_cache(&engine, shared);
                    finish(a, Err(err), shared);
                }
                Err(panic) => {
                    still.push(a);
                    still.extend(pending);
                    return crashed(still, rx, shared, &*panic);
                }
            }
        }
        active = still;
        if !fed && !advanced {
            std::thread::sleep(pause);
            pause = (pause * 2).min(READERS_BEHIND_MAX_PAUSE);
        } else {
            pause = READERS_BEHIND_PAUSE;
        }
    }
    tracing::debug!("inference thread ends: queue closed");
}

/// Starts a task's generation in `slot`, or ends it at once (cancelled while it waited, or
/// its job already gone).
fn begin(engine: &mut Engine, slot: usize, task: Task, shared: &WorkerShared) -> Option<Active> {
    let Task {
        request,
        prefix_keys,
        chat,
        sink,
        cancel,
        done,
        in_flight,
        span,
    } = task;
    let _job = span.enter();
    if cancel.is_cancelled() {
        // Cancelled while it waited; the job has already ended.
        return None;
    }
    let prompt_tokens = u32::try_from(request.prompt_tokens().len()).unwrap_or(u32::MAX);
    if sink
        .blocking_emit(JobEvent::Started { prompt_tokens })
        .is_err()
    {
        return None;
    }
    let begun = engine.begin_with_routing_keys(slot, &request, &prefix_keys);
    // What the slots and the store hold changes as a generation takes a slot.
    report_cache(engine, shared);
    let seq = match begun {
        Ok(seq) => seq,
        Err(err) => {
            drop(in_flight);
            let _ = done.send(Err(err));
            return None;
        }
    };
    drop(_job);
    Some(Active {
        seq,
        chat_keys: chat.then_some(prefix_keys),
        sink,
        cancel,
        done,
        in_flight,
        span,
    })
}

/// Publishes what the slots and the prompt cache's store hold, for the heartbeats and
/// `/metrics`. Called when a generation takes a slot and when one ends: a slot's report
/// covers the tokens fed into it, which a cold slot only has once its prompt was evaluated.
fn report_cache(engine: &Engine, shared: &WorkerShared) {
    shared.set_cached_prefixes(engine.routing_keys_held());
    shared.prompt_cache.store_bytes.store(
        engine.prompt_cache_store_bytes() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn emit_token(
    sink: &EventSink,
    cancel: &CancellationToken,
    token: GeneratedToken,
) -> ControlFlow<()> {
    if cancel.is_cancelled() {
        return ControlFlow::Break(());
    }
    let event = JobEvent::Token {
        text: token.text,
        token_id: token.token_id,
        index: u32::try_from(token.index).unwrap_or(u32::MAX),
        logprobs: token.logprobs.map(|lp| TokenLogprobs {
            token: lp.token.text,
            bytes: Some(lp.token.bytes),
            logprob: lp.token.logprob,
            top_logprobs: lp
                .top
                .into_iter()
                .map(|t| TopLogprob {
                    token_id: t.token_id,
                    token: t.text,
                    bytes: Some(t.bytes),
                    logprob: t.logprob,
                })
                .collect(),
        }),
    };
    match sink.blocking_emit(event) {
        Ok(_) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    }
}

/// Reports a generation's outcome, freeing its slot first.
fn finish(a: Active, outcome: Result<Completion, EngineError>, shared: &WorkerShared) {
    let _job = a.span.enter();
    if let Ok(completion) = &outcome {
        shared
            .prompt_cache
            .count(completion.prompt_tokens, completion.cached_tokens);
        tracing::info!(
            finish_reason = ?completion.finish_reason,
            prompt_tokens = completion.prompt_tokens,
            cached_tokens = completion.cached_tokens,
            completion_tokens = completion.completion_tokens,
            prefill_ms = completion.prefill_time.as_millis() as u64,
            decode_ms = completion.decode_time.as_millis() as u64,
            "generation ended"
        );
    }
    // Free the slot before the outcome is reported, so a client that sees the terminal event
    // and at once asks for the next generation finds the worker free.
    drop(a.in_flight);
    // The job may be gone (cancelled); its outcome then has no reader.
    let _ = a.done.send(outcome);
}

/// The engine's state is unknown after a panic: report the failure to every running and
/// waiting generation and stop taking work, so the hive and the queen see a failed worker, not
/// a ready one.
fn crashed(
    active: Vec<Active>,
    mut rx: mpsc::Receiver<Task>,
    shared: &WorkerShared,
    panic: &(dyn Any + Send),
) {
    let message = format!("the engine crashed: {}", panic_message(panic));
    tracing::error!(error = %message, "generation crashed; the worker stops serving");
    shared.set_load_state(LoadState::Failed {
        message: message.clone(),
    });
    for a in active {
        finish(a, Err(EngineError::Inference(message.clone())), shared);
    }
    rx.close();
    while let Ok(task) = rx.try_recv() {
        drop(task.in_flight);
        let _ = task.done.send(Err(EngineError::Inference(message.clone())));
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
