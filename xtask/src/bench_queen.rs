//! `cargo xtask bench queen`: what the queen adds to a job, measured against the same worker
//! asked directly, both on this machine.
//!
//! A release-built queen and two release-built workers (a tiny model for one-token jobs, where
//! the worker's own time is small next to the relay's; a TinyLlama-sized one for decode) that
//! register with it by heartbeat. Requests alternate between the direct and the relayed path,
//! so that a change in the machine's load touches both alike.
//!
//! Figures are printed, never asserted: they depend on the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};
use rbee_contract::{InferRequest, JobEvent, Operation, WorkerInfo, WorkerState};

use crate::bench::WorkerProcess;

/// The cluster token the queen and the workers share, and the client API key of the queen:
/// both paths pay for authentication as in a deployment.
pub(crate) const CLUSTER_TOKEN: &str = "bench-queen-cluster-token";
pub(crate) const API_KEY: &str = "bench-queen-api-key";
/// The model names the workers register under.
const LATENCY_MODEL: &str = "bench-latency";
const DECODE_MODEL: &str = "bench-decode";
const PROMPT: &str = "The quick brown fox";

#[derive(Debug, clap::Args)]
pub struct QueenBench {
    /// One-token jobs sent by each path.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Model preset of the one-token jobs.
    #[arg(long, default_value = "tiny")]
    latency_preset: String,
    /// Model preset of the decode measurement.
    #[arg(long, default_value = "tinyllama")]
    decode_preset: String,
    /// GGUF type of both models.
    #[arg(long, default_value = "q4_0")]
    format: GgufType,
    /// Tokens generated in each decode run.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Decode runs by each path.
    #[arg(long, default_value_t = 5)]
    decode_runs: usize,
    /// Threads of each worker.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A queen binary to measure (e.g. an older build, for a before/after), instead of the
    /// workspace's release build.
    #[arg(long)]
    queen: Option<PathBuf>,
    /// A worker binary to measure against, instead of the workspace's release build.
    #[arg(long)]
    worker: Option<PathBuf>,
}

pub fn run(args: &QueenBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(args.decode_runs > 0, "--decode-runs must be at least 1");
    let latency_spec = ModelSpec::preset(&args.latency_preset, Arch::Llama)?;
    let decode_spec = ModelSpec::preset(&args.decode_preset, Arch::Llama)?;
    let [queen, worker] = release_binaries([
        (&args.queen, "queen-rbee"),
        (&args.worker, "llm-worker-rbee"),
    ])?;

    let mut models = Vec::new();
    for (spec, preset) in [
        (&latency_spec, &args.latency_preset),
        (&decode_spec, &args.decode_preset),
    ] {
        eprintln!("preparing the {preset} llama {} model…", args.format);
        models.push(model_gen::ensure_generated(
            spec,
            ModelFormat::Gguf(args.format),
            &model_gen::paths::generated_dir(),
        )?);
    }

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(measure(args, &queen, &worker, &models))
}

