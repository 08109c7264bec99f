use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The workspace's `target/<profile>` directory, where cargo put the test executable.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of one of rbee's binaries. The first call in a test process builds every binary of the
/// workspace with the command `cargo xtask test` builds them with (`cargo build --workspace
/// --bins --tests`), so `cargo test` alone always runs the current code, and under `cargo xtask
/// test` the build finds everything up to date: one feature set, each crate compiled once.
/// (Building one package alone, or the binaries without `--tests`, would resolve the
/// dependencies' features differently and compile them again.)
pub fn bin_path(name: &str) -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*built {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile = target_dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--quiet", "--workspace", "--bins", "--tests"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile.as_deref() == Some("release") {
            command.arg("--release");
        }
        match command.status() {
            Ok(status) if status.success() => *built = true,
            Ok(status) => panic!("cargo build --workspace --bins --tests failed: {status}"),
            Err(err) => panic!("cannot run cargo: {err}"),
        }
    }
    let path = target_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A running daemon, killed on drop. Its stderr goes to a log file that tests can read.
pub struct Daemon {
    child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `bin` with `args`, its output in a log file under the system temp dir.
    pub fn start(
        bin: &str,
        args: &[String],
        envs: &[(&str, &str)],
        url: String,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_through(bin, &[], args, envs, url)
    }

    /// [`start`](Self::start) through a launcher that execs the daemon in place, keeping its
    /// pid: `launcher` followed by the binary's path, then `args` (e.g. `ip netns exec NS`).
    pub fn start_through(
        bin: &str,
        launcher: &[&str],
        args: &[String],
        envs: &[(&str, &str)],
        url: String,
    ) -> anyhow::Result<Daemon> {
        let log = std::env::temp_dir().join(format!(
            "rbee-test-{bin}-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut command = match launcher.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(bin_path(bin));
                command
            }
            None => Command::new(bin_path(bin)),
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        command.env_remove("RBEE_CLUSTER_TOKEN");
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command.spawn().with_context(|| format!("spawn {bin}"))?;
        Ok(Daemon { child, url, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `GET {url}{path}` until it answers 2xx.
    pub async fn wait_for(
        &mut self,
        path: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before {path} answered; log:\n{}",
                    self.url,
                    self.log_text()
                );
            }
            let mut request = client.get(format!("{}{path}", self.url));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Ok(response) = request.send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}{path} did not answer within {timeout:?}; log:\n{}",
                    self.url,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A `queen-rbee` on `port` of loopback with `args` and `env`, answering `/health`.
    pub async fn queen_on(port: u16, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut all = vec!["--port".to_string(), port.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let mut queen = Daemon::start("queen-rbee", &all, env, format!("http://127.0.0.1:{port}"))
            .expect("start queen-rbee");
        queen
            .wait_for("/health", None, Duration::from_secs(30))
            .await
            .expect("the queen answers /health");
        queen
    }

    /// An `llm-worker-rbee` serving `model` on a free loopback port with two threads, the
    /// cluster token `token` and the extra `args`, not yet waited for.
    pub fn worker(model: &Path, token: &str, args: &[&str]) -> Daemon {
        Daemon::worker_as(model, "w-test", 2, token, args)
    }

    /// [`Daemon::worker`] as `worker_id`, with `threads` threads.
    pub fn worker_as(
        model: &Path,
        worker_id: &str,
        threads: usize,
        token: &str,
        args: &[&str],
    ) -> Daemon {
        let port = free_port();
        let mut all: Vec<String> = vec![
            "--model".into(),
            model.display().to_string(),
            "--port".into(),
            port.to_string(),
            "--worker-id".into(),
            worker_id.into(),
            "--threads".into(),
            threads.to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        Daemon::start(
            "llm-worker-rbee",
            &all,
            &[("RBEE_CLUSTER_TOKEN", token)],
            format!("http://127.0.0.1:{port}"),
        )
        .expect("start llm-worker-rbee")
    }

    /// [`Daemon::worker`], once its model is loaded (`/v1/ready`).
    /// A worker's `GET /v1/info`, with the cluster `token`.
    pub async fn worker_info(&self, token: &str) -> rbee_contract::WorkerInfo {
        reqwest::Client::new()
            .get(format!("{}/v1/info", self.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /v1/info")
            .json()
            .await
            .expect("a WorkerInfo")
    }

    pub async fn ready_worker(model: &Path, token: &str, args: &[&str]) -> Daemon {
        let mut worker = Daemon::worker(model, token, args);
        worker
            .wait_for("/v1/ready", Some(token), Duration::from_secs(60))
            .await
            .expect("the worker becomes ready");
        worker
    }

    /// [`Daemon::queen_on`] a free port.
    pub async fn queen(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::queen_on(free_port(), args, env).await
    }

    /// Sends a signal (e.g. `"TERM"`, `"INT"`, `"KILL"`) with the system's `kill`.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} failed");
        Ok(())
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!(
                    "process did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A failing test keeps the daemon's log for whoever investigates; a passing one
        // leaves nothing behind.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
