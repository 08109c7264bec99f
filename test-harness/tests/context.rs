//! The context a worker runs its model with, end to end: `llm-worker-rbee --ctx-size` serves an
//! 8,192-token prompt within it, refuses a prompt that does not fit, ends a generation that
//! reaches it with `length`, and reports it in `/v1/info` and its heartbeats; without the flag,
//! the CPU path runs the trained context (more than candle's llama would hold); `rbee-hive
//! --worker-ctx-size` reaches every worker it spawns and its capacity check counts KV caches of
//! that context.

use std::time::{Duration, Instant};

use rbee_contract::{ApiErrorBody, ErrorCode, FinishReason, JobEvent, Usage, WorkerState};
use serde_json::json;
use test_harness::{Daemon, HeartbeatReceiver, JobApi, TestHive, long_context_model};

const TOKEN: &str = "context-test-token";

/// What the long-context model's file says it was trained for.
const TRAINED: u32 = 16384;

/// The tiny model's shape (`ModelSpec::tiny`): keys and values of one position over every
/// layer, in f32.
fn kv_bytes_per_position() -> u64 {
    let spec = model_gen::ModelSpec::tiny();
    let head_dim = (spec.hidden / spec.heads) as u64;
    2 * spec.layers as u64 * spec.kv_heads as u64 * head_dim * 4
}

/// Whether workers started from this environment run GGUFs on the engine's CPU path.
fn cpu_kernels() -> bool {
    !std::env::var("RBEE_CPU_KERNELS").is_ok_and(|v| matches!(v.trim(), "0" | "false" | "off"))
}

/// A prompt of at least `n` tokens: BOS, then one token per `!` (the generated vocabulary has
/// no piece that joins punctuation).
fn prompt_of(n: usize) -> String {
    "!".repeat(n)
}

