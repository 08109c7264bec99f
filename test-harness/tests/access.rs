//! Who may have a hive load what, and what a client is told when something fails, with the
//! real queen, hive and worker. With API keys, a key may use the models the cluster has
//! (served, in a catalog, under a hive's `--allow-model-dir`) and cold-start them; any other
//! path needs an admin key and is refused with `403` (the same answer whether the file
//! exists), a hub download needs an admin key once admin keys exist, and a hive with allowed
//! model directories refuses any path outside them itself. Without keys, any path works. A
//! failed spawn tells the client one line; the details are in the daemons' logs by job id.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rbee_contract::{ErrorCode, JobEvent};
use serde_json::{Value, json};
use test_harness::{
    Daemon, JobApi, KeeperEnv, RawStream, TestHive, child_pids, read_raw_stream, scratch_dir,
    tiny_model,
};

const TOKEN: &str = "access-test-cluster-token";
const KEY: &str = "access-test-api-key";
const ADMIN: &str = "access-test-admin-key";

struct Cluster {
    queen: Daemon,
    hive: TestHive,
}

/// A queen with the API key (and the admin key when `admin`), and a hive registered with it.
async fn cluster(admin: bool, hive_args: &[&str]) -> Cluster {
    let mut env = vec![("RBEE_CLUSTER_TOKEN", TOKEN)];
    env.push(("RBEE_API_KEYS", KEY));
    if admin {
        env.push(("RBEE_ADMIN_KEYS", ADMIN));
    }
    let queen = Daemon::queen(&["--heartbeat-interval", "100ms"], &env).await;
    let mut args = vec!["--queen-url", queen.url.as_str()];
    args.extend_from_slice(hive_args);
    let hive = TestHive::start("hive-access", TOKEN, &args).await;
    wait_registered(&queen, Some(KEY)).await;
    Cluster { queen, hive }
}

async fn wait_registered(queen: &Daemon, key: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut request = reqwest::Client::new().get(format!("{}/v1/hives", queen.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let hives: Value = request.send().await.unwrap().json().await.unwrap();
        if hives["hives"][0]["status"] == "healthy" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the hive never registered: {hives}\n{}",
            queen.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn infer_body(model: &str) -> Value {
    json!({"operation": "infer", "model": model, "prompt": "hello", "max_tokens": 2})
}

/// `POST /v1/jobs` on the queen with `key`.
async fn submit(queen: &Daemon, key: Option<&str>, body: &Value) -> reqwest::Response {
    JobApi::new(&queen.url, key).submit("/v1/jobs", body).await
}

/// Runs an `infer` of `model` with `key` to its end.
async fn infer(queen: &Daemon, key: Option<&str>, model: &str) -> RawStream {
    let stream = JobApi::new(&queen.url, key)
        .run("/v1/jobs", &infer_body(model))
        .await;
    stream.assert_one_terminal_then_done("queen");
    stream
}

fn assert_done(stream: &RawStream, what: &str, cluster: &Cluster) {
    assert!(
        matches!(stream.terminal(), Some(JobEvent::Done { .. })),
        "{what}: {:?}\nqueen log:\n{}\nhive log:\n{}",
        stream.events,
        cluster.queen.log_text(),
        cluster.hive.daemon.log_text()
    );
}

/// The status and body of a refusal, with the model's own text taken out: what is left must
/// not depend on the model.
async fn refusal(response: reqwest::Response, model: &str) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text.replace(model, "<model>"))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body)
}

/// A directory of models the hive may load, holding a copy of the tiny model, and a file
/// outside it.
struct Files {
    root: PathBuf,
    allowed: PathBuf,
    inside: PathBuf,
    outside: PathBuf,
}

fn files(name: &str) -> Files {
    let root = std::fs::canonicalize(scratch_dir(name)).unwrap();
    let allowed = root.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let inside = allowed.join("tiny.gguf");
    std::fs::copy(tiny_model(), &inside).unwrap();
    let outside = root.join("outside.gguf");
    std::fs::copy(tiny_model(), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("link.gguf")).unwrap();
    Files {
        root,
        allowed,
        inside,
        outside,
    }
}

