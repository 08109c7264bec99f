//! The worker's prompt cache, as a client sees it: a conversation's later turns report cached
//! prompt tokens in `usage` (also after an unrelated request took the only slot in between:
//! the store kept the history) and get exactly the tokens a worker without the cache gives;
//! the worker's `/metrics` counts the hits, and its heartbeats report the prefix keys of the
//! conversation it holds.

use rbee_contract::{JobEvent, Usage};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use test_harness::{Daemon, HeartbeatReceiver, JobApi, RawStream, tiny_model};

const TOKEN: &str = "prompt-cache-token";

const USERS: [&str; 3] = [
    "Tell me a story about a bee who lives in a garden full of flowers.",
    "What did the bee find under the old oak tree?",
    "And how does the story end?",
];

fn turn_request(answers: &[String]) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are a storyteller."})];
    for (i, user) in USERS.iter().enumerate().take(answers.len() + 1) {
        messages.push(json!({"role": "user", "content": user}));
        if let Some(answer) = answers.get(i) {
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
    json!({"operation": "infer", "model": "tiny", "messages": messages,
           "max_tokens": 12, "temperature": 0.7, "seed": 11})
}

fn unrelated_request() -> Value {
    json!({"operation": "infer", "model": "tiny",
           "prompt": "Something else entirely, long enough to be worth keeping: one two three four five six seven eight nine ten",
           "max_tokens": 4, "temperature": 0})
}

struct Outcome {
    ids: Vec<u32>,
    text: String,
    usage: Usage,
}

fn outcome(stream: &RawStream) -> Outcome {
    stream.assert_one_terminal_then_done("worker");
    let ids = stream
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            JobEvent::Token { token_id, .. } => Some(*token_id),
            _ => None,
        })
        .collect();
    let usage = match stream.terminal() {
        Some(JobEvent::Done {
            usage: Some(usage), ..
        }) => *usage,
        other => panic!("a done event with usage, got {other:?}"),
    };
    Outcome {
        ids,
        text: stream.text(),
        usage,
    }
}

/// Runs the conversation's turns on `worker`, an unrelated request between every two turns.
/// Returns the turns and the last turn's request.
async fn converse(worker: &Daemon) -> (Vec<Outcome>, Value) {
    let jobs = JobApi::new(&worker.url, Some(TOKEN));
    let mut answers = Vec::new();
    let mut turns = Vec::new();
    let mut last = Value::Null;
    for _ in 0..USERS.len() {
        last = turn_request(&answers);
        let turn = outcome(&jobs.run("/v1/inference", &last).await);
        answers.push(turn.text.clone());
        turns.push(turn);
        outcome(&jobs.run("/v1/inference", &unrelated_request()).await);
    }
    (turns, last)
}

