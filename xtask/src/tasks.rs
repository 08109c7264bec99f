//! The README's two commands: `cargo xtask quickstart` and `cargo xtask test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

use crate::fetch::ensure_smollm2;

fn cargo() -> Command {
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

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
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
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    run(build, "cargo build")?;
    let mut test = cargo();
    test.args(["test", "--workspace"]).args(&args.rest);
    run(test, "cargo test")
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
        .arg("--model")
        .arg(&model)
        .args(&args.rest)
        .arg(&args.prompt);
    run(infer, "rbee-keeper infer")
}
