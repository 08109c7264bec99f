//! Cold starts: asking a hive for a worker when none serves a model.
//!
//! One cold start per model runs at a time. Jobs that need the same model while it runs
//! wait for its outcome instead of asking for workers of their own; if the job leading the
//! cold start goes away, the next waiting job takes over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use job_server::{JobContext, JobFailure, terminal_to_result};
use rbee_contract::{ErrorCode, JOBS_PATH, JobEvent, Operation, WorkerInfo, WorkerSpawnRequest};
use tokio::sync::watch;
use tokio::time::Instant;

use rbee_contract::model_ref::ParsedModelRef;

use crate::admin;
use crate::registry::HiveView;
use crate::relay::{self, RelayEnd, relay};
use crate::scheduler;
use crate::state::{Queen, upstream_failure};

type Outcome = Option<Result<WorkerInfo, JobFailure>>;

/// The cold starts in progress, by model.
#[derive(Default)]
pub(crate) struct SpawnFlights {
    flights: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

enum Role<'a> {
    Lead(Flight<'a>),
    Follow(watch::Receiver<Outcome>),
}

impl SpawnFlights {
    fn flights(&self) -> MutexGuard<'_, HashMap<String, watch::Receiver<Outcome>>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn join(&self, model: &str) -> Role<'_> {
        let mut flights = self.flights();
        if let Some(rx) = flights.get(model)
            && rx.has_changed().is_ok()
        {
            return Role::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(model.to_owned(), rx.clone());
        Role::Lead(Flight {
            flights: self,
            model: model.to_owned(),
            tx,
            rx,
        })
    }
}

/// The cold start this job leads; dropping it (finished or abandoned) lets others start anew.
struct Flight<'a> {
    flights: &'a SpawnFlights,
    model: String,
    tx: watch::Sender<Outcome>,
    rx: watch::Receiver<Outcome>,
}

impl Flight<'_> {
    fn finish(self, result: &Result<WorkerInfo, JobFailure>) {
        // A leader that was cancelled says nothing about the model: followers try themselves.
        if !matches!(result, Err(failure) if failure.code == ErrorCode::Cancelled) {
            self.tx.send_replace(Some(result.clone()));
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.flights();
        if flights
            .get(&self.model)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            flights.remove(&self.model);
        }
    }
}

/// Gets a ready worker for `model` started by a hive, relaying the hive's progress events
/// (`downloading`, `spawning`, `loading`, ...) on the job. Takes at most the configured spawn
/// timeout, not counting a download that is making progress: a large model may take longer
/// to fetch than any spawn timeout, and a download that moves is not stuck. `any_path`: the
/// job may have any hive open a path (see [`local_targets`]).
pub(crate) async fn cold_start(
    queen: &Queen,
    model: &str,
    any_path: bool,
    ctx: &JobContext,
) -> Result<WorkerInfo, JobFailure> {
    let limit = queen.config.spawn_timeout;
    loop {
        match queen.spawns.join(model) {
            Role::Follow(mut rx) => {
                ctx.emit(JobEvent::narration(format!(
                    "a worker for {model} is already being started; waiting for it"
                )))
                .await?;
                // The leading job's attempt is bounded; its outcome (a timeout too) is ours.
                // Without an outcome the leading job went away: take over.
                if let Ok(outcome) = rx.wait_for(Option::is_some).await
                    && let Some(result) = &*outcome
                {
                    return result.clone();
                }
            }
            Role::Lead(flight) => {
                let deadline = Deadline::after(limit);
                let attempt = spawn_on_hive(queen, model, any_path, ctx, &deadline);
                tokio::pin!(attempt);
                let result = loop {
                    tokio::select! {
                        result = &mut attempt => break result,
                        () = tokio::time::sleep_until(deadline.at()) => {
                            if deadline.at() <= Instant::now() {
                                break Err(JobFailure::new(
                                    ErrorCode::Timeout,
                                    format!("no worker for {model} became ready within {limit:?}"),
                                ));
                            }
                        }
                    }
                };
                flight.finish(&result);
                return result;
            }
        }
    }
}

/// When a cold start gives up: `limit` after it began or after the download's latest progress.
struct Deadline {
    limit: Duration,
    base: Instant,
    /// Milliseconds after `base`.
    at_ms: AtomicU64,
}

impl Deadline {
    fn after(limit: Duration) -> Self {
        Deadline {
            limit,
            base: Instant::now(),
            at_ms: AtomicU64::new(millis(limit)),
        }
    }

    fn at(&self) -> Instant {
        self.base + Duration::from_millis(self.at_ms.load(Ordering::Relaxed))
    }

