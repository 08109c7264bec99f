//! `cargo xtask gpu-check`: one command that shows rbee working on a machine's NVIDIA GPU.
//!
//! It builds the worker and the hive (with CUDA for a `cuda:N` device: the installed toolkit,
//! else the one `check-cuda` installs from PyPI), starts the hive and reads its devices through
//! its own route (NVML), runs a generated model and SmolLM2 on the device and on the CPU and
//! compares their greedy tokens, runs the worker benchmark on the device, and prints one table.
//! Any mismatch makes it exit non-zero.
//!
//! Every step also runs with `--device cpu`, on any machine: then the device's side is candle's
//! code on the CPU (`RBEE_CPU_KERNELS=0`: the code a GPU runs) and the reference is the engine's
//! own CPU path, so the comparison still sets two implementations against each other.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_contract::{DevicesResponse, InferRequest, JobEvent, Operation};

use crate::bench::{WorkerProcess, wait_ready};
use crate::bench_queen::free_port;
use crate::cuda::{self, Toolkit};
use crate::tasks::{cargo, run, workspace_root};

/// The prompt of every comparison: words every generated model's vocabulary has.
const PROMPT: &str = "the quick brown fox jumps over a lazy dog";
/// Tokens compared for a quantized model, whose dequantization differs between kernels: past
/// the first few, a near-tie between two logits may go either way.
const QUANTIZED_TOKENS: usize = 16;
/// Where a quantized model's tokens part, a gap between the two tokens' logits (on the CPU)
/// within this much, absolute plus relative to the larger, is a near tie that rounding decides:
/// the tolerance the llama.cpp reference test allows quantized types.
const QUANTIZED_TIE_ABS: f32 = 0.25;
const QUANTIZED_TIE_REL: f32 = 3.5e-2;

#[derive(Debug, clap::Args)]
pub struct GpuCheckArgs {
    /// The device to check: `cuda:N`, or `cpu` to run every step on a machine without a GPU.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// The compute capability to compile candle's kernels for (e.g. 89); default: the GPU's,
    /// as `nvidia-smi` reports it.
    #[arg(long)]
    compute_cap: Option<String>,
    /// Tokens each comparison generates.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// The benchmark's model preset: tinyllama (about 1.1 B parameters), or small for a quick
    /// look.
    #[arg(long, default_value = "tinyllama")]
    bench_preset: String,
    /// The benchmark's GGUF types.
    #[arg(long, default_value = "q4_0,q8_0")]
    bench_formats: String,
    /// Parallel build jobs (cargo's and nvcc's); default: cargo's own.
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
}

/// Where the check runs the model.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Cpu,
    Cuda(u32),
}

