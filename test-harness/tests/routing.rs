//! Cache-aware routing, as a client of a queen with two real workers sees it: interleaved
//! conversations each come back to the worker that holds their history (which then reports
//! the history's tokens as cached), and a turn whose worker has no free slot goes to the other
//! worker at once rather than wait; a heartbeat's report of cached prefixes is bounded. Which
//! worker ran a job is read from the workers' own `/metrics` (generations counted there).

use std::path::Path;
use std::time::Duration;

use rbee_contract::{JobEvent, Usage, WorkerState};
use serde_json::{Value, json};
use test_harness::{
    Daemon, JobApi, RawStream, eventually, read_raw_stream_signalling, slow_model, tiny_model,
};

const TOKEN: &str = "routing-test-cluster-token";
const MODEL: &str = "chat-model";
const SYSTEM: &str = "You are a helpful assistant.";
const WORKERS: [&str; 2] = ["w-a", "w-b"];

/// A real worker serving `model` as [`MODEL`], one slot, heartbeats every 100 ms.
fn start_worker(model: &Path, queen_url: &str, worker_id: &str) -> Daemon {
    let args = [
        "--model-ref",
        MODEL,
        "--slots",
        "1",
        "--queen-url",
        queen_url,
        "--heartbeat-interval",
        "100ms",
    ];
    Daemon::worker_as(model, worker_id, 1, TOKEN, &args)
}

