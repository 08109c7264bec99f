//! Noticing that the hive which spawned this worker is gone.
//!
//! A hive stopped normally stops its workers itself; one killed with SIGKILL cannot. The
//! kernel then re-parents the worker (to init or a subreaper), so the worker polls its parent
//! pid and starts its own graceful shutdown once the parent is no longer the hive. The parent
//! pid can never turn back into the hive's, so a changed value is proof, without pid-reuse
//! races and without unsafe code.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the parent pid is checked.
const POLL: Duration = Duration::from_secs(1);

/// Cancels `shutdown` as soon as this process's parent is not `hive_pid`; returns when either
/// happened.
pub(crate) async fn watch(hive_pid: u32, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let parent = std::os::unix::process::parent_id();
        if parent != hive_pid {
            tracing::warn!(
                hive_pid,
                parent,
                "the hive that started this worker is gone; shutting down"
            );
            shutdown.cancel();
            return;
        }
    }
}
