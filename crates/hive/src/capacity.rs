//! Whether a model fits on one of the hive's devices, for `GET /v1/capacity` and for every
//! `worker_spawn` before its worker starts.
//!
//! A model needs `weights + KV caches at the worker's context length + a fixed overhead`
//! (see `footprint` for how the first two are read from the file, and [`overhead`]): one KV
//! cache per slot of the worker (the hive's `--worker-slots`) when the worker batches the model,
//! one when it serves a sequence at a time, each of the context the worker runs the model with
//! (the hive's `--worker-ctx-size`, else the model's trained context), plus, for a model the
//! worker batches, its prompt cache store (`--worker-prompt-cache-mib`). A device
//! has `min(free, total − held) − reserve` for it, where `free` and `total` are the device's
//! memory read now, `held` is what the hive's workers on the same memory (running, loading or
//! being spawned) need by the same estimate, and `reserve` is the hive's `--memory-reserve`.
//! Taking the smaller of the two counts memory that other programs use (only `free` shows it)
//! and memory that workers have yet to grow into (their KV caches fill as they generate, which
//! only `held` shows) without counting a worker twice.
//!
//! A spawn that fits holds a [`Reservation`] until the spawn ends, so that two spawns at once
//! cannot both take the same memory (see `ledger`). This module does not decide where a model
//! should go (the queen does) and does not read model weights, only headers.

mod footprint;
#[cfg(test)]
mod gpu_placement;
mod ledger;

use std::path::PathBuf;
use std::sync::Arc;

use job_server::{ApiError, JobFailure};
use rbee_contract::{
    CapacityEstimate, DeviceInfo, DeviceKind, ErrorCode, ErrorDetail, ModelState, NoCapacityBody,
};

use crate::Hive;
use crate::children::{Children, SpawnSpec};
use crate::devices::{self, Gpus};
use crate::models::Models;
use crate::models::reference::{self, HubRef, ModelRef};

use footprint::Footprint;
pub(crate) use ledger::{Ledger, Reservation};

/// The allowance, beyond weights and KV cache, for a worker on the CPU: the process itself,
/// its tokenizer and the activations of a prefill chunk.
pub(crate) const OVERHEAD_CPU: u64 = 256 << 20;
/// On a CUDA device: the CUDA context and cuBLAS workspace come on top of the CPU's share.
pub(crate) const OVERHEAD_CUDA: u64 = 768 << 20;
/// On the Apple GPU: Metal's command buffers and kernels on top of the CPU's share.
pub(crate) const OVERHEAD_METAL: u64 = 384 << 20;

pub(crate) fn overhead(kind: DeviceKind) -> u64 {
    match kind {
        DeviceKind::Cpu => OVERHEAD_CPU,
        DeviceKind::Cuda => OVERHEAD_CUDA,
        DeviceKind::Metal => OVERHEAD_METAL,
    }
}

/// Why a capacity question has no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CapacityError {
    #[error("`device` is `{0}`, which is not one of cpu, cuda:N, metal:N")]
    BadDevice(String),
    #[error("this hive has no device `{device}`; it has {known}")]
    UnknownDevice { device: String, known: String },
    #[error("`model` must be given: a model path on this hive or an `hf:` reference")]
    NoModel,
    #[error("model path `{model}` cannot be used on this hive: {reason}")]
    BadPath { model: String, reason: String },
    #[error("model path `{0}` does not exist on this hive")]
    NoSuchPath(String),
    #[error("{0}")]
    BadReference(String),
    /// An `hf:` reference the catalog cannot answer for (not there, not ready, ambiguous).
    #[error("{}", .0.message)]
    Catalog(ApiError),
    #[error("cannot estimate the memory `{model}` needs: {reason}")]
    Unreadable { model: String, reason: String },
    #[error("the capacity check failed: {0}")]
    Internal(String),
}

