//! The capacity check on NVIDIA GPUs, with NVML's answers faked at the seam where the hive reads
//! them ([`Gpus`]): what a spawn on `cuda:N` is told on machines of different shapes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rbee_contract::{DeviceKind, ErrorCode};

use super::tests::limits;
use super::*;
use crate::HiveConfig;
use crate::devices::tests::{FakeGpus, gpu};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn children() -> Children {
    Children::new(
        Arc::new(HiveConfig::new("test-hive")),
        IpAddr::from([127, 0, 0, 1]),
        reqwest::Client::new(),
    )
}

/// The small generated llama model as a Q8_0 GGUF, in `dir`.
fn model(dir: &Path) -> PathBuf {
    model_gen::ensure_generated(
        &model_gen::ModelSpec::small(),
        model_gen::ModelFormat::Gguf(model_gen::GgufType::Q8_0),
        dir,
    )
    .unwrap()
}

fn question(model: &Path, device: &str) -> Question {
    Question {
        model_ref: "m.gguf".into(),
        model_path: model.to_owned(),
        device: device.into(),
    }
}

/// What a worker of `model` with `slots` slots needs on a GPU, counted independently of the
/// check: the file's tensors plus the token embedding in f32 (candle's path holds both), keys
/// and values in f32 for every layer and position of the context in each slot, and the CUDA
/// overhead.
fn needed_on_a_gpu(model: &Path, context: u64, slots: u64) -> u64 {
    let spec = model_gen::ModelSpec::small();
    let footprint = footprint::of_path(model, DeviceKind::Cuda, Some(context)).unwrap();
    let tensors = std::fs::metadata(model).unwrap().len();
    let embedding_f32 = (spec.vocab * spec.hidden * 4) as u64;
    let head_dim = (spec.hidden / spec.heads) as u64;
    let kv = 2 * spec.layers as u64 * spec.kv_heads as u64 * head_dim * 4;
    // The file is its tensors plus a header of a few KiB.
    assert!(footprint.weights_bytes <= tensors + embedding_f32);
    assert!(footprint.weights_bytes + 64 * 1024 > tensors + embedding_f32);
    footprint.weights_bytes + slots * kv * context + OVERHEAD_CUDA
}

#[test]
fn the_model_fits_on_the_larger_of_two_gpus_and_the_smaller_refuses_it_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let context = 1024;
    let limits = Limits {
        worker_ctx_size: Some(context),
        ..limits(4)
    };
    let needed = needed_on_a_gpu(&model, context, 4);
    // cuda:0 is a whole GPU one byte short of the model; cuda:1 has room for it once.
    let gpus = FakeGpus(vec![
        gpu("NVIDIA T4", needed + GIB, needed - 1),
        gpu("NVIDIA A10", needed + needed / 2, needed + needed / 2),
    ]);
    let (ledger, children) = (Arc::new(Ledger::default()), children());

    let (small, reservation) = evaluate(
        &ledger,
        &children,
        &gpus,
        &question(&model, "cuda:0"),
        limits,
        true,
    )
    .unwrap();
    assert!(reservation.is_none());
    assert!(!small.fits());
    assert_eq!(
        (small.required_bytes, small.available_bytes),
        (needed, needed - 1)
    );
    // candle's path on a GPU holds a KV cache of the whole context per slot.
    assert_eq!((small.slots, small.context_length), (4, context));
    assert!(needed > needed_on_a_gpu(&model, context, 1));
    assert_eq!(small.overhead_bytes, OVERHEAD_CUDA);
    let message = shortfall(&small);
    assert!(
        message.starts_with("`m.gguf` does not fit on cuda:0: it needs ")
            && message.contains(&format!("needs {needed} bytes"))
            && message.contains(&format!("{} bytes are available", needed - 1))
            && message.contains(&format!("4 sequences of {context} positions")),
        "{message}"
    );

    let (large, reservation) = evaluate(
        &ledger,
        &children,
        &gpus,
        &question(&model, "cuda:1"),
        limits,
        true,
    )
    .unwrap();
    assert!(large.fits() && reservation.is_some());
    assert_eq!(large.required_bytes, needed);
    assert_eq!(large.available_bytes, needed + needed / 2);

    // While that spawn holds its memory, a second one does not fit there, though NVML still
    // shows the memory free (the first worker has not allocated it yet).
    let (second, none) = evaluate(
        &ledger,
        &children,
        &gpus,
        &question(&model, "cuda:1"),
        limits,
        true,
    )
    .unwrap();
    assert!(!second.fits() && none.is_none());
    assert_eq!(second.available_bytes, needed / 2);
    drop(reservation);
    let (again, _) = evaluate(
        &ledger,
        &children,
        &gpus,
        &question(&model, "cuda:1"),
        limits,
        false,
    )
    .unwrap();
    assert!(again.fits(), "the memory is back once the spawn ends");
}

