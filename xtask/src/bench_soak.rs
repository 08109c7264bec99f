//! `cargo xtask bench soak`: whether the daemons' memory stays flat under a long run of jobs.
//!
//! A release-built queen and hive as deployed: the hive registers with the queen by heartbeat,
//! and the first job, for the smallest generated model under the hive's allowed model
//! directory, has the hive start the worker (a cold start). Then many short jobs go through the
//! queen's job API at a fixed concurrency: `infer` jobs, which the queen relays to the worker,
//! and every so often a `worker_list`, which the queen forwards to the hive as a hive job.
//! Every so many finished requests the resident set size (`VmRSS` of `/proc/<pid>/status`) of
//! each daemon is sampled. Each daemon retains finished jobs (up to its job limit, for five
//! minutes), so memory is expected to rise while those registries fill and then stay level:
//! growth after the warm-up is what the table shows.
//!
//! Figures are printed, never asserted: they depend on the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};
use rbee_contract::{HiveTarget, InferRequest, JobEvent, Operation};

use crate::bench::WorkerProcess;
use crate::bench_queen::{
    API_KEY, CLUSTER_TOKEN, free_port, release_binaries, start_queen, wait_answering, wait_listed,
};

const PROMPT: &str = "The quick brown fox";
/// The daemons sampled, in the order of [`Sample::rss_kib`].
const DAEMONS: [&str; 3] = ["queen", "hive", "worker"];

#[derive(Debug, clap::Args)]
pub struct SoakBench {
    /// Requests sent through the queen in all.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Every Nth request is a `worker_list`, which the queen forwards to the hive as a hive
    /// job; the others are `infer` jobs. `0`: none. The default fills every registry at the
    /// same point: after 5,120 requests the queen has had 4,096 jobs and more, the worker 4,096
    /// and the hive its 1,024.
    #[arg(long, default_value_t = 5)]
    hive_every: usize,
    /// Requests between two samples of each daemon's memory.
    #[arg(long, default_value_t = 250)]
    sample_every: usize,
    /// Requests after which the daemons count as warmed up: the baseline of the growth. Until
    /// the registries of finished jobs are full (see `--hive-every`), memory rises by design.
    #[arg(long, default_value_t = 4500)]
    warm_up: usize,
    /// Tokens each `infer` job asks for.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Model preset of the worker.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// GGUF type of the model.
    #[arg(long, default_value = "q4_0")]
    format: GgufType,
    /// Slots of the worker (sequences decoded at once): the hive's `--worker-slots`.
    #[arg(long, default_value_t = 8)]
    slots: u32,
    /// Threads of the worker: `RBEE_THREADS` of the hive, which its workers inherit.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A queen binary to measure instead of the workspace's release build.
    #[arg(long)]
    queen: Option<PathBuf>,
    /// A hive binary to measure instead of the workspace's release build.
    #[arg(long)]
    hive: Option<PathBuf>,
    /// A worker binary for the hive to start instead of the workspace's release build.
    #[arg(long)]
    worker: Option<PathBuf>,
}

pub fn run(args: &SoakBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(args.sample_every > 0, "--sample-every must be at least 1");
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    let spec = ModelSpec::preset(&args.preset, Arch::Llama)?;
    let binaries = release_binaries([
        (&args.queen, "queen-rbee"),
        (&args.hive, "rbee-hive"),
        (&args.worker, "llm-worker-rbee"),
    ])?;
    eprintln!("preparing the {} llama {} model…", args.preset, args.format);
    let model = model_gen::ensure_generated(
        &spec,
        ModelFormat::Gguf(args.format),
        &model_gen::paths::generated_dir(),
    )?;
    // The queen lets an API key name a path only as written under a hive's allowed
    // directory, which the hive reports resolved.
    let model =
        std::fs::canonicalize(&model).with_context(|| format!("resolve {}", model.display()))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(soak(args, &binaries, &model))
}

/// Each daemon's resident set after `done` requests, in KiB, in the order of [`DAEMONS`].
#[derive(Debug, Clone, Copy)]
struct Sample {
    done: usize,
    rss_kib: [u64; 3],
}

