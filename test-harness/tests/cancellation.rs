//! Cancellation through every hop, as a user sees it: a client that DELETEs its job, closes
//! its stream, or gives up the moment it created the job, stops the worker's generation, and
//! the worker is free for the next request at once. The cluster is real: a queen, a hive and
//! the worker the hive spawns for a generated model big enough that a long generation takes
//! many seconds.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{ErrorCode, JobCreated, JobEvent};
use serde_json::{Value, json};
use test_harness::{RawStream, TestCluster, read_raw_stream, slow_model};

/// Far more tokens than a generation gets to before the test cancels it; within the model's
/// 2048-token context.
const LONG: u32 = 1800;

/// A cluster whose worker serves [`slow_model`].
struct Cluster(TestCluster);

impl std::ops::Deref for Cluster {
    type Target = TestCluster;
    fn deref(&self) -> &TestCluster {
        &self.0
    }
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster(TestCluster::start(&slow_model(), &[]).await)
    }

    /// Waits until the worker reports every slot free.
    async fn wait_worker_free(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = self.worker_info().await;
            if info.slots_free == info.slots_total {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the worker is still busy; its log:\n{}",
                self.worker_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `completion_tokens` of every generation the worker ended with `finish_reason`.
    fn generations_ended(&self, finish_reason: &str) -> Vec<u32> {
        self.worker_log()
            .lines()
            .filter(|l| {
                l.contains("generation ended")
                    && l.contains(&format!("finish_reason={finish_reason}"))
            })
            .filter_map(|l| {
                let at = l.find("completion_tokens=")? + "completion_tokens=".len();
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// A long generation, streamed until its third token.
    async fn start_long_generation(&self) -> (JobCreated, impl futures::Stream + Unpin) {
        let api = self.jobs();
        let created = api.submit_ok("/v1/jobs", &infer(&self.model, LONG)).await;
        let mut events = api.open_stream(&created).await.bytes_stream();
        let mut received = String::new();
        while received.matches("\"event\":\"token\"").count() < 3 {
            let chunk = events
                .next()
                .await
                .expect("the stream goes on")
                .expect("a chunk");
            received.push_str(std::str::from_utf8(&chunk).unwrap());
            assert!(
                !received.contains("[DONE]"),
                "the generation ended early: {received}"
            );
        }
        assert_eq!(
            self.worker_info().await.slots_free,
            0,
            "the worker is busy while it generates"
        );
        (created, events)
    }

    /// The next request is served at once: the worker does not make it wait, and it completes.
    async fn next_request_is_served_at_once(&self) {
        let next = self.jobs().run("/v1/jobs", &infer(&self.model, 4)).await;
        next.assert_one_terminal_then_done("queen");
        assert!(
            matches!(next.terminal(), Some(JobEvent::Done { .. })),
            "{:?}",
            next.events
        );
        assert!(!next.queued(), "the next request waited: {:?}", next.events);
    }
}

fn infer(model: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0})
}

fn assert_cancelled(stream: &RawStream) {
    stream.assert_one_terminal_then_done("queen");
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            })
        ),
        "{:?}",
        stream.events
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_and_a_closed_stream_stop_the_worker_and_free_it() {
    let cluster = Cluster::start().await;

    // DELETE: the client's stream ends `cancelled`, the worker stops within a token.
    let (created, events) = cluster.start_long_generation().await;
    let response = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/{}", cluster.queen.url, created.job_id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    drop(events);
    let rest = read_raw_stream(cluster.jobs().open_stream(&created).await)
        .await
        .unwrap();
    assert_cancelled(&rest);
    cluster.wait_worker_free("after DELETE").await;
    let stopped = cluster.generations_ended("Cancelled");
    assert_eq!(stopped.len(), 1, "{}", cluster.worker_log());
    assert!(stopped[0] < LONG, "{stopped:?}");
    cluster.next_request_is_served_at_once().await;

    // A client that closes its stream: the same.
    let (_created, events) = cluster.start_long_generation().await;
    drop(events);
    cluster.wait_worker_free("after the stream closed").await;
    let stopped = cluster.generations_ended("Cancelled");
    assert_eq!(stopped.len(), 2, "{}", cluster.worker_log());
    assert!(stopped[1] < LONG, "{stopped:?}");
    cluster.next_request_is_served_at_once().await;

    // The queen's log lines about a job carry the job's id (its span); the hop to the worker
    // names the worker's job too, so one request can be followed through both logs.
    let log = cluster.queen.log_text();
    let span = format!("job{{job_id={}", created.job_id);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&span)).collect();
    for message in ["job started", "inference sent to a worker", "job failed"] {
        assert!(
            lines.iter().any(|l| l.contains(message)),
            "no `{message}` line in the span {span}:\n{log}"
        );
    }
    let sent = lines
        .iter()
        .find(|l| l.contains("inference sent to a worker"))
        .unwrap();
    assert!(sent.contains("upstream_job_id="), "{sent}");
    // The worker's generation, on its own thread, logs inside its job's span too.
    let worker_log = cluster.worker_log();
    let ended: Vec<&str> = worker_log
        .lines()
        .filter(|l| l.contains("generation ended"))
        .collect();
    assert!(!ended.is_empty(), "{worker_log}");
    for line in ended {
        assert!(line.contains("job{job_id="), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_cancelled_the_moment_they_are_created_leave_the_worker_free() {
    let cluster = Cluster::start().await;
    let api = cluster.jobs();
    let http = reqwest::Client::new();
    // The DELETE lands while the queen chooses a worker, while it posts the job to the
    // worker, or once the worker generates: whichever, nothing may keep running.
    for _ in 0..10 {
        let created = api
            .submit_ok("/v1/jobs", &infer(&cluster.model, LONG))
            .await;
        let response = http
            .delete(format!("{}/v1/jobs/{}", cluster.queen.url, created.job_id))
            .send()
            .await
            .unwrap();
        assert!(
            [202, 204].contains(&response.status().as_u16()),
            "{}",
            response.status()
        );
        let stream = read_raw_stream(api.open_stream(&created).await)
            .await
            .unwrap();
        assert_cancelled(&stream);
    }
    cluster.wait_worker_free("after the cancelled jobs").await;
    // Nothing the worker started runs to its full length.
    let finished_long = cluster
        .worker_log()
        .lines()
        .filter(|l| {
            l.contains("generation ended") && l.contains(&format!("completion_tokens={LONG}"))
        })
        .count();
    assert_eq!(finished_long, 0, "{}", cluster.worker_log());
    cluster.next_request_is_served_at_once().await;
}
