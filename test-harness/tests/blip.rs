//! Streams survive a blip: a TCP proxy between the queen and a real worker (the worker
//! advertises the proxy's address, so the queen reaches it only through it) cuts their
//! connections mid-answer. The queen resumes the worker's stream with `Last-Event-ID` and the
//! client, on the job API and the OpenAI route alike, gets every token exactly once and one
//! terminal event; an outage longer than the queen's resume budget ends the answer with
//! `worker_lost` and cancels the worker's job. A proxy between the keeper and the queen does the
//! same to `rbee-keeper infer`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rbee_contract::{ErrorCode, JobEvent, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    Daemon, JobApi, KeeperEnv, RawStream, TcpProxy, free_port, send_signal, slow_model,
};

const TOKEN: &str = "blip-cluster-token";
/// Tokens each answer asks for: enough that a cut after the first few lands mid-generation
/// (the model makes about a thousand a second on a quiet machine), and more than a worker's job
/// buffers for an absent reader (1,024 events), so that a job whose reader is gone is still
/// running, held back, when its cancellation arrives.
const TOKENS: u32 = 1500;
const PROMPT: &str = "Once upon a time";
/// Bytes that come back through the proxy after the first token before it cuts: a few more
/// token events (each is about a hundred bytes on the wire).
const A_FEW_TOKENS: u64 = 400;

/// A queen with one worker for [`slow_model`], which the queen reaches only through a proxy.
struct Blip {
    queen: Daemon,
    worker: Daemon,
    proxy: TcpProxy,
    model: String,
}

impl Blip {
    async fn start() -> Blip {
        Blip::start_with(&[]).await
    }

    /// [`start`](Self::start), with `queen_args` added to the queen's.
    async fn start_with(queen_args: &[&str]) -> Blip {
        let model = std::fs::canonicalize(slow_model()).expect("the slow model's path");
        Blip::start_for(model, queen_args).await
    }

