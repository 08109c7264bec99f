//! `cargo xtask bench chat`: a multi-turn chat through the queen with two workers, as a chat
//! client drives it: every turn re-sends the whole history over the OpenAI route, streaming,
//! and the time to the first token shows what the workers' prompt caches and the queen's
//! cache-aware routing save.
//!
//! Two conversations take turns (A1, B1, A2, B2, …), each opening with a long document and
//! going on with short questions, so each later turn's prompt is the earlier history plus a
//! few dozen new tokens. Each turn's row says which worker ran it (from the workers'
//! `/metrics`), its prompt and cached tokens (from the streamed `usage`) and its time to first
//! token, also as a share of the conversation's first turn.
//!
//! Figures are printed, never asserted: speed depends on the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};
use serde_json::{Value, json};

use crate::bench::WorkerProcess;
use crate::bench_queen::{
    API_KEY, CLUSTER_TOKEN, free_port, start_queen, wait_answering, wait_listed,
};

/// The model name the workers register under.
const MODEL: &str = "bench-chat";
const WORKER_IDS: [&str; 2] = ["chat-w1", "chat-w2"];
const SYSTEM: &str = "You are a careful assistant. Answer briefly and precisely.";
const FOLLOW_UPS: [&str; 6] = [
    "Summarise the main point of that text in one sentence.",
    "Which detail in it surprised you most, and why?",
    "What would you ask the author if you could?",
    "Give me one practical consequence of it.",
    "Now list three keywords for it.",
    "Thank you. Anything else worth knowing?",
];

#[derive(Debug, clap::Args)]
pub struct ChatBench {
    /// A GGUF model to serve instead of the generated one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Preset of the generated llama model (when no --model is given).
    #[arg(long, default_value = "tinyllama")]
    preset: String,
    /// GGUF type of the generated model.
    #[arg(long, default_value = "q8_0")]
    format: GgufType,
    /// Turns of each conversation.
    #[arg(long, default_value_t = 5)]
    turns: usize,
    /// Tokens of the document that opens each conversation.
    #[arg(long, default_value_t = 1000)]
    document_tokens: usize,
    /// Tokens asked for in each answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Threads of each worker.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// One measured turn.
struct Turn {
    conversation: char,
    turn: usize,
    worker: &'static str,
    prompt_tokens: u64,
    cached_tokens: Option<u64>,
    ttft: Duration,
}

pub fn run(args: &ChatBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=FOLLOW_UPS.len() + 1).contains(&args.turns),
        "--turns must be between 1 and {}",
        FOLLOW_UPS.len() + 1
    );
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    // The dev profile builds the engine and every dependency at opt-level 3 (see Cargo.toml):
    // these are the binaries the tests run, built the way `cargo xtask test` builds them.
    eprintln!("building queen-rbee and llm-worker-rbee…");
    let root = crate::tasks::workspace_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--quiet", "--workspace", "--bins"])
        .status()?;
    anyhow::ensure!(status.success(), "building the binaries failed");
    let bin = |name: &str| root.join("target/debug").join(name);

    let model = match &args.model {
        Some(path) => {
            anyhow::ensure!(path.is_file(), "{} is not a file", path.display());
            path.clone()
        }
        None => {
            eprintln!("preparing the {} llama {} model…", args.preset, args.format);
            model_gen::ensure_generated(
                &ModelSpec::preset(&args.preset, Arch::Llama)?,
                ModelFormat::Gguf(args.format),
                &model_gen::paths::generated_dir(),
            )?
        }
    };
    let documents = [
        document(&model, args.document_tokens, 0)?,
        document(&model, args.document_tokens, 1)?,
    ];

    let runtime = tokio::runtime::Runtime::new()?;
    let turns = runtime.block_on(measure(
        args,
        &bin("queen-rbee"),
        &bin("llm-worker-rbee"),
        &model,
        &documents,
    ))?;
    let described = match &args.model {
        Some(path) => path.display().to_string(),
        None => format!("the generated {} llama {}", args.preset, args.format),
    };
    print_table(args, &described, &turns);
    Ok(())
}