async fn metric(worker: &Daemon, name: &str) -> u64 {
    let page = reqwest::Client::new()
        .get(format!("{}/metrics", worker.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("a metrics page");
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} on the metrics page:\n{page}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn later_turns_reuse_the_history_and_get_the_same_tokens() {
    let model = tiny_model();
    let receiver = HeartbeatReceiver::start().await;
    let cached = Daemon::ready_worker(
        &model,
        TOKEN,
        &[
            "--prompt-cache-mib",
            "16",
            "--queen-url",
            &receiver.url,
            "--heartbeat-interval",
            "100ms",
        ],
    )
    .await;
    let plain = Daemon::ready_worker(&model, TOKEN, &["--no-prompt-cache"]).await;
    let (with_cache, last) = converse(&cached).await;
    let (without, _) = converse(&plain).await;

    for (turn, (a, b)) in with_cache.iter().zip(&without).enumerate() {
        assert_eq!(a.ids, b.ids, "turn {turn}: the tokens differ");
        assert_eq!(a.text, b.text, "turn {turn}");
        assert_eq!(a.usage.prompt_tokens, b.usage.prompt_tokens, "turn {turn}");
        assert!(!a.ids.is_empty(), "turn {turn} generated nothing");
        assert_eq!(b.usage.cached_tokens, Some(0), "turn {turn}: cache off");
    }
    assert_eq!(with_cache[0].usage.cached_tokens, Some(0));
    for turn in 1..USERS.len() {
        let cached_tokens = with_cache[turn].usage.cached_tokens.expect("reported");
        let before = with_cache[turn - 1].usage.prompt_tokens;
        assert!(
            cached_tokens >= before && cached_tokens < with_cache[turn].usage.prompt_tokens,
            "turn {turn}: {cached_tokens} cached; the previous turn's prompt had {before} tokens\n{}",
            cached.log_text()
        );
    }
    // The turns after the first, at least (an unrelated request may share a first token).
    assert!(metric(&cached, "rbee_worker_prompt_cache_hits_total").await >= 2);
    let counted = metric(&cached, "rbee_worker_prompt_cached_tokens_total").await;
    let reported: u32 = with_cache
        .iter()
        .filter_map(|t| t.usage.cached_tokens)
        .sum();
    assert!(counted >= u64::from(reported), "{counted} < {reported}");
    assert!(metric(&cached, "rbee_worker_prompt_cache_store_bytes").await > 0);
    assert_eq!(
        metric(&plain, "rbee_worker_prompt_cache_hits_total").await,
        0
    );

    // The store holds the conversation's last turn: its prefix keys reach the heartbeats.
    let infer = match serde_json::from_value(last) {
        Ok(rbee_contract::Operation::Infer(req)) => req,
        other => panic!("an infer operation, got {other:?}"),
    };
    let keys = rbee_contract::prefix::prefix_keys(&infer);
    assert!(!keys.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reported = receiver
            .received()
            .last()
            .map(|(h, _)| h.cached_prefixes.clone());
        if reported
            .as_ref()
            .is_some_and(|r| keys.iter().all(|k| r.contains(k)))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat reported the conversation's keys {keys:?}: {reported:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The prefix keys of an `infer` operation as the queen computes them.
fn request_keys(operation: &Value) -> Vec<u64> {
    match serde_json::from_value(operation.clone()) {
        Ok(rbee_contract::Operation::Infer(req)) => rbee_contract::prefix::prefix_keys(&req),
        other => panic!("an infer operation, got {other:?}"),
    }
}

/// A heartbeat well after a conversation's first turn ended, on a worker that has served
/// nothing else (its slot was cold), still reports the turn's keys: the queen's memory of its
/// own dispatch lasts only two heartbeats, so the worker's report is what routes turn 2.
#[tokio::test(flavor = "multi_thread")]
async fn a_first_turn_on_a_cold_worker_stays_in_its_heartbeats() {
    let model = tiny_model();
    let receiver = HeartbeatReceiver::start().await;
    let worker = Daemon::ready_worker(
        &model,
        TOKEN,
        &[
            "--queen-url",
            &receiver.url,
            "--heartbeat-interval",
            "100ms",
        ],
    )
    .await;
    let first = turn_request(&[]);
    let keys = request_keys(&first);
    assert!(!keys.is_empty());
    let jobs = JobApi::new(&worker.url, Some(TOKEN));
    let turn = outcome(&jobs.run("/v1/inference", &first).await);
    assert!(!turn.ids.is_empty(), "the turn generated nothing");
    // More than three heartbeat intervals after the turn ended.
    let ended = receiver.received().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.received().len() < ended + 4 {
        assert!(
            Instant::now() < deadline,
            "the worker stopped sending heartbeats"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reported = receiver
        .received()
        .last()
        .map(|(h, _)| h.cached_prefixes.clone())
        .unwrap_or_default();
    assert!(
        keys.iter().all(|k| reported.contains(k)),
        "the last heartbeat lacks the first turn's keys {keys:?}: {reported:?}"
    );
}

/// After a chat turn, the worker's heartbeats carry the key of the answer as the next turn
/// sends it back (an assistant message with exactly the text the client received), so the
/// queen sees that the worker holds the whole history of a turn whose answer is long.
#[tokio::test(flavor = "multi_thread")]
async fn a_chat_turns_answer_has_a_key_in_the_heartbeats() {
    let model = tiny_model();
    let receiver = HeartbeatReceiver::start().await;
    let worker = Daemon::ready_worker(
        &model,
        TOKEN,
        &[
            "--queen-url",
            &receiver.url,
            "--heartbeat-interval",
            "100ms",
        ],
    )
    .await;
    let first = turn_request(&[]);
    let jobs = JobApi::new(&worker.url, Some(TOKEN));
    let turn = outcome(&jobs.run("/v1/inference", &first).await);
    assert!(!turn.text.is_empty(), "the turn generated no text");
    // The next turn's keys through the answer, as the queen computes them.
    let next = turn_request(std::slice::from_ref(&turn.text));
    let next_keys = request_keys(&next);
    let answer_key = next_keys[request_keys(&first).len()];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reported = receiver
            .received()
            .last()
            .map(|(h, _)| h.cached_prefixes.clone())
            .unwrap_or_default();
        if reported.contains(&answer_key) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat reported the answer's key {answer_key}: {reported:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
