//! The hive's model catalog and downloads, end to end: the real `rbee-hive` (and for `infer`
//! the real queen, worker and keeper) with `HF_ENDPOINT` pointed at a loopback hub that
//! serves the generated test model and SmolLM2 in the hub's URL layout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rbee_contract::{ErrorCode, JobEvent, ModelDetails, ModelState, WorkerInfo};
use serde_json::{Value, json};
use test_harness::{
    Fault, KeeperEnv, RawStream, TestHive, TestHub, read_raw_stream, scratch_dir, smollm2,
    tiny_model,
};

const TOKEN: &str = "models-test-token";
const TINY_REPO: &str = "rbee-test/tiny-GGUF";
const TINY_FILE: &str = "tiny.Q8_0.gguf";
const SMOL_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
const SMOL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The tiny model as the preferred quantization, beside a file the hive must not pick.
async fn tiny_hub(fault: Fault) -> TestHub {
    let model = tiny_model();
    TestHub::builder()
        .file(TINY_REPO, TINY_FILE, &model)
        .file(TINY_REPO, "tiny.Q2_K.gguf", &model)
        .file(TINY_REPO, "README.md", &readme())
        .fault(fault)
        .start()
        .await
}

fn readme() -> PathBuf {
    let path = scratch_dir("hub-readme").join("README.md");
    std::fs::write(&path, "# a test repository\n").expect("write README");
    path
}

async fn smol_hub(fault: Fault) -> TestHub {
    TestHub::builder()
        .file(SMOL_REPO, SMOL_FILE, &smollm2())
        .fault(fault)
        .start()
        .await
}

async fn hive_on(hub: &TestHub, model_dir: &Path) -> TestHive {
    let dir = model_dir.display().to_string();
    TestHive::start(
        "models-hive",
        TOKEN,
        &["--model-dir", &dir, "--hf-endpoint", &hub.url],
    )
    .await
}

fn download(model: &str) -> Value {
    json!({"operation": "model_download", "model": model})
}

fn events(stream: &RawStream) -> impl Iterator<Item = &JobEvent> {
    stream.events.iter().map(|(_, event)| event)
}

