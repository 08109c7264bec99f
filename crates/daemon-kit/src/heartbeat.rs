use std::time::Duration;

use serde::Serialize;

/// Posts heartbeats to one route of the queen. A queen that does not answer is retried at
/// every beat and never stops the daemon; losing it and finding it again are logged once each.
#[derive(Debug)]
pub struct HeartbeatSender {
    client: reqwest::Client,
    url: String,
    token: Option<String>,
    reachable: bool,
}

impl HeartbeatSender {
    /// `route` is e.g. `/v1/worker-heartbeat`. A beat that takes longer than the interval (at
    /// least one second) is abandoned.
    pub fn new(queen_url: &str, route: &str, token: Option<String>, interval: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(interval.max(Duration::from_secs(1)))
            .build()
            .unwrap_or_default();
        let url = format!("{}{route}", queen_url.trim_end_matches('/'));
        HeartbeatSender {
            client,
            url,
            token,
            reachable: true,
        }
    }

    /// Sends one heartbeat; true when the queen accepted it.
    pub async fn send(&mut self, body: &impl Serialize) -> bool {
        let mut request = self.client.post(&self.url).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let outcome = match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("the queen answered {}", response.status())),
            Err(err) => Err(err.to_string()),
        };
        let url = &self.url;
        match outcome {
            Ok(()) => {
                if !self.reachable {
                    tracing::info!(%url, "heartbeats reach the queen again");
                    self.reachable = true;
                }
                true
            }
            Err(error) => {
                if self.reachable {
                    tracing::warn!(%url, %error, "heartbeat failed; retrying every interval");
                    self.reachable = false;
                } else {
                    tracing::debug!(%url, %error, "heartbeat failed");
                }
                false
            }
        }
    }
}
