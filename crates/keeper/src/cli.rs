//! The command line, as clap types. Parsing only: meaning is given in `commands`.

use clap::{Args, Parser, Subcommand};

/// The default queen, also what a fresh machine auto-starts.
pub const DEFAULT_QUEEN_URL: &str = "http://127.0.0.1:7833";

#[derive(Debug, Parser)]
#[command(
    name = "rbee-keeper",
    version,
    about = "Run LLM inference on an rbee cluster, and manage the cluster",
    long_about = "Run LLM inference on an rbee cluster, and manage the cluster.\n\n\
        On a single machine `rbee-keeper infer` (and `chat`) starts a local queen and hive in the \
        background when none answers; they keep running until `rbee-keeper queen stop`.\n\n\
        Exit codes: 0 success, 1 failure, 2 usage or configuration error, \
        3 (status commands) not running, 130 interrupted."
)]
pub struct Cli {
    /// The queen to talk to [default: `queen_url` from the config file, else http://127.0.0.1:7833].
    #[arg(long, global = true, env = "RBEE_QUEEN_URL", value_name = "URL")]
    pub queen_url: Option<String>,
    /// Machine-readable output on stdout (JSON; one event per line for `infer` and `chat`).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text: tokens on stdout, progress on stderr.
    Infer(InferArgs),
    /// Talk with a model: each line you type is a turn, answered with the whole conversation.
    ///
    /// `/clear` forgets the conversation, `/exit` (or Ctrl-D, or Ctrl-C at the prompt) leaves;
    /// Ctrl-C during an answer stops it and drops that turn.
    Chat(ChatArgs),
    /// Start, stop or inspect the queen.
    #[command(subcommand)]
    Queen(QueenCommand),
    /// Start, stop or inspect the local hive; list the cluster's hives.
    #[command(subcommand)]
    Hive(HiveCommand),
    /// Spawn, list or stop workers.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Download, list, inspect or remove models in a hive's catalog.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// A local .gguf file or safetensors directory, or an `hf:org/repo[:file]` reference.
    #[arg(long, short)]
    pub model: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A system message (implies --chat).
    #[arg(long, value_name = "S")]
    pub system: Option<String>,
    /// Send the prompt as a user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// The prompt; `-` reads it from standard input.
    pub prompt: String,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A local .gguf file or safetensors directory, or an `hf:org/repo[:file]` reference.
    #[arg(long, short)]
    pub model: String,
    /// The system message that starts the conversation (kept by `/clear`).
    #[arg(long, value_name = "S")]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// How each answer is generated: the same flags for `infer` and `chat`.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate [default: the worker's].
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u32>,
    /// 0 is greedy.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample only from the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Sample only from the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<u32>,
    /// Seed of the sampler, for repeatable output.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop generating at this text (repeatable).
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum QueenCommand {
    /// Start a local queen at the queen URL's port, in the background.
    Start(PassThrough),
    /// Ask the queen to shut down (it stops its hives first) and wait until it is gone.
    Stop,
    /// Whether the queen answers, with its hive and worker counts.
    Status,
}

#[derive(Debug, Args)]
pub struct PassThrough {
    /// Extra flags for the daemon, after `--` (e.g. `-- --heartbeat-interval 500ms`).
    #[arg(last = true, value_name = "DAEMON_FLAGS")]
    pub extra: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum HiveCommand {
    /// Start a local hive in the background that registers with the queen.
    Start(HiveStartArgs),
    /// Stop the local hive (and its workers).
    Stop,
    /// The local hive's process and its registration at the queen.
    Status,
    /// Every hive the queen knows, with its health.
    List,
}

#[derive(Debug, Args)]
pub struct HiveStartArgs {
    /// Port of the hive [default: 7835 beside a default queen, else a free port].
    #[arg(long)]
    pub port: Option<u16>,
    /// The hive's id in the cluster [default: RBEE_HIVE_ID, else the host name].
    #[arg(long, value_name = "ID")]
    pub hive_id: Option<String>,
    #[command(flatten)]
    pub pass: PassThrough,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Start a worker for a model on a hive; prints it once it is ready.
    Spawn(WorkerSpawnArgs),
    /// The workers the queen knows (from their heartbeats).
    List(WorkerListArgs),
    /// Stop a worker.
    Stop(WorkerStopArgs),
}

#[derive(Debug, Args)]
pub struct WorkerSpawnArgs {
    /// A local .gguf file or safetensors directory (on the hive's machine), or an
    /// `hf:org/repo[:file.gguf]` reference the hive downloads first.
    #[arg(long, short)]
    pub model: String,
    /// cpu, cuda:N or metal:N [default: the hive's choice].
    #[arg(long)]
    pub device: Option<String>,
    /// The hive to spawn on [default: the only hive].
    #[arg(long, value_name = "ID")]
    pub hive: Option<String>,
}

#[derive(Debug, Args)]
pub struct WorkerListArgs {
    /// Only this hive's workers.
    #[arg(long, value_name = "ID")]
    pub hive: Option<String>,
}

#[derive(Debug, Args)]
pub struct WorkerStopArgs {
    /// The worker's id, as `worker list` shows it.
    pub worker_id: String,
    /// The worker's hive [default: looked up in the queen's worker list].
    #[arg(long, value_name = "ID")]
    pub hive: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a model from the hub into a hive's catalog, with progress.
    Download(ModelArgs),
    /// The models in a hive's catalog.
    List(ModelListArgs),
    /// One model of a hive's catalog: file, size, sha256, state.
    Get(ModelArgs),
    /// Delete a model's files and catalog entry (refused while a worker runs it).
    Rm(ModelArgs),
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// `hf:org/repo` (the hive picks a GGUF file) or `hf:org/repo:file.gguf`.
    pub model: String,
    /// The hive [default: the only hive].
    #[arg(long, value_name = "ID")]
    pub hive: Option<String>,
}

#[derive(Debug, Args)]
pub struct ModelListArgs {
    /// The hive [default: the only hive].
    #[arg(long, value_name = "ID")]
    pub hive: Option<String>,
}

/// A clap error other than help/version as one line: its first paragraph, folded.
///
/// clap's own rendering spans several lines (usage, tips); the keeper promises one line per
/// error so that scripts and logs stay readable.
pub fn usage_error_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let paragraph: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let joined = paragraph.join(" ");
    let message = joined.strip_prefix("error: ").unwrap_or(&joined);
    format!("{message} (see `rbee-keeper --help`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rbee-keeper").chain(args.iter().copied()))
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&[
            "worker",
            "list",
            "--json",
            "--queen-url",
            "http://127.0.0.1:1",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.queen_url.as_deref(), Some("http://127.0.0.1:1"));
        assert!(matches!(
            cli.command,
            Command::Worker(WorkerCommand::List(_))
        ));
    }

    #[test]
    fn infer_takes_sampling_flags_and_repeated_stops() {
        let cli = parse(&[
            "infer",
            "-m",
            "m.gguf",
            "--temperature",
            "0",
            "--stop",
            "a",
            "--stop",
            "b",
            "hi",
        ])
        .unwrap();
        let Command::Infer(args) = cli.command else {
            panic!("not infer")
        };
        assert_eq!(args.sampling.temperature, Some(0.0));
        assert_eq!(args.sampling.stop, ["a", "b"]);
        assert_eq!(args.prompt, "hi");
    }

    #[test]
    fn daemon_flags_pass_through_after_dashes() {
        let cli = parse(&["hive", "start", "--port", "9", "--", "--stop-grace", "1s"]).unwrap();
        let Command::Hive(HiveCommand::Start(args)) = cli.command else {
            panic!("not hive start")
        };
        assert_eq!(args.port, Some(9));
        assert_eq!(args.pass.extra, ["--stop-grace", "1s"]);
    }

    #[test]
    fn usage_errors_fold_into_one_line() {
        let err = parse(&["frobnicate"]).unwrap_err();
        let line = usage_error_line(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("frobnicate"), "{line}");

        let err = parse(&["infer", "hi"]).unwrap_err();
        let line = usage_error_line(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("--model"), "{line}");
    }
}
