//! Shutdown as an operator meets it, with the real binaries: `queen stop` (and the queen's
//! `POST /v1/shutdown`) drains the whole cluster, SIGTERM drains one hive or one worker, and a
//! hive killed with SIGKILL does not leave its workers behind. In every case a stream in flight
//! either completes or ends with an explicit `shutting_down` error, and no worker process is
//! left running.

use std::time::{Duration, Instant};

use rbee_contract::{ErrorCode, FinishReason, JobEvent, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    CLUSTER_TOKEN, Daemon, JobApi, KeeperEnv, RawStream, TestCluster, TestHive, child_pids,
    eventually, free_port, process_gone, read_raw_stream_signalling, slow_model, tiny_model,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TOKEN: &str = CLUSTER_TOKEN;

/// Tokens a generation that must finish during a drain asks for: seconds on the slow model.
const DRAINED_TOKENS: u32 = 300;
/// Tokens a generation that must outlive a short grace period asks for.
const LONG_TOKENS: u32 = 1500;

/// A queen and a hive (real processes on loopback) with a ready worker for the slow model,
/// and the worker's process id.
async fn start_cluster(queen_args: &[&str], hive_args: &[&str]) -> (TestCluster, u32) {
    let cluster = TestCluster::start_with(&slow_model(), queen_args, hive_args).await;
    let pids = child_pids(cluster.hive.pid());
    assert_eq!(pids.len(), 1, "the hive runs one worker process");
    (cluster, pids[0])
}

fn infer(model: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": model, "prompt": "Once upon a time",
           "max_tokens": max_tokens, "temperature": 0})
}

/// Starts an `infer` on `base` (through `create_path`) and returns once its first token has
/// arrived, with the task that reads the rest of the stream.
async fn in_flight(
    api: &JobApi,
    create_path: &str,
    body: &Value,
) -> JoinHandle<anyhow::Result<RawStream>> {
    let created = api.submit_ok(create_path, body).await;
    let response = api.open_stream(&created).await;
    let (first_token, seen) = oneshot::channel();
    let reader = tokio::spawn(read_raw_stream_signalling(response, first_token));
    tokio::time::timeout(Duration::from_secs(60), seen)
        .await
        .expect("a first token within 60 s")
        .expect("the stream ended before its first token");
    reader
}

/// How a stream that was in flight when shutdown began ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// Every token arrived and `done` followed.
    Completed,
    /// The grace period ran out: an explicit `shutting_down` error.
    CutExplicitly,
}

/// The protocol's promise under shutdown: one terminal event and `[DONE]`; either all the
/// tokens asked for and `done`, or an explicit `error` with code `cut` (`shutting_down` from the
/// daemon that cut the job, passed on by the hops above it). Anything else (a silent cut,
/// another error) fails.
fn ending(stream: &RawStream, max_tokens: u32, hop: &str, cut: ErrorCode) -> Ending {
    stream.assert_one_terminal_then_done(hop);
    let tokens = stream
        .events
        .iter()
        .filter(|(_, e)| matches!(e, JobEvent::Token { .. }))
        .count();
    match stream.terminal() {
        Some(JobEvent::Done {
            finish_reason: FinishReason::Length,
            ..
        }) => {
            assert_eq!(tokens, max_tokens as usize, "{hop}: a complete stream");
            Ending::Completed
        }
        // The model may end the text itself before `max_tokens`.
        Some(JobEvent::Done {
            finish_reason: FinishReason::Stop,
            ..
        }) => {
            assert!(tokens <= max_tokens as usize, "{hop}: {tokens} tokens");
            Ending::Completed
        }
        Some(JobEvent::Error { code, message }) if *code == cut => {
            assert!(tokens > 0, "{hop}: the stream was in flight");
            assert!(!message.is_empty());
            Ending::CutExplicitly
        }
        other => panic!("{hop}: unexpected terminal {other:?}"),
    }
}