/// Runs an `infer` to its end; its finish reason and usage, or the stream's events.
async fn infer(worker: &Daemon, prompt: &str, max_tokens: u32) -> (FinishReason, Usage) {
    let stream = JobApi::new(&worker.url, Some(TOKEN))
        .run(
            "/v1/inference",
            &json!({"operation": "infer", "model": "m", "prompt": prompt,
                    "max_tokens": max_tokens, "temperature": 0}),
        )
        .await;
    stream.assert_one_terminal_then_done("worker");
    match stream.terminal() {
        Some(JobEvent::Done {
            finish_reason,
            usage: Some(usage),
        }) => (*finish_reason, *usage),
        other => panic!("{other:?}\nworker log:\n{}", worker.log_text()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_ctx_size_serves_an_8192_token_prompt_and_reports_its_context() {
    const CONTEXT: u32 = 10_000;
    let queen = HeartbeatReceiver::start().await;
    let model = long_context_model();
    let worker = Daemon::ready_worker(
        &model,
        TOKEN,
        &[
            "--ctx-size",
            &CONTEXT.to_string(),
            "--queen-url",
            &queen.url,
            "--heartbeat-interval",
            "100ms",
        ],
    )
    .await;
    assert_eq!(
        worker.worker_info(TOKEN).await.context_length,
        Some(CONTEXT)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let beat = loop {
        let ready = queen
            .received()
            .into_iter()
            .find(|(b, _)| b.worker.state == WorkerState::Ready);
        if let Some((beat, _)) = ready {
            break beat;
        }
        assert!(Instant::now() < deadline, "no ready heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(beat.worker.context_length, Some(CONTEXT));

    // An 8,192-token prompt is served.
    let (finish, usage) = infer(&worker, &prompt_of(8192), 8).await;
    assert!(
        (8192..8200).contains(&usage.prompt_tokens),
        "{usage:?}: the prompt is meant to be 8,192 tokens and a BOS"
    );
    assert!(usage.completion_tokens >= 1, "{usage:?}");
    assert!(matches!(finish, FinishReason::Length | FinishReason::Stop));

    // A generation that reaches the context ends there with `length`, though it asked for more
    // (or earlier, at an end-of-sequence token the random model may pick).
    let (finish, usage) = infer(&worker, &prompt_of(CONTEXT as usize - 12), 100).await;
    assert!(usage.total_tokens <= CONTEXT, "{usage:?}");
    match finish {
        FinishReason::Length => assert_eq!(usage.total_tokens, CONTEXT, "{usage:?}"),
        FinishReason::Stop => assert!(usage.completion_tokens < 100, "{usage:?}"),
        other => panic!("{other:?}"),
    }

    // A prompt that fills the context is refused before any job exists.
    let response = JobApi::new(&worker.url, Some(TOKEN))
        .submit(
            "/v1/inference",
            &json!({"operation": "infer", "model": "m", "prompt": prompt_of(CONTEXT as usize),
                    "max_tokens": 4}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let body: ApiErrorBody = response.json().await.expect("an error body");
    assert_eq!(body.error.code, ErrorCode::ContextLengthExceeded);
    assert!(
        body.error.message.contains(&CONTEXT.to_string()),
        "{}",
        body.error.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_ctx_size_a_worker_runs_the_trained_context() {
    let worker = Daemon::ready_worker(&long_context_model(), TOKEN, &[]).await;
    // On candle's path (RBEE_CPU_KERNELS=0), llama files hold 4,096 positions.
    let expected = if cpu_kernels() { TRAINED } else { 4096 };
    assert_eq!(
        worker.worker_info(TOKEN).await.context_length,
        Some(expected)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hives_worker_ctx_size_reaches_its_workers_and_its_capacity_check() {
    const CONTEXT: u32 = 6000;
    let model = long_context_model();
    // Either path holds a KV cache per slot.
    let slots: u64 = 2;

    // A reserve larger than any machine leaves no room, so the hive answers with its numbers.
    let full = ["--memory-reserve", "1TiB", "--worker-slots", "2"];
    let trained = TestHive::start("ctx-trained-hive", TOKEN, &full).await;
    let e = trained.no_capacity(&model).await.estimate;
    let default_context = if cpu_kernels() { TRAINED } else { 4096 };
    assert_eq!(e.context_length, u64::from(default_context));
    assert_eq!(u64::from(e.slots), slots);
    assert_eq!(
        e.kv_cache_bytes,
        slots * kv_bytes_per_position() * u64::from(default_context)
    );
    drop(trained);

    let ctx = CONTEXT.to_string();
    let sized = TestHive::start(
        "ctx-sized-hive",
        TOKEN,
        &[&full[..], &["--worker-ctx-size", &ctx]].concat(),
    )
    .await;
    let e = sized.no_capacity(&model).await.estimate;
    assert_eq!(e.context_length, u64::from(CONTEXT));
    assert_eq!(
        e.kv_cache_bytes,
        slots * kv_bytes_per_position() * u64::from(CONTEXT),
        "a KV cache of the hive's context per slot"
    );
    assert_eq!(
        e.required_bytes,
        e.weights_bytes + e.kv_cache_bytes + e.prompt_cache_bytes + e.overhead_bytes
    );
    drop(sized);

    // A hive with room passes its context to the worker it spawns.
    let hive = TestHive::start("ctx-hive", TOKEN, &["--worker-ctx-size", &ctx]).await;
    let worker = hive.spawn_worker(&model).await;
    assert_eq!(worker.context_length, Some(CONTEXT), "{worker:?}");
    hive.wait_until(Duration::from_secs(10), "a ready worker heartbeat", || {
        hive.queen
            .worker_beats()
            .iter()
            .any(|b| b.worker.state == WorkerState::Ready && b.worker.context_length.is_some())
    })
    .await;
    let beats = hive.queen.worker_beats();
    let beat = beats
        .iter()
        .find(|b| b.worker.state == WorkerState::Ready && b.worker.context_length.is_some())
        .expect("a ready heartbeat");
    assert_eq!(beat.worker.context_length, Some(CONTEXT));
}
