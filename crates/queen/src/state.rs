//! What every part of the queen shares: its configuration, the registry, the HTTP client for
//! calls to hives and workers, the cold starts in progress, the waiting lines and metrics.

use std::sync::Arc;
use std::time::Duration;

use job_client::{ClientError, JobClient};
use job_server::JobFailure;
use rbee_contract::ErrorCode;

use crate::config::QueenConfig;
use crate::metrics::Metrics;
use crate::queue::Queues;
use crate::registry::Registry;
use crate::spawn::SpawnFlights;

pub(crate) struct Queen {
    pub config: QueenConfig,
    pub registry: Arc<Registry>,
    pub spawns: SpawnFlights,
    /// Infer jobs waiting for a busy model.
    pub queues: Queues,
    pub metrics: Arc<Metrics>,
    http: reqwest::Client,
}

impl Queen {
    pub fn new(config: QueenConfig) -> Self {
        // The same limits job-client uses by default: give up on a connection that cannot be
        // made in 10 s or that sends nothing (not even a keep-alive comment) for 60 s.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Queen {
            registry: Arc::new(Registry::new(config.heartbeat_interval)),
            spawns: SpawnFlights::default(),
            queues: Queues::new(config.queue_len, config.queue_timeout),
            metrics: Arc::new(Metrics::new()),
            config,
            http,
        }
    }

    /// A job client for a hive or a worker, carrying the cluster token.
    pub fn client(&self, base_url: &str) -> JobClient {
        let client = JobClient::new(base_url).with_http_client(self.http.clone());
        match &self.config.cluster_token {
            Some(token) => client.with_token(token),
            None => client,
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

/// The failure to report when talking to `peer` (e.g. "hive h1") went wrong. A refusal keeps
/// the peer's own code and message, which are written for users; transport and protocol
/// details stay in the log.
pub(crate) fn upstream_failure(peer: &str, err: &ClientError) -> JobFailure {
    tracing::warn!(peer, error = %err, "call to an upstream daemon failed");
    match err {
        ClientError::Rejected { code, message, .. } => JobFailure::new(*code, message.clone()),
        ClientError::Transport { .. } => {
            JobFailure::new(ErrorCode::Unavailable, format!("cannot reach {peer}"))
        }
        ClientError::StreamEnded { .. } => JobFailure::new(
            ErrorCode::Unavailable,
            format!("{peer} went away before the job ended"),
        ),
        ClientError::UnexpectedStatus { .. }
        | ClientError::InvalidResponse { .. }
        | ClientError::InvalidEvent { .. } => JobFailure::new(
            err.code(),
            format!("{peer} broke the job protocol; details are in the queen's log"),
        ),
    }
}
