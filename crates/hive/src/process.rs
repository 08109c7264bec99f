//! One worker process: its command line, and stopping it by its own handle.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::config::HiveConfig;

/// Variables of the worker's own flags. The hive passes each of them explicitly, so a value the
/// hive inherited (e.g. its own `RBEE_PORT` or `RBEE_ADVERTISE_URL`) must not leak into a worker.
const WORKER_FLAG_VARS: &[&str] = &[
    "RBEE_MODEL",
    "RBEE_MODEL_REF",
    "RBEE_WORKER_ID",
    "RBEE_DEVICE",
    "RBEE_PORT",
    "RBEE_BIND",
    "RBEE_ADVERTISE_URL",
    "RBEE_QUEEN_URL",
    "RBEE_HEARTBEAT_INTERVAL",
    "RBEE_HIVE_ID",
    "RBEE_HIVE_PID",
    "RBEE_SHUTDOWN_GRACE",
    "RBEE_SLOTS",
    "RBEE_CTX_SIZE",
    "RBEE_PROMPT_CACHE_MIB",
    "RBEE_CLUSTER_TOKEN",
];

/// The part of the hive's stop grace a worker keeps for itself after its drain deadline: the
/// streams it cuts then must still get their `shutting_down` error out before SIGKILL.
const STOP_MARGIN_MAX: Duration = Duration::from_secs(3);

/// What one worker is started with.
#[derive(Debug, Clone)]
pub(crate) struct WorkerArgs {
    pub worker_id: String,
    /// The model file or directory, absolute.
    pub model_path: PathBuf,
    /// The model reference as the request gave it, reported by the worker.
    pub model_ref: String,
    pub device: String,
    pub bind: IpAddr,
    pub port: u16,
    pub advertise_url: Option<String>,
}

/// The worker's command: an argument vector, never a shell line, with stdout and stderr in
/// `log` and stdin closed. The child is killed if its handle is ever dropped without being
/// reaped: a last resort, since the supervisor normally stops it with SIGTERM first.
pub(crate) fn command(config: &HiveConfig, args: &WorkerArgs, log: std::fs::File) -> Command {
    let mut command = Command::new(&config.worker_binary);
    command
        .arg("--model")
        .arg(&args.model_path)
        .args(["--model-ref", &args.model_ref])
        .args(["--worker-id", &args.worker_id])
        .args(["--port", &args.port.to_string()])
        .args(["--bind", &args.bind.to_string()])
        .args(["--device", &args.device])
        // Always given, so that what the capacity check counted is what the worker holds.
        .args(["--slots", &config.worker_slots.to_string()])
        // 0 is the model's trained context.
        .args([
            "--ctx-size",
            &config
                .worker_ctx_size
                .map_or(0, NonZeroU32::get)
                .to_string(),
        ])
        // Always given: the capacity check counted this store.
        .args([
            "--prompt-cache-mib",
            &config.worker_prompt_cache_mib.to_string(),
        ])
        .args(["--hive-id", &config.hive_id])
        .args([
            "--heartbeat-interval",
            &format!("{}ms", config.heartbeat_interval.as_millis().max(1)),
        ])
        .args([
            "--shutdown-grace",
            &format!("{}ms", worker_drain_grace(config.stop_grace).as_millis()),
        ])
        // The worker shuts itself down when its parent is no longer this process: a hive
        // killed with SIGKILL cannot stop its workers, so they notice on their own.
        .args(["--hive-pid", &std::process::id().to_string()]);
    if let Some(queen) = &config.queen_url {
        command.args(["--queen-url", queen]);
    }
    if let Some(url) = &args.advertise_url {
        command.args(["--advertise-url", url]);
    }
    for var in WORKER_FLAG_VARS {
        command.env_remove(var);
    }
    if let Some(token) = &config.cluster_token {
        command.env("RBEE_CLUSTER_TOKEN", token);
    }
    // Log files are read by people and quoted in error events: no colour codes.
    command.env("NO_COLOR", "1");
    let stderr = log.try_clone().map(Stdio::from).unwrap_or_else(|err| {
        tracing::warn!(error = %err, "cannot share the worker log between stdout and stderr");
        Stdio::null()
    });
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(stderr)
        .kill_on_drop(true);
    command
}

/// How long a worker may drain its generations when the hive stops it: the stop grace less a
/// margin (half of it, at most [`STOP_MARGIN_MAX`]) before the hive's SIGKILL.
pub(crate) fn worker_drain_grace(stop_grace: Duration) -> Duration {
    stop_grace - (stop_grace / 2).min(STOP_MARGIN_MAX)
}

/// Opens (truncating) the worker's log file. Blocking, but only a create.
pub(crate) fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