    /// Progress was made now: the limit counts again from here.
    fn extend(&self) {
        let at = millis(self.base.elapsed() + self.limit);
        self.at_ms.fetch_max(at, Ordering::Relaxed);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Asks the placements in turn: a hive that answers `no_capacity` (by its own estimate the
/// model does not fit on that device, or it has no free port) is passed over for the next.
async fn spawn_on_hive(
    queen: &Queen,
    model: &str,
    any_path: bool,
    ctx: &JobContext,
    deadline: &Deadline,
) -> Result<WorkerInfo, JobFailure> {
    let hives = queen.registry.hive_views();
    let mut targets = scheduler::spawn_targets(&hives, model)?;
    if let Ok(ParsedModelRef::Local(_)) = ParsedModelRef::parse(model) {
        targets = local_targets(&hives, model, any_path, targets)?;
    }
    let mut refusals = Vec::new();
    for target in targets {
        let place = match &target.device {
            Some(device) => format!("hive {} ({device})", target.hive.hive_id),
            None => format!("hive {}", target.hive.hive_id),
        };
        match spawn_on(queen, model, ctx, target, deadline).await {
            Err(failure) if failure.code == ErrorCode::NoCapacity => {
                tracing::info!(model, %place, reason = %failure.message, "no room; trying the next placement");
                ctx.emit(JobEvent::narration(format!(
                    "{place} has no room: {}",
                    failure.message
                )))
                .await?;
                refusals.push(format!("{place}: {}", failure.message));
            }
            result => return result,
        }
    }
    Err(JobFailure::new(
        ErrorCode::NoCapacity,
        format!("no hive has room for {model}; {}", refusals.join("; ")),
    ))
}

async fn spawn_on(
    queen: &Queen,
    model: &str,
    ctx: &JobContext,
    target: scheduler::SpawnTarget,
    deadline: &Deadline,
) -> Result<WorkerInfo, JobFailure> {
    let hive = target.hive;
    let peer = format!("hive {}", hive.hive_id);
    let on = target
        .device
        .as_deref()
        .map(|device| format!(" on {device}"))
        .unwrap_or_default();
    ctx.emit(JobEvent::narration(format!(
        "no worker serves {model}; asking hive {} to start one{on}",
        hive.hive_id
    )))
    .await?;
    let operation = Operation::WorkerSpawn(WorkerSpawnRequest {
        hive_id: Some(hive.hive_id.clone()),
        model: model.to_owned(),
        device: target.device,
    });
    let handle = relay::submit(queen.client(&hive.url), JOBS_PATH, operation)
        .await
        .map_err(|err| {
            tracing::warn!(job_id = %ctx.job_id, hive_id = %hive.hive_id, error = %err, "the hive did not take the worker_spawn");
            upstream_failure(&peer, &err)
        })?;
    let upstream_job_id = handle.job_id().to_owned();
    let mut worker = None;
    // The spawn's result (`data {"worker": ...}`) is for the queen, not the infer client.
    let relayed = relay(handle, ctx, |event| {
        if matches!(event, JobEvent::Downloading { .. }) {
            deadline.extend();
        }
        match worker_of(event) {
            Some(info) => {
                worker = Some(info);
                false
            }
            None => true,
        }
    })
    .await?;
    let outcome = match relayed.end {
        RelayEnd::Terminal(event) => terminal_to_result(event)
            .unwrap_or_else(|_| Err(JobFailure::internal("a relayed event was not terminal"))),
        RelayEnd::Broken(err) => {
            tracing::warn!(job_id = %ctx.job_id, hive_id = %hive.hive_id, upstream_job_id = %upstream_job_id,
                error = %err, "lost the hive's worker_spawn stream");
            return Err(upstream_failure(&peer, &err));
        }
    };
    if let Err(failure) = &outcome {
        // The hive's log has the details (the worker's log lines) under its job id.
        tracing::warn!(job_id = %ctx.job_id, hive_id = %hive.hive_id, upstream_job_id = %upstream_job_id,
            code = %failure.code, message = %failure.message, "the hive could not start a worker");
    }
    outcome?;
    let worker = worker.ok_or_else(|| {
        tracing::warn!(hive_id = %hive.hive_id, "worker_spawn finished without a `worker` data event");
        JobFailure::internal(format!("{peer} started a worker but did not say which"))
    })?;
    tracing::info!(worker_id = %worker.worker_id, hive_id = %hive.hive_id, model, "cold start done");
    // Known at once, without waiting for the worker's first heartbeat.
    queen.registry.worker_heartbeat(worker.clone());
    ctx.emit(JobEvent::narration(format!(
        "worker {} on hive {} is ready",
        worker.worker_id, hive.hive_id
    )))
    .await?;
    Ok(worker)
}

/// The placements a cold start of the path `model` may use. A path names a file on one
/// machine: when some hives hold it (it is under their allowed model directories, or their
/// workers were started from it), only those are asked. Any other hive would open whatever is
/// at that path on its own disk, which is not the model a key without admin rights was let
/// through for. When no hive holds it (any more: the worker that served it at admission may
/// have gone since), every hive is asked only for a job that may open any path (`any_path`:
/// an admin key, or a cluster without keys); any other job fails closed.
fn local_targets(
    hives: &[HiveView],
    model: &str,
    any_path: bool,
    mut targets: Vec<scheduler::SpawnTarget>,
) -> Result<Vec<scheduler::SpawnTarget>, JobFailure> {
    let holders: Vec<&str> = hives
        .iter()
        .filter(|h| {
            admin::in_model_dirs(&h.info.model_dirs, model)
                || h.info.workers.iter().any(|w| w.model == model)
        })
        .map(|h| h.info.hive_id.as_str())
        .collect();
    if holders.is_empty() && !any_path {
        tracing::info!(
            model,
            "no hive holds the path any more; not asking the others to open it"
        );
        return Err(JobFailure::new(
            ErrorCode::NoCapacity,
            format!("no hive holds {model} any more"),
        ));
    }
    if !holders.is_empty() {
        targets.retain(|t| holders.contains(&t.hive.hive_id.as_str()));
    }
    if targets.is_empty() {
        return Err(JobFailure::new(
            ErrorCode::NoCapacity,
            format!("no hive that holds {model} has room for it"),
        ));
    }
    Ok(targets)
}

/// The worker in a `data {"worker": WorkerInfo}` event, as a hive's `worker_spawn` ends with.
pub(crate) fn worker_of(event: &JobEvent) -> Option<WorkerInfo> {
    match event {
        JobEvent::Data { data } => serde_json::from_value(data.get("worker")?.clone()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn download_progress_pushes_the_deadline_back() {
        let deadline = Deadline::after(Duration::from_secs(10));
        let first = deadline.at();
        tokio::time::advance(Duration::from_secs(8)).await;
        deadline.extend();
        assert_eq!(deadline.at(), first + Duration::from_secs(8));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            deadline.at() > Instant::now(),
            "within the limit of the last progress"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            deadline.at() < Instant::now(),
            "no progress for longer than the limit"
        );
    }

    #[test]
    fn one_leader_per_model_until_it_is_dropped() {
        let flights = SpawnFlights::default();
        let lead = match flights.join("m") {
            Role::Lead(flight) => flight,
            Role::Follow(_) => panic!("the first job leads"),
        };
        assert!(matches!(flights.join("m"), Role::Follow(_)));
        assert!(matches!(flights.join("other"), Role::Lead(_)));
        drop(lead);
        assert!(matches!(flights.join("m"), Role::Lead(_)));
    }

    #[tokio::test]
    async fn followers_get_the_outcome_but_not_a_cancellation() {
        let flights = SpawnFlights::default();
        let Role::Lead(lead) = flights.join("m") else {
            panic!("lead")
        };
        let Role::Follow(mut rx) = flights.join("m") else {
            panic!("follow")
        };
        lead.finish(&Err(JobFailure::new(ErrorCode::Cancelled, "gone")));
        assert!(rx.wait_for(Option::is_some).await.is_err(), "no outcome");

        let Role::Lead(lead) = flights.join("m") else {
            panic!("lead again")
        };
        let Role::Follow(mut rx) = flights.join("m") else {
            panic!("follow")
        };
        lead.finish(&Err(JobFailure::new(
            ErrorCode::ModelLoadFailed,
            "bad file",
        )));
        let outcome = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(
            outcome.unwrap().unwrap_err().code,
            ErrorCode::ModelLoadFailed
        );
    }

    #[test]
    fn a_path_no_hive_holds_goes_to_every_hive_only_for_a_job_that_may_open_any() {
        use crate::registry::tests::{hive, worker};
        use crate::wire::Health;
        let view = |info: rbee_contract::HiveInfo| HiveView {
            info,
            health: Health::Healthy,
            silent_for: Duration::ZERO,
        };
        let path = "/models/m.gguf";
        let mut holder = hive("h1", Vec::new());
        holder.model_dirs = vec!["/models".into()];
        let mut serving = hive(
            "h2",
            vec![worker("w", path, rbee_contract::WorkerState::Ready, 1)],
        );
        serving.workers[0].hive_id = Some("h2".into());
        let other = hive("h3", Vec::new());
        let ids = |targets: Vec<scheduler::SpawnTarget>| -> Vec<String> {
            targets.into_iter().map(|t| t.hive.hive_id).collect()
        };

        let hives = vec![view(holder), view(serving), view(other.clone())];
        let targets = scheduler::spawn_targets(&hives, path).unwrap();
        for any_path in [false, true] {
            let mut chosen = ids(local_targets(&hives, path, any_path, targets.clone()).unwrap());
            chosen.sort();
            assert_eq!(
                chosen,
                ["h1", "h2"],
                "only the holders, any_path={any_path}"
            );
        }

        // The worker that served the path went away between the job's admission and its cold
        // start: no hive holds it.
        let hives = vec![view(other)];
        let targets = scheduler::spawn_targets(&hives, path).unwrap();
        let refused = local_targets(&hives, path, false, targets.clone()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::NoCapacity);
        assert_eq!(
            ids(local_targets(&hives, path, true, targets).unwrap()),
            ["h3"]
        );
    }

    #[test]
    fn the_worker_comes_from_the_spawn_data_event() {
        let info = crate::registry::tests::worker("w", "m", rbee_contract::WorkerState::Ready, 1);
        let event = JobEvent::Data {
            data: serde_json::json!({ "worker": info }),
        };
        assert_eq!(worker_of(&event), Some(info));
        let list = JobEvent::Data {
            data: serde_json::json!({ "workers": [] }),
        };
        assert_eq!(worker_of(&list), None);
    }
}