impl From<CapacityError> for ApiError {
    fn from(err: CapacityError) -> Self {
        let code = match &err {
            CapacityError::Catalog(err) => return err.clone(),
            CapacityError::UnknownDevice { .. } => ErrorCode::NotFound,
            CapacityError::NoSuchPath(_) => ErrorCode::ModelNotFound,
            CapacityError::Internal(_) => ErrorCode::Internal,
            CapacityError::BadDevice(_)
            | CapacityError::BadReference(_)
            | CapacityError::NoModel
            | CapacityError::BadPath { .. }
            | CapacityError::Unreadable { .. } => ErrorCode::BadRequest,
        };
        ApiError::new(code, err.to_string())
    }
}

/// One capacity question, parsed: a canonical device id and a model file that exists.
#[derive(Debug, Clone)]
pub(crate) struct Question {
    pub model_ref: String,
    pub model_path: PathBuf,
    pub device: String,
}

impl Question {
    /// `GET /v1/capacity?device=…&model=…`; the device defaults to `cpu` like `worker_spawn`'s.
    /// A local path must exist; an `hf:` reference is looked up with `in_catalog`, which gives
    /// the file of its ready catalog entry.
    pub fn parse(
        model: Option<&str>,
        device: Option<&str>,
        in_catalog: impl FnOnce(&HubRef) -> Result<PathBuf, ApiError>,
    ) -> Result<Question, CapacityError> {
        let device = match device.map(str::trim).filter(|d| !d.is_empty()) {
            None => "cpu".to_owned(),
            Some(text) => {
                devices::parse_id(text).ok_or_else(|| CapacityError::BadDevice(text.to_owned()))?
            }
        };
        let model_ref = model
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .ok_or(CapacityError::NoModel)?
            .to_owned();
        let model_path = match reference::parse(&model_ref) {
            Err(err) => return Err(CapacityError::BadReference(err.to_string())),
            Ok(ModelRef::Hub(hub)) => in_catalog(&hub).map_err(CapacityError::Catalog)?,
            Ok(ModelRef::Local(path)) => std::fs::canonicalize(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    CapacityError::NoSuchPath(model_ref.clone())
                } else {
                    CapacityError::BadPath {
                        model: model_ref.clone(),
                        reason: e.to_string(),
                    }
                }
            })?,
        };
        Ok(Question {
            model_ref,
            model_path,
            device,
        })
    }

    fn of_spawn(spec: &SpawnSpec) -> Question {
        Question {
            model_ref: spec.model_ref.clone(),
            model_path: spec.model_path.clone(),
            device: spec.device.clone(),
        }
    }
}

/// The file of `hub`'s catalog entry, when it is ready on this hive.
pub(crate) fn catalog_path(models: &Models, hub: &HubRef) -> Result<PathBuf, ApiError> {
    let row = models.find(hub)?;
    match row.path {
        Some(path) if row.state == ModelState::Ready && path.is_file() => Ok(path),
        _ => Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!(
                "{hub} is in this hive's catalog but not ready ({:?}); download it first",
                row.state
            ),
        )),
    }
}

