//! `worker_spawn`: start a worker, follow it until its model is loaded, hand back its info.
//!
//! Events: `spawning {worker_id, hive_id}`; `loading` at 0 once the worker's port answers, the
//! worker's own `loading` events relayed as they come, `loading` at 1 when it is loaded; then
//! `data {"worker": WorkerInfo}` and the terminal `done` (`complete`). A worker that
//! fails to load, exits early or takes too long ends the job with an `error` of one line
//! that names no file or address of the hive, and is not left running; the details (the
//! worker's own message, the last lines of its log, where the log is) go to the hive's log
//! under the job's id.

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
            tracing::warn!(job_id = %ctx.job_id, worker_id, ?limit, "the worker did not load in time; stopping it");
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
            tracing::warn!(job_id = %ctx.job_id, worker_id, url = %launched.local_url, error = %err,
                "the worker loaded its model but did not describe itself");
            JobFailure::new(
                ErrorCode::Unavailable,
                format!("worker {worker_id} loaded its model but did not describe itself"),
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
            .map_err(|err| launch_failure(&ctx.job_id, worker_id, err))?;
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
                return Err(exited_early(&ctx.job_id, worker_id, spec, &launched, exit).await);
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
            exited = wait_exit(&mut exit) => return Err(exited_early(&ctx.job_id, worker_id, spec, launched, exited).await),
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
                logs::report(&ctx.job_id, worker_id, &what, &launched.log).await;
                return Err(JobFailure::new(
                    ErrorCode::ModelLoadFailed,
                    format!(
                        "worker {worker_id} could not load {}: {}",
                        spec.model_ref,
                        logs::for_client(&message, &spec.model_path, &spec.model_ref)
                    ),
                ));
            }
            Some(Ok(JobEvent::Loading {
                model,
                fraction: f,
                message,
            })) => {
                fraction = f;
                let message =
                    message.map(|m| logs::for_client(&m, &spec.model_path, &spec.model_ref));
                ctx.emit(JobEvent::Loading {
                    model,
                    fraction: f,
                    message,
                })
                .await?;
            }
            Some(Ok(JobEvent::Narration { message })) => {
                let message = logs::for_client(&message, &spec.model_path, &spec.model_ref);
                ctx.emit(JobEvent::narration(message)).await?;
            }
            Some(Ok(other)) => tracing::debug!(worker_id, ?other, "ignoring a progress event"),
            Some(Err(err)) => {
                return Err(
                    lost_progress(&ctx.job_id, worker_id, spec, launched, err.to_string()).await,
                );
            }
            None => {
                let cause = "the stream ended".to_owned();
                return Err(lost_progress(&ctx.job_id, worker_id, spec, launched, cause).await);
            }
        }
    }
}

/// The progress stream broke: most likely the worker died, which its exit will say.
async fn lost_progress(
    job_id: &str,
    worker_id: &str,
    spec: &SpawnSpec,
    launched: &Launched,
    cause: String,
) -> JobFailure {
    let mut exit = launched.exit.clone();
    match tokio::time::timeout(FAILED_EXIT_WAIT, wait_exit(&mut exit)).await {
        Ok(exited) => exited_early(job_id, worker_id, spec, launched, exited).await,
        Err(_) => {
            let what = format!(
                "lost the loading progress of worker {worker_id} ({cause}) while it loaded {}",
                spec.model_ref
            );
            logs::report(job_id, worker_id, &what, &launched.log).await;
            JobFailure::new(
                ErrorCode::ModelLoadFailed,
                format!(
                    "lost the loading progress of worker {worker_id} while it loaded {}",
                    spec.model_ref
                ),
            )
        }
    }
}

async fn exited_early(
    job_id: &str,
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
    logs::report(job_id, worker_id, &what, &launched.log).await;
    JobFailure::new(ErrorCode::ModelLoadFailed, what)
}

/// The client learns what kind of failure it was; the binary's or log's path and the system's
/// error go to the hive's log.
fn launch_failure(job_id: &str, worker_id: &str, err: LaunchError) -> JobFailure {
    tracing::warn!(job_id, worker_id, error = %err, "cannot start a worker");
    let (code, message) = match err {
        LaunchError::ShuttingDown => (ErrorCode::ShuttingDown, err.to_string()),
        LaunchError::NoFreePort(_) => (ErrorCode::NoCapacity, err.to_string()),
        LaunchError::Log { .. } => (
            ErrorCode::Internal,
            "the hive cannot create the worker's log file (see the hive's log)".to_owned(),
        ),
        LaunchError::Spawn { .. } => (
            ErrorCode::Internal,
            "the hive cannot start its worker binary (see the hive's log)".to_owned(),
        ),
    };
    JobFailure::new(code, message)
}
