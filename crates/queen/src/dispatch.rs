//! Choosing the worker an `infer` job goes to, and holding its slot: a worker with a free
//! slot, the one whose prompt cache holds the longest prefix of the request or else the least
//! loaded ([`scheduler::place`]); while every slot is taken, a place in the model's line
//! ([`Queues`](crate::queue::Queues)) with `queued` events as it moves up, until a slot frees
//! up or the wait is too long; a loading worker once it is ready; or a worker a hive starts
//! (a cold start). Sending the job and relaying its events is `infer`'s business.

use std::collections::HashSet;
use std::time::Duration;

use job_server::{JobContext, JobFailure};
use rbee_contract::{ErrorCode, JobEvent, WorkerInfo};
use tokio::time::Instant;

use crate::metrics::Refusal;
use crate::queue::Ticket;
use crate::registry::InFlight;
use crate::scheduler::{self, Placement, RequestPrefix};
use crate::spawn;
use crate::state::Queen;

/// Cold starts one job may cause at most: the first and one replacement.
const MAX_COLD_STARTS: u32 = 2;

/// The cold starts of one job.
pub(crate) struct ColdStarts {
    /// Made so far.
    pub made: u32,
    /// The job may have any hive open a path it names, not only the hives holding it
    /// ([`spawn::cold_start`]).
    pub any_path: bool,
}

impl ColdStarts {
    pub fn new(any_path: bool) -> Self {
        ColdStarts { made: 0, any_path }
    }

    #[cfg(test)]
    pub fn any_path() -> Self {
        ColdStarts::new(true)
    }
}

/// The next step of a job looking for a worker.
enum Step {
    /// A worker with a free slot, the slot already counted as the job's.
    Go(WorkerInfo, InFlight),
    /// Every slot is taken, or another job is ahead in line: wait in line.
    Queue,
    /// The only workers serving the model are loading: wait for one.
    Load(String),
    /// No worker serves the model: a hive must start one.
    Spawn,
}

