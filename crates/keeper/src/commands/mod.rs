//! The commands, and what they share: the context, following a job's stream, tables.

mod chat;
mod cluster;
mod hive;
mod infer;
mod model;
mod queen;
mod worker;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use job_client::JobHandle;
use rbee_contract::{FinishReason, InferRequest, JobEvent, Operation, Usage};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::Outcome;
use crate::cli::{Command, HiveCommand, ModelCommand, QueenCommand, WorkerCommand};
use crate::config::Settings;
use crate::console::Console;
use crate::error::KeeperError;
use crate::local::StateDir;
use crate::queen_api::Queen;

/// How long a Ctrl-C waits for the queen to acknowledge the job's cancellation.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Ctx<'a> {
    pub settings: Settings,
    pub queen: Queen,
    pub console: &'a mut Console,
    pub interrupt: CancellationToken,
}

impl Ctx<'_> {
    pub fn state(&self) -> Result<StateDir, KeeperError> {
        self.settings.state_dir().map(StateDir::new)
    }
}

pub(crate) async fn dispatch(command: Command, ctx: &mut Ctx<'_>) -> Result<Outcome, KeeperError> {
    let interrupt = ctx.interrupt.clone();
    match command {
        // Job commands watch the interrupt themselves: they must cancel their job first.
        Command::Infer(args) => infer::infer(ctx, args).await.map(|()| Outcome::Done),
        Command::Chat(args) => chat::chat(ctx, args).await.map(|()| Outcome::Done),
        Command::Worker(WorkerCommand::Spawn(args)) => {
            worker::spawn(ctx, args).await.map(|()| Outcome::Done)
        }
        Command::Worker(WorkerCommand::Stop(args)) => {
            worker::stop(ctx, args).await.map(|()| Outcome::Done)
        }
        Command::Worker(WorkerCommand::List(args)) => {
            until_interrupted(&interrupt, worker::list(ctx, args)).await
        }
        Command::Queen(QueenCommand::Start(args)) => {
            until_interrupted(&interrupt, queen::start(ctx, args.extra)).await
        }
        Command::Queen(QueenCommand::Stop) => until_interrupted(&interrupt, queen::stop(ctx)).await,
        Command::Queen(QueenCommand::Status) => {
            until_interrupted(&interrupt, queen::status(ctx)).await
        }
        Command::Hive(HiveCommand::Start(args)) => {
            until_interrupted(&interrupt, hive::start(ctx, args)).await
        }
        Command::Hive(HiveCommand::Stop) => until_interrupted(&interrupt, hive::stop(ctx)).await,
        Command::Hive(HiveCommand::Status) => {
            until_interrupted(&interrupt, hive::status(ctx)).await
        }
        Command::Hive(HiveCommand::List) => until_interrupted(&interrupt, hive::list(ctx)).await,
        Command::Model(command) => {
            let done = match command {
                ModelCommand::Download(args) => model::download(ctx, args).await,
                ModelCommand::List(args) => model::list(ctx, args).await,
                ModelCommand::Get(args) => model::get(ctx, args).await,
                ModelCommand::Rm(args) => model::remove(ctx, args).await,
            };
            done.map(|()| Outcome::Done)
        }
    }
}

/// Runs `work` unless Ctrl-C comes first.
pub(crate) async fn until_interrupted<T>(
    interrupt: &CancellationToken,
    work: impl Future<Output = Result<T, KeeperError>>,
) -> Result<T, KeeperError> {
    tokio::select! {
        biased;
        () = interrupt.cancelled() => Err(KeeperError::Interrupted),
        result = work => result,
    }
}

/// How a job ended when it ended well.
#[derive(Debug)]
pub(crate) struct JobEnd {
    pub finish_reason: FinishReason,
    pub usage: Option<Usage>,
    /// Every `data` event's value, in order.
    pub data: Vec<Value>,
    /// When the first token arrived, for speed figures.
    pub first_token: Option<Instant>,
    /// The tokens' text, joined.
    pub text: String,
}

/// What a followed job's events put on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Show {
    /// Token text as it arrives; progress on stderr.
    Tokens,
    /// Every event as one JSON line (`--json` for streaming commands).
    EventLines,
    /// Nothing: the command prints its result itself; progress on stderr.
    Nothing,
}

enum Step {
    Event(Option<Result<JobEvent, job_client::ClientError>>),
    Interrupted,
}

