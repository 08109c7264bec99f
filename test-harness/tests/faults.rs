//! Faults with real processes, as a client of the queen sees them: a worker killed with
//! SIGKILL before its first token (the job moves to another worker and the client gets one
//! clean answer) and after it (`worker_lost` within 2 s, and the next request is served), a
//! worker that hangs (SIGSTOP: the queen notices the stalled stream, ends it with
//! `worker_lost` and stops scheduling on the worker until it heartbeats again, while a worker
//! that is only slow to answer is waited for), and a hive killed with SIGKILL (its worker shuts
//! itself down, the queen stops scheduling there within three heartbeat intervals and a
//! request cold-starts on the other hive).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rbee_contract::{ErrorCode, JobCreated, JobEvent, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    CLUSTER_TOKEN, Daemon, JobApi, RawStream, TestCluster, child_pids, eventually, free_port,
    process_gone, read_raw_stream, scratch_dir, send_signal, slow_model, tiny_model,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const TOKEN: &str = CLUSTER_TOKEN;
const PROMPT: &str = "Once upon a time";
/// Tokens of a generation that must still run when the test acts: many seconds on the slow model.
const LONG: u32 = 1500;

fn infer(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": model, "prompt": prompt,
           "max_tokens": max_tokens, "temperature": 0})
}

/// A job's stream read to its end in a task of its own, the moment the first frame holding
/// `marker` arrived sent on `at`, and when the stream ended.
struct Followed {
    at: oneshot::Receiver<Instant>,
    reader: JoinHandle<(RawStream, Instant)>,
}

impl Followed {
    /// Waits for the marker; panics after `limit`.
    async fn reached(&mut self, what: &str, limit: Duration) -> Instant {
        tokio::time::timeout(limit, &mut self.at)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {limit:?}"))
            .unwrap_or_else(|_| panic!("the stream ended before its {what}"))
    }

    /// The whole stream and when it ended; panics after `limit`.
    async fn end(self, limit: Duration) -> (RawStream, Instant) {
        tokio::time::timeout(limit, self.reader)
            .await
            .unwrap_or_else(|_| panic!("the stream did not end within {limit:?}"))
            .expect("the reader task")
    }
}

/// Submits `body` to `api` at `path` and follows the job's stream, watching for `marker`
/// (e.g. `"event":"token"`) in its frames.
async fn follow(api: &JobApi, path: &str, body: &Value, marker: &'static str) -> Followed {
    let created = api.submit_ok(path, body).await;
    let response = api.open_stream(&created).await;
    let (tx, at) = oneshot::channel();
    let reader = tokio::spawn(async move {
        let content_type = response.headers().get("content-type").cloned();
        let mut tx = Some(tx);
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response.chunk().await.expect("a readable stream") {
            body.extend_from_slice(&chunk);
            if tx.is_some()
                && String::from_utf8_lossy(&body).contains(marker)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(Instant::now());
            }
        }
        let ended = Instant::now();
        // Parsed frame by frame as any other test's stream.
        let mut whole = axum::http::Response::builder();
        if let Some(content_type) = content_type {
            whole = whole.header("content-type", content_type);
        }
        let whole = reqwest::Response::from(whole.body(body).expect("a response"));
        let stream = read_raw_stream(whole).await.expect("a job stream");
        (stream, ended)
    });
    Followed { at, reader }
}

fn tokens(stream: &RawStream) -> Vec<u32> {
    stream
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            JobEvent::Token { index, .. } => Some(*index),
            _ => None,
        })
        .collect()
}

fn narrations(stream: &RawStream) -> Vec<String> {
    stream
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            JobEvent::Narration { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn assert_worker_lost(stream: &RawStream) {
    stream.assert_one_terminal_then_done("queen");
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::WorkerLost,
                ..
            })
        ),
        "{:?}",
        stream.events
    );
    assert!(!tokens(stream).is_empty(), "tokens went out first");
}