/// The worker to try next, with its slot: the best one with a free slot; else a place in
/// the model's line until one frees up; else a loading one once it is ready; else a new one
/// from a hive.
pub(crate) async fn choose(
    queen: &Queen,
    model: &str,
    request: &RequestPrefix,
    excluded: &HashSet<String>,
    busy: &[String],
    cold_starts: &mut ColdStarts,
    ctx: &JobContext,
) -> Result<(WorkerInfo, InFlight), JobFailure> {
    let load_limit = queen.config.spawn_timeout;
    let load_deadline = Instant::now() + load_limit;
    let max_wait = queen.queues.max_wait;
    let mut changes = queen.registry.changes();
    let mut line_changes = queen.queues.changes();
    let mut ticket: Option<Ticket<'_>> = None;
    let mut waited = Duration::ZERO;
    let mut reported_position = None;
    let mut waiting_for: Option<String> = None;
    // The worker a cold start handed this job.
    let mut spawned: Option<WorkerInfo> = None;
    loop {
        changes.borrow_and_update();
        line_changes.borrow_and_update();
        let step = queen
            .queues
            .on_turn(model, ticket.as_ref(), || {
                // The views are dropped before `enter`, so that it extends the worker's key set
                // in place rather than copying a set the views still share.
                let placement = {
                    let views = queen.registry.worker_views();
                    scheduler::place(model, request, &views, excluded)
                };
                match placement {
                    Placement::Worker(info) => {
                        let slot = queen.registry.enter(&info.worker_id, &request.keys);
                        Step::Go(info, slot)
                    }
                    Placement::Full => Step::Queue,
                    Placement::Wait { worker_id } => Step::Load(worker_id),
                    Placement::Spawn => Step::Spawn,
                }
            })
            .unwrap_or(Step::Queue);
        match step {
            Step::Go(info, slot) => return Ok((info, slot)),
            Step::Queue => {
                let ticket = match &mut ticket {
                    Some(ticket) => ticket,
                    None => match queen.queues.join(model) {
                        Ok(joined) => ticket.insert(joined),
                        Err(full) => {
                            queen.metrics.refused(Refusal::QueueFull);
                            return Err(JobFailure::new(
                                ErrorCode::Busy,
                                format!(
                                    "every worker serving {model} is busy and {} jobs already wait for one; retry later",
                                    full.waiting
                                ),
                            ));
                        }
                    },
                };
                let position = ticket.position();
                if reported_position != Some(position) {
                    ctx.emit(JobEvent::Queued { position }).await?;
                    reported_position = Some(position);
                }
                let since = Instant::now();
                let left = max_wait.saturating_sub(waited);
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = line_changes.changed() => {}
                    () = tokio::time::sleep(left) => {
                        queen.metrics.refused(Refusal::QueueTimeout);
                        return Err(JobFailure::new(
                            ErrorCode::Busy,
                            format!(
                                "every worker serving {model} stayed busy for the {max_wait:?} this job may wait; retry later"
                            ),
                        ));
                    }
                }
                waited += since.elapsed();
            }
            Step::Spawn => {
                if let Some(worker) = spawned.take_if(|w| !excluded.contains(&w.worker_id)) {
                    let slot = queen.registry.enter(&worker.worker_id, &request.keys);
                    return Ok((worker, slot));
                }
                if !busy.is_empty() {
                    return Err(JobFailure::new(
                        ErrorCode::Busy,
                        format!(
                            "every worker serving {model} is busy ({}); retry later",
                            busy.join(", ")
                        ),
                    ));
                }
                if cold_starts.made >= MAX_COLD_STARTS {
                    return Err(JobFailure::new(
                        ErrorCode::Unavailable,
                        format!("no worker started for {model} could take the job"),
                    ));
                }
                cold_starts.made += 1;
                // The new worker is in the registry now and is taken like any other, in turn;
                // it is kept in case the registry lists it under another model name.
                spawned = Some(spawn::cold_start(queen, model, cold_starts.any_path, ctx).await?);
            }
            Step::Load(worker_id) => {
                if waiting_for.as_deref() != Some(worker_id.as_str()) {
                    ctx.emit(JobEvent::narration(format!(
                        "worker {worker_id} is loading {model}; waiting for it"
                    )))
                    .await?;
                    waiting_for = Some(worker_id);
                }
                match tokio::time::timeout_at(load_deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(JobFailure::internal("the registry went away")),
                    Err(_) => {
                        return Err(JobFailure::new(
                            ErrorCode::Timeout,
                            format!("no worker for {model} became ready within {load_limit:?}"),
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use job_server::{
        ApiError, JobExecutor, JobOptions, JobOutcome, JobResult, JobServer, JobServerConfig,
        JobSubscription,
    };
    use rbee_contract::{InferRequest, Operation, WorkerState};

    use super::*;
    use crate::config::QueenConfig;
    use crate::registry::tests::worker;

    /// Runs only the choosing of a worker, then holds the slot until the job is cancelled,
    /// as a generation would until it ends.
    struct Chooser(Arc<Queen>);

    impl JobExecutor for Chooser {
        type Job = String;

        fn admit(&self, operation: Operation) -> Result<String, ApiError> {
            match operation {
                Operation::Infer(request) => Ok(request.model),
                _ => Err(ApiError::bad_request("infer only")),
            }
        }

        async fn run(&self, model: String, ctx: JobContext) -> JobResult {
            let (worker, _slot) = choose(
                &self.0,
                &model,
                &RequestPrefix::default(),
                &HashSet::new(),
                &[],
                &mut ColdStarts::any_path(),
                &ctx,
            )
            .await?;
            ctx.emit(JobEvent::narration(format!("on {}", worker.worker_id)))
                .await?;
            ctx.cancel.cancelled().await;
            Ok(JobOutcome::complete())
        }
    }

    /// A queen knowing one ready worker `w1` with one slot for model `m`.
    fn queen_with_one_slot(queue_len: usize, queue_timeout: Duration) -> JobServer<Chooser> {
        let queen = Arc::new(Queen::new(QueenConfig {
            queue_len,
            queue_timeout,
            // Nothing goes stale while the test's paused clock jumps ahead.
            heartbeat_interval: Duration::from_secs(3600),
            ..QueenConfig::default()
        }));
        queen
            .registry
            .worker_heartbeat(worker("w1", "m", WorkerState::Ready, 1));
        JobServer::new(Chooser(queen), JobServerConfig::default())
    }

    fn start(jobs: &JobServer<Chooser>) -> (String, JobSubscription) {
        let created = jobs
            .create(Operation::Infer(request()), JobOptions::default())
            .unwrap();
        let events = jobs.subscribe(&created.job_id, None).unwrap();
        (created.job_id, events)
    }

    async fn next(events: &mut JobSubscription) -> JobEvent {
        (*events.next().await.expect("an event").event).clone()
    }

    fn on_w1() -> JobEvent {
        JobEvent::narration("on w1")
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_wait_in_line_and_move_up_when_one_ahead_leaves() {
        let jobs = queen_with_one_slot(8, Duration::from_secs(60));
        let (a, mut a_events) = start(&jobs);
        assert_eq!(next(&mut a_events).await, on_w1());
        let (b, mut b_events) = start(&jobs);
        assert_eq!(next(&mut b_events).await, JobEvent::Queued { position: 1 });
        let (_c, mut c_events) = start(&jobs);
        assert_eq!(next(&mut c_events).await, JobEvent::Queued { position: 2 });

        // A waiter that is cancelled leaves the line; the one behind it moves up.
        jobs.cancel(&b).unwrap();
        assert!(matches!(
            next(&mut b_events).await,
            JobEvent::Error {
                code: ErrorCode::Cancelled,
                ..
            }
        ));
        assert_eq!(next(&mut c_events).await, JobEvent::Queued { position: 1 });

        // The slot comes free: the first in line gets it.
        jobs.cancel(&a).unwrap();
        assert_eq!(next(&mut c_events).await, on_w1());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_line_refuses_at_once_and_a_long_wait_ends_busy() {
        let jobs = queen_with_one_slot(1, Duration::from_secs(5));
        let (_a, mut a_events) = start(&jobs);
        assert_eq!(next(&mut a_events).await, on_w1());
        let waiting_since = Instant::now();
        let (_b, mut b_events) = start(&jobs);
        assert_eq!(next(&mut b_events).await, JobEvent::Queued { position: 1 });

        let (_c, mut c_events) = start(&jobs);
        match next(&mut c_events).await {
            JobEvent::Error { code, message } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(message.contains("1 jobs already wait"), "{message}");
            }
            other => panic!("expected a busy error, got {other:?}"),
        }
        assert_eq!(waiting_since.elapsed(), Duration::ZERO, "refused at once");

        match next(&mut b_events).await {
            JobEvent::Error { code, message } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(message.contains("5s"), "{message}");
            }
            other => panic!("expected a busy error, got {other:?}"),
        }
        assert!(waiting_since.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_never_takes_the_slot_of_a_waiter() {
        let jobs = queen_with_one_slot(8, Duration::from_secs(60));
        let (a, mut a_events) = start(&jobs);
        assert_eq!(next(&mut a_events).await, on_w1());
        let (_b, mut b_events) = start(&jobs);
        assert_eq!(next(&mut b_events).await, JobEvent::Queued { position: 1 });

        // The slot frees up and a new job arrives in the same instant.
        jobs.cancel(&a).unwrap();
        let (_d, mut d_events) = start(&jobs);
        assert_eq!(next(&mut b_events).await, on_w1());
        assert!(
            matches!(next(&mut d_events).await, JobEvent::Queued { .. }),
            "the newcomer waits behind the waiter"
        );
    }

    fn request() -> InferRequest {
        InferRequest {
            model: "m".into(),
            prompt: Some("hi".into()),
            ..InferRequest::default()
        }
    }
}
