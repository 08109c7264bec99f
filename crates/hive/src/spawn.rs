//! `worker_spawn`: start a worker, follow it until its model is loaded, hand back its info.
//!
//! Events: `spawning {worker_id, hive_id}`; `loading` at 0 once the worker's port answers, the
//! worker's own `loading` events relayed as they come, `loading` at 1 when it is loaded; then
//! `data {"worker": WorkerInfo}` and the terminal `done` (`complete`). A worker that
//! fails to load, exits early or takes too long ends the job with an `error` whose message
//! quotes the last lines of its log, and is not left running.

use std::time::Duration;

use futures::StreamExt;
use job_client::JobClient;
use job_server::{JobContext, JobFailure, JobOutcome, JobResult};
use rbee_contract::{ErrorCode, JobCreated, JobEvent};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Hive;
use crate::children::{Exit, LaunchError, Launched, SpawnSpec, wait_exit};
use crate::logs;

/// Attempts at starting a worker when another process took its port first.
const PORT_ATTEMPTS: usize = 3;

/// How often the worker's `/health` is polled until its port answers.
const HEALTH_POLL: Duration = Duration::from_millis(50);

/// A worker whose load failed exits by itself shortly after (it lingers so that its error can
/// be read); the hive waits this long for it, so the report quotes its complete log.
const FAILED_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Stops the worker unless the spawn succeeded: a spawn that fails, times out or is cancelled
/// (its job dropped) leaves no worker behind.
struct StopUnlessReady(Option<CancellationToken>);

impl StopUnlessReady {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for StopUnlessReady {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            stop.cancel();
        }
    }
}

pub(crate) async fn run(hive: &Hive, spec: SpawnSpec, ctx: &JobContext) -> JobResult {
    // Refused when the model does not fit; its memory stays set aside until the spawn ends.
    let _room = crate::capacity::reserve(hive, &spec).await?;
    let (index, worker_id) = hive.children.next_worker_id();
    ctx.emit(JobEvent::Spawning {
        worker_id: worker_id.clone(),
        hive_id: Some(hive.config.hive_id.clone()),
    })
    .await?;
    let mut guard = StopUnlessReady(None);
    let limit = hive.config.load_timeout;
    let spawned = tokio::time::timeout(
        limit,
        start_and_load(hive, index, &worker_id, &spec, ctx, &mut guard),
    )
    .await;
    let launched = match spawned {
        Ok(launched) => launched?,
        Err(_) => {
            return Err(JobFailure::new(
                ErrorCode::Timeout,
                format!(
                    "worker {worker_id} did not finish loading {} within {limit:?}; it was stopped",
                    spec.model_ref
                ),
            ));
        }
    };
    let info = hive
        .children
        .fetch_info(&launched.local_url)
        .await
        .map_err(|err| {
            JobFailure::new(
                ErrorCode::Unavailable,
                format!("worker {worker_id} loaded its model but did not describe itself: {err}"),
            )
        })?;
    hive.children.set_info(index, info.clone());
    ctx.emit(JobEvent::Data {
        data: json!({ "worker": info }),
    })
    .await?;
    guard.disarm();
    tracing::info!(worker_id, url = %info.url, "worker ready");
    Ok(JobOutcome::complete())
}

/// Starts the process (on another port if the first one was taken meanwhile), waits for its
/// port, then relays its loading progress until it is loaded.
async fn start_and_load(
    hive: &Hive,
    index: u64,
    worker_id: &str,
    spec: &SpawnSpec,
    ctx: &JobContext,
    guard: &mut StopUnlessReady,
) -> Result<Launched, JobFailure> {
    let mut taken_ports = Vec::new();
    let launched = loop {
        let launched = hive
            .children
            .launch(index, worker_id, spec, &taken_ports)
            .map_err(launch_failure)?;
        guard.0 = Some(launched.stop.clone());
        match wait_for_port(hive, &launched).await {
            Ok(()) => break launched,
            Err(exit) => {
                let tail = logs::tail_async(launched.log.clone(), logs::TAIL_LINES).await;
                if !exit.requested
                    && tail.contains("cannot bind")
                    && taken_ports.len() + 1 < PORT_ATTEMPTS
                {
                    tracing::info!(
                        worker_id,
                        port = launched.port,
                        "port taken meanwhile; trying another"
                    );
                    taken_ports.push(launched.port);
                    continue;
                }
                return Err(exited_early(worker_id, spec, &launched, exit).await);
            }
        }
    };
    ctx.emit(JobEvent::Loading {
        model: spec.model_ref.clone(),
        fraction: 0.0,
        message: Some(format!(
            "worker {worker_id} is up on port {}; loading the model",
            launched.port
        )),
    })
    .await?;
    follow_loading(hive, worker_id, spec, &launched, ctx).await?;
    Ok(launched)
}

