//! Passing a job's events from the hop below (a hive or a worker) through to the queen's own
//! job, unchanged.
//!
//! The upstream job lives exactly as long as the relay: dropping the relay (the queen's job
//! was cancelled or its client went away) closes the upstream stream and also sends a
//! `DELETE`, so that an upstream job whose stream was never opened is not left to run.

use std::time::Duration;

use futures::StreamExt;
use job_client::{ClientError, JobHandle};
use job_server::{JobContext, JobFailure};
use rbee_contract::JobEvent;

/// How long the `DELETE` of an abandoned upstream job may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// How an upstream stream ended.
#[derive(Debug)]
pub(crate) enum RelayEnd {
    /// The upstream job's terminal event, not yet passed on.
    Terminal(JobEvent),
    /// The stream broke off (and could not be resumed) before a terminal event.
    Broken(ClientError),
}

#[derive(Debug)]
pub(crate) struct Relayed {
    pub end: RelayEnd,
    /// `token` events seen, so a caller can tell "lost before the first token" from "after".
    pub tokens: u32,
}

/// Relays the events of `handle` to `ctx` up to the upstream terminal event, which is handed
/// back instead of relayed: the caller decides what becomes of it. `keep` sees every
/// non-terminal event first and may hold one back (e.g. a result the queen consumes itself).
///
/// Fails only when the queen's own job can take no more events (it was cancelled).
pub(crate) async fn relay(
    handle: JobHandle,
    ctx: &JobContext,
    mut keep: impl FnMut(&JobEvent) -> bool,
) -> Result<Relayed, JobFailure> {
    let mut guard = CancelOnDrop(Some(handle.clone()));
    let job_id = handle.job_id.clone();
    let mut events = handle.events();
    let mut tokens = 0u32;
    while let Some(item) = events.next().await {
        match item {
            Ok(event) if event.is_terminal() => {
                guard.disarm();
                return Ok(Relayed {
                    end: RelayEnd::Terminal(event),
                    tokens,
                });
            }
            Ok(event) => {
                if matches!(event, JobEvent::Token { .. }) {
                    tokens = tokens.saturating_add(1);
                }
                if keep(&event) {
                    ctx.emit(event).await.map_err(JobFailure::from)?;
                }
            }
            Err(err) => {
                return Ok(Relayed {
                    end: RelayEnd::Broken(err),
                    tokens,
                });
            }
        }
    }
    // job-client ends a stream only after a terminal event or an error; stay safe anyway.
    Ok(Relayed {
        end: RelayEnd::Broken(ClientError::StreamEnded { job_id }),
        tokens,
    })
}

/// Cancels the upstream job when dropped armed.
struct CancelOnDrop(Option<JobHandle>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(handle) = self.0.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            match tokio::time::timeout(CANCEL_TIMEOUT, handle.cancel()).await {
                Ok(Ok(())) => tracing::debug!(job_id = %handle.job_id, "upstream job cancelled"),
                Ok(Err(err)) => {
                    tracing::debug!(job_id = %handle.job_id, error = %err, "cancelling the upstream job failed");
                }
                Err(_) => {
                    tracing::debug!(job_id = %handle.job_id, "cancelling the upstream job timed out");
                }
            }
        });
    }
}