async fn wait_gone(pid: u32, what: &str, limit: Duration) {
    eventually(&format!("{what} (pid {pid}) gone"), limit, async || {
        process_gone(pid).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn post_shutdown_drains_the_stream_refuses_new_jobs_then_stops_hive_and_worker() {
    let (mut cluster, worker_pid) = start_cluster(&[], &["--stop-grace", "10s"]).await;
    let queen = cluster.jobs();
    let reader = in_flight(&queen, "/v1/jobs", &infer(&cluster.model, DRAINED_TOKENS)).await;

    let answer = reqwest::Client::new()
        .post(format!("{}/v1/shutdown", cluster.queen.url))
        .send()
        .await
        .expect("POST /v1/shutdown");
    assert_eq!(answer.status(), 202);
    let plan: Value = answer.json().await.expect("a JSON body");
    assert_eq!(plan["grace_ms"], 30_000, "{plan}");
    assert_eq!(plan["hives"], 1, "{plan}");

    // While the stream drains, new work is refused.
    let refused = queen.submit("/v1/jobs", &infer(&cluster.model, 4)).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");

    let stream = reader
        .await
        .expect("reader task")
        .expect("a readable stream");
    assert_eq!(
        ending(&stream, DRAINED_TOKENS, "queen", ErrorCode::ShuttingDown),
        Ending::Completed,
        "the generation finished within the grace period"
    );
    assert_eq!(
        cluster
            .queen
            .wait_exit(Duration::from_secs(90))
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        cluster
            .hive
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap(),
        Some(0)
    );
    wait_gone(worker_pid, "the worker", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queen_stop_ends_a_stream_still_running_at_the_deadline_with_shutting_down() {
    let (mut cluster, worker_pid) =
        start_cluster(&["--shutdown-grace", "1s"], &["--stop-grace", "10s"]).await;
    let queen = cluster.jobs();
    let reader = in_flight(&queen, "/v1/jobs", &infer(&cluster.model, LONG_TOKENS)).await;

    let keeper = KeeperEnv::new(&[]);
    let stop = keeper
        .run(
            &["--queen-url", &cluster.queen.url, "queen", "stop"],
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(stop.code, Some(0), "{stop:?}");
    assert!(
        stop.stdout.contains("stopped; it told 1 hive(s) to stop"),
        "{stop:?}"
    );
    assert!(stop.stderr.contains("running jobs"), "{stop:?}");

    let stream = reader
        .await
        .expect("reader task")
        .expect("a readable stream");
    let ending = ending(&stream, LONG_TOKENS, "queen", ErrorCode::ShuttingDown);
    println!("the stream ended as {ending:?}");
    // `queen stop` returns once the queen is gone, and the queen waits for its hives.
    assert_eq!(
        cluster
            .queen
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        cluster
            .hive
            .wait_exit(Duration::from_secs(5))
            .await
            .unwrap(),
        Some(0)
    );
    wait_gone(worker_pid, "the worker", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_hive_lets_its_worker_finish_the_stream_then_stops_it() {
    let (mut cluster, worker_pid) = start_cluster(&[], &["--stop-grace", "20s"]).await;
    let queen = cluster.jobs();
    let reader = in_flight(&queen, "/v1/jobs", &infer(&cluster.model, DRAINED_TOKENS)).await;

    cluster.hive.signal("TERM").expect("SIGTERM the hive");
    let stream = reader
        .await
        .expect("reader task")
        .expect("a readable stream");
    assert_eq!(
        ending(&stream, DRAINED_TOKENS, "queen", ErrorCode::ShuttingDown),
        Ending::Completed,
        "the worker finished its generation before it exited"
    );
    assert_eq!(
        cluster
            .hive
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap(),
        Some(0)
    );
    wait_gone(worker_pid, "the worker", Duration::from_secs(5)).await;
    // The queen is not the hive's to stop.
    assert!(
        reqwest::get(format!("{}/health", cluster.queen.url))
            .await
            .is_ok()
    );
    let log = cluster.worker_log();
    assert!(log.contains("generation ended"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_a_hive_with_a_short_grace_cuts_the_stream_explicitly() {
    let (mut cluster, worker_pid) = start_cluster(&[], &["--stop-grace", "1s"]).await;
    let queen = cluster.jobs();
    let reader = in_flight(&queen, "/v1/jobs", &infer(&cluster.model, LONG_TOKENS)).await;

    cluster.hive.signal("TERM").expect("SIGTERM the hive");
    let stream = reader
        .await
        .expect("reader task")
        .expect("a readable stream");
    let ending = ending(&stream, LONG_TOKENS, "queen", ErrorCode::ShuttingDown);
    println!("the stream ended as {ending:?}");
    assert_eq!(
        cluster
            .hive
            .wait_exit(Duration::from_secs(30))
            .await
            .unwrap(),
        Some(0)
    );
    wait_gone(worker_pid, "the worker", Duration::from_secs(5)).await;
}

fn start_worker(model: &std::path::Path, extra: &[&str]) -> Daemon {
    let port = free_port();
    let mut args: Vec<String> = vec![
        "--model".into(),
        model.display().to_string(),
        "--port".into(),
        port.to_string(),
        "--threads".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start(
        "llm-worker-rbee",
        &args,
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
        format!("http://127.0.0.1:{port}"),
    )
    .expect("start the worker")
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_worker_finishes_the_running_generation_and_refuses_new_ones() {
    let mut worker = start_worker(&slow_model(), &[]);
    worker
        .wait_for("/v1/ready", Some(TOKEN), Duration::from_secs(60))
        .await
        .expect("the worker loads");
    let api = JobApi::new(&worker.url, Some(TOKEN));
    let reader = in_flight(&api, "/v1/inference", &infer("m", DRAINED_TOKENS)).await;

    worker.signal("TERM").expect("SIGTERM the worker");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = api.submit("/v1/inference", &infer("m", 4)).await;
        if response.status() == 503 {
            let body: Value = response.json().await.expect("a JSON error");
            assert_eq!(body["error"]["code"], "shutting_down", "{body}");
            break;
        }
        // Before the signal lands, the request is queued behind the running one; that job
        // then drains too.
        assert!(Instant::now() < deadline, "new work is still accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stream = reader
        .await
        .expect("reader task")
        .expect("a readable stream");
    assert_eq!(
        ending(&stream, DRAINED_TOKENS, "worker", ErrorCode::ShuttingDown),
        Ending::Completed
    );
    assert_eq!(
        worker.wait_exit(Duration::from_secs(60)).await.unwrap(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hive_killed_with_sigkill_does_not_orphan_its_workers() {
    let mut hive = TestHive::start("hive-kill9", TOKEN, &[]).await;
    let spawned = hive
        .run_job(&json!({"operation": "worker_spawn",
                          "model": tiny_model().display().to_string()}))
        .await;
    spawned.assert_one_terminal_then_done("worker_spawn");
    let workers = hive.workers().await;
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].state, WorkerState::Ready);
    let pids = child_pids(hive.daemon.pid());
    assert_eq!(pids.len(), 1, "one worker process");

    hive.daemon.signal("KILL").expect("SIGKILL the hive");
    assert_eq!(
        hive.daemon.wait_exit(Duration::from_secs(5)).await.unwrap(),
        None,
        "killed by a signal"
    );
    wait_gone(pids[0], "the orphaned worker", Duration::from_secs(10)).await;
}
