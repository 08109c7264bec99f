//! Stopping the whole cluster: after its own jobs have drained, the queen asks every hive it
//! knows to shut down (a hive drains and stops its workers first) and waits, bounded, until
//! each has stopped answering. Only `POST /v1/shutdown` does this; a queen stopped by a signal
//! leaves the hives running, so that restarting the queen loses nothing.

use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;

use crate::state::Queen;

/// How long one hive may take to accept the shutdown request.
const HIVE_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the queen waits for a hive that accepted the request to go away. A hive gives its
/// workers their stop grace (30 s by default) and then SIGKILLs them, so this covers it.
const HIVE_STOP_LIMIT: Duration = Duration::from_secs(60);

/// How often a stopping hive's `/health` is polled.
const GONE_POLL: Duration = Duration::from_millis(200);

pub(crate) async fn stop_hives(queen: &Queen) {
    let hives = queen.registry.hive_views();
    if hives.is_empty() {
        return;
    }
    tracing::info!(hives = hives.len(), "asking every hive to shut down");
    let requests = hives.iter().map(|view| async move {
        let hive = &view.info;
        let base = hive.url.trim_end_matches('/');
        let mut request = queen
            .http()
            .post(format!("{base}/v1/shutdown"))
            .timeout(HIVE_SHUTDOWN_TIMEOUT);
        if let Some(token) = &queen.config.cluster_token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                tracing::info!(hive_id = %hive.hive_id, "hive is shutting down");
                if wait_gone(queen, base).await {
                    tracing::info!(hive_id = %hive.hive_id, "hive stopped");
                } else {
                    tracing::warn!(hive_id = %hive.hive_id, limit = ?HIVE_STOP_LIMIT,
                        "hive still answers after it was asked to stop");
                }
            }
            Ok(response) => {
                tracing::warn!(hive_id = %hive.hive_id, status = %response.status(), "hive refused to shut down");
            }
            Err(err) => {
                tracing::warn!(hive_id = %hive.hive_id, error = %err, "cannot ask the hive to shut down");
            }
        }
    });
    join_all(requests).await;
}

/// Polls the hive's `/health` until it no longer answers; false after [`HIVE_STOP_LIMIT`].
async fn wait_gone(queen: &Queen, base: &str) -> bool {
    let deadline = Instant::now() + HIVE_STOP_LIMIT;
    let url = format!("{base}/health");
    loop {
        let answered = queen
            .http()
            .get(&url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if !answered {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(GONE_POLL).await;
    }
}