async fn measure(
    args: &QueenBench,
    queen_bin: &Path,
    worker_bin: &Path,
    models: &[PathBuf],
) -> anyhow::Result<()> {
    let (_queen, queen_url) = start_queen(queen_bin, "1s", "info").await?;

    let mut workers = Vec::new();
    for (model, name) in models.iter().zip([LATENCY_MODEL, DECODE_MODEL]) {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut child = WorkerProcess(
            Command::new(worker_bin)
                .args(["--model", &model.display().to_string()])
                .args(["--model-ref", name, "--worker-id", name])
                .args(["--port", &port.to_string()])
                .args(["--threads", &args.threads.to_string()])
                .args(["--queen-url", &queen_url, "--heartbeat-interval", "1s"])
                .env("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start a worker")?,
        );
        wait_answering("a worker", &format!("{url}/v1/ready"), &mut child).await?;
        workers.push((child, url));
    }
    wait_registered(&queen_url, &[LATENCY_MODEL, DECODE_MODEL]).await?;

    let direct = |url: &str| job_client::JobClient::new(url).with_token(CLUSTER_TOKEN);
    let latency_worker = direct(&workers[0].1);
    let decode_worker = direct(&workers[1].1);
    let through_queen = job_client::JobClient::new(&queen_url).with_token(API_KEY);
    let http = reqwest::Client::new();

    eprintln!("one-token jobs: {} by each path…", args.requests);
    // Warm-up: connections, the worker's first pass over its weights, the queen's pools.
    for _ in 0..10 {
        one_token(&latency_worker, LATENCY_MODEL).await?;
        one_token(&through_queen, LATENCY_MODEL).await?;
        openai_one_token(&http, &queen_url).await?;
    }
    let (mut worker_ms, mut queen_ms, mut openai_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.requests {
        worker_ms.push(one_token(&latency_worker, LATENCY_MODEL).await?);
        queen_ms.push(one_token(&through_queen, LATENCY_MODEL).await?);
        openai_ms.push(openai_one_token(&http, &queen_url).await?);
    }

    eprintln!(
        "decode: {} runs of {} tokens by each path…",
        args.decode_runs, args.decode_tokens
    );
    decode(&decode_worker, 4).await?;
    decode(&through_queen, 4).await?;
    let (mut worker_tps, mut queen_tps) = (Vec::new(), Vec::new());
    let mut decoded = usize::MAX;
    for _ in 0..args.decode_runs {
        let (rate, tokens) = decode(&decode_worker, args.decode_tokens).await?;
        worker_tps.push(rate);
        decoded = decoded.min(tokens);
        let (rate, tokens) = decode(&through_queen, args.decode_tokens).await?;
        queen_tps.push(rate);
        decoded = decoded.min(tokens);
    }

    println!();
    println!(
        "queen benchmark: release build, one worker per model on this machine, {} threads each",
        args.threads
    );
    println!();
    println!(
        "one-token jobs ({} llama {}, prompt {PROMPT:?}, max_tokens 1, greedy), {} sequential requests by each path, interleaved; time from the request to the terminal event (OpenAI: to the whole answer)",
        args.latency_preset, args.format, args.requests
    );
    println!();
    println!("| path | median ms | p90 ms | median − direct ms |");
    println!("|---|---|---|---|");
    let direct_median = percentile(&worker_ms, 0.5);
    for (name, samples) in [
        ("worker job API, direct", &worker_ms),
        ("queen job API", &queen_ms),
        ("queen OpenAI /v1/completions", &openai_ms),
    ] {
        let median = percentile(samples, 0.5);
        println!(
            "| {name} | {median:.3} | {:.3} | {:+.3} |",
            percentile(samples, 0.9),
            median - direct_median
        );
    }
    println!();
    println!(
        "decode ({} llama {}, {} tokens asked, {} runs by each path, interleaved): tok/s between the first and the last token",
        args.decode_preset, args.format, args.decode_tokens, args.decode_runs
    );
    println!();
    let worker_rate = percentile(&worker_tps, 0.5);
    let queen_rate = percentile(&queen_tps, 0.5);
    println!("| path | median tok/s | best tok/s | median / direct |");
    println!("|---|---|---|---|");
    for (name, samples) in [
        ("worker job API, direct", &worker_tps),
        ("queen job API", &queen_tps),
    ] {
        let median = percentile(samples, 0.5);
        println!(
            "| {name} | {median:.1} | {:.1} | {:.3}× |",
            samples.iter().copied().fold(f64::NAN, f64::max),
            median / worker_rate
        );
    }
    // Pairs run back to back see nearly the same machine: their ratio is the steadier figure.
    let mut paired: Vec<f64> = queen_tps
        .iter()
        .zip(&worker_tps)
        .map(|(q, w)| q / w)
        .collect();
    paired.sort_by(f64::total_cmp);
    println!();
    println!(
        "queen / direct decode, median of the {} back-to-back pairs: {:.3}× (overall medians: {:.3}×)",
        paired.len(),
        percentile(&paired, 0.5),
        queen_rate / worker_rate
    );
    if decoded < args.decode_tokens {
        println!(
            "(a run stopped at the end of generation after {decoded} tokens; rates count the tokens that came)"
        );
    }
    Ok(())
}

/// The binaries to measure, each `(given, package)`: the path given, else the workspace's
/// release build of the package (built first, all in one `cargo build`).
pub(crate) fn release_binaries<const N: usize>(
    wanted: [(&Option<PathBuf>, &str); N],
) -> anyhow::Result<[PathBuf; N]> {
    let root = crate::tasks::workspace_root();
    let packages: Vec<&str> = wanted
        .iter()
        .filter(|(given, _)| given.is_none())
        .flat_map(|(_, package)| ["-p", package])
        .collect();
    if !packages.is_empty() {
        eprintln!("building {} (release)…", packages.join(" "));
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "--quiet"])
            .args(&packages)
            .status()?;
        anyhow::ensure!(status.success(), "building the binaries failed");
    }
    // Each package's binary has the package's name.
    Ok(wanted.map(|(given, package)| {
        given
            .clone()
            .unwrap_or_else(|| root.join("target/release").join(package))
    }))
}

