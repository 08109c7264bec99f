//! Downloads: one flight per model however many jobs ask for it, progress for each of them,
//! resume after a broken connection, verification, cleanup on cancel.
//!
//! A flight is a task of its own. Jobs that want the model follow it: each gets `downloading`
//! events (at most every [`PROGRESS_EVERY`]) and the outcome. When the last follower goes away
//! (its job was cancelled), the flight is cancelled and its partial files are removed; when the
//! hive shuts down they are kept, so that the next download resumes. The
//! transfer itself is `hf-hub`'s: it writes `blobs/<etag>.sync.part` in chunks and resumes from
//! the last complete chunk, which is what a retry after a broken connection (and a download
//! asked for again after a crash) relies on. The result is then checked against the size and
//! sha256 the hub listed, off the async runtime; a mismatch deletes the file and marks the
//! model `failed`, so `ready` always means complete and verified.
//!
//! Each transfer runs on a single-threaded runtime of its own, so that `hf-hub`'s chunks are
//! fetched in order (a broken connection costs one chunk) and all stop when it is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hf_hub::api::tokio::{ApiError as HfError, Progress};
use job_server::{JobContext, JobFailure};
use rbee_contract::{ErrorCode, JobEvent, ModelState};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Models;
use super::catalog::{CatalogRow, now};
use super::hub::RemoteFile;
use super::reference::HubRef;

/// How often a follower reports progress.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Attempts at one file; each resumes where the previous one broke off.
const ATTEMPTS: u32 = 5;

/// What a flight downloads.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The catalog id, `hf:org/repo:file`.
    pub id: String,
    /// The reference the download was asked for by.
    pub source: String,
    pub reference: HubRef,
    pub file: RemoteFile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Transferring,
    Verifying,
}

/// One download in progress, shared by every job that wants it.
pub(crate) struct Flight {
    plan: Plan,
    done: Arc<AtomicU64>,
    phase: watch::Sender<Phase>,
    outcome: watch::Sender<Option<Result<CatalogRow, JobFailure>>>,
    cancel: CancellationToken,
    followers: AtomicUsize,
}

/// Counts the bytes `hf-hub` reports into the flight.
#[derive(Clone)]
struct Counter(Arc<AtomicU64>);

impl Progress for Counter {
    async fn init(&mut self, _size: usize, _filename: &str) {
        // A resumed attempt reports the bytes it already has as its first update.
        self.0.store(0, Ordering::Relaxed);
    }

    async fn update(&mut self, size: usize) {
        self.0.fetch_add(size as u64, Ordering::Relaxed);
    }

    async fn finish(&mut self) {}
}

/// A job's hold on a flight; the flight is cancelled when the last one is dropped before it
/// ended.
pub(crate) struct Follower {
    models: Arc<Models>,
    flight: Arc<Flight>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        // Under the registry's lock, so that a job joining meanwhile sees the cancel.
        let _flights = self
            .models
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.flight.followers.fetch_sub(1, Ordering::SeqCst) == 1
            && self.flight.outcome.borrow().is_none()
        {
            tracing::info!(model = %self.flight.plan.id, "nobody waits for the download any more; cancelling it");
            // The flight stays registered until its task has cleaned up, so that a new
            // request waits for that instead of racing it.
            self.flight.cancel.cancel();
        }
    }
}

/// The result of asking for a flight.
pub(crate) enum Joined {
    Following(Follower),
    /// A cancelled flight is still cleaning up; wait for this, then ask again.
    Wait(watch::Receiver<Option<Result<CatalogRow, JobFailure>>>),
}

impl Models {
    /// Follows the flight for `plan.id`, starting it if there is none.
    pub(crate) fn join(self: &Arc<Self>, plan: Plan) -> Joined {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = flights.get(&plan.id) {
            if flight.cancel.is_cancelled() {
                return Joined::Wait(flight.outcome.subscribe());
            }
            flight.followers.fetch_add(1, Ordering::SeqCst);
            return Joined::Following(Follower {
                models: Arc::clone(self),
                flight: Arc::clone(flight),
            });
        }
        let flight = Arc::new(Flight {
            plan,
            done: Arc::new(AtomicU64::new(0)),
            phase: watch::Sender::new(Phase::Transferring),
            outcome: watch::Sender::new(None),
            cancel: self.shutdown.child_token(),
            followers: AtomicUsize::new(1),
        });
        flights.insert(flight.plan.id.clone(), Arc::clone(&flight));
        tokio::spawn(fly(Arc::clone(self), Arc::clone(&flight)));
        Joined::Following(Follower {
            models: Arc::clone(self),
            flight,
        })
    }
}