async fn measure(
    args: &ChatBench,
    queen_bin: &Path,
    worker_bin: &Path,
    model: &Path,
    documents: &[String; 2],
) -> anyhow::Result<Vec<Turn>> {
    let (_queen, queen_url) = start_queen(queen_bin, "500ms", "warn").await?;

    // The workers' logs stay for a look at where a turn's time went ("generation ended" lines
    // carry prefill and decode times).
    let logs = crate::tasks::workspace_root().join("target/bench-chat");
    std::fs::create_dir_all(&logs)?;
    let mut workers = Vec::new();
    for id in WORKER_IDS {
        let log = std::fs::File::create(logs.join(format!("{id}.log")))?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut child = WorkerProcess(
            Command::new(worker_bin)
                .args(["--model", &model.display().to_string()])
                .args(["--model-ref", MODEL, "--worker-id", id])
                .args(["--port", &port.to_string()])
                .args(["--threads", &args.threads.to_string()])
                .args(["--queen-url", &queen_url, "--heartbeat-interval", "500ms"])
                .env("RBEE_CLUSTER_TOKEN", CLUSTER_TOKEN)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("start a worker")?,
        );
        let ready = format!("{url}/v1/ready");
        wait_answering("a worker", &ready, &mut child).await?;
        workers.push((child, url));
    }
    wait_listed(
        &queen_url,
        "/v1/workers",
        "the workers",
        |listed: &Value| {
            let ready = listed["workers"].as_array().map_or(0, |workers| {
                workers
                    .iter()
                    .filter(|w| w["model"] == MODEL && w["state"] == "ready")
                    .count()
            });
            ready == WORKER_IDS.len()
        },
    )
    .await?;
    eprintln!("worker logs: {}", logs.display());

    let http = reqwest::Client::new();
    let worker_urls: Vec<String> = workers.iter().map(|(_, url)| url.clone()).collect();
    let mut conversations: Vec<Vec<Value>> = documents
        .iter()
        .map(|doc| {
            vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": format!("Read this text.\n\n{doc}")}),
            ]
        })
        .collect();
    let mut turns = Vec::new();
    for turn in 0..args.turns {
        for (c, messages) in conversations.iter_mut().enumerate() {
            let conversation = (b'A' + c as u8) as char;
            eprintln!("conversation {conversation}, turn {}…", turn + 1);
            let before = generations(&http, &worker_urls).await?;
            let reply = chat(&http, &queen_url, messages, args.max_tokens).await?;
            let after = generations(&http, &worker_urls).await?;
            let ran: Vec<&'static str> = WORKER_IDS
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| a > b)
                .map(|(id, _)| *id)
                .collect();
            let [worker] = ran[..] else {
                bail!("expected one worker to run the turn, the counts went {before:?} → {after:?}")
            };
            turns.push(Turn {
                conversation,
                turn: turn + 1,
                worker,
                prompt_tokens: reply.prompt_tokens,
                cached_tokens: reply.cached_tokens,
                ttft: reply.ttft,
            });
            messages.push(json!({"role": "assistant", "content": reply.text}));
            if let Some(next) = FOLLOW_UPS.get(turn) {
                messages.push(json!({"role": "user", "content": next}));
            }
        }
    }
    Ok(turns)
}

struct Reply {
    text: String,
    ttft: Duration,
    prompt_tokens: u64,
    cached_tokens: Option<u64>,
}

