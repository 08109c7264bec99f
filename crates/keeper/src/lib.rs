//! `rbee-keeper`'s commands: what a person runs by hand to use and manage an rbee cluster.
//!
//! Every command talks to the queen: `infer`, `chat` (a conversation, one job per turn) and
//! `worker spawn|stop` through the job protocol (tokens to stdout, progress to stderr), the
//! lists and `queen stop` through the queen's own routes. On a single machine the keeper also manages local daemons: when no
//! queen answers at a local URL it starts `queen-rbee` and `rbee-hive` detached, with logs
//! and pid files in the state directory, and they keep running until `rbee-keeper queen
//! stop`. The one time it calls a hive itself is to stop the local hive it started when
//! that hive's queen is gone; jobs never go to a hive or a worker directly.
//!
//! It is not a daemon, holds no cluster state of its own beyond those pid files, and has no
//! command-line parsing of its own beyond the clap types in [`cli`]: the `rbee-keeper` binary
//! parses and calls [`run`].

pub mod cli;
mod commands;
mod config;
mod console;
mod error;
mod local;
mod queen_api;

use tokio_util::sync::CancellationToken;

pub use cli::{Cli, usage_error_line};
pub use config::{QueenUrl, Settings};
pub use console::Console;
pub use error::{EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_NOT_RUNNING, EXIT_USAGE, KeeperError};

use crate::commands::Ctx;
use crate::queen_api::Queen;

/// How a command that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A status command found its daemon not running (exit code 3).
    NotRunning,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::NotRunning => EXIT_NOT_RUNNING,
        }
    }
}

/// Runs a parsed command line with settings from this process's environment and config file.
/// `interrupt` is Ctrl-C (see [`cancel_on_ctrl_c`]).
pub async fn run(
    cli: Cli,
    console: &mut Console,
    interrupt: CancellationToken,
) -> Result<Outcome, KeeperError> {
    let settings = Settings::load(cli.queen_url.as_deref(), |key| std::env::var(key).ok())?;
    run_with(settings, cli.command, console, interrupt).await
}

/// Runs one command with the given settings.
pub async fn run_with(
    settings: Settings,
    command: cli::Command,
    console: &mut Console,
    interrupt: CancellationToken,
) -> Result<Outcome, KeeperError> {
    let queen = Queen::new(&settings);
    let mut ctx = Ctx {
        settings,
        queen,
        console,
        interrupt,
    };
    commands::dispatch(command, &mut ctx).await
}

/// Cancels `interrupt` on the first Ctrl-C (SIGINT), SIGTERM or SIGHUP (its terminal closed).
/// A job the keeper follows outlives a closed connection (it is resumable), so a keeper ended
/// by a signal must live on to `DELETE` it, or the job would hold a worker's slot until the
/// queen's detached timeout.
pub async fn cancel_on_ctrl_c(interrupt: CancellationToken) {
    tokio::select! {
        ctrl_c = tokio::signal::ctrl_c() => {
            if ctrl_c.is_err() {
                return;
            }
        }
        () = terminated() => {}
    }
    interrupt.cancel();
}

/// Resolves on SIGTERM or SIGHUP; never where they cannot be listened to.
pub(crate) async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            return;
        }
    }
    std::future::pending::<()>().await;
}