impl Follower {
    /// Relays the flight's progress onto the job until it ends, and hands back its outcome.
    pub(crate) async fn follow(self, ctx: &JobContext) -> Result<CatalogRow, JobFailure> {
        let flight = Arc::clone(&self.flight);
        let model = flight.plan.source.clone();
        let total = flight.plan.file.size;
        let mut outcome = flight.outcome.subscribe();
        let mut phase = flight.phase.subscribe();
        let mut ticker = tokio::time::interval(PROGRESS_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rate = Rate::new(flight.done.load(Ordering::Relaxed));
        let mut last_reported = None;
        loop {
            if let Some(result) = outcome.borrow_and_update().clone() {
                drop(self);
                return result;
            }
            tokio::select! {
                _ = outcome.changed() => {}
                changed = phase.changed() => {
                    if changed.is_ok() && *phase.borrow_and_update() == Phase::Verifying {
                        emit_progress(ctx, &model, total, total, rate.per_second(total)).await?;
                        ctx.emit(JobEvent::narration(format!(
                            "verifying the sha256 of {}",
                            flight.plan.file.name
                        )))
                        .await?;
                    }
                }
                _ = ticker.tick() => {
                    let done = flight.done.load(Ordering::Relaxed).min(total);
                    if last_reported != Some(done) && *phase.borrow() == Phase::Transferring {
                        last_reported = Some(done);
                        emit_progress(ctx, &model, done, total, rate.per_second(done)).await?;
                    }
                }
            }
        }
    }
}

async fn emit_progress(
    ctx: &JobContext,
    model: &str,
    done: u64,
    total: u64,
    rate: Option<f64>,
) -> Result<(), JobFailure> {
    ctx.emit(JobEvent::Downloading {
        model: model.to_owned(),
        bytes_done: done,
        bytes_total: Some(total),
        bytes_per_second: rate,
    })
    .await?;
    Ok(())
}

/// Bytes per second over the last few seconds of samples.
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    const WINDOW: Duration = Duration::from_secs(3);

    fn new(done: u64) -> Self {
        Rate {
            samples: [(Instant::now(), done)].into(),
        }
    }

    fn per_second(&mut self, done: u64) -> Option<f64> {
        let now = Instant::now();
        self.samples.push_back((now, done));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
        let (t0, d0) = *self.samples.front()?;
        let seconds = now.duration_since(t0).as_secs_f64();
        (seconds > 0.0).then(|| done.saturating_sub(d0) as f64 / seconds)
    }
}

/// The flight's task: download, verify, record, then hand the outcome to every follower.
async fn fly(models: Arc<Models>, flight: Arc<Flight>) {
    let plan = flight.plan.clone();
    let result = tokio::select! {
        result = transfer_and_verify(&models, &flight) => result,
        () = flight.cancel.cancelled() => {
            if models.shutdown.is_cancelled() {
                interrupted_by_shutdown(&models, &plan).await;
                Err(JobFailure::new(
                    ErrorCode::ShuttingDown,
                    format!("the hive is shutting down; the download of {} resumes when asked for again", plan.id),
                ))
            } else {
                cleanup_cancelled(&models, &plan).await;
                Err(JobFailure::new(
                    ErrorCode::Cancelled,
                    format!("the download of {} was cancelled", plan.id),
                ))
            }
        }
    };
    if let Err(failure) = &result {
        tracing::warn!(model = %plan.id, error = %failure.message, "download failed");
    }
    let mut flights = models.flights.lock().unwrap_or_else(|p| p.into_inner());
    flight.outcome.send_replace(Some(result));
    flights.remove(&plan.id);
}