    async fn start_for(model: PathBuf, queen_args: &[&str]) -> Blip {
        let mut args = vec!["--heartbeat-interval", "100ms"];
        args.extend_from_slice(queen_args);
        let queen = Daemon::queen(&args, &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
        let port = free_port();
        let proxy = TcpProxy::start(&format!("127.0.0.1:{port}")).await;
        let model = model.display().to_string();
        let args: Vec<String> = [
            "--model",
            &model,
            "--port",
            &port.to_string(),
            "--worker-id",
            "w-blip",
            "--threads",
            "2",
            // Greedy answers are compared token for token; a reused prompt prefix is evaluated
            // in other batch shapes, which may move a near tie.
            "--no-prompt-cache",
            "--queen-url",
            &queen.url,
            "--advertise-url",
            &proxy.url,
            "--heartbeat-interval",
            "100ms",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let mut worker = Daemon::start(
            "llm-worker-rbee",
            &args,
            &[("RBEE_CLUSTER_TOKEN", TOKEN)],
            format!("http://127.0.0.1:{port}"),
        )
        .expect("start llm-worker-rbee");
        worker
            .wait_for("/v1/ready", Some(TOKEN), Duration::from_secs(60))
            .await
            .expect("the worker becomes ready");
        let blip = Blip {
            queen,
            worker,
            proxy,
            model,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let workers: Vec<WorkerInfo> =
                serde_json::from_value(blip.queen_json("/v1/workers").await["workers"].clone())
                    .expect("a worker list");
            if workers
                .iter()
                .any(|w| w.state == WorkerState::Ready && w.url == blip.proxy.url)
            {
                break blip;
            }
            assert!(
                Instant::now() < deadline,
                "the queen never listed the worker at the proxy's address: {workers:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn queen_json(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.queen.url))
            .await
            .expect("GET the queen")
            .json()
            .await
            .expect("JSON")
    }

    fn infer(&self) -> Value {
        json!({"operation": "infer", "model": self.model, "prompt": PROMPT,
               "max_tokens": TOKENS, "temperature": 0})
    }

    /// The answer with no cut, to compare against.
    async fn reference(&self) -> RawStream {
        let stream = JobApi::new(&self.queen.url, None)
            .run("/v1/jobs", &self.infer())
            .await;
        stream.assert_one_terminal_then_done("reference");
        assert!(
            matches!(stream.terminal(), Some(JobEvent::Done { .. })),
            "{:?}\nworker log:\n{}",
            stream.events,
            self.worker.log_text()
        );
        stream
    }

    /// Cuts the queen's connections to the worker once the client has seen its first token
    /// and a few more have come through the proxy; returns how many connections the proxy
    /// had forwarded by then.
    async fn cut_after_a_few_tokens(&self, first_token: tokio::sync::oneshot::Receiver<()>) -> u64 {
        first_token.await.expect("a first token");
        let seen = self.proxy.bytes_back();
        self.proxy
            .wait_bytes_back(seen + A_FEW_TOKENS, Duration::from_secs(30))
            .await;
        let connections = self.proxy.connections();
        self.proxy.cut();
        connections
    }

    /// Waits until the worker itself (not through the proxy) reports every slot free.
    async fn wait_worker_free(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let info = self.worker.worker_info(TOKEN).await;
            if info.slots_free == info.slots_total {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the worker still generates {within:?} later; its log:\n{}",
                self.worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn tokens(stream: &RawStream) -> Vec<(u32, String)> {
    stream
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            JobEvent::Token { token_id, text, .. } => Some((*token_id, text.clone())),
            _ => None,
        })
        .collect()
}

/// Reads a streamed answer to its end, raw, signalling once the first `marker` arrived.
async fn read_signalling(
    response: reqwest::Response,
    marker: &str,
    signal: tokio::sync::oneshot::Sender<()>,
) -> String {
    let mut signal = Some(signal);
    let mut body = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        body.push_str(
            std::str::from_utf8(&chunk.expect("the client's own connection holds")).expect("UTF-8"),
        );
        if body.contains(marker)
            && let Some(signal) = signal.take()
        {
            let _ = signal.send(());
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_between_queen_and_worker_loses_and_repeats_no_token() {
    let blip = Blip::start().await;
    let reference = blip.reference().await;
    let expected = tokens(&reference);
    assert!(expected.len() > 1100, "{:?}", reference.terminal());
    let Some(JobEvent::Done { finish_reason, .. }) = reference.terminal() else {
        unreachable!("the reference ended with `done`")
    };
    let finish_reason = serde_json::to_value(finish_reason).expect("a finish reason");

    // The job API.
    let api = JobApi::new(&blip.queen.url, None);
    let created = api.submit_ok("/v1/jobs", &blip.infer()).await;
    let response = api.open_stream(&created).await;
    let (signal, first_token) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(test_harness::read_raw_stream_signalling(response, signal));
    let before_cut = blip.cut_after_a_few_tokens(first_token).await;
    let stream = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the stream ends")
        .expect("the reader")
        .expect("a readable stream");
    assert!(
        blip.proxy.connections() > before_cut,
        "the queen reconnected to the worker after the cut"
    );
    stream.assert_one_terminal_then_done("queen after a cut");
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { .. })),
        "{:?}\nqueen log:\n{}",
        stream.events,
        blip.queen.log_text()
    );
    assert_eq!(tokens(&stream), expected, "every token exactly once");
    // The queen's own ids are its own sequence, unbroken by the resume below it.
    let ids: Vec<u64> = stream
        .events
        .iter()
        .map(|(id, _)| id.as_deref().and_then(|i| i.parse().ok()).expect("an id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    // The OpenAI streaming route.
    let expected_text: String = expected.iter().map(|(_, text)| text.as_str()).collect();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", blip.queen.url))
        .json(
            &json!({"model": blip.model, "prompt": PROMPT, "max_tokens": TOKENS,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .expect("POST /v1/completions");
    assert_eq!(response.status(), 200);
    let (signal, first_token) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(read_signalling(response, "\"text\":", signal));
    let before_cut = blip.cut_after_a_few_tokens(first_token).await;
    let body = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the stream ends")
        .expect("the reader");
    assert!(
        blip.proxy.connections() > before_cut,
        "the queen reconnected"
    );
    let frames: Vec<&str> = body
        .split("\n\n")
        .filter_map(|frame| frame.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(frames.last(), Some(&"[DONE]"), "{body}");
    assert_eq!(
        frames.iter().filter(|f| **f == "[DONE]").count(),
        1,
        "{body}"
    );
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap_or_else(|e| panic!("{e}: {f}")))
        .collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "{body}");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&finish_reason], "one finish chunk: {body}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, expected_text, "every token exactly once");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_past_the_resume_budget_ends_with_worker_lost_and_frees_the_worker() {
    let blip = Blip::start().await;
    let api = JobApi::new(&blip.queen.url, None);
    let created = api.submit_ok("/v1/jobs", &blip.infer()).await;
    let response = api.open_stream(&created).await;
    let (signal, first_token) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(test_harness::read_raw_stream_signalling(response, signal));
    first_token.await.expect("a first token");
    blip.proxy.refuse(true);
    blip.proxy.cut();
    let cut_at = Instant::now();

    // The queen gives up after its few resumes, well before the outage ends.
    let stream = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("the stream ends, not hangs")
        .expect("the reader")
        .expect("a readable stream");
    stream.assert_one_terminal_then_done("queen after an outage");
    match stream.terminal() {
        Some(JobEvent::Error { code, message }) => {
            assert_eq!(*code, ErrorCode::WorkerLost, "{message}");
        }
        other => panic!("{other:?}\nqueen log:\n{}", blip.queen.log_text()),
    }
    assert!(!tokens(&stream).is_empty());
    let outage = Duration::from_secs(4);
    assert!(
        cut_at.elapsed() < outage,
        "the answer ended within the outage: {:?}",
        cut_at.elapsed()
    );

    // Once the worker can be reached again, the queen's cancellation gets through: the
    // worker's job ends by request, long before its own detached timeout would end it.
    tokio::time::sleep(outage.saturating_sub(cut_at.elapsed())).await;
    blip.proxy.refuse(false);
    blip.wait_worker_free(Duration::from_secs(15)).await;
    assert!(
        blip.worker.log_text().contains("job cancelled by request"),
        "the worker's job was cancelled by the queen; its log:\n{}",
        blip.worker.log_text()
    );

    // And the next request is served.
    let next = blip.reference().await;
    assert!(!tokens(&next).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queen_stopped_mid_answer_cancels_the_workers_job_before_it_exits() {
    let mut blip = Blip::start_with(&["--shutdown-grace", "200ms"]).await;
    let api = JobApi::new(&blip.queen.url, None);
    let created = api.submit_ok("/v1/jobs", &blip.infer()).await;
    let response = api.open_stream(&created).await;
    let (signal, first_token) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(test_harness::read_raw_stream_signalling(response, signal));
    first_token.await.expect("a first token");
    blip.queen.signal("TERM").expect("SIGTERM the queen");
    let stream = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("the stream ends")
        .expect("the reader")
        .expect("a readable stream");
    stream.assert_one_terminal_then_done("queen stopping");
    assert!(
        matches!(
            stream.terminal(),
            Some(JobEvent::Error {
                code: ErrorCode::ShuttingDown,
                ..
            })
        ),
        "{:?}",
        stream.terminal()
    );
    assert_eq!(
        blip.queen
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("the queen exits"),
        Some(0)
    );
    // Closing the connection does not end the worker's job; the queen's DELETE, sent before
    // it exited, did (its detached timeout would have taken 30 s).
    blip.wait_worker_free(Duration::from_secs(5)).await;
    assert!(
        blip.worker.log_text().contains("job cancelled by request"),
        "{}",
        blip.worker.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keeper_infer_prints_the_whole_answer_once_across_a_cut_to_the_queen() {
    let blip = Blip::start().await;
    let to_queen = TcpProxy::start(&blip.queen.url).await;
    let keeper = KeeperEnv::new(&[]);
    let tokens = TOKENS.to_string();
    let args = |queen: &str| -> Vec<String> {
        [
            "--queen-url",
            queen,
            "infer",
            "--model",
            &blip.model,
            "--max-tokens",
            &tokens,
            "--temperature",
            "0",
            PROMPT,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let direct = args(&blip.queen.url);
    let direct: Vec<&str> = direct.iter().map(String::as_str).collect();
    let reference = keeper.run(&direct, Duration::from_secs(120)).await;
    assert_eq!(reference.code, Some(0), "{reference:?}");
    assert!(!reference.stdout.trim().is_empty(), "{reference:?}");

    let proxied = args(&to_queen.url);
    let proxied: Vec<&str> = proxied.iter().map(String::as_str).collect();
    let (out, before_cut) = tokio::join!(keeper.run(&proxied, Duration::from_secs(120)), async {
        // The creation's answer, the stream's headers and a few token events.
        to_queen
            .wait_bytes_back(1200, Duration::from_secs(60))
            .await;
        let connections = to_queen.connections();
        to_queen.cut();
        connections
    });
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        to_queen.connections() > before_cut,
        "the keeper reconnected after the cut: {out:?}"
    );
    assert_eq!(out.stdout, reference.stdout, "the whole answer, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn keeper_infer_across_a_queen_restart_ends_with_one_clear_line() {
    let mut blip = Blip::start().await;
    let to_queen = TcpProxy::start(&blip.queen.url).await;
    let keeper = KeeperEnv::new(&[]);
    let port: u16 = blip
        .queen
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the queen's port");
    let tokens = TOKENS.to_string();
    let args = [
        "--queen-url",
        &to_queen.url,
        "infer",
        "--model",
        &blip.model.clone(),
        "--max-tokens",
        &tokens,
        "--temperature",
        "0",
        PROMPT,
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, ()) = tokio::join!(keeper.run(&args, Duration::from_secs(60)), async {
        to_queen
            .wait_bytes_back(1200, Duration::from_secs(60))
            .await;
        // The queen dies mid-answer and a new one takes its place: it never heard of the job.
        blip.queen.signal("KILL").expect("kill the queen");
        blip.queen
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("the queen exits");
        blip.queen = Daemon::queen_on(
            port,
            &["--heartbeat-interval", "100ms"],
            &[("RBEE_CLUSTER_TOKEN", TOKEN)],
        )
        .await;
    });
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        !out.stdout.is_empty(),
        "the answer so far was printed: {out:?}"
    );
    let last = out.stderr.lines().rfind(|l| !l.trim().is_empty());
    assert!(
        last.is_some_and(|l| l.contains("no longer knows job") && l.contains("restarted")),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("backtrace"),
        "{out:?}"
    );
}

/// A keeper ended by SIGTERM or SIGHUP (its terminal closed) cancels its job as Ctrl-C does,
/// in `infer` and in `chat`, and exits as interrupted: the job outlives a closed connection, so
/// without the keeper's DELETE the queen would relay it, and the worker hold its slot, until the
/// queen's detached timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_terminated_mid_answer_cancels_its_job() {
    let blip = Blip::start().await;
    let to_queen = TcpProxy::start(&blip.queen.url).await;
    let keeper = KeeperEnv::new(&[]);
    let tokens = TOKENS.to_string();
    let cancelled = |log: String| log.matches("job cancelled by request").count();
    let cases = [("infer", "TERM"), ("infer", "HUP"), ("chat", "TERM")];
    for (times, (command, signal)) in (1..).zip(cases) {
        let mut args = vec![
            "--queen-url",
            &to_queen.url,
            command,
            "--model",
            &blip.model,
        ];
        args.extend(["--max-tokens", &tokens, "--temperature", "0"]);
        if command == "infer" {
            args.push(PROMPT);
        }
        let mut child = keeper
            .command(&args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn rbee-keeper");
        let mut stdin = child.stdin.take().expect("the keeper's stdin");
        if command == "chat" {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(format!("{PROMPT}\n").as_bytes())
                .await
                .expect("a chat line");
        }
        let seen = to_queen.bytes_back();
        to_queen
            .wait_bytes_back(seen + 1200, Duration::from_secs(60))
            .await;
        send_signal(child.id().expect("the keeper's pid"), signal);
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{command} exits after SIG{signal}"))
            .expect("its status");
        drop(stdin);
        assert_eq!(status.code(), Some(130), "{command} after SIG{signal}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while cancelled(blip.queen.log_text()) < times || cancelled(blip.worker.log_text()) < times
        {
            assert!(
                Instant::now() < deadline,
                "{command} after SIG{signal}: the job was not cancelled\nqueen log:\n{}\nworker \
                 log:\n{}",
                blip.queen.log_text(),
                blip.worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        blip.wait_worker_free(Duration::from_secs(5)).await;
    }
}
