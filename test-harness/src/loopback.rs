use axum::Router;
use tokio::task::JoinHandle;

/// Serves `router` on a fresh `127.0.0.1` port; returns its `http://` URL and the server task,
/// which the caller aborts when the stand-in is dropped.
pub async fn serve_on_loopback(router: Router) -> (String, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, task)
}
