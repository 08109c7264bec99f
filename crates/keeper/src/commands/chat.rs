//! `chat`: a conversation with a model. Each line read is a turn: the whole conversation so
//! far (system message, earlier turns, the new line) goes to the queen as one chat `infer` job,
//! its tokens are streamed, and the answer joins the conversation.
//!
//! Lines come from standard input, a terminal (the terminal's own line editing) or a pipe
//! (each line a turn, no prompt). Ctrl-C is read as a signal, not as input: during an answer
//! it cancels that answer's job and drops the turn; at the prompt it leaves. SIGTERM and SIGHUP
//! cancel the answer's job too and end the chat as interrupted.

use std::io::{BufRead, IsTerminal};
use std::sync::{Arc, Mutex, PoisonError};

use rbee_contract::{ChatMessage, ChatRole, ErrorCode, FinishReason, InferRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::ChatArgs;
use crate::commands::cluster::ensure_cluster;
use crate::commands::infer::sampled;
use crate::commands::{Ctx, infer_and_follow, resolve_model, until_interrupted};
use crate::console::short_model;
use crate::error::KeeperError;
use crate::queen_api::unreachable_error;

const PROMPT: &str = ">>> ";
const HELP: &str = "/clear  forget the conversation (the system message stays)\n\
/exit   leave (also /bye, Ctrl-D, or Ctrl-C at the prompt)\n\
Ctrl-C during an answer stops it; that turn is not kept";

pub(crate) async fn chat(ctx: &mut Ctx<'_>, args: ChatArgs) -> Result<(), KeeperError> {
    let model = resolve_model(&args.model, ctx.queen.url().is_local())?;
    let interrupt = ctx.interrupt.clone();
    until_interrupted(&interrupt, ensure_cluster(ctx)).await?;

    // A person at a terminal gets a prompt; a script's lines and JSON output get none.
    let interactive = std::io::stdin().is_terminal() && !ctx.console.json();
    let interrupts = Interrupts::listen();
    let mut lines = Lines::stdin();
    let mut conversation = Conversation::new(args.system.clone());
    if interactive {
        ctx.console.note(&format!(
            "chatting with {} through the queen at {}; /help for commands",
            short_model(&model),
            ctx.queen.url()
        ));
    }
    loop {
        let at_prompt = interrupts.arm();
        if interactive {
            ctx.console.prompt(PROMPT)?;
        }
        let line = tokio::select! {
            biased;
            () = at_prompt.cancelled() => None,
            line = lines.next() => line.map_err(|e| KeeperError::io("cannot read standard input", e))?,
        };
        if interrupts.ended.is_cancelled() {
            return Err(KeeperError::Interrupted);
        }
        let Some(line) = line else {
            // Ctrl-D or Ctrl-C left the cursor after the prompt.
            if interactive {
                ctx.console.out("\n")?;
            }
            return Ok(());
        };
        let text = match Input::parse(&line) {
            Input::Nothing => continue,
            Input::Exit => return Ok(()),
            Input::Clear => {
                conversation.clear();
                ctx.console.note("the conversation is cleared");
                continue;
            }
            Input::Help => {
                ctx.console.note(HELP);
                continue;
            }
            Input::Unknown(command) => {
                ctx.console
                    .error_line(&format!("unknown command {command} (/help lists them)"));
                continue;
            }
            Input::Say(text) => text,
        };

        let request = InferRequest {
            model: model.clone(),
            messages: Some(conversation.with(text.clone())),
            ..sampled(&args.sampling)
        };
        ctx.interrupt = interrupts.arm();
        match infer_and_follow(ctx, request).await {
            Ok(end) => {
                if end.finish_reason == FinishReason::Stop && end.text.trim().is_empty() {
                    ctx.console
                        .note("the model ended its answer at once, without text");
                }
                conversation.add(text, end.text);
                if interactive {
                    // A blank line between an answer and the next prompt, as a page has.
                    ctx.console.out("\n")?;
                }
            }
            Err(KeeperError::Interrupted) if interrupts.ended.is_cancelled() => {
                return Err(KeeperError::Interrupted);
            }
            Err(KeeperError::Interrupted) => {
                ctx.console.clear_status();
                ctx.console.end_out_line()?;
                ctx.console.note("answer stopped; this turn is not kept");
            }
            Err(err) => {
                let err = ends_the_chat(ctx, err).await?;
                // Only the turn failed: the conversation goes on without it.
                let message = err.to_string();
                ctx.console
                    .error_line(message.lines().next().unwrap_or_default());
            }
        }
    }
}

/// A failed turn's error back when only that turn failed; `Err` with what ends the
/// conversation when the queen is gone or going, or the output cannot be written.
async fn ends_the_chat(ctx: &Ctx<'_>, err: KeeperError) -> Result<KeeperError, KeeperError> {
    match err {
        KeeperError::Remote {
            code: ErrorCode::ShuttingDown,
            ..
        } => Err(KeeperError::Client(format!(
            "the queen at {} is shutting down; the conversation ends",
            ctx.queen.url()
        ))),
        // The queen answered: it refused this turn, or the job failed.
        KeeperError::Remote { .. } | KeeperError::Http { .. } => Ok(err),
        KeeperError::Io { .. } => Err(err),
        _ => match ctx.queen.health().await {
            Ok(()) => Ok(err),
            Err(reason) => Err(unreachable_error(ctx.queen.url(), reason)),
        },
    }
}

/// What a line typed at the prompt asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Nothing,
    Say(String),
    Exit,
    Clear,
    Help,
    Unknown(String),
}