/// Starts a queen on a free loopback port (heartbeats every `heartbeat`, [`CLUSTER_TOKEN`],
/// [`API_KEY`] as its only client key, no admin keys) and waits until it answers; returns it and
/// its URL.
pub(crate) async fn start_queen(
    queen_bin: &Path,
    heartbeat: &str,
    rust_log: &str,
) -> anyhow::Result<(WorkerProcess, String)> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut queen = WorkerProcess(
        Command::new(queen_bin)
            .args(["--port", &port.to_string()])
            .args(["--heartbeat-interval", heartbeat])
            .env("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)
            .env("RBEE_API_KEYS", API_KEY)
            .env_remove("RBEE_ADMIN_KEYS")
            .env_remove("RBEE_QUEEN_CONFIG")
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the queen")?,
    );
    wait_answering("the queen", &format!("{url}/health"), &mut queen).await?;
    Ok((queen, url))
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `q`-quantile of `samples` (nearest rank).
fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Waits until `GET url` (with the cluster token) answers 2xx.
pub(crate) async fn wait_answering(
    what: &str,
    url: &str,
    child: &mut WorkerProcess,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.0.try_wait()? {
            bail!("{what} exited early: {status}");
        }
        if let Ok(r) = client.get(url).bearer_auth(CLUSTER_TOKEN).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} did not answer {url}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the queen lists a ready worker for each of `models`.
async fn wait_registered(queen_url: &str, models: &[&str]) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Workers {
        workers: Vec<WorkerInfo>,
    }
    wait_listed(
        queen_url,
        "/v1/workers",
        "the workers",
        |listed: &Workers| {
            models.iter().all(|model| {
                listed
                    .workers
                    .iter()
                    .any(|w| w.model == *model && w.state == WorkerState::Ready)
            })
        },
    )
    .await
}

/// Waits until `GET {queen_url}{path}` (with the API key) answers what `ready` accepts: `what`
/// has registered with the queen.
pub(crate) async fn wait_listed<T: serde::de::DeserializeOwned>(
    queen_url: &str,
    path: &str,
    what: &str,
    ready: impl Fn(&T) -> bool,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = client
            .get(format!("{queen_url}{path}"))
            .bearer_auth(API_KEY)
            .send()
            .await?
            .error_for_status()?
            .json::<T>()
            .await?;
        if ready(&listed) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not register with the queen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn infer(model: &str, max_tokens: usize) -> Operation {
    Operation::Infer(InferRequest {
        model: model.into(),
        prompt: Some(PROMPT.into()),
        max_tokens: Some(max_tokens as u32),
        temperature: Some(0.0),
        ..Default::default()
    })
}

/// Milliseconds from submitting a one-token job to its terminal event.
async fn one_token(client: &job_client::JobClient, model: &str) -> anyhow::Result<f64> {
    let sent = Instant::now();
    let terminal = client.run_to_end(&infer(model, 1), |_| {}).await?;
    let elapsed = sent.elapsed();
    if let JobEvent::Error { code, message } = terminal {
        bail!("the one-token job failed: {code}: {message}");
    }
    Ok(elapsed.as_secs_f64() * 1e3)
}

/// Milliseconds of a non-streaming one-token `/v1/completions` at the queen.
async fn openai_one_token(http: &reqwest::Client, queen_url: &str) -> anyhow::Result<f64> {
    let body = serde_json::json!({
        "model": LATENCY_MODEL,
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0.0,
    });
    let sent = Instant::now();
    let response = http
        .post(format!("{queen_url}/v1/completions"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let text = response.bytes().await?;
    let elapsed = sent.elapsed();
    anyhow::ensure!(
        status.is_success(),
        "/v1/completions answered {status}: {}",
        String::from_utf8_lossy(&text)
    );
    Ok(elapsed.as_secs_f64() * 1e3)
}

/// Decode tok/s between the first and the last token of one generation, and the tokens.
async fn decode(client: &job_client::JobClient, max_tokens: usize) -> anyhow::Result<(f64, usize)> {
    let handle = client.submit(&infer(DECODE_MODEL, max_tokens)).await?;
    let mut events = handle.events();
    let (mut first, mut last, mut tokens) = (None, None, 0usize);
    while let Some(event) = events.next().await {
        match event? {
            JobEvent::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                tokens += 1;
            }
            JobEvent::Error { code, message } => bail!("generation failed: {code}: {message}"),
            _ => {}
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        bail!("no token was generated")
    };
    anyhow::ensure!(tokens >= 2, "only {tokens} token was generated");
    Ok(((tokens - 1) as f64 / (last - first).as_secs_f64(), tokens))
}
