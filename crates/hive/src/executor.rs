//! The hive's half of the job protocol: admit worker and model operations (and refuse the
//! rest), run them against the hive's children and its model catalog.

use std::sync::Arc;
use std::time::Duration;

use job_server::{ApiError, JobContext, JobExecutor, JobFailure, JobOutcome, JobResult};
use rbee_contract::{ErrorCode, JobEvent, ModelTarget, Operation, WorkerSpawnRequest};
use serde_json::json;

use crate::Hive;
use crate::children::{SpawnSpec, wait_exit};
use crate::models::reference::{self, HubRef, ModelRef};
use crate::models::{CatalogRow, Models};
use crate::{capacity, devices, spawn};

/// An admitted operation: the target hive is this one, a model reference is well formed (a
/// local path exists), a device is well formed, a named worker is one of this hive's
/// children, a named model is in the catalog.
#[derive(Debug)]
pub(crate) enum HiveJob {
    Spawn(SpawnRequest),
    List,
    Get(String),
    Delete(String),
    ModelDownload { model: HubRef, source: String },
    ModelList,
    ModelGet(CatalogRow),
    ModelDelete(CatalogRow),
}

/// A validated `worker_spawn`; its model is resolved (downloaded if need be) when it runs.
#[derive(Debug)]
pub(crate) struct SpawnRequest {
    model: SpawnModel,
    /// The reference as the user wrote it, which the worker reports as its model.
    model_ref: String,
    device: String,
}