/// What one request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// An `infer` job, which the queen relays to the worker.
    Infer,
    /// A `worker_list`, which the queen forwards to the hive as a hive job.
    HiveJob,
}

impl Request {
    fn operation(self) -> &'static str {
        match self {
            Request::Infer => "infer",
            Request::HiveJob => "worker_list",
        }
    }

    /// The `i`-th request (from 0): every `hive_every`-th one a hive job.
    fn nth(i: usize, hive_every: usize) -> Request {
        if hive_every > 0 && (i + 1).is_multiple_of(hive_every) {
            Request::HiveJob
        } else {
            Request::Infer
        }
    }
}

/// What the requests left behind: the samples taken, and each failed request's reason.
#[derive(Default)]
struct Outcomes {
    samples: Vec<Sample>,
    failures: Vec<(Request, String)>,
}

async fn soak(
    args: &SoakBench,
    [queen_bin, hive_bin, worker_bin]: &[PathBuf; 3],
    model: &Path,
) -> anyhow::Result<()> {
    let (mut queen, queen_url) = start_queen(queen_bin, "1s", "warn").await?;

    let scratch = tempfile::tempdir()?;
    let hive_port = free_port()?;
    let hive_url = format!("http://127.0.0.1:{hive_port}");
    let model_dir = model.parent().context("the model file has no directory")?;
    let mut hive = WorkerProcess(
        Command::new(hive_bin)
            .args(["--port", &hive_port.to_string()])
            .args(["--queen-url", &queen_url, "--heartbeat-interval", "1s"])
            .args(["--hive-id", "bench-soak"])
            .arg("--worker-binary")
            .arg(worker_bin)
            .args(["--worker-slots", &args.slots.to_string()])
            .arg("--allow-model-dir")
            .arg(model_dir)
            // The catalog and the worker's log, never in the user's directories.
            .arg("--model-dir")
            .arg(scratch.path().join("models"))
            .arg("--log-dir")
            .arg(scratch.path().join("logs"))
            .env("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)
            .env("RBEE_THREADS", args.threads.to_string())
            .env_remove("RBEE_HIVE_MAX_JOBS")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the hive")?,
    );
    wait_answering("the hive", &format!("{hive_url}/health"), &mut hive).await?;
    wait_listed(
        &queen_url,
        "/v1/hives",
        "the hive",
        |listed: &serde_json::Value| listed["hives"][0]["status"] == "healthy",
    )
    .await?;

    let client = job_client::JobClient::new(&queen_url).with_token(API_KEY);
    let infer = Operation::Infer(InferRequest {
        model: model.display().to_string(),
        prompt: Some(PROMPT.into()),
        max_tokens: Some(args.max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    });
    let worker_list = Operation::WorkerList(HiveTarget { hive_id: None });
    eprintln!("cold start: the hive starts the worker…");
    if let Some(failure) = failure(client.run_to_end(&infer, |_| {}).await) {
        bail!("the cold start failed: {failure}");
    }
    let worker_pid = only_child(hive.0.id())?;
    let pids = [queen.0.id(), hive.0.id(), worker_pid];
    let first = sample(0, pids)?;

    eprintln!(
        "{} requests through the queen at concurrency {}…",
        args.requests, args.concurrency
    );
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.requests) {
        let (client, infer, worker_list) = (client.clone(), infer.clone(), worker_list.clone());
        let (next, done, outcomes) = (Arc::clone(&next), Arc::clone(&done), Arc::clone(&outcomes));
        let (requests, hive_every, every) = (args.requests, args.hive_every, args.sample_every);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok(());
                }
                let request = Request::nth(i, hive_every);
                let operation = match request {
                    Request::Infer => &infer,
                    Request::HiveJob => &worker_list,
                };
                if let Some(failure) = failure(client.run_to_end(operation, |_| {}).await) {
                    lock(&outcomes).failures.push((request, failure));
                }
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if finished % every == 0 || finished == requests {
                    let taken = sample(finished, pids)?;
                    lock(&outcomes).samples.push(taken);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    for (name, process) in [("queen", &mut queen), ("hive", &mut hive)] {
        if let Some(status) = process.0.try_wait()? {
            bail!("the {name} exited during the run: {status}");
        }
    }
    let Outcomes {
        mut samples,
        failures,
    } = std::mem::take(&mut *lock(&outcomes));
    samples.push(first);
    samples.sort_by_key(|s| s.done);

    let hive_jobs = (0..args.requests)
        .filter(|&i| Request::nth(i, args.hive_every) == Request::HiveJob)
        .count();
    let failed = |kind: Request| failures.iter().filter(|(r, _)| *r == kind).count();
    println!();
    println!(
        "soak benchmark: release build, a queen, a hive and the worker it started ({} llama {}, {} slots, {} threads) on this machine",
        args.preset, args.format, args.slots, args.threads
    );
    println!(
        "{} requests through the queen's job API at concurrency {} in {:.1} s ({:.0} requests/s): {} `infer` (prompt {PROMPT:?}, max_tokens {}, greedy), {} failed; {} `worker_list` forwarded to the hive, {} failed",
        args.requests,
        args.concurrency,
        elapsed.as_secs_f64(),
        args.requests as f64 / elapsed.as_secs_f64(),
        args.requests - hive_jobs,
        args.max_tokens,
        failed(Request::Infer),
        hive_jobs,
        failed(Request::HiveJob),
    );
    println!();
    println!(
        "| requests done |{}",
        DAEMONS.map(|name| format!(" {name} RSS MiB |")).concat()
    );
    println!("|---|{}", "---|".repeat(DAEMONS.len()));
    for s in &samples {
        println!(
            "| {} |{}",
            s.done,
            s.rss_kib.map(|kib| format!(" {:.1} |", mib(kib))).concat()
        );
    }
    let last = *samples.last().expect("the first sample is always there");
    let warm = samples
        .iter()
        .find(|s| s.done >= args.warm_up.min(last.done))
        .copied()
        .unwrap_or(last);
    println!();
    for (d, name) in DAEMONS.iter().enumerate() {
        let (at_warm, at_last) = (warm.rss_kib[d], last.rss_kib[d]);
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
    for kind in [Request::Infer, Request::HiveJob] {
        if let Some((_, first)) = failures.iter().find(|(r, _)| *r == kind) {
            println!("first failed `{}`: {first}", kind.operation());
        }
    }
    stop_cluster(&queen_url, [&mut queen, &mut hive]).await
}

/// Why a request failed, or `None` when it ended `done`.
fn failure(outcome: Result<JobEvent, job_client::ClientError>) -> Option<String> {
    match outcome {
        Ok(JobEvent::Done { .. }) => None,
        Ok(JobEvent::Error { code, message }) => Some(format!("{code}: {message}")),
        Ok(other) => Some(format!("ended with {other:?}")),
        Err(err) => Some(err.to_string()),
    }
}

/// Stops the whole cluster as `rbee-keeper queen stop` does: the queen stops the hive, which
/// stops the worker it started, and each exits.
async fn stop_cluster(queen_url: &str, daemons: [&mut WorkerProcess; 2]) -> anyhow::Result<()> {
    reqwest::Client::new()
        .post(format!("{queen_url}/v1/shutdown"))
        .bearer_auth(API_KEY)
        .send()
        .await?
        .error_for_status()
        .context("stop the cluster")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    for daemon in daemons {
        while daemon.0.try_wait()?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "the cluster did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

fn sample(done: usize, pids: [u32; 3]) -> anyhow::Result<Sample> {
    let mut rss_kib = [0; 3];
    for (kib, pid) in rss_kib.iter_mut().zip(pids) {
        *kib = rss_kib_of(pid)?;
    }
    Ok(Sample { done, rss_kib })
}

/// `VmRSS` of a process, in KiB.
fn rss_kib_of(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// The one child process of `parent`: the worker a hive started.
fn only_child(parent: u32) -> anyhow::Result<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // `pid (comm) state ppid …`, where comm may itself hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    match children[..] {
        [pid] => Ok(pid),
        _ => bail!("the hive has {} child processes, not one", children.len()),
    }
}
