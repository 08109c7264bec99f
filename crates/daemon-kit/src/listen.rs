use std::net::SocketAddr;

use tokio::net::TcpListener;

/// The cluster's shared secret from `RBEE_CLUSTER_TOKEN`; unset or empty means none.
pub fn cluster_token_from_env() -> Option<String> {
    std::env::var("RBEE_CLUSTER_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "refusing to bind {0} without RBEE_CLUSTER_TOKEN: the routes would be open to the network"
    )]
    OpenToNetwork(SocketAddr),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a daemon's port. Without a cluster token only loopback addresses are allowed: a
/// daemon's protected routes are open when it has no token.
pub async fn listen(
    addr: SocketAddr,
    cluster_token: Option<&str>,
) -> Result<TcpListener, ListenError> {
    if cluster_token.is_none() && !addr.ip().is_loopback() {
        return Err(ListenError::OpenToNetwork(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind { addr, source })
}