fn data_model(stream: &RawStream) -> ModelDetails {
    events(stream)
        .find_map(|e| match e {
            JobEvent::Data { data } => serde_json::from_value(data["model"].clone()).ok(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no model in {:?}", stream.events))
}

async fn list(hive: &TestHive) -> Vec<ModelDetails> {
    let stream = hive.run_job(&json!({"operation": "model_list"})).await;
    stream.assert_one_terminal_then_done("model_list");
    events(&stream)
        .find_map(|e| match e {
            JobEvent::Data { data } => serde_json::from_value(data["models"].clone()).ok(),
            _ => None,
        })
        .expect("a model list")
}

fn error_of(stream: &RawStream) -> (ErrorCode, String) {
    stream.assert_one_terminal_then_done("a failing job");
    match stream.terminal() {
        Some(JobEvent::Error { code, message }) => (*code, message.clone()),
        other => panic!("expected an error, got {other:?} after {:?}", stream.events),
    }
}

/// `downloading` events in order, as `(done, total)`.
fn progress(stream: &RawStream) -> Vec<(u64, Option<u64>)> {
    events(stream)
        .filter_map(|e| match e {
            JobEvent::Downloading {
                bytes_done,
                bytes_total,
                ..
            } => Some((*bytes_done, *bytes_total)),
            _ => None,
        })
        .collect()
}

/// File transfers the hub saw, leaving out the one-byte probes `hf-hub` starts with.
fn transfers(hub: &TestHub) -> Vec<(u64, u64)> {
    hub.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.end > r.start)
        .map(|r| (r.start, r.end))
        .collect()
}

/// How many bytes from its start `hf-hub`'s partial file under `model_dir` holds for good: the
/// little-endian `u64` it keeps after the file's data.
fn committed_bytes(model_dir: &Path) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    files_under(&model_dir.join("hub"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".sync.part"))
        .filter_map(|path| {
            let mut file = std::fs::File::open(path).ok()?;
            file.seek(SeekFrom::End(-8)).ok()?;
            let mut marker = [0u8; 8];
            file.read_exact(&mut marker).ok()?;
            Some(u64::from_le_bytes(marker))
        })
        .max()
        .unwrap_or(0)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn download_list_get_restart_and_delete() {
    let hub = tiny_hub(Fault::None).await;
    let model_dir = scratch_dir("models");
    let hive = hive_on(&hub, &model_dir).await;
    let size = hub.size(TINY_REPO, TINY_FILE);
    let id = format!("hf:{TINY_REPO}:{TINY_FILE}");

    let first = hive.run_job(&download(&format!("hf:{TINY_REPO}"))).await;
    first.assert_done("model_download");
    let steps = progress(&first);
    assert!(!steps.is_empty(), "no progress: {:?}", first.events);
    assert!(steps.iter().all(|(_, total)| *total == Some(size)));
    assert_eq!(steps.last().map(|s| s.0), Some(size), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{steps:?}");
    let model = data_model(&first);
    assert_eq!(model.entry.id, id);
    assert_eq!(model.entry.state, ModelState::Ready);
    assert_eq!(model.entry.size_bytes, size);
    assert_eq!(
        model.sha256.as_deref(),
        Some(hub.sha256(TINY_REPO, TINY_FILE).as_str())
    );
    assert!(hub.requests().iter().all(|r| r.file == TINY_FILE));

    // Asked again, it comes from the catalog: nothing is transferred.
    let before = transfers(&hub).len();
    let again = hive.run_job(&download(&id)).await;
    again.assert_done("second model_download");
    assert!(progress(&again).is_empty(), "{:?}", again.events);
    assert_eq!(transfers(&hub).len(), before);

    let listed = list(&hive).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].entry.id, id);
    let got = hive
        .run_job(&json!({"operation": "model_get", "model": format!("hf:{TINY_REPO}")}))
        .await;
    got.assert_done("model_get");
    assert_eq!(data_model(&got).entry.state, ModelState::Ready);
    hive.wait_until(
        Duration::from_secs(10),
        "the heartbeat lists the model",
        || {
            hive.queen
                .hive_beats()
                .last()
                .is_some_and(|(beat, _)| beat.hive.models.iter().any(|m| m.id == id))
        },
    )
    .await;

    // A restarted hive has the same catalog.
    drop(hive);
    let hive = hive_on(&hub, &model_dir).await;
    let listed = list(&hive).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].entry.state, ModelState::Ready);

    let deleted = hive
        .run_job(&json!({"operation": "model_delete", "model": id}))
        .await;
    deleted.assert_done("model_delete");
    assert!(list(&hive).await.is_empty());
    let gone = hive
        .submit(&json!({"operation": "model_get", "model": id}))
        .await;
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "model_not_found");
    let left: Vec<PathBuf> = files_under(&model_dir.join("hub"))
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "lock"))
        .filter(|p| !p.to_string_lossy().contains("/refs/"))
        .collect();
    assert!(left.is_empty(), "files left after delete: {left:?}");
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_resumes_where_it_broke_off() {
    // hf-hub commits 10 MB chunks; the drop falls inside the third one.
    let hub = smol_hub(Fault::DropOnceAt(25_000_000)).await;
    let model_dir = scratch_dir("models-resume");
    let hive = hive_on(&hub, &model_dir).await;

    let stream = hive
        .run_job(&download(&format!("hf:{SMOL_REPO}:{SMOL_FILE}")))
        .await;
    stream.assert_done("resumed model_download");
    assert!(hub.dropped(), "the hub never dropped the connection");
    let model = data_model(&stream);
    assert_eq!(
        model.sha256.as_deref(),
        Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    );
    assert_eq!(model.entry.size_bytes, 98_362_432);
    let transfers = transfers(&hub);
    let from_start = transfers.iter().filter(|(start, _)| *start == 0).count();
    assert_eq!(
        from_start, 1,
        "the first chunk was fetched again, so the download restarted: {transfers:?}"
    );
    let broken = transfers
        .iter()
        .filter(|(start, _)| *start == 20_000_000)
        .count();
    assert!(
        broken >= 2,
        "the broken chunk was not fetched again: {transfers:?}"
    );
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_download_fails_and_never_becomes_ready() {
    let hub = tiny_hub(Fault::Corrupt).await;
    let model_dir = scratch_dir("models-corrupt");
    let hive = hive_on(&hub, &model_dir).await;

    let stream = hive.run_job(&download(&format!("hf:{TINY_REPO}"))).await;
    let (code, message) = error_of(&stream);
    assert_eq!(code, ErrorCode::ModelLoadFailed, "{message}");
    assert!(message.contains("sha256"), "{message}");
    let listed = list(&hive).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].entry.state, ModelState::Failed);
    assert!(
        listed[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("sha256"))
    );
    let blobs: Vec<PathBuf> = files_under(&model_dir.join("hub"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/blobs/") && p.extension().is_none())
        .collect();
    assert!(blobs.is_empty(), "the corrupt file was kept: {blobs:?}");

    // A worker is never started on it.
    let spawn = hive
        .run_job(&json!({"operation": "worker_spawn", "model": format!("hf:{TINY_REPO}")}))
        .await;
    assert_eq!(error_of(&spawn).0, ErrorCode::ModelLoadFailed);
    assert!(hive.workers().await.is_empty());
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_repositories_and_files_are_not_found() {
    let hub = tiny_hub(Fault::None).await;
    let model_dir = scratch_dir("models-404");
    let hive = hive_on(&hub, &model_dir).await;

    let (code, message) = error_of(&hive.run_job(&download("hf:nobody/nothing")).await);
    assert_eq!(code, ErrorCode::ModelNotFound);
    assert!(message.contains("nobody/nothing"), "{message}");
    let (code, message) = error_of(
        &hive
            .run_job(&download(&format!("hf:{TINY_REPO}:missing.gguf")))
            .await,
    );
    assert_eq!(code, ErrorCode::ModelNotFound);
    assert!(
        message.contains(TINY_FILE),
        "lists what there is: {message}"
    );
    assert!(list(&hive).await.is_empty());
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_larger_than_the_disk_is_refused_before_it_downloads() {
    let hub = tiny_hub(Fault::HugeListing).await;
    let model_dir = scratch_dir("models-disk");
    let hive = hive_on(&hub, &model_dir).await;

    let (code, message) = error_of(&hive.run_job(&download(&format!("hf:{TINY_REPO}"))).await);
    assert_eq!(code, ErrorCode::NoCapacity);
    assert!(message.contains("not enough disk"), "{message}");
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    assert!(list(&hive).await.is_empty());
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn references_that_escape_or_make_no_sense_are_refused_before_a_job() {
    let hub = tiny_hub(Fault::None).await;
    let model_dir = scratch_dir("models-refs");
    let hive = hive_on(&hub, &model_dir).await;

    for (operation, model) in [
        ("model_download", "hf:../x"),
        ("model_download", "hf:a/b:../../etc/passwd"),
        ("model_download", "hf:a/b:/etc/passwd.gguf"),
        ("model_download", "hf:/etc/passwd"),
        ("model_download", "/etc/passwd"),
        ("model_download", "s3:bucket/model.gguf"),
        ("model_download", ""),
        ("model_get", "hf:a/b:../../x.gguf"),
        ("model_delete", "hf:../../x"),
        ("worker_spawn", "hf:a/b:../../etc/passwd"),
        ("worker_spawn", "hf:a/b/c"),
    ] {
        let response = hive
            .submit(&json!({"operation": operation, "model": model}))
            .await;
        assert_eq!(response.status(), 400, "{operation} {model}");
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["code"], "bad_request", "{operation} {model}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    assert!(list(&hive).await.is_empty());
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_cut_by_a_hive_restart_resumes_afterwards() {
    let stalling = smol_hub(Fault::StallAt(15_000_000)).await;
    let model_dir = scratch_dir("models-restart");
    let mut hive = hive_on(&stalling, &model_dir).await;
    let model = format!("hf:{SMOL_REPO}");
    let job = hive.submit_ok(&download(&model)).await;
    // The first chunk is on disk once hf-hub's partial file records it as committed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed_bytes(&model_dir) < 10_000_000 {
        assert!(Instant::now() < deadline, "the download never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stream = hive.jobs().open_stream(&job).await;
    hive.daemon.signal("TERM").expect("SIGTERM the hive");
    let stream = read_raw_stream(stream).await.expect("the stream");
    assert_eq!(error_of(&stream).0, ErrorCode::ShuttingDown);
    assert_eq!(
        hive.daemon
            .wait_exit(Duration::from_secs(20))
            .await
            .ok()
            .flatten(),
        Some(0)
    );
    drop(hive);

    let hub = smol_hub(Fault::None).await;
    let hive = hive_on(&hub, &model_dir).await;
    let listed = list(&hive).await;
    assert_eq!(listed[0].entry.state, ModelState::Failed, "{listed:?}");
    let resumed = hive.run_job(&download(&model)).await;
    resumed.assert_done("resumed model_download");
    let starts: Vec<u64> = transfers(&hub).iter().map(|(s, _)| *s).collect();
    assert!(
        !starts.contains(&0),
        "the first chunk was fetched again: {starts:?}"
    );
    assert_eq!(data_model(&resumed).entry.state, ModelState::Ready);
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_requests_share_one_download_and_cancelling_both_cleans_up() {
    let hub = smol_hub(Fault::StallAt(15_000_000)).await;
    let model_dir = scratch_dir("models-cancel");
    let hive = hive_on(&hub, &model_dir).await;
    let model = format!("hf:{SMOL_REPO}");
    let jobs = hive.jobs();

    let first = hive.submit_ok(&download(&model)).await;
    let second = hive.submit_ok(&download(&model)).await;
    // Both jobs report the one transfer while it hangs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stalled = transfers(&hub)
            .iter()
            .any(|(start, _)| *start == 10_000_000);
        let partial = files_under(&model_dir.join("hub"))
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".sync.part"));
        if stalled && partial {
            break;
        }
        assert!(Instant::now() < deadline, "the download never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let starts: Vec<u64> = transfers(&hub).iter().map(|(s, _)| *s).collect();
    assert_eq!(
        starts.iter().filter(|s| **s == 0).count(),
        1,
        "two transfers for one model: {starts:?}"
    );
    let listed = list(&hive).await;
    assert_eq!(listed[0].entry.state, ModelState::Downloading);

    // One job going away leaves the download to the other.
    let http = reqwest::Client::new();
    let cancel = |id: &str| {
        http.delete(format!("{}/v1/jobs/{id}", hive.url()))
            .bearer_auth(TOKEN)
            .send()
    };
    assert!(
        cancel(&first.job_id)
            .await
            .expect("DELETE")
            .status()
            .is_success()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(list(&hive).await[0].entry.state, ModelState::Downloading);

    assert!(
        cancel(&second.job_id)
            .await
            .expect("DELETE")
            .status()
            .is_success()
    );
    let stream = read_raw_stream(jobs.open_stream(&second).await)
        .await
        .expect("the stream");
    assert_eq!(error_of(&stream).0, ErrorCode::Cancelled);
    hive.wait_until(
        Duration::from_secs(10),
        "the partial files are removed",
        || {
            !files_under(&model_dir.join("hub"))
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".sync.part"))
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list(&hive).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cancelled download stays listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_spawn_downloads_first_and_a_model_in_use_is_not_deleted() {
    let hub = tiny_hub(Fault::None).await;
    let model_dir = scratch_dir("models-spawn");
    let hive = hive_on(&hub, &model_dir).await;
    let model = format!("hf:{TINY_REPO}");

    let stream = hive
        .run_job(&json!({"operation": "worker_spawn", "model": model}))
        .await;
    stream.assert_done("worker_spawn");
    let downloading = events(&stream)
        .position(|e| matches!(e, JobEvent::Downloading { .. }))
        .expect("downloading events");
    let spawning = events(&stream)
        .position(|e| matches!(e, JobEvent::Spawning { .. }))
        .expect("a spawning event");
    assert!(downloading < spawning, "{:?}", stream.events);
    let worker: WorkerInfo = events(&stream)
        .find_map(|e| match e {
            JobEvent::Data { data } => serde_json::from_value(data["worker"].clone()).ok(),
            _ => None,
        })
        .expect("the worker");
    assert_eq!(worker.model, model);

    let refused = hive
        .submit(&json!({"operation": "model_delete", "model": model}))
        .await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("a JSON error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("in use") && message.contains(&worker.worker_id),
        "{body}"
    );

    let stopped = hive
        .run_job(&json!({"operation": "worker_delete", "worker_id": worker.worker_id}))
        .await;
    stopped.assert_done("worker_delete");
    let deleted = hive
        .run_job(&json!({"operation": "model_delete", "model": model}))
        .await;
    deleted.assert_done("model_delete");
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn keeper_infer_on_a_model_no_hive_has_downloads_it_first() {
    let hub = tiny_hub(Fault::None).await;
    let model_dir = scratch_dir("models-infer");
    let dir = model_dir.display().to_string();
    let env = KeeperEnv::new(&[
        ("RBEE_HEARTBEAT_INTERVAL", "250ms"),
        ("HF_ENDPOINT", hub.url.as_str()),
        ("RBEE_HIVE_MODEL_DIR", dir.as_str()),
    ]);
    let model = format!("hf:{TINY_REPO}");

    let infer = env
        .run(
            &[
                "infer",
                "--model",
                &model,
                "--max-tokens",
                "4",
                "--temperature",
                "0",
                "hello",
            ],
            Duration::from_secs(300),
        )
        .await;
    assert_eq!(infer.code, Some(0), "{infer:?}\n{}", env.logs());
    assert!(
        infer.stderr.contains(&format!("downloading {model}")),
        "{}",
        infer.stderr
    );
    assert!(infer.stderr.contains("spawning worker"), "{}", infer.stderr);

    let listed = env
        .run(&["model", "list", "--json"], Duration::from_secs(60))
        .await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let body: Value = serde_json::from_str(listed.stdout.trim()).expect("JSON");
    assert_eq!(body["models"][0]["id"], format!("{model}:{TINY_FILE}"));
    assert_eq!(body["models"][0]["state"], "ready");

    let got = env
        .run(&["model", "get", &model], Duration::from_secs(60))
        .await;
    assert_eq!(got.code, Some(0), "{got:?}");
    assert!(
        got.stdout.contains("ready") && got.stdout.contains(TINY_FILE),
        "{got:?}"
    );

    // The worker runs it, so it stays.
    let refused = env
        .run(&["model", "rm", &model], Duration::from_secs(60))
        .await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("in use"), "{refused:?}");

    let not_hub = env
        .run(
            &["model", "download", "/some/file.gguf"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(not_hub.code, Some(2), "{not_hub:?}");

    let stopped = env.run(&["queen", "stop"], Duration::from_secs(60)).await;
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    let _ = std::fs::remove_dir_all(&model_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spawn_that_cannot_fit_is_refused_before_its_model_is_downloaded() {
    let hub = tiny_hub(Fault::None).await;
    let model_dir = scratch_dir("models-no-room");
    let dir = model_dir.display().to_string();
    let hive = TestHive::start(
        "models-hive",
        TOKEN,
        &[
            "--model-dir",
            &dir,
            "--hf-endpoint",
            &hub.url,
            "--memory-reserve",
            "1TiB",
        ],
    )
    .await;

    let stream = hive
        .run_job(&json!({"operation": "worker_spawn", "model": format!("hf:{TINY_REPO}")}))
        .await;
    let (code, message) = error_of(&stream);
    assert_eq!(code, ErrorCode::NoCapacity, "{message}");
    assert!(message.contains("not downloaded"), "{message}");
    assert!(
        !events(&stream).any(|e| matches!(e, JobEvent::Downloading { .. })),
        "{:?}",
        stream.events
    );
    assert_eq!(transfers(&hub), Vec::new(), "no byte of the model moved");
    assert!(list(&hive).await.is_empty(), "nothing entered the catalog");
    let _ = std::fs::remove_dir_all(&model_dir);
}