impl Input {
    fn parse(line: &str) -> Input {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return Input::Nothing;
        }
        let Some(command) = trimmed.strip_prefix('/') else {
            return Input::Say(trimmed.to_owned());
        };
        match command {
            "exit" | "bye" | "quit" => Input::Exit,
            "clear" => Input::Clear,
            "help" | "?" => Input::Help,
            _ => Input::Unknown(
                trimmed
                    .split_whitespace()
                    .next()
                    .unwrap_or(trimmed)
                    .to_owned(),
            ),
        }
    }
}

/// The messages so far.
#[derive(Debug)]
struct Conversation {
    system: Option<String>,
    turns: Vec<ChatMessage>,
}

impl Conversation {
    fn new(system: Option<String>) -> Conversation {
        Conversation {
            system: system.filter(|s| !s.trim().is_empty()),
            turns: Vec::new(),
        }
    }

    /// The messages of a request that says `text` next.
    fn with(&self, text: String) -> Vec<ChatMessage> {
        let system = self
            .system
            .iter()
            .map(|s| message(ChatRole::System, s.clone()));
        system
            .chain(self.turns.iter().cloned())
            .chain(std::iter::once(message(ChatRole::User, text)))
            .collect()
    }

    fn add(&mut self, said: String, answer: String) {
        self.turns.push(message(ChatRole::User, said));
        self.turns.push(message(ChatRole::Assistant, answer));
    }

    fn clear(&mut self) {
        self.turns.clear();
    }
}

fn message(role: ChatRole, content: String) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// Ctrl-C as a stream of cancellations: each [`arm`](Self::arm) hands out the token the next
/// Ctrl-C cancels, so one Ctrl-C stops one answer and the chat goes on. SIGTERM or SIGHUP
/// cancels the armed token and `ended`: the chat stops.
struct Interrupts {
    current: Arc<Mutex<CancellationToken>>,
    ended: CancellationToken,
    listener: tokio::task::JoinHandle<()>,
}

impl Interrupts {
    fn listen() -> Interrupts {
        let current = Arc::new(Mutex::new(CancellationToken::new()));
        let ended = CancellationToken::new();
        let target = current.clone();
        let end = ended.clone();
        let listener = tokio::spawn(async move {
            let cancel = || {
                target
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .cancel();
            };
            let ctrl_c = async {
                while tokio::signal::ctrl_c().await.is_ok() {
                    cancel();
                }
            };
            tokio::select! {
                () = ctrl_c => {}
                () = crate::terminated() => {
                    end.cancel();
                    cancel();
                }
            }
        });
        Interrupts {
            current,
            ended,
            listener,
        }
    }

    fn arm(&self) -> CancellationToken {
        let token = CancellationToken::new();
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = token.clone();
        token
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Standard input's lines, read one at a time on request by a thread of their own (a blocking
/// read cannot be cancelled; the thread is left behind when the chat ends, and the process's
/// exit ends it).
struct Lines {
    ask: std::sync::mpsc::Sender<()>,
    answers: mpsc::Receiver<std::io::Result<Option<String>>>,
    asked: bool,
}

impl Lines {
    fn stdin() -> Lines {
        let (ask, asks) = std::sync::mpsc::channel::<()>();
        let (answer, answers) = mpsc::channel(1);
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            while asks.recv().is_ok() {
                let mut line = String::new();
                let read = stdin
                    .lock()
                    .read_line(&mut line)
                    .map(|n| (n > 0).then(|| line.trim_end_matches(['\n', '\r']).to_owned()));
                if answer.blocking_send(read).is_err() {
                    break;
                }
            }
        });
        Lines {
            ask,
            answers,
            asked: false,
        }
    }

    /// The next line; `None` at the end of input.
    async fn next(&mut self) -> std::io::Result<Option<String>> {
        if !self.asked {
            if self.ask.send(()).is_err() {
                return Ok(None);
            }
            self.asked = true;
        }
        let line = self.answers.recv().await.unwrap_or(Ok(None));
        self.asked = false;
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_turns_and_slash_commands() {
        assert_eq!(Input::parse("  "), Input::Nothing);
        assert_eq!(Input::parse(" Hi there \n"), Input::Say("Hi there".into()));
        assert_eq!(Input::parse("/exit"), Input::Exit);
        assert_eq!(Input::parse("/bye"), Input::Exit);
        assert_eq!(Input::parse("/clear"), Input::Clear);
        assert_eq!(Input::parse("/?"), Input::Help);
        assert_eq!(
            Input::parse("/frobnicate now"),
            Input::Unknown("/frobnicate".into())
        );
    }

    #[test]
    fn every_request_carries_the_conversation() {
        let mut conversation = Conversation::new(Some("Be brief.".into()));
        let first = conversation.with("Hi".into());
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].role, ChatRole::System);
        conversation.add("Hi".into(), "Hello!".into());
        let second = conversation.with("And now?".into());
        let roles: Vec<ChatRole> = second.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                ChatRole::System,
                ChatRole::User,
                ChatRole::Assistant,
                ChatRole::User
            ]
        );
        assert_eq!(second[2].content, "Hello!");
        assert_eq!(second[3].content, "And now?");

        conversation.clear();
        let cleared = conversation.with("Again".into());
        assert_eq!(cleared.len(), 2, "the system message stays");
        assert_eq!(cleared[0].content, "Be brief.");
    }
}
