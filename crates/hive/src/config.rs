//! The hive's validated configuration and where its defaults come from.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The worker binary's file name, looked up beside the hive's own executable, else on `PATH`.
pub const WORKER_BINARY_NAME: &str = "llm-worker-rbee";

pub use rbee_contract::MAX_WORKER_SLOTS;

/// Everything the hive needs, validated. Built by the `rbee-hive` binary from its command line;
/// [`HiveConfig::new`] holds every default.
#[derive(Debug, Clone)]
pub struct HiveConfig {
    pub hive_id: String,
    /// The URL the queen uses to reach this hive; `http://{bound address}` if `None`.
    /// Its host is also what workers advertise, so that the queen can reach them too.
    pub advertise_url: Option<String>,
    /// Where heartbeats go, and where spawned workers send theirs; `None` means no heartbeats.
    pub queen_url: Option<String>,
    /// How often the hive and its workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// The `llm-worker-rbee` executable to spawn.
    pub worker_binary: PathBuf,
    /// One `<worker-id>.log` per worker goes here (stdout and stderr).
    pub log_dir: PathBuf,
    /// Ports handed to workers.
    pub worker_ports: PortRange,
    /// How long a worker has to exit after SIGTERM before it gets SIGKILL; the worker drains
    /// its running generations within most of it.
    pub stop_grace: Duration,
    /// How long a spawned worker may take from start to loaded before the spawn fails.
    pub load_timeout: Duration,
    /// Sequences each spawned worker decodes at once (its `--slots`), each with its own KV
    /// cache; the capacity check counts that many KV caches for a model the worker batches.
    pub worker_slots: NonZeroU32,
    /// Positions of context each spawned worker runs its model with (its `--ctx-size`), each
    /// slot's KV cache holding that many; `None` leaves every model its trained context. The
    /// capacity check counts KV caches of this context.
    pub worker_ctx_size: Option<NonZeroU32>,
    /// MiB of each spawned worker's prompt cache store (its `--prompt-cache-mib`): prefixes of
    /// earlier prompts kept in memory for reuse, beyond the slots' own KV caches; counted by
    /// the capacity check for a model the worker batches. 0: no store.
    pub worker_prompt_cache_mib: u32,
    /// Memory of each device that workers must leave free, for the system and other programs;
    /// a spawn that would eat into it is refused (see `GET /v1/capacity`).
    pub memory_reserve: u64,
    /// Shared secret of the cluster: required on the hive's routes, sent to the queen and to
    /// workers, and passed to spawned workers. `None` leaves routes open (loopback only).
    pub cluster_token: Option<String>,
    /// The model catalog (`catalog.sqlite`) and every downloaded file (`hub/`) live here.
    pub model_dir: PathBuf,
    /// The directories whose model files anyone may have this hive load
    /// (`--allow-model-dir`). When any are given, a local path outside them and outside the
    /// catalog is refused before it is opened; when none are, any path the hive's user can
    /// read is loaded (the queen decides who may ask for one).
    pub allowed_model_dirs: Vec<PathBuf>,
    /// The model hub that `hf:` references are downloaded from.
    pub hf_endpoint: String,
    /// A hub access token, for gated or private repositories.
    pub hf_token: Option<String>,
    /// Jobs the hive holds at most, running and recently finished together: finished ones are
    /// dropped early to make room, and when all are running a new job is refused with
    /// `503 busy`. Bounds the memory of the hive's job registry.
    pub max_jobs: NonZeroUsize,
}

/// The hive's job limit unless `--max-jobs` says otherwise.
pub const DEFAULT_HIVE_MAX_JOBS: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

/// The prompt cache store each worker gets unless `--worker-prompt-cache-mib` says otherwise
/// (the worker's own default).
pub const DEFAULT_WORKER_PROMPT_CACHE_MIB: u32 = 256;

/// The public Hugging Face hub.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

