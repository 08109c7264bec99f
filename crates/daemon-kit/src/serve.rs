use std::future::Future;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `app` on `listener` until `stop` resolves, then stops accepting connections and
/// gives the open ones (streams reading their last events) up to `linger` to end before it
/// returns. `stop` is where a daemon drains its work: while it runs, the daemon still accepts
/// connections and answers them (new jobs are refused by then), so heartbeats and the streams
/// of finishing jobs keep flowing.
pub async fn serve_until<F>(
    listener: TcpListener,
    app: Router,
    stop: F,
    linger: Duration,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let stopped = CancellationToken::new();
    let signal = {
        let stopped = stopped.clone();
        async move {
            stop.await;
            stopped.cancel();
        }
    };
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(signal) => served,
        () = async {
            stopped.cancelled().await;
            tokio::time::sleep(linger).await;
        } => {
            tracing::info!(?linger, "closing connections still open after shutdown");
            Ok(())
        }
    }
}