/// The address the hive itself uses to reach a worker bound to `bind`.
pub(crate) fn local_host(bind: IpAddr) -> IpAddr {
    match bind {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// The URL a worker on `port` advertises: the hive's advertised host with the worker's port,
/// or `None` to let the worker advertise its bind address.
pub(crate) fn worker_advertise_url(hive_advertise: Option<&str>, port: u16) -> Option<String> {
    let url = reqwest::Url::parse(hive_advertise?).ok()?;
    Some(format!("{}://{}:{port}", url.scheme(), url.host_str()?))
}

/// Whether `port` can be bound on `bind` right now. Another process may still take it before
/// the worker does; the spawn retries on another port when that happens.
pub(crate) fn port_is_free(bind: IpAddr, port: u16) -> bool {
    std::net::TcpListener::bind((bind, port)).is_ok()
}

/// Stops `child`: SIGTERM, then SIGKILL when it has not exited after `grace`.
///
/// The signal goes to `child.id()`, which is `Some` only while the process has not been
/// reaped. The caller owns the handle and nothing else waits on it, so the pid cannot have
/// been reused by an unrelated process: at worst it names our own zombie.
pub(crate) async fn terminate(
    child: &mut Child,
    worker_id: &str,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        match kill(Pid::from_raw(pid), Signal::SIGTERM) {
            Ok(()) => tracing::debug!(worker_id, pid, "sent SIGTERM"),
            // ESRCH: it is already gone; `wait` below collects its status.
            Err(err) => tracing::debug!(worker_id, pid, error = %err, "SIGTERM not delivered"),
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(worker_id, ?grace, "worker ignored SIGTERM; sending SIGKILL");
            child.kill().await?;
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_advertise_the_hives_host() {
        assert_eq!(
            worker_advertise_url(Some("http://gpu-box.lan:7835"), 9301).as_deref(),
            Some("http://gpu-box.lan:9301")
        );
        assert_eq!(
            worker_advertise_url(Some("https://[::1]:7835/"), 9302).as_deref(),
            Some("https://[::1]:9302")
        );
        assert_eq!(worker_advertise_url(None, 9301), None);
        assert_eq!(worker_advertise_url(Some("not a url"), 9301), None);
    }

    /// A worker of `/models/m.gguf` on the CPU, at port 9301.
    fn worker_args() -> WorkerArgs {
        WorkerArgs {
            worker_id: "h-w1".into(),
            model_path: "/models/m.gguf".into(),
            model_ref: "/models/m.gguf".into(),
            device: "cpu".into(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 9301,
            advertise_url: None,
        }
    }

    /// The value the hive gives a worker of `config` for `flag`, checking that the worker's own
    /// `env` variable, inherited from the hive, is removed so it cannot change it.
    fn worker_flag(config: &HiveConfig, flag: &str, env: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(&dir.path().join("w.log")).unwrap();
        let command = command(config, &worker_args(), log);
        assert!(
            command
                .as_std()
                .get_envs()
                .any(|(k, v)| k == env && v.is_none()),
            "an inherited {env} must not reach the worker"
        );
        let argv: Vec<String> = command
            .as_std()
            .get_args()
            .filter_map(|a| a.to_str().map(str::to_owned))
            .collect();
        let at = argv.iter().position(|a| a == flag).expect(flag);
        argv[at + 1].clone()
    }

    #[test]
    fn every_worker_is_given_the_hives_slots() {
        let mut config = HiveConfig::new("h");
        config.worker_slots = std::num::NonZeroU32::new(3).unwrap();
        assert_eq!(worker_flag(&config, "--slots", "RBEE_SLOTS"), "3");
    }

    #[test]
    fn every_worker_is_given_the_hives_context() {
        let ctx_size_of = |config: &HiveConfig| worker_flag(config, "--ctx-size", "RBEE_CTX_SIZE");
        let mut config = HiveConfig::new("h");
        assert_eq!(ctx_size_of(&config), "0", "0: the model's trained context");
        config.worker_ctx_size = NonZeroU32::new(16384);
        assert_eq!(ctx_size_of(&config), "16384");
    }

    #[test]
    fn every_worker_is_given_the_hives_prompt_cache_store() {
        let store_of = |config: &HiveConfig| {
            worker_flag(config, "--prompt-cache-mib", "RBEE_PROMPT_CACHE_MIB")
        };
        let mut config = HiveConfig::new("h");
        assert_eq!(store_of(&config), "256");
        config.worker_prompt_cache_mib = 0;
        assert_eq!(store_of(&config), "0");
    }

    #[test]
    fn workers_drain_within_the_stop_grace() {
        let secs = Duration::from_secs;
        assert_eq!(worker_drain_grace(secs(30)), secs(27));
        assert_eq!(worker_drain_grace(secs(2)), secs(1));
        assert_eq!(worker_drain_grace(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn unspecified_binds_are_reached_on_loopback() {
        assert_eq!(
            local_host("0.0.0.0".parse().unwrap()),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            local_host("10.0.0.5".parse().unwrap()).to_string(),
            "10.0.0.5"
        );
    }

    #[tokio::test]
    async fn terminate_stops_a_process_that_ignores_sigterm() {
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Give the shell time to install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = terminate(&mut child, "test", Duration::from_millis(300))
            .await
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
        assert_eq!(child.id(), None, "reaped");
    }

    #[tokio::test]
    async fn terminate_uses_sigterm_first() {
        let mut child = Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let status = terminate(&mut child, "test", Duration::from_secs(10))
            .await
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15), "{status}");
    }
}