/// Answers `question` now. Blocking (device reads, a model header): run it off the reactor.
/// With `reserve`, a model that fits gets a [`Reservation`].
fn evaluate(
    ledger: &Arc<Ledger>,
    children: &Children,
    gpus: &dyn Gpus,
    question: &Question,
    limits: Limits,
    reserve: bool,
) -> Result<(CapacityEstimate, Option<Reservation>), CapacityError> {
    let devices = devices::read(gpus);
    let device = devices
        .find(&question.device)
        .ok_or_else(|| CapacityError::UnknownDevice {
            device: question.device.clone(),
            known: devices
                .all()
                .iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let footprint = footprint::of_path(&question.model_path, device.kind, limits.worker_ctx_size)
        .map_err(|reason| CapacityError::Unreadable {
        model: question.model_ref.clone(),
        reason,
    })?;

    // Everything below happens under the ledger's lock, with the children listed under it,
    // so that a concurrent spawn is seen either as pending or as a child.
    let mut state = ledger.lock();
    let workers = children.list();
    let held = state.held(&workers, device, limits);
    let estimate = estimate_of(&question.model_ref, device, &footprint, held, limits);
    state.remember(&question.model_ref, &device.id, estimate.required_bytes);
    let reservation = (reserve && estimate.fits()).then(|| {
        let baseline = workers
            .iter()
            .filter(|w| w.model == question.model_ref && w.device == device.id)
            .count();
        state.reserve(ledger, &question.model_ref, &device.id, baseline)
    });
    Ok((estimate, reservation))
}

/// What a worker of `model` (whose footprint is `footprint`) needs on `device`, and what the
/// device has left for it while the hive's workers hold `held`.
fn estimate_of(
    model: &str,
    device: &DeviceInfo,
    footprint: &Footprint,
    held: u64,
    limits: Limits,
) -> CapacityEstimate {
    let overhead_bytes = overhead(device.kind);
    let slots = footprint.slots(limits.worker_slots);
    let kv_cache_bytes = footprint.kv_cache_bytes(slots);
    // Only the engine's CPU path keeps a store of prompt prefixes.
    let prompt_cache_bytes = if footprint.cpu_path {
        limits.worker_prompt_cache_bytes
    } else {
        0
    };
    CapacityEstimate {
        device: device.id.clone(),
        model: model.to_owned(),
        required_bytes: footprint
            .weights_bytes
            .saturating_add(kv_cache_bytes)
            .saturating_add(prompt_cache_bytes)
            .saturating_add(overhead_bytes),
        available_bytes: available(device, held, limits.memory_reserve),
        weights_bytes: footprint.weights_bytes,
        kv_cache_bytes,
        overhead_bytes,
        context_length: footprint.context_length,
        slots,
        prompt_cache_bytes,
    }
}

/// The hive's settings a capacity check uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `--memory-reserve`.
    memory_reserve: u64,
    /// `--worker-slots`.
    worker_slots: u32,
    /// `--worker-ctx-size`; `None` for each model's trained context.
    worker_ctx_size: Option<u64>,
    /// `--worker-prompt-cache-mib`, in bytes.
    worker_prompt_cache_bytes: u64,
}

impl Limits {
    fn of(hive: &Hive) -> Limits {
        Limits {
            memory_reserve: hive.config.memory_reserve,
            worker_slots: hive.config.worker_slots.get(),
            worker_ctx_size: hive.config.worker_ctx_size.map(|n| u64::from(n.get())),
            worker_prompt_cache_bytes: u64::from(hive.config.worker_prompt_cache_mib) << 20,
        }
    }
}

/// What a device can still give a new worker: the smaller of its free memory and its total
/// less what the hive's workers need, less the reserve.
fn available(device: &DeviceInfo, held: u64, memory_reserve: u64) -> u64 {
    device
        .memory_free_bytes
        .min(device.memory_total_bytes.saturating_sub(held))
        .saturating_sub(memory_reserve)
}

/// [`evaluate`] on the blocking pool.
async fn ask(
    hive: &Hive,
    question: Question,
    reserve: bool,
) -> Result<(CapacityEstimate, Option<Reservation>), CapacityError> {
    let ledger = Arc::clone(&hive.capacity);
    let children = Arc::clone(&hive.children);
    let gpus = Arc::clone(&hive.gpus);
    let limits = Limits::of(hive);
    tokio::task::spawn_blocking(move || {
        evaluate(
            &ledger,
            &children,
            gpus.as_ref(),
            &question,
            limits,
            reserve,
        )
    })
    .await
    .map_err(|e| CapacityError::Internal(e.to_string()))?
}

/// `GET /v1/capacity`: the estimate, whether it fits or not.
pub(crate) async fn estimate(
    hive: &Hive,
    question: Question,
) -> Result<CapacityEstimate, CapacityError> {
    ask(hive, question, false)
        .await
        .map(|(estimate, _)| estimate)
}

/// The first step of a spawn: refuses it with `no_capacity` when the model does not fit on its
/// device, else sets the memory aside until the returned reservation is dropped.
///
/// A model whose size cannot be read is not refused here: the worker is the judge of what it
/// can load, and says why it cannot.
pub(crate) async fn reserve(
    hive: &Hive,
    spec: &SpawnSpec,
) -> Result<Option<Reservation>, JobFailure> {
    let answer = ask(hive, Question::of_spawn(spec), true).await;
    match answer {
        Ok((estimate, Some(reservation))) => {
            tracing::debug!(?estimate, "the model fits");
            Ok(Some(reservation))
        }
        Ok((estimate, None)) => Err(JobFailure::new(ErrorCode::NoCapacity, shortfall(&estimate))),
        Err(err @ CapacityError::Unreadable { .. }) => {
            tracing::info!(error = %err, "spawning without a capacity check");
            Ok(None)
        }
        Err(err @ CapacityError::UnknownDevice { .. }) => {
            Err(JobFailure::new(ErrorCode::NoCapacity, err.to_string()))
        }
        Err(err) => {
            let err = ApiError::from(err);
            Err(JobFailure::new(err.code, err.message))
        }
    }
}

/// Before an `hf:` model is downloaded for a spawn: refuses at once, with `no_capacity`, when
/// its file and the overhead alone exceed what the device has left, so that a model that could
/// never run there is not fetched first. The full check, with the KV cache read from the
/// file's header, comes after the download ([`reserve`]).
pub(crate) async fn before_download(
    hive: &Hive,
    device: &str,
    model: &str,
    file_bytes: u64,
) -> Result<(), JobFailure> {
    let ledger = Arc::clone(&hive.capacity);
    let children = Arc::clone(&hive.children);
    let gpus = Arc::clone(&hive.gpus);
    let limits = Limits::of(hive);
    let (device, model) = (device.to_owned(), model.to_owned());
    let refusal = tokio::task::spawn_blocking(move || {
        file_refusal(
            &ledger,
            &children,
            gpus.as_ref(),
            &device,
            &model,
            file_bytes,
            limits,
        )
    })
    .await
    .map_err(|e| JobFailure::internal(format!("the capacity check failed: {e}")))?;
    match refusal {
        Some(message) => Err(JobFailure::new(ErrorCode::NoCapacity, message)),
        None => Ok(()),
    }
}

/// [`before_download`]'s answer, read now: why a file of `file_bytes` cannot fit on `device`,
/// or `None` when it may (an unknown device is left to the full check, which lists the
/// devices). Blocking.
fn file_refusal(
    ledger: &Ledger,
    children: &Children,
    gpus: &dyn Gpus,
    device: &str,
    model: &str,
    file_bytes: u64,
    limits: Limits,
) -> Option<String> {
    let devices = devices::read(gpus);
    let device = devices.find(device)?;
    let held = ledger.lock().held(&children.list(), device, limits);
    let overhead_bytes = overhead(device.kind);
    let estimate = CapacityEstimate {
        device: device.id.clone(),
        model: model.to_owned(),
        required_bytes: file_bytes.saturating_add(overhead_bytes),
        available_bytes: available(device, held, limits.memory_reserve),
        weights_bytes: file_bytes,
        // No KV cache is counted until the header is read.
        kv_cache_bytes: 0,
        overhead_bytes,
        context_length: 0,
        slots: 0,
        prompt_cache_bytes: 0,
    };
    (!estimate.fits()).then(|| {
        format!(
            "`{}` does not fit on {}, so it was not downloaded: its file alone needs {} \
             bytes ({} weights + {} overhead, before the KV cache) and {} bytes are available",
            estimate.model,
            estimate.device,
            estimate.required_bytes,
            estimate.weights_bytes,
            estimate.overhead_bytes,
            estimate.available_bytes
        )
    })
}

/// The `409` body for an estimate that does not fit.
pub(crate) fn no_capacity_body(estimate: CapacityEstimate) -> NoCapacityBody {
    NoCapacityBody {
        error: ErrorDetail {
            code: ErrorCode::NoCapacity,
            message: shortfall(&estimate),
        },
        estimate,
    }
}

/// The numbers of a model that does not fit, for people.
fn shortfall(e: &CapacityEstimate) -> String {
    format!(
        "`{}` does not fit on {}: it needs {} bytes ({} weights + {} KV cache for {} {} of {} \
         positions{} + {} overhead) and {} bytes are available",
        e.model,
        e.device,
        e.required_bytes,
        e.weights_bytes,
        e.kv_cache_bytes,
        e.slots,
        if e.slots == 1 {
            "sequence"
        } else {
            "sequences"
        },
        e.context_length,
        if e.prompt_cache_bytes > 0 {
            format!(" + {} prompt cache", e.prompt_cache_bytes)
        } else {
            String::new()
        },
        e.overhead_bytes,
        e.available_bytes
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A device with this much memory; `cpu` is the CPU, anything else a CUDA device.
    pub(crate) fn device(id: &str, total: u64, free: u64) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            kind: if id == "cpu" {
                DeviceKind::Cpu
            } else {
                DeviceKind::Cuda
            },
            name: id.into(),
            memory_total_bytes: total,
            memory_free_bytes: free,
            cores: None,
            compute_capability: None,
        }
    }

    #[test]
    fn available_is_the_smaller_of_free_and_total_less_held_less_the_reserve() {
        let gpu = device("cuda:0", 24 * GIB, 20 * GIB);
        assert_eq!(available(&gpu, 0, 0), 20 * GIB);
        // Workers that will grow to 10 GiB leave 14, though 20 are free now.
        assert_eq!(available(&gpu, 10 * GIB, 0), 14 * GIB);
        // Other programs took memory: free is the limit.
        assert_eq!(available(&gpu, GIB, 0), 20 * GIB);
        assert_eq!(available(&gpu, 10 * GIB, 2 * GIB), 12 * GIB);
        assert_eq!(available(&gpu, 30 * GIB, 0), 0);
        assert_eq!(available(&gpu, 0, 1 << 40), 0);
    }

    #[test]
    fn questions_are_parsed_at_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"x").unwrap();
        let path = model.to_str().unwrap();

        let absent = |hub: &HubRef| {
            Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!("{hub} is not in this hive's catalog"),
            ))
        };
        let q = Question::parse(Some(path), None, absent).unwrap();
        assert_eq!((q.device.as_str(), q.model_ref.as_str()), ("cpu", path));
        let q = Question::parse(Some(path), Some("CUDA"), absent).unwrap();
        assert_eq!(q.device, "cuda:0");
        // A hub reference is sized from the file of its catalog entry.
        let q = Question::parse(Some("hf:org/repo"), None, |hub| {
            assert_eq!(hub.repo(), "org/repo");
            Ok(model.clone())
        })
        .unwrap();
        assert_eq!(
            (q.model_ref.as_str(), &q.model_path),
            ("hf:org/repo", &model)
        );

        let code = |m: Option<&str>, d: Option<&str>| {
            ApiError::from(Question::parse(m, d, absent).unwrap_err()).code
        };
        assert_eq!(code(Some(path), Some("gpu")), ErrorCode::BadRequest);
        assert_eq!(code(None, None), ErrorCode::BadRequest);
        assert_eq!(code(Some(" "), None), ErrorCode::BadRequest);
        assert_eq!(
            code(Some("/nonexistent/rbee/m.gguf"), None),
            ErrorCode::ModelNotFound
        );
        assert_eq!(code(Some("hf:org/repo"), None), ErrorCode::ModelNotFound);
        assert_eq!(code(Some("hf:../etc"), None), ErrorCode::BadRequest);
        assert_eq!(code(Some("s3:bucket/m"), None), ErrorCode::BadRequest);
    }

    /// The tiny generated llama model in `format`, in `dir`.
    fn tiny(format: model_gen::ModelFormat, dir: &std::path::Path) -> PathBuf {
        model_gen::ensure_generated(&model_gen::ModelSpec::tiny(), format, dir).unwrap()
    }

    pub(crate) fn limits(worker_slots: u32) -> Limits {
        Limits {
            memory_reserve: 0,
            worker_slots,
            worker_ctx_size: None,
            worker_prompt_cache_bytes: 0,
        }
    }

    #[test]
    fn a_worker_with_n_slots_needs_n_kv_caches() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(
            model_gen::ModelFormat::Gguf(model_gen::GgufType::Q4_0),
            dir.path(),
        );
        let cpu = device("cpu", 64 * GIB, 60 * GIB);
        let footprint = footprint::of_path(&model, DeviceKind::Cpu, None).unwrap();
        let one = estimate_of("m", &cpu, &footprint, 0, limits(1));
        let four = estimate_of("m", &cpu, &footprint, 0, limits(4));
        let per_sequence = footprint.kv_bytes_per_position * footprint.context_length;
        assert!(per_sequence > 0);
        assert_eq!((one.slots, one.kv_cache_bytes), (1, per_sequence));
        assert_eq!((four.slots, four.kv_cache_bytes), (4, 4 * per_sequence));
        for e in [&one, &four] {
            assert_eq!(
                e.required_bytes,
                e.weights_bytes + e.kv_cache_bytes + e.overhead_bytes
            );
            assert_eq!(e.available_bytes, 60 * GIB);
        }
        assert_eq!(four.required_bytes - one.required_bytes, 3 * per_sequence);
        assert_eq!(four.weights_bytes, one.weights_bytes, "weights are shared");

        if !footprint.cpu_path {
            // RBEE_CPU_KERNELS=0 in the environment: candle's path keeps no prompt cache store.
            return;
        }
        // The prompt cache's store comes on top, once per worker, whatever its slots.
        let store = Limits {
            worker_prompt_cache_bytes: 256 << 20,
            ..limits(4)
        };
        let cached = estimate_of("m", &cpu, &footprint, 0, store);
        assert_eq!(cached.prompt_cache_bytes, 256 << 20);
        assert_eq!(cached.required_bytes, four.required_bytes + (256 << 20));
        assert!(
            shortfall(&cached).contains(&format!("positions + {} prompt cache + ", 256 << 20)),
            "{}",
            shortfall(&cached)
        );
        assert!(
            shortfall(&four).contains(&format!(
                "{} KV cache for 4 sequences of {} positions",
                4 * per_sequence,
                footprint.context_length
            )),
            "{}",
            shortfall(&four)
        );
    }

    #[test]
    fn a_model_on_candles_path_needs_a_kv_cache_per_slot_and_no_store() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = device("cpu", 64 * GIB, 60 * GIB);
        let gpu = device("cuda:0", 24 * GIB, 20 * GIB);
        let q4 = tiny(
            model_gen::ModelFormat::Gguf(model_gen::GgufType::Q4_0),
            dir.path(),
        );
        // A head size the CPU path has no attention for.
        let wide = model_gen::ensure_generated(
            &model_gen::ModelSpec::small_wide_head(),
            model_gen::ModelFormat::Gguf(model_gen::GgufType::Q8_0),
            dir.path(),
        )
        .unwrap();
        let hub = tiny(model_gen::ModelFormat::Hub, dir.path());
        // A GPU, a wide head, a safetensors checkpoint: candle's path, which batches too.
        for (model, device) in [(&q4, &gpu), (&wide, &cpu), (&hub, &cpu)] {
            let footprint = footprint::of_path(model, device.kind, None).unwrap();
            assert!(!footprint.cpu_path, "{}", model.display());
            let store = Limits {
                worker_prompt_cache_bytes: 256 << 20,
                ..limits(4)
            };
            let estimate = estimate_of("m", device, &footprint, 0, store);
            assert_eq!(estimate.slots, 4, "{} on {}", model.display(), device.id);
            // candle's path keeps no store of prompt prefixes.
            assert_eq!(estimate.prompt_cache_bytes, 0);
            assert_eq!(
                estimate.kv_cache_bytes,
                4 * footprint.kv_bytes_per_position * footprint.context_length
            );
            assert_eq!(
                estimate.required_bytes,
                footprint.weights_bytes + estimate.kv_cache_bytes + estimate.overhead_bytes
            );
        }
    }

    #[test]
    fn the_shortfall_names_every_number() {
        let estimate = CapacityEstimate {
            device: "cuda:0".into(),
            model: "m.gguf".into(),
            required_bytes: 1_600,
            available_bytes: 1_000,
            weights_bytes: 1_000,
            kv_cache_bytes: 400,
            overhead_bytes: 200,
            context_length: 4096,
            slots: 2,
            prompt_cache_bytes: 0,
        };
        let body = no_capacity_body(estimate);
        assert_eq!(body.error.code, ErrorCode::NoCapacity);
        assert!(
            body.error
                .message
                .contains("400 KV cache for 2 sequences of 4096 positions"),
            "{}",
            body.error.message
        );
        for number in ["1600", "1000", "400", "200", "4096", "cuda:0", "m.gguf"] {
            assert!(
                body.error.message.contains(number),
                "{}",
                body.error.message
            );
        }
    }
}
