//! Every way a keeper command fails, each with its one-line message and exit code.

use std::path::PathBuf;

use job_client::ClientError;
use rbee_contract::ErrorCode;

/// Exit code of a failure: the queen, a daemon or a job said no.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a command that could not be understood (usage, configuration, input).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a status command whose daemon is not running.
pub const EXIT_NOT_RUNNING: u8 = 3;
/// Exit code after Ctrl-C (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("{0}")]
    Usage(String),
    #[error("invalid config file {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("model path {} does not exist", .0.display())]
    ModelPathMissing(PathBuf),
    #[error("no queen answers at {url} ({reason}); {hint}")]
    QueenUnreachable {
        url: String,
        reason: String,
        hint: &'static str,
    },
    #[error("{what} answered HTTP {status}: {message}")]
    Http {
        what: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach {what}: {reason}")]
    Transport { what: String, reason: String },
    /// An rbee daemon said no: a job's `error` event, or a request refused with an error body.
    #[error("{}", job_message(message, *code))]
    Remote { code: ErrorCode, message: String },
    #[error("{0}")]
    Client(String),
    #[error("{name} did not start: {reason}{}", log_tail(tail))]
    DaemonStart {
        name: &'static str,
        reason: String,
        tail: String,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

impl KeeperError {
    pub fn exit_code(&self) -> u8 {
        match self {
            KeeperError::Usage(_)
            | KeeperError::Config { .. }
            | KeeperError::ModelPathMissing(_) => EXIT_USAGE,
            KeeperError::Interrupted => EXIT_INTERRUPTED,
            _ => EXIT_FAILURE,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        KeeperError::Io {
            what: what.into(),
            source,
        }
    }

    /// A job-client failure talking to `what` (e.g. "the queen at http://…").
    pub(crate) fn client(what: &str, err: ClientError) -> Self {
        match err {
            ClientError::Rejected { code, message, .. } => KeeperError::Remote { code, message },
            ClientError::Transport { source, .. } => KeeperError::Transport {
                what: what.to_owned(),
                reason: root_cause(&source),
            },
            ClientError::StreamEnded { .. } => {
                KeeperError::Client(format!("{what} closed the job stream before the job ended"))
            }
            other => KeeperError::Client(other.to_string()),
        }
    }
}

/// Lines of a job error's details (e.g. a log tail) shown under its first line.
const MAX_DETAIL_LINES: usize = 12;

/// The first line of a job's error message with its code; further lines (e.g. a worker's log
/// tail) follow, indented, so the first line alone still says what happened.
fn job_message(message: &str, code: ErrorCode) -> String {
    let mut lines = message.trim().lines();
    let first = lines.next().unwrap_or("the job failed");
    let mut text = format!("{first} ({code})");
    let rest: Vec<&str> = lines.collect();
    for line in rest.iter().take(MAX_DETAIL_LINES) {
        text.push_str("\n    ");
        text.push_str(line);
    }
    if rest.len() > MAX_DETAIL_LINES {
        text.push_str(&format!(
            "\n    … {} more lines (see the daemons' logs)",
            rest.len() - MAX_DETAIL_LINES
        ));
    }
    text
}

fn log_tail(tail: &str) -> String {
    if tail.trim().is_empty() {
        return String::new();
    }
    let mut text = String::from("; its log ends with:");
    for line in tail.trim_end().lines() {
        text.push_str("\n    ");
        text.push_str(line);
    }
    text
}

/// The innermost cause of an error: reqwest's own message ("error sending request") says
/// nothing, the OS error under it ("Connection refused") does.
pub(crate) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_errors_put_the_code_on_the_first_line() {
        let err = KeeperError::Remote {
            code: ErrorCode::ModelLoadFailed,
            message: "worker exited: bad magic\nline a\nline b".into(),
        };
        let text = err.to_string();
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("worker exited: bad magic (model_load_failed)")
        );
        assert_eq!(lines.next(), Some("    line a"));
        assert_eq!(err.exit_code(), EXIT_FAILURE);

        let long = KeeperError::Remote {
            code: ErrorCode::ModelLoadFailed,
            message: format!("first{}", "\nmore".repeat(40)),
        };
        let text = long.to_string();
        assert_eq!(text.lines().count(), 1 + MAX_DETAIL_LINES + 1, "{text}");
        assert!(
            text.ends_with("… 28 more lines (see the daemons' logs)"),
            "{text}"
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(KeeperError::Interrupted.exit_code(), 130);
        assert_eq!(KeeperError::Usage("x".into()).exit_code(), 2);
        assert_eq!(KeeperError::ModelPathMissing("/nope".into()).exit_code(), 2);
    }
}
