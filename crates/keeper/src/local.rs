//! Local daemons the keeper starts: detached processes with a log and a pid file in the
//! state directory, kept running after the keeper exits.
//!
//! A pid file is trusted only while `/proc` shows a live process running the expected
//! binary; otherwise it is stale and removed. The keeper never signals a process by pid: it
//! stops daemons through their `/v1/shutdown` routes, so a recycled pid can never be hit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::KeeperError;
use crate::queen_api::probe_health;

/// Lines of a daemon's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 10;
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    Queen,
    Hive,
}

impl DaemonKind {
    /// The file stem in the state directory and the word in messages.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Queen => "queen",
            DaemonKind::Hive => "hive",
        }
    }

    pub fn binary(self) -> &'static str {
        match self {
            DaemonKind::Queen => "queen-rbee",
            DaemonKind::Hive => "rbee-hive",
        }
    }
}

/// A daemon recorded in the state directory whose process is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub pid: u32,
    /// Its base URL, e.g. `http://127.0.0.1:7835`.
    pub url: String,
}

/// `$XDG_STATE_HOME/rbee`: `<name>.log`, `<name>.pid` and `<name>.url` per local daemon.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    pub fn log_path(&self, kind: DaemonKind) -> PathBuf {
        self.dir.join(format!("{}.log", kind.name()))
    }

    pub fn pid_path(&self, kind: DaemonKind) -> PathBuf {
        self.dir.join(format!("{}.pid", kind.name()))
    }

    fn url_path(&self, kind: DaemonKind) -> PathBuf {
        self.dir.join(format!("{}.url", kind.name()))
    }

    /// The daemon of this kind the keeper started, if it still runs. Stale files are removed.
    pub fn running(&self, kind: DaemonKind) -> Option<Recorded> {
        let pid = std::fs::read_to_string(self.pid_path(kind))
            .ok()?
            .trim()
            .parse::<u32>()
            .ok();
        let url = std::fs::read_to_string(self.url_path(kind))
            .ok()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty());
        match (pid, url) {
            (Some(pid), Some(url)) if process_running(pid, kind.binary()) => {
                Some(Recorded { pid, url })
            }
            _ => {
                self.forget(kind);
                None
            }
        }
    }

    fn record(&self, kind: DaemonKind, pid: u32, url: &str) -> Result<(), KeeperError> {
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text)
                .map_err(|e| KeeperError::io(format!("cannot write {}", path.display()), e))
        };
        write(self.url_path(kind), format!("{url}\n"))?;
        write(self.pid_path(kind), format!("{pid}\n"))
    }

    /// Removes the daemon's pid and url files (its log stays).
    pub fn forget(&self, kind: DaemonKind) {
        let _ = std::fs::remove_file(self.pid_path(kind));
        let _ = std::fs::remove_file(self.url_path(kind));
    }
}

/// Whether `pid` is a live (not zombie) process whose executable is named `binary`.
pub fn process_running(pid: u32, binary: &str) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // `pid (comm) S …`: comm may hold spaces and parentheses, the state follows the last `)`.
    let state = stat
        .rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().next());
    if matches!(state, Some("Z" | "X" | "x") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    Path::new(&*String::from_utf8_lossy(argv0))
        .file_name()
        .is_some_and(|name| name == binary)
}

/// Waits until `pid` no longer runs `binary`; false if it still does after `timeout`.
pub async fn wait_gone(pid: u32, binary: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_running(pid, binary) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
    true
}

/// The binary beside the keeper's own executable, else the bare name for a `PATH` lookup.
pub fn daemon_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, KeeperError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| KeeperError::io("cannot find a free port on 127.0.0.1", e))
}

pub fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// This machine's name, the default hive id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A daemon the keeper just started and saw healthy.
#[derive(Debug, Clone)]
pub struct Launched {
    pub pid: u32,
    pub url: String,
    pub log: PathBuf,
}