/// Polls the worker's `/health` until it answers as this worker (another process may hold the
/// port), or the process exits.
async fn wait_for_port(hive: &Hive, launched: &Launched) -> Result<(), Exit> {
    let mut exit = launched.exit.clone();
    let url = format!("{}/health", launched.local_url);
    loop {
        let answer = hive.http.get(&url).timeout(Duration::from_secs(1)).send();
        let healthy = async {
            match answer.await {
                Ok(response) if response.status().is_success() => response
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|body| body["worker_id"] == launched.worker_id.as_str()),
                _ => false,
            }
        };
        tokio::select! {
            exited = wait_exit(&mut exit) => return Err(exited),
            healthy = healthy => if healthy { return Ok(()) },
        }
        tokio::select! {
            exited = wait_exit(&mut exit) => return Err(exited),
            () = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
}

/// Relays the worker's `GET /v1/loading/progress` until its `done`.
async fn follow_loading(
    hive: &Hive,
    worker_id: &str,
    spec: &SpawnSpec,
    launched: &Launched,
    ctx: &JobContext,
) -> Result<(), JobFailure> {
    let mut client = JobClient::new(&launched.local_url).with_reconnects(0, Duration::ZERO);
    if let Some(token) = &hive.config.cluster_token {
        client = client.with_token(token);
    }
    // The progress route speaks the job stream format, so the job client reads it.
    let mut events = client
        .handle(JobCreated {
            job_id: worker_id.to_owned(),
            sse_url: "/v1/loading/progress".into(),
        })
        .events();
    let mut exit = launched.exit.clone();
    let mut fraction = 0.0;
    loop {
        let event = tokio::select! {
            exited = wait_exit(&mut exit) => return Err(exited_early(worker_id, spec, launched, exited).await),
            event = events.next() => event,
        };
        match event {
            Some(Ok(JobEvent::Done { .. })) => {
                // A worker that loaded before the hive connected reports only its outcome;
                // progress still ends at 100 % for whoever renders it.
                if fraction < 1.0 {
                    ctx.emit(JobEvent::Loading {
                        model: spec.model_ref.clone(),
                        fraction: 1.0,
                        message: Some("loaded".into()),
                    })
                    .await?;
                }
                return Ok(());
            }
            Some(Ok(JobEvent::Error { message, .. })) => {
                // Let it exit by itself so its log is complete; the guard stops it otherwise.
                let _ = tokio::time::timeout(FAILED_EXIT_WAIT, wait_exit(&mut exit)).await;
                let what = format!(
                    "worker {worker_id} could not load {}: {message}",
                    spec.model_ref
                );
                return Err(JobFailure::new(
                    ErrorCode::ModelLoadFailed,
                    logs::with_tail(what, &launched.log).await,
                ));
            }
            Some(Ok(JobEvent::Loading {
                model,
                fraction: f,
                message,
            })) => {
                fraction = f;
                ctx.emit(JobEvent::Loading {
                    model,
                    fraction: f,
                    message,
                })
                .await?;
            }
            Some(Ok(event @ JobEvent::Narration { .. })) => {
                ctx.emit(event).await?;
            }
            Some(Ok(other)) => tracing::debug!(worker_id, ?other, "ignoring a progress event"),
            Some(Err(err)) => {
                return Err(lost_progress(worker_id, spec, launched, err.to_string()).await);
            }
            None => {
                let cause = "the stream ended".to_owned();
                return Err(lost_progress(worker_id, spec, launched, cause).await);
            }
        }
    }
}

/// The progress stream broke: most likely the worker died, which its exit will say.
async fn lost_progress(
    worker_id: &str,
    spec: &SpawnSpec,
    launched: &Launched,
    cause: String,
) -> JobFailure {
    let mut exit = launched.exit.clone();
    match tokio::time::timeout(FAILED_EXIT_WAIT, wait_exit(&mut exit)).await {
        Ok(exited) => exited_early(worker_id, spec, launched, exited).await,
        Err(_) => {
            let what = format!(
                "lost the loading progress of worker {worker_id} ({cause}) while it loaded {}",
                spec.model_ref
            );
            JobFailure::new(
                ErrorCode::ModelLoadFailed,
                logs::with_tail(what, &launched.log).await,
            )
        }
    }
}

async fn exited_early(
    worker_id: &str,
    spec: &SpawnSpec,
    launched: &Launched,
    exit: Exit,
) -> JobFailure {
    if exit.requested {
        return JobFailure::new(
            ErrorCode::Cancelled,
            format!(
                "worker {worker_id} was stopped before it finished loading {}",
                spec.model_ref
            ),
        );
    }
    let what = format!(
        "worker {worker_id} exited ({}) before it finished loading {}",
        exit.status, spec.model_ref
    );
    JobFailure::new(
        ErrorCode::ModelLoadFailed,
        logs::with_tail(what, &launched.log).await,
    )
}

fn launch_failure(err: LaunchError) -> JobFailure {
    let code = match err {
        LaunchError::ShuttingDown => ErrorCode::ShuttingDown,
        LaunchError::NoFreePort(_) => ErrorCode::NoCapacity,
        LaunchError::Log { .. } | LaunchError::Spawn { .. } => ErrorCode::Internal,
    };
    tracing::warn!(error = %err, "cannot start a worker");
    JobFailure::new(code, err.to_string())
}
