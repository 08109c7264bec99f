//! `rbee-hive`: parses the command line, sets up logging, binds the port and hands over to
//! `hive::serve`.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use daemon_kit::{parse_duration, parse_size};
use hive::{HiveConfig, MAX_WORKER_SLOTS, PortRange};
use tokio_util::sync::CancellationToken;

/// Flags left out take the defaults of `hive::HiveConfig::new`.
#[derive(Debug, Parser)]
#[command(
    name = "rbee-hive",
    version,
    about = "Spawn and supervise rbee workers on this machine"
)]
struct Args {
    #[arg(long, env = "RBEE_PORT", default_value_t = 7835)]
    port: u16,
    /// Address to listen on; workers bind the same one. Non-loopback needs RBEE_CLUSTER_TOKEN.
    #[arg(long, env = "RBEE_BIND", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// The queen that receives heartbeats (the hive's and its workers'); none when absent.
    #[arg(long, env = "RBEE_QUEEN_URL")]
    queen_url: Option<String>,
    /// This hive's id in the cluster (default: the host name).
    #[arg(long, env = "RBEE_HIVE_ID")]
    hive_id: Option<String>,
    /// URL the queen should use for this hive (default: http://BIND:PORT); workers advertise
    /// its host with their own port.
    #[arg(long, env = "RBEE_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Heartbeat interval of the hive and its workers, e.g. 500ms (default 5s).
    #[arg(long, env = "RBEE_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// The llm-worker-rbee executable (default: beside rbee-hive, else on PATH).
    #[arg(long, env = "RBEE_WORKER_BINARY")]
    worker_binary: Option<PathBuf>,
    /// Where each worker's log goes (default: $XDG_STATE_HOME/rbee/workers, else
    /// ~/.local/state/rbee/workers).
    #[arg(long, env = "RBEE_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Ports handed to workers, e.g. 9300-9399 (the default).
    #[arg(long, env = "RBEE_WORKER_PORT_RANGE")]
    worker_port_range: Option<PortRange>,
    /// How long a worker gets to finish its generations and exit after SIGTERM before SIGKILL
    /// (default 30s).
    #[arg(long, env = "RBEE_STOP_GRACE", value_parser = parse_duration)]
    stop_grace: Option<Duration>,
    /// How long a worker may take to load its model before the spawn fails (default 10m).
    #[arg(long, env = "RBEE_LOAD_TIMEOUT", value_parser = parse_duration)]
    load_timeout: Option<Duration>,
    /// Sequences each spawned worker decodes at once, each with its own KV cache, 1 to 256
    /// (default 1); the capacity check counts that many KV caches per worker.
    #[arg(long, value_name = "N", env = "RBEE_HIVE_WORKER_SLOTS", value_parser = parse_slots)]
    worker_slots: Option<NonZeroU32>,
    /// Positions of context each spawned worker runs its model with (its --ctx-size), each
    /// slot's KV cache holding that many (default, or 0: each model's trained context); the
    /// capacity check counts KV caches of this context.
    #[arg(long, value_name = "N", env = "RBEE_HIVE_WORKER_CTX_SIZE")]
    worker_ctx_size: Option<u32>,
    /// MiB of memory for each spawned worker's prompt cache store (its --prompt-cache-mib):
    /// prefixes of earlier prompts kept for reuse beyond the slots' KV caches (default 256; 0:
    /// none); the capacity check counts it for a model the worker batches.
    #[arg(long, value_name = "MIB", env = "RBEE_HIVE_WORKER_PROMPT_CACHE_MIB")]
    worker_prompt_cache_mib: Option<u32>,
    /// Memory of each device that workers must leave free, e.g. 2GiB (default 0); a spawn that
    /// would eat into it is refused with no_capacity.
    #[arg(long, env = "RBEE_MEMORY_RESERVE", value_parser = parse_size)]
    memory_reserve: Option<u64>,
    /// Where the model catalog and downloaded models live (default: $XDG_DATA_HOME/rbee/models,
    /// else ~/.local/share/rbee/models).
    #[arg(long, env = "RBEE_HIVE_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// A directory whose model files anyone may have this hive load (repeatable; the
    /// environment variable takes a comma-separated list). With any, a local model path
    /// outside them and outside the catalog is refused before it is opened. Not the catalog
    /// directory (--model-dir).
    #[arg(
        long = "allow-model-dir",
        value_name = "DIR",
        env = "RBEE_HIVE_ALLOWED_MODEL_DIRS",
        value_delimiter = ','
    )]
    allowed_model_dirs: Vec<PathBuf>,
    /// The model hub `hf:` references are downloaded from (default: https://huggingface.co).
    #[arg(long, env = "HF_ENDPOINT")]
    hf_endpoint: Option<String>,
    /// Jobs the hive holds at most, running and recently finished (default 1024); when all
    /// are running, a new one is refused with 503 busy.
    #[arg(long, value_name = "N", env = "RBEE_HIVE_MAX_JOBS")]
    max_jobs: Option<NonZeroUsize>,
}

impl Args {
    fn into_config(self, cluster_token: Option<String>) -> HiveConfig {
        let mut config = HiveConfig::new(self.hive_id.unwrap_or_else(hive::default_hive_id));
        config.queen_url = self.queen_url;
        config.advertise_url = self.advertise_url;
        config.cluster_token = cluster_token;
        if let Some(interval) = self.heartbeat_interval {
            config.heartbeat_interval = interval;
        }
        if let Some(binary) = self.worker_binary {
            config.worker_binary = binary;
        }
        if let Some(dir) = self.log_dir {
            config.log_dir = dir;
        }
        if let Some(ports) = self.worker_port_range {
            config.worker_ports = ports;
        }
        if let Some(grace) = self.stop_grace {
            config.stop_grace = grace;
        }
        if let Some(limit) = self.load_timeout {
            config.load_timeout = limit;
        }
        if let Some(slots) = self.worker_slots {
            config.worker_slots = slots;
        }
        config.worker_ctx_size = self.worker_ctx_size.and_then(NonZeroU32::new);
        if let Some(mib) = self.worker_prompt_cache_mib {
            config.worker_prompt_cache_mib = mib;
        }
        if let Some(reserve) = self.memory_reserve {
            config.memory_reserve = reserve;
        }
        if let Some(dir) = self.model_dir {
            config.model_dir = dir;
        }
        config.allowed_model_dirs = self.allowed_model_dirs;
        if let Some(endpoint) = self.hf_endpoint.filter(|e| !e.trim().is_empty()) {
            config.hf_endpoint = endpoint;
        }
        config.hf_token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        if let Some(max) = self.max_jobs {
            config.max_jobs = max;
        }
        config
    }
}

/// A slot count a worker accepts: at least one, at most [`MAX_WORKER_SLOTS`].
fn parse_slots(text: &str) -> Result<NonZeroU32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .and_then(NonZeroU32::new)
        .filter(|n| n.get() <= MAX_WORKER_SLOTS)
        .ok_or_else(|| format!("a worker has 1 to {MAX_WORKER_SLOTS} slots, not '{text}'"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    daemon_kit::init_tracing();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("rbee-hive: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cluster_token = daemon_kit::cluster_token_from_env();
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = daemon_kit::listen(addr, cluster_token.as_deref()).await?;
    let config = args.into_config(cluster_token);

    let shutdown = CancellationToken::new();
    tokio::spawn(daemon_kit::cancel_on_signal(shutdown.clone()));
    hive::serve(listener, config, shutdown).await?;
    Ok(())
}
