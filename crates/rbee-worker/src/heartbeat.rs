//! Heartbeats to the queen: a full `WorkerInfo` and the prefix keys of the cached prompts
//! every interval. The first one registers the worker; a queen that is down is retried
//! quietly and never stops the worker.

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
    let mut sender = daemon_kit::HeartbeatSender::new(
        queen,
        "/v1/worker-heartbeat",
        config.cluster_token.clone(),
        config.heartbeat_interval,
    );
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state_changes = shared.watch_load();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            // A change of state (loaded, failed) is worth telling at once; progress within
            // loading is not.
            changed = kind_changed(&mut state_changes) => if !changed { break },
        }
        sender.send(&heartbeat(&shared)).await;
    }
    // A final heartbeat tells the queen at once that this worker is going away.
    if shared.is_stopping() {
        sender.send(&heartbeat(&shared)).await;
    }
}

/// The worker's info and the prefix keys of the prompts it has cached, for the queen to send
/// a conversation's next turn back here.
fn heartbeat(shared: &WorkerShared) -> WorkerHeartbeat {
    WorkerHeartbeat {
        worker: shared.info(),
        cached_prefixes: shared.cached_prefixes(),
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
