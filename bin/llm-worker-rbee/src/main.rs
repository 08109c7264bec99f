//! `llm-worker-rbee`: parses the command line, sets up logging and threads, binds the port
//! and hands over to `rbee_worker::serve`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use daemon_kit::parse_duration;
use rbee_engine::DeviceSpec;
use rbee_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "llm-worker-rbee",
    version,
    about = "Serve one LLM over rbee's job protocol"
)]
struct Args {
    /// Unique id of this worker in the cluster.
    #[arg(long, env = "RBEE_WORKER_ID")]
    worker_id: Option<String>,
    /// A .gguf file, or a directory holding a safetensors llama checkpoint.
    #[arg(long, env = "RBEE_MODEL")]
    model: PathBuf,
    /// The model reference to report (defaults to the path).
    #[arg(long, env = "RBEE_MODEL_REF")]
    model_ref: Option<String>,
    /// cpu, cuda:N or metal:N.
    #[arg(long, env = "RBEE_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, env = "RBEE_PORT", default_value_t = 9300)]
    port: u16,
    #[arg(long, env = "RBEE_BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// URL the queen should use for this worker (default: http://BIND:PORT).
    #[arg(long, env = "RBEE_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Where to send heartbeats; none when absent.
    #[arg(long, env = "RBEE_QUEEN_URL")]
    queen_url: Option<String>,
    /// e.g. 500ms, 5s.
    #[arg(long, env = "RBEE_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Id of the hive that spawned this worker.
    #[arg(long, env = "RBEE_HIVE_ID")]
    hive_id: Option<String>,
    /// CPU threads for inference (default: candle's, the number of physical cores).
    #[arg(long, env = "RBEE_THREADS")]
    threads: Option<usize>,
    /// Sequences generated at once (continuous batching), each with its own KV cache, on the
    /// engine's CPU path and on candle's path (GPU devices, safetensors checkpoints) alike.
    #[arg(long, env = "RBEE_SLOTS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(rbee_contract::MAX_WORKER_SLOTS)))]
    slots: u32,
    /// Positions a prompt plus its completion may occupy, in each slot (default, or 0: the
    /// context the model was trained for). Each slot's KV cache holds this many positions.
    /// More than the trained context is allowed, with a warning; candle's path caps it at what
    /// it holds (4096 for a llama GGUF on a GPU, the trained context for qwen2 and safetensors).
    #[arg(long, value_name = "N", env = "RBEE_CTX_SIZE")]
    ctx_size: Option<u32>,
    /// MiB of memory for the prompt cache's store: prompt prefixes whose KV cache is kept after
    /// their slot went to an unrelated request, for a later request that starts with one
    /// (0: no store; each slot still keeps what it holds).
    #[arg(long, value_name = "MIB", env = "RBEE_PROMPT_CACHE_MIB", default_value_t = rbee_worker::DEFAULT_PROMPT_CACHE_MIB)]
    prompt_cache_mib: usize,
    /// Evaluate every prompt whole: no reuse of a prefix a slot or the store holds.
    #[arg(long, env = "RBEE_NO_PROMPT_CACHE")]
    no_prompt_cache: bool,
    /// Requests that may wait while every slot is busy.
    #[arg(long, env = "RBEE_QUEUE_CAPACITY", default_value_t = 4)]
    queue_capacity: usize,
    /// How long shutdown lets running and queued generations finish before ending them.
    #[arg(long, env = "RBEE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Pid of the hive that spawned this worker; the worker shuts down when its parent process
    /// is no longer this one (set by the hive, not by hand).
    #[arg(long, env = "RBEE_HIVE_PID")]
    hive_pid: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Threads must be configured before any thread exists: before logging and the runtime.
    if let Some(threads) = args.threads
        && let Err(err) = rbee_engine::set_cpu_threads(threads)
    {
        eprintln!("llm-worker-rbee: {err}");
        return ExitCode::from(2);
    }
    daemon_kit::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llm-worker-rbee: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llm-worker-rbee: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cluster_token = daemon_kit::cluster_token_from_env();
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = daemon_kit::listen(addr, cluster_token.as_deref()).await?;
    let worker_id = args.worker_id.unwrap_or_else(|| {
        format!(
            "worker-{}",
            listener.local_addr().map(|a| a.port()).unwrap_or(args.port)
        )
    });

    let mut config = WorkerConfig::new(worker_id, args.model);
    if let Some(model_ref) = args.model_ref {
        config.model_ref = model_ref;
    }
    config.device = args.device;
    config.advertise_url = args.advertise_url;
    config.queen_url = args.queen_url;
    config.heartbeat_interval = args.heartbeat_interval;
    config.hive_id = args.hive_id;
    config.cluster_token = cluster_token;
    config.queue_capacity = args.queue_capacity;
    config.slots = args.slots as usize;
    config.context_length = args.ctx_size.filter(|&n| n > 0).map(|n| n as usize);
    config.prompt_cache = !args.no_prompt_cache;
    config.prompt_cache_bytes = args.prompt_cache_mib.saturating_mul(1 << 20);
    config.shutdown_grace = args.shutdown_grace;
    config.hive_pid = args.hive_pid;

    let shutdown = CancellationToken::new();
    tokio::spawn(daemon_kit::cancel_on_signal(shutdown.clone()));
    rbee_worker::serve(listener, config, shutdown).await?;
    Ok(())
}
