//! The workers this hive spawned: a registry of children, one supervising task per child that
//! owns its process handle, and stopping them.
//!
//! A child is in the registry exactly as long as its process has not been reaped: the
//! supervisor removes it the moment `wait` returns, whether the worker was asked to stop or
//! died on its own, so a dead worker is never listed or reported.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rbee_contract::{WorkerInfo, WorkerState};
use tokio::process::Child;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{HiveConfig, PortRange};
use crate::logs;
use crate::process::{self, WorkerArgs};

/// How long one `/v1/info` poll of a worker may take.
const INFO_TIMEOUT: Duration = Duration::from_secs(1);

/// How a worker process ended.
#[derive(Debug, Clone)]
pub(crate) struct Exit {
    /// e.g. `exit status: 1` or `signal: 9 (SIGKILL)`.
    pub status: String,
    /// The hive asked it to stop (delete, shutdown, an abandoned spawn).
    pub requested: bool,
}

/// What a spawn asks for: the validated `worker_spawn`.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub model_path: PathBuf,
    pub model_ref: String,
    pub device: String,
}

/// A worker process that was started and is being supervised.
#[derive(Debug, Clone)]
pub(crate) struct Launched {
    pub worker_id: String,
    pub port: u16,
    /// Where the hive itself reaches the worker.
    pub local_url: String,
    pub log: PathBuf,
    pub exit: watch::Receiver<Option<Exit>>,
    pub stop: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LaunchError {
    #[error("the hive is shutting down")]
    ShuttingDown,
    #[error("no free port in the worker port range {0}")]
    NoFreePort(PortRange),
    #[error("cannot create the worker log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) struct Children {
    config: Arc<HiveConfig>,
    /// The address workers bind: the hive's own.
    bind: IpAddr,
    state: Mutex<State>,
    /// Signalled whenever the set of workers changes, so a heartbeat goes out at once.
    changed: Notify,
    supervisors: TaskTracker,
    http: reqwest::Client,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<u64, Entry>,
    next_index: u64,
    /// Where the next port search starts, so a port just given up is not handed out again at
    /// once.
    port_cursor: usize,
    /// Set by shutdown: no child may be added after every child was told to stop.
    closed: bool,
}

struct Entry {
    worker_id: String,
    port: u16,
    local_url: String,
    info: WorkerInfo,
    stop: CancellationToken,
    exit: watch::Receiver<Option<Exit>>,
}

impl Children {
    pub fn new(config: Arc<HiveConfig>, bind: IpAddr, http: reqwest::Client) -> Self {
        Children {
            config,
            bind,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            supervisors: TaskTracker::new(),
            http,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves when the set of workers changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Reserves the next worker id: `<hive_id>-<run>-w<N>`, where `<run>` is drawn at random
    /// once per hive process. The hive recognises its new worker by the id it answers with on
    /// its port, so ids must not repeat across hive restarts or between two hives that share
    /// an id and a port range on one machine.
    pub fn next_worker_id(&self) -> (u64, String) {
        let mut state = self.state();
        state.next_index += 1;
        let index = state.next_index;
        (
            index,
            format!("{}-{}-w{index}", self.config.hive_id, run_tag()),
        )
    }

    /// Starts a worker process on a free port of the range (none of `avoid`) and a task that
    /// supervises it until it exits.
    pub fn launch(
        self: &Arc<Self>,
        index: u64,
        worker_id: &str,
        spec: &SpawnSpec,
        avoid: &[u16],
    ) -> Result<Launched, LaunchError> {
        // Everything below happens under the lock, so that shutdown (which closes the registry
        // under the same lock) either sees this child or prevents it.
        let mut state = self.state();
        if state.closed {
            return Err(LaunchError::ShuttingDown);
        }
        let port = self.pick_port(&mut state, avoid)?;
        let log = logs::log_path(&self.config.log_dir, worker_id);
        let log_file = process::open_log(&log).map_err(|source| LaunchError::Log {
            path: log.clone(),
            source,
        })?;
        let advertise_url =
            process::worker_advertise_url(self.config.advertise_url.as_deref(), port);
        let args = WorkerArgs {
            worker_id: worker_id.to_owned(),
            model_path: spec.model_path.clone(),
            model_ref: spec.model_ref.clone(),
            device: spec.device.clone(),
            bind: self.bind,
            port,
            advertise_url: advertise_url.clone(),
        };
        let child = process::command(&self.config, &args, log_file)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                binary: self.config.worker_binary.clone(),
                source,
            })?;
        let pid = child.id();
        let local_url = format!(
            "http://{}",
            SocketAddr::new(process::local_host(self.bind), port)
        );
        let info = WorkerInfo {
            worker_id: worker_id.to_owned(),
            url: advertise_url
                .unwrap_or_else(|| format!("http://{}", SocketAddr::new(self.bind, port))),
            model: spec.model_ref.clone(),
            device: spec.device.clone(),
            state: WorkerState::Loading,
            slots_total: 0,
            slots_free: 0,
            hive_id: Some(self.config.hive_id.clone()),
            context_length: None,
        };
        let stop = CancellationToken::new();
        let (exit_tx, exit) = watch::channel(None);
        state.workers.insert(
            index,
            Entry {
                worker_id: worker_id.to_owned(),
                port,
                local_url: local_url.clone(),
                info,
                stop: stop.clone(),
                exit: exit.clone(),
            },
        );
        tracing::info!(worker_id, pid, port, log = %log.display(), model = %spec.model_path.display(), "worker started");
        self.supervisors.spawn(supervise(
            Arc::clone(self),
            index,
            worker_id.to_owned(),
            child,
            stop.clone(),
            exit_tx,
            log.clone(),
        ));
        drop(state);
        self.changed.notify_one();
        Ok(Launched {
            worker_id: worker_id.to_owned(),
            port,
            local_url,
            log,
            exit,
            stop,
        })
    }

