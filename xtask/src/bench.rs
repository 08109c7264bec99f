//! `cargo xtask bench worker`: the worker's speed on TinyLlama-sized generated models of each
//! family, measured through its HTTP API as a client sees it, next to the machine's memory
//! bandwidth.
//!
//! Figures are printed, never asserted: speed depends on the machine.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};
use rbee_contract::{InferRequest, JobEvent, Operation};

/// The llama-cpp-python venv `cargo xtask refs` builds, and the timing script run in it.
const LLAMA_CPP_PYTHON: &str = "target/refs-venv/bin/python";
const LLAMA_CPP_BENCH: &str = "xtask/refs/llama_cpp_bench.py";

#[derive(Debug, clap::Args)]
pub struct WorkerBench {
    /// Model families to measure: llama, qwen2, qwen3, gemma2, gemma3, phi3, or llama3 (the
    /// llama preset with Llama 3's RoPE factors in `rope_freqs.weight`).
    #[arg(long, value_delimiter = ',', default_value = "llama")]
    archs: Vec<Family>,
    /// GGUF types to measure.
    #[arg(long, value_delimiter = ',', default_value = "q4_0,q8_0,q4_k")]
    formats: Vec<GgufType>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    threads: Vec<usize>,
    /// Tokens generated in the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Prompt lengths, in tokens: the first is the main table's; with more than one, each
    /// gets a row of prefill and decode rates in the prompt-length table (e.g. 64,1024,4096;
    /// the worker's context is raised to fit the longest).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    prompt_tokens: Vec<usize>,
    /// Also time llama.cpp (llama-cpp-python in target/refs-venv, which `cargo xtask refs`
    /// builds) on the same files and prompt tokens, with the same thread count, for the
    /// prompt-length table.
    #[arg(long)]
    llama_cpp: bool,
    /// Concurrent streams of the batching measurement (the worker runs with as many slots as
    /// the largest); empty to skip it.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    streams: Vec<usize>,
    /// Model preset: tinyllama (the benchmark: about 1.1 B parameters in every family), or
    /// small/tiny for a quick look.
    #[arg(long, default_value = "tinyllama")]
    preset: String,
    /// The device the worker runs on: cpu, cuda:N or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A worker binary to measure (e.g. a CUDA build), instead of building the workspace's.
    #[arg(long)]
    worker: Option<std::path::PathBuf>,
}

/// A benchmarked model family: a model-gen architecture, or llama with Llama 3's RoPE factors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    Arch(Arch),
    Llama3,
}

impl std::str::FromStr for Family {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "llama3" {
            return Ok(Family::Llama3);
        }
        s.parse()
            .map(Family::Arch)
            .map_err(|_| format!("unknown family {s:?} (expected llama, llama3, qwen2, qwen3, gemma2, gemma3 or phi3)"))
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Family::Arch(arch) => arch.fmt(f),
            Family::Llama3 => f.write_str("llama3"),
        }
    }
}

impl Family {
    /// The family's spec of a preset; llama3 is model-gen's `{preset}-llama3`.
    fn spec(self, preset: &str) -> anyhow::Result<ModelSpec> {
        let spec = match self {
            Family::Arch(arch) => ModelSpec::preset(preset, arch),
            Family::Llama3 => ModelSpec::preset(&format!("{preset}-llama3"), Arch::Llama),
        };
        Ok(spec?)
    }
}

/// One model to measure.
struct Model {
    family: Family,
    format: GgufType,
    parameters: usize,
    path: std::path::PathBuf,
}

struct Row {
    family: Family,
    parameters: usize,
    format: GgufType,
    threads: usize,
    file_bytes: u64,
    weight_bytes_per_token: u64,
    load: Duration,
    ttft: Duration,
    prefill_tps: f64,
    decode_tps: f64,
    /// Decode rate while one other process keeps a core busy.
    decode_loaded_tps: f64,
    decoded: usize,
    peak_rss: u64,
    /// Aggregate decode rate with each count of concurrent streams.
    streams: Vec<(usize, f64)>,
    /// Prefill and decode at each prompt length, and llama.cpp's where it was timed.
    prompts: Vec<PromptRun>,
    llama: Vec<PromptRun>,
}

/// Prefill and decode at one prompt length.
#[derive(Debug, Clone, Copy)]
struct PromptRun {
    prompt_tokens: usize,
    ttft: Duration,
    decode_tps: f64,
}

impl PromptRun {
    fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64()
    }
}

