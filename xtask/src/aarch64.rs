//! `cargo xtask test-aarch64`: the engine's CPU kernel tests built for aarch64 and run under
//! qemu user-mode emulation, once on an emulated CPU with the `dotprod` extension and once
//! without, so that both NEON variants run on an x86-64 machine. It installs the Rust target,
//! and the cross linker and qemu with apt-get, when they are missing.
//!
//! It is not part of `cargo xtask test` or CI: emulation is slow, and says nothing about speed.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};

use crate::tasks::{cargo, run, workspace_root};

const TARGET: &str = "aarch64-unknown-linux-gnu";
const LINKER: &str = "aarch64-linux-gnu-gcc";
const QEMU: &str = "qemu-aarch64";
/// Where Debian's cross toolchain keeps the aarch64 C library, for qemu's program loader.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// The Debian and Ubuntu packages that provide [`LINKER`], [`SYSROOT`] and [`QEMU`].
const PACKAGES: [&str; 2] = ["gcc-aarch64-linux-gnu", "qemu-user"];
/// The emulated CPUs: every feature qemu has (`dotprod` among them), then Armv8.0 without it.
const CPUS: [&str; 2] = ["max", "cortex-a57"];

#[derive(Debug, clap::Args)]
pub struct Aarch64Args {
    /// Which of the engine's unit tests to run (a `cargo test` name filter).
    #[arg(default_value = "cpu::kernels")]
    filter: String,
}

/// Runs the filtered unit tests of `rbee-engine` for aarch64 on each of [`CPUS`], in a target
/// directory of their own so that they do not hold the workspace's build lock.
pub fn test(args: &Aarch64Args) -> anyhow::Result<()> {
    ensure_rust_target()?;
    ensure_cross_tools()?;
    let target_dir = workspace_root().join("target/aarch64-qemu");
    for cpu in CPUS {
        eprintln!("rbee-engine `{}` tests on {QEMU} -cpu {cpu}", args.filter);
        let mut test = cargo();
        test.args(["test", "-p", "rbee-engine", "--lib", "--target", TARGET])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(&args.filter)
            // The kernel tests print which NEON variants the emulated CPU runs.
            .args(["--", "--show-output"])
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
                format!("{QEMU} -L {SYSROOT} -cpu {cpu}"),
            );
        run(test, &format!("the aarch64 tests on {QEMU} -cpu {cpu}"))?;
    }
    Ok(())
}

fn ensure_rust_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup, which adds the aarch64 target")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]);
    run(add, &format!("rustup target add {TARGET}"))
}

/// Installs the cross linker and qemu with apt-get (through `sudo -n` when not root) unless
/// they are already there.
fn ensure_cross_tools() -> anyhow::Result<()> {
    if runs(LINKER) && runs(QEMU) && Path::new(SYSROOT).is_dir() {
        return Ok(());
    }
    let packages = PACKAGES.join(" ");
    eprintln!("{LINKER} or {QEMU} is missing: installing {packages} with apt-get");
    let apt = |args: &[&str]| {
        let mut command = if is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        command.args(args);
        run(command, "apt-get")
    };
    let installed = apt(&["update", "-q"]).and_then(|()| {
        let mut install = vec!["install", "-y", "-q"];
        install.extend(PACKAGES);
        apt(&install)
    });
    if let Err(e) = installed {
        bail!(
            "cannot install {packages} ({e:#}); install them, or another aarch64 cross gcc \
             and qemu-user, and run again"
        );
    }
    ensure!(
        runs(LINKER) && runs(QEMU) && Path::new(SYSROOT).is_dir(),
        "apt-get installed {packages}, but {LINKER}, {QEMU} or {SYSROOT} is still missing"
    );
    Ok(())
}

/// Whether `program --version` runs and succeeds.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