/// Follows a job to its terminal event, showing its events as `show` says. An `error` event
/// is returned as
/// [`KeeperError::Remote`]; Ctrl-C cancels the job on the server and returns
/// [`KeeperError::Interrupted`]. A broken stream is resumed by job-client (each event shown
/// once); one that cannot be resumed cancels the job and is an error.
pub(crate) async fn follow(
    ctx: &mut Ctx<'_>,
    handle: JobHandle,
    what: &str,
    show: Show,
) -> Result<JobEnd, KeeperError> {
    let mut events = handle.clone().events();
    let mut data = Vec::new();
    let mut first_token = None;
    let mut answer = String::new();
    loop {
        let step = tokio::select! {
            biased;
            () = ctx.interrupt.cancelled() => Step::Interrupted,
            event = events.next() => Step::Event(event),
        };
        let event = match step {
            Step::Interrupted => {
                ctx.console.clear_status();
                // Closing the stream does not end a job submitted resumable (and may not be
                // noticed at once); the DELETE does.
                drop(events);
                let _ = tokio::time::timeout(CANCEL_TIMEOUT, handle.cancel()).await;
                return Err(KeeperError::Interrupted);
            }
            Step::Event(None) => {
                abandon(&handle).await;
                return Err(KeeperError::Client(format!(
                    "{what} ended the job stream without a result"
                )));
            }
            Step::Event(Some(Err(err))) => {
                ctx.console.clear_status();
                return Err(stream_failed(what, &handle, err).await);
            }
            Step::Event(Some(Ok(event))) => event,
        };
        if show == Show::EventLines
            && let Err(err) = ctx.console.out_json(&event)
        {
            let _ = tokio::time::timeout(CANCEL_TIMEOUT, handle.cancel()).await;
            return Err(err);
        }
        match event {
            JobEvent::Token { text, .. } => {
                first_token.get_or_insert_with(Instant::now);
                answer.push_str(&text);
                if show == Show::Tokens
                    && let Err(err) = ctx.console.out(&text)
                {
                    let _ = tokio::time::timeout(CANCEL_TIMEOUT, handle.cancel()).await;
                    return Err(err);
                }
            }
            JobEvent::Data { data: value } => data.push(value),
            JobEvent::Done {
                finish_reason,
                usage,
            } => {
                ctx.console.clear_status();
                return Ok(JobEnd {
                    finish_reason,
                    usage,
                    data,
                    first_token,
                    text: answer,
                });
            }
            JobEvent::Error { code, message } => {
                return Err(KeeperError::Remote { code, message });
            }
            progress => {
                if show != Show::EventLines {
                    ctx.console.progress(&progress);
                }
            }
        }
    }
}

/// A job the keeper stops following before its end is cancelled: one submitted with
/// `cancel_on_disconnect=false` would otherwise run on, unread, until the queen's detached
/// timeout.
async fn abandon(handle: &JobHandle) {
    let _ = tokio::time::timeout(CANCEL_TIMEOUT, handle.cancel()).await;
}

/// The error of a job stream that broke and could not be resumed, the job cancelled if the
/// queen still has it. A `404` on resuming means the queen no longer knows the job (it
/// restarted): said in one line, not as the queen's bare "no job" refusal.
async fn stream_failed(
    what: &str,
    handle: &JobHandle,
    err: job_client::ClientError,
) -> KeeperError {
    if err.status() == Some(404) {
        return KeeperError::Client(format!(
            "{what} no longer knows job {} (it restarted?); the answer is incomplete",
            handle.job_id
        ));
    }
    abandon(handle).await;
    KeeperError::client(what, err)
}

/// Submits an `infer` job to the queen and streams its answer (tokens, or the events one per
/// line with `--json`) to its end.
pub(crate) async fn infer_and_follow(
    ctx: &mut Ctx<'_>,
    request: InferRequest,
) -> Result<JobEnd, KeeperError> {
    let what = format!("the queen at {}", ctx.queen.url());
    let interrupt = ctx.interrupt.clone();
    let submitted = until_interrupted(&interrupt, async {
        ctx.queen
            .submit_resumable(&Operation::Infer(request))
            .await
            .map_err(|e| KeeperError::client(&what, e))
    })
    .await?;
    let show = if ctx.console.json() {
        Show::EventLines
    } else {
        Show::Tokens
    };
    let end = follow(ctx, submitted, &what, show).await?;
    ctx.console.end_out_line()?;
    Ok(end)
}

/// The model as the queen should see it: an existing local path made absolute (the daemons
/// run elsewhere, with another working directory), anything else as given. When the queen
/// is local, a path that does not exist is an error before anything starts.
pub(crate) fn resolve_model(model: &str, queen_is_local: bool) -> Result<String, KeeperError> {
    let model = model.trim();
    if model.is_empty() {
        return Err(KeeperError::Usage("the model is empty".into()));
    }
    if model.starts_with("hf:") {
        return Ok(model.to_owned());
    }
    let path = Path::new(model);
    if path.exists() {
        return path
            .canonicalize()
            .map(|p| p.display().to_string())
            .map_err(|e| KeeperError::io(format!("cannot resolve {model}"), e));
    }
    let looks_like_path = model.contains('/')
        || model.starts_with('.')
        || model.ends_with(".gguf")
        || model.ends_with(".safetensors");
    if queen_is_local && looks_like_path {
        return Err(KeeperError::ModelPathMissing(path.to_owned()));
    }
    Ok(model.to_owned())
}

/// Left-aligned columns, two spaces apart; the first row is the header.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_paths_become_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"x").unwrap();
        let resolved = resolve_model(file.to_str().unwrap(), true).unwrap();
        assert_eq!(resolved, file.canonicalize().unwrap().display().to_string());
    }

    #[test]
    fn missing_paths_fail_early_only_for_a_local_queen() {
        let err = resolve_model("/nowhere/m.gguf", true).unwrap_err();
        assert!(matches!(err, KeeperError::ModelPathMissing(_)));
        assert!(err.to_string().contains("/nowhere/m.gguf"));
        // A remote queen's hives have their own file systems.
        assert_eq!(
            resolve_model("/nowhere/m.gguf", false).unwrap(),
            "/nowhere/m.gguf"
        );
        assert_eq!(resolve_model("hf:org/repo", true).unwrap(), "hf:org/repo");
        assert_eq!(resolve_model("smollm2", true).unwrap(), "smollm2");
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["A".to_string(), "BB".into(), "C".into()],
            vec!["long".to_string(), "x".into(), "y".into()],
        ];
        assert_eq!(table(&rows), "A     BB  C\nlong  x   y\n");
    }
}
