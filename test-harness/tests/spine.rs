//! The whole spine as a user meets it: `rbee-keeper infer` on a machine where nothing runs
//! starts a queen and a hive, the hive spawns a worker, tokens come back; then the same
//! through the running cluster, the raw streams at each hop, `queen stop`, a model that does
//! not load, and Ctrl-C. Each test has its own state directory and queen port.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rbee_contract::{JobEvent, WorkerInfo, WorkerState};
use serde_json::{Value, json};
use test_harness::{JobApi, KeeperEnv, RawStream, child_pids, process_gone, send_signal, smollm2};
use tokio::io::AsyncReadExt;

const PROMPT: &str = "The capital of France is";
const COLD_START: Duration = Duration::from_secs(300);

fn keeper_env() -> KeeperEnv {
    KeeperEnv::new(&[("RBEE_HEARTBEAT_INTERVAL", "250ms")])
}

fn model_path() -> String {
    smollm2()
        .canonicalize()
        .expect("canonical model path")
        .display()
        .to_string()
}

async fn workers(env: &KeeperEnv) -> Vec<WorkerInfo> {
    serde_json::from_value(env.queen_json("/v1/workers").await["workers"].clone())
        .expect("worker list")
}

async fn raw_job(base: &str, create_path: &str, body: &Value) -> RawStream {
    JobApi::new(base, None).run(create_path, body).await
}

fn assert_one_terminal_then_done(stream: &RawStream, hop: &str) {
    stream.assert_one_terminal_then_done(hop);
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { .. })),
        "{hop}: {:?}",
        stream.terminal()
    );
}

