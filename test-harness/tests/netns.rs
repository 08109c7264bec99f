//! Several machines for real: the queen and two hives, each in a network namespace of its own
//! with its own address from the benchmarking range 198.18.0.0/15, joined by veth pairs on a
//! bridge that lives in a namespace too. The test itself reaches the cluster through one more
//! veth into that bridge. Daemons bind their namespace's address (so they need the cluster
//! token, and the queen API keys), exactly as on separate boxes.
//!
//! Needs root and `ip`; anywhere else it prints why and passes without checking anything.
//! Every namespace, link and process is removed by drop guards, also when the test fails.

use std::process::Command;
use std::time::{Duration, Instant};

use rbee_contract::JobEvent;
use serde_json::{Value, json};
use test_harness::{Daemon, JobApi, free_port, scratch_dir, tiny_model};

const TOKEN: &str = "netns-cluster-token";
const API_KEY: &str = "netns-api-key";
const QUEEN_PORT: u16 = 7833;
const HIVE_PORT: u16 = 7835;
/// Short, so that stale comes quickly; long enough that a loaded machine keeps up.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Runs `ip` with `args`; the error carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn ip_in(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The namespaces and links of one test run; dropping it kills every process left in the
/// namespaces and deletes them (which deletes their links too).
struct Net {
    tag: String,
    /// `198.18.<subnet>.0/24`.
    subnet: u8,
    namespaces: Vec<String>,
    host_link: Option<String>,
}

impl Net {
    fn ns(&self, role: &str) -> String {
        format!("rbee-{}-{role}", self.tag)
    }

    fn addr(&self, host: u8) -> String {
        format!("198.18.{}.{host}", self.subnet)
    }