/// One streamed `/v1/chat/completions` at the queen: the answer, the time from sending the
/// request to the first chunk with content, and the usage of the last chunk.
async fn chat(
    http: &reqwest::Client,
    queen_url: &str,
    messages: &[Value],
    max_tokens: u32,
) -> anyhow::Result<Reply> {
    let body = json!({
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let sent = Instant::now();
    let response = http
        .post(format!("{queen_url}/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        bail!(
            "/v1/chat/completions answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let mut chunks = response.bytes_stream();
    let mut pending = String::new();
    let (mut text, mut ttft, mut usage) = (String::new(), None, None);
    while let Some(chunk) = chunks.next().await {
        pending.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data)
                .with_context(|| format!("a chunk that is not JSON: {data}"))?;
            if let Some(error) = chunk.get("error") {
                bail!("the stream failed: {error}");
            }
            if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str()
                && !content.is_empty()
            {
                ttft.get_or_insert_with(|| sent.elapsed());
                text.push_str(content);
            }
            if chunk["usage"].is_object() {
                usage = Some(chunk["usage"].clone());
            }
        }
    }
    let usage = usage.context("the stream carried no usage")?;
    Ok(Reply {
        // An answer that ended at once still had its prompt evaluated: count to the end.
        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
        text,
        prompt_tokens: usage["prompt_tokens"].as_u64().context("prompt_tokens")?,
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"].as_u64(),
    })
}

/// Generations each worker has finished, from its `/metrics`.
async fn generations(http: &reqwest::Client, workers: &[String]) -> anyhow::Result<Vec<u64>> {
    let mut counts = Vec::new();
    for url in workers {
        let page = http
            .get(format!("{url}/metrics"))
            .bearer_auth(CLUSTER_TOKEN)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        counts.push(
            page.lines()
                .find_map(|l| {
                    l.strip_prefix("rbee_worker_generations_total ")?
                        .parse()
                        .ok()
                })
                .with_context(|| format!("no generation count on {url}/metrics"))?,
        );
    }
    Ok(counts)
}

fn print_table(args: &ChatBench, model: &str, turns: &[Turn]) {
    println!();
    println!(
        "chat benchmark: {} turns of two interleaved conversations through the queen's \
         /v1/chat/completions (streaming, greedy, max_tokens {}), two workers of {} ({} threads \
         each, one slot, the default prompt cache); each conversation opens with a {}-token \
         document, then asks short questions",
        args.turns, args.max_tokens, model, args.threads, args.document_tokens,
    );
    println!();
    println!(
        "| conversation | turn | worker | prompt tokens | cached tokens | TTFT ms | TTFT / turn 1 |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut worst: Option<f64> = None;
    for t in turns {
        let first = turns
            .iter()
            .find(|f| f.conversation == t.conversation && f.turn == 1)
            .map_or(t.ttft, |f| f.ttft);
        let share = t.ttft.as_secs_f64() / first.as_secs_f64() * 100.0;
        if t.turn > 1 {
            worst = Some(worst.map_or(share, |w| w.max(share)));
        }
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {share:.1} % |",
            t.conversation,
            t.turn,
            t.worker,
            t.prompt_tokens,
            t.cached_tokens
                .map_or_else(|| "not reported".to_string(), |c| c.to_string()),
            t.ttft.as_secs_f64() * 1e3,
        );
    }
    if let Some(worst) = worst {
        println!();
        println!(
            "turns 2–{}: TTFT at most {worst:.1} % of the conversation's first turn",
            args.turns
        );
    }
}

/// A text of about `tokens` tokens for the model's tokenizer, different for each `seed`.
fn document(model: &Path, tokens: usize, seed: usize) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(model)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("read {}", model.display()))?;
    let tokenizer = rbee_engine::TextTokenizer::from_gguf(&content)?;
    let subjects = [
        [
            "The river",
            "A farmer",
            "The old mill",
            "Every spring",
            "The village",
        ],
        [
            "The engine",
            "A pilot",
            "The control tower",
            "Each morning",
            "The airport",
        ],
    ];
    let verbs = [
        "carried",
        "watched",
        "measured",
        "repaired",
        "remembered",
        "described",
    ];
    let objects = [
        "the heavy stones from the hills",
        "a long letter about the harvest",
        "the narrow bridge near the school",
        "three boxes of tools and rope",
        "the weather for the coming week",
        "a map drawn by the first settlers",
        "the lights along the northern road",
    ];
    let subjects = subjects[seed % subjects.len()];
    let mut text = String::new();
    for i in 0.. {
        let sentence = format!(
            "{} {} {}. ",
            subjects[i % subjects.len()],
            verbs[(i / 2 + seed) % verbs.len()],
            objects[(i * 3 + seed) % objects.len()]
        );
        let candidate = format!("{text}{sentence}");
        if tokenizer.encode(candidate.trim_end(), false)?.len() > tokens {
            break;
        }
        text = candidate;
    }
    Ok(text.trim_end().to_string())
}
