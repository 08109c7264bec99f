//! The queen's configuration: settings gathered from flags, environment and an optional TOML
//! file, resolved into one validated [`QueenConfig`]. Every default is written here, once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The queen's port unless told otherwise.
pub const DEFAULT_PORT: u16 = 7833;
/// The queen listens on loopback unless told otherwise.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The heartbeat interval the queen expects from hives and workers.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a cold start may take, from asking a hive to a ready worker.
pub const DEFAULT_SPAWN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long shutdown lets running jobs finish before it ends them with `shutting_down`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// `infer` jobs that may wait for a busy model, per model; one more is refused at once.
pub const DEFAULT_QUEUE_LEN: usize = 64;
/// How long an `infer` job may wait for a busy model before it is refused.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(120);
/// Jobs the queen holds at most, running and recently finished together.
pub const DEFAULT_MAX_JOBS: usize = 4096;
/// How long a worker's stream may go without an event before the queen asks the worker
/// whether it still answers (see [`QueenConfig::worker_stall_timeout`]). A generating worker
/// sends a token every few tens of milliseconds; a silence this long is either a long wait
/// (a prompt's prefill, a place in the worker's own line), which the worker's answer to the
/// check vouches for, or a hung process. Long enough that a busy queen or worker is never
/// asked needlessly, short enough that a client of a hung worker hears about it well before
/// it would give up by itself.
pub const DEFAULT_WORKER_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the queen needs, validated. Build it with [`QueenConfig::resolve`] (or
/// [`Default`] for a loopback queen with no credentials, as tests use).
#[derive(Clone)]
pub struct QueenConfig {
    /// Where the binary binds; [`serve`](crate::serve) itself takes a bound listener.
    pub listen: SocketAddr,
    /// The interval hives and workers send heartbeats at. A component silent for 3 intervals
    /// is stale (not scheduled on); after 10 it is forgotten.
    pub heartbeat_interval: Duration,
    /// Upper bound on a cold start: asking a hive for a worker until the worker is ready.
    pub spawn_timeout: Duration,
    /// How long shutdown lets running jobs finish before it ends them with `shutting_down`.
    pub shutdown_grace: Duration,
    /// Jobs that may wait for a busy model, per model.
    pub queue_len: usize,
    /// How long a job may wait for a busy model.
    pub queue_timeout: Duration,
    /// Jobs the queen's job registry holds at most (running and retained).
    pub max_jobs: usize,
    /// A worker's inference stream silent (no event) for this long has the worker checked:
    /// `GET /health`, answered within the same time (at most 5 s). A worker that answers is
    /// busy (a long prefill, a wait in its own line) and the stream goes on; one that does not
    /// is hung: the stream ends (`worker_lost`, or another worker before the first token) and
    /// the worker is not scheduled on until its next heartbeat.
    pub worker_stall_timeout: Duration,
    /// The cluster's shared secret: required on heartbeats, sent to hives and workers.
    pub cluster_token: Option<String>,
    /// Keys accepted from clients on the job API and the lists; none means open (loopback).
    pub api_keys: Vec<String>,
    /// Keys that may also administer the cluster: shutdown and the worker and model operations
    /// that change a hive. They are accepted wherever an API key is. With none, API keys
    /// administer the cluster too.
    pub admin_keys: Vec<String>,
}

impl Default for QueenConfig {
    fn default() -> Self {
        QueenConfig {
            listen: SocketAddr::new(DEFAULT_BIND, DEFAULT_PORT),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            spawn_timeout: DEFAULT_SPAWN_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            queue_len: DEFAULT_QUEUE_LEN,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            max_jobs: DEFAULT_MAX_JOBS,
            worker_stall_timeout: DEFAULT_WORKER_STALL_TIMEOUT,
            cluster_token: None,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
        }
    }
}

impl std::fmt::Debug for QueenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are reported by presence only.
        f.debug_struct("QueenConfig")
            .field("listen", &self.listen)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("spawn_timeout", &self.spawn_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("queue_len", &self.queue_len)
            .field("queue_timeout", &self.queue_timeout)
            .field("max_jobs", &self.max_jobs)
            .field("worker_stall_timeout", &self.worker_stall_timeout)
            .field("cluster_token", &self.cluster_token.is_some())
            .field("api_keys", &self.api_keys.len())
            .field("admin_keys", &self.admin_keys.len())
            .finish()
    }
}

/// The queen's credentials, read from the environment only (`RBEE_CLUSTER_TOKEN`,
/// `RBEE_API_KEYS`, `RBEE_ADMIN_KEYS`): never from the config file, which may be
/// world-readable, nor from flags, which any local user sees in the process list.
#[derive(Clone, Default)]
pub struct QueenSecrets {
    pub cluster_token: Option<String>,
    pub api_keys: Vec<String>,
    pub admin_keys: Vec<String>,
}

