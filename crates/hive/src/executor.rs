//! The hive's half of the job protocol: admit worker operations (and refuse the rest), run
//! them against the hive's children.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use job_server::{ApiError, JobContext, JobExecutor, JobFailure, JobOutcome, JobResult};
use rbee_contract::{ErrorCode, JobEvent, Operation, WorkerSpawnRequest};
use serde_json::json;

use crate::Hive;
use crate::children::{SpawnSpec, wait_exit};
use crate::spawn;

/// An admitted operation: the target hive is this one, a model path exists, a device is well
/// formed, a named worker is one of this hive's children.
#[derive(Debug)]
pub(crate) enum HiveJob {
    Spawn(SpawnSpec),
    List,
    Get(String),
    Delete(String),
}

pub(crate) struct HiveExecutor {
    hive: Arc<Hive>,
}

impl HiveExecutor {
    pub fn new(hive: Arc<Hive>) -> Self {
        HiveExecutor { hive }
    }

    /// A request that names another hive reached this one by mistake.
    fn check_target(&self, hive_id: Option<&str>) -> Result<(), ApiError> {
        match hive_id {
            Some(id) if id != self.hive.config.hive_id => Err(ApiError::not_found(format!(
                "this is hive `{}`, not `{id}`",
                self.hive.config.hive_id
            ))),
            _ => Ok(()),
        }
    }

    fn known_worker(&self, worker_id: String) -> Result<String, ApiError> {
        if self.hive.children.contains(&worker_id) {
            Ok(worker_id)
        } else {
            Err(self.no_such_worker(&worker_id).into())
        }
    }

    fn no_such_worker(&self, worker_id: &str) -> NoSuchWorker {
        NoSuchWorker(format!(
            "hive `{}` has no worker `{worker_id}`",
            self.hive.config.hive_id
        ))
    }
}

struct NoSuchWorker(String);

impl From<NoSuchWorker> for ApiError {
    fn from(err: NoSuchWorker) -> Self {
        ApiError::not_found(err.0)
    }
}

impl From<NoSuchWorker> for JobFailure {
    fn from(err: NoSuchWorker) -> Self {
        JobFailure::new(ErrorCode::NotFound, err.0)
    }
}

impl JobExecutor for HiveExecutor {
    type Job = HiveJob;

    fn admit(&self, operation: Operation) -> Result<HiveJob, ApiError> {
        match operation {
            Operation::WorkerSpawn(request) => {
                self.check_target(request.hive_id.as_deref())?;
                parse_spawn(request).map(HiveJob::Spawn)
            }
            Operation::WorkerList(target) => {
                self.check_target(target.hive_id.as_deref())?;
                Ok(HiveJob::List)
            }
            Operation::WorkerGet(target) => {
                self.check_target(target.hive_id.as_deref())?;
                self.known_worker(target.worker_id).map(HiveJob::Get)
            }
            Operation::WorkerDelete(target) => {
                self.check_target(target.hive_id.as_deref())?;
                self.known_worker(target.worker_id).map(HiveJob::Delete)
            }
            Operation::Infer(_) => Err(ApiError::unsupported_operation(
                "a hive does not run `infer`: send it to the queen",
            )),
            Operation::ModelDownload(_)
            | Operation::ModelList(_)
            | Operation::ModelGet(_)
            | Operation::ModelDelete(_) => Err(ApiError::new(
                ErrorCode::NotImplemented,
                format!(
                    "`{}` is not available yet: this hive has no model catalog; \
                     spawn workers from local model paths",
                    operation.name()
                ),
            )),
        }
    }

    async fn run(&self, job: HiveJob, ctx: JobContext) -> JobResult {
        let children = &self.hive.children;
        match job {
            HiveJob::Spawn(spec) => spawn::run(&self.hive, spec, &ctx).await,
            HiveJob::List => {
                children.refresh().await;
                let workers = children.list();
                ctx.emit(JobEvent::Data {
                    data: json!({ "workers": workers }),
                })
                .await?;
                Ok(JobOutcome::complete())
            }
            HiveJob::Get(worker_id) => {
                children.refresh().await;
                let worker = children
                    .get(&worker_id)
                    .ok_or_else(|| self.no_such_worker(&worker_id))?;
                ctx.emit(JobEvent::Data {
                    data: json!({ "worker": worker }),
                })
                .await?;
                Ok(JobOutcome::complete())
            }
            HiveJob::Delete(worker_id) => self.delete(worker_id, &ctx).await,
        }
    }
}

