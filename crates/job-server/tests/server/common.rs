//! A scripted executor and helpers shared by the tests.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use job_server::{
    ApiError, EmitError, JobContext, JobExecutor, JobFailure, JobOutcome, JobResult, JobServer,
    JobServerConfig,
};
use rbee_contract::{ErrorCode, FinishReason, InferRequest, JobEvent, Operation, Usage};
use tokio::sync::watch;

/// What the test executor was observed doing, per job id.
#[derive(Clone)]
pub struct Observed {
    pub emitted: Arc<AtomicU32>,
    cancelled: watch::Sender<HashSet<String>>,
    run_ended: watch::Sender<HashSet<String>>,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            emitted: Arc::default(),
            cancelled: watch::Sender::new(HashSet::new()),
            run_ended: watch::Sender::new(HashSet::new()),
        }
    }
}

impl Observed {
    pub fn emitted(&self) -> u32 {
        self.emitted.load(Ordering::SeqCst)
    }

    pub fn was_cancelled(&self, job_id: &str) -> bool {
        self.cancelled.borrow().contains(job_id)
    }

    /// Waits until the job's cancellation token fired; false after `timeout`.
    pub async fn wait_cancelled(&self, job_id: &str, timeout: Duration) -> bool {
        let mut rx = self.cancelled.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.contains(job_id)))
            .await
            .is_ok()
    }

    /// Waits until the job's `run` future returned or was dropped; false after `timeout`.
    pub async fn wait_run_ended(&self, job_id: &str, timeout: Duration) -> bool {
        let mut rx = self.run_ended.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.contains(job_id)))
            .await
            .is_ok()
    }
}

/// What a test job does, written as the prompt of an `infer` operation.
#[derive(Debug)]
pub enum Script {
    /// `tokens N [DELAY_MS]`: N tokens, then `done` (length).
    Tokens { count: u32, delay: Duration },
    /// `hang`: one `started` event, then waits forever.
    Hang,
    /// `panic`: one `started` event, then panics.
    Panic,
    /// `fail`: ends with `model_not_found`.
    Fail,
    /// `emit_terminal`: tries to emit a terminal event, then completes.
    EmitTerminal,
}

#[derive(Default)]
pub struct ScriptExecutor {
    pub observed: Observed,
}

struct RunGuard {
    observed: Observed,
    job_id: String,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.observed.run_ended.send_modify(|s| {
            s.insert(self.job_id.clone());
        });
    }
}

impl JobExecutor for ScriptExecutor {
    type Job = Script;

    fn admit(&self, operation: Operation) -> Result<Script, ApiError> {
        let Operation::Infer(request) = operation else {
            return Err(ApiError::unsupported_operation(format!(
                "this daemon runs only `infer`, not `{}`",
                operation.name()
            )));
        };
        let prompt = request
            .prompt
            .ok_or_else(|| ApiError::bad_request("a prompt is required"))?;
        let words: Vec<&str> = prompt.split_whitespace().collect();
        let number = |i: usize| -> Result<u64, ApiError> {
            words.get(i).map_or(Ok(0), |w| {
                w.parse().map_err(|_| ApiError::bad_request("not a number"))
            })
        };
        Ok(match words.first().copied() {
            Some("tokens") => Script::Tokens {
                count: u32::try_from(number(1)?).map_err(|_| ApiError::bad_request("too many"))?,
                delay: Duration::from_millis(number(2)?),
            },
            Some("hang") => Script::Hang,
            Some("panic") => Script::Panic,
            Some("fail") => Script::Fail,
            Some("emit_terminal") => Script::EmitTerminal,
            _ => return Err(ApiError::bad_request(format!("unknown script `{prompt}`"))),
        })
    }

    async fn run(&self, script: Script, ctx: JobContext) -> JobResult {
        let _guard = RunGuard {
            observed: self.observed.clone(),
            job_id: ctx.job_id.clone(),
        };
        // Stands in for work outside the future (an inference thread) that watches the token.
        let token = ctx.cancel.clone();
        let observed = self.observed.clone();
        let job_id = ctx.job_id.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            observed.cancelled.send_modify(|s| {
                s.insert(job_id);
            });
        });

        match script {
            Script::Tokens { count, delay } => {
                for i in 0..count {
                    ctx.emit(JobEvent::Token {
                        text: format!("t{i} "),
                        token_id: i,
                        index: i,
                        logprobs: None,
                    })
                    .await?;
                    self.observed.emitted.fetch_add(1, Ordering::SeqCst);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                Ok(JobOutcome::new(
                    FinishReason::Length,
                    Some(Usage::new(3, count)),
                ))
            }
            Script::Hang => {
                ctx.emit(JobEvent::Started { prompt_tokens: 3 }).await?;
                std::future::pending().await
            }
            Script::Panic => {
                ctx.emit(JobEvent::Started { prompt_tokens: 3 }).await?;
                panic!("the scripted job panics");
            }
            Script::Fail => Err(JobFailure::new(ErrorCode::ModelNotFound, "no such model")),
            Script::EmitTerminal => {
                let done = JobEvent::Done {
                    finish_reason: FinishReason::Stop,
                    usage: None,
                };
                match ctx.emit(done).await {
                    Err(EmitError::Terminal) => {
                        ctx.emit(JobEvent::narration("terminal event refused"))
                            .await?;
                        Ok(JobOutcome::complete())
                    }
                    other => Err(JobFailure::internal(format!(
                        "emit of a terminal answered {other:?}"
                    ))),
                }
            }
        }
    }
}