/// Starts `kind` detached (own process group, stdin closed, output appended to its log),
/// waits until `{url}/health` answers, and records its pid and URL.
///
/// A daemon that exits or stays silent for `timeout` is an error quoting its log's last
/// lines; one that stays silent is killed first so that no half-started daemon lingers.
pub async fn launch(
    state: &StateDir,
    kind: DaemonKind,
    args: &[String],
    url: &str,
    timeout: Duration,
) -> Result<Launched, KeeperError> {
    std::fs::create_dir_all(&state.dir)
        .map_err(|e| KeeperError::io(format!("cannot create {}", state.dir.display()), e))?;
    let log_path = state.log_path(kind);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| KeeperError::io(format!("cannot open {}", log_path.display()), e))?;
    let start_offset = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let binary = daemon_binary(kind.binary());
    let _ = writeln!(
        log,
        "--- rbee-keeper starts {} {}",
        binary.display(),
        args.join(" ")
    );
    let log_err = log
        .try_clone()
        .map_err(|e| KeeperError::io(format!("cannot open {}", log_path.display()), e))?;

    let child = Command::new(&binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C meant for the keeper must not reach the daemon.
        .process_group(0)
        .spawn()
        .map_err(|e| KeeperError::DaemonStart {
            name: kind.binary(),
            reason: format!("cannot run {}: {e}", binary.display()),
            tail: String::new(),
        })?;
    // Until it is healthy and recorded, the daemon is the keeper's to clean up: an error, a
    // timeout or a Ctrl-C that drops this future must not leave an unrecorded daemon behind.
    let mut starting = Starting(Some(child));

    let http = reqwest::Client::new();
    let health = format!("{url}/health");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = starting.exited() {
            return Err(KeeperError::DaemonStart {
                name: kind.binary(),
                reason: format!("it exited ({status})"),
                tail: log_tail(&log_path, start_offset),
            });
        }
        if probe_health(&http, &health).await.is_ok() {
            let pid = starting.pid();
            state.record(kind, pid, url)?;
            starting.release();
            return Ok(Launched {
                pid,
                url: url.to_owned(),
                log: log_path,
            });
        }
        if Instant::now() >= deadline {
            drop(starting);
            return Err(KeeperError::DaemonStart {
                name: kind.binary(),
                reason: format!("{health} did not answer within {timeout:?}"),
                tail: log_tail(&log_path, start_offset),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A daemon process that is not running on its own yet: killed and reaped on drop unless
/// [`release`](Self::release)d.
struct Starting(Option<std::process::Child>);

impl Starting {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut()?.try_wait().ok().flatten()
    }

    /// Leaves the daemon running after the keeper exits.
    fn release(&mut self) {
        self.0 = None;
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last lines written to `path` after `offset`.
fn log_tail(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_made_up_one_does_not() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert!(process_running(me, name));
        assert!(!process_running(me, "queen-rbee"));
        assert!(!process_running(u32::MAX - 1, name));
    }

    #[test]
    fn stale_pid_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        // This test process is alive but is not a queen: the record is stale.
        state
            .record(DaemonKind::Queen, std::process::id(), "http://127.0.0.1:1")
            .unwrap();
        assert!(state.pid_path(DaemonKind::Queen).exists());
        assert_eq!(state.running(DaemonKind::Queen), None);
        assert!(!state.pid_path(DaemonKind::Queen).exists());
    }

    #[tokio::test]
    async fn a_daemon_that_cannot_start_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        // The test executable lives in target/*/deps, where no rbee-hive is: either the
        // spawn fails or (with one on PATH) the bogus flag makes it exit. Both name it.
        let result = launch(
            &state,
            DaemonKind::Hive,
            &["--definitely-not-a-flag".into()],
            "http://127.0.0.1:1",
            Duration::from_secs(5),
        )
        .await;
        let err = result.unwrap_err();
        assert!(err.to_string().contains("rbee-hive"), "{err}");
        assert_eq!(state.running(DaemonKind::Hive), None);
    }

    #[test]
    fn log_tails_are_bounded_and_start_at_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "old\n").unwrap();
        let mut text = String::from("old\n");
        for i in 0..20 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&path, &text).unwrap();
        let tail = log_tail(&path, 4);
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES);
        assert!(tail.ends_with("line 19"));
        assert!(!tail.contains("old"));
    }
}