impl Target {
    fn parse(text: &str) -> anyhow::Result<Target> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.split_once(':') {
            None if lower == "cpu" => Ok(Target::Cpu),
            None if lower == "cuda" => Ok(Target::Cuda(0)),
            Some(("cuda", n)) => {
                Ok(Target::Cuda(n.parse().with_context(|| {
                    format!("`{text}`: the GPU's ordinal must be a number")
                })?))
            }
            _ => bail!("`{text}` is not a device gpu-check runs on: cpu or cuda:N"),
        }
    }

    fn id(&self) -> String {
        match self {
            Target::Cpu => "cpu".into(),
            Target::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// The binaries under test and how to run them.
struct Build {
    worker: PathBuf,
    hive: PathBuf,
    /// Set on every process started from the build (the toolkit's libraries, for CUDA).
    env: Vec<(String, std::ffi::OsString)>,
}

/// One row of the summary.
struct Step {
    name: String,
    passed: bool,
    detail: String,
    took: Duration,
}

pub fn run_check(args: &GpuCheckArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.device)?;
    let mut steps = Vec::new();
    let started = Instant::now();

    let build = build(&target, args)?;
    steps.push(Step {
        name: "build".into(),
        passed: true,
        detail: format!("{}", build.worker.display()),
        took: started.elapsed(),
    });

    let runtime = tokio::runtime::Runtime::new()?;
    let at = Instant::now();
    let devices = runtime.block_on(hive_devices(&build))?;
    print_devices(&devices);
    let device = std::iter::once(&devices.cpu)
        .chain(&devices.gpus)
        .find(|d| d.id == target.id())
        .cloned();
    let Some(device) = device else {
        bail!(
            "the hive reports no {} (it has {}): is the NVIDIA driver installed and the GPU \
             visible (CUDA_VISIBLE_DEVICES)?",
            target.id(),
            std::iter::once(devices.cpu.id.as_str())
                .chain(devices.gpus.iter().map(|d| d.id.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    steps.push(Step {
        name: "devices (hive, NVML)".into(),
        passed: true,
        detail: format!(
            "{}: {}, {:.1} of {:.1} GiB free{}",
            device.id,
            device.name,
            gib(device.memory_free_bytes),
            gib(device.memory_total_bytes),
            device
                .compute_capability
                .as_deref()
                .map(|c| format!(", compute {c}"))
                .unwrap_or_default()
        ),
        took: at.elapsed(),
    });

    for (name, model, exact) in models()? {
        let at = Instant::now();
        let compared = runtime.block_on(compare(&build, &target, &model, args.tokens, exact));
        let (passed, detail) = match compared {
            Ok(result) => (result.passed, result.detail),
            Err(err) => (false, format!("{err:#}")),
        };
        steps.push(Step {
            name: format!("greedy tokens: {name}"),
            passed,
            detail,
            took: at.elapsed(),
        });
    }

    let at = Instant::now();
    let bench = bench(&build, &target, args);
    steps.push(Step {
        name: format!("worker bench ({})", args.bench_preset),
        passed: bench.is_ok(),
        detail: match &bench {
            Ok(()) => "the tables above".into(),
            Err(err) => format!("{err:#}"),
        },
        took: at.elapsed(),
    });

    println!();
    println!(
        "## gpu-check on {} ({:.0?})",
        target.id(),
        started.elapsed()
    );
    println!();
    println!("| step | result | detail | time |");
    println!("|---|---|---|---|");
    for step in &steps {
        println!(
            "| {} | {} | {} | {:.1} s |",
            step.name,
            if step.passed { "ok" } else { "FAILED" },
            step.detail.replace('|', "/").replace('\n', " "),
            step.took.as_secs_f64()
        );
    }
    let failed = steps.iter().filter(|s| !s.passed).count();
    ensure!(failed == 0, "gpu-check: {failed} step(s) failed");
    Ok(())
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Builds the worker and the hive: the workspace's dev build for the CPU (its dependencies and
/// the engine are optimised, see Cargo.toml), the CUDA build into `target/cuda` for a GPU.
fn build(target: &Target, args: &GpuCheckArgs) -> anyhow::Result<Build> {
    let mut command = cargo();
    command.args(["build", "-p", "llm-worker-rbee", "-p", "rbee-hive"]);
    if let Some(jobs) = args.jobs {
        command.args(["--jobs", &jobs.to_string()]);
    }
    if *target == Target::Cpu {
        run(command, "cargo build")?;
        let dir = workspace_root().join("target/debug");
        return Ok(Build {
            worker: dir.join("llm-worker-rbee"),
            hive: dir.join("rbee-hive"),
            env: Vec::new(),
        });
    }
    let toolkit = match Toolkit::system() {
        Some(toolkit) if toolkit.supported() => toolkit,
        installed => {
            match installed {
                Some(toolkit) => eprintln!(
                    "the installed toolkit ({}) is not one candle's CUDA bindings know (13.4 \
                     at most): using NVIDIA's PyPI wheels (as check-cuda)",
                    toolkit.release()?
                ),
                None => eprintln!(
                    "no CUDA toolkit installed: using NVIDIA's PyPI wheels (as check-cuda)"
                ),
            }
            let toolkit = cuda::ensure_wheel_toolkit()?;
            let driver = cuda::driver_library().context(
                "no NVIDIA driver on this machine (no libcuda): install the driver first",
            )?;
            cuda::link_driver(&toolkit, &driver)?;
            toolkit
        }
    };
    eprintln!(
        "CUDA toolkit: {} ({})",
        toolkit.root.display(),
        toolkit.release()?
    );
    command.args(["--features", "llm-worker-rbee/cuda"]);
    toolkit.configure(
        &mut command,
        args.compute_cap.as_deref(),
        args.jobs.unwrap_or(2),
    );
    run(command, "cargo build --features cuda")?;
    let dir = workspace_root().join(cuda::TARGET_DIR).join("debug");
    Ok(Build {
        worker: dir.join("llm-worker-rbee"),
        hive: dir.join("rbee-hive"),
        env: vec![("LD_LIBRARY_PATH".into(), toolkit.library_path())],
    })
}

/// Starts the hive on a loopback port and asks it for its devices, as the queen sees them.
async fn hive_devices(build: &Build) -> anyhow::Result<DevicesResponse> {
    let scratch = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut hive = WorkerProcess(
        Command::new(&build.hive)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--log-dir")
            .arg(scratch.path().join("logs"))
            .arg("--model-dir")
            .arg(scratch.path().join("models"))
            .envs(build.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RBEE_QUEEN_URL")
            .env_remove("RBEE_CLUSTER_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", build.hive.display()))?,
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{url}/v1/devices")).send().await {
            let response = response.error_for_status()?;
            return response
                .json()
                .await
                .context("the hive's /v1/devices is not a DevicesResponse");
        }
        if let Some(status) = hive.0.try_wait()? {
            bail!("the hive exited before it answered ({status})");
        }
        ensure!(
            Instant::now() < deadline,
            "the hive did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_devices(devices: &DevicesResponse) {
    println!("| device | name | memory free / total | compute capability | cores |");
    println!("|---|---|---|---|---|");
    for d in std::iter::once(&devices.cpu).chain(&devices.gpus) {
        println!(
            "| {} | {} | {:.1} / {:.1} GiB | {} | {} |",
            d.id,
            d.name,
            gib(d.memory_free_bytes),
            gib(d.memory_total_bytes),
            d.compute_capability.as_deref().unwrap_or("–"),
            d.cores.map_or("–".into(), |c| c.to_string())
        );
    }
    if devices.gpus.is_empty() {
        println!("(no NVIDIA GPU: NVML is not there or sees none)");
    }
}

/// The compared models: a generated F16 llama, whose tokens must agree exactly, and SmolLM2
/// (Q4_1, a real vocabulary and weights), whose first tokens must.
fn models() -> anyhow::Result<Vec<(String, PathBuf, bool)>> {
    let generated = model_gen::ensure_generated(
        &ModelSpec::small(),
        ModelFormat::Gguf(GgufType::F16),
        &model_gen::paths::generated_dir(),
    )?;
    let smollm2 = crate::fetch::ensure_smollm2(None)?;
    Ok(vec![
        ("generated llama F16".into(), generated, true),
        ("SmolLM2-135M Q4_1".into(), smollm2, false),
    ])
}

struct Comparison {
    passed: bool,
    detail: String,
}

/// Greedy tokens of `model` on `target` against the CPU's: all of them for an exact type, the
/// first [`QUANTIZED_TOKENS`] for a quantized one. Where they part, the CPU's logits for the
/// two tokens at that point say by how much the device would have had to differ to choose
/// otherwise: for a quantized model a near tie (within [`QUANTIZED_TIE_ABS`] and
/// [`QUANTIZED_TIE_REL`]) is rounding and passes, a wider gap is a wrong result.
async fn compare(
    build: &Build,
    target: &Target,
    model: &Path,
    tokens: usize,
    exact: bool,
) -> anyhow::Result<Comparison> {
    let on_device = greedy(build, target, model, tokens, true).await?;
    let on_cpu = greedy(build, &Target::Cpu, model, tokens, false).await?;
    let compared = if exact {
        on_device.len().max(on_cpu.len())
    } else {
        QUANTIZED_TOKENS.min(tokens)
    };
    // The two sides, as the table names them.
    let (device_side, cpu_side) = match target {
        Target::Cpu => ("candle's CPU code".to_owned(), "the engine's CPU path"),
        Target::Cuda(_) => (target.id(), "the CPU"),
    };
    let reference = format!("{device_side} against {cpu_side}");
    let Some(i) = (0..compared).find(|&i| on_device.get(i) != on_cpu.get(i)) else {
        return Ok(Comparison {
            passed: true,
            detail: format!("{compared} tokens identical ({reference})"),
        });
    };
    let (Some(&device_token), Some(&cpu_token)) = (on_device.get(i), on_cpu.get(i)) else {
        return Ok(Comparison {
            passed: false,
            detail: format!(
                "after {i} identical tokens one side stopped: {device_side} generated {}, \
                 {cpu_side} {}",
                on_device.len(),
                on_cpu.len()
            ),
        });
    };
    let logits = cpu_logits_after(model, &on_cpu[..i])?;
    let logit = |token: u32| logits.get(token as usize).copied().unwrap_or(f32::NAN);
    let gap = logit(cpu_token) - logit(device_token);
    let larger = logit(device_token).abs().max(logit(cpu_token).abs());
    let tie = !exact && gap.abs() <= QUANTIZED_TIE_ABS + QUANTIZED_TIE_REL * larger;
    let detail = format!(
        "token {i} of {compared} differs: {device_side} chose {device_token}, {cpu_side} \
         {cpu_token}; {cpu_side}'s logits for them are {:.4} and {:.4}, {gap:.4} apart \
         ({:.2} % of the larger)",
        logit(device_token),
        logit(cpu_token),
        100.0 * gap.abs() / larger
    );
    Ok(Comparison {
        passed: tie,
        detail: if tie {
            format!("{detail}: a near tie, within the quantized tolerance")
        } else {
            detail
        },
    })
}

/// The CPU's logits for the token after [`PROMPT`] and `generated`, computed here by the
/// engine's CPU path, the worker's reference.
fn cpu_logits_after(model: &Path, generated: &[u32]) -> anyhow::Result<Vec<f32>> {
    use rbee_engine::{DeviceSpec, Engine, GenerationParams, LoadOptions, Prompt};
    let options = LoadOptions {
        model_path: model.to_owned(),
        device: DeviceSpec::Cpu,
        slots: 1,
        context_length: None,
    };
    let mut engine = Engine::load(&options, &mut |_| {})?;
    let prepared = engine.prepare(Prompt::Text(PROMPT.into()), GenerationParams::default())?;
    let mut tokens = prepared.prompt_tokens().to_vec();
    tokens.extend_from_slice(generated);
    Ok(engine.logits_for_test(&tokens, 0)?)
}

/// The token ids a worker of `model` on `target` generates greedily from [`PROMPT`].
/// `device_code` on the CPU runs candle's code, the code a GPU runs.
async fn greedy(
    build: &Build,
    target: &Target,
    model: &Path,
    tokens: usize,
    device_code: bool,
) -> anyhow::Result<Vec<u32>> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let mut command = Command::new(&build.worker);
    command
        .arg("--model")
        .arg(model)
        .args(["--port", &port.to_string(), "--device", &target.id()])
        .envs(build.env.iter().map(|(k, v)| (k, v)))
        .env_remove("RBEE_CLUSTER_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if *target == Target::Cpu && device_code {
        command.env("RBEE_CPU_KERNELS", "0");
    }
    let mut worker = WorkerProcess(
        command
            .spawn()
            .with_context(|| format!("start {}", build.worker.display()))?,
    );
    wait_ready(&url, &mut worker.0).await?;
    let client = job_client::JobClient::new(&url);
    let op = Operation::Infer(InferRequest {
        model: "gpu-check".into(),
        prompt: Some(PROMPT.into()),
        max_tokens: Some(tokens as u32),
        temperature: Some(0.0),
        ..Default::default()
    });
    let handle = client.submit(&op).await?;
    let mut events = Box::pin(handle.events());
    let mut ids = Vec::with_capacity(tokens);
    while let Some(event) = events.next().await {
        match event? {
            JobEvent::Token { token_id, .. } => ids.push(token_id),
            JobEvent::Error { code, message } => {
                bail!("generation on {} failed: {code}: {message}", target.id())
            }
            _ => {}
        }
    }
    ensure!(!ids.is_empty(), "no token was generated on {}", target.id());
    Ok(ids)
}

/// `cargo xtask bench worker` on the device, with the build's worker: decode, prefill, and 1
/// and 4 concurrent streams. Its tables go to stdout as it measures.
fn bench(build: &Build, target: &Target, args: &GpuCheckArgs) -> anyhow::Result<()> {
    // Through cargo rather than this executable, which a concurrent build may have replaced.
    let mut command = cargo();
    command
        .args(["run", "--quiet", "-p", "xtask", "--"])
        .args(["bench", "worker", "--device", &target.id()])
        .arg("--worker")
        .arg(&build.worker)
        .args(["--preset", &args.bench_preset])
        .args(["--formats", &args.bench_formats])
        .args(["--streams", "1,4"])
        .envs(build.env.iter().map(|(k, v)| (k, v)));
    run(command, "the worker bench")
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn the_device_is_the_cpu_or_a_cuda_ordinal() {
        assert_eq!(Target::parse("cpu").unwrap(), Target::Cpu);
        assert_eq!(Target::parse(" CUDA ").unwrap(), Target::Cuda(0));
        assert_eq!(Target::parse("cuda:3").unwrap().id(), "cuda:3");
        for bad in ["metal:0", "cuda:x", "gpu", ""] {
            let err = Target::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad.trim()), "{err}");
        }
    }
}
