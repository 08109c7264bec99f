//! `rbee-keeper` managing a cluster of real daemons: queen and hive start and stop, workers
//! spawned, listed and stopped with `--json` output, heartbeats that (re)build the queen's
//! view, a killed worker and a killed hive, and bad usage. Each test has its own state
//! directory and queen port; daemons send heartbeats every 100 ms.

use std::time::{Duration, Instant};

use serde_json::Value;
use test_harness::{KeeperEnv, KeeperOutput, process_gone, send_signal, tiny_model};

const INTERVAL: Duration = Duration::from_millis(100);
const STEP: Duration = Duration::from_secs(120);

fn keeper_env() -> KeeperEnv {
    KeeperEnv::new(&[("RBEE_HEARTBEAT_INTERVAL", "100ms")])
}

/// Runs the keeper, asserts exit 0, and parses its stdout as one JSON document.
async fn json_ok(env: &KeeperEnv, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = env.run(&all, STEP).await;
    assert_eq!(out.code, Some(0), "{args:?}: {out:?}\n{}", env.logs());
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out:?}"))
}

fn ids(list: &Value, key: &str, id: &str) -> Vec<String> {
    list[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {list}"))
        .iter()
        .map(|entry| entry[id].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `worker list --json` until `done` holds for its worker ids; returns the time taken.
async fn until_workers(
    env: &KeeperEnv,
    timeout: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let list = env.queen_json("/v1/workers").await;
        if done(&ids(&list, "workers", "worker_id")) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "workers: {list}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `queen start` and `hive start` (naming the hive explicitly); returns the hive's id.
async fn start_cluster(env: &KeeperEnv) -> String {
    let queen = json_ok(env, &["queen", "start"]).await;
    assert_eq!(queen["started"], true, "{queen}");
    assert_eq!(queen["url"], env.queen_url.as_str());
    let hive_id = format!("{}-explicit", env.hive_id);
    let hive = json_ok(env, &["hive", "start", "--hive-id", &hive_id]).await;
    assert_eq!(hive["started"], true, "{hive}");
    assert_eq!(hive["registered"], true, "{hive}");
    assert_eq!(hive["hive_id"], hive_id.as_str());
    hive_id
}

async fn spawn_tiny(env: &KeeperEnv, hive_id: &str) -> String {
    let model = tiny_model();
    let spawned = json_ok(
        env,
        &["worker", "spawn", "--model", model.to_str().unwrap()],
    )
    .await;
    let worker = &spawned["worker"];
    assert_eq!(worker["state"], "ready", "{spawned}");
    assert_eq!(worker["hive_id"], hive_id, "{spawned}");
    worker["worker_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_are_spawned_listed_and_stopped_through_the_keeper() {
    let env = keeper_env();
    let hive_id = start_cluster(&env).await;

    let hives = json_ok(&env, &["hive", "list"]).await;
    assert_eq!(
        ids(&hives, "hives", "hive_id"),
        std::slice::from_ref(&hive_id)
    );
    assert_eq!(hives["hives"][0]["status"], "healthy");

    // A ready worker's heartbeats reach the queen within three intervals.
    let first = spawn_tiny(&env, &hive_id).await;
    let took = until_workers(&env, 3 * INTERVAL, |ids| ids.contains(&first)).await;
    assert!(took <= 3 * INTERVAL, "{took:?}");
    let second = spawn_tiny(&env, &hive_id).await;
    assert_ne!(first, second);
    let listed = json_ok(&env, &["worker", "list"]).await;
    let mut listed = ids(&listed, "workers", "worker_id");
    listed.sort();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    let only_other_hive = json_ok(&env, &["worker", "list", "--hive", "nope"]).await;
    assert!(ids(&only_other_hive, "workers", "worker_id").is_empty());

    let human = env.run(&["worker", "list"], STEP).await;
    assert_eq!(human.code, Some(0));
    assert!(human.stdout.starts_with("WORKER"), "{human:?}");
    assert!(human.stdout.contains(&first), "{human:?}");

    // Stopping one through the keeper.
    let first_pid = env.worker_pid(&first).expect("the first worker's process");
    let stopped = json_ok(&env, &["worker", "stop", &first]).await;
    assert_eq!(stopped["stopped"], true);
    assert!(process_gone(first_pid));
    until_workers(&env, Duration::from_secs(10), |ids| !ids.contains(&first)).await;

    // A worker killed behind everyone's back is noticed and leaves the list.
    let second_pid = env
        .worker_pid(&second)
        .expect("the second worker's process");
    send_signal(second_pid, "KILL");
    until_workers(&env, Duration::from_secs(10), |ids| ids.is_empty()).await;
    let human = env.run(&["worker", "list"], STEP).await;
    assert_eq!(human.stdout.trim(), "no workers", "{human:?}");
    let hive_log = std::fs::read_to_string(env.state_dir.join("hive.log")).unwrap();
    assert!(
        hive_log.contains(&second),
        "the hive reports the dead worker:\n{hive_log}"
    );

    // A second stop of the same worker is a clear error.
    let again = env.run(&["worker", "stop", &first], STEP).await;
    assert_eq!(again.code, Some(1), "{again:?}");
    assert_eq!(again.stderr.lines().count(), 1, "{again:?}");
    assert!(again.stderr.starts_with("rbee-keeper: "), "{again:?}");

    // The local hive: its status, then stopping it on its own (with a worker to take along).
    let third = spawn_tiny(&env, &hive_id).await;
    let third_pid = env.worker_pid(&third).expect("the third worker's process");
    let status = json_ok(&env, &["hive", "status"]).await;
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["registered"], true, "{status}");
    assert_eq!(status["hive_id"], hive_id.as_str(), "{status}");
    let hive_pid = env.pid_file("hive").expect("hive.pid");
    let stopped = json_ok(&env, &["hive", "stop"]).await;
    assert_eq!(stopped["stopped"], true, "{stopped}");
    assert!(process_gone(hive_pid) && process_gone(third_pid));
    assert_eq!(env.pid_file("hive"), None);
    let status = env.run(&["hive", "status"], STEP).await;
    assert_eq!(status.code, Some(3), "{status:?}");

    let stop = env.run(&["queen", "stop"], STEP).await;
    assert_eq!(stop.code, Some(0), "{stop:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.daemons().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", env.daemons());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_rebuild_a_restarted_queen_and_a_killed_hive_goes_stale() {
    let env = keeper_env();
    let hive_id = start_cluster(&env).await;
    let worker = spawn_tiny(&env, &hive_id).await;

    // A queen killed outright loses its registries; the next heartbeats rebuild them.
    let old_queen = env.pid_file("queen").expect("queen.pid");
    send_signal(old_queen, "KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(old_queen) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = env.run(&["queen", "status"], STEP).await;
    assert_eq!(status.code, Some(3), "{status:?}");
    let restarted = json_ok(&env, &["queen", "start"]).await;
    assert_eq!(restarted["started"], true, "{restarted}");
    let started = Instant::now();
    loop {
        let hives = env.queen_json("/v1/hives").await;
        let workers = env.queen_json("/v1/workers").await;
        if ids(&hives, "hives", "hive_id") == [hive_id.clone()]
            && ids(&workers, "workers", "worker_id") == [worker.clone()]
        {
            break;
        }
        assert!(
            started.elapsed() <= 3 * INTERVAL,
            "not rebuilt within 3 intervals: {hives} {workers}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = json_ok(&env, &["queen", "status"]).await;
    assert_eq!(status["running"], true);
    assert_eq!(
        (status["hives"].as_u64(), status["workers"].as_u64()),
        (Some(1), Some(1))
    );

    // A hive killed outright goes stale in `hive list`.
    let hive_pid = env.pid_file("hive").expect("hive.pid");
    send_signal(hive_pid, "KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hives = json_ok(&env, &["hive", "list"]).await;
        if hives["hives"][0]["status"] == "stale" {
            assert!(hives["hives"][0]["last_seen_ms_ago"].as_u64().unwrap() >= 300);
            break;
        }
        assert!(Instant::now() < deadline, "{hives}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let human = env.run(&["hive", "list"], STEP).await;
    assert!(human.stdout.contains("stale"), "{human:?}");
    let local = env.run(&["hive", "status"], STEP).await;
    assert_eq!(
        local.code,
        Some(3),
        "the dead hive's pid file is stale: {local:?}"
    );
    assert_eq!(env.pid_file("hive"), None);
}

fn one_error_line(out: &KeeperOutput) -> &str {
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(lines[0].starts_with("rbee-keeper: "), "{out:?}");
    lines[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_usage_and_unreachable_queens_are_one_line_errors() {
    let env = keeper_env();
    let quick = Duration::from_secs(30);

    let out = env.run(&["frobnicate"], quick).await;
    assert_eq!(out.code, Some(2));
    assert!(one_error_line(&out).contains("frobnicate"));

    let out = env.run(&["infer", "Hello"], quick).await;
    assert_eq!(out.code, Some(2));
    assert!(one_error_line(&out).contains("--model"));

    let out = env
        .run(&["infer", "--model", "/no/such/model.gguf", "Hello"], quick)
        .await;
    assert_eq!(out.code, Some(2));
    assert_eq!(
        one_error_line(&out),
        "rbee-keeper: model path /no/such/model.gguf does not exist"
    );
    assert!(
        env.daemons().is_empty() && env.pid_file("queen").is_none(),
        "nothing was started"
    );

    // A queen elsewhere is never started, only reported.
    let elsewhere = format!("http://127.0.0.2:{}", test_harness::free_port());
    let out = env
        .run(
            &[
                "--queen-url",
                &elsewhere,
                "infer",
                "--model",
                "hf:org/repo",
                "Hello",
            ],
            quick,
        )
        .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        one_error_line(&out).starts_with(&format!("rbee-keeper: no queen answers at {elsewhere}")),
        "{out:?}"
    );
    let out = env
        .run(&["--queen-url", &elsewhere, "queen", "start"], quick)
        .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    one_error_line(&out);

    let out = env.run(&["worker", "list"], quick).await;
    assert_eq!(out.code, Some(1));
    assert!(
        one_error_line(&out).contains("rbee-keeper queen start"),
        "{out:?}"
    );

    // Status of what does not run is exit 3; stopping it is a no-op.
    let out = env.run(&["queen", "status"], quick).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    let out = env.run(&["hive", "stop"], quick).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // The config file names the queen; a broken one is an error naming the file.
    std::fs::create_dir_all(&env.config_dir).unwrap();
    let config = env.config_dir.join("config.toml");
    std::fs::write(&config, format!("queen_url = \"{elsewhere}\"\n")).unwrap();
    // Without --queen-url (which `env.run` passes) the file decides.
    let out = tokio::process::Command::new(test_harness::bin_path("rbee-keeper"))
        .args(["queen", "status", "--json"])
        .env("XDG_CONFIG_HOME", env.config_dir.parent().unwrap())
        .env("XDG_STATE_HOME", env.state_dir.parent().unwrap())
        .env_remove("RBEE_QUEEN_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["url"], elsewhere.as_str());
    // Even with --queen-url given, a broken file is reported rather than ignored.
    std::fs::write(&config, "queen_url = 7833\n").unwrap();
    let out = env.run(&["queen", "status"], quick).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(one_error_line(&out).contains("config.toml"), "{out:?}");
}
