//! The hive's models: references, the persistent catalog, the hub and downloads.
//!
//! [`Models`] is what the executor and the heartbeat use: it finds a catalog entry for a
//! reference, makes a hub model available on this machine (downloading it once, however many
//! jobs ask, with progress on each job's stream) and deletes one. Everything it writes stays in
//! the model directory: the catalog database (`catalog.sqlite`) and `hf-hub`'s cache (`hub/`).
//!
//! It does not start workers (that is `spawn`) and does not read model files beyond hashing
//! them; local paths are handed to workers as they are and never enter the catalog.

pub(crate) mod access;
mod catalog;
mod download;
mod hub;
pub(crate) mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use job_server::{ApiError, JobContext, JobFailure};
use rbee_contract::{ErrorCode, JobEvent, ModelDetails, ModelEntry, ModelState};
use tokio_util::sync::CancellationToken;

use crate::config::HiveConfig;
use access::{ModelDirs, PathRefusal};
use catalog::Catalog;
pub(crate) use catalog::CatalogRow;
use download::{Flight, Joined, Plan};
use hub::{Hub, HubError, RemoteFile};
use reference::HubRef;

/// Why the model store could not be opened at startup.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("cannot create the model directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Catalog(String),
    #[error("{0}")]
    AllowedDir(String),
    #[error("{0}")]
    Hub(String),
}

pub(crate) struct Models {
    model_dir: PathBuf,
    catalog: Catalog,
    hub: Hub,
    /// The directories local paths must resolve into, if any.
    dirs: ModelDirs,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    /// Cancels every download when the hive stops.
    shutdown: CancellationToken,
}