async fn transfer_and_verify(models: &Models, flight: &Flight) -> Result<CatalogRow, JobFailure> {
    let plan = &flight.plan;
    let partial = models.hub.partial_files(&plan.reference.repo(), &plan.file);
    check_disk(&models.model_dir, plan.file.size, &partial).await?;
    let previous = models.catalog.get(&plan.id);
    let mut row = CatalogRow {
        id: plan.id.clone(),
        source: previous
            .as_ref()
            .map_or_else(|| plan.source.clone(), |r| r.source.clone()),
        repo: plan.reference.repo(),
        file: plan.file.name.clone(),
        path: None,
        size_bytes: plan.file.size,
        sha256: plan.file.sha256.clone(),
        state: ModelState::Downloading,
        error: None,
        added_at: previous.as_ref().map_or_else(now, |r| r.added_at),
        last_used_at: previous.and_then(|r| r.last_used_at),
    };
    models.catalog.put(row.clone()).await.map_err(internal)?;
    let outcome = transfer(models, flight).await;
    let outcome = match outcome {
        Ok(path) => {
            flight.phase.send_replace(Phase::Verifying);
            verify(&path, &plan.file).await.map(|sha256| (path, sha256))
        }
        Err(failure) => Err(failure),
    };
    match outcome {
        Ok((path, sha256)) => {
            row.path = Some(path);
            row.sha256 = Some(sha256);
            row.state = ModelState::Ready;
            row.last_used_at = Some(now());
            models.catalog.put(row.clone()).await.map_err(internal)?;
            tracing::info!(model = %plan.id, bytes = plan.file.size, "model downloaded and verified");
            Ok(row)
        }
        Err(failure) => {
            row.state = ModelState::Failed;
            row.error = Some(failure.message.clone());
            models.catalog.put(row).await.map_err(internal)?;
            Err(failure)
        }
    }
}

/// `hf-hub`'s download, retried (each retry resumes) while the failure looks like a broken
/// connection.
async fn transfer(models: &Models, flight: &Flight) -> Result<PathBuf, JobFailure> {
    let plan = &flight.plan;
    let mut attempt = 1;
    loop {
        let counter = Counter(Arc::clone(&flight.done));
        let repo = plan.reference.repo();
        match download_in_order(models, &repo, &plan.file.name, counter).await? {
            Ok(path) => return Ok(path),
            Err(err) if attempt < ATTEMPTS && retryable(&err) => {
                tracing::warn!(model = %plan.id, attempt, error = %err, "download broke off; resuming");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(err) => {
                return Err(JobFailure::new(
                    ErrorCode::Unavailable,
                    format!(
                        "cannot download {} from {} (after {attempt} attempt(s)): {err}; \
                         asking again resumes it",
                        plan.id,
                        models.hub.endpoint()
                    ),
                ));
            }
        }
    }
}

/// One `hf-hub` download of `file`, on a single-threaded runtime of its own.
///
/// `hf-hub` fetches a file in chunks, each a task of its own, and a later attempt resumes after
/// the longest run of chunks from the start that completed. On a multi-threaded runtime the
/// chunks start in any order, so a broken connection can throw away every chunk fetched so far;
/// on one thread they start in order, and a break costs only the chunk it broke. Dropping the
/// runtime also stops every chunk task, so a cancelled download stops transferring at once.
async fn download_in_order(
    models: &Models,
    repo: &str,
    file: &str,
    counter: Counter,
) -> Result<Result<PathBuf, HfError>, JobFailure> {
    let api = models
        .hub
        .api()
        .map_err(|err| JobFailure::internal(err.to_string()))?;
    let repo = api.model(repo.to_owned());
    let file = file.to_owned();
    let cancel = CancellationToken::new();
    // The caller's future is dropped when the download is cancelled; the guard stops the
    // runtime's thread then.
    let _stop_when_dropped = cancel.clone().drop_guard();
    let fetched = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok::<_, std::io::Error>(runtime.block_on(async move {
            tokio::select! {
                result = repo.download_with_progress(&file, counter) => Some(result),
                () = cancel.cancelled() => None,
            }
        }))
    })
    .await
    .map_err(|err| JobFailure::internal(format!("download thread failed: {err}")))?
    .map_err(|err| JobFailure::internal(format!("cannot start a download runtime: {err}")))?;
    fetched.ok_or_else(|| JobFailure::new(ErrorCode::Cancelled, "the download was cancelled"))
}

fn retryable(err: &HfError) -> bool {
    match err {
        HfError::RequestError(err) => !err.status().is_some_and(|s| s.is_client_error()),
        HfError::TooManyRetries(_) | HfError::Join(_) => true,
        _ => false,
    }
}

