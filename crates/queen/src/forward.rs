//! Worker and model operations: the queen carries them out by submitting the same operation
//! to the hive it concerns and relaying that job's events unchanged.

use job_server::{ApiError, JobContext, JobFailure, JobResult, terminal_to_result};
use rbee_contract::model_ref::ParsedModelRef;
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

/// Checks the operation's model reference, then resolves the hive: the one the operation
/// names, else the hive of the worker it names, else the only hive. A malformed reference is a
/// `400` whatever hives there are, an unknown hive a `404`, an ambiguous choice a `400`.
pub(crate) fn admit(queen: &Queen, operation: Operation) -> Result<Forward, ApiError> {
    check_model(&operation)?;
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

/// A model reference the hive would refuse is refused here, so no job is opened for it: a
/// worker may start from a hub reference or a local path, the catalog holds hub models only.
/// Whether a local path exists is the hive's to say.
fn check_model(operation: &Operation) -> Result<(), ApiError> {
    let (model, catalog) = match operation {
        Operation::WorkerSpawn(request) => (&request.model, false),
        Operation::ModelDownload(target)
        | Operation::ModelGet(target)
        | Operation::ModelDelete(target) => (&target.model, true),
        Operation::Infer(_)
        | Operation::WorkerList(_)
        | Operation::WorkerGet(_)
        | Operation::WorkerDelete(_)
        | Operation::ModelList(_) => return Ok(()),
    };
    match ParsedModelRef::parse(model) {
        Err(err) => Err(ApiError::bad_request(err.to_string())),
        Ok(ParsedModelRef::Local(path)) if catalog => Err(ApiError::bad_request(format!(
            "`{}` is a local path: only hf:org/repo[:file.gguf] models are in a hive's catalog; \
             a local path is used as it is",
            path.display()
        ))),
        Ok(_) => Ok(()),
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

#[cfg(test)]
mod tests {
    use rbee_contract::{ErrorCode, ModelTarget, WorkerSpawnRequest};

    use super::*;
    use crate::config::QueenConfig;
    use crate::registry::tests::hive;

    fn queen(hives: &[&str]) -> Queen {
        let queen = Queen::new(QueenConfig::default());
        for id in hives {
            queen.registry.hive_heartbeat(hive(id, Vec::new()));
        }
        queen
    }

    fn download(model: &str) -> Operation {
        Operation::ModelDownload(ModelTarget {
            hive_id: None,
            model: model.into(),
        })
    }

    fn spawn(model: &str) -> Operation {
        Operation::WorkerSpawn(WorkerSpawnRequest {
            hive_id: None,
            model: model.into(),
            device: None,
        })
    }

    fn refusal(queen: &Queen, operation: Operation) -> (ErrorCode, String) {
        let err = admit(queen, operation).unwrap_err();
        (err.code, err.message)
    }

    #[test]
    fn a_malformed_model_reference_is_refused_before_any_hive_is_chosen() {
        for queen in [queen(&[]), queen(&["h1"])] {
            for (operation, named) in [
                (download("hf:../b"), "`hf:../b`"),
                (
                    spawn("hf:a/b:../../etc/passwd"),
                    "`hf:a/b:../../etc/passwd`",
                ),
                (spawn("s3:bucket/m"), "hf:org/repo"),
                (
                    Operation::ModelGet(ModelTarget {
                        hive_id: Some("elsewhere".into()),
                        model: "hf:org/repo:m.safetensors".into(),
                    }),
                    ".gguf",
                ),
                (
                    Operation::ModelDelete(ModelTarget {
                        hive_id: None,
                        model: " ".into(),
                    }),
                    "empty",
                ),
                (download("/models/m.gguf"), "local path"),
            ] {
                let (code, message) = refusal(&queen, operation);
                assert_eq!(code, ErrorCode::BadRequest, "{message}");
                assert!(message.contains(named), "{message}");
            }
        }
    }

    #[test]
    fn well_formed_references_go_to_the_hive() {
        let one = queen(&["h1"]);
        for operation in [
            download("hf:org/repo"),
            download("hf:org/repo:dir/m.Q4_0.gguf"),
            spawn("hf:org/repo"),
            spawn("/models/m.gguf"),
        ] {
            let forward = admit(&one, operation).unwrap();
            assert_eq!(forward.hive.hive_id, "h1");
        }
        // A well-formed reference with no hive to take it is the hive lookup's answer.
        let (code, _) = refusal(&queen(&[]), download("hf:org/repo"));
        assert_eq!(code, ErrorCode::NoCapacity);
    }
}