async fn wait_gone(pids: &[u32], env: &KeeperEnv) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pids.iter().all(|pid| process_gone(*pid)) {
        assert!(
            Instant::now() < deadline,
            "processes {pids:?} still run; {:?}\n{}",
            env.daemons(),
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_cold_then_warm_then_queen_stop_leaves_nothing_behind() {
    let env = keeper_env();
    let model = model_path();
    let args = [
        "infer",
        "--model",
        &model,
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        PROMPT,
    ];

    let cold = env.run(&args, COLD_START).await;
    assert_eq!(cold.code, Some(0), "{cold:?}\n{}", env.logs());
    assert!(cold.stdout.contains("Paris"), "{cold:?}");
    assert!(cold.stdout.ends_with('\n'), "{cold:?}");
    for progress in [
        "starting a local queen",
        "queen ready",
        "hive",
        "spawning worker",
        "loading",
    ] {
        assert!(
            cold.stderr.contains(progress),
            "no {progress:?} in {}",
            cold.stderr
        );
    }
    let queen_pid = env.pid_file("queen").expect("queen.pid");
    let hive_pid = env.pid_file("hive").expect("hive.pid");
    assert!(!process_gone(queen_pid) && !process_gone(hive_pid));
    let before = workers(&env).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].model, model);
    assert_eq!(before[0].state, WorkerState::Ready);
    assert_eq!(before[0].hive_id.as_deref(), Some(env.hive_id.as_str()));
    // The hive beside a queen on a non-default port gets a free port of its own.
    let hives = env.queen_json("/v1/hives").await;
    assert_eq!(
        hives["hives"][0]["hive_id"],
        env.hive_id.as_str(),
        "{hives}"
    );
    assert_eq!(hives["hives"][0]["status"], "healthy", "{hives}");
    assert_ne!(hives["hives"][0]["url"], "http://127.0.0.1:7835", "{hives}");
    let worker_pids = child_pids(hive_pid);
    assert_eq!(worker_pids.len(), 1, "the hive has one worker process");

    // The running cluster answers at once: no start, no spawn, the same worker.
    let warm = env.run(&args, Duration::from_secs(60)).await;
    assert_eq!(warm.code, Some(0), "{warm:?}\n{}", env.logs());
    assert!(warm.stdout.contains("Paris"), "{warm:?}");
    assert!(
        !warm.stderr.contains("starting") && !warm.stderr.contains("spawning"),
        "{}",
        warm.stderr
    );
    assert!(
        warm.elapsed < cold.elapsed,
        "warm {:?} vs cold {:?}",
        warm.elapsed,
        cold.elapsed
    );
    let after = workers(&env).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].worker_id, before[0].worker_id);
    assert_eq!(env.pid_file("queen"), Some(queen_pid));

    // Each hop's stream, read raw: one terminal event, one [DONE].
    let request = json!({"operation": "infer", "model": model, "prompt": PROMPT,
                         "max_tokens": 8, "temperature": 0});
    let at_queen = raw_job(&env.queen_url, "/v1/jobs", &request).await;
    assert!(at_queen.text().contains("Paris"), "{:?}", at_queen.events);
    assert_one_terminal_then_done(&at_queen, "queen");
    let at_worker = raw_job(&after[0].url, "/v1/inference", &request).await;
    assert!(at_worker.text().contains("Paris"), "{:?}", at_worker.events);
    assert_one_terminal_then_done(&at_worker, "worker");

    // `queen stop` takes the hive and its worker with it.
    let stop = env.run(&["queen", "stop"], Duration::from_secs(120)).await;
    assert_eq!(stop.code, Some(0), "{stop:?}\n{}", env.logs());
    assert!(stop.stdout.contains("stopped"), "{stop:?}");
    let mut pids = vec![queen_pid, hive_pid];
    pids.extend(&worker_pids);
    wait_gone(&pids, &env).await;
    assert_eq!(env.daemons(), Vec::new(), "{}", env.logs());
    assert_eq!(env.pid_file("queen"), None);
    assert_eq!(env.pid_file("hive"), None);

    let status = env.run(&["queen", "status"], Duration::from_secs(30)).await;
    assert_eq!(status.code, Some(3), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_fails_to_load_is_a_clear_error() {
    let env = keeper_env();
    let junk = env.root.join("junk.gguf");
    std::fs::write(&junk, b"this is not a GGUF file, just some text".repeat(64)).unwrap();

    let out = env
        .run(
            &["infer", "--model", junk.to_str().unwrap(), "Hello"],
            COLD_START,
        )
        .await;
    assert_eq!(out.code, Some(1), "{out:?}\n{}", env.logs());
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("rbee-keeper: "))
        .unwrap_or_else(|| panic!("no error line in {}", out.stderr));
    assert!(line.contains("(model_load_failed)"), "{line}");
    // The cause (the worker's own words, from its log) travels with the error.
    assert!(
        out.stderr.to_lowercase().contains("gguf"),
        "the error names the cause: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{out:?}");

    let stop = env.run(&["queen", "stop"], Duration::from_secs(120)).await;
    assert_eq!(stop.code, Some(0), "{stop:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.daemons().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", env.daemons());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Collects a child's output as it arrives.
fn collect(mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

async fn slots_free(worker: &WorkerInfo) -> u32 {
    let info: WorkerInfo = reqwest::get(format!("{}/v1/info", worker.url))
        .await
        .expect("worker info")
        .json()
        .await
        .expect("worker info JSON");
    info.slots_free
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_the_generation_and_exits_130() {
    let env = keeper_env();
    let model = model_path();
    let mut child = env
        .command(&[
            "infer",
            "--model",
            &model,
            "--temperature",
            "0",
            "--max-tokens",
            "1000",
            "Count from one to one thousand: one, two, three,",
        ])
        .spawn()
        .expect("spawn rbee-keeper");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());

    let deadline = Instant::now() + COLD_START;
    while stdout.lock().unwrap().split(',').count() < 10 {
        assert!(
            Instant::now() < deadline,
            "no tokens: {}\n{}",
            stderr.lock().unwrap(),
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker = workers(&env).await.pop().expect("a worker");
    assert_eq!(slots_free(&worker).await, 0, "the worker is generating");

    send_signal(child.id().expect("keeper pid"), "INT");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the keeper exits after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(130), "{}", stderr.lock().unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        stderr.lock().unwrap().contains("rbee-keeper: interrupted"),
        "{}",
        stderr.lock().unwrap()
    );

    // The cancellation reached the worker: its slot is free long before 1000 tokens.
    let deadline = Instant::now() + Duration::from_secs(5);
    while slots_free(&worker).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the worker still generates\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The cluster outlives the keeper that started it.
    assert!(!process_gone(env.pid_file("queen").expect("queen.pid")));

    let stop = env.run(&["queen", "stop"], Duration::from_secs(120)).await;
    assert_eq!(stop.code, Some(0), "{stop:?}");
}