impl std::fmt::Debug for QueenSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueenSecrets")
            .field("cluster_token", &self.cluster_token.is_some())
            .field("api_keys", &self.api_keys.len())
            .field("admin_keys", &self.admin_keys.len())
            .finish()
    }
}

/// The settings one source gives (the command line with its environment, or the config
/// file). Unset fields fall through to the next source, then to the defaults above.
///
/// Secrets are not settings: they are [`QueenSecrets`], from the environment only.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueenSettings {
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    #[serde(default, deserialize_with = "duration_text")]
    pub heartbeat_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration_text")]
    pub spawn_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_text")]
    pub shutdown_grace: Option<Duration>,
    pub queue_len: Option<usize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub queue_timeout: Option<Duration>,
    pub max_jobs: Option<usize>,
    #[serde(default, deserialize_with = "duration_text")]
    pub worker_stall_timeout: Option<Duration>,
}

impl QueenSettings {
    /// Reads a TOML config file, e.g. `heartbeat_interval = "2s"`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_toml(&text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: err.to_string(),
        })
    }

    /// These settings, with the unset ones taken from `fallback`.
    pub fn or(self, fallback: QueenSettings) -> QueenSettings {
        QueenSettings {
            port: self.port.or(fallback.port),
            bind: self.bind.or(fallback.bind),
            heartbeat_interval: self.heartbeat_interval.or(fallback.heartbeat_interval),
            spawn_timeout: self.spawn_timeout.or(fallback.spawn_timeout),
            shutdown_grace: self.shutdown_grace.or(fallback.shutdown_grace),
            queue_len: self.queue_len.or(fallback.queue_len),
            queue_timeout: self.queue_timeout.or(fallback.queue_timeout),
            max_jobs: self.max_jobs.or(fallback.max_jobs),
            worker_stall_timeout: self.worker_stall_timeout.or(fallback.worker_stall_timeout),
        }
    }
}

impl QueenConfig {
    /// Applies the defaults to `settings` and checks the result. A bind address other than
    /// loopback needs the cluster token and client keys (API or admin keys): without them
    /// heartbeats or the job API would be open to the network.
    pub fn resolve(
        settings: QueenSettings,
        secrets: QueenSecrets,
    ) -> Result<QueenConfig, ConfigError> {
        let cluster_token = secrets.cluster_token.filter(|t| !t.is_empty());
        let api_keys = drop_blank(secrets.api_keys);
        let admin_keys = drop_blank(secrets.admin_keys);
        let listen = SocketAddr::new(
            settings.bind.unwrap_or(DEFAULT_BIND),
            settings.port.unwrap_or(DEFAULT_PORT),
        );
        if !listen.ip().is_loopback() {
            if cluster_token.is_none() {
                return Err(ConfigError::OpenBind {
                    addr: listen.ip(),
                    missing: "RBEE_CLUSTER_TOKEN",
                });
            }
            if api_keys.is_empty() && admin_keys.is_empty() {
                return Err(ConfigError::OpenBind {
                    addr: listen.ip(),
                    missing: "RBEE_API_KEYS",
                });
            }
        }
        let queue_timeout = settings.queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT);
        if queue_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "queue_timeout must be longer than 0".into(),
            ));
        }
        let max_jobs = settings.max_jobs.unwrap_or(DEFAULT_MAX_JOBS);
        if max_jobs == 0 {
            return Err(ConfigError::Invalid("max_jobs must be at least 1".into()));
        }
        let worker_stall_timeout = settings
            .worker_stall_timeout
            .unwrap_or(DEFAULT_WORKER_STALL_TIMEOUT);
        if worker_stall_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "worker_stall_timeout must be longer than 0".into(),
            ));
        }
        Ok(QueenConfig {
            listen,
            heartbeat_interval: settings
                .heartbeat_interval
                .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL),
            spawn_timeout: settings.spawn_timeout.unwrap_or(DEFAULT_SPAWN_TIMEOUT),
            shutdown_grace: settings.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            queue_len: settings.queue_len.unwrap_or(DEFAULT_QUEUE_LEN),
            queue_timeout,
            max_jobs,
            worker_stall_timeout,
            cluster_token,
            api_keys,
            admin_keys,
        })
    }
}

fn drop_blank(keys: Vec<String>) -> Vec<String> {
    keys.into_iter().filter(|k| !k.is_empty()).collect()
}

