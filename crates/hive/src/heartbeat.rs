//! Heartbeats to the queen: the hive's `HiveInfo` every interval, and at once when a worker is
//! added or goes away. The first one registers the hive; a queen that is down is retried
//! quietly and never stops the hive.

use std::sync::Arc;

use rbee_contract::HiveHeartbeat;
use tokio_util::sync::CancellationToken;

use crate::Hive;

pub(crate) async fn run(hive: Arc<Hive>, shutdown: CancellationToken) {
    let Some(queen) = hive.config.queen_url.as_deref() else {
        tracing::info!("no queen URL: this hive sends no heartbeats");
        return;
    };
    let mut sender = daemon_kit::HeartbeatSender::new(
        queen,
        "/v1/hive-heartbeat",
        hive.config.cluster_token.clone(),
        hive.config.heartbeat_interval,
    );
    let mut ticker = tokio::time::interval(hive.config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            () = hive.children.changed() => {}
        }
        let beat = HiveHeartbeat {
            hive: hive.info().await,
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = sender.send(&beat) => {}
        }
    }
}