pub fn infer(script: &str) -> Operation {
    Operation::Infer(InferRequest {
        model: "test-model".into(),
        prompt: Some(script.into()),
        ..InferRequest::default()
    })
}

pub struct TestServer {
    pub base: String,
    pub jobs: JobServer<ScriptExecutor>,
    pub http: reqwest::Client,
}

impl TestServer {
    pub async fn start(config: JobServerConfig) -> anyhow::Result<Self> {
        let jobs = JobServer::new(ScriptExecutor::default(), config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app: axum::Router = jobs.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(TestServer {
            base,
            jobs,
            http: reqwest::Client::new(),
        })
    }

    pub fn observed(&self) -> &Observed {
        &self.jobs.executor().observed
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn client(&self) -> job_client::JobClient {
        job_client::JobClient::new(&self.base).with_reconnects(0, Duration::ZERO)
    }

    /// Creates a job over HTTP and returns its id.
    pub async fn create(&self, script: &str) -> anyhow::Result<String> {
        self.create_at("/v1/jobs", script).await
    }

    pub async fn create_at(&self, path: &str, script: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(self.url(path))
            .json(&infer(script))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 201,
            "create answered {}",
            response.status()
        );
        let created: rbee_contract::JobCreated = response.json().await?;
        Ok(created.job_id)
    }

    /// The whole stream of a job, read raw.
    pub async fn read_stream(
        &self,
        job_id: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<Vec<SseBlock>> {
        let mut request = self
            .http
            .get(self.url(&format!("/v1/jobs/{job_id}/stream")));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        within(async {
            let response = request.send().await?;
            anyhow::ensure!(
                response.status() == 200,
                "stream answered {}",
                response.status()
            );
            Ok(parse_sse(&response.text().await?))
        })
        .await
    }
}

/// Runs `future`, failing the test when it hangs: a stream that never ends is a bug here.
pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(10), future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out: the stream did not end"),
    }
}

/// One SSE event block as it appeared on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct SseBlock {
    pub id: Option<String>,
    pub data: String,
}

impl SseBlock {
    pub fn event(&self) -> JobEvent {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("`{}` is not a job event: {e}", self.data))
    }
}

pub fn parse_sse(body: &str) -> Vec<SseBlock> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut id = None;
            let mut data: Option<String> = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim_start().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(v.trim_start().to_owned());
                }
            }
            data.map(|data| SseBlock { id, data })
        })
        .collect()
}

/// Checks the protocol's framing: numbered events, exactly one terminal event, which is the
/// last event, then `[DONE]` as the final block. Returns the events.
pub fn assert_well_formed(blocks: &[SseBlock]) -> Vec<JobEvent> {
    let (done, events) = blocks.split_last().expect("an empty stream");
    assert_eq!(
        done.data, "[DONE]",
        "the stream must end with [DONE]: {blocks:?}"
    );
    assert_eq!(done.id, None);
    let events: Vec<JobEvent> = events.iter().map(SseBlock::event).collect();
    let terminals = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "exactly one terminal event: {events:?}");
    assert!(
        events.last().is_some_and(JobEvent::is_terminal),
        "the terminal event comes last: {events:?}"
    );
    for pair in blocks[..blocks.len() - 1].windows(2) {
        let a: u64 = pair[0].id.as_deref().unwrap().parse().unwrap();
        let b: u64 = pair[1].id.as_deref().unwrap().parse().unwrap();
        assert_eq!(b, a + 1, "ids are consecutive: {blocks:?}");
    }
    events
}

pub fn token_indices(events: &[JobEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Token { index, .. } => Some(*index),
            _ => None,
        })
        .collect()
}

pub fn error_code(event: &JobEvent) -> Option<ErrorCode> {
    match event {
        JobEvent::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// Asserts an HTTP answer is an rbee JSON error with this status and code.
pub async fn assert_api_error(
    response: reqwest::Response,
    status: u16,
    code: ErrorCode,
) -> anyhow::Result<String> {
    assert_eq!(response.status().as_u16(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "content type {content_type}"
    );
    let body: rbee_contract::ApiErrorBody = response.json().await?;
    assert_eq!(body.error.code, code, "{body:?}");
    Ok(body.error.message)
}
