//! One job's shared state: its event log, its cancellation token and who is reading it.
//!
//! The producer side is [`EventSink`], the consumer side is [`JobSubscription`]; both wait on
//! `Notify`s armed before the log is checked, so no wake-up is lost between check and wait.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rbee_contract::{ErrorCode, JobEvent};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::EmitError;
use crate::log::{Entry, EventLog, LogLimits, OpenError, ReaderId};

/// Why a job was cancelled; becomes the message of its `cancelled` terminal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelReason {
    Request,
    Disconnect,
    Unclaimed,
    Detached,
    Shutdown,
}

impl CancelReason {
    fn message(self) -> &'static str {
        match self {
            CancelReason::Request => "the job was cancelled by request",
            CancelReason::Disconnect => "the client closed the job's stream before the job ended",
            CancelReason::Unclaimed => "no client opened the job's stream in time",
            CancelReason::Detached => "no client reconnected to the job's stream in time",
            CancelReason::Shutdown => {
                "the daemon shut down before the job ended (its shutdown grace period ran out)"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attachments {
    /// Streams open right now.
    pub open: usize,
    /// Streams ever opened.
    pub opened: u64,
}

#[derive(Debug)]
pub(crate) struct Job {
    pub id: String,
    pub cancel: CancellationToken,
    pub cancel_on_disconnect: bool,
    pub created_at: Instant,
    log: Mutex<EventLog>,
    appended: Notify,
    room: Notify,
    cancel_reason: OnceLock<CancelReason>,
    attachments: watch::Sender<Attachments>,
    finished_at: OnceLock<Instant>,
}

impl Job {
    pub fn new(
        id: String,
        cancel: CancellationToken,
        cancel_on_disconnect: bool,
        limits: LogLimits,
    ) -> Self {
        Job {
            id,
            cancel,
            cancel_on_disconnect,
            created_at: Instant::now(),
            log: Mutex::new(EventLog::new(limits)),
            appended: Notify::new(),
            room: Notify::new(),
            cancel_reason: OnceLock::new(),
            attachments: watch::Sender::new(Attachments::default()),
            finished_at: OnceLock::new(),
        }
    }

    fn log(&self) -> MutexGuard<'_, EventLog> {
        // The log is plain bookkeeping; a panic while it was held cannot leave it half-updated
        // in a way that matters more than losing the job's stream, so keep serving it.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_finished(&self) -> bool {
        self.finished_at.get().is_some()
    }

    /// Cancels the job; the first reason given is the one reported.
    pub fn cancel(&self, reason: CancelReason) {
        if !self.is_finished() {
            let _ = self.cancel_reason.set(reason);
        }
        self.cancel.cancel();
    }

    /// The terminal event of a cancelled job: `shutting_down` when shutdown cut it, else
    /// `cancelled`. A token cancelled from above (shutdown of the whole server) carries no
    /// reason of its own.
    pub fn cancelled_event(&self) -> JobEvent {
        let reason = self
            .cancel_reason
            .get()
            .copied()
            .unwrap_or(CancelReason::Shutdown);
        let code = match reason {
            CancelReason::Shutdown => ErrorCode::ShuttingDown,
            _ => ErrorCode::Cancelled,
        };
        JobEvent::error(code, reason.message())
    }

    async fn emit(&self, event: JobEvent) -> Result<u64, EmitError> {
        if event.is_terminal() {
            return Err(EmitError::Terminal);
        }
        let json: Arc<str> = serde_json::to_string(&event)
            .map_err(|e| EmitError::Encode(e.to_string()))?
            .into();
        let mut pending = (Arc::new(event), json);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                if self.cancel.is_cancelled() {
                    return Err(EmitError::Cancelled);
                }
                let mut log = self.log();
                if log.ended() {
                    return Err(EmitError::Ended);
                }
                match log.try_push(pending.0, pending.1) {
                    Ok(seq) => {
                        drop(log);
                        self.appended.notify_waiters();
                        return Ok(seq);
                    }
                    Err(back) => pending = back,
                }
            }
            tokio::select! {
                () = &mut room => {}
                () = self.cancel.cancelled() => return Err(EmitError::Cancelled),
            }
        }
    }

    /// Records the terminal event; returns its sequence number.
    pub fn finish(&self, event: JobEvent) -> u64 {
        debug_assert!(event.is_terminal());
        let json: Arc<str> = match serde_json::to_string(&event) {
            Ok(json) => json.into(),
            Err(err) => {
                tracing::error!(%err, "terminal event cannot be encoded");
                let fallback =
                    JobEvent::error(ErrorCode::Internal, "the job's result could not be encoded");
                serde_json::to_string(&fallback).unwrap_or_default().into()
            }
        };
        let seq = {
            let mut log = self.log();
            let seq = log.push_terminal(Arc::new(event), json);
            let _ = self.finished_at.set(Instant::now());
            seq
        };
        self.appended.notify_waiters();
        seq
    }

