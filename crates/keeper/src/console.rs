//! Where the keeper's output goes: results on stdout, progress and errors on stderr.
//!
//! On a terminal, progress is one status line redrawn in place with `\r` and a spinner (a
//! download draws a bar); in a pipe or a log it is plain lines, with loading and download
//! progress thinned to steps of 10 % so a log stays short.

use std::io::{IsTerminal, Write};
use std::path::Path;

use rbee_contract::JobEvent;
use serde::Serialize;

use crate::error::KeeperError;

const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
/// Erases the current terminal line after `\r`.
const ERASE_LINE: &str = "\x1b[2K";

pub struct Console {
    out: Box<dyn Write + Send + Sync>,
    err: Box<dyn Write + Send + Sync>,
    /// stderr is a terminal: draw a status line instead of writing lines.
    tty: bool,
    json: bool,
    status: Option<String>,
    drawn: bool,
    frame: usize,
    /// Last 10 % step printed per progress kind (plain mode), so repeats are skipped.
    last_step: Option<(&'static str, u32)>,
    out_at_line_start: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("tty", &self.tty)
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// stdout and stderr of this process; a spinner when stderr is a terminal.
    pub fn stdio(json: bool) -> Console {
        let tty = std::io::stderr().is_terminal();
        Console::new(
            json,
            tty,
            Box::new(std::io::stdout()),
            Box::new(std::io::stderr()),
        )
    }

    /// Any two writers; `tty` chooses the status-line rendering.
    pub fn new(
        json: bool,
        tty: bool,
        out: Box<dyn Write + Send + Sync>,
        err: Box<dyn Write + Send + Sync>,
    ) -> Console {
        Console {
            out,
            err,
            tty,
            json,
            status: None,
            drawn: false,
            frame: 0,
            last_step: None,
            out_at_line_start: true,
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Writes result text to stdout at once (tokens arrive one by one).
    pub fn out(&mut self, text: &str) -> Result<(), KeeperError> {
        if text.is_empty() {
            return Ok(());
        }
        // Tokens mean generation runs: the progress line has served its purpose.
        self.clear_status();
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|e| KeeperError::io("cannot write to stdout", e))?;
        self.out_at_line_start = text.ends_with('\n');
        Ok(())
    }

    pub fn out_line(&mut self, line: &str) -> Result<(), KeeperError> {
        self.out(&format!("{line}\n"))
    }

    /// One JSON document on one line of stdout.
    pub fn out_json(&mut self, value: &impl Serialize) -> Result<(), KeeperError> {
        let text = serde_json::to_string(value)
            .map_err(|e| KeeperError::Client(format!("cannot render JSON: {e}")))?;
        self.out_line(&text)
    }

    /// Ends the current stdout line if text is pending on it.
    pub fn end_out_line(&mut self) -> Result<(), KeeperError> {
        if self.out_at_line_start {
            return Ok(());
        }
        self.out("\n")
    }

    /// A lasting line on stderr (e.g. "starting a local queen").
    pub fn note(&mut self, message: &str) {
        self.undraw();
        let _ = writeln!(self.err, "{message}");
        self.redraw();
    }

    /// Shows a job's progress event; other events are ignored.
    pub fn progress(&mut self, event: &JobEvent) {
        if let JobEvent::Started { prompt_tokens } = event {
            // Worth a spinner until the first token, not worth a line in a log.
            if self.tty {
                self.status = Some(format!("generating ({prompt_tokens} prompt tokens)"));
                self.redraw();
            }
            return;
        }
        let Some((kind, text, step)) = describe(event) else {
            return;
        };
        if self.tty {
            self.status = Some(match download_fraction(event) {
                Some(fraction) => format!("{} {text}", bar(fraction)),
                None => text,
            });
            self.redraw();
            return;
        }
        if let Some(step) = step {
            if self.last_step == Some((kind, step)) {
                return;
            }
            self.last_step = Some((kind, step));
        }
        let _ = writeln!(self.err, "{text}");
    }

    /// Whether a status line is showing (and wants [`tick`](Self::tick)s).
    pub fn spinning(&self) -> bool {
        self.tty && self.status.is_some()
    }

    /// Advances the spinner.
    pub fn tick(&mut self) {
        self.frame = (self.frame + 1) % SPINNER.len();
        self.redraw();
    }

    /// Removes the status line for good (until the next progress event).
    pub fn clear_status(&mut self) {
        self.undraw();
        self.status = None;
    }

    /// Prints `rbee-keeper: <error>` on a clean line of stderr.
    pub fn error(&mut self, err: &KeeperError) {
        self.clear_status();
        let _ = self.end_out_line();
        let _ = writeln!(self.err, "rbee-keeper: {err}");
        let _ = self.err.flush();
    }

    /// A summary for a person at a terminal, e.g. token counts and speed.
    pub fn summary(&mut self, text: &str) {
        if self.tty {
            self.note(text);
        }
    }

    fn redraw(&mut self) {
        if !self.tty {
            return;
        }
        if let Some(status) = &self.status {
            let _ = write!(
                self.err,
                "\r{ERASE_LINE}{} {status}",
                SPINNER[self.frame % SPINNER.len()]
            );
            let _ = self.err.flush();
            self.drawn = true;
        }
    }

    fn undraw(&mut self) {
        if self.drawn {
            let _ = write!(self.err, "\r{ERASE_LINE}");
            let _ = self.err.flush();
            self.drawn = false;
        }
    }
}

/// A progress event as `(kind, text, 10 % step)` for a person; `None` for events that are not
/// progress (tokens, data, terminal events).
fn describe(event: &JobEvent) -> Option<(&'static str, String, Option<u32>)> {
    let step = |fraction: f64| Some((fraction.clamp(0.0, 1.0) * 10.0).floor() as u32);
    match event {
        JobEvent::Queued { position } => {
            Some(("queued", format!("queued (position {position})"), None))
        }
        JobEvent::Narration { message } => Some(("narration", message.clone(), None)),
        JobEvent::Spawning { worker_id, hive_id } => {
            let on = hive_id
                .as_deref()
                .map(|h| format!(" on hive {h}"))
                .unwrap_or_default();
            Some(("spawning", format!("spawning worker {worker_id}{on}"), None))
        }
        JobEvent::Loading {
            model,
            fraction,
            message,
        } => {
            let detail = message
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default();
            Some((
                "loading",
                format!(
                    "loading {}: {:.0}%{detail}",
                    short_model(model),
                    fraction.clamp(0.0, 1.0) * 100.0
                ),
                step(f64::from(*fraction)),
            ))
        }
        JobEvent::Downloading {
            model,
            bytes_done,
            bytes_total,
            bytes_per_second,
        } => {
            let mut text = format!("downloading {}: {}", short_model(model), mib(*bytes_done));
            let mut fraction = None;
            if let Some(total) = bytes_total.filter(|t| *t > 0) {
                let f = *bytes_done as f64 / total as f64;
                text.push_str(&format!(" of {} ({:.0}%)", mib(total), f * 100.0));
                fraction = Some(f);
            }
            if let Some(rate) = bytes_per_second {
                text.push_str(&format!(" at {}/s", mib(*rate as u64)));
            }
            Some(("downloading", text, fraction.and_then(step)))
        }
        JobEvent::Started { .. }
        | JobEvent::Token { .. }
        | JobEvent::Data { .. }
        | JobEvent::Done { .. }
        | JobEvent::Error { .. } => None,
    }
}

/// How far a download with a known size is.
fn download_fraction(event: &JobEvent) -> Option<f64> {
    match event {
        JobEvent::Downloading {
            bytes_done,
            bytes_total: Some(total),
            ..
        } if *total > 0 => Some((*bytes_done as f64 / *total as f64).clamp(0.0, 1.0)),
        _ => None,
    }
}

/// A progress bar of [`BAR_WIDTH`] cells.
fn bar(fraction: f64) -> String {
    let filled = ((fraction * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    format!("[{}{}]", "█".repeat(filled), "░".repeat(BAR_WIDTH - filled))
}

const BAR_WIDTH: usize = 24;

/// A model path's file name (paths are long, the name says enough); references as given.
fn short_model(model: &str) -> &str {
    if model.starts_with("hf:") {
        return model;
    }
    Path::new(model)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(model)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer whose bytes a test can read back.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(crate) fn captured(json: bool, tty: bool) -> (Console, Captured, Captured) {
        let (out, err) = (Captured::default(), Captured::default());
        let console = Console::new(json, tty, Box::new(out.clone()), Box::new(err.clone()));
        (console, out, err)
    }

    fn loading(fraction: f32) -> JobEvent {
        JobEvent::Loading {
            model: "/models/x/SmolLM2.gguf".into(),
            fraction,
            message: None,
        }
    }

    #[test]
    fn plain_progress_is_lines_thinned_to_steps() {
        let (mut console, out, err) = captured(false, false);
        console.progress(&JobEvent::Spawning {
            worker_id: "h-w1".into(),
            hive_id: Some("h".into()),
        });
        for i in 0..=100 {
            console.progress(&loading(i as f32 / 100.0));
        }
        console.progress(&JobEvent::Started { prompt_tokens: 3 });
        let text = err.text();
        assert!(
            text.starts_with("spawning worker h-w1 on hive h\n"),
            "{text}"
        );
        assert_eq!(text.matches("loading SmolLM2.gguf").count(), 11, "{text}");
        assert!(!text.contains('\r'));
        assert!(out.text().is_empty());
    }

    #[test]
    fn a_terminal_gets_one_status_line_that_tokens_clear() {
        let (mut console, out, err) = captured(false, true);
        console.progress(&loading(0.5));
        assert!(console.spinning());
        console.tick();
        console.out(" Paris").unwrap();
        assert!(!console.spinning());
        console.end_out_line().unwrap();
        let text = err.text();
        assert!(
            text.contains("\r\x1b[2K⠋ loading SmolLM2.gguf: 50%"),
            "{text:?}"
        );
        assert!(text.ends_with("\r\x1b[2K"), "{text:?}");
        assert!(!text.contains('\n'));
        assert_eq!(out.text(), " Paris\n");
    }

    #[test]
    fn errors_start_on_a_fresh_line() {
        let (mut console, out, err) = captured(false, false);
        console.out("half a sent").unwrap();
        console.error(&KeeperError::Interrupted);
        assert_eq!(out.text(), "half a sent\n");
        assert_eq!(err.text(), "rbee-keeper: interrupted\n");
    }

    #[test]
    fn a_terminal_draws_downloads_as_a_bar() {
        let (mut console, _, err) = captured(false, true);
        console.progress(&JobEvent::Downloading {
            model: "hf:org/repo".into(),
            bytes_done: 1024 * 1024,
            bytes_total: Some(4 * 1024 * 1024),
            bytes_per_second: Some(2.0 * 1024.0 * 1024.0),
        });
        let text = err.text();
        let bar = format!("[{}{}]", "█".repeat(6), "░".repeat(18));
        assert!(
            text.contains(&format!(
                "{bar} downloading hf:org/repo: 1.0 MiB of 4.0 MiB (25%) at 2.0 MiB/s"
            )),
            "{text:?}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn downloads_show_sizes() {
        let (mut console, _, err) = captured(false, false);
        console.progress(&JobEvent::Downloading {
            model: "hf:org/repo".into(),
            bytes_done: 1024 * 1024,
            bytes_total: Some(4 * 1024 * 1024),
            bytes_per_second: None,
        });
        assert_eq!(
            err.text(),
            "downloading hf:org/repo: 1.0 MiB of 4.0 MiB (25%)\n"
        );
    }
}