    fn add_namespace(&mut self, role: &str) -> Result<String, String> {
        let ns = self.ns(role);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace for `role` whose `eth0` has `.host` and sits on the bridge.
    fn add_host(&mut self, role: &str, host: u8) -> Result<(), String> {
        let ns = self.add_namespace(role)?;
        let bridge_ns = self.ns("br");
        let port = format!("p-{role}");
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            &bridge_ns,
        ])?;
        ip_in(&bridge_ns, &["link", "set", &port, "master", "br0", "up"])?;
        let cidr = format!("{}/24", self.addr(host));
        ip_in(&ns, &["addr", "add", &cidr, "dev", "eth0"])?;
        ip_in(&ns, &["link", "set", "eth0", "up"])
    }

    /// The bridge, the queen's and both hives' namespaces, and a link from this process's
    /// namespace (address `.254`) so the test can talk to the cluster.
    fn build() -> Result<Net, String> {
        let unique = std::process::id() ^ u32::from(free_port());
        let mut net = Net {
            tag: format!("{:04x}", unique & 0xffff),
            subnet: 0,
            namespaces: Vec::new(),
            host_link: None,
        };
        net.subnet = free_subnet(unique)?;
        let bridge_ns = net.add_namespace("br")?;
        ip_in(&bridge_ns, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&bridge_ns, &["link", "set", "br0", "up"])?;
        let host_link = format!("rbee{}h", net.tag);
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", "p-test", "netns",
            &bridge_ns,
        ])?;
        net.host_link = Some(host_link.clone());
        ip_in(
            &bridge_ns,
            &["link", "set", "p-test", "master", "br0", "up"],
        )?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.addr(254)),
            "dev",
            &host_link,
        ])?;
        ip(&["link", "set", &host_link, "up"])?;
        net.add_host("q", 1)?;
        net.add_host("a", 2)?;
        net.add_host("b", 3)?;
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        if let Some(link) = &self.host_link {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A `/24` of 198.18.0.0/16 that no interface of this namespace uses yet.
fn free_subnet(seed: u32) -> Result<u8, String> {
    let used = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .map_err(|e| format!("cannot run ip: {e}"))?;
    (0..254u32)
        .map(|i| u8::try_from((seed + i) % 254 + 1).unwrap_or(1))
        .find(|n| !used.contains(&format!("198.18.{n}.")))
        .ok_or_else(|| "no free /24 in 198.18.0.0/16".to_string())
}

/// One daemon inside a namespace, through `ip netns exec`.
fn start_in(net: &Net, role: &str, bin: &str, args: &[String], url: String) -> Daemon {
    let ns = net.ns(role);
    Daemon::start_through(
        bin,
        &["ip", "netns", "exec", &ns],
        args,
        &[("RBEE_CLUSTER_TOKEN", TOKEN), ("RBEE_API_KEYS", API_KEY)],
        url,
    )
    .unwrap_or_else(|e| panic!("start {bin} in {ns}: {e}"))
}

fn start_hive(net: &Net, role: &str, host: u8, queen_url: &str) -> (Daemon, std::path::PathBuf) {
    let addr = net.addr(host);
    let log_dir = scratch_dir(&format!("netns-{role}"));
    let model_dir = tiny_model()
        .parent()
        .expect("the model's directory")
        .display()
        .to_string();
    let args: Vec<String> = [
        "--bind",
        &addr,
        "--port",
        &HIVE_PORT.to_string(),
        "--hive-id",
        role,
        "--queen-url",
        queen_url,
        "--heartbeat-interval",
        &format!("{}ms", HEARTBEAT.as_millis()),
        "--log-dir",
        &log_dir.display().to_string(),
        "--worker-port-range",
        "9300-9309",
        "--stop-grace",
        "2s",
        // The API key may have the hives load the test model: it is under an allowed
        // directory (a key that is not an admin key may not name any other path).
        "--allow-model-dir",
        &model_dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let hive = start_in(
        net,
        role,
        "rbee-hive",
        &args,
        format!("http://{addr}:{HIVE_PORT}"),
    );
    (hive, log_dir)
}

async fn get_json(url: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(API_KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .expect("a JSON body")
}

/// The `status` of hive `id` in the queen's `GET /v1/hives`, if listed.
async fn hive_status(queen: &Daemon, id: &str) -> Option<(String, u64)> {
    let hives = get_json(&format!("{}/v1/hives", queen.url)).await;
    hives["hives"].as_array()?.iter().find_map(|h| {
        (h["hive_id"] == id).then(|| {
            (
                h["status"].as_str().unwrap_or_default().to_string(),
                h["last_seen_ms_ago"].as_u64().unwrap_or_default(),
            )
        })
    })
}

async fn poll<F, Fut>(what: &str, limit: Duration, logs: &[&Daemon], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|d| d.log_text()).collect();
            panic!("{what}: not within {limit:?}\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawning_hives(events: &[(Option<String>, JobEvent)]) -> Vec<String> {
    events
        .iter()
        .filter_map(|(_, e)| match e {
            JobEvent::Spawning { hive_id, .. } => hive_id.clone(),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn hives_in_separate_namespaces_get_routed_work_go_stale_and_come_back() {
    // CI runs as root and sets RBEE_REQUIRE_NETNS=1: there a missing namespace is a failure.
    let required = std::env::var("RBEE_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    if !is_root() || Command::new("ip").arg("-V").output().is_err() {
        assert!(
            !required,
            "RBEE_REQUIRE_NETNS=1 but network namespaces need root and the `ip` tool"
        );
        println!("skipped: network namespaces need root and the `ip` tool");
        return;
    }
    let net = match Net::build() {
        Ok(net) => net,
        Err(err) => {
            assert!(
                !required,
                "RBEE_REQUIRE_NETNS=1 but network namespaces cannot be created: {err}"
            );
            println!("skipped: cannot create network namespaces here: {err}");
            return;
        }
    };
    let queen_addr = net.addr(1);
    let queen_url = format!("http://{queen_addr}:{QUEEN_PORT}");
    let queen_args: Vec<String> = [
        "--bind",
        &queen_addr,
        "--port",
        &QUEEN_PORT.to_string(),
        "--heartbeat-interval",
        &format!("{}ms", HEARTBEAT.as_millis()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut queen = start_in(&net, "q", "queen-rbee", &queen_args, queen_url.clone());
    queen
        .wait_for("/health", None, Duration::from_secs(30))
        .await
        .expect("the queen answers on its namespace's address");
    let (hive_a, logs_a) = start_hive(&net, "a", 2, &queen_url);
    let (hive_b, logs_b) = start_hive(&net, "b", 3, &queen_url);
    let all = [&queen, &hive_a, &hive_b];
    for id in ["a", "b"] {
        poll(
            &format!("hive {id} registers"),
            Duration::from_secs(30),
            &all,
            || async {
                hive_status(&queen, id)
                    .await
                    .is_some_and(|(s, _)| s == "healthy")
            },
        )
        .await;
    }
    let hives = get_json(&format!("{queen_url}/v1/hives")).await;
    for (id, host) in [("a", 2), ("b", 3)] {
        let entry = hives["hives"]
            .as_array()
            .and_then(|l| l.iter().find(|h| h["hive_id"] == id))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            entry["url"],
            format!("http://{}:{HIVE_PORT}", net.addr(host)),
            "{hives}"
        );
    }

    // The model is served by hive B only: `infer` goes there, no cold start anywhere.
    let model = tiny_model().display().to_string();
    let api = JobApi::new(&queen_url, Some(API_KEY));
    let spawned = api
        .run(
            "/v1/jobs",
            &json!({"operation": "worker_spawn", "hive_id": "b", "model": model}),
        )
        .await;
    spawned.assert_one_terminal_then_done("worker_spawn on b");
    assert_eq!(spawning_hives(&spawned.events), vec!["b".to_string()]);
    poll(
        "the worker on b is ready at the queen",
        Duration::from_secs(30),
        &all,
        || async {
            let workers = get_json(&format!("{queen_url}/v1/workers")).await;
            workers["workers"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|w| w["hive_id"] == "b" && w["state"] == "ready")
            })
        },
    )
    .await;
    let request = json!({"operation": "infer", "model": model, "prompt": "hello",
                         "max_tokens": 8, "temperature": 0});
    let routed = api.run("/v1/jobs", &request).await;
    routed.assert_one_terminal_then_done("infer routed to b");
    assert!(
        matches!(routed.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        routed.events
    );
    assert!(spawning_hives(&routed.events).is_empty(), "no cold start");
    let worker_log = std::fs::read_dir(&logs_b)
        .expect("hive b's worker logs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect::<String>();
    assert!(
        worker_log.contains("generation ended"),
        "b's worker generated: {worker_log}"
    );
    assert_eq!(
        std::fs::read_dir(&logs_a).map(|d| d.count()).unwrap_or(0),
        0,
        "hive a never started a worker"
    );

    // Hive B's link goes down: it turns stale, and the model is served elsewhere.
    ip_in(&net.ns("b"), &["link", "set", "eth0", "down"]).expect("take b's link down");
    let stale_after = 3 * u64::try_from(HEARTBEAT.as_millis()).unwrap_or(u64::MAX);
    poll(
        "hive b turns stale",
        Duration::from_secs(30),
        &all,
        || async {
            hive_status(&queen, "b")
                .await
                .is_some_and(|(status, silent)| status == "stale" && silent >= stale_after)
        },
    )
    .await;
    let elsewhere = api.run("/v1/jobs", &request).await;
    elsewhere.assert_one_terminal_then_done("infer while b is down");
    assert!(
        matches!(elsewhere.terminal(), Some(JobEvent::Done { .. })),
        "{:?}",
        elsewhere.events
    );
    assert_eq!(
        spawning_hives(&elsewhere.events),
        vec!["a".to_string()],
        "nothing goes to the stale hive: a starts a worker instead"
    );

    // The link comes back: so does the hive.
    ip_in(&net.ns("b"), &["link", "set", "eth0", "up"]).expect("bring b's link up");
    poll(
        "hive b is healthy again",
        Duration::from_secs(30),
        &all,
        || async {
            hive_status(&queen, "b")
                .await
                .is_some_and(|(s, _)| s == "healthy")
        },
    )
    .await;

    drop((hive_a, hive_b));
    let _ = queen.signal("TERM");
    let _ = queen.wait_exit(Duration::from_secs(30)).await;
    let _ = std::fs::remove_dir_all(&logs_a);
    let _ = std::fs::remove_dir_all(&logs_b);
}