    pub fn subscribe(
        self: &Arc<Self>,
        last_event_id: Option<u64>,
    ) -> Result<JobSubscription, OpenError> {
        let reader = self.log().open_reader(last_event_id)?;
        self.attachments.send_modify(|a| {
            a.open += 1;
            a.opened += 1;
        });
        Ok(JobSubscription {
            job: Arc::clone(self),
            reader,
            saw_terminal: false,
        })
    }

    /// Resolves when no stream has been attached for the allowed time: `unclaimed` while no
    /// stream was ever opened, `detached` after the last one closed.
    pub async fn wait_unattended(&self, unclaimed: Duration, detached: Duration) -> CancelReason {
        let mut rx = self.attachments.subscribe();
        loop {
            let opened = match rx.wait_for(|a| a.open == 0).await {
                Ok(a) => a.opened,
                // The sender lives in `self`; it cannot be gone while we borrow it.
                Err(_) => return CancelReason::Detached,
            };
            let (timeout, reason) = if opened == 0 {
                (unclaimed, CancelReason::Unclaimed)
            } else {
                (detached, CancelReason::Detached)
            };
            tokio::select! {
                () = tokio::time::sleep(timeout) => return reason,
                _ = rx.wait_for(|a| a.open > 0 || a.opened != opened) => {}
            }
        }
    }
}

/// Where a running job sends its non-terminal events. Cheap to clone.
///
/// `emit` waits while the job's buffer is full of events no client has received yet
/// (back-pressure: events are never dropped), and fails once the job is cancelled.
/// Terminal events are refused: they come only from the value [`JobExecutor::run`] returns.
///
/// [`JobExecutor::run`]: crate::JobExecutor::run
#[derive(Debug, Clone)]
pub struct EventSink {
    job: Arc<Job>,
}

impl EventSink {
    pub(crate) fn new(job: Arc<Job>) -> Self {
        EventSink { job }
    }

    /// Appends an event to the job's stream; returns its sequence number (the SSE `id`).
    pub async fn emit(&self, event: JobEvent) -> Result<u64, EmitError> {
        self.job.emit(event).await
    }

    /// [`emit`](Self::emit) for a plain thread (e.g. an inference thread). It blocks the
    /// calling thread, so it must never be called from async code.
    pub fn blocking_emit(&self, event: JobEvent) -> Result<u64, EmitError> {
        futures::executor::block_on(self.job.emit(event))
    }

    pub fn is_cancelled(&self) -> bool {
        self.job.cancel.is_cancelled()
    }

    /// Whether an [`emit`](Self::emit) now would return without waiting for a reader. A
    /// thread serving several jobs at once uses it to let a job whose readers are behind sit
    /// out instead of holding up the others; a cancelled or ended job has room (its emit fails
    /// at once).
    pub fn has_room(&self) -> bool {
        if self.job.cancel.is_cancelled() {
            return true;
        }
        let mut log = self.job.log();
        log.ended() || log.has_room()
    }
}

/// One event of a job as read by a subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct SequencedEvent {
    /// The SSE `id`: a client that saw it resumes with `Last-Event-ID: <seq>`.
    pub seq: u64,
    pub event: Arc<JobEvent>,
    /// The event's JSON encoding, as sent in the SSE `data:` line.
    pub json: Arc<str>,
}

/// A reader of a job's events, from [`JobServer::subscribe`](crate::JobServer::subscribe).
///
/// Dropping it before it has returned the terminal event counts as the client going away:
/// the job is cancelled unless it was created with `cancel_on_disconnect = false`.
#[derive(Debug)]
pub struct JobSubscription {
    job: Arc<Job>,
    reader: ReaderId,
    saw_terminal: bool,
}

impl JobSubscription {
    pub fn job_id(&self) -> &str {
        &self.job.id
    }

    /// The next event; `None` after the terminal event has been returned.
    pub async fn next(&mut self) -> Option<SequencedEvent> {
        if self.saw_terminal {
            return None;
        }
        loop {
            let appended = self.job.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let entry = self.job.log().read(self.reader);
            if let Some(Entry { seq, event, json }) = entry {
                self.job.room.notify_waiters();
                self.saw_terminal = event.is_terminal();
                return Some(SequencedEvent { seq, event, json });
            }
            appended.await;
        }
    }
}

impl Drop for JobSubscription {
    fn drop(&mut self) {
        self.job.log().close_reader(self.reader);
        // A slow reader going away may let the producer evict what only it still needed.
        self.job.room.notify_waiters();
        self.job.attachments.send_modify(|a| a.open -= 1);
        if !self.saw_terminal && self.job.cancel_on_disconnect && !self.job.is_finished() {
            tracing::info!(job_id = %self.job.id, "stream closed before the job ended; cancelling");
            self.job.cancel(CancelReason::Disconnect);
        }
    }
}