#[derive(Debug)]
enum SpawnModel {
    Local(std::path::PathBuf),
    Hub(HubRef),
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
                parse_spawn(request, &self.hive.models).map(HiveJob::Spawn)
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
            Operation::ModelDownload(target) => {
                self.check_target(target.hive_id.as_deref())?;
                let source = target.model.trim().to_owned();
                let model = hub_reference(&target.model, "download")?;
                Ok(HiveJob::ModelDownload { model, source })
            }
            Operation::ModelList(target) => {
                self.check_target(target.hive_id.as_deref())?;
                Ok(HiveJob::ModelList)
            }
            Operation::ModelGet(target) => self.catalog_entry(&target).map(HiveJob::ModelGet),
            Operation::ModelDelete(target) => {
                let row = self.catalog_entry(&target)?;
                self.check_unused(&row)?;
                Ok(HiveJob::ModelDelete(row))
            }
        }
    }

    async fn run(&self, job: HiveJob, ctx: JobContext) -> JobResult {
        let children = &self.hive.children;
        match job {
            HiveJob::Spawn(request) => {
                let spec = self.resolve(request, &ctx).await?;
                spawn::run(&self.hive, spec, &ctx).await
            }
            HiveJob::ModelDownload { model, source } => {
                let row = self.hive.models.fetch(&model, &source, &ctx).await?;
                ctx.emit(JobEvent::Data {
                    data: json!({ "model": row.details() }),
                })
                .await?;
                Ok(JobOutcome::complete())
            }
            HiveJob::ModelList => {
                ctx.emit(JobEvent::Data {
                    data: json!({ "models": self.hive.models.list() }),
                })
                .await?;
                Ok(JobOutcome::complete())
            }
            HiveJob::ModelGet(row) => {
                ctx.emit(JobEvent::Data {
                    data: json!({ "model": row.details() }),
                })
                .await?;
                Ok(JobOutcome::complete())
            }
            HiveJob::ModelDelete(row) => {
                self.check_unused(&row)?;
                self.hive.models.delete(&row).await?;
                ctx.emit(JobEvent::narration(format!("deleted {}", row.id)))
                    .await?;
                Ok(JobOutcome::complete())
            }
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
    /// The catalog entry a `model_get` or `model_delete` names.
    fn catalog_entry(&self, target: &ModelTarget) -> Result<CatalogRow, ApiError> {
        self.check_target(target.hive_id.as_deref())?;
        let model = hub_reference(&target.model, "look up")?;
        self.hive.models.find(&model)
    }

    /// Refuses to delete a model a worker of this hive runs.
    fn check_unused(&self, row: &CatalogRow) -> Result<(), ApiError> {
        let users: Vec<String> = self
            .hive
            .children
            .list()
            .into_iter()
            .filter(|worker| uses(&worker.model, row))
            .map(|worker| worker.worker_id)
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        Err(ApiError::bad_request(format!(
            "{} is in use by worker(s) {}; stop them first (`worker_delete`)",
            row.id,
            users.join(", ")
        )))
    }

    /// The model of a spawn as a path on this hive: as given, or downloaded first.
    async fn resolve(
        &self,
        request: SpawnRequest,
        ctx: &JobContext,
    ) -> Result<SpawnSpec, JobFailure> {
        let model_path = match request.model {
            SpawnModel::Local(path) => path,
            SpawnModel::Hub(model) => {
                // A model that could never fit the device is not downloaded first.
                let (hive, device) = (&self.hive, request.device.as_str());
                let row = self
                    .hive
                    .models
                    .fetch_checked(&model, &request.model_ref, ctx, |file_bytes| {
                        capacity::before_download(hive, device, &request.model_ref, file_bytes)
                    })
                    .await?;
                row.path.ok_or_else(|| {
                    JobFailure::internal(format!("{} is ready but has no file", row.id))
                })?
            }
        };
        Ok(SpawnSpec {
            model_path,
            model_ref: request.model_ref,
            device: request.device,
        })
    }

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

/// A reference that must name a hub model (`what` the operation does with it).
fn hub_reference(text: &str, what: &str) -> Result<HubRef, ApiError> {
    match reference::parse(text).map_err(|err| ApiError::bad_request(err.to_string()))? {
        ModelRef::Hub(model) => Ok(model),
        ModelRef::Local(path) => Err(ApiError::bad_request(format!(
            "cannot {what} `{}`: only hf:org/repo[:file.gguf] models are in the catalog; \
             a local path is used as it is",
            path.display()
        ))),
    }
}

/// Whether a worker started from `model_ref` runs the catalog entry `row`: the same file, or
/// the same repository when the reference names no file.
fn uses(model_ref: &str, row: &CatalogRow) -> bool {
    match reference::parse(model_ref) {
        Ok(ModelRef::Hub(model)) => {
            model.repo() == row.repo && model.file().is_none_or(|file| file == row.file)
        }
        Ok(ModelRef::Local(path)) => row.path.as_deref() == Some(path.as_path()),
        Err(_) => false,
    }
}

/// `worker_spawn` into a [`SpawnRequest`]: a hub reference, or a local model path this hive
/// may load (made canonical; see [`crate::models::access`]); a device spelled `cpu`, `cuda:N`
/// or `metal:N`.
fn parse_spawn(request: WorkerSpawnRequest, models: &Models) -> Result<SpawnRequest, ApiError> {
    let model_ref = request.model.trim().to_owned();
    if model_ref.is_empty() {
        return Err(ApiError::bad_request("`model` must not be empty"));
    }
    let model =
        match reference::parse(&model_ref).map_err(|err| ApiError::bad_request(err.to_string()))? {
            ModelRef::Hub(model) => SpawnModel::Hub(model),
            ModelRef::Local(path) => SpawnModel::Local(models.local_path(&path, &model_ref)?),
        };
    let device = match request.device.as_deref() {
        None => "cpu".to_owned(),
        Some(device) => devices::parse_id(device).ok_or_else(|| {
            ApiError::bad_request(format!(
                "device `{device}` is not one of cpu, cuda:N, metal:N"
            ))
        })?,
    };
    Ok(SpawnRequest {
        model,
        model_ref,
        device,
    })
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

    #[tokio::test]
    async fn spawn_requests_are_parsed_at_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"x").unwrap();
        let mut config = crate::HiveConfig::new("h");
        config.model_dir = dir.path().join("catalog");
        let models = Models::open(&config, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
        let parse_spawn = |request| parse_spawn(request, &models);
        let spec = parse_spawn(spawn_request(model.to_str().unwrap(), None)).unwrap();
        assert_eq!(spec.device, "cpu");
        assert!(
            matches!(&spec.model, SpawnModel::Local(path) if *path == std::fs::canonicalize(&model).unwrap())
        );
        assert_eq!(spec.model_ref, model.to_str().unwrap());

        let missing = parse_spawn(spawn_request("/nonexistent/rbee/m.gguf", None)).unwrap_err();
        assert_eq!(missing.code, ErrorCode::ModelNotFound);
        assert!(missing.message.contains("/nonexistent/rbee/m.gguf"));

        let hf = parse_spawn(spawn_request("hf:org/repo", None)).unwrap();
        assert!(matches!(&hf.model, SpawnModel::Hub(model) if model.repo() == "org/repo"));
        assert_eq!(hf.model_ref, "hf:org/repo");
        for bad in ["hf:../x", "hf:a/b:../../etc/passwd", "s3:bucket/m"] {
            assert_eq!(
                parse_spawn(spawn_request(bad, None)).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }

        let device = parse_spawn(spawn_request(model.to_str().unwrap(), Some("gpu"))).unwrap_err();
        assert_eq!(device.code, ErrorCode::BadRequest);
        assert_eq!(
            parse_spawn(spawn_request(" ", None)).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }
}