fn text(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_key_uses_the_clusters_models_and_is_refused_other_paths_alike() {
    let f = files("access-api-key");
    let allowed = text(&f.allowed);
    let c = cluster(true, &["--allow-model-dir", &allowed]).await;

    // A model under the hive's allowed directory is one the cluster has: cold-started.
    let inside = text(&f.inside);
    assert_done(&infer(&c.queen, Some(KEY), &inside).await, "inside", &c);
    // Served now, so used again without a cold start.
    assert_done(&infer(&c.queen, Some(KEY), &inside).await, "served", &c);

    // Any other path is refused at once, and the answer does not tell whether it exists.
    let existing = text(&f.outside);
    let missing = text(&f.root.join("no-such-model.gguf"));
    let climbing = format!("{allowed}/../outside.gguf");
    let mut answers = Vec::new();
    for model in [
        existing.as_str(),
        missing.as_str(),
        climbing.as_str(),
        "../../etc/passwd",
        "/etc/passwd",
    ] {
        let answer = refusal(submit(&c.queen, Some(KEY), &infer_body(model)).await, model).await;
        assert_eq!(answer.0, 403, "{model}: {answer:?}");
        assert_eq!(answer.1["error"]["code"], "forbidden", "{model}");
        answers.push(answer);
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "the same refusal for every path: {answers:?}"
    );
    let message = answers[0].1["error"]["message"].as_str().unwrap();
    assert!(message.contains("admin key"), "{message}");

    // A hub download needs the admin key once admin keys exist.
    let hub = refusal(
        submit(&c.queen, Some(KEY), &infer_body("hf:org/repo")).await,
        "hf:org/repo",
    )
    .await;
    assert_eq!(hub.0, 403, "{hub:?}");

    // The OpenAI route holds the same line.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", c.queen.url))
        .bearer_auth(KEY)
        .json(&json!({"model": existing, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "permission_error", "{body}");

    // An admin passes the queen, but this hive loads nothing outside its directory, whoever
    // asks: the refusal comes back as the job's error, and no worker was started for it.
    let workers_before = child_pids(c.hive.daemon.pid()).len();
    let stream = infer(&c.queen, Some(ADMIN), &existing).await;
    match stream.terminal() {
        Some(JobEvent::Error { code, message }) => {
            assert_eq!(*code, ErrorCode::Forbidden, "{message}");
            assert!(!message.contains(&allowed), "{message}");
        }
        other => panic!("expected the hive's refusal, got {other:?}"),
    }
    assert_eq!(child_pids(c.hive.daemon.pid()).len(), workers_before);
    let _ = std::fs::remove_dir_all(&f.root);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hive_with_allowed_dirs_refuses_paths_outside_before_opening_them() {
    let f = files("access-hive");
    let allowed = text(&f.allowed);
    let hive = TestHive::start("hive-dirs", TOKEN, &["--allow-model-dir", &allowed]).await;

    let spawn = |model: &str| json!({"operation": "worker_spawn", "model": model});
    let missing_outside = text(&f.root.join("absent.gguf"));
    let climbing = format!("{allowed}/../outside.gguf");
    let link = text(&f.allowed.join("link.gguf"));
    let outside = text(&f.outside);
    let mut answers = Vec::new();
    for model in [
        outside.as_str(),
        missing_outside.as_str(),
        climbing.as_str(),
        link.as_str(),
        "/etc/passwd",
    ] {
        let answer = refusal(hive.submit(&spawn(model)).await, model).await;
        assert_eq!(answer.0, 403, "{model}: {answer:?}");
        answers.push(answer);
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "the same refusal for every path: {answers:?}"
    );
    // The capacity question is held to the same directories.
    let response = reqwest::Client::new()
        .get(format!("{}/v1/capacity", hive.url()))
        .query(&[("model", link.as_str())])
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(child_pids(hive.daemon.pid()).is_empty(), "nothing started");
    assert!(
        !std::fs::read_dir(&hive.log_dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".log")),
        "no worker log was opened"
    );

    // Inside the directory, the model loads.
    let info = hive.spawn_worker(&f.inside).await;
    assert_eq!(info.model, text(&f.inside));
    let _ = std::fs::remove_dir_all(&f.root);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_key_loads_any_path_and_keys_then_use_it() {
    let f = files("access-admin");
    let c = cluster(true, &[]).await;
    let outside = text(&f.outside);

    let refused = submit(&c.queen, Some(KEY), &infer_body(&outside)).await;
    assert_eq!(refused.status(), 403);
    let spawn = json!({"operation": "worker_spawn", "model": outside});
    assert_eq!(submit(&c.queen, Some(KEY), &spawn).await.status(), 403);

    assert_done(&infer(&c.queen, Some(ADMIN), &outside).await, "admin", &c);
    // Served by a worker now: the API key may use it.
    assert_done(&infer(&c.queen, Some(KEY), &outside).await, "served", &c);
    let _ = std::fs::remove_dir_all(&f.root);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_admin_keys_no_key_names_a_path_but_a_hub_download_goes() {
    let f = files("access-no-admins");
    // No hub is reachable: the download is let through, then fails at the hive.
    let c = cluster(false, &["--hf-endpoint", "http://127.0.0.1:9"]).await;
    let outside = text(&f.outside);
    let (status, body) = refusal(
        submit(&c.queen, Some(KEY), &infer_body(&outside)).await,
        &outside,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no admin keys"),
        "{body}"
    );
    let spawn = json!({"operation": "worker_spawn", "model": outside});
    assert_eq!(submit(&c.queen, Some(KEY), &spawn).await.status(), 403);

    let hub = submit(&c.queen, Some(KEY), &infer_body("hf:org/repo")).await;
    assert_eq!(hub.status(), 201, "a hub download needs no admin key here");
    let _ = std::fs::remove_dir_all(&f.root);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_keys_the_keeper_loads_any_file_and_a_corrupt_one_fails_in_one_line() {
    let f = files("access-keeper");
    let garbage = f.root.join("garbage.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend((0..4096u32).map(|i| (i * 7919 % 251) as u8));
    std::fs::write(&garbage, bytes).unwrap();
    // A backtrace would be captured if anything produced one.
    let env = KeeperEnv::new(&[
        ("RBEE_HEARTBEAT_INTERVAL", "100ms"),
        ("RUST_BACKTRACE", "1"),
    ]);
    let step = Duration::from_secs(180);

    let outside = text(&f.outside);
    let out = env
        .run(
            &["infer", "--model", &outside, "--max-tokens", "2", "Hello"],
            step,
        )
        .await;
    assert_eq!(out.code, Some(0), "{out:?}\n{}", env.logs());

    let out = env
        .run(&["infer", "--model", &text(&garbage), "Hello"], step)
        .await;
    assert_ne!(out.code, Some(0), "{out:?}");
    // Progress notes may come first; the error is the last line, and nothing on stderr is a
    // backtrace, a source path or a log line relayed from the worker.
    let line = out
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(line.starts_with("rbee-keeper:"), "{out:?}");
    for leak in [
        "backtrace",
        ".rs:",
        "last lines",
        ".log",
        "   0: ",
        "   1: ",
    ] {
        assert!(!out.stderr.contains(leak), "{leak} in {:?}", out.stderr);
    }
    assert!(
        line.contains("could not load") && line.ends_with("(model_load_failed)"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&f.root);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_spawn_tells_the_client_one_line_and_the_logs_the_details() {
    let f = files("access-failed-spawn");
    let garbage = f.root.join("garbage.gguf");
    std::fs::write(
        &garbage,
        (0..4096u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let queen = Daemon::queen(
        &["--heartbeat-interval", "100ms"],
        &[("RBEE_CLUSTER_TOKEN", TOKEN)],
    )
    .await;
    let hive = TestHive::start("hive-failing", TOKEN, &["--queen-url", &queen.url]).await;
    wait_registered(&queen, None).await;

    let jobs = JobApi::new(&queen.url, None);
    let created = jobs
        .submit_ok("/v1/jobs", &infer_body(&text(&garbage)))
        .await;
    let stream = read_raw_stream(jobs.open_stream(&created).await)
        .await
        .unwrap();
    stream.assert_one_terminal_then_done("queen");
    let Some(JobEvent::Error { code, message }) = stream.terminal() else {
        panic!("expected an error: {:?}", stream.events);
    };
    assert_eq!(*code, ErrorCode::ModelLoadFailed, "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    for leak in [
        "last lines",
        ".log",
        hive.log_dir.to_str().unwrap(),
        hive.url(),
        "127.0.0.1",
    ] {
        assert!(!message.contains(leak), "{leak} in {message}");
    }
    // No event on the way carries a path of the hive either.
    for (_, event) in &stream.events {
        let shown = serde_json::to_string(event).unwrap();
        assert!(!shown.contains(hive.log_dir.to_str().unwrap()), "{shown}");
    }

    // The queen's log ties its job to the hive's; the hive's log has the worker's log lines.
    let queen_log = queen.log_text();
    assert!(
        queen_log
            .lines()
            .any(|l| l.contains(&created.job_id) && l.contains("could not start a worker")),
        "{queen_log}"
    );
    let hive_log = hive.daemon.log_text();
    assert!(hive_log.contains("last lines of its log"), "{hive_log}");
    assert!(hive_log.contains("not a readable GGUF file"), "{hive_log}");
    let _ = std::fs::remove_dir_all(&f.root);
}
