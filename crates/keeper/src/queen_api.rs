//! The queen's routes the keeper uses besides the job API: health, the registries, shutdown.

use std::time::Duration;

use job_client::{ClientError, JobClient, JobHandle};
use rbee_contract::{ApiErrorBody, HiveInfo, JOBS_PATH, Operation, WorkerInfo};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{QueenUrl, Settings};
use crate::error::{KeeperError, root_cause};

/// How often a broken job stream is resumed with `Last-Event-ID`, and the first pause.
const RESUME_ATTEMPTS: u32 = 5;
const RESUME_DELAY: Duration = Duration::from_millis(300);

/// One row of `GET /v1/hives`: the hive's last heartbeat and how fresh it is.
#[derive(Debug, Clone, Deserialize)]
pub struct HiveEntry {
    #[serde(flatten)]
    pub info: HiveInfo,
    /// `healthy` or `stale`.
    pub status: String,
    #[serde(default)]
    pub last_seen_ms_ago: Option<u64>,
}

/// What the queen's `202` to `POST /v1/shutdown` announces.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct ShutdownPlan {
    /// How long running jobs may take to finish, in milliseconds.
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// The hives the queen will tell to stop once its jobs have drained.
    #[serde(default)]
    pub hives: Option<usize>,
}

impl ShutdownPlan {
    pub fn grace(&self) -> Option<Duration> {
        self.grace_ms.map(Duration::from_millis)
    }
}

#[derive(Debug, Deserialize)]
struct HiveList {
    hives: Vec<HiveEntry>,
}

#[derive(Debug, Deserialize)]
struct WorkerList {
    workers: Vec<WorkerInfo>,
}

/// A client of one queen.
#[derive(Debug, Clone)]
pub struct Queen {
    url: QueenUrl,
    http: reqwest::Client,
    api_key: Option<String>,
    jobs: JobClient,
}

impl Queen {
    pub fn new(settings: &Settings) -> Queen {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        // A broken stream is resumed for about 4.5 s (5 attempts, 0.3 s apart and growing):
        // long enough for a network blip or a proxy's restart, short enough that a queen that
        // is really gone is reported promptly.
        let mut jobs =
            JobClient::new(settings.queen.base()).with_reconnects(RESUME_ATTEMPTS, RESUME_DELAY);
        if let Some(key) = &settings.api_key {
            jobs = jobs.with_token(key.clone());
        }
        Queen {
            url: settings.queen.clone(),
            http,
            api_key: settings.api_key.clone(),
            jobs,
        }
    }

    pub fn url(&self) -> &QueenUrl {
        &self.url
    }

    pub fn jobs(&self) -> &JobClient {
        &self.jobs
    }

    /// Submits `operation` as a job that outlives a broken connection
    /// (`cancel_on_disconnect=false`): the stream is resumed with `Last-Event-ID` and every
    /// event still arrives once. The caller must cancel the job itself whenever it stops
    /// following it before its end (else the queen ends it once nobody has resumed for its
    /// detached timeout).
    pub async fn submit_resumable(&self, operation: &Operation) -> Result<JobHandle, ClientError> {
        self.jobs
            .submit_to(
                &format!("{JOBS_PATH}?cancel_on_disconnect=false"),
                operation,
            )
            .await
    }

    /// `GET /health`; the error says why it does not answer.
    pub async fn health(&self) -> Result<(), String> {
        probe_health(&self.http, &self.url.join("/health")).await
    }

    /// The queen's hive list as it sent it, and parsed.
    pub async fn hives(&self) -> Result<(Value, Vec<HiveEntry>), KeeperError> {
        let raw = self.get_json("/v1/hives").await?;
        let list: HiveList = parse(&raw, "/v1/hives", &self.url)?;
        Ok((raw, list.hives))
    }

    /// The queen's worker list as it sent it, and parsed.
    pub async fn workers(&self) -> Result<(Value, Vec<WorkerInfo>), KeeperError> {
        let raw = self.get_json("/v1/workers").await?;
        let list: WorkerList = parse(&raw, "/v1/workers", &self.url)?;
        Ok((raw, list.workers))
    }

    /// `POST /v1/shutdown`.
    /// `POST /v1/shutdown`: the queen drains its jobs, then stops its hives, then exits.
    pub async fn shutdown(&self) -> Result<ShutdownPlan, KeeperError> {
        let url = self.url.join("/v1/shutdown");
        let response = self
            .authorized(self.http.post(&url))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let response = check(response, &format!("the queen at {}", self.url)).await?;
        // An older queen answers without the plan; its shutdown is waited for all the same.
        Ok(response.json().await.unwrap_or_default())
    }

    async fn get_json(&self, path: &str) -> Result<Value, KeeperError> {
        let response = self
            .authorized(self.http.get(self.url.join(path)))
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let response = check(response, &format!("the queen at {}", self.url)).await?;
        response.json().await.map_err(|e| {
            KeeperError::Client(format!(
                "the queen at {} sent an unreadable answer to {path}: {}",
                self.url,
                root_cause(&e)
            ))
        })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    pub(crate) fn unreachable(&self, err: &reqwest::Error) -> KeeperError {
        unreachable_error(&self.url, root_cause(err))
    }
}

pub(crate) fn unreachable_error(url: &QueenUrl, reason: String) -> KeeperError {
    KeeperError::QueenUnreachable {
        url: url.base(),
        reason,
        hint: if url.is_local() {
            "start one with `rbee-keeper queen start`"
        } else {
            "check --queen-url, or start the queen on that machine"
        },
    }
}

/// `GET url` answers 2xx within a short timeout.
pub(crate) async fn probe_health(http: &reqwest::Client, url: &str) -> Result<(), String> {
    match http.get(url).timeout(Duration::from_secs(2)).send().await {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("/health answered HTTP {}", response.status())),
        Err(err) => Err(root_cause(&err)),
    }
}

/// Passes a 2xx answer through; turns any other into an error naming `what`.
pub(crate) async fn check(
    response: reqwest::Response,
    what: &str,
) -> Result<reqwest::Response, KeeperError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    Err(match serde_json::from_slice::<ApiErrorBody>(&body) {
        Ok(ApiErrorBody { error }) => KeeperError::Remote {
            code: error.code,
            message: error.message,
        },
        Err(_) => KeeperError::Http {
            what: what.to_owned(),
            status: status.as_u16(),
            message: String::from_utf8_lossy(&body)
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        },
    })
}

fn parse<T: DeserializeOwned>(raw: &Value, path: &str, url: &QueenUrl) -> Result<T, KeeperError> {
    T::deserialize(raw).map_err(|e| {
        KeeperError::Client(format!(
            "the queen at {url} sent an unexpected answer to {path}: {e}"
        ))
    })
}
