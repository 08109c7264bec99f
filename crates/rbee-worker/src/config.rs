use std::path::PathBuf;
use std::time::Duration;

use rbee_engine::DeviceSpec;

/// How long a worker whose model failed to load keeps its port open before exiting, so the
/// hive following `/v1/loading/progress` sees the error event.
pub(crate) const FAILED_LOAD_LINGER: Duration = Duration::from_secs(2);

/// The prompt cache's store, in MiB, unless configured (`--prompt-cache-mib`).
pub const DEFAULT_PROMPT_CACHE_MIB: usize = 256;

/// Everything the worker needs, validated. Built by the binary from its command line.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    /// A `.gguf` file or a safetensors checkpoint directory.
    pub model_path: PathBuf,
    /// The model reference reported in heartbeats (defaults to the path).
    pub model_ref: String,
    pub device: DeviceSpec,
    /// The URL the queen should use to reach this worker; `http://{bound address}` if `None`.
    pub advertise_url: Option<String>,
    /// Where heartbeats go; `None` means no heartbeats.
    pub queen_url: Option<String>,
    pub heartbeat_interval: Duration,
    pub hive_id: Option<String>,
    /// Shared secret of the cluster; `None` leaves the protected routes open (loopback only).
    pub cluster_token: Option<String>,
    /// Sequences generated at once, each with its own KV cache (continuous batching), on the
    /// engine's CPU path and on candle's path alike; at least 1.
    pub slots: usize,
    /// Positions a prompt plus its completion may occupy, in each slot; `None` takes the
    /// model's trained context. See `rbee_engine::LoadOptions::context_length` for how more
    /// than the trained context and the limits of candle's code are handled.
    pub context_length: Option<usize>,
    /// Whether a request reuses the prefix of its prompt whose KV cache a slot (or the prompt
    /// cache's store) holds, evaluating only the rest. Off, every prompt is evaluated whole.
    pub prompt_cache: bool,
    /// Bytes of the prompt cache's store: prefixes kept in memory after their slot was given
    /// to an unrelated request (0: no store; the slots still keep what they hold). Counted,
    /// with the slots' KV caches, by the hive's capacity check.
    pub prompt_cache_bytes: usize,
    /// Requests that may wait while every slot is busy; more are answered `429 busy`.
    pub queue_capacity: usize,
    /// How long shutdown lets running and queued generations finish before it ends them
    /// with `shutting_down`.
    pub shutdown_grace: Duration,
    /// The hive that spawned this worker: when the worker's parent process is no longer this
    /// pid (the hive died, even by SIGKILL), the worker shuts down. `None` when run by hand.
    pub hive_pid: Option<u32>,
}

impl WorkerConfig {
    /// A configuration with the defaults for everything but the id and the model.
    pub fn new(worker_id: impl Into<String>, model_path: impl Into<PathBuf>) -> Self {
        let model_path = model_path.into();
        WorkerConfig {
            worker_id: worker_id.into(),
            model_ref: model_path.display().to_string(),
            model_path,
            device: DeviceSpec::Cpu,
            advertise_url: None,
            queen_url: None,
            heartbeat_interval: Duration::from_secs(5),
            hive_id: None,
            cluster_token: None,
            slots: 1,
            context_length: None,
            prompt_cache: true,
            prompt_cache_bytes: DEFAULT_PROMPT_CACHE_MIB << 20,
            queue_capacity: 4,
            shutdown_grace: Duration::from_secs(30),
            hive_pid: None,
        }
    }
}
