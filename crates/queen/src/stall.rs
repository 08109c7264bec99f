//! Noticing a hung worker while one of its jobs runs.
//!
//! A worker that dies closes its connections and the stream breaks at once; a worker that
//! hangs (a stopped process, a machine that froze) keeps them open and sends nothing, not
//! even the keep-alive comments its event streams carry. A silence alone proves nothing: a
//! worker evaluating a long prompt, or a job waiting in the worker's own line, sends no event
//! for as long as that takes. So a silence of the stall timeout
//! ([`QueenConfig::worker_stall_timeout`](crate::config::QueenConfig::worker_stall_timeout))
//! has the queen ask the worker's `GET /health`, which its HTTP server answers however busy
//! its engine is. A worker that answers is waited for again (one check per timeout of
//! silence); one that does not answer within the stall timeout (at most [`CHECK_LIMIT`]) is
//! hung.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rbee_contract::WorkerInfo;
use tokio::time::Instant;

use crate::state::Queen;

/// The longest a worker's answer to the check is waited for: an HTTP server that is up
/// answers `/health` in milliseconds, however loaded the machine.
pub(crate) const CHECK_LIMIT: Duration = Duration::from_secs(5);

/// The silence of one job's worker, measured from its last event.
pub(crate) struct StallWatch<'a> {
    queen: &'a Queen,
    worker: &'a WorkerInfo,
    timeout: Duration,
    base: Instant,
    /// Milliseconds after `base` of the latest sign of life.
    last_ms: AtomicU64,
}

impl<'a> StallWatch<'a> {
    pub fn new(queen: &'a Queen, worker: &'a WorkerInfo) -> Self {
        StallWatch {
            queen,
            worker,
            timeout: queen.config.worker_stall_timeout,
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Something arrived from the worker now.
    pub fn seen(&self) {
        self.last_ms
            .fetch_max(millis(self.base.elapsed()), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Runs `work` to its end, unless the worker is found hung first: then `None`, and
    /// `work` is dropped.
    pub async fn guard<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = work => Some(output),
            () = self.hung() => None,
        }
    }

    /// Returns once the worker has been silent for the timeout and did not answer the check.
    async fn hung(&self) {
        loop {
            tokio::time::sleep_until(self.last() + self.timeout).await;
            if self.last().elapsed() < self.timeout {
                continue;
            }
            if self.answers().await {
                tracing::debug!(worker_id = %self.worker.worker_id, timeout = ?self.timeout,
                    "no event from the worker for the stall timeout, but it answers; waiting on");
                self.seen();
                continue;
            }
            // An event that arrived while the check was waiting is a sign of life too: a worker
            // whose `/health` answer was late (a loaded machine) but whose stream went on is slow,
            // not hung.
            if self.last().elapsed() < self.timeout {
                continue;
            }
            tracing::warn!(worker_id = %self.worker.worker_id, timeout = ?self.timeout,
                "no event from the worker for the stall timeout and it does not answer: hung");
            return;
        }
    }

    /// Whether the worker answers `GET /health` within the timeout (at most [`CHECK_LIMIT`]).
    async fn answers(&self) -> bool {
        let url = format!("{}/health", self.worker.url.trim_end_matches('/'));
        let mut request = self.queen.http().get(&url);
        if let Some(token) = &self.queen.config.cluster_token {
            request = request.bearer_auth(token);
        }
        let limit = self.timeout.min(CHECK_LIMIT);
        match tokio::time::timeout(limit, request.send()).await {
            Ok(Ok(response)) => response.status().is_success(),
            Ok(Err(err)) => {
                tracing::debug!(url, error = %err, "the worker's health check failed");
                false
            }
            Err(_) => false,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use axum::Router;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::get;
    use rbee_contract::WorkerState;

    use super::*;
    use crate::config::QueenConfig;
    use crate::registry::tests::worker;

    /// A worker's `/health` that answers at once, or never while `hung` is set.
    async fn health(hung: Arc<AtomicBool>) -> WorkerInfo {
        async fn answer(State(hung): State<Arc<AtomicBool>>) -> StatusCode {
            if hung.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            StatusCode::OK
        }
        let app = Router::new().route("/health", get(answer)).with_state(hung);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut info = worker("w1", "m", WorkerState::Ready, 1);
        info.url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        info
    }

    fn queen(stall: Duration) -> Queen {
        Queen::new(QueenConfig {
            worker_stall_timeout: stall,
            ..QueenConfig::default()
        })
    }

    #[tokio::test]
    async fn a_silent_worker_that_answers_is_waited_for() {
        let hung = Arc::new(AtomicBool::new(false));
        let info = health(Arc::clone(&hung)).await;
        // The check is answered within the timeout: generous, for a loaded machine.
        let queen = queen(Duration::from_millis(400));
        let watch = StallWatch::new(&queen, &info);
        // Silent for five timeouts: a long prefill, not a hang.
        let slow = tokio::time::sleep(Duration::from_millis(2000));
        assert_eq!(watch.guard(slow).await, Some(()));
    }

    #[tokio::test]
    async fn a_silent_worker_that_does_not_answer_is_hung() {
        let hung = Arc::new(AtomicBool::new(true));
        let info = health(Arc::clone(&hung)).await;
        let queen = queen(Duration::from_millis(100));
        let watch = StallWatch::new(&queen, &info);
        let started = std::time::Instant::now();
        assert_eq!(watch.guard(std::future::pending::<()>()).await, None);
        // The timeout, then the check's own timeout.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn an_event_during_an_unanswered_check_keeps_the_stream_alive() {
        let hung = Arc::new(AtomicBool::new(true));
        let info = health(Arc::clone(&hung)).await;
        let queen = queen(Duration::from_millis(400));
        let watch = StallWatch::new(&queen, &info);
        // Silent past the timeout, so the check starts (at 400 ms, unanswered until 800 ms);
        // an event arrives while it waits, and more follow: slow, not hung.
        let late = async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            for _ in 0..8 {
                watch.seen();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        assert_eq!(watch.guard(late).await, Some(()));
    }

    #[tokio::test]
    async fn events_keep_a_stream_alive_without_checks() {
        let hung = Arc::new(AtomicBool::new(true));
        let info = health(Arc::clone(&hung)).await;
        let queen = queen(Duration::from_millis(200));
        let watch = StallWatch::new(&queen, &info);
        let chatty = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                watch.seen();
            }
        };
        assert_eq!(watch.guard(chatty).await, Some(()));
    }
}
