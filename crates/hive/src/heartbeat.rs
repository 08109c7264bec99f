//! Heartbeats to the queen: the hive's `HiveInfo` every interval, and at once when a worker is
//! added or goes away. The first one registers the hive; a queen that is down is retried
//! quietly and never stops the hive.

use std::sync::Arc;
use std::time::Duration;

use rbee_contract::HiveHeartbeat;
use tokio_util::sync::CancellationToken;

use crate::Hive;

pub(crate) async fn run(hive: Arc<Hive>, shutdown: CancellationToken) {
    let Some(queen) = hive.config.queen_url.as_deref() else {
        tracing::info!("no queen URL: this hive sends no heartbeats");
        return;
    };
    let url = format!("{}/v1/hive-heartbeat", queen.trim_end_matches('/'));
    let interval = hive.config.heartbeat_interval;
    let timeout = interval.max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reachable = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            () = hive.children.changed() => {}
        }
        let beat = HiveHeartbeat {
            hive: hive.info().await,
        };
        let mut request = hive.http.post(&url).json(&beat).timeout(timeout);
        if let Some(token) = &hive.config.cluster_token {
            request = request.bearer_auth(token);
        }
        let outcome = tokio::select! {
            () = shutdown.cancelled() => break,
            outcome = request.send() => match outcome {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("the queen answered {}", response.status())),
                Err(err) => Err(err.to_string()),
            },
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
}
