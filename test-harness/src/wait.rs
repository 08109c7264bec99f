//! Waiting, in tests, for something a daemon does in its own time.

use std::time::Duration;

use tokio::time::Instant;

/// Polls `check` every 20 ms until it yields a value; panics after `timeout`, naming `what`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
