//! The keeper's commands against a scripted queen (the real job protocol from `job-server`,
//! scripted operations): what lands on stdout and stderr, the errors, and Ctrl-C.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::get;
use clap::Parser;
use job_server::{ApiError, JobContext, JobExecutor, JobFailure, JobOutcome, JobResult, JobServer};
use keeper::{Cli, Console, KeeperError, Outcome, Settings};
use rbee_contract::{ErrorCode, FinishReason, JobEvent, Operation, Usage, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn worker_info() -> WorkerInfo {
    WorkerInfo {
        worker_id: "h1-w1".into(),
        url: "http://127.0.0.1:9301".into(),
        model: "/models/m.gguf".into(),
        device: "cpu".into(),
        state: WorkerState::Ready,
        slots_total: 1,
        slots_free: 1,
        hive_id: Some("h1".into()),
        context_length: Some(2048),
    }
}

/// Scripted by the request: model `fail` fails to load, `slow` streams until cancelled,
/// anything else says " Paris." after some progress.
#[derive(Clone, Default)]
struct Script {
    slow_job_dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn cancelled() -> JobFailure {
    JobFailure::new(ErrorCode::Cancelled, "cancelled")
}

impl JobExecutor for Script {
    type Job = Operation;

    fn admit(&self, operation: Operation) -> Result<Operation, ApiError> {
        match &operation {
            Operation::Infer(_) | Operation::WorkerSpawn(_) | Operation::WorkerDelete(_) => {
                Ok(operation)
            }
            other => Err(ApiError::unsupported_operation(other.name())),
        }
    }

    async fn run(&self, job: Operation, ctx: JobContext) -> JobResult {
        match job {
            Operation::Infer(request) => match request.model.as_str() {
                "fail" => Err(JobFailure::new(
                    ErrorCode::ModelLoadFailed,
                    "worker h1-w1 exited while loading: not a GGUF file\nlast log line",
                )),
                // An instruct model given a bare question often ends at once.
                "silent" => {
                    ctx.emit(JobEvent::Started { prompt_tokens: 7 })
                        .await
                        .map_err(|_| cancelled())?;
                    Ok(JobOutcome::new(FinishReason::Stop, Some(Usage::new(7, 1))))
                }
                "slow" => {
                    let _dropped = SetOnDrop(Arc::clone(&self.slow_job_dropped));
                    for index in 0.. {
                        ctx.emit(JobEvent::Token {
                            text: format!(" {index}"),
                            token_id: index,
                            index,
                            logprobs: None,
                        })
                        .await
                        .map_err(|_| cancelled())?;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(JobOutcome::complete())
                }
                model => {
                    let events = [
                        JobEvent::Spawning {
                            worker_id: "h1-w1".into(),
                            hive_id: Some("h1".into()),
                        },
                        JobEvent::Loading {
                            model: model.into(),
                            fraction: 0.5,
                            message: None,
                        },
                        JobEvent::Started { prompt_tokens: 6 },
                        JobEvent::Token {
                            text: " Paris".into(),
                            token_id: 7042,
                            index: 0,
                            logprobs: None,
                        },
                        JobEvent::Token {
                            text: ".".into(),
                            token_id: 30,
                            index: 1,
                            logprobs: None,
                        },
                    ];
                    for event in events {
                        ctx.emit(event).await.map_err(|_| cancelled())?;
                    }
                    Ok(JobOutcome::new(
                        FinishReason::Length,
                        Some(Usage::new(6, 2)),
                    ))
                }
            },
            Operation::WorkerSpawn(_) => {
                ctx.emit(JobEvent::Spawning {
                    worker_id: "h1-w1".into(),
                    hive_id: Some("h1".into()),
                })
                .await
                .map_err(|_| cancelled())?;
                ctx.emit(JobEvent::Data {
                    data: json!({ "worker": worker_info() }),
                })
                .await
                .map_err(|_| cancelled())?;
                Ok(JobOutcome::complete())
            }
            Operation::WorkerDelete(target) if target.worker_id == "h1-w1" => {
                Ok(JobOutcome::complete())
            }
            Operation::WorkerDelete(target) => Err(JobFailure::new(
                ErrorCode::NotFound,
                format!("no worker {}", target.worker_id),
            )),
            _ => Err(JobFailure::internal("not scripted")),
        }
    }
}

struct FakeQueen {
    url: String,
    script: Script,
    home: tempfile::TempDir,
}

async fn fake_queen() -> FakeQueen {
    let script = Script::default();
    let jobs = JobServer::new(script.clone(), job_server::JobServerConfig::default());
    let app = jobs
        .router()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/v1/workers",
            get(|| async { Json(json!({ "workers": [worker_info()] })) }),
        )
        .route(
            "/v1/hives",
            get(|| async {
                Json(json!({"hives": [{
                    "hive_id": "h1", "url": "http://127.0.0.1:7835", "devices": [],
                    "workers": [worker_info()], "models": [],
                    "status": "healthy", "last_seen_ms_ago": 120
                }]}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    FakeQueen {
        url,
        script,
        home: tempfile::tempdir().unwrap(),
    }
}

fn settings(queen_url: &str, home: &Path) -> Settings {
    let home = home.to_str().unwrap().to_owned();
    Settings::load(Some(queen_url), move |key| {
        (key == "HOME").then(|| home.clone())
    })
    .unwrap()
}

struct Run {
    result: Result<Outcome, KeeperError>,
    out: String,
    err: String,
}

async fn keeper(queen_url: &str, home: &Path, args: &[&str]) -> Run {
    keeper_interruptible(queen_url, home, args, CancellationToken::new(), None).await
}

async fn keeper_interruptible(
    queen_url: &str,
    home: &Path,
    args: &[&str],
    interrupt: CancellationToken,
    captured_out: Option<Captured>,
) -> Run {
    let cli =
        Cli::try_parse_from(std::iter::once("rbee-keeper").chain(args.iter().copied())).unwrap();
    let out = captured_out.unwrap_or_default();
    let err = Captured::default();
    let mut console = Console::new(
        cli.json,
        false,
        Box::new(out.clone()),
        Box::new(err.clone()),
    );
    let result = keeper::run_with(
        settings(queen_url, home),
        cli.command,
        &mut console,
        interrupt,
    )
    .await;
    if let Err(e) = &result {
        console.error(e);
    }
    Run {
        result,
        out: out.text(),
        err: err.text(),
    }
}

#[tokio::test]
async fn infer_streams_tokens_to_stdout_and_progress_to_stderr() {
    let queen = fake_queen().await;
    let run = keeper(
        &queen.url,
        queen.home.path(),
        &["infer", "-m", "hf:o/r", "Hi"],
    )
    .await;
    assert_eq!(run.result.unwrap(), Outcome::Done);
    assert_eq!(run.out, " Paris.\n");
    assert!(
        run.err.contains("spawning worker h1-w1 on hive h1"),
        "{}",
        run.err
    );
    assert!(run.err.contains("loading hf:o/r: 50%"), "{}", run.err);
}

#[tokio::test]
async fn an_answer_without_text_is_said_on_stderr() {
    let queen = fake_queen().await;
    let raw = keeper(
        &queen.url,
        queen.home.path(),
        &["infer", "-m", "silent", "Hi?"],
    )
    .await;
    assert_eq!(raw.result.unwrap(), Outcome::Done);
    assert_eq!(raw.out, "");
    assert!(
        raw.err
            .contains("the model ended its answer at once, without text; an instruct model may answer with --chat"),
        "{}",
        raw.err
    );
    let chat = keeper(
        &queen.url,
        queen.home.path(),
        &["infer", "--chat", "-m", "silent", "Hi?"],
    )
    .await;
    assert!(chat.err.contains("without text\n"), "{}", chat.err);
}

#[tokio::test]
async fn infer_json_prints_every_event_as_a_line() {
    let queen = fake_queen().await;
    let run = keeper(
        &queen.url,
        queen.home.path(),
        &["infer", "--json", "-m", "m", "Hi"],
    )
    .await;
    assert_eq!(run.result.unwrap(), Outcome::Done);
    let events: Vec<JobEvent> = run
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 6, "{}", run.out);
    assert!(matches!(events.last(), Some(JobEvent::Done { .. })));
    assert!(run.err.is_empty(), "{}", run.err);
}

#[tokio::test]
async fn a_job_error_is_one_clear_line_and_exit_1() {
    let queen = fake_queen().await;
    let run = keeper(
        &queen.url,
        queen.home.path(),
        &["infer", "-m", "fail", "Hi"],
    )
    .await;
    let err = run.result.unwrap_err();
    assert_eq!(err.exit_code(), 1);
    let first = run.err.lines().next().unwrap();
    assert_eq!(
        first,
        "rbee-keeper: worker h1-w1 exited while loading: not a GGUF file (model_load_failed)"
    );
    assert!(run.out.is_empty());
}

#[tokio::test]
async fn ctrl_c_cancels_the_job_on_the_queen_and_exits_130() {
    let queen = fake_queen().await;
    let interrupt = CancellationToken::new();
    let out = Captured::default();
    let run = tokio::spawn({
        let (url, home, interrupt, out) = (
            queen.url.clone(),
            queen.home.path().to_owned(),
            interrupt.clone(),
            out.clone(),
        );
        async move {
            keeper_interruptible(
                &url,
                &home,
                &["infer", "-m", "slow", "Hi"],
                interrupt,
                Some(out),
            )
            .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.text().split_whitespace().count() < 5 {
        assert!(Instant::now() < deadline, "no tokens arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    interrupt.cancel();
    let run = run.await.unwrap();
    let err = run.result.unwrap_err();
    assert!(matches!(err, KeeperError::Interrupted));
    assert_eq!(err.exit_code(), 130);
    assert!(
        run.out.ends_with('\n'),
        "stdout ends its line: {:?}",
        run.out
    );
    assert_eq!(run.err, "rbee-keeper: interrupted\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !queen.script.slow_job_dropped.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the queen's job was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn worker_commands_with_json() {
    let queen = fake_queen().await;
    let home = queen.home.path();
    let model = home.join("m.gguf");
    std::fs::write(&model, b"weights").unwrap();

    let run = keeper(
        &queen.url,
        home,
        &["worker", "spawn", "--json", "-m", model.to_str().unwrap()],
    )
    .await;
    assert_eq!(run.result.unwrap(), Outcome::Done);
    let spawned: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(spawned["worker"]["worker_id"], "h1-w1");
    assert!(run.err.contains("spawning worker h1-w1"), "{}", run.err);

    let run = keeper(&queen.url, home, &["worker", "list", "--json"]).await;
    let listed: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(listed["workers"][0]["worker_id"], "h1-w1");

    let run = keeper(
        &queen.url,
        home,
        &["worker", "list", "--hive", "other", "--json"],
    )
    .await;
    let listed: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(listed["workers"], json!([]));

    let run = keeper(&queen.url, home, &["worker", "list"]).await;
    assert!(run.out.starts_with("WORKER"), "{}", run.out);
    let row: Vec<&str> = run.out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["h1-w1", "h1", "ready", "1/1"], "{}", run.out);

    let run = keeper(&queen.url, home, &["worker", "stop", "h1-w1", "--json"]).await;
    assert_eq!(run.result.unwrap(), Outcome::Done);
    let stopped: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(stopped, json!({"worker_id": "h1-w1", "stopped": true}));

    let run = keeper(&queen.url, home, &["worker", "stop", "nope"]).await;
    assert_eq!(run.result.unwrap_err().exit_code(), 1);
    assert_eq!(run.err, "rbee-keeper: no worker nope (not_found)\n");
}

#[tokio::test]
async fn hive_list_and_queen_status() {
    let queen = fake_queen().await;
    let home = queen.home.path();
    let run = keeper(&queen.url, home, &["hive", "list"]).await;
    assert!(
        run.out.contains("h1    healthy, seen 0.1s ago"),
        "{}",
        run.out
    );
    let run = keeper(&queen.url, home, &["hive", "list", "--json"]).await;
    let listed: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(listed["hives"][0]["status"], "healthy");

    let run = keeper(&queen.url, home, &["queen", "status", "--json"]).await;
    assert_eq!(run.result.unwrap(), Outcome::Done);
    let status: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(status["running"], true);
    assert_eq!(status["hives"], 1);
    assert_eq!(status["workers"], 1);
}

#[tokio::test]
async fn nothing_answers() {
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    // A queen elsewhere is not started, just reported.
    let remote = format!("http://127.0.0.2:{port}");
    let run = keeper(&remote, home.path(), &["infer", "-m", "hf:o/r", "Hi"]).await;
    assert_eq!(run.result.unwrap_err().exit_code(), 1);
    assert!(
        run.err
            .starts_with(&format!("rbee-keeper: no queen answers at {remote}")),
        "{}",
        run.err
    );
    assert_eq!(run.err.lines().count(), 1, "{}", run.err);

    // A missing model path is caught before anything starts.
    let local = format!("http://127.0.0.1:{port}");
    let run = keeper(
        &local,
        home.path(),
        &["infer", "-m", "/no/such/model.gguf", "Hi"],
    )
    .await;
    let err = run.result.unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert_eq!(
        run.err,
        "rbee-keeper: model path /no/such/model.gguf does not exist\n"
    );
    assert!(!home.path().join(".local/state/rbee/queen.pid").exists());

    // Status of a queen that is not there: exit 3, not an error.
    let run = keeper(&local, home.path(), &["queen", "status"]).await;
    assert_eq!(run.result.unwrap(), Outcome::NotRunning);
    assert!(run.out.starts_with("no queen is running at"), "{}", run.out);

    // Stopping what does not run is not an error either.
    let run = keeper(&local, home.path(), &["queen", "stop", "--json"]).await;
    assert_eq!(run.result.unwrap(), Outcome::Done);
    let stopped: Value = serde_json::from_str(run.out.trim()).unwrap();
    assert_eq!(stopped["stopped"], false);
}
