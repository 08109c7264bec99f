//! Heartbeats to the queen: a full `WorkerInfo` every interval. The first one registers the
//! worker; a queen that is down is retried quietly and never stops the worker.

use std::sync::Arc;

use rbee_contract::WorkerHeartbeat;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::state::{LoadState, WorkerShared};

pub(crate) async fn run(
    shared: Arc<WorkerShared>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let Some(queen) = config.queen_url.as_deref() else {
        return;
    };
    let url = format!("{}/v1/worker-heartbeat", queen.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(
            config
                .heartbeat_interval
                .max(std::time::Duration::from_secs(1)),
        )
        .build()
        .unwrap_or_default();
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state_changes = shared.watch_load();
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            // A change of state (loaded, failed) is worth telling at once; progress within
            // loading is not.
            changed = kind_changed(&mut state_changes) => if !changed { break },
        }
        let outcome = match send(&client, &url, &config, &shared).await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("the queen answered {}", response.status())),
            Err(err) => Err(err.to_string()),
        };
        match outcome {
            Ok(()) if !reachable => {
                tracing::info!(%url, "heartbeats reach the queen again");
                reachable = true;
            }
            Ok(()) => {}
            Err(error) if reachable => {
                tracing::warn!(%url, %error, "heartbeat failed; retrying every interval");
                reachable = false;
            }
            Err(error) => tracing::debug!(%url, %error, "heartbeat failed"),
        }
    }
    // A final heartbeat tells the queen at once that this worker is going away.
    if shared.is_stopping() {
        let _ = send(&client, &url, &config, &shared).await;
    }
}

/// Waits until the load state changes kind (loading → ready, say); false when the worker is gone.
async fn kind_changed(rx: &mut tokio::sync::watch::Receiver<LoadState>) -> bool {
    let kind = |state: &LoadState| std::mem::discriminant(state);
    let before = kind(&rx.borrow_and_update());
    loop {
        if rx.changed().await.is_err() {
            return false;
        }
        if kind(&rx.borrow_and_update()) != before {
            return true;
        }
    }
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    config: &WorkerConfig,
    shared: &WorkerShared,
) -> reqwest::Result<reqwest::Response> {
    let mut request = client.post(url).json(&WorkerHeartbeat {
        worker: shared.info(),
    });
    if let Some(token) = &config.cluster_token {
        request = request.bearer_auth(token);
    }
    request.send().await
}
