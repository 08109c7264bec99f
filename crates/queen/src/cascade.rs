//! Stopping the whole cluster: the queen asks every hive it knows to shut down (a hive stops
//! its workers first). Only `POST /v1/shutdown` does this; a queen stopped by a signal leaves
//! the hives running, so that restarting the queen loses nothing.

use std::time::Duration;

use futures::future::join_all;

use crate::state::Queen;

/// How long one hive may take to accept the shutdown request.
const HIVE_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn stop_hives(queen: &Queen) {
    let hives = queen.registry.hive_views();
    let requests = hives.iter().map(|view| async move {
        let hive = &view.info;
        let url = format!("{}/v1/shutdown", hive.url.trim_end_matches('/'));
        let mut request = queen
            .http()
            .post(&url)
            .timeout(HIVE_SHUTDOWN_TIMEOUT);
        if let Some(token) = &queen.config.cluster_token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                tracing::info!(hive_id = %hive.hive_id, "hive is shutting down");
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