    fn pick_port(&self, state: &mut State, avoid: &[u16]) -> Result<u16, LaunchError> {
        let range = self.config.worker_ports;
        for step in 0..range.count() {
            let port = range.nth_wrapping(state.port_cursor + step);
            let taken = avoid.contains(&port) || state.workers.values().any(|w| w.port == port);
            if !taken && process::port_is_free(self.bind, port) {
                state.port_cursor = state.port_cursor + step + 1;
                return Ok(port);
            }
        }
        Err(LaunchError::NoFreePort(range))
    }

    fn remove(&self, index: u64) {
        self.state().workers.remove(&index);
        self.changed.notify_one();
    }

    /// The workers' last known infos, oldest first.
    pub fn list(&self) -> Vec<WorkerInfo> {
        self.state()
            .workers
            .values()
            .map(|w| w.info.clone())
            .collect()
    }

    pub fn get(&self, worker_id: &str) -> Option<WorkerInfo> {
        self.state()
            .workers
            .values()
            .find(|w| w.worker_id == worker_id)
            .map(|w| w.info.clone())
    }

    pub fn contains(&self, worker_id: &str) -> bool {
        self.get(worker_id).is_some()
    }

    /// Records what a worker said about itself, if it is still a child.
    pub fn set_info(&self, index: u64, info: WorkerInfo) {
        if let Some(entry) = self.state().workers.get_mut(&index) {
            entry.info = info;
        }
    }

    /// Asks every worker for its `/v1/info` (concurrently, each bounded) and records the
    /// answers; a worker that does not answer keeps its last known info.
    pub async fn refresh(&self) {
        let targets: Vec<(u64, String)> = self
            .state()
            .workers
            .iter()
            .map(|(index, w)| (*index, w.local_url.clone()))
            .collect();
        let polls = targets
            .into_iter()
            .map(|(index, url)| async move { (index, self.fetch_info(&url).await) });
        for (index, info) in futures::future::join_all(polls).await {
            match info {
                Ok(info) => self.set_info(index, info),
                Err(err) => tracing::debug!(index, error = %err, "worker info poll failed"),
            }
        }
    }

    /// `GET {local_url}/v1/info` with the cluster token.
    pub async fn fetch_info(&self, local_url: &str) -> reqwest::Result<WorkerInfo> {
        let mut request = self
            .http
            .get(format!("{local_url}/v1/info"))
            .timeout(INFO_TIMEOUT);
        if let Some(token) = &self.config.cluster_token {
            request = request.bearer_auth(token);
        }
        request.send().await?.error_for_status()?.json().await
    }

    /// Tells a worker to stop (SIGTERM, SIGKILL after the grace) and returns a watch on its
    /// exit; `None` if no such child exists.
    pub fn stop(&self, worker_id: &str) -> Option<watch::Receiver<Option<Exit>>> {
        let state = self.state();
        let entry = state.workers.values().find(|w| w.worker_id == worker_id)?;
        entry.stop.cancel();
        Some(entry.exit.clone())
    }

    /// Refuses new children, tells every child to stop and waits until all are reaped (bounded
    /// by the stop grace plus a margin for SIGKILL).
    pub async fn stop_all(&self) {
        let count = {
            let mut state = self.state();
            state.closed = true;
            for entry in state.workers.values() {
                entry.stop.cancel();
            }
            state.workers.len()
        };
        if count > 0 {
            tracing::info!(count, "stopping every worker");
        }
        self.supervisors.close();
        let limit = self.config.stop_grace + Duration::from_secs(5);
        if tokio::time::timeout(limit, self.supervisors.wait())
            .await
            .is_err()
        {
            tracing::error!(
                ?limit,
                "workers still running after SIGKILL; giving up on them"
            );
        }
    }
}

/// Waits for the exit a watch announces. A supervisor that vanished without saying (it cannot,
/// short of a panic) is reported as an unknown exit rather than waited for forever.
pub(crate) async fn wait_exit(exit: &mut watch::Receiver<Option<Exit>>) -> Exit {
    match exit.wait_for(Option::is_some).await {
        Ok(done) => done.clone().unwrap_or_else(unknown_exit),
        Err(_) => unknown_exit(),
    }
}

fn unknown_exit() -> Exit {
    Exit {
        status: "unknown exit status".into(),
        requested: false,
    }
}

/// Owns one child until it is reaped: it waits for the exit and carries out a stop request.
async fn supervise(
    children: Arc<Children>,
    index: u64,
    worker_id: String,
    mut child: Child,
    stop: CancellationToken,
    exit_tx: watch::Sender<Option<Exit>>,
    log: PathBuf,
) {
    let grace = children.config.stop_grace;
    let (status, requested) = tokio::select! {
        status = child.wait() => (status, stop.is_cancelled()),
        () = stop.cancelled() => (process::terminate(&mut child, &worker_id, grace).await, true),
    };
    children.remove(index);
    let status = match status {
        Ok(status) => status.to_string(),
        Err(err) => format!("unknown exit status ({err})"),
    };
    if requested {
        tracing::info!(worker_id, %status, "worker stopped");
    } else {
        let report = logs::with_tail(format!("worker exited on its own ({status})"), &log).await;
        tracing::warn!(worker_id, %status, "{report}");
    }
    let _ = exit_tx.send(Some(Exit { status, requested }));
}

/// Four hex digits that differ from one hive process to the next.
fn run_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        format!("{:04x}", hasher.finish() & 0xffff)
    })
}