/// Splits `RBEE_API_KEYS` or `RBEE_ADMIN_KEYS` (`key1,key2`) into keys, dropping blanks.
pub fn parse_api_keys(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(String::from)
        .collect()
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("refusing to bind {addr} without {missing}: the routes would be open to the network")]
    OpenBind { addr: IpAddr, missing: &'static str },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

fn parse_toml(text: &str) -> Result<QueenSettings, toml::de::Error> {
    toml::from_str(text)
}

fn duration_text<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(de)?;
    daemon_kit::parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_fill_what_flags_leave_unset() {
        let file =
            parse_toml("port = 9000\nheartbeat_interval = \"250ms\"\nspawn_timeout = \"2m\"\n")
                .unwrap();
        let flags = QueenSettings {
            port: Some(7000),
            ..QueenSettings::default()
        };
        let config = QueenConfig::resolve(flags.or(file), QueenSecrets::default()).unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(config.spawn_timeout, Duration::from_secs(120));
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(config.queue_len, DEFAULT_QUEUE_LEN);
        assert_eq!(config.max_jobs, DEFAULT_MAX_JOBS);
    }

    #[test]
    fn queue_settings_come_from_the_file_and_are_checked() {
        let file = parse_toml("queue_len = 3\nqueue_timeout = \"750ms\"\nmax_jobs = 10\n").unwrap();
        let config = QueenConfig::resolve(file, QueenSecrets::default()).unwrap();
        assert_eq!(config.worker_stall_timeout, DEFAULT_WORKER_STALL_TIMEOUT);
        assert_eq!(config.queue_len, 3);
        assert_eq!(config.queue_timeout, Duration::from_millis(750));
        assert_eq!(config.max_jobs, 10);

        let zero_wait = QueenSettings {
            queue_timeout: Some(Duration::ZERO),
            ..QueenSettings::default()
        };
        let stall = parse_toml("worker_stall_timeout = \"2s\"").unwrap();
        let config = QueenConfig::resolve(stall, QueenSecrets::default()).unwrap();
        assert_eq!(config.worker_stall_timeout, Duration::from_secs(2));
        let zero_stall = QueenSettings {
            worker_stall_timeout: Some(Duration::ZERO),
            ..QueenSettings::default()
        };
        for bad in [zero_wait, zero_stall, parse_toml("max_jobs = 0").unwrap()] {
            let err = QueenConfig::resolve(bad.clone(), QueenSecrets::default()).unwrap_err();
            assert!(
                err.to_string().contains("invalid setting"),
                "{bad:?}: {err}"
            );
        }
        assert!(parse_toml("queue_len = -1").is_err());
        assert!(parse_toml("queue_timeout = \"0s\"").is_err());
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(parse_toml("heartbeat_interval = \"fast\"").is_err());
        assert!(parse_toml("prot = 1").is_err());
        assert!(parse_toml("port = \"x\"").is_err());
    }

    fn secrets(token: Option<&str>, api: &[&str], admin: &[&str]) -> QueenSecrets {
        let keys = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect();
        QueenSecrets {
            cluster_token: token.map(String::from),
            api_keys: keys(api),
            admin_keys: keys(admin),
        }
    }

    #[test]
    fn a_network_bind_needs_both_secrets() {
        let open = QueenSettings {
            bind: Some("0.0.0.0".parse().unwrap()),
            ..QueenSettings::default()
        };
        let err = QueenConfig::resolve(open.clone(), secrets(None, &["k"], &[])).unwrap_err();
        assert!(err.to_string().contains("RBEE_CLUSTER_TOKEN"), "{err}");
        let err = QueenConfig::resolve(open.clone(), secrets(Some("t"), &[""], &[""])).unwrap_err();
        assert!(err.to_string().contains("RBEE_API_KEYS"), "{err}");
        assert!(QueenConfig::resolve(open.clone(), secrets(Some("t"), &["k"], &[])).is_ok());
        // Admin keys alone guard the client routes too.
        assert!(QueenConfig::resolve(open, secrets(Some("t"), &[], &["a"])).is_ok());
    }

    #[test]
    fn blank_keys_are_dropped() {
        let config = QueenConfig::resolve(
            QueenSettings::default(),
            secrets(None, &["k", ""], &["", "a"]),
        )
        .unwrap();
        assert_eq!(config.api_keys, vec!["k"]);
        assert_eq!(config.admin_keys, vec!["a"]);
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("\"a\"") && !shown.contains("\"k\""),
            "{shown}"
        );
    }

    #[test]
    fn api_keys_are_comma_separated() {
        assert_eq!(parse_api_keys(" a, b,,c "), vec!["a", "b", "c"]);
        assert!(parse_api_keys("").is_empty());
    }
}
