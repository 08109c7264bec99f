//! `queen::serve` through its public API, in-process: the routes answer, a cold start that
//! cannot reach its hive ends the job with an error, and cancelling the token stops the queen.

use std::time::Duration;

use job_client::JobClient;
use queen::{Health, HiveList, QueenConfig, WorkerList};
use rbee_contract::{ErrorCode, HiveHeartbeat, HiveInfo, InferRequest, JobEvent, Operation};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn serves_until_cancelled() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let config = QueenConfig {
        heartbeat_interval: Duration::from_millis(100),
        spawn_timeout: Duration::from_secs(20),
        ..QueenConfig::default()
    };
    let server = tokio::spawn(queen::serve(listener, config, shutdown.clone()));
    let http = reqwest::Client::new();

    // A hive at an address nobody answers.
    let beat = HiveHeartbeat {
        hive: HiveInfo {
            hive_id: "h1".into(),
            url: "http://127.0.0.1:1".into(),
            devices: Vec::new(),
            workers: Vec::new(),
            models: Vec::new(),
            model_dirs: Vec::new(),
        },
    };
    let response = http
        .post(format!("{url}/v1/hive-heartbeat"))
        .json(&beat)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let hives: HiveList = http
        .get(format!("{url}/v1/hives"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hives.hives.len(), 1);
    assert_eq!(hives.hives[0].hive, beat.hive);
    assert_eq!(hives.hives[0].status, Health::Healthy);
    let workers: WorkerList = http
        .get(format!("{url}/v1/workers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(workers.workers.is_empty());

    let infer = Operation::Infer(InferRequest {
        model: "m".into(),
        prompt: Some("hello".into()),
        ..InferRequest::default()
    });
    let mut progress = Vec::new();
    let terminal = JobClient::new(&url)
        .run_to_end(&infer, |event| progress.push(event.clone()))
        .await
        .unwrap();
    match terminal {
        JobEvent::Error { code, message } => {
            assert_eq!(code, ErrorCode::Unavailable);
            assert!(message.contains("hive h1"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(
        progress.iter().any(
            |e| matches!(e, JobEvent::Narration { message } if message.contains("asking hive h1"))
        ),
        "{progress:?}"
    );

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(15), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}