async fn queen_json(queen: &str, path: &str) -> Value {
    reqwest::get(format!("{queen}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
}

async fn workers(queen: &str) -> Vec<WorkerInfo> {
    serde_json::from_value(queen_json(queen, "/v1/workers").await["workers"].clone())
        .expect("a worker list")
}

/// The one worker process of the cluster's hive.
fn only_worker_pid(cluster: &TestCluster) -> u32 {
    let pids = child_pids(cluster.hive.pid());
    assert_eq!(pids.len(), 1, "the hive runs one worker process");
    pids[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_before_its_first_token_is_replaced_and_the_client_gets_one_answer() {
    let cluster = TestCluster::start(&slow_model(), &[]).await;
    let pid = only_worker_pid(&cluster);
    let request = infer(&cluster.model, PROMPT, 16);
    let undisturbed = cluster.jobs().run("/v1/jobs", &request).await;
    undisturbed.assert_done("the undisturbed answer");

    // A client of the worker itself takes its only slot (the queen does not count it), so
    // the queen's job, admitted by the worker, waits in the worker's own line: it is there
    // and has no token yet when the worker dies.
    let direct = JobApi::new(&cluster.worker.url, Some(TOKEN));
    let mut hog = follow(
        &direct,
        "/v1/inference",
        &infer(&cluster.model, "Count to a thousand:", LONG),
        r#""event":"token""#,
    )
    .await;
    hog.reached("first token of the direct job", Duration::from_secs(60))
        .await;
    let mut job = follow(&cluster.jobs(), "/v1/jobs", &request, r#""event":"queued""#).await;
    job.reached(
        "place in the worker's line for the queen's job",
        Duration::from_secs(30),
    )
    .await;

    send_signal(pid, "KILL");
    let (stream, _) = job.end(Duration::from_secs(180)).await;
    stream.assert_done("the queen's job");
    assert_eq!(
        stream.text(),
        undisturbed.text(),
        "the same answer, once: {:?}",
        stream.events
    );
    let indices = tokens(&stream);
    assert_eq!(
        indices,
        (0..indices.len() as u32).collect::<Vec<_>>(),
        "each token once, in order"
    );
    let said = narrations(&stream);
    assert!(
        said.iter()
            .any(|m| m.contains("went away before the first token")),
        "{said:?}"
    );
    assert!(process_gone(pid));
    // The job went to a worker the hive started in place of the dead one.
    let now = workers(&cluster.queen.url).await;
    assert!(
        now.iter()
            .any(|w| w.worker_id != cluster.worker.worker_id && w.state == WorkerState::Ready),
        "{now:?}"
    );
    hog.reader.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_after_its_first_token_ends_the_stream_with_worker_lost_within_2_s() {
    let cluster = TestCluster::start(&slow_model(), &[]).await;
    let pid = only_worker_pid(&cluster);
    let mut job = follow(
        &cluster.jobs(),
        "/v1/jobs",
        &infer(&cluster.model, PROMPT, LONG),
        r#""event":"token""#,
    )
    .await;
    job.reached("first token", Duration::from_secs(60)).await;
    send_signal(pid, "KILL");
    let killed = Instant::now();
    let (stream, ended) = job.end(Duration::from_secs(30)).await;
    assert_worker_lost(&stream);
    assert!(
        ended - killed < Duration::from_secs(2),
        "the stream ended {:?} after the kill",
        ended - killed
    );

    // The next request is served: the hive starts another worker.
    let next = cluster
        .jobs()
        .run("/v1/jobs", &infer(&cluster.model, PROMPT, 8))
        .await;
    next.assert_done("the next request");
    assert!(!tokens(&next).is_empty());
}

/// A real worker serving `model` as `model_ref`, one slot, registered with `queen`.
fn start_worker(model: &Path, model_ref: &str, queen: &str, id: &str, beat: &str) -> Daemon {
    let args = [
        "--model-ref",
        model_ref,
        "--queen-url",
        queen,
        "--heartbeat-interval",
        beat,
    ];
    Daemon::worker_as(model, id, 1, TOKEN, &args)
}

async fn state_of(queen: &str, worker_id: &str) -> Option<WorkerState> {
    workers(queen)
        .await
        .into_iter()
        .find(|w| w.worker_id == worker_id)
        .map(|w| w.state)
}

/// A job of a client of the worker itself that takes the worker's only slot and keeps it
/// until cancelled, however fast the machine decodes: its stream is never opened, so once its
/// event buffer is full (1,024 events, fewer than [`LONG`] tokens) its generation waits for a
/// reader instead of ending.
struct Hog {
    api: JobApi,
    created: JobCreated,
}

impl Hog {
    async fn take_slot(worker: &Daemon, model: &str) -> Hog {
        let api = JobApi::new(&worker.url, Some(TOKEN));
        let created = api
            .submit_ok("/v1/inference", &infer(model, "Count to a thousand:", LONG))
            .await;
        eventually(
            "a direct job holding the worker's slot",
            Duration::from_secs(60),
            async || (worker.worker_info(TOKEN).await.slots_free == 0).then_some(()),
        )
        .await;
        Hog { api, created }
    }

    /// `DELETE`s the job, expecting it accepted.
    async fn cancel(&self) {
        let mut request = reqwest::Client::new()
            .delete(format!("{}/v1/jobs/{}", self.api.url, self.created.job_id));
        if let Some(token) = &self.api.token {
            request = request.bearer_auth(token);
        }
        let status = request.send().await.expect("DELETE the job").status();
        assert!(status.is_success(), "DELETE the job: {status}");
    }
}

/// Lets a stopped process go on when dropped, whatever the test's outcome.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_worker_is_noticed_and_avoided_while_a_slow_one_is_waited_for() {
    // Heartbeats every 3 s: silence alone makes a worker stale only after 9 s, so a worker
    // listed stale sooner was marked by its stalled stream.
    const BEAT: Duration = Duration::from_secs(3);
    const STALL: Duration = Duration::from_secs(1);
    let queen = Daemon::queen(
        &["--heartbeat-interval", "3s", "--worker-stall-timeout", "1s"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let model = slow_model();
    let ids = ["w-a", "w-b"];
    let daemons: Vec<Daemon> = ids
        .iter()
        .map(|id| start_worker(&model, "slow", &queen.url, id, "3s"))
        .collect();
    eventually("both workers ready", Duration::from_secs(120), async || {
        let ready = workers(&queen.url)
            .await
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count();
        (ready == 2).then_some(())
    })
    .await;
    let api = JobApi::new(&queen.url, None);

    // Slow, not hung: with both slots taken by clients of the workers themselves, the queen's
    // job waits in a worker's own line, silent far longer than the stall timeout.
    let mut hogs = Vec::new();
    for worker in &daemons {
        hogs.push(Hog::take_slot(worker, "slow").await);
    }
    let mut waiting = follow(
        &api,
        "/v1/jobs",
        &infer("slow", PROMPT, 8),
        r#""event":"queued""#,
    )
    .await;
    waiting
        .reached("place in a worker's line", Duration::from_secs(30))
        .await;
    tokio::time::sleep(STALL * 4).await;
    assert!(
        !waiting.reader.is_finished(),
        "a job silent in a worker's line for 4 stall timeouts was cut"
    );
    for id in ids {
        assert_eq!(
            state_of(&queen.url, id).await,
            Some(WorkerState::Ready),
            "a slow worker is not marked"
        );
    }
    // The direct clients' jobs end; the waiting one runs.
    for hog in &hogs {
        hog.cancel().await;
    }
    let (stream, _) = waiting.end(Duration::from_secs(120)).await;
    stream.assert_done("the job that waited");
    assert!(narrations(&stream).is_empty(), "{:?}", stream.events);

    // The cancelled direct jobs are over on both workers.
    for worker in &daemons {
        eventually(
            "the worker's slot free",
            Duration::from_secs(30),
            async || (worker.worker_info(TOKEN).await.slots_free == 1).then_some(()),
        )
        .await;
    }

    // Hung: the worker running the queen's generation is stopped mid-stream.
    let mut job = follow(
        &api,
        "/v1/jobs",
        &infer("slow", PROMPT, LONG),
        r#""event":"token""#,
    )
    .await;
    job.reached("first token", Duration::from_secs(60)).await;
    let mut running = None;
    for (id, worker) in ids.iter().zip(&daemons) {
        if worker.worker_info(TOKEN).await.slots_free == 0 {
            running = Some((*id, worker));
        }
    }
    let (hung_id, hung) = running.expect("a worker runs the generation");
    let other_id = ids.into_iter().find(|id| *id != hung_id).unwrap();
    hung.signal("STOP").expect("SIGSTOP the worker");
    let stopped = Instant::now();
    let _resume = Continue(hung.pid());
    let (stream, ended) = job.end(Duration::from_secs(30)).await;
    assert_worker_lost(&stream);
    assert!(
        ended - stopped < Duration::from_secs(10),
        "the stalled stream ended {:?} after the stop",
        ended - stopped
    );
    // Marked at once, not after three silent heartbeat intervals.
    assert_eq!(
        state_of(&queen.url, hung_id).await,
        Some(WorkerState::Stale)
    );
    assert_eq!(
        state_of(&queen.url, other_id).await,
        Some(WorkerState::Ready)
    );
    assert!(
        stopped.elapsed() < BEAT * 3,
        "too slow to tell the mark from the heartbeats' silence: {:?}",
        stopped.elapsed()
    );

    // The next requests go to the other worker, none through the hung one.
    for _ in 0..2 {
        let next = api.run("/v1/jobs", &infer("slow", PROMPT, 8)).await;
        next.assert_done("a request after the hang");
        assert!(narrations(&next).is_empty(), "{:?}", next.events);
    }

    // Going on, it heartbeats and is scheduled on again.
    hung.signal("CONT").expect("SIGCONT the worker");
    eventually(
        "the worker listed ready again",
        BEAT * 3 + Duration::from_secs(5),
        async || (state_of(&queen.url, hung_id).await == Some(WorkerState::Ready)).then_some(()),
    )
    .await;
}

/// A hive registered with `queen` as `hive_id`, heartbeating every `beat` (e.g. `1s`), its
/// worker logs in `log_dir`, allowed to load the models under `model_dir`.
async fn start_hive(
    queen: &str,
    hive_id: &str,
    beat: &str,
    log_dir: &Path,
    model_dir: &Path,
) -> Daemon {
    let port = free_port();
    let first_worker_port = free_port().min(65_000);
    let args: Vec<String> = [
        ("--port", port.to_string()),
        ("--queen-url", queen.to_string()),
        ("--hive-id", hive_id.to_string()),
        ("--heartbeat-interval", beat.to_string()),
        ("--log-dir", log_dir.display().to_string()),
        (
            "--worker-port-range",
            format!("{first_worker_port}-{}", first_worker_port + 20),
        ),
        // The catalog goes with the logs, never into the user's data directory.
        ("--model-dir", log_dir.join("models").display().to_string()),
        ("--allow-model-dir", model_dir.display().to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    let mut hive = Daemon::start(
        "rbee-hive",
        &args,
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
        format!("http://127.0.0.1:{port}"),
    )
    .expect("start rbee-hive");
    hive.wait_for("/health", None, Duration::from_secs(30))
        .await
        .expect("the hive answers /health");
    hive
}

async fn hive_status(queen: &str, hive_id: &str) -> Option<String> {
    hive_health(queen, hive_id).await.map(|(status, _)| status)
}

/// How the queen lists the hive: its status and how long ago its last heartbeat arrived.
async fn hive_health(queen: &str, hive_id: &str) -> Option<(String, Duration)> {
    let hives = queen_json(queen, "/v1/hives").await;
    let hive = hives["hives"]
        .as_array()?
        .iter()
        .find(|h| h["hive_id"] == hive_id)?;
    Some((
        hive["status"].as_str()?.to_owned(),
        Duration::from_millis(hive["last_seen_ms_ago"].as_u64()?),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hive_killed_with_sigkill_takes_its_worker_and_the_queen_schedules_elsewhere() {
    // The queen and the hives heartbeat every second: long next to the delay of polling the
    // queen on a busy machine, so that "within three intervals" is what is measured.
    const BEAT: Duration = Duration::from_secs(1);
    // Between the moment the queen would list the hive stale and the answer of the poll that
    // sees it: the poll's period and one request to the queen.
    const POLL_SLACK: Duration = Duration::from_millis(750);
    let queen = Daemon::queen(
        &["--heartbeat-interval", "1s"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let api = JobApi::new(&queen.url, None);
    let model = tiny_model();
    let model_name = model.display().to_string();
    // A path names a file on one machine: only a hive that holds it (its model directories
    // include it) is asked to start a worker from it, hive-b once the first hive is gone.
    let model_dir = model.parent().expect("the model's directory").to_path_buf();
    let registered = async |hive_id: &str| {
        eventually(
            &format!("{hive_id} registered"),
            Duration::from_secs(30),
            async || {
                (hive_status(&queen.url, hive_id).await.as_deref() == Some("healthy")).then_some(())
            },
        )
        .await;
    };
    let log_a: PathBuf = scratch_dir("faults-hive-a");
    let hive_a = start_hive(&queen.url, "hive-a", "1s", &log_a, &model_dir).await;
    registered("hive-a").await;
    let first = api.run("/v1/jobs", &infer(&model_name, PROMPT, 2)).await;
    first.assert_done("the cold start on hive-a");
    let pids = child_pids(hive_a.pid());
    assert_eq!(pids.len(), 1, "hive-a runs one worker process");
    let worker_pid = pids[0];
    let old_worker = workers(&queen.url)
        .await
        .into_iter()
        .find(|w| w.hive_id.as_deref() == Some("hive-a") && w.state == WorkerState::Ready)
        .expect("hive-a's worker is listed ready");
    let log_b: PathBuf = scratch_dir("faults-hive-b");
    let _other = start_hive(&queen.url, "hive-b", "1s", &log_b, &model_dir).await;
    registered("hive-b").await;

    let killed = Instant::now();
    hive_a.signal("KILL").expect("SIGKILL the hive");
    // Poll until the queen lists the hive stale, keeping the longest silence it still called
    // healthy.
    let mut healthy_silence = Duration::ZERO;
    let (seen_stale, stale_silence) = loop {
        let (status, silence) = hive_health(&queen.url, "hive-a")
            .await
            .expect("the killed hive is still listed");
        let now = Instant::now();
        match status.as_str() {
            "healthy" => healthy_silence = healthy_silence.max(silence),
            "stale" => break (now - killed, silence),
            other => panic!("hive-a listed {other}"),
        }
        assert!(
            now - killed < BEAT * 3 + Duration::from_secs(10),
            "the killed hive is still listed healthy {:?} after the kill",
            now - killed
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Stale within three heartbeat intervals of the kill (its last heartbeat came at most one
    // interval before), give or take the poll's slack; and not before two silent intervals.
    assert!(
        seen_stale <= BEAT * 3 + POLL_SLACK,
        "listed stale {seen_stale:?} after the kill"
    );
    assert!(
        stale_silence <= BEAT * 3 + POLL_SLACK,
        "listed stale only after {stale_silence:?} without a heartbeat"
    );
    assert!(
        healthy_silence > BEAT * 2,
        "listed stale already after {healthy_silence:?} without a heartbeat (stale at {stale_silence:?})"
    );

    // Its worker is no longer scheduled on, even while it still runs: the request
    // cold-starts on the other hive.
    let next = api.run("/v1/jobs", &infer(&model_name, PROMPT, 4)).await;
    next.assert_done("the request after the kill");
    let said = narrations(&next);
    assert!(
        said.iter().any(|m| m.contains("asking hive hive-b")),
        "the request went to hive-b: {said:?}"
    );
    let listed = workers(&queen.url).await;
    let old = listed.iter().find(|w| w.worker_id == old_worker.worker_id);
    assert!(
        old.is_none_or(|w| w.state != WorkerState::Ready),
        "the dead hive's worker is not listed ready: {listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|w| w.hive_id.as_deref() == Some("hive-b") && w.state == WorkerState::Ready),
        "{listed:?}"
    );

    // The orphaned worker shut itself down.
    eventually(
        "the killed hive's worker gone",
        Duration::from_secs(15),
        async || process_gone(worker_pid).then_some(()),
    )
    .await;
    let _ = std::fs::remove_dir_all(&log_a);
    let _ = std::fs::remove_dir_all(&log_b);
}
