//! Helpers for testing `rbee-keeper`: an isolated environment (its own state and config
//! directories and queen port) in which the keeper starts real daemons, and a way to find,
//! check and finally kill every process that environment started.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::daemon::{bin_path, free_port};

/// What one `rbee-keeper` run printed and how it ended.
#[derive(Debug)]
pub struct KeeperOutput {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// One keeper user's world: `XDG_STATE_HOME` and `XDG_CONFIG_HOME` in a fresh temporary
/// directory and a queen URL on a free loopback port. Every daemon started in it inherits
/// that `XDG_STATE_HOME`, which is how [`daemons`](Self::daemons) finds them; dropping the
/// environment kills whatever still runs and removes the directory.
pub struct KeeperEnv {
    pub queen_url: String,
    /// The id of the local hive the keeper starts here (`RBEE_HIVE_ID`): unique, because a
    /// hive names its workers after itself and tests run side by side.
    pub hive_id: String,
    pub root: PathBuf,
    /// `$XDG_STATE_HOME/rbee`: the daemons' logs and pid files.
    pub state_dir: PathBuf,
    /// `$XDG_CONFIG_HOME/rbee`, where `config.toml` goes.
    pub config_dir: PathBuf,
    state_home: PathBuf,
    config_home: PathBuf,
    envs: Vec<(String, String)>,
}

impl KeeperEnv {
    /// A fresh environment; `envs` are set for every keeper run (and so reach its daemons).
    pub fn new(envs: &[(&str, &str)]) -> KeeperEnv {
        // A counter, not a free port: two environments made at once may be handed the same
        // port, and would then share a directory and kill each other's daemons on drop.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let unique = format!("{}-{n}", std::process::id());
        let root = std::env::temp_dir().join(format!("rbee-keeper-test-{unique}"));
        let state_home = root.join("state");
        let config_home = root.join("config");
        std::fs::create_dir_all(&state_home).expect("create the state home");
        std::fs::create_dir_all(&config_home).expect("create the config home");
        KeeperEnv {
            queen_url: format!("http://127.0.0.1:{}", free_port()),
            hive_id: format!("hive-{unique}"),
            state_dir: state_home.join("rbee"),
            config_dir: config_home.join("rbee"),
            root,
            state_home,
            config_home,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// `rbee-keeper --queen-url <this env's queen> <args>` (unless `args` name another
    /// queen), isolated, output piped.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(bin_path("rbee-keeper"));
        if !args.contains(&"--queen-url") {
            command.args(["--queen-url", &self.queen_url]);
        }
        command.args(args);
        self.isolate(command.as_std_mut());
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Gives `command` this environment's variables, as every keeper run here gets them
    /// (e.g. for a terminal multiplexer that runs the keeper).
    pub fn isolate(&self, command: &mut std::process::Command) {
        command
            .env("XDG_STATE_HOME", &self.state_home)
            .env("XDG_CONFIG_HOME", &self.config_home)
            // A local hive's model catalog stays in the environment too.
            .env("XDG_DATA_HOME", self.root.join("data"))
            .env_remove("RBEE_HIVE_MODEL_DIR")
            .env_remove("HF_ENDPOINT")
            .env_remove("RBEE_QUEEN_URL")
            .env_remove("RBEE_API_KEY")
            .env_remove("RBEE_CLUSTER_TOKEN")
            .env_remove("RUST_LOG")
            .env("RBEE_HIVE_ID", &self.hive_id);
        for (key, value) in &self.envs {
            command.env(key, value);
        }
    }

    /// Runs the keeper to its end with `input` on its standard input.
    pub async fn run_with_input(
        &self,
        args: &[&str],
        input: &str,
        timeout: Duration,
    ) -> KeeperOutput {
        use tokio::io::AsyncWriteExt;

        let started = Instant::now();
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn rbee-keeper");
        let mut stdin = child.stdin.take().expect("the keeper's stdin");
        let input = input.to_owned();
        // Written beside the wait: the keeper may not read it all (e.g. after `/exit`).
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
        });
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => output.expect("wait for rbee-keeper"),
            Err(_) => panic!(
                "rbee-keeper {args:?} did not finish within {timeout:?}\n{}",
                self.logs()
            ),
        };
        writer.abort();
        KeeperOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    /// Runs the keeper to its end; panics (with the daemons' logs) if it takes over `timeout`.
    pub async fn run(&self, args: &[&str], timeout: Duration) -> KeeperOutput {
        let started = Instant::now();
        let child = self.command(args).spawn().expect("spawn rbee-keeper");
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => output.expect("wait for rbee-keeper"),
            Err(_) => panic!(
                "rbee-keeper {args:?} did not finish within {timeout:?}\n{}",
                self.logs()
            ),
        };
        KeeperOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    /// The pid in `<state>/<name>.pid` (`queen`, `hive`), if the file exists.
    pub fn pid_file(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.state_dir.join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every live process started in this environment, as `(pid, executable name)`: the
    /// processes whose environment holds this `XDG_STATE_HOME` (Linux `/proc`).
    pub fn daemons(&self) -> Vec<(u32, String)> {
        let marker = format!("XDG_STATE_HOME={}", self.state_home.display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found: Vec<(u32, String)> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != std::process::id() && live(*pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
            })
            .filter_map(|pid| Some((pid, exe_name(pid)?)))
            .filter(|(_, name)| name != "rbee-keeper")
            .collect();
        found.sort();
        found
    }

    /// The pid of the live worker process started with `--worker-id <worker_id>`.
    pub fn worker_pid(&self, worker_id: &str) -> Option<u32> {
        self.daemons()
            .into_iter()
            .filter(|(_, name)| name == "llm-worker-rbee")
            .map(|(pid, _)| pid)
            .find(|pid| {
                args_of(*pid)
                    .windows(2)
                    .any(|pair| pair[0] == "--worker-id" && pair[1] == worker_id)
            })
    }

    /// `GET {queen}{path}` as JSON.
    pub async fn queen_json(&self, path: &str) -> serde_json::Value {
        let response = reqwest::get(format!("{}{path}", self.queen_url))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()));
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("JSON body")
    }

    /// Every log in the state directory (queen, hive, workers), for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let mut files = Vec::new();
        collect_logs(&self.state_dir, &mut files);
        files.sort();
        for file in files {
            let body = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = body.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            text.push_str(&format!(
                "--- {} (last {} lines)\n{}\n",
                file.display(),
                tail.len(),
                tail.join("\n")
            ));
        }
        text
    }

    /// Kills (SIGKILL) every process of this environment.
    pub fn kill_all(&self) {
        for (pid, _) in self.daemons() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

impl Drop for KeeperEnv {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Sends a signal (e.g. `"INT"`, `"KILL"`) to `pid` with the system's `kill`.
pub fn send_signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

fn live(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

fn args_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| {
            bytes
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn exe_name(pid: u32) -> Option<String> {
    let args = args_of(pid);
    let argv0 = args.first()?;
    Some(Path::new(argv0).file_name()?.to_string_lossy().into_owned())
}

fn collect_logs(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_logs(&path, files);
        } else if path.extension().is_some_and(|e| e == "log") {
            files.push(path);
        }
    }
}
