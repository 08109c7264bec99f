//! Where the keeper's output goes: results on stdout, progress and errors on stderr.
//!
//! On a terminal, progress is one line of stderr drawn in place by `indicatif`: a spinner with
//! the status, a bar with the percentage while a model loads, a bar with the bytes while one
//! downloads; the status text is cut so the line fits the terminal's width. In a pipe or a log
//! it is plain lines, with loading and download progress thinned to steps of 10 % so a log
//! stays short.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rbee_contract::JobEvent;
use serde::Serialize;

use crate::error::KeeperError;

/// The spinner's frames; the last one is what a finished spinner shows.
const TICKS: &str = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ";
/// Filled, partly filled (finest last) and empty cells of a bar.
const BAR_CELLS: &str = "█▉▊▋▌▍▎▏░";
/// Cells of a bar; the status text before it takes what is left of the line.
const BAR_WIDTH: usize = 24;
const STEADY_TICK: Duration = Duration::from_millis(100);

pub struct Console {
    out: Box<dyn Write + Send + Sync>,
    err: Box<dyn Write + Send + Sync>,
    /// Where bars are drawn when stderr is a terminal; `None`: plain lines.
    terminal: Option<Terminal>,
    json: bool,
    /// The progress line showing now, and what it looks like.
    shown: Option<(ProgressBar, Look)>,
    /// Last 10 % step printed per progress kind (plain mode), so repeats are skipped.
    last_step: Option<(&'static str, u32)>,
    out_at_line_start: bool,
}

/// Makes the draw target of each new progress line: stderr, or a test's fake terminal.
type Terminal = Box<dyn Fn() -> ProgressDrawTarget + Send + Sync>;

/// The three shapes of a progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// A status: `⠋ spawning worker h-w1 on hive h`.
    Spinner,
    /// Loading: `⠋ loading m.gguf ████▌░░░ 40%`.
    Percent,
    /// A download of known size: `⠋ downloading hf:o/r ███░░░ 1.00 MiB/4.00 MiB at 2.0 MiB/s`.
    Bytes,
}

