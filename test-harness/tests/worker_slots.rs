//! `rbee-hive --worker-slots N`: every worker it spawns decodes up to N sequences at once, and
//! says so in its `WorkerInfo` (`slots_total`), on the engine's CPU path (a GGUF with quantized
//! matrices on the CPU) and on candle's path (a safetensors checkpoint here; GPUs) alike. The
//! capacity check counts one KV cache per slot the worker will hold, and a slot count a worker
//! would refuse is refused by the hive at startup. A worker on candle's path started with
//! `--slots 4` serves four concurrent requests, each with the tokens it gets alone.

use std::path::PathBuf;
use std::time::Duration;

use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_contract::{ErrorCode, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use test_harness::{Daemon, JobApi, TestHive, bin_path, free_port, read_raw_stream};

const TOKEN: &str = "slots-test-token";

/// The tiny generated llama model with Q4_0 matrices: on the CPU, the engine's own path.
fn tiny_q4_0() -> PathBuf {
    generated(ModelFormat::Gguf(GgufType::Q4_0))
}

fn generated(format: ModelFormat) -> PathBuf {
    model_gen::ensure_generated(
        &ModelSpec::tiny(),
        format,
        &model_gen::paths::generated_dir(),
    )
    .unwrap_or_else(|e| panic!("generate the tiny model as {format}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_worker_gets_the_hives_slots() {
    // The worker binary the hive runs sits beside it: build the current one.
    bin_path("llm-worker-rbee");
    let hive = TestHive::start("slots-hive", TOKEN, &["--worker-slots", "3"]).await;

    let batched = hive.spawn_worker(&tiny_q4_0()).await;
    assert_eq!(batched.state, WorkerState::Ready, "{batched:?}");
    assert_eq!(batched.slots_total, 3, "{batched:?}");
    assert_eq!(batched.slots_free, 3, "an idle worker: {batched:?}");

    // The hive's own listings say the same, by the route and by the jobs.
    let listed = hive.workers().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].slots_total, 3, "{listed:?}");
    let got = hive
        .run_job(&json!({"operation": "worker_get", "worker_id": batched.worker_id}))
        .await;
    assert_eq!(got.data()["worker"]["slots_total"], json!(3));

    // A safetensors checkpoint runs on candle's path: the same flag, the same slots.
    let candle = hive.spawn_worker(&generated(ModelFormat::Hub)).await;
    assert_eq!(candle.slots_total, 3, "{candle:?}");
    let job = hive.run_job(&json!({"operation": "worker_list"})).await;
    let workers: Vec<WorkerInfo> =
        serde_json::from_value(job.data()["workers"].clone()).expect("a worker list");
    let mut slots: Vec<(String, u32)> = workers
        .iter()
        .map(|w| (w.worker_id.clone(), w.slots_total))
        .collect();
    slots.sort();
    let mut expected = vec![
        (batched.worker_id.clone(), 3),
        (candle.worker_id.clone(), 3),
    ];
    expected.sort();
    assert_eq!(slots, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_capacity_check_counts_a_kv_cache_per_slot() {
    let spec = ModelSpec::tiny();
    let head_dim = (spec.hidden / spec.heads) as u64;
    // Keys and values in f32 over every layer, for the tiny model's whole context.
    let one_sequence =
        2 * spec.layers as u64 * spec.kv_heads as u64 * head_dim * 4 * spec.context_length as u64;
    let full = ["--memory-reserve", "1TiB"];

    let single = TestHive::start("one-slot-hive", TOKEN, &full).await;
    let four = TestHive::start(
        "four-slot-hive",
        TOKEN,
        &["--memory-reserve", "1TiB", "--worker-slots", "4"],
    )
    .await;
    let model = tiny_q4_0();
    let one = single.no_capacity(&model).await.estimate;
    let body = four.no_capacity(&model).await;
    let many = &body.estimate;
    assert_eq!((one.slots, one.kv_cache_bytes), (1, one_sequence));
    assert_eq!((many.slots, many.kv_cache_bytes), (4, 4 * one_sequence));
    // Each worker's prompt cache store (the hive's default) comes on top, once.
    assert_eq!(many.prompt_cache_bytes, 256 << 20);
    assert_eq!(
        many.required_bytes,
        many.weights_bytes + many.kv_cache_bytes + many.prompt_cache_bytes + many.overhead_bytes
    );
    assert_eq!(many.required_bytes - one.required_bytes, 3 * one_sequence);
    assert_eq!(body.error.code, ErrorCode::NoCapacity);
    let message = &body.error.message;
    assert!(
        message.contains(&format!(
            "{} KV cache for 4 sequences of {} positions",
            4 * one_sequence,
            spec.context_length
        )),
        "{message}"
    );

    // A model on candle's path holds a KV cache per slot too, and no prompt cache store.
    let checkpoint = four
        .no_capacity(&generated(ModelFormat::Hub))
        .await
        .estimate;
    assert_eq!(checkpoint.slots, 4, "{checkpoint:?}");
    assert_eq!(checkpoint.prompt_cache_bytes, 0, "{checkpoint:?}");
    assert_eq!(checkpoint.kv_cache_bytes, 4 * one_sequence);
}

/// Runs `rbee-hive` with `args` and `env` and expects it to refuse to start.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let port = free_port().to_string();
    let mut command = tokio::process::Command::new(bin_path("rbee-hive"));
    command
        .args(["--port", &port])
        .args(args)
        .env_remove("RBEE_CLUSTER_TOKEN")
        .env_remove("RBEE_HIVE_WORKER_SLOTS")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("rbee-hive {args:?} {env:?} started instead of refusing"))
        .expect("run rbee-hive");
    assert!(!output.status.success(), "{args:?} {env:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let first = stderr.lines().next().unwrap_or_default().to_owned();
    assert!(
        first.contains("--worker-slots"),
        "{args:?} {env:?}: {stderr}"
    );
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_counts_a_worker_would_refuse_are_refused_at_startup() {
    let zero = refused(&["--worker-slots", "0"], &[]).await;
    assert!(zero.contains("1 to 256"), "{zero}");
    refused(&["--worker-slots", "257"], &[]).await;
    refused(&["--worker-slots", "many"], &[]).await;
    let from_env = refused(&[], &[("RBEE_HIVE_WORKER_SLOTS", "0")]).await;
    assert!(from_env.contains("'0'"), "{from_env}");
}

const WORKER_TOKEN: &str = "slots-worker-token";

fn greedy(prompt: &str, max_tokens: u32) -> Value {
    json!({"operation": "infer", "model": "tiny", "prompt": prompt,
           "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_on_candles_path_serves_four_slots_with_the_tokens_each_gets_alone() {
    let checkpoint = generated(ModelFormat::Hub);
    let worker = Daemon::ready_worker(&checkpoint, WORKER_TOKEN, &["--slots", "4"]).await;
    let info = worker.worker_info(WORKER_TOKEN).await;
    assert_eq!((info.slots_total, info.slots_free), (4, 4), "{info:?}");
    let api = JobApi::new(&worker.url, Some(WORKER_TOKEN));
    let bodies = [
        greedy("Once upon a time", 24),
        greedy("Hello world, this is a test of batching", 20),
        greedy("What", 28),
        greedy("The number 42 is", 16),
    ];

    let mut alone = Vec::new();
    for body in &bodies {
        let stream = api.run("/v1/inference", body).await;
        stream.assert_one_terminal_then_done("worker");
        let ids = stream.token_ids();
        assert!(ids.len() >= 8, "{ids:?}");
        alone.push((ids, stream.text()));
    }

    // All four at once: none waits in line, and each gets what it got alone.
    let created =
        futures::future::join_all(bodies.iter().map(|b| api.submit_ok("/v1/inference", b))).await;
    let streams = futures::future::join_all(created.iter().map(|c| async {
        read_raw_stream(api.open_stream(c).await)
            .await
            .expect("a readable stream")
    }))
    .await;
    for (i, (stream, (ids, text))) in streams.iter().zip(&alone).enumerate() {
        stream.assert_one_terminal_then_done("worker");
        assert!(
            !stream.queued(),
            "request {i} waited in line with a free slot"
        );
        assert_eq!(&stream.token_ids(), ids, "request {i}: tokens");
        assert_eq!(&stream.text(), text, "request {i}: text");
    }
}