/// A queen and the two workers of [`WORKERS`] on `model`, both listed ready.
async fn cluster(model: &Path) -> (Daemon, Vec<Daemon>) {
    let queen = Daemon::queen(
        &["--heartbeat-interval", "100ms"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let workers: Vec<Daemon> = WORKERS
        .iter()
        .map(|id| start_worker(model, &queen.url, id))
        .collect();
    eventually(
        "both workers are ready",
        Duration::from_secs(120),
        async || {
            let list: Value = reqwest::get(format!("{}/v1/workers", queen.url))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let ready = list["workers"]
                .as_array()?
                .iter()
                .filter(|w| w["state"] == json!(WorkerState::Ready))
                .count();
            (ready == WORKERS.len()).then_some(())
        },
    )
    .await;
    (queen, workers)
}

/// Generations each worker has finished, from its `/metrics`.
async fn generations(workers: &[Daemon]) -> Vec<u64> {
    let mut counts = Vec::new();
    for worker in workers {
        let page = reqwest::Client::new()
            .get(format!("{}/metrics", worker.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("a metrics page");
        counts.push(
            page.lines()
                .find_map(|l| {
                    l.strip_prefix("rbee_worker_generations_total ")?
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no generation count on\n{page}")),
        );
    }
    counts
}

/// The one worker whose count went up between `before` and `after`.
fn ran_on(before: &[u64], after: &[u64]) -> &'static str {
    let grown: Vec<&str> = WORKERS
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a > b)
        .map(|(id, _)| *id)
        .collect();
    match grown[..] {
        [one] => one,
        _ => panic!("expected one worker to finish a generation: {before:?} → {after:?}"),
    }
}

/// One conversation: its first question, then the answers it got and its follow-ups.
struct Conversation {
    messages: Vec<Value>,
}

impl Conversation {
    fn new(opening: &str) -> Self {
        Conversation {
            messages: vec![
                json!({"role": "system", "content": SYSTEM}),
                json!({"role": "user", "content": opening}),
            ],
        }
    }

    fn request(&self, max_tokens: u32) -> Value {
        json!({"operation": "infer", "model": MODEL, "messages": self.messages,
               "max_tokens": max_tokens, "temperature": 0})
    }

    fn answered(&mut self, answer: String, follow_up: &str) {
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        self.messages
            .push(json!({"role": "user", "content": follow_up}));
    }
}

fn usage(stream: &RawStream) -> Usage {
    stream.assert_one_terminal_then_done("queen");
    match stream.terminal() {
        Some(JobEvent::Done {
            usage: Some(usage), ..
        }) => *usage,
        other => panic!("a done event with usage, got {other:?}"),
    }
}

/// An opening question long enough that the system prompt all conversations share is a small
/// part of it.
fn opening(topic: &str) -> String {
    format!(
        "I would like to understand {topic} properly. Explain how {topic} works, where it comes \
         from, what people usually get wrong about {topic}, and give me one simple example of \
         {topic} that I can try at home this evening with ordinary things from the kitchen."
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn interleaved_conversations_come_back_to_the_worker_holding_their_history() {
    let (queen, workers) = cluster(&tiny_model()).await;
    let jobs = JobApi::new(&queen.url, None);
    let mut conversations = [
        Conversation::new(&opening("bread baking")),
        Conversation::new(&opening("bee keeping")),
    ];
    let follow_ups = ["Why is that?", "Can you say more?", "And then?"];
    // Per conversation: the worker of each turn, and each turn's usage.
    let mut served: [Vec<&str>; 2] = Default::default();
    let mut usages: [Vec<Usage>; 2] = Default::default();
    for (round, follow_up) in follow_ups.iter().chain([&"Thanks."]).enumerate() {
        // A, B, then B, A, …: neither goes first every time, so no order of the workers by
        // load alone sends each back to its own.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for c in order {
            let conversation = &mut conversations[c];
            let before = generations(&workers).await;
            let stream = jobs.run("/v1/jobs", &conversation.request(6)).await;
            usages[c].push(usage(&stream));
            served[c].push(ran_on(&before, &generations(&workers).await));
            conversation.answered(stream.text(), follow_up);
        }
    }
    let logs = || format!("queen log:\n{}", queen.log_text());
    for (c, turns) in served.iter().enumerate() {
        assert!(
            turns.iter().all(|w| *w == turns[0]),
            "conversation {c} moved between workers: {turns:?}\n{}",
            logs()
        );
    }
    assert_ne!(
        served[0][0],
        served[1][0],
        "the second conversation should start on the worker with nothing cached\n{}",
        logs()
    );
    // Back on its worker, each later turn finds at least the previous turn's prompt cached.
    for (c, turns) in usages.iter().enumerate() {
        for t in 1..turns.len() {
            let cached = turns[t]
                .cached_tokens
                .expect("the worker reports cached tokens");
            assert!(
                cached >= turns[t - 1].prompt_tokens,
                "conversation {c}, turn {t}: {cached} tokens cached, the previous prompt had {}",
                turns[t - 1].prompt_tokens
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_whose_worker_is_busy_goes_to_the_other_worker_at_once() {
    let (queen, workers) = cluster(&slow_model()).await;
    let jobs = JobApi::new(&queen.url, None);
    let mut conversation = Conversation::new(&opening("tea brewing"));
    let before = generations(&workers).await;
    let first = jobs.run("/v1/jobs", &conversation.request(4)).await;
    usage(&first);
    let home = ran_on(&before, &generations(&workers).await);
    conversation.answered(first.text(), "Tell me everything, at length.");

    // The conversation's next turn, a long one, takes its worker's only slot.
    let long = jobs
        .submit_ok("/v1/jobs", &conversation.request(1500))
        .await;
    let (first_token, started) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(read_raw_stream_signalling(
        jobs.open_stream(&long).await,
        first_token,
    ));
    started.await.expect("the long turn started");

    // Another turn that extends the same history: its worker is busy, so the other one takes
    // it, without waiting in line.
    let before = generations(&workers).await;
    let mut branch = Conversation {
        messages: conversation.messages.clone(),
    };
    branch.messages.pop();
    branch
        .messages
        .push(json!({"role": "user", "content": "In one word?"}));
    let other = jobs.run("/v1/jobs", &branch.request(4)).await;
    let other_usage = usage(&other);
    let elsewhere = ran_on(&before, &generations(&workers).await);
    assert_ne!(elsewhere, home, "queen log:\n{}", queen.log_text());
    assert!(
        !other.queued(),
        "the turn waited in line: {:?}",
        other.events
    );
    assert_eq!(
        other_usage.cached_tokens,
        Some(0),
        "the other worker never saw this conversation"
    );
    assert!(
        !reading.is_finished(),
        "the long turn should still be running"
    );

    let response = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/{}", queen.url, long.job_id))
        .send()
        .await
        .expect("DELETE the long turn");
    assert!(response.status().is_success(), "{}", response.status());
    let _ = reading.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_reports_at_most_1024_prefix_keys() {
    let queen = Daemon::queen(&[], &[("RBEE_CLUSTER_TOKEN", TOKEN)]).await;
    let beat = |keys: usize| {
        json!({
            "worker": {
                "worker_id": "w-keys", "url": "http://127.0.0.1:9", "model": MODEL,
                "device": "cpu", "state": "ready", "slots_total": 1, "slots_free": 1,
            },
            "cached_prefixes": (0..keys as u64).collect::<Vec<u64>>(),
        })
    };
    let post = async |body: Value| {
        reqwest::Client::new()
            .post(format!("{}/v1/worker-heartbeat", queen.url))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("POST a heartbeat")
    };
    assert_eq!(post(beat(1024)).await.status(), 204);
    let refused = post(beat(1025)).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("an error body");
    assert_eq!(body["error"]["code"], "bad_request");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`cached_prefixes` takes at most 1024"),
        "{message}"
    );
}

/// An answer longer than its question: the next turn's content is mostly the answer, so only a
/// worker that reports the answer's key holds at least half of it. Once the queen's memory of
/// its own dispatch has expired (two heartbeats), the next turn still goes back to that worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_turn_after_a_longer_answer_comes_back_to_the_worker_holding_it() {
    let (queen, workers) = cluster(&tiny_model()).await;
    let jobs = JobApi::new(&queen.url, None);
    // No system prompt: the question is all the history there is.
    let mut conversation = Conversation {
        messages: vec![json!({"role": "user", "content": "Hi."})],
    };
    let before = generations(&workers).await;
    // Sampled with a fixed seed: the tiny model's greedy answer is shorter than the question.
    let mut request = conversation.request(64);
    request["temperature"] = json!(1.0);
    request["seed"] = json!(11);
    let stream = jobs.run("/v1/jobs", &request).await;
    usage(&stream);
    let first = ran_on(&before, &generations(&workers).await);
    let answer = stream.text();
    let asked = "Hi.".len();
    // The question alone is then less than half of the next turn's content.
    assert!(
        answer.len() > asked,
        "the answer should outweigh the question ({asked} bytes): {answer:?}"
    );
    conversation.answered(answer, "?");
    // Well past the two heartbeats the queen keeps a dispatched job's keys for.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = generations(&workers).await;
    let stream = jobs.run("/v1/jobs", &conversation.request(4)).await;
    let second = usage(&stream);
    let next = ran_on(&before, &generations(&workers).await);
    assert_eq!(
        next,
        first,
        "the second turn moved to the other worker\nqueen log:\n{}",
        queen.log_text()
    );
    assert!(
        second.cached_tokens.is_some_and(|c| c > 0),
        "the second turn found nothing cached: {second:?}"
    );
}
