//! `cargo xtask bench soak`: whether the daemons' memory stays flat under a long run of jobs.
//!
//! A release-built queen and one release-built worker on the smallest generated model, which
//! registers with the queen by heartbeat. Many short jobs go through the queen's job API at a
//! fixed concurrency; every so many finished requests the resident set size (`VmRSS` of
//! `/proc/<pid>/status`) of each daemon is sampled. The queen retains finished jobs (up to its
//! job limit, for five minutes) and so does the worker, so memory is expected to rise while
//! those registries fill and then stay level: growth after the warm-up is what the table shows.
//!
//! Figures are printed, never asserted: they depend on the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};
use rbee_contract::{InferRequest, JobEvent, Operation};

use crate::bench::WorkerProcess;
use crate::bench_queen::{
    API_KEY, CLUSTER_TOKEN, free_port, release_binaries, wait_answering, wait_registered,
};

const MODEL: &str = "bench-soak";
const PROMPT: &str = "The quick brown fox";

#[derive(Debug, clap::Args)]
pub struct SoakBench {
    /// Jobs sent through the queen in all.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Jobs in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests between two samples of each daemon's memory.
    #[arg(long, default_value_t = 250)]
    sample_every: usize,
    /// Requests after which the daemons count as warmed up: the baseline of the growth. The
    /// default is past the 4,096 finished jobs the queen and the worker each retain (for five
    /// minutes): until their registries are full, memory rises by design.
    #[arg(long, default_value_t = 4500)]
    warm_up: usize,
    /// Tokens each job asks for.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Model preset of the worker.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// GGUF type of the model.
    #[arg(long, default_value = "q4_0")]
    format: GgufType,
    /// Slots of the worker (sequences decoded at once).
    #[arg(long, default_value_t = 8)]
    slots: u32,
    /// Threads of the worker.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A queen binary to measure instead of the workspace's release build.
    #[arg(long)]
    queen: Option<PathBuf>,
    /// A worker binary to measure instead of the workspace's release build.
    #[arg(long)]
    worker: Option<PathBuf>,
}

pub fn run(args: &SoakBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(args.sample_every > 0, "--sample-every must be at least 1");
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    let spec = ModelSpec::preset(&args.preset, Arch::Llama)?;
    let (queen, worker) = release_binaries(&args.queen, &args.worker)?;
    eprintln!("preparing the {} llama {} model…", args.preset, args.format);
    let model = model_gen::ensure_generated(
        &spec,
        ModelFormat::Gguf(args.format),
        &model_gen::paths::generated_dir(),
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(soak(args, &queen, &worker, &model))
}

/// Each daemon's resident set after `done` requests, in KiB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    done: usize,
    queen_kib: u64,
    worker_kib: u64,
}