impl Look {
    fn style(self) -> ProgressStyle {
        let template = match self {
            Look::Spinner => "{spinner} {wide_msg}".to_owned(),
            Look::Percent => {
                format!("{{spinner}} {{wide_msg}} {{bar:{BAR_WIDTH}}} {{percent:>3}}%")
            }
            Look::Bytes => format!(
                "{{spinner}} {{wide_msg}} {{bar:{BAR_WIDTH}}} {{binary_bytes}}/{{binary_total_bytes}}{{prefix}}"
            ),
        };
        // The templates are constants; a spinner is the fallback should one ever not parse.
        ProgressStyle::with_template(&template)
            .map(|style| style.progress_chars(BAR_CELLS))
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .tick_chars(TICKS)
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("terminal", &self.terminal.is_some())
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// stdout and stderr of this process; progress bars when stderr is a terminal.
    pub fn stdio(json: bool) -> Console {
        let tty = std::io::stderr().is_terminal();
        Console::new(
            json,
            tty,
            Box::new(std::io::stdout()),
            Box::new(std::io::stderr()),
        )
    }

    /// Any two writers; with `tty`, progress is drawn in place on this process's stderr.
    pub fn new(
        json: bool,
        tty: bool,
        out: Box<dyn Write + Send + Sync>,
        err: Box<dyn Write + Send + Sync>,
    ) -> Console {
        let terminal: Option<Terminal> = tty.then(|| Box::new(ProgressDrawTarget::stderr) as _);
        Console {
            out,
            err,
            terminal,
            json,
            shown: None,
            last_step: None,
            out_at_line_start: true,
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Whether progress is drawn in place (stderr is a terminal).
    pub fn is_terminal(&self) -> bool {
        self.terminal.is_some()
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

    /// A prompt for a line the person types: written to stdout without ending the line,
    /// which their Enter ends.
    pub fn prompt(&mut self, text: &str) -> Result<(), KeeperError> {
        self.clear_status();
        self.end_out_line()?;
        self.out(text)?;
        self.out_at_line_start = true;
        Ok(())
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

    /// A lasting line on stderr (e.g. "starting a local queen"), above the progress line.
    pub fn note(&mut self, message: &str) {
        let err = &mut self.err;
        let mut write = || {
            let _ = writeln!(err, "{message}");
            let _ = err.flush();
        };
        match &self.shown {
            Some((bar, _)) => bar.suspend(write),
            None => write(),
        }
    }

    /// Shows a job's progress event; other events are ignored.
    pub fn progress(&mut self, event: &JobEvent) {
        if let JobEvent::Started { prompt_tokens } = event {
            // Worth a spinner until the first token, not worth a line in a log.
            if self.terminal.is_some() {
                self.draw(
                    Look::Spinner,
                    format!("generating ({prompt_tokens} prompt tokens)"),
                    None,
                    String::new(),
                );
            }
            return;
        }
        let Some(progress) = describe(event) else {
            return;
        };
        if self.terminal.is_some() {
            match progress.meter {
                Meter::Fraction(fraction) => self.draw(
                    Look::Percent,
                    progress.label,
                    Some(((fraction * 1000.0).round() as u64, 1000)),
                    String::new(),
                ),
                Meter::Bytes { done, total, rate } => self.draw(
                    Look::Bytes,
                    progress.label,
                    Some((done, total)),
                    rate.map(|r| format!(" at {}/s", mib(r as u64)))
                        .unwrap_or_default(),
                ),
                Meter::None => self.draw(Look::Spinner, progress.text, None, String::new()),
            }
            return;
        }
        if let Some(step) = progress.step {
            if self.last_step == Some((progress.kind, step)) {
                return;
            }
            self.last_step = Some((progress.kind, step));
        }
        let _ = writeln!(self.err, "{}", progress.text);
    }

    /// Removes the progress line for good (until the next progress event).
    pub fn clear_status(&mut self) {
        if let Some((bar, _)) = self.shown.take() {
            bar.finish_and_clear();
        }
    }

    /// Prints `rbee-keeper: <error>` on a clean line of stderr.
    pub fn error(&mut self, err: &KeeperError) {
        self.error_line(&err.to_string());
    }

    /// Prints `rbee-keeper: <message>` on a clean line of stderr.
    pub fn error_line(&mut self, message: &str) {
        self.clear_status();
        let _ = self.end_out_line();
        let _ = writeln!(self.err, "rbee-keeper: {message}");
        let _ = self.err.flush();
    }

    /// A summary for a person at a terminal, e.g. token counts and speed.
    pub fn summary(&mut self, text: &str) {
        if self.terminal.is_some() {
            self.note(text);
        }
    }

    /// Shows `message` on the progress line as `look`, with `(position, length)` for bars
    /// and `suffix` after a bar's figures.
    fn draw(&mut self, look: Look, message: String, meter: Option<(u64, u64)>, suffix: String) {
        let Some(terminal) = &self.terminal else {
            return;
        };
        let (bar, fresh) = match &mut self.shown {
            Some((bar, shown)) => {
                if *shown != look {
                    bar.set_style(look.style());
                    *shown = look;
                }
                (bar.clone(), false)
            }
            // Filled in before it is shown, so its first frame is not an empty bar.
            None => (ProgressBar::hidden(), true),
        };
        if fresh {
            bar.set_style(look.style());
        }
        bar.set_prefix(suffix);
        if let Some((position, length)) = meter {
            bar.set_length(length);
            bar.set_position(position.min(length));
        }
        bar.set_message(message);
        if fresh {
            bar.set_draw_target(terminal());
            bar.tick();
            bar.enable_steady_tick(STEADY_TICK);
            self.shown = Some((bar, look));
        }
    }
}

/// How far a progress event says its work is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Meter {
    None,
    Fraction(f64),
    Bytes {
        done: u64,
        total: u64,
        rate: Option<f64>,
    },
}

/// A progress event for a person.
#[derive(Debug)]
struct Progress {
    kind: &'static str,
    /// What is happening, without figures (a bar shows them).
    label: String,
    /// The whole line, figures included, for a log.
    text: String,
    /// The 10 % step reached, for thinning a log.
    step: Option<u32>,
    meter: Meter,
}

/// A progress event for a person; `None` for events that are not progress (tokens, data,
/// terminal events).
fn describe(event: &JobEvent) -> Option<Progress> {
    let step = |fraction: f64| Some((fraction.clamp(0.0, 1.0) * 10.0).floor() as u32);
    let status = |kind, text: String| Progress {
        kind,
        label: text.clone(),
        text,
        step: None,
        meter: Meter::None,
    };
    match event {
        JobEvent::Queued { position } => {
            Some(status("queued", format!("queued (position {position})")))
        }
        JobEvent::Narration { message } => Some(status("narration", message.clone())),
        JobEvent::Spawning { worker_id, hive_id } => {
            let on = hive_id
                .as_deref()
                .map(|h| format!(" on hive {h}"))
                .unwrap_or_default();
            Some(status(
                "spawning",
                format!("spawning worker {worker_id}{on}"),
            ))
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
            let fraction = f64::from(*fraction).clamp(0.0, 1.0);
            Some(Progress {
                kind: "loading",
                label: format!("loading {}{detail}", short_model(model)),
                text: format!(
                    "loading {}: {:.0}%{detail}",
                    short_model(model),
                    fraction * 100.0
                ),
                step: step(fraction),
                meter: Meter::Fraction(fraction),
            })
        }
        JobEvent::Downloading {
            model,
            bytes_done,
            bytes_total,
            bytes_per_second,
        } => {
            let label = format!("downloading {}", short_model(model));
            let mut text = format!("{label}: {}", mib(*bytes_done));
            let mut progress = status("downloading", String::new());
            if let Some(total) = bytes_total.filter(|t| *t > 0) {
                let f = *bytes_done as f64 / total as f64;
                text.push_str(&format!(" of {} ({:.0}%)", mib(total), f * 100.0));
                progress.step = step(f);
                progress.meter = Meter::Bytes {
                    done: *bytes_done,
                    total,
                    rate: *bytes_per_second,
                };
            }
            if let Some(rate) = bytes_per_second {
                text.push_str(&format!(" at {}/s", mib(*rate as u64)));
            }
            progress.label = label;
            progress.text = text;
            Some(progress)
        }
        JobEvent::Started { .. }
        | JobEvent::Token { .. }
        | JobEvent::Data { .. }
        | JobEvent::Done { .. }
        | JobEvent::Error { .. } => None,
    }
}

/// A model path's file name (paths are long, the name says enough); references as given.
pub(crate) fn short_model(model: &str) -> &str {
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

    use indicatif::TermLike;

    use super::*;

    /// A writer whose bytes a test can read back.
    #[derive(Clone, Default, Debug)]
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

    /// A terminal of `width` columns that records what is drawn on it, as a VT100 would get it.
    #[derive(Debug, Clone)]
    struct FakeTerminal {
        screen: Captured,
        width: u16,
    }

    impl FakeTerminal {
        fn put(&self, text: &str) -> std::io::Result<()> {
            self.screen.clone().write_all(text.as_bytes())
        }
    }

    impl TermLike for FakeTerminal {
        fn width(&self) -> u16 {
            self.width
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}A"))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}B"))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}C"))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}D"))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.put(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.put(s)
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.put("\r\x1b[2K")
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(crate) fn captured(json: bool, tty: bool) -> (Console, Captured, Captured) {
        let (out, err) = (Captured::default(), Captured::default());
        let console = Console::new(json, tty, Box::new(out.clone()), Box::new(err.clone()));
        (console, out, err)
    }

    /// A console whose progress goes to a fake terminal `width` columns wide; stderr's notes
    /// land on the same screen.
    fn on_terminal(width: u16) -> (Console, Captured, Captured) {
        let (out, screen) = (Captured::default(), Captured::default());
        let terminal = FakeTerminal {
            screen: screen.clone(),
            width,
        };
        let mut console = Console::new(
            false,
            false,
            Box::new(out.clone()),
            Box::new(screen.clone()),
        );
        console.terminal = Some(Box::new(move || {
            ProgressDrawTarget::term_like(Box::new(terminal.clone()))
        }));
        (console, out, screen)
    }

    /// The lines a terminal shows last for each redraw: the text between line clears and
    /// newlines, without escape sequences.
    fn drawn_lines(screen: &str) -> Vec<String> {
        screen
            .split(['\r', '\n'])
            .map(|part| {
                let mut text = String::new();
                let mut chars = part.chars();
                while let Some(c) = chars.next() {
                    if c == '\x1b' {
                        // CSI: ESC [ parameters final-letter.
                        for c in chars.by_ref() {
                            if c.is_ascii_alphabetic() {
                                break;
                            }
                        }
                    } else {
                        text.push(c);
                    }
                }
                text
            })
            .filter(|line| !line.is_empty())
            .collect()
    }

    /// The last thing done to the screen erased the progress line.
    fn cleared_at_the_end(screen: &str) -> bool {
        screen
            .rfind("\r\x1b[2K")
            .is_some_and(|at| drawn_lines(&screen[at..]).is_empty())
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
    fn a_terminal_gets_a_loading_bar_that_tokens_clear() {
        let (mut console, out, screen) = on_terminal(80);
        console.progress(&loading(0.5));
        console.out(" Paris").unwrap();
        console.end_out_line().unwrap();
        let drawn = screen.text();
        let lines = drawn_lines(&drawn);
        let bar = lines
            .iter()
            .find(|line| line.contains("loading SmolLM2.gguf"))
            .unwrap_or_else(|| panic!("{drawn:?}"));
        assert!(bar.ends_with(" 50%"), "{bar:?}");
        assert_eq!(bar.matches('█').count(), BAR_WIDTH / 2, "{bar:?}");
        assert!(bar.contains('░'), "{bar:?}");
        assert!(cleared_at_the_end(&drawn), "{drawn:?}");
        assert!(!drawn.contains('\n'), "{drawn:?}");
        assert_eq!(out.text(), " Paris\n");
    }

    #[test]
    fn a_terminal_draws_downloads_as_a_bar_of_bytes() {
        let (mut console, _, screen) = on_terminal(100);
        console.progress(&JobEvent::Downloading {
            model: "hf:org/repo".into(),
            bytes_done: 1024 * 1024,
            bytes_total: Some(4 * 1024 * 1024),
            bytes_per_second: Some(2.0 * 1024.0 * 1024.0),
        });
        console.clear_status();
        let drawn = screen.text();
        let line = drawn_lines(&drawn)
            .into_iter()
            .find(|line| line.contains("downloading hf:org/repo"))
            .unwrap_or_else(|| panic!("{drawn:?}"));
        assert!(line.ends_with("1.00 MiB/4.00 MiB at 2.0 MiB/s"), "{line:?}");
        assert_eq!(line.matches('█').count(), BAR_WIDTH / 4, "{line:?}");
    }

    #[test]
    fn progress_lines_are_cut_to_the_terminal_width() {
        let width = 50;
        let (mut console, _, screen) = on_terminal(width);
        console.progress(&JobEvent::Narration {
            message: "a status much longer than the terminal is wide, which must not wrap onto a second line".into(),
        });
        console.progress(&JobEvent::Loading {
            model: "/models/a-model-file-with-a-rather-long-name-Q4_K_M.gguf".into(),
            fraction: 0.25,
            message: Some("reading the weights from the disk".into()),
        });
        console.clear_status();
        let drawn = screen.text();
        let lines = drawn_lines(&drawn);
        assert!(
            lines.iter().any(|l| l.contains("a status much")),
            "{drawn:?}"
        );
        assert!(lines.iter().any(|l| l.ends_with(" 25%")), "{drawn:?}");
        for line in &lines {
            assert!(
                line.chars().count() <= usize::from(width),
                "{} columns: {line:?}",
                line.chars().count()
            );
        }
    }

    #[test]
    fn notes_go_above_the_progress_line() {
        let (mut console, _, screen) = on_terminal(80);
        console.progress(&loading(0.1));
        console.note("queen ready");
        console.clear_status();
        let drawn = screen.text();
        assert!(drawn.contains("queen ready\n"), "{drawn:?}");
        assert!(cleared_at_the_end(&drawn), "{drawn:?}");
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
    fn a_prompt_leaves_the_line_to_the_person() {
        let (mut console, out, _) = captured(false, false);
        console.out("an answer").unwrap();
        console.prompt(">>> ").unwrap();
        // Their Enter ends the prompt's line; the answer starts on the next one.
        console.out("next").unwrap();
        console.end_out_line().unwrap();
        assert_eq!(out.text(), "an answer\n>>> next\n");
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
