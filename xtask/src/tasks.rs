//! The README's two commands: `cargo xtask quickstart` and `cargo xtask test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

use crate::fetch::ensure_smollm2;

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

/// Installs what the tests need, builds every binary, then runs the whole suite.
pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    let model = ensure_smollm2(None)?;
    eprintln!("SmolLM2 test model: {}", model.display());
    let python = ensure_openai_python()?;
    eprintln!("Python with `openai`: {}", python.display());
    // `--tests` resolves the dependencies' features as `cargo test` does (dev-dependencies
    // included), so the test run below finds every library and binary built.
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins", "--tests"]);
    run(build, "cargo build")?;
    let mut test = cargo();
    test.args(["test", "--workspace"])
        .args(&args.rest)
        .env(PYTHON_ENV, &python);
    run(test, "cargo test")
}

/// The variable through which the end-to-end tests get a python that has `openai`.
const PYTHON_ENV: &str = "RBEE_TEST_PYTHON";
/// What the OpenAI client test needs from PyPI.
const OPENAI_REQUIREMENT: &str = "openai>=1.40";

/// A venv under `target/py` with the official `openai` package, for the test that runs it
/// against the queen. Created once; later runs reuse it.
fn ensure_openai_python() -> anyhow::Result<PathBuf> {
    let venv = workspace_root().join("target/py");
    let python = venv.join("bin/python");
    let has_openai = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_openai(&python) {
        return Ok(python);
    }
    let mut create = Command::new("python3");
    create.args(["-m", "venv"]).arg(&venv);
    run(create, "python3 -m venv target/py")?;
    let mut install = Command::new(&python);
    install.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        OPENAI_REQUIREMENT,
    ]);
    run(install, "pip install openai")?;
    ensure!(
        has_openai(&python),
        "{} still cannot import openai",
        python.display()
    );
    Ok(python)
}

/// Regenerates `docs/openapi.json` through the test that checks it.
pub fn openapi() -> anyhow::Result<()> {
    let mut generate = cargo();
    generate
        .args(["test", "--quiet", "-p", "queen", "--test", "openapi"])
        .env("RBEE_UPDATE_OPENAPI", "1");
    run(generate, "the OpenAPI generator")?;
    eprintln!("wrote docs/openapi.json");
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {
    /// What to ask.
    #[arg(default_value = "Why is the sky blue?")]
    prompt: String,
    /// Arguments passed on to `rbee-keeper infer` (e.g. `--max-tokens 64`).
    #[arg(last = true)]
    rest: Vec<String>,
}

/// Fetches SmolLM2, builds rbee and runs `rbee-keeper infer` on it: the keeper starts a local
/// queen and hive, the hive spawns a worker, and the tokens stream back to this terminal.
pub fn quickstart(args: &QuickstartArgs) -> anyhow::Result<()> {
    let model = ensure_smollm2(None)?;
    let mut build = cargo();
    build.args(["build", "--bins", "--quiet"]);
    run(build, "cargo build")?;
    let keeper = workspace_root().join("target/debug/rbee-keeper");
    let mut infer = Command::new(keeper);
    infer
        .arg("infer")
        // SmolLM2-Instruct answers a question asked as a chat message; given as raw text, a
        // question is often a whole document to it, and it ends at once.
        .arg("--chat")
        .arg("--model")
        .arg(&model)
        .args(&args.rest)
        .arg(&args.prompt);
    run(infer, "rbee-keeper infer")
}