/// The file's size and sha256 against what the hub listed; gives the sha256. A file that
/// does not match is deleted (with its snapshot link).
async fn verify(path: &Path, expected: &RemoteFile) -> Result<String, JobFailure> {
    let target = path.to_owned();
    let hashed = tokio::task::spawn_blocking(move || hash_file(&target))
        .await
        .map_err(|err| JobFailure::internal(format!("hashing task failed: {err}")))?;
    let (size, sha256) = hashed.map_err(|err| {
        JobFailure::internal(format!(
            "cannot read the downloaded {}: {err}",
            expected.name
        ))
    })?;
    let mismatch = if size != expected.size {
        Some(format!("{size} bytes instead of {}", expected.size))
    } else {
        match &expected.sha256 {
            Some(want) if *want != sha256 => Some(format!("sha256 {sha256} instead of {want}")),
            _ => None,
        }
    };
    let Some(mismatch) = mismatch else {
        return Ok(sha256);
    };
    remove_download(path).await;
    Err(JobFailure::new(
        ErrorCode::ModelLoadFailed,
        format!(
            "the download of {} is corrupt ({mismatch}); it was deleted",
            expected.name
        ),
    ))
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    let digest = hasher.finalize();
    Ok((size, digest.iter().map(|b| format!("{b:02x}")).collect()))
}

/// Deletes a downloaded file: the snapshot link `hf-hub` hands back and the blob it points at.
pub(crate) async fn remove_download(link: &Path) {
    let link = link.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(blob) = std::fs::canonicalize(&link) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(&link);
    })
    .await;
}

/// The hive stops: the partial file stays for the next download to resume from, and the entry
/// says so (a restart would mark it the same way).
async fn interrupted_by_shutdown(models: &Models, plan: &Plan) {
    let updated = models
        .catalog
        .update(&plan.id, |row| {
            if row.state == ModelState::Downloading {
                row.state = ModelState::Failed;
                row.error = Some(
                    "the download was interrupted (the hive stopped); download it again to resume"
                        .into(),
                );
            }
        })
        .await;
    if let Err(err) = updated {
        tracing::warn!(model = %plan.id, error = %err, "cannot record an interrupted download");
    }
}

/// After a cancel: partial files go, and so does the catalog row unless the model was there
/// before.
async fn cleanup_cancelled(models: &Models, plan: &Plan) {
    let partial = models.hub.partial_files(&plan.reference.repo(), &plan.file);
    let _ = tokio::task::spawn_blocking(move || {
        for file in partial {
            let _ = std::fs::remove_file(file);
        }
    })
    .await;
    if models
        .catalog
        .get(&plan.id)
        .is_some_and(|row| row.state != ModelState::Ready)
        && let Err(err) = models.catalog.remove(&plan.id).await
    {
        tracing::warn!(model = %plan.id, error = %err, "cannot remove a cancelled download from the catalog");
    }
}

/// Refuses a download the file system cannot hold, before it starts. Space a partial file of
/// an earlier attempt already occupies counts as available.
async fn check_disk(dir: &Path, size: u64, partial: &[PathBuf]) -> Result<(), JobFailure> {
    let dir = dir.to_owned();
    let partial = partial.to_vec();
    let free = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let stat = nix::sys::statvfs::statvfs(&dir).map_err(std::io::Error::from)?;
        // The field types differ between platforms (u32 on macOS).
        #[allow(clippy::useless_conversion)]
        let available = u64::from(stat.blocks_available()) * u64::from(stat.fragment_size());
        let reserved: u64 = partial
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        Ok(available + reserved)
    })
    .await
    .map_err(|err| JobFailure::internal(format!("disk check failed: {err}")))?
    .map_err(|err| {
        JobFailure::internal(format!(
            "cannot read the free space of the model directory: {err}"
        ))
    })?;
    if free < size {
        return Err(JobFailure::new(
            ErrorCode::NoCapacity,
            format!(
                "not enough disk space for the download: it needs {size} bytes and the model \
                 directory has {free} bytes free"
            ),
        ));
    }
    Ok(())
}

fn internal(err: impl std::fmt::Display) -> JobFailure {
    JobFailure::internal(err.to_string())
}
