use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `app` on `listener` until `stop` resolves, then stops accepting connections and
/// gives the open ones (streams reading their last events) up to `linger` to end before it
/// returns. `stop` is where a daemon drains its work: while it runs, the daemon still accepts
/// connections and answers them (new jobs are refused by then), so heartbeats and the streams
/// of finishing jobs keep flowing.
///
/// Every connection is set `TCP_NODELAY`: a job's stream is a series of small writes (one
/// per event), and with Nagle's algorithm each would wait for the acknowledgement of the one
/// before, which the reader's delayed ACK can hold back for tens of milliseconds.
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
        served = axum::serve(listener.tap_io(set_nodelay), app).with_graceful_shutdown(signal) => served,
        () = async {
            stopped.cancelled().await;
            tokio::time::sleep(linger).await;
        } => {
            tracing::info!(?linger, "closing connections still open after shutdown");
            Ok(())
        }
    }
}

fn set_nodelay(stream: &mut tokio::net::TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "cannot set TCP_NODELAY on a connection");
    }
}