impl HiveConfig {
    /// A configuration with the defaults for everything but the id.
    pub fn new(hive_id: impl Into<String>) -> Self {
        HiveConfig {
            hive_id: hive_id.into(),
            advertise_url: None,
            queen_url: None,
            heartbeat_interval: Duration::from_secs(5),
            worker_binary: default_worker_binary(),
            log_dir: default_log_dir(),
            worker_ports: PortRange {
                first: 9300,
                last: 9399,
            },
            stop_grace: Duration::from_secs(30),
            load_timeout: Duration::from_secs(600),
            worker_slots: NonZeroU32::MIN,
            worker_ctx_size: None,
            worker_prompt_cache_mib: DEFAULT_WORKER_PROMPT_CACHE_MIB,
            memory_reserve: 0,
            cluster_token: None,
            model_dir: default_model_dir(),
            allowed_model_dirs: Vec::new(),
            hf_endpoint: DEFAULT_HF_ENDPOINT.into(),
            hf_token: None,
            max_jobs: DEFAULT_HIVE_MAX_JOBS,
        }
    }
}

/// The machine's host name, the default hive id; `localhost` if it cannot be read.
pub fn default_hive_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `$XDG_STATE_HOME/rbee/workers`, else `~/.local/state/rbee/workers`.
pub fn default_log_dir() -> PathBuf {
    let state_home = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".local/state"))
        })
        .unwrap_or_else(std::env::temp_dir);
    state_home.join("rbee").join("workers")
}

/// `$XDG_DATA_HOME/rbee/models`, else `~/.local/share/rbee/models`.
pub fn default_model_dir() -> PathBuf {
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".local/share"))
        })
        .unwrap_or_else(std::env::temp_dir);
    data_home.join("rbee").join("models")
}

/// `llm-worker-rbee` beside the running executable when it is there, so that a hive runs the
/// worker of its own build; otherwise the bare name, which the OS looks up on `PATH`.
pub fn default_worker_binary() -> PathBuf {
    let file_name = format!("{WORKER_BINARY_NAME}{}", std::env::consts::EXE_SUFFIX);
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&file_name)))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(file_name))
}

/// An inclusive range of ports, written `9300-9399` (or a single `9300`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// How many ports the range holds (never zero).
    pub fn count(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The `n`th port of the range, wrapping around.
    pub fn nth_wrapping(&self, n: usize) -> u16 {
        let offset = n % self.count();
        self.first + u16::try_from(offset).unwrap_or(0)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let port = |part: &str| {
            part.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("'{part}' is not a port (1-65535) in '{text}'"))
        };
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => {
                let only = port(text)?;
                (only, only)
            }
        };
        if first > last {
            return Err(format!(
                "'{text}' is not a range: {first} comes after {last}"
            ));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(
            "9300-9399".parse(),
            Ok(PortRange {
                first: 9300,
                last: 9399
            })
        );
        assert_eq!(
            " 9300 ".parse(),
            Ok(PortRange {
                first: 9300,
                last: 9300
            })
        );
        assert!("9399-9300".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("9300-70000".parse::<PortRange>().is_err());
        assert!("many".parse::<PortRange>().is_err());
    }

    #[test]
    fn port_ranges_wrap() {
        let range: PortRange = "10-12".parse().unwrap();
        assert_eq!(range.count(), 3);
        let ports: Vec<u16> = (0..5).map(|n| range.nth_wrapping(n)).collect();
        assert_eq!(ports, vec![10, 11, 12, 10, 11]);
        assert!(range.contains(12) && !range.contains(13));
        assert_eq!(range.to_string(), "10-12");
    }

    #[test]
    fn defaults_are_usable() {
        let config = HiveConfig::new("h");
        assert!(config.log_dir.ends_with("rbee/workers"));
        assert!(config.model_dir.ends_with("rbee/models"));
        assert!(
            config
                .worker_binary
                .to_string_lossy()
                .contains(WORKER_BINARY_NAME)
        );
        assert!(!default_hive_id().is_empty());
        assert_eq!(config.worker_slots.get(), 1);
    }
}