impl Models {
    /// Creates the model directory if needed and opens the catalog, repairing what a crash
    /// left behind.
    pub async fn open(
        config: &HiveConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Models>, ModelsError> {
        let model_dir = config.model_dir.clone();
        let allowed = config.allowed_model_dirs.clone();
        let dirs = tokio::task::spawn_blocking(move || ModelDirs::new(&allowed))
            .await
            .map_err(|err| ModelsError::AllowedDir(err.to_string()))?
            .map_err(ModelsError::AllowedDir)?;
        let dir = model_dir.clone();
        let catalog = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|source| ModelsError::Dir {
                path: dir.clone(),
                source,
            })?;
            Catalog::open(&dir.join("catalog.sqlite"))
                .map_err(|err| ModelsError::Catalog(err.to_string()))
        })
        .await
        .map_err(|err| ModelsError::Catalog(err.to_string()))??;
        let hub = Hub::new(
            &config.hf_endpoint,
            config.hf_token.clone(),
            model_dir.join("hub"),
        )
        .map_err(|err| ModelsError::Hub(err.to_string()))?;
        Ok(Arc::new(Models {
            model_dir,
            catalog,
            hub,
            dirs,
            flights: Mutex::new(HashMap::new()),
            shutdown,
        }))
    }

    /// The allowed model directories as the heartbeat reports them.
    pub fn allowed_dirs(&self) -> Vec<String> {
        self.dirs.reported()
    }

    /// The canonical file a local model path names, if this hive may load it (see
    /// [`access`]). The client's error names only the reference it gave; why the path was
    /// refused goes to the log. Nothing is opened.
    pub fn local_path(&self, path: &Path, model_ref: &str) -> Result<PathBuf, ApiError> {
        let catalog = || {
            self.catalog
                .list()
                .into_iter()
                .filter(|row| row.state == ModelState::Ready)
                .filter_map(|row| row.path)
                .collect()
        };
        self.dirs.resolve(path, catalog).map_err(|refusal| {
            match &refusal {
                PathRefusal::Outside => tracing::warn!(
                    model = model_ref,
                    "refused a model path outside the allowed model directories and the catalog"
                ),
                PathRefusal::Missing => {
                    tracing::info!(
                        model = model_ref,
                        "no such file in the allowed model directories"
                    );
                }
                PathRefusal::Unusable(err) => {
                    tracing::info!(model = model_ref, error = %err, "model path cannot be used");
                }
            }
            refusal.to_api_error(model_ref)
        })
    }

    /// The catalog as the heartbeat reports it.
    pub fn entries(&self) -> Vec<ModelEntry> {
        self.catalog.list().iter().map(CatalogRow::entry).collect()
    }

    pub fn list(&self) -> Vec<ModelDetails> {
        self.catalog
            .list()
            .iter()
            .map(CatalogRow::details)
            .collect()
    }

    /// The catalog entry a reference means: the file it names, else the entry of its
    /// repository (the preferred quantization when there are several).
    pub fn find(&self, reference: &HubRef) -> Result<CatalogRow, ApiError> {
        let rows = self.catalog.of_repo(&reference.repo());
        let not_found = || {
            ApiError::new(
                ErrorCode::ModelNotFound,
                format!("{reference} is not in this hive's catalog; download it first"),
            )
        };
        if rows.is_empty() {
            return Err(not_found());
        }
        let files: Vec<RemoteFile> = rows
            .iter()
            .map(|row| RemoteFile {
                name: row.file.clone(),
                size: row.size_bytes,
                sha256: row.sha256.clone(),
                etag: None,
            })
            .collect();
        let chosen = hub::choose(reference, &files).map_err(|err| match err {
            HubError::Ambiguous { .. } => ApiError::bad_request(format!(
                "{reference} matches several catalog entries ({}); name the file",
                rows.iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ => not_found(),
        })?;
        rows.into_iter()
            .find(|row| row.file == chosen.name)
            .ok_or_else(not_found)
    }

    /// A ready, present catalog entry for `reference`, if there is one.
    fn ready(&self, reference: &HubRef) -> Option<CatalogRow> {
        self.find(reference).ok().filter(|row| {
            row.state == ModelState::Ready && row.path.as_deref().is_some_and(|p| p.is_file())
        })
    }

    /// Makes the model `reference` names available on this hive: from the catalog when it is
    /// there, else downloaded (narrated on `ctx`). `source` is the reference as the user
    /// wrote it.
    pub async fn fetch(
        self: &Arc<Self>,
        reference: &HubRef,
        source: &str,
        ctx: &JobContext,
    ) -> Result<CatalogRow, JobFailure> {
        self.fetch_checked(reference, source, ctx, |_| async { Ok(()) })
            .await
    }

    /// [`Models::fetch`], but a model that is not here yet is first shown to `before_download`
    /// with its file size: it can refuse the download before a byte moves.
    pub async fn fetch_checked<F>(
        self: &Arc<Self>,
        reference: &HubRef,
        source: &str,
        ctx: &JobContext,
        before_download: impl FnOnce(u64) -> F,
    ) -> Result<CatalogRow, JobFailure>
    where
        F: Future<Output = Result<(), JobFailure>>,
    {
        if let Some(row) = self.ready(reference) {
            return self.used(row).await;
        }
        let repo = reference.repo();
        let files = self.hub.files(&repo).await.map_err(hub_failure)?;
        let file = hub::choose(reference, &files).map_err(hub_failure)?;
        let exact = reference.with_file(&file.name);
        if let Some(row) = self.ready(&exact) {
            return self.used(row).await;
        }
        before_download(file.size).await?;
        ctx.emit(JobEvent::narration(format!(
            "downloading {} ({} bytes) from {}/{repo}",
            file.name,
            file.size,
            self.hub.endpoint()
        )))
        .await?;
        let plan = Plan {
            id: exact.to_string(),
            source: source.to_owned(),
            reference: exact,
            file,
        };
        loop {
            match self.join(plan.clone()) {
                Joined::Following(follower) => return follower.follow(ctx).await,
                Joined::Wait(mut ended) => {
                    let _ = ended.wait_for(Option::is_some).await;
                    if let Some(row) = self.ready(&plan.reference) {
                        return self.used(row).await;
                    }
                }
            }
        }
    }

    async fn used(&self, row: CatalogRow) -> Result<CatalogRow, JobFailure> {
        self.catalog
            .touch(&row.id)
            .await
            .map_err(|err| JobFailure::internal(err.to_string()))?;
        Ok(row)
    }

    /// Removes a model's files and its catalog entry. A download in progress is refused.
    pub async fn delete(&self, row: &CatalogRow) -> Result<(), JobFailure> {
        if self
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&row.id)
        {
            return Err(JobFailure::new(
                ErrorCode::BadRequest,
                format!(
                    "{} is being downloaded; cancel the download job first",
                    row.id
                ),
            ));
        }
        if let Some(path) = &row.path {
            download::remove_download(path).await;
        }
        if let Some(sha256) = &row.sha256 {
            let partial = self.hub.partial_files(
                &row.repo,
                &RemoteFile {
                    name: row.file.clone(),
                    size: row.size_bytes,
                    sha256: None,
                    etag: Some(sha256.clone()),
                },
            );
            let _ = tokio::task::spawn_blocking(move || {
                for file in partial {
                    let _ = std::fs::remove_file(file);
                }
            })
            .await;
        }
        self.catalog
            .remove(&row.id)
            .await
            .map_err(|err| JobFailure::internal(err.to_string()))
    }
}

fn hub_failure(err: HubError) -> JobFailure {
    let code = match &err {
        HubError::NoRepo { .. } | HubError::NoFile { .. } => ErrorCode::ModelNotFound,
        HubError::NoGguf { .. } | HubError::Ambiguous { .. } => ErrorCode::BadRequest,
        HubError::Unreachable { .. } | HubError::NoSize { .. } => ErrorCode::Unavailable,
        HubError::Client(_) => ErrorCode::Internal,
    };
    JobFailure::new(code, err.to_string())
}