impl HiveExecutor {
    /// Stops one child and waits until it is reaped. The stop goes on in its supervisor even if
    /// this job is cancelled meanwhile.
    async fn delete(&self, worker_id: String, ctx: &JobContext) -> JobResult {
        let mut exit = self
            .hive
            .children
            .stop(&worker_id)
            .ok_or_else(|| self.no_such_worker(&worker_id))?;
        let grace = self.hive.config.stop_grace;
        ctx.emit(JobEvent::narration(format!(
            "stopping worker {worker_id} (SIGTERM, SIGKILL after {grace:?})"
        )))
        .await?;
        let limit = grace + Duration::from_secs(5);
        let exit = tokio::time::timeout(limit, wait_exit(&mut exit))
            .await
            .map_err(|_| {
                JobFailure::new(
                    ErrorCode::Timeout,
                    format!("worker {worker_id} was still running {limit:?} after SIGTERM"),
                )
            })?;
        ctx.emit(JobEvent::narration(format!(
            "worker {worker_id} stopped ({})",
            exit.status
        )))
        .await?;
        Ok(JobOutcome::complete())
    }
}

/// `worker_spawn` into a [`SpawnSpec`]: a local model path that exists (made absolute), a device
/// spelled `cpu`, `cuda:N` or `metal:N`.
fn parse_spawn(request: WorkerSpawnRequest) -> Result<SpawnSpec, ApiError> {
    let model_ref = request.model.trim().to_owned();
    if model_ref.is_empty() {
        return Err(ApiError::bad_request("`model` must not be empty"));
    }
    if model_ref.starts_with("hf:") {
        return Err(ApiError::new(
            ErrorCode::NotImplemented,
            format!(
                "cannot spawn `{model_ref}`: downloading models is not available yet; \
                 give the path of a .gguf file or a safetensors directory on the hive"
            ),
        ));
    }
    let model_path = std::fs::canonicalize(Path::new(&model_ref)).map_err(|err| {
        ApiError::bad_request(format!(
            "model path `{model_ref}` cannot be used on this hive: {err}"
        ))
    })?;
    let device = match request.device.as_deref() {
        None => "cpu".to_owned(),
        Some(device) => parse_device(device).ok_or_else(|| {
            ApiError::bad_request(format!(
                "device `{device}` is not one of cpu, cuda:N, metal:N"
            ))
        })?,
    };
    Ok(SpawnSpec {
        model_path,
        model_ref,
        device,
    })
}

/// The canonical spelling of a device: `cpu`, `cuda:N`, `metal:N` (`cuda` alone is `cuda:0`).
fn parse_device(text: &str) -> Option<String> {
    let lower = text.trim().to_ascii_lowercase();
    let (kind, ordinal) = match lower.split_once(':') {
        Some((kind, n)) => (kind, Some(n.parse::<u32>().ok()?)),
        None => (lower.as_str(), None),
    };
    match (kind, ordinal) {
        ("cpu", None) => Some("cpu".into()),
        ("cuda" | "metal", ordinal) => Some(format!("{kind}:{}", ordinal.unwrap_or(0))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_request(model: &str, device: Option<&str>) -> WorkerSpawnRequest {
        WorkerSpawnRequest {
            hive_id: None,
            model: model.into(),
            device: device.map(String::from),
        }
    }

    #[test]
    fn devices_are_canonical() {
        assert_eq!(parse_device("cpu").as_deref(), Some("cpu"));
        assert_eq!(parse_device(" CUDA:1 ").as_deref(), Some("cuda:1"));
        assert_eq!(parse_device("cuda").as_deref(), Some("cuda:0"));
        assert_eq!(parse_device("metal:0").as_deref(), Some("metal:0"));
        assert_eq!(parse_device("cpu:0"), None);
        assert_eq!(parse_device("cuda:x"), None);
        assert_eq!(parse_device("tpu"), None);
    }

    #[test]
    fn spawn_requests_are_parsed_at_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"x").unwrap();
        let spec = parse_spawn(spawn_request(model.to_str().unwrap(), None)).unwrap();
        assert_eq!(spec.device, "cpu");
        assert_eq!(spec.model_path, std::fs::canonicalize(&model).unwrap());
        assert_eq!(spec.model_ref, model.to_str().unwrap());

        let missing = parse_spawn(spawn_request("/nonexistent/rbee/m.gguf", None)).unwrap_err();
        assert_eq!(missing.code, ErrorCode::BadRequest);
        assert!(missing.message.contains("/nonexistent/rbee/m.gguf"));

        let hf = parse_spawn(spawn_request("hf:org/repo", None)).unwrap_err();
        assert_eq!(hf.code, ErrorCode::NotImplemented);

        let device = parse_spawn(spawn_request(model.to_str().unwrap(), Some("gpu"))).unwrap_err();
        assert_eq!(device.code, ErrorCode::BadRequest);
        assert_eq!(
            parse_spawn(spawn_request(" ", None)).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }
}
