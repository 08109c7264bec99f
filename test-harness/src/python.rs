//! Scripts under `test-harness/python/` that drive a daemon with the official `openai` Python
//! package, as an application would.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The variable `cargo xtask test` sets to a python that has `openai` installed.
const PYTHON_ENV: &str = "RBEE_TEST_PYTHON";

/// What a script printed, and how it ended.
pub struct ScriptRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ScriptRun {
    /// The script exited 0 after printing its closing `all checks passed`.
    pub fn passed(&self) -> bool {
        self.status.success() && self.stdout.contains("all checks passed")
    }
}

impl fmt::Display for ScriptRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Runs `test-harness/python/<script>` with `args` under a python that has `openai`.
pub async fn run_openai_script(script: &str, args: &[&str]) -> ScriptRun {
    let python = openai_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .await
        .expect("run the python script");
    ScriptRun {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A python with the `openai` package: `RBEE_TEST_PYTHON` when `cargo xtask test` set it,
/// or the venv it creates (`target/py`), made here the same way when missing.
fn openai_python() -> PathBuf {
    if let Some(python) = std::env::var_os(PYTHON_ENV) {
        return PathBuf::from(python);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py");
    let python = venv.join("bin/python");
    let has_openai = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_openai(&python) {
        let steps: [(&str, Vec<&std::ffi::OsStr>); 2] = [
            (
                "python3",
                vec!["-m".as_ref(), "venv".as_ref(), venv.as_os_str()],
            ),
            (
                python.to_str().unwrap(),
                vec![
                    "-m".as_ref(),
                    "pip".as_ref(),
                    "install".as_ref(),
                    "--quiet".as_ref(),
                    "openai>=1.40".as_ref(),
                ],
            ),
        ];
        for (program, args) in steps {
            let status = Command::new(program).args(&args).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "cannot install the `openai` Python package into {}: run `cargo xtask test`, \
                 or set {PYTHON_ENV} to a python that has `openai`",
                venv.display()
            );
        }
    }
    python
}
