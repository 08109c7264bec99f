//! A queen with an API key, as the OpenAI API's clients meet it, and optionally a real hive
//! that registered with it; plus the readers of OpenAI's streamed answers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{WorkerHeartbeat, WorkerInfo, WorkerState};
use serde_json::{Value, json};

use crate::daemon::{Daemon, free_port};
use crate::hive::scratch_dir;
use crate::procfs::process_gone;
use crate::queen::{Script, ScriptedUpstream};
use crate::wait::eventually;

/// A queen whose clients authenticate with `key` and whose daemons with `token`, and
/// optionally a hive that registered with it. Dropping it stops the hive with SIGTERM, so the
/// hive stops the workers it started.
pub struct OpenAiCluster {
    pub queen: Daemon,
    pub hive: Option<Daemon>,
    pub http: reqwest::Client,
    /// The API key every request of [`get`](Self::get) and [`post`](Self::post) carries.
    pub key: &'static str,
    /// The cluster token, which daemons (and scripted workers' heartbeats) use.
    pub token: &'static str,
}

/// What differs between the hives of [`OpenAiCluster::with_hive`].
pub struct OpenAiHive<'a> {
    pub hive_id: &'a str,
    /// The scratch directory the hive writes worker logs to.
    pub log_dir: &'a str,
    /// Directories the API key may have the hive load models from (a key that is not an
    /// admin key may not name any other path).
    pub model_dirs: Vec<PathBuf>,
}

impl OpenAiCluster {
    pub async fn queen_only(key: &'static str, token: &'static str) -> OpenAiCluster {
        let queen = Daemon::queen(
            &["--heartbeat-interval", "100ms", "--spawn-timeout", "120s"],
            &[("RBEE_CLUSTER_TOKEN", token), ("RBEE_API_KEYS", key)],
        )
        .await;
        OpenAiCluster {
            queen,
            hive: None,
            http: reqwest::Client::new(),
            key,
            token,
        }
    }

    /// A queen and a hive; the hive starts workers on demand.
    pub async fn with_hive(
        key: &'static str,
        token: &'static str,
        hive: OpenAiHive<'_>,
    ) -> OpenAiCluster {
        let mut cluster = OpenAiCluster::queen_only(key, token).await;
        let port = free_port();
        let first_worker_port = free_port().min(65_000);
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--queen-url".into(),
            cluster.queen.url.clone(),
            "--hive-id".into(),
            hive.hive_id.into(),
            "--heartbeat-interval".into(),
            "100ms".into(),
            "--log-dir".into(),
            scratch_dir(hive.log_dir).display().to_string(),
            "--worker-port-range".into(),
            format!("{first_worker_port}-{}", first_worker_port + 30),
            "--stop-grace".into(),
            "2s".into(),
        ];
        for dir in &hive.model_dirs {
            args.extend(["--allow-model-dir".to_string(), dir.display().to_string()]);
        }
        let daemon = Daemon::start(
            "rbee-hive",
            &args,
            &[("RBEE_CLUSTER_TOKEN", token)],
            format!("http://127.0.0.1:{port}"),
        )
        .expect("start hive");
        cluster.hive = Some(daemon);
        eventually("the hive registers", Duration::from_secs(30), async || {
            let hives = cluster.get("/v1/hives").await.1;
            (hives["hives"].as_array()?.len() == 1).then_some(())
        })
        .await;
        cluster
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.queen.url)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(self.key)
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(self.key)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    /// A non-streaming request: the status and the JSON body.
    pub async fn call(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text}\n{}", self.logs()));
        (status, json)
    }

    /// A streaming request: every `data:` payload, in order.
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self.post(path, body).await;
        assert_eq!(response.status(), 200, "{}", self.logs());
        sse_data(response).await
    }

    /// Registers a scripted stand-in as the only worker for `model`, with a context of
    /// `context_length` tokens.
    pub async fn scripted_worker(
        &self,
        model: &str,
        context_length: u32,
        script: Script,
    ) -> ScriptedUpstream {
        let worker = ScriptedUpstream::start(script).await;
        let beat = json!(WorkerHeartbeat {
            worker: WorkerInfo {
                worker_id: format!("w-{model}"),
                url: worker.url.clone(),
                model: model.into(),
                device: "cpu".into(),
                state: WorkerState::Ready,
                slots_total: 1,
                slots_free: 1,
                hive_id: None,
                context_length: Some(context_length),
            },
            cached_prefixes: Vec::new(),
        });
        let response = self
            .http
            .post(self.url("/v1/worker-heartbeat"))
            .bearer_auth(self.token)
            .json(&beat)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
        worker
    }

    pub fn logs(&self) -> String {
        let mut logs = format!("queen log:\n{}", self.queen.log_text());
        if let Some(hive) = &self.hive {
            logs.push_str(&format!("\nhive log:\n{}", hive.log_text()));
        }
        logs
    }
}

impl Drop for OpenAiCluster {
    fn drop(&mut self) {
        // SIGTERM lets the hive stop the workers it started; a killed hive would leave them.
        if let Some(hive) = &self.hive
            && hive.signal("TERM").is_ok()
        {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !process_gone(hive.pid()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads an SSE body to its end; returns the `data:` payloads. Comments are skipped, as
/// OpenAI clients skip them.
pub async fn sse_data(response: reqwest::Response) -> Vec<String> {
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut body = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        body.push_str(std::str::from_utf8(&chunk.expect("a chunk")).expect("UTF-8"));
    }
    body.split("\n\n")
        .filter_map(|frame| {
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The chunks of a stream before `[DONE]`, parsed; asserts `[DONE]` is last and alone.
pub fn chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(
        data.iter().filter(|d| *d == "[DONE]").count(),
        1,
        "{data:?}"
    );
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
        .collect()
}

/// A model file as the OpenAI API names it: its canonical path.
pub fn model_id(path: &Path) -> String {
    path.canonicalize()
        .expect("canonical model path")
        .display()
        .to_string()
}