pub fn run(args: &WorkerBench) -> anyhow::Result<()> {
    // Every spec first, so that a bad family or preset fails before the long build.
    let specs = args
        .archs
        .iter()
        .map(|&family| Ok((family, family.spec(&args.preset)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The dev profile builds every dependency and the engine at opt-level 3 (see Cargo.toml),
    // so the worker the tests run is the one measured, without a second, release build.
    let worker = match &args.worker {
        Some(worker) => worker.clone(),
        None => {
            eprintln!("building llm-worker-rbee…");
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(crate::tasks::workspace_root())
                .args(["build", "--quiet", "-p", "llm-worker-rbee"])
                .status()?;
            anyhow::ensure!(status.success(), "building the worker failed");
            crate::tasks::workspace_root().join("target/debug/llm-worker-rbee")
        }
    };

    let mut models = Vec::new();
    for (family, spec) in &specs {
        for &format in &args.formats {
            eprintln!("preparing the {} {family} {format} model…", args.preset);
            let started = Instant::now();
            let path = model_gen::ensure_generated(
                spec,
                ModelFormat::Gguf(format),
                &model_gen::paths::generated_dir(),
            )?;
            eprintln!(
                "  {} ({:.1} s)",
                path.display(),
                started.elapsed().as_secs_f64()
            );
            models.push(Model {
                family: *family,
                format,
                parameters: spec.parameter_count(),
                path,
            });
        }
    }

    let bandwidth: Vec<(usize, f64)> = args
        .threads
        .iter()
        .map(|&t| (t, memory_read_bandwidth(t)))
        .collect();

    let runtime = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for model in &models {
        for &threads in &args.threads {
            eprintln!(
                "measuring {} {} with {threads} thread(s)…",
                model.family, model.format
            );
            let mut row = runtime.block_on(measure(&worker, &args.device, model, threads, args))?;
            if args.llama_cpp {
                row.llama = llama_cpp_runs(model, threads, args)?;
            }
            rows.push(row);
        }
    }

    println!();
    println!(
        "worker benchmark: {} size class, prompt {} tokens, greedy",
        args.preset,
        main_prompt(args)
    );
    for (threads, bytes_per_second) in &bandwidth {
        println!(
            "memory read bandwidth, {threads} thread(s): {:.1} GB/s",
            bytes_per_second / 1e9
        );
    }
    println!();
    println!(
        "| arch | params M | format | threads | file MiB | weights read/token MiB | load s | TTFT ms | prefill tok/s | decode tok/s | bandwidth limit tok/s | decode / limit | prefill / decode | decode under load tok/s | under load / quiet | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let bw = bandwidth
            .iter()
            .find(|(t, _)| *t == row.threads)
            .map(|(_, b)| *b)
            .unwrap_or(f64::NAN);
        let limit = bw / row.weight_bytes_per_token as f64;
        println!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} % | {:.1} | {:.1} | {:.0} % | {:.0} |",
            row.family,
            row.parameters as f64 / 1e6,
            row.format,
            row.threads,
            mib(row.file_bytes),
            mib(row.weight_bytes_per_token),
            row.load.as_secs_f64(),
            row.ttft.as_secs_f64() * 1e3,
            row.prefill_tps,
            row.decode_tps,
            limit,
            100.0 * row.decode_tps / limit,
            row.prefill_tps / row.decode_tps,
            row.decode_loaded_tps,
            100.0 * row.decode_loaded_tps / row.decode_tps,
            mib(row.peak_rss),
        );
        if row.decoded < 2 {
            println!(
                "  ({} {}: only {} tokens decoded; decode figure not meaningful)",
                row.family, row.format, row.decoded
            );
        }
    }
    if let Some(first) = rows.first().filter(|r| !r.streams.is_empty()) {
        println!();
        println!(
            "continuous batching: aggregate decode tok/s while N concurrent streams decode ({} tokens each, same prompt), worker --slots {}",
            args.decode_tokens,
            args.streams.iter().max().copied().unwrap_or(1)
        );
        println!();
        let header: Vec<String> = first
            .streams
            .iter()
            .map(|(n, _)| format!("{n} stream{}", if *n == 1 { "" } else { "s" }))
            .collect();
        println!(
            "| arch | format | threads | {} | best / 1 stream |",
            header.join(" | ")
        );
        println!("|---|---|---|{}---|", "---|".repeat(header.len()));
        for row in &rows {
            let one = row.streams.iter().find(|(n, _)| *n == 1).map(|(_, r)| *r);
            let best = row.streams.iter().map(|(_, r)| *r).fold(f64::NAN, f64::max);
            let cells: Vec<String> = row.streams.iter().map(|(_, r)| format!("{r:.1}")).collect();
            println!(
                "| {} | {} | {} | {} | {} |",
                row.family,
                row.format,
                row.threads,
                cells.join(" | "),
                one.map_or("–".into(), |o| format!("{:.1}×", best / o)),
            );
        }
    }
    if args.prompt_tokens.len() > 1 || args.llama_cpp {
        print_prompt_lengths(&rows, args);
    }
    Ok(())
}

/// The prompt-length table: prefill and decode at each length, next to llama.cpp's.
fn print_prompt_lengths(rows: &[Row], args: &WorkerBench) {
    println!();
    println!(
        "prompt length: prefill (prompt tokens / time to first token) and decode ({} tokens) at each length{}",
        args.decode_tokens,
        if args.llama_cpp {
            "; llama.cpp (llama-cpp-python, same file, tokens and threads, its default F16 KV cache)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "| arch | format | threads | prompt tokens | TTFT ms | prefill tok/s | decode tok/s | llama.cpp prefill tok/s | llama.cpp decode tok/s | prefill / llama.cpp | decode / llama.cpp |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        for run in &row.prompts {
            let llama = row
                .llama
                .iter()
                .find(|l| l.prompt_tokens == run.prompt_tokens);
            let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
            let ratio = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}×"));
            println!(
                "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |",
                row.family,
                row.format,
                row.threads,
                run.prompt_tokens,
                run.ttft.as_secs_f64() * 1e3,
                run.prefill_tps(),
                run.decode_tps,
                cell(llama.map(|l| l.prefill_tps())),
                cell(llama.map(|l| l.decode_tps)),
                ratio(llama.map(|l| run.prefill_tps() / l.prefill_tps())),
                ratio(llama.map(|l| run.decode_tps / l.decode_tps)),
            );
        }
    }
}

fn main_prompt(args: &WorkerBench) -> usize {
    args.prompt_tokens.first().copied().unwrap_or(64)
}

/// llama.cpp's prefill and decode on `model` at each prompt length (the worker's prompt ids).
fn llama_cpp_runs(
    model: &Model,
    threads: usize,
    args: &WorkerBench,
) -> anyhow::Result<Vec<PromptRun>> {
    let root = crate::tasks::workspace_root();
    let python = root.join(LLAMA_CPP_PYTHON);
    anyhow::ensure!(
        python.exists(),
        "{LLAMA_CPP_PYTHON} is missing: `cargo xtask refs` builds llama-cpp-python into it"
    );
    eprintln!(
        "timing llama.cpp on {} with {threads} thread(s)…",
        model.format
    );
    let prompts = args
        .prompt_tokens
        .iter()
        .map(|&n| prompt_ids(&model.path, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let longest = args.prompt_tokens.iter().max().copied().unwrap_or(64);
    let job = serde_json::json!({
        "model": model.path,
        "n_threads": threads,
        "n_ctx": (longest + args.decode_tokens + 8).next_multiple_of(256),
        "decode_tokens": args.decode_tokens,
        "prompts": prompts,
    });
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), serde_json::to_vec(&job)?)?;
    let out = Command::new(&python)
        .arg(root.join(LLAMA_CPP_BENCH))
        .arg(file.path())
        .stderr(Stdio::inherit())
        .output()
        .context("run llama-cpp-python")?;
    anyhow::ensure!(out.status.success(), "the llama.cpp timing script failed");
    #[derive(serde::Deserialize)]
    struct Out {
        runs: Vec<Run>,
    }
    #[derive(serde::Deserialize)]
    struct Run {
        prompt_tokens: usize,
        prefill_s: f64,
        decode_s: f64,
        decoded: usize,
    }
    let parsed: Out = serde_json::from_slice(&out.stdout).context("llama.cpp timing output")?;
    Ok(parsed
        .runs
        .into_iter()
        .map(|r| PromptRun {
            prompt_tokens: r.prompt_tokens,
            ttft: Duration::from_secs_f64(r.prefill_s),
            decode_tps: (r.decoded.saturating_sub(1)) as f64 / r.decode_s,
        })
        .collect())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn measure(
    worker: &Path,
    device: &str,
    model: &Model,
    threads: usize,
    args: &WorkerBench,
) -> anyhow::Result<Row> {
    let (decode_tokens, streams) = (args.decode_tokens, &args.streams[..]);
    let longest = args.prompt_tokens.iter().max().copied().unwrap_or(64);
    // Room for the longest prompt and its completion, past a small model's trained context
    // if need be (the worker warns and allows it).
    let ctx_size = (longest + decode_tokens > 1024).then(|| {
        (longest + decode_tokens + 8)
            .next_multiple_of(256)
            .to_string()
    });
    let slots = streams.iter().copied().max().unwrap_or(1).max(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = WorkerProcess(
        Command::new(worker)
            .args([
                "--model",
                &model.path.display().to_string(),
                "--port",
                &port.to_string(),
            ])
            .args(["--device", device])
            .args(["--threads", &threads.to_string()])
            .args(["--slots", &slots.to_string()])
            .args(["--queue-capacity", &slots.to_string()])
            .args(ctx_size.iter().flat_map(|n| ["--ctx-size", n.as_str()]))
            // Every run sends the same prompt: with the prompt cache, all but the first would
            // evaluate one token of it, and prefill would not be measured.
            .arg("--no-prompt-cache")
            .env_remove("RBEE_CLUSTER_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("start the worker")?,
    );
    wait_ready(&url, &mut child.0).await?;
    let load = started.elapsed();

    let prompt = prompt_of(&model.path, main_prompt(args))?;
    let client = job_client::JobClient::new(&url);
    // Warm-up: touches every weight page once, so the measured run reads from memory.
    generate(&client, &prompt, 2).await?;
    let timing = generate(&client, &prompt, decode_tokens).await?;
    let loaded = {
        let _busy = BusyProcess::start()?;
        generate(&client, &prompt, decode_tokens).await?
    };
    // Before the concurrent streams, whose extra KV caches are not part of one stream's
    // footprint.
    let peak_rss = peak_rss(child.0.id()).unwrap_or(0);
    let mut aggregate = Vec::new();
    for &n in streams {
        let runs =
            futures::future::join_all((0..n).map(|_| generate(&client, &prompt, decode_tokens)))
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<_>>>()?;
        aggregate.push((n, aggregate_decode_rate(&runs)));
    }
    let mut prompts = Vec::new();
    for (i, &n) in args.prompt_tokens.iter().enumerate() {
        let run = if i == 0 {
            &timing
        } else {
            let text = prompt_of(&model.path, n)?;
            // Warm-up at this length (first use of the larger KV cache).
            generate(&client, &text, 2).await?;
            &generate(&client, &text, decode_tokens).await?
        };
        prompts.push(PromptRun {
            prompt_tokens: run.prompt_tokens,
            ttft: run.ttft,
            decode_tps: run.decode_rate(),
        });
    }
    let file_bytes = std::fs::metadata(&model.path)?.len();
    Ok(Row {
        family: model.family,
        parameters: model.parameters,
        format: model.format,
        threads,
        file_bytes,
        weight_bytes_per_token: weight_bytes_per_token(&model.path)?,
        load,
        ttft: timing.ttft,
        prefill_tps: timing.prompt_tokens as f64 / timing.ttft.as_secs_f64(),
        decode_tps: timing.decode_rate(),
        decode_loaded_tps: loaded.decode_rate(),
        decoded: timing.tokens,
        peak_rss,
        streams: aggregate,
        prompts,
        llama: Vec::new(),
    })
}

/// A child process, killed when dropped.
pub(crate) struct WorkerProcess(pub(crate) Child);

/// The competing load: one process spinning on a core for as long as it lives.
struct BusyProcess(Child);

impl BusyProcess {
    fn start() -> anyhow::Result<BusyProcess> {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdout(Stdio::null())
            .spawn()
            .context("start the competing busy process")?;
        Ok(BusyProcess(child))
    }
}

impl Drop for BusyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) async fn wait_ready(url: &str, child: &mut Child) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the worker exited early: {status}");
        }
        if let Ok(r) = client.get(format!("{url}/v1/ready")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the worker did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Timing {
    prompt_tokens: usize,
    ttft: Duration,
    /// When each token arrived.
    arrivals: Vec<Instant>,
    first_to_last: Duration,
    tokens: usize,
}

/// What the streams together decoded per second while all of them were decoding: the tokens
/// that arrived after the latest first token and up to the earliest last one, over that time.
/// (Requests sent at once reach the worker a moment apart, so the first prefills alone and the
/// others join its batch a step or two later; that start is not decode throughput.)
fn aggregate_decode_rate(runs: &[Timing]) -> f64 {
    let start = runs.iter().filter_map(|r| r.arrivals.first()).max();
    let end = runs.iter().filter_map(|r| r.arrivals.last()).min();
    let (Some(&start), Some(&end)) = (start, end) else {
        return f64::NAN;
    };
    if end <= start {
        return f64::NAN;
    }
    let tokens = runs
        .iter()
        .flat_map(|r| &r.arrivals)
        .filter(|&&t| t > start && t <= end)
        .count();
    tokens as f64 / (end - start).as_secs_f64()
}

impl Timing {
    fn decode_rate(&self) -> f64 {
        if self.tokens < 2 {
            return f64::NAN;
        }
        (self.tokens - 1) as f64 / self.first_to_last.as_secs_f64()
    }
}

async fn generate(
    client: &job_client::JobClient,
    prompt: &str,
    max_tokens: usize,
) -> anyhow::Result<Timing> {
    let op = Operation::Infer(InferRequest {
        model: "bench".into(),
        prompt: Some(prompt.into()),
        max_tokens: Some(max_tokens as u32),
        temperature: Some(0.0),
        ..Default::default()
    });
    let sent = Instant::now();
    let handle = client.submit(&op).await?;
    let mut events = Box::pin(handle.events());
    let (mut first, mut last, mut tokens, mut prompt_tokens) = (None, None, 0usize, 0usize);
    let mut arrivals = Vec::with_capacity(max_tokens);
    while let Some(event) = events.next().await {
        match event? {
            JobEvent::Started { prompt_tokens: n } => prompt_tokens = n as usize,
            JobEvent::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                arrivals.push(now);
                tokens += 1;
            }
            JobEvent::Error { code, message } => bail!("generation failed: {code}: {message}"),
            _ => {}
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        bail!("no token was generated")
    };
    Ok(Timing {
        prompt_tokens,
        ttft: first - sent,
        arrivals,
        first_to_last: last - first,
        tokens,
    })
}

/// A text of at most `n` tokens for the model's own tokenizer (BOS included), as close to `n`
/// as whole words allow.
fn prompt_of(model: &Path, n: usize) -> anyhow::Result<String> {
    Ok(prompt_text(model, n)?.0)
}

/// The token ids of [`prompt_of`]'s text.
fn prompt_ids(model: &Path, n: usize) -> anyhow::Result<Vec<u32>> {
    Ok(prompt_text(model, n)?.1)
}

fn prompt_text(model: &Path, n: usize) -> anyhow::Result<(String, Vec<u32>)> {
    let mut file = std::fs::File::open(model)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let tokenizer = rbee_engine::TextTokenizer::from_gguf(&content)?;
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs",
    ];
    let text_of = |count: usize| -> String {
        words
            .iter()
            .cycle()
            .take(count)
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    };
    // The most words whose text stays within `n` tokens (the count grows with the words).
    let (mut lo, mut hi) = (1usize, n.max(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if tokenizer.encode(&text_of(mid), true)?.len() > n {
            hi = mid - 1;
        } else {
            lo = mid;
        }
    }
    let text = text_of(lo);
    let ids = tokenizer.encode(&text, true)?;
    Ok((text, ids))
}

/// Bytes of weights a decode step reads: every tensor but the token embedding, of which one
/// row is gathered (unless it doubles as the output layer).
fn weight_bytes_per_token(model: &Path) -> anyhow::Result<u64> {
    let mut file = std::fs::File::open(model)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut total = 0u64;
    for (name, info) in &content.tensor_infos {
        if name == "token_embd.weight" && !tied {
            continue;
        }
        let elements = info.shape.elem_count();
        total += (elements / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
    }
    Ok(total)
}

/// Peak resident set of a process (Linux `VmHWM`).
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Read bandwidth of main memory with `threads` threads: each sums its share of a buffer much
/// larger than any cache; the best of several passes counts.
pub fn memory_read_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    // Backed like the worker's weights (huge pages where Linux allows), so that the limit and
    // the decode rate pay the same address translation.
    let mut buffer = vec![0u8; BYTES];
    rbee_engine::advise_huge_pages(&mut buffer);
    for (i, word) in buffer.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&(i as u64).to_ne_bytes());
    }
    let chunk = (buffer.len() / 64).div_ceil(threads.max(1)) * 64;
    let mut best = Duration::MAX;
    let mut checksum = 0u64;
    for _ in 0..5 {
        let started = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| scope.spawn(move || sum(part)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        best = best.min(started.elapsed());
        checksum = checksum.wrapping_add(sums.iter().fold(0, |a, &b| a.wrapping_add(b)));
    }
    std::hint::black_box(checksum);
    BYTES as f64 / best.as_secs_f64()
}

/// Eight independent accumulators let the compiler keep several loads in flight.
fn sum(data: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        for (i, word) in c.chunks_exact(8).enumerate() {
            let word = u64::from_ne_bytes(word.try_into().unwrap_or_default());
            acc[i] = acc[i].wrapping_add(word);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &b| a.wrapping_add(u64::from(b)));
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}
