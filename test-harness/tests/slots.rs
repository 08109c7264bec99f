//! `llm-worker-rbee --slots N` as a process: several streams generate side by side with the
//! text each gets alone, the worker reports its slots, a request beyond them waits in line,
//! and a stream cancelled mid-batch leaves the others running.

use std::time::Duration;

use futures::StreamExt;
use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_contract::JobEvent;
use serde_json::{Value, json};
use test_harness::{Daemon, JobApi, eventually, read_raw_stream, slow_model, smollm2};

const TOKEN: &str = "test-cluster-token";

fn jobs(worker: &Daemon) -> JobApi {
    JobApi::new(&worker.url, Some(TOKEN))
}

fn greedy(prompt: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": "smollm2", "prompt": prompt,
           "max_tokens": max_tokens, "temperature": 0})
}

const PROMPTS: [&str; 2] = [
    "The capital of France is",
    "List three colours of the rainbow:",
];

#[tokio::test(flavor = "multi_thread")]
async fn two_slots_generate_side_by_side_with_the_text_each_gets_alone() {
    let worker = Daemon::ready_worker(&smollm2(), TOKEN, &["--slots", "2"]).await;
    let api = jobs(&worker);
    let before = worker.worker_info(TOKEN).await;
    assert_eq!((before.slots_total, before.slots_free), (2, 2));

    let mut alone = Vec::new();
    for prompt in PROMPTS {
        let stream = api.run("/v1/inference", &greedy(prompt, 24)).await;
        stream.assert_one_terminal_then_done("worker");
        alone.push(stream.text());
    }

    // Both start at once: neither waits in line. A third, beyond the two slots, does.
    let bodies = PROMPTS.map(|p| greedy(p, 24));
    let created: Vec<_> =
        futures::future::join_all(bodies.iter().map(|b| api.submit_ok("/v1/inference", b))).await;
    let third = api
        .submit_ok("/v1/inference", &greedy("Once upon a time", 8))
        .await;
    let streams = futures::future::join_all(created.iter().chain([&third]).map(|c| async {
        read_raw_stream(api.open_stream(c).await)
            .await
            .expect("a readable stream")
    }))
    .await;
    for (i, stream) in streams.iter().enumerate() {
        stream.assert_one_terminal_then_done("worker");
        let queued = stream
            .events
            .iter()
            .find(|(_, e)| matches!(e, JobEvent::Queued { .. }));
        if i < 2 {
            assert!(queued.is_none(), "request {i} waited: {queued:?}");
            assert_eq!(stream.text(), alone[i], "request {i}'s text, batched");
        } else {
            assert!(
                matches!(queued, Some((_, JobEvent::Queued { position: 1 }))),
                "the third request waits first in line: {:?}",
                stream.events
            );
        }
    }
    let log = worker.log_text();
    assert!(log.contains("slots=2"), "the worker logs its slots:\n{log}");
    eventually(
        "both slots free again",
        Duration::from_secs(10),
        async || (worker.worker_info(TOKEN).await.slots_free == 2).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cancelled_mid_batch_leaves_the_other_generating() {
    let worker = Daemon::ready_worker(&smollm2(), TOKEN, &["--slots", "2"]).await;
    let api = jobs(&worker);
    let long = |prompt: &str| greedy(prompt, 400);
    let keep = api
        .submit_ok(
            "/v1/inference",
            &long("Count from one to one thousand: one, two,"),
        )
        .await;
    let cut = api
        .submit_ok(
            "/v1/inference",
            &long("Count down from one thousand: one thousand, nine hundred and ninety-nine,"),
        )
        .await;
    let client = job_client::JobClient::new(&worker.url).with_token(TOKEN);
    let mut kept = Box::pin(client.handle(keep.clone()).events());
    let mut cut_events = Box::pin(client.handle(cut.clone()).events());
    for events in [&mut kept, &mut cut_events] {
        let mut tokens = 0;
        while tokens < 2 {
            match events.next().await {
                Some(Ok(JobEvent::Token { .. })) => tokens += 1,
                Some(Ok(e)) if e.is_terminal() => panic!("a stream ended at once: {e:?}"),
                Some(Ok(_)) => {}
                other => panic!("a stream broke: {other:?}"),
            }
        }
    }
    assert_eq!(
        worker.worker_info(TOKEN).await.slots_free,
        0,
        "both slots generating"
    );

    let deleted = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/{}", worker.url, cut.job_id))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    eventually(
        "the cancelled generation's slot comes free",
        Duration::from_secs(10),
        async || (worker.worker_info(TOKEN).await.slots_free == 1).then_some(()),
    )
    .await;
    // The other stream keeps receiving tokens after the cancel.
    let mut more = 0;
    while more < 5 {
        match kept.next().await.unwrap().unwrap() {
            JobEvent::Token { .. } => more += 1,
            other => panic!("the kept stream ended early: {other:?}"),
        }
    }
    assert_eq!(
        worker.worker_info(TOKEN).await.slots_free,
        1,
        "still one generating"
    );
}

/// A file the engine's CPU path does not take runs on candle's path, which holds a KV cache per
/// slot as well.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_on_candles_path_reports_its_slots() {
    let model = model_gen::ensure_generated(
        // A head size the engine's path has no attention for.
        &ModelSpec::small_wide_head(),
        ModelFormat::Gguf(GgufType::Q8_0),
        &model_gen::paths::generated_dir(),
    )
    .expect("generate a model with a wide head");
    let worker = Daemon::ready_worker(&model, TOKEN, &["--slots", "4"]).await;
    let info = worker.worker_info(TOKEN).await;
    assert_eq!((info.slots_total, info.slots_free), (4, 4));
}

#[tokio::test]
async fn zero_slots_is_refused_with_a_clear_message() {
    let output = std::process::Command::new(test_harness::bin_path("llm-worker-rbee"))
        .args(["--model", "/nonexistent.gguf", "--slots", "0"])
        .output()
        .expect("run llm-worker-rbee");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--slots"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queen_fills_a_workers_slots_before_it_queues() {
    let cluster =
        test_harness::TestCluster::start_with(&slow_model(), &[], &["--worker-slots", "2"]).await;
    assert_eq!(cluster.worker.slots_total, 2);
    let api = cluster.jobs();
    let body = json!({"operation": "infer", "model": cluster.model, "prompt": "one two three",
                      "max_tokens": 120, "temperature": 0});
    let created = futures::future::join_all((0..3).map(|_| api.submit_ok("/v1/jobs", &body))).await;
    let streams = futures::future::join_all(created.iter().map(|c| async {
        read_raw_stream(api.open_stream(c).await)
            .await
            .expect("a readable stream")
    }))
    .await;
    let mut waited = 0;
    for stream in &streams {
        stream.assert_one_terminal_then_done("queen");
        assert!(
            matches!(stream.terminal(), Some(JobEvent::Done { .. })),
            "{:?}",
            stream.terminal()
        );
        if stream.queued() {
            waited += 1;
        }
    }
    assert_eq!(waited, 1, "two jobs take the two slots, the third waits");
    let workers = cluster.queen_json("/v1/workers").await;
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(1),
        "one worker served all three: {workers}"
    );
}
