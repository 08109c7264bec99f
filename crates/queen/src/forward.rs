//! Worker and model operations: the queen carries them out by submitting the same operation
//! to the hive it concerns and relaying that job's events unchanged.

use job_server::{ApiError, JobContext, JobFailure, JobResult, terminal_to_result};
use rbee_contract::{HiveInfo, JOBS_PATH, Operation};

use crate::relay::{self, RelayEnd, relay};
use crate::scheduler;
use crate::spawn::worker_of;
use crate::state::{Queen, upstream_failure};

/// An operation with the hive it goes to, resolved before the job exists.
#[derive(Debug)]
pub(crate) struct Forward {
    hive: HiveInfo,
    operation: Operation,
}

/// Resolves the hive: the one the operation names, else the hive of the worker it names,
/// else the only hive. An unknown hive is a `404`, an ambiguous choice a `400`.
pub(crate) fn admit(queen: &Queen, operation: Operation) -> Result<Forward, ApiError> {
    let named = named_hive(&operation)
        .map(str::to_owned)
        .or_else(|| worker_hive(queen, &operation));
    let hive = scheduler::target_hive(&queen.registry.hive_views(), named.as_deref())?;
    Ok(Forward { hive, operation })
}

pub(crate) async fn run(queen: &Queen, forward: Forward, ctx: &JobContext) -> JobResult {
    let Forward { hive, operation } = forward;
    let peer = format!("hive {}", hive.hive_id);
    let spawning = matches!(operation, Operation::WorkerSpawn(_));
    let handle = relay::submit(queen.client(&hive.url), JOBS_PATH, operation)
        .await
        .map_err(|err| upstream_failure(&peer, &err))?;
    let relayed = relay(handle, ctx, |event| {
        // A spawned worker can take inference at once, before its first heartbeat arrives.
        if spawning && let Some(worker) = worker_of(event) {
            queen.registry.worker_heartbeat(worker);
        }
        true
    })
    .await?;
    match relayed.end {
        RelayEnd::Terminal(event) => terminal_to_result(event)
            .unwrap_or_else(|_| Err(JobFailure::internal("a relayed event was not terminal"))),
        RelayEnd::Broken(err) => Err(upstream_failure(&peer, &err)),
    }
}

fn named_hive(operation: &Operation) -> Option<&str> {
    match operation {
        Operation::Infer(_) => None,
        Operation::WorkerSpawn(request) => request.hive_id.as_deref(),
        Operation::WorkerList(target) | Operation::ModelList(target) => target.hive_id.as_deref(),
        Operation::WorkerGet(target) | Operation::WorkerDelete(target) => target.hive_id.as_deref(),
        Operation::ModelDownload(target)
        | Operation::ModelGet(target)
        | Operation::ModelDelete(target) => target.hive_id.as_deref(),
    }
}

/// The hive a worker operation's worker belongs to, when the queen knows it.
fn worker_hive(queen: &Queen, operation: &Operation) -> Option<String> {
    let (Operation::WorkerGet(target) | Operation::WorkerDelete(target)) = operation else {
        return None;
    };
    queen
        .registry
        .worker_views()
        .into_iter()
        .find(|view| view.info.worker_id == target.worker_id)
        .and_then(|view| view.info.hive_id)
}
