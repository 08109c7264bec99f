//! Passing a job's events from the hop below (a hive or a worker) through to the queen's own
//! job, unchanged.
//!
//! The upstream job lives exactly as long as the queen's job needs it. It is created with
//! `cancel_on_disconnect=false`, so that a connection to the hop below that breaks for a moment
//! does not end it: job-client resumes the stream with `Last-Event-ID` and every event still
//! arrives once. Its end is therefore always explicit. An [`Upstream`] is an upstream job the
//! queen has not let go of: dropping it before its terminal event (the queen's job was
//! cancelled, its client went away, the stream could not be resumed, the queen is shutting
//! down) sends a `DELETE`, retried while the hop below cannot be reached for a moment.
//! [`submit`] extends that to the moment of creation: a job cancelled while its upstream `POST`
//! is in flight still cancels the job that `POST` creates. Should the `DELETE` never arrive
//! (the queen died), the hop below cancels the job itself once no stream has been attached for
//! its `detached_timeout`.

use std::any::Any;
use std::time::Duration;

use futures::StreamExt;
use job_client::{ClientError, JobClient, JobEventStream, JobHandle};
use job_server::{JobContext, JobFailure};
use rbee_contract::{JobEvent, Operation};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// How long the `DELETE` of an abandoned upstream job may take, retries included: longer
/// than a blip the stream could not be resumed across, so the job below does not run on
/// until its own detached timeout.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before the first retry of a `DELETE` that could not be delivered; it doubles.
const CANCEL_RETRY: Duration = Duration::from_millis(250);

/// The `DELETE`s of upstream jobs still being sent. Closing the connection does not end a job
/// below (it is resumable), so a queen that shuts down waits for them ([`cancellations_sent`])
/// rather than leave its cancelled jobs' workers generating until their detached timeout.
static CANCELLING: std::sync::LazyLock<TaskTracker> = std::sync::LazyLock::new(TaskTracker::new);

/// Waits, at most `limit`, until every `DELETE` of an abandoned upstream job has been sent.
pub(crate) async fn cancellations_sent(limit: Duration) {
    CANCELLING.close();
    if tokio::time::timeout(limit, CANCELLING.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pending = CANCELLING.len(),
            "upstream jobs still being cancelled at shutdown; their daemons end them when their detached timeout runs out"
        );
    }
}

/// The query that keeps an upstream job alive across a broken connection (see the module).
const RESUMABLE: &str = "cancel_on_disconnect=false";

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

/// Something released only when the upstream job is really over (e.g. the queen's count of
/// jobs on a worker, whose slot is not free before).
pub(crate) type Hold = Box<dyn Any + Send>;

/// An upstream job that is cancelled when dropped before its terminal event was seen.
pub(crate) struct Upstream {
    handle: Option<JobHandle>,
    /// The job's stream, when it came with the answer to its creation.
    events: Option<JobEventStream>,
    /// Released after the terminal event, or after the cancellation has been delivered.
    hold: Option<Hold>,
}

impl Upstream {
    pub fn job_id(&self) -> &str {
        self.handle.as_ref().map_or("", |h| h.job_id.as_str())
    }

    /// The job ended by itself: nothing to cancel any more.
    fn disarm(&mut self) {
        self.handle = None;
    }
}

