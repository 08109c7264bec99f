//! Worker log files: one per worker, and their last lines for error reports.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Lines of a worker's log quoted when it fails to start or dies.
pub(crate) const TAIL_LINES: usize = 10;

/// Only the end of a log is read for its tail; a line longer than this is cut.
const TAIL_BYTES: u64 = 16 * 1024;

pub(crate) fn log_path(log_dir: &Path, worker_id: &str) -> PathBuf {
    log_dir.join(format!("{worker_id}.log"))
}

/// The last `lines` lines of the log at `path`, without terminal colour codes; empty when the
/// file cannot be read. Blocking: call it off the reactor.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = strip_ansi(&String::from_utf8_lossy(&bytes));
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line read is most likely a fragment.
        all.remove(0);
    }
    while all.last().is_some_and(|l| l.trim().is_empty()) {
        all.pop();
    }
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// [`tail`] on the blocking pool.
pub(crate) async fn tail_async(path: PathBuf, lines: usize) -> String {
    tokio::task::spawn_blocking(move || tail(&path, lines))
        .await
        .unwrap_or_default()
}

/// A report for operators: `what` alone on the first line, then the log's last lines (or a
/// note that it is empty) and the log's path. It goes to the hive's log, never to a client.
pub(crate) async fn with_tail(what: String, path: &Path) -> String {
    let tail = tail_async(path.to_path_buf(), TAIL_LINES).await;
    if tail.is_empty() {
        format!("{what}\nits log {} is empty", path.display())
    } else {
        format!(
            "{what}\nlast lines of its log:\n{tail}\nlog: {}",
            path.display()
        )
    }
}

/// Writes why a job's worker failed, with its log's last lines, to the hive's log under the
/// job's id, where an operator finds it from the id the client was given.
pub(crate) async fn report(job_id: &str, worker_id: &str, what: &str, path: &Path) {
    // The id leads the first line too: the fields follow the whole (multi-line) message.
    let report = with_tail(format!("job {job_id}: {what}"), path).await;
    tracing::warn!(job_id, worker_id, "{report}");
}

/// A message a worker (or the engine in it) wrote, made fit for a client: its first line
/// only (no backtrace or log lines), the model's file on this hive named by the reference
/// the client gave, and bounded in length.
pub(crate) fn for_client(message: &str, model_path: &Path, model_ref: &str) -> String {
    /// Longest message relayed, in characters.
    const MAX_CHARS: usize = 300;
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut line = first.trim().to_owned();
    let shown = model_path.to_string_lossy();
    if !shown.is_empty() {
        line = line.replace(shown.as_ref(), model_ref);
    }
    if line.chars().count() > MAX_CHARS {
        line = line.chars().take(MAX_CHARS).collect::<String>() + "…";
    }
    line
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), which a worker writes when colours are on.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_without_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let mut text = String::new();
        for i in 0..30 {
            text.push_str(&format!("\u{1b}[2mline\u{1b}[0m {i}\n"));
        }
        text.push_str("\n\n");
        std::fs::write(&path, text).unwrap();
        let tail = tail(&path, 3);
        assert_eq!(tail, "line 27\nline 28\nline 29");
    }

    #[test]
    fn tail_of_a_big_log_reads_only_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let line = "x".repeat(100);
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("{line} {i}\n"));
        }
        std::fs::write(&path, text).unwrap();
        let tail = tail(&path, 2);
        assert_eq!(tail, format!("{line} 998\n{line} 999"));
    }

    #[tokio::test]
    async fn a_report_keeps_the_log_and_its_path_off_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        std::fs::write(&path, "loading\nno such tensor\n").unwrap();
        let report = with_tail("worker w failed".into(), &path).await;
        let mut lines = report.lines();
        assert_eq!(lines.next(), Some("worker w failed"));
        assert_eq!(lines.next(), Some("last lines of its log:"));
        assert_eq!(lines.next(), Some("loading"));
        assert!(report.ends_with(&format!("no such tensor\nlog: {}", path.display())));

        let empty = dir.path().join("empty.log");
        std::fs::write(&empty, "").unwrap();
        let report = with_tail("worker w failed".into(), &empty).await;
        assert_eq!(
            report,
            format!("worker w failed\nits log {} is empty", empty.display())
        );
    }

    #[test]
    fn a_client_gets_one_line_without_the_hives_file() {
        let model = Path::new("/var/lib/rbee/models/hub/blobs/abc");
        let message = "cannot load model: /var/lib/rbee/models/hub/blobs/abc: bad magic\n\
                       Stack backtrace:\n   0: candle_core::error::Error::bt\n             \
                       at /home/build/.cargo/registry/src/candle-core/src/error.rs:250:25";
        assert_eq!(
            for_client(message, model, "hf:org/repo:m.gguf"),
            "cannot load model: hf:org/repo:m.gguf: bad magic"
        );
        let long = "x".repeat(1000);
        assert!(for_client(&long, model, "m").chars().count() <= 301);
    }

    #[test]
    fn missing_log_has_an_empty_tail() {
        assert_eq!(tail(Path::new("/nonexistent/rbee/w.log"), 5), "");
    }
}
