//! A TCP proxy on loopback that a test puts between two daemons (the queen and a worker, the
//! keeper and the queen) to break their connections on cue: [`TcpProxy::cut`] closes every
//! live connection at once, as a network blip or a restarted middlebox would, and
//! [`TcpProxy::refuse`] closes each new connection as soon as it is accepted, for as long
//! as the outage should last.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy from a fresh `127.0.0.1` port to one target address. Dropping it stops it and
/// closes its connections.
pub struct TcpProxy {
    /// `http://127.0.0.1:<port>`: what the daemon on the near side is told to use.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    /// Bumped by every cut; a connection ends when it changes.
    cuts: watch::Sender<u64>,
    refusing: AtomicBool,
    /// Connections forwarded so far, and bytes passed from the target back to the clients.
    accepted: AtomicU64,
    bytes_back: AtomicU64,
}

impl TcpProxy {
    /// A proxy to `target`, an `http://host:port` URL (or `host:port`) on loopback.
    pub async fn start(target: &str) -> TcpProxy {
        let authority = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let target: SocketAddr = tokio::net::lookup_host(&authority)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("the proxy's target `{authority}` is not an address"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("the proxy's address")
        );
        let shared = Arc::new(Shared {
            target,
            cuts: watch::Sender::new(0),
            refusing: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            bytes_back: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        TcpProxy { url, shared, task }
    }

    /// Closes every connection open right now, in both directions; new ones are forwarded
    /// again (unless the proxy [refuses](Self::refuse) them).
    pub fn cut(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// While `true`, a new connection is closed as soon as it is accepted, before a byte is
    /// forwarded: the far side is unreachable.
    pub fn refuse(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections forwarded to the target so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes passed from the target back to the clients so far.
    pub fn bytes_back(&self) -> u64 {
        self.shared.bytes_back.load(Ordering::SeqCst)
    }

    /// Waits until more than `bytes` have come back from the target; panics after `timeout`.
    pub async fn wait_bytes_back(&self, bytes: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.bytes_back() <= bytes {
            assert!(
                Instant::now() < deadline,
                "only {} bytes came back through the proxy within {timeout:?}",
                self.bytes_back()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let cut = shared.cuts.subscribe();
        tokio::spawn(forward(client, Arc::clone(&shared), cut));
    }
}

/// Copies bytes both ways until either side closes or the proxy cuts the connection.
async fn forward(mut client: TcpStream, shared: Arc<Shared>, mut cut: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(shared.target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let down = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if client_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                    shared.bytes_back.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cut.changed() => {}
    }
    // Both sockets are dropped here: each side sees its connection end mid-answer.
}