async fn soak(
    args: &SoakBench,
    queen_bin: &Path,
    worker_bin: &Path,
    model: &Path,
) -> anyhow::Result<()> {
    let queen_port = free_port()?;
    let queen_url = format!("http://127.0.0.1:{queen_port}");
    let mut queen = WorkerProcess(
        Command::new(queen_bin)
            .args(["--port", &queen_port.to_string()])
            .args(["--heartbeat-interval", "1s"])
            .env("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)
            .env("RBEE_API_KEYS", API_KEY)
            .env_remove("RBEE_ADMIN_KEYS")
            .env_remove("RBEE_QUEEN_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the queen")?,
    );
    wait_answering("the queen", &format!("{queen_url}/health"), &mut queen).await?;

    let worker_port = free_port()?;
    let worker_url = format!("http://127.0.0.1:{worker_port}");
    let mut worker = WorkerProcess(
        Command::new(worker_bin)
            .args(["--model", &model.display().to_string()])
            .args(["--model-ref", MODEL, "--worker-id", MODEL])
            .args(["--port", &worker_port.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .args(["--slots", &args.slots.to_string()])
            .args(["--queen-url", &queen_url, "--heartbeat-interval", "1s"])
            .env("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the worker")?,
    );
    wait_answering("the worker", &format!("{worker_url}/v1/ready"), &mut worker).await?;
    wait_registered(&queen_url, &[MODEL]).await?;

    let pids = (queen.0.id(), worker.0.id());
    let client = job_client::JobClient::new(&queen_url).with_token(API_KEY);
    let operation = Operation::Infer(InferRequest {
        model: MODEL.into(),
        prompt: Some(PROMPT.into()),
        max_tokens: Some(args.max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    });
    let mut samples = vec![sample(0, pids)?];

    eprintln!(
        "{} jobs through the queen at concurrency {}…",
        args.requests, args.concurrency
    );
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let taken = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.requests) {
        let (client, operation) = (client.clone(), operation.clone());
        let (next, done, failures, taken) = (
            Arc::clone(&next),
            Arc::clone(&done),
            Arc::clone(&failures),
            Arc::clone(&taken),
        );
        let (requests, every) = (args.requests, args.sample_every);
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                match client.run_to_end(&operation, |_| {}).await {
                    Ok(JobEvent::Done { .. }) => {}
                    Ok(JobEvent::Error { code, message }) => {
                        lock(&failures).push(format!("{code}: {message}"));
                    }
                    Ok(other) => lock(&failures).push(format!("ended with {other:?}")),
                    Err(err) => lock(&failures).push(err.to_string()),
                }
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if finished % every == 0 || finished == requests {
                    match sample(finished, pids) {
                        Ok(s) => lock(&taken).push(s),
                        Err(err) => lock(&failures).push(format!("sampling: {err:#}")),
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    if let Some(status) = queen.0.try_wait()? {
        bail!("the queen exited during the run: {status}");
    }
    if let Some(status) = worker.0.try_wait()? {
        bail!("the worker exited during the run: {status}");
    }
    samples.extend(lock(&taken).iter().copied());
    samples.sort_by_key(|s| s.done);
    let failures = lock(&failures).clone();

    println!();
    println!(
        "soak benchmark: release build, a queen and one worker ({} llama {}, {} slots, {} threads) on this machine",
        args.preset, args.format, args.slots, args.threads
    );
    println!(
        "{} jobs through the queen's job API at concurrency {} (prompt {PROMPT:?}, max_tokens {}, greedy) in {:.1} s ({:.0} jobs/s); {} failed",
        args.requests,
        args.concurrency,
        args.max_tokens,
        elapsed.as_secs_f64(),
        args.requests as f64 / elapsed.as_secs_f64(),
        failures.len()
    );
    println!();
    println!("| requests done | queen RSS MiB | worker RSS MiB |");
    println!("|---|---|---|");
    for s in &samples {
        println!(
            "| {} | {:.1} | {:.1} |",
            s.done,
            mib(s.queen_kib),
            mib(s.worker_kib)
        );
    }
    let last = *samples.last().expect("the first sample is always there");
    let warm = samples
        .iter()
        .find(|s| s.done >= args.warm_up.min(last.done))
        .copied()
        .unwrap_or(last);
    println!();
    for (name, at_warm, at_last) in [
        ("queen", warm.queen_kib, last.queen_kib),
        ("worker", warm.worker_kib, last.worker_kib),
    ] {
        let growth = at_last as f64 / at_warm.max(1) as f64 - 1.0;
        println!(
            "{name}: {:.1} MiB after {} requests, {:.1} MiB after {} ({:+.1} MiB, {:+.1}%): {}",
            mib(at_warm),
            warm.done,
            mib(at_last),
            last.done,
            mib(at_last) - mib(at_warm),
            growth * 100.0,
            if growth <= 0.10 {
                "flat (within 10%)"
            } else {
                "GROWING (more than 10%)"
            }
        );
    }
    if let Some(first) = failures.first() {
        println!("first failure: {first}");
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn sample(done: usize, (queen, worker): (u32, u32)) -> anyhow::Result<Sample> {
    Ok(Sample {
        done,
        queen_kib: rss_kib(queen)?,
        worker_kib: rss_kib(worker)?,
    })
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}
