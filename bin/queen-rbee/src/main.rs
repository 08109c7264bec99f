//! `queen-rbee`: parses the command line (and the optional config file), sets up logging,
//! binds the port and hands over to `queen::serve`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use daemon_kit::parse_duration;
use queen::{QueenConfig, QueenSecrets, QueenSettings};
use tokio_util::sync::CancellationToken;

/// Flags win over the config file, which wins over the built-in defaults. Credentials come
/// from the environment only: RBEE_CLUSTER_TOKEN, RBEE_API_KEYS (client keys, comma-separated)
/// and RBEE_ADMIN_KEYS (keys that may also shut the cluster down and spawn or delete workers
/// and models; without them every API key may).
#[derive(Debug, Parser)]
#[command(
    name = "queen-rbee",
    version,
    about = "Orchestrate an rbee cluster: the job API, hive and worker registries, scheduling"
)]
struct Args {
    /// TOML file with any of: port, bind, heartbeat_interval, spawn_timeout, shutdown_grace,
    /// queue_len, queue_timeout, max_jobs, worker_stall_timeout.
    #[arg(long, env = "RBEE_QUEEN_CONFIG")]
    config: Option<PathBuf>,
    /// Port to listen on [default: 7833].
    #[arg(long, env = "RBEE_QUEEN_PORT")]
    port: Option<u16>,
    /// Address to bind [default: 127.0.0.1]; any other needs RBEE_CLUSTER_TOKEN and RBEE_API_KEYS
    /// (or RBEE_ADMIN_KEYS).
    #[arg(long, env = "RBEE_QUEEN_BIND")]
    bind: Option<IpAddr>,
    /// The interval hives and workers send heartbeats at, e.g. 500ms, 5s [default: 5s].
    #[arg(long, env = "RBEE_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// How long a cold start may take until the new worker is ready [default: 5m].
    #[arg(long, env = "RBEE_SPAWN_TIMEOUT", value_parser = parse_duration)]
    spawn_timeout: Option<Duration>,
    /// How long shutdown lets running jobs finish before ending them [default: 30s].
    #[arg(long, env = "RBEE_SHUTDOWN_GRACE", value_parser = parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Inference jobs that may wait for a busy model, per model; one more is refused [default: 64].
    #[arg(long, env = "RBEE_QUEEN_QUEUE_LEN")]
    queue_len: Option<usize>,
    /// How long an inference job may wait for a busy model, e.g. 30s, 2m [default: 2m].
    #[arg(long, env = "RBEE_QUEEN_QUEUE_TIMEOUT", value_parser = parse_duration)]
    queue_timeout: Option<Duration>,
    /// Jobs the queen holds at most, running and recently finished [default: 4096].
    #[arg(long, env = "RBEE_QUEEN_MAX_JOBS")]
    max_jobs: Option<usize>,
    /// How long a worker's stream may send no event before the queen checks that the worker
    /// still answers; one that does not is lost and not scheduled on until it heartbeats
    /// again [default: 30s].
    #[arg(long, env = "RBEE_WORKER_STALL_TIMEOUT", value_parser = parse_duration)]
    worker_stall_timeout: Option<Duration>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    daemon_kit::init_tracing();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("queen-rbee: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => QueenSettings::from_file(path)?,
        None => QueenSettings::default(),
    };
    let flags = QueenSettings {
        port: args.port,
        bind: args.bind,
        heartbeat_interval: args.heartbeat_interval,
        spawn_timeout: args.spawn_timeout,
        shutdown_grace: args.shutdown_grace,
        queue_len: args.queue_len,
        queue_timeout: args.queue_timeout,
        max_jobs: args.max_jobs,
        worker_stall_timeout: args.worker_stall_timeout,
    };
    let keys_from_env = |name| {
        std::env::var(name)
            .map(|keys| queen::parse_api_keys(&keys))
            .unwrap_or_default()
    };
    let secrets = QueenSecrets {
        cluster_token: daemon_kit::cluster_token_from_env(),
        api_keys: keys_from_env("RBEE_API_KEYS"),
        admin_keys: keys_from_env("RBEE_ADMIN_KEYS"),
    };
    let config = QueenConfig::resolve(flags.or(file), secrets)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(daemon_kit::cancel_on_signal(shutdown.clone()));
    queen::serve(listener, config, shutdown).await?;
    Ok(())
}