impl From<JobHandle> for Upstream {
    fn from(handle: JobHandle) -> Self {
        Upstream {
            handle: Some(handle),
            events: None,
            hold: None,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let hold = self.hold.take();
        CANCELLING.spawn_on(
            async move {
                cancel_upstream(handle).await;
                drop(hold);
            }
            .in_current_span(),
            &runtime,
        );
    }
}

/// Submits `operation` to `path` on the hop below (e.g. a worker's `/v1/inference`), its
/// events coming with the answer (one round trip, not two: every relayed job pays it).
///
/// The request runs in a task of its own and its answer travels as an [`Upstream`]. If the
/// caller is dropped before the answer arrives (the queen's job was cancelled), the answer is
/// dropped instead and the job it created is cancelled at once; otherwise that job would run
/// unread until the hop below gives up on its stream (a minute by default), keeping a
/// worker's slot busy.
pub(crate) async fn submit(
    client: JobClient,
    path: &'static str,
    operation: Operation,
) -> Result<Upstream, ClientError> {
    submit_holding(client, path, operation, None).await
}

/// [`submit`], keeping `hold` until the job it creates is over: through the request, then
/// in the [`Upstream`]. A refused request releases it at once.
pub(crate) async fn submit_holding(
    client: JobClient,
    path: &'static str,
    operation: Operation,
    hold: Option<Hold>,
) -> Result<Upstream, ClientError> {
    let url = client.base_url().to_owned();
    let (answer, answered) = oneshot::channel();
    tokio::spawn(
        async move {
            let created = client
                .submit_and_follow(&format!("{path}?{RESUMABLE}"), &operation)
                .await
                .map(|(handle, events)| Upstream {
                    handle: Some(handle),
                    events: Some(events),
                    hold,
                });
            if let Ok(upstream) = &created {
                tracing::debug!(upstream_job_id = upstream.job_id(), "upstream job created");
            }
            // With nobody left to receive it, the `Upstream` is dropped here and cancels.
            let _ = answer.send(created);
        }
        .in_current_span(),
    );
    answered.await.unwrap_or_else(|_| {
        tracing::error!(url, "the upstream request task failed");
        Err(ClientError::InvalidResponse {
            url,
            reason: "the request to it failed unexpectedly".into(),
        })
    })
}

/// Relays the events of `upstream` to `ctx` up to the upstream terminal event, which is
/// handed back instead of relayed: the caller decides what becomes of it. `keep` sees every
/// non-terminal event first and may hold one back (e.g. a result the queen consumes itself).
///
/// Fails only when the queen's own job can take no more events (it was cancelled).
pub(crate) async fn relay(
    upstream: impl Into<Upstream>,
    ctx: &JobContext,
    mut keep: impl FnMut(&JobEvent) -> bool,
) -> Result<Relayed, JobFailure> {
    let mut guard = upstream.into();
    let Some(handle) = guard.handle.clone() else {
        return Err(JobFailure::internal("an upstream job was relayed twice"));
    };
    let job_id = handle.job_id.clone();
    let mut events = guard.events.take().unwrap_or_else(|| handle.events());
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

/// `DELETE`s an upstream job, within [`CANCEL_TIMEOUT`]. A `DELETE` that does not reach the
/// hop below (a connection refused or reset) is sent again; any answer ends it.
async fn cancel_upstream(handle: JobHandle) {
    let job_id = &handle.job_id;
    let delivered = tokio::time::timeout(CANCEL_TIMEOUT, async {
        let mut pause = CANCEL_RETRY;
        loop {
            match handle.cancel().await {
                Err(err @ ClientError::Transport { .. }) => {
                    tracing::debug!(upstream_job_id = %job_id, error = %err, "cancelling the upstream job failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    })
    .await;
    match delivered {
        Ok(Ok(())) => tracing::info!(upstream_job_id = %job_id, "upstream job cancelled"),
        Ok(Err(err)) => {
            // Usually a job the hop below no longer knows (it restarted).
            tracing::debug!(upstream_job_id = %job_id, error = %err, "cancelling the upstream job failed");
        }
        Err(_) => {
            tracing::warn!(upstream_job_id = %job_id, "cancelling the upstream job timed out; the hop below ends it when its detached timeout runs out");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{delete, post};
    use rbee_contract::{InferRequest, JobCreated};

    use super::*;

    type Deleted = Arc<Mutex<Vec<String>>>;

    /// A worker stand-in that takes its time to answer a job's creation and records the
    /// jobs it is asked to cancel.
    async fn slow_worker() -> (String, Deleted) {
        async fn create() -> (StatusCode, axum::Json<JobCreated>) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            (
                StatusCode::CREATED,
                axum::Json(JobCreated {
                    job_id: "upstream-1".into(),
                    sse_url: "/v1/jobs/upstream-1/stream".into(),
                }),
            )
        }
        async fn cancel(State(deleted): State<Deleted>, Path(id): Path<String>) -> StatusCode {
            deleted.lock().unwrap().push(id);
            StatusCode::ACCEPTED
        }
        let deleted = Deleted::default();
        let app = Router::new()
            .route("/v1/inference", post(create))
            .route("/v1/jobs/{id}", delete(cancel))
            .with_state(Arc::clone(&deleted));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, deleted)
    }

    async fn deletes_of(deleted: &Deleted) -> Vec<String> {
        for _ in 0..250 {
            let seen = deleted.lock().unwrap().clone();
            if !seen.is_empty() {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Vec::new()
    }

    fn operation() -> Operation {
        Operation::Infer(InferRequest {
            model: "m".into(),
            prompt: Some("hi".into()),
            ..InferRequest::default()
        })
    }

    #[tokio::test]
    async fn a_caller_gone_during_the_post_still_cancels_the_job_it_created() {
        let (url, deleted) = slow_worker().await;
        let submitting = submit(JobClient::new(&url), "/v1/inference", operation());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), submitting)
                .await
                .is_err(),
            "the answer takes longer than the caller waits"
        );
        assert_eq!(deletes_of(&deleted).await, vec!["upstream-1"]);
    }

    #[tokio::test]
    async fn what_a_job_holds_is_released_only_after_its_cancellation() {
        let (url, deleted) = slow_worker().await;
        let (released, on_release) = oneshot::channel::<()>();
        struct Release(Option<oneshot::Sender<()>>);
        impl Drop for Release {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let hold: Hold = Box::new(Release(Some(released)));
        let submitting = submit_holding(
            JobClient::new(&url),
            "/v1/inference",
            operation(),
            Some(hold),
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), submitting)
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(5), on_release)
            .await
            .expect("released in time")
            .ok();
        assert_eq!(
            deleted.lock().unwrap().clone(),
            vec!["upstream-1"],
            "released after the DELETE was answered"
        );
    }

    #[tokio::test]
    async fn an_upstream_job_let_go_before_its_end_is_cancelled() {
        let (url, deleted) = slow_worker().await;
        let upstream = submit(JobClient::new(&url), "/v1/inference", operation())
            .await
            .unwrap();
        assert_eq!(upstream.job_id(), "upstream-1");
        assert!(deleted.lock().unwrap().is_empty());
        drop(upstream);
        assert_eq!(deletes_of(&deleted).await, vec!["upstream-1"]);
    }
}