#[test]
fn the_context_counts_on_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let gpus = FakeGpus(vec![gpu("NVIDIA L4", 24 * GIB, 22 * GIB)]);
    let (ledger, children) = (Arc::new(Ledger::default()), children());
    let estimate = |context| {
        let limits = Limits {
            worker_ctx_size: Some(context),
            ..limits(1)
        };
        evaluate(
            &ledger,
            &children,
            &gpus,
            &question(&model, "cuda:0"),
            limits,
            false,
        )
        .unwrap()
        .0
    };
    let (short, long) = (estimate(128), estimate(1024));
    assert_eq!(short.required_bytes, needed_on_a_gpu(&model, 128, 1));
    assert_eq!(long.required_bytes, needed_on_a_gpu(&model, 1024, 1));
    assert_eq!(long.weights_bytes, short.weights_bytes);
    assert_eq!(long.kv_cache_bytes, 8 * short.kv_cache_bytes);
}

#[test]
fn a_gpu_smaller_than_the_model_refuses_it_and_the_reserve_comes_off_the_free_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    // All of it free, and still less than the CUDA context alone.
    let gpus = FakeGpus(vec![gpu("NVIDIA Jetson", 512 * MIB, 512 * MIB)]);
    let (ledger, children) = (Arc::new(Ledger::default()), children());
    let (estimate, reservation) = evaluate(
        &ledger,
        &children,
        &gpus,
        &question(&model, "cuda:0"),
        limits(1),
        true,
    )
    .unwrap();
    assert!(!estimate.fits() && reservation.is_none());
    assert_eq!(estimate.available_bytes, 512 * MIB);
    assert!(estimate.required_bytes > estimate.weights_bytes + OVERHEAD_CUDA);
    let body = no_capacity_body(estimate.clone());
    assert_eq!(body.error.code, ErrorCode::NoCapacity);
    assert!(
        body.error.message.contains(&format!(
            "it needs {} bytes ({} weights",
            estimate.required_bytes, estimate.weights_bytes
        )) && body.error.message.contains("536870912 bytes are available"),
        "{}",
        body.error.message
    );

    // `--memory-reserve` is kept back on GPUs as on the CPU.
    let reserved = Limits {
        memory_reserve: 100 * MIB,
        ..limits(1)
    };
    let (estimate, _) = evaluate(
        &ledger,
        &children,
        &gpus,
        &question(&model, "cuda:0"),
        reserved,
        false,
    )
    .unwrap();
    assert_eq!(estimate.available_bytes, 412 * MIB);
}

#[test]
fn without_a_driver_a_cuda_device_is_unknown_and_the_cpu_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let none = FakeGpus(Vec::new());
    let (ledger, children) = (Arc::new(Ledger::default()), children());
    let err = evaluate(
        &ledger,
        &children,
        &none,
        &question(&model, "cuda:0"),
        limits(1),
        false,
    )
    .err()
    .expect("an unknown device is an error");
    assert_eq!(
        err.to_string(),
        "this hive has no device `cuda:0`; it has cpu"
    );
    assert!(
        evaluate(
            &ledger,
            &children,
            &none,
            &question(&model, "cpu"),
            limits(1),
            false
        )
        .is_ok()
    );

    let two = FakeGpus(vec![
        gpu("NVIDIA L4", 24 * GIB, 22 * GIB),
        gpu("NVIDIA L4", 24 * GIB, 22 * GIB),
    ]);
    let err = evaluate(
        &ledger,
        &children,
        &two,
        &question(&model, "cuda:2"),
        limits(1),
        false,
    )
    .err()
    .expect("an unknown device is an error");
    assert_eq!(
        err.to_string(),
        "this hive has no device `cuda:2`; it has cpu, cuda:0, cuda:1"
    );
}

#[test]
fn a_file_larger_than_the_gpu_is_refused_before_it_is_downloaded() {
    let gpus = FakeGpus(vec![
        gpu("NVIDIA T4", 16 * GIB, 15 * GIB),
        gpu("NVIDIA H100", 80 * GIB, 79 * GIB),
    ]);
    let (ledger, children) = (Ledger::default(), children());
    let refusal = |device: &str| {
        file_refusal(
            &ledger,
            &children,
            &gpus,
            device,
            "hf:org/big",
            20 * GIB,
            limits(1),
        )
    };
    let message = refusal("cuda:0").expect("20 GiB does not fit in 15");
    assert_eq!(
        message,
        format!(
            "`hf:org/big` does not fit on cuda:0, so it was not downloaded: its file alone needs \
             {} bytes ({} weights + {OVERHEAD_CUDA} overhead, before the KV cache) and {} bytes \
             are available",
            20 * GIB + OVERHEAD_CUDA,
            20 * GIB,
            15 * GIB
        )
    );
    assert_eq!(refusal("cuda:1"), None);
    // A device the hive does not have is left to the full check, which lists the devices.
    assert_eq!(refusal("cuda:2"), None);
}
