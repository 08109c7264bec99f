//! How much memory a worker needs for a model file, read from the file's header only (a GGUF
//! header, or a safetensors checkpoint's `config.json` and file sizes), never its weights.
//!
//! The rules follow what the worker's engine does with the file: GGUF tensors are kept as
//! stored (candle's path also dequantizes the token embedding to f32 for lookups and holds F16
//! and BF16 tensors in f32; the engine's own CPU path does neither), keys and values are cached
//! in f32; a safetensors
//! checkpoint is converted to f32 on the CPU and to f16/bf16 on a GPU. The context is the one
//! the worker will run with: the hive's `--worker-ctx-size` or else the trained context, capped
//! where candle's code has a fixed limit, by the engine's own rule
//! ([`gguf_info::context::context_length`]). The engine's CPU path sets a cache's room for the
//! whole context aside the first time it is fed and never grows it further, so what is counted
//! here is what a slot holds at most.
//!
//! A worker decodes up to its `--slots` sequences at once, each with its own KV cache, on either
//! forward path: the engine's own CPU path (a GGUF on the CPU whose matrices all have its
//! kernels) and candle's path (GPUs, safetensors checkpoints, the other GGUF files). So a
//! `cuda:N` spawn needs the weights plus every slot's KV cache of the whole context.
//! [`Footprint::cpu_path`] says which path, by the rule the engine loads by
//! ([`gguf_info::runs_on_cpu_path`]): it decides the weights' size, the context's cap and
//! whether the worker keeps a prompt cache store.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use gguf_info::{GgmlType, Header};
use rbee_contract::DeviceKind;

/// What a model takes once loaded, apart from the fixed overhead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Footprint {
    pub weights_bytes: u64,
    /// Keys and values of one position, over every layer.
    pub kv_bytes_per_position: u64,
    pub context_length: u64,
    /// Whether the worker runs the model on the engine's CPU path (which holds the weights once
    /// and keeps a prompt cache store); otherwise candle's path runs it.
    pub cpu_path: bool,
}

impl Footprint {
    /// The KV caches a worker with `worker_slots` slots holds for this model: one per slot, on
    /// either path.
    pub fn slots(&self, worker_slots: u32) -> u32 {
        worker_slots.max(1)
    }

    /// The KV caches of `slots` sequences at the full context.
    pub fn kv_cache_bytes(&self, slots: u32) -> u64 {
        self.kv_bytes_per_position
            .saturating_mul(self.context_length)
            .saturating_mul(u64::from(slots))
    }
}

/// The footprint of the model at `path` (a `.gguf` file, or a safetensors checkpoint given as
/// its directory or a file in it) on a device of `kind`, for a worker whose `--ctx-size` is
/// `ctx_size` (`None`: the trained context). Blocking.
pub(crate) fn of_path(
    path: &Path,
    kind: DeviceKind,
    ctx_size: Option<u64>,
) -> Result<Footprint, String> {
    if is_gguf(path) {
        gguf(path, kind, ctx_size)
    } else {
        safetensors(path, kind, ctx_size)
    }
}

/// The engine's test: a file named `.gguf`, or any file starting with the GGUF magic.
fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    let named = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let mut magic = [0u8; 4];
    named
        || File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|()| &magic == b"GGUF")
}

/// Bytes of one f32, the type candle's quantized models compute and cache in.
const F32_BYTES: u64 = 4;

fn gguf(path: &Path, kind: DeviceKind, ctx_size: Option<u64>) -> Result<Footprint, String> {
    let file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let header = Header::read(&mut BufReader::new(file))
        .map_err(|e| format!("it is not a readable GGUF file: {e}"))?;
    // A type nothing computes is refused here by name, before any worker is spawned for it.
    if let Some(refusal) = gguf_info::uncomputed_tensor(&header) {
        return Err(refusal);
    }
    let arch = header
        .architecture()
        .ok_or("the GGUF file has no general.architecture")?
        .to_owned();
    let number = |key: &str| header.count(&format!("{arch}.{key}"));
    let required = |key: &str| number(key).ok_or(format!("the GGUF file has no {arch}.{key}"));
    let layers = required("block_count")?;
    let hidden = required("embedding_length")?;
    let heads = required("attention.head_count")?;
    let kv_heads = number("attention.head_count_kv").unwrap_or(heads);
    if heads == 0 {
        return Err(format!("{arch}.attention.head_count is 0"));
    }
    let head_dim = number("attention.key_length").unwrap_or(hidden / heads);

    // The engine's CPU path holds the file's tensor data once; candle's path also holds the
    // token embedding dequantized, for the lookup.
    let cpu_path = kind == DeviceKind::Cpu && gguf_info::runs_on_cpu_path(&header);
    let requested = ctx_size.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let context_length = gguf_info::context::context_length(&header, cpu_path, requested)
        .ok_or(format!("the GGUF file has no {arch}.context_length"))?
        as u64;
    // Every type is computed (checked above), so every size is known.
    let mut weights_bytes = header.tensor_bytes();
    if !cpu_path {
        if let Some(embedding) = header.tensor("token_embd.weight") {
            weights_bytes =
                weights_bytes.saturating_add(embedding.elements().saturating_mul(F32_BYTES));
        }
        // candle holds float tensors in f32 (its QMatMul dequantizes F16 and BF16 at load).
        weights_bytes = header
            .tensors()
            .iter()
            .filter(|t| t.ty == GgmlType::F16 || t.ty == GgmlType::BF16)
            .map(|t| t.elements().saturating_mul(F32_BYTES - 2))
            .fold(weights_bytes, u64::saturating_add);
    }
    Ok(Footprint {
        weights_bytes,
        // Counts from the header: a hostile one saturates the estimate (and so is refused
        // room) rather than overflow.
        kv_bytes_per_position: [2, layers, kv_heads, head_dim, F32_BYTES]
            .into_iter()
            .fold(1, u64::saturating_mul),
        context_length,
        cpu_path,
    })
}

/// A safetensors llama checkpoint: `config.json` gives the shape, the `.safetensors` files'
/// sizes the weights as stored, converted to the type the engine computes in on `kind`.
fn safetensors(path: &Path, kind: DeviceKind, ctx_size: Option<u64>) -> Result<Footprint, String> {
    let dir: PathBuf = if path.is_dir() {
        path.to_owned()
    } else {
        path.parent().map(Path::to_owned).unwrap_or_default()
    };
    let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| {
        format!("it is neither a GGUF file nor a checkpoint with a readable config.json ({e})")
    })?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("its config.json is not JSON: {e}"))?;
    let number = |key: &str| config.get(key).and_then(serde_json::Value::as_u64);
    let required = |key: &str| number(key).ok_or(format!("its config.json has no `{key}`"));
    let layers = required("num_hidden_layers")?;
    let hidden = required("hidden_size")?;
    let heads = required("num_attention_heads")?;
    let kv_heads = number("num_key_value_heads").unwrap_or(heads);
    if heads == 0 {
        return Err("its config.json has 0 attention heads".into());
    }
    let head_dim = number("head_dim").unwrap_or(hidden / heads);
    // candle's llama holds at most its trained context, as the engine caps it.
    let trained = required("max_position_embeddings")?;
    let context_length = ctx_size
        .filter(|&n| n > 0)
        .map_or(trained, |n| n.min(trained));

    let declared = config.get("torch_dtype").and_then(|v| v.as_str());
    let stored = match declared {
        Some("float16" | "bfloat16") => 2,
        _ => 4,
    };
    let computed = compute_bytes(declared, kind);
    let mut stored_bytes = 0u64;
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list it: {e}"))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            stored_bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    if stored_bytes == 0 {
        return Err("it has no .safetensors file".into());
    }
    Ok(Footprint {
        weights_bytes: stored_bytes / stored * computed,
        kv_bytes_per_position: 2 * layers * kv_heads * head_dim * computed,
        context_length,
        cpu_path: false,
    })
}

/// Bytes per element of the type the engine converts a checkpoint to: f32 on the CPU and for
/// checkpoints declared f32; f16 or bf16 on a GPU.
fn compute_bytes(declared: Option<&str>, kind: DeviceKind) -> u64 {
    match (kind, declared) {
        (DeviceKind::Cpu, _) => 4,
        (_, Some("float16" | "bfloat16")) => 2,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use model_gen::{GgufType, ModelFormat, ModelSpec};

    use super::*;

    /// A header whose counts multiply past 64 bits gives a saturated estimate, not a panic (the
    /// estimate of a running worker's model is made under the ledger's lock).
    #[test]
    fn a_hostile_header_saturates_the_estimate() {
        let mut b = b"GGUF".to_vec();
        let u64s = |b: &mut Vec<u8>, n: u64| b.extend_from_slice(&n.to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        b.extend_from_slice(&3u32.to_le_bytes());
        u64s(&mut b, 0);
        u64s(&mut b, 4);
        string(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, "llama");
        for (key, n) in [
            ("llama.block_count", 1 << 62),
            ("llama.embedding_length", 64),
            ("llama.attention.head_count", 1),
        ] {
            string(&mut b, key);
            b.extend_from_slice(&10u32.to_le_bytes());
            u64s(&mut b, n);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostile.gguf");
        std::fs::write(&path, &b).unwrap();
        for kind in [DeviceKind::Cpu, DeviceKind::Cuda] {
            let footprint = of_path(&path, kind, None).unwrap();
            assert_eq!(footprint.kv_bytes_per_position, u64::MAX);
            assert_eq!(footprint.kv_cache_bytes(4), u64::MAX);
        }
    }

    #[test]
    fn a_gguf_footprint_comes_from_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::tiny();
        let path = model_gen::ensure_generated(&spec, ModelFormat::Gguf(GgufType::F32), dir.path())
            .unwrap();
        let footprint = of_path(&path, DeviceKind::Cpu, None).unwrap();
        let (layers, kv_heads, head_dim) = (
            spec.layers as u64,
            spec.kv_heads as u64,
            (spec.hidden / spec.heads) as u64,
        );
        assert_eq!(
            footprint.kv_bytes_per_position,
            2 * layers * kv_heads * head_dim * 4
        );
        assert_eq!(footprint.context_length, spec.context_length as u64);
        // F32 tensors: the file is header plus data; candle's code holds the embedding twice.
        let file = std::fs::metadata(&path).unwrap().len();
        let embedding = if footprint.cpu_path {
            0
        } else {
            (spec.vocab * spec.hidden * 4) as u64
        };
        assert!(
            footprint.weights_bytes <= file + embedding,
            "{footprint:?} vs {file}"
        );
        assert!(footprint.weights_bytes + 64 * 1024 >= file + embedding);
    }

    #[test]
    fn a_safetensors_footprint_converts_to_the_compute_type() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::tiny();
        let model = model_gen::ensure_generated(&spec, ModelFormat::Hub, dir.path()).unwrap();
        let cpu = of_path(&model, DeviceKind::Cpu, None).unwrap();
        assert_eq!(cpu.context_length, spec.context_length as u64);
        let head_dim = (spec.hidden / spec.heads) as u64;
        assert_eq!(
            cpu.kv_bytes_per_position,
            2 * spec.layers as u64 * spec.kv_heads as u64 * head_dim * 4
        );
        assert!(cpu.weights_bytes > 0);
        assert_eq!(compute_bytes(Some("bfloat16"), DeviceKind::Cuda), 2);
        assert_eq!(compute_bytes(Some("bfloat16"), DeviceKind::Cpu), 4);
        assert_eq!(compute_bytes(None, DeviceKind::Metal), 4);
    }

    #[test]
    fn only_a_gguf_with_kernel_types_on_the_cpu_is_on_the_cpu_path() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::tiny();
        let file =
            |ty| model_gen::ensure_generated(&spec, ModelFormat::Gguf(ty), dir.path()).unwrap();
        let kernels = !std::env::var("RBEE_CPU_KERNELS")
            .is_ok_and(|v| matches!(v.trim(), "0" | "false" | "off"));
        let qwen2 = model_gen::ensure_generated(
            &ModelSpec::tiny_qwen2(),
            ModelFormat::Gguf(GgufType::Q8_0),
            dir.path(),
        )
        .unwrap();
        let gemma3 = model_gen::ensure_generated(
            &ModelSpec::tiny_arch(model_gen::Arch::Gemma3),
            ModelFormat::Gguf(GgufType::Q8_0),
            dir.path(),
        )
        .unwrap();
        let float = [file(GgufType::F32), file(GgufType::F16)];
        for path in [file(GgufType::Q4_0), file(GgufType::Q8_0), qwen2, gemma3]
            .into_iter()
            .chain(float)
        {
            let cpu = of_path(&path, DeviceKind::Cpu, None).unwrap();
            assert_eq!(cpu.cpu_path, kernels);
            let cuda = of_path(&path, DeviceKind::Cuda, None).unwrap();
            assert!(!cuda.cpu_path);
            assert!(!of_path(&path, DeviceKind::Metal, None).unwrap().cpu_path);
            // The CPU path holds the tensors once; candle's path adds an f32 embedding, and
            // holds F16 tensors in f32.
            let embedding = (spec.vocab * spec.hidden * 4) as u64;
            let header = Header::open(&path).unwrap();
            let f16_elements: u64 = header
                .tensors()
                .iter()
                .filter(|t| t.ty == GgmlType::F16)
                .map(|t| t.elements())
                .sum();
            if path.file_name().unwrap() == "model-f16.gguf" {
                assert!(f16_elements > 0, "an F16 file's matrices are F16");
            }
            if kernels {
                assert_eq!(
                    cpu.weights_bytes + embedding + 2 * f16_elements,
                    cuda.weights_bytes
                );
            }
        }
        // A head size the CPU path has no attention for.
        let wide = model_gen::ensure_generated(
            &ModelSpec::small_wide_head(),
            ModelFormat::Gguf(GgufType::Q8_0),
            dir.path(),
        )
        .unwrap();
        assert!(!of_path(&wide, DeviceKind::Cpu, None).unwrap().cpu_path);
        let hub = model_gen::ensure_generated(&spec, ModelFormat::Hub, dir.path()).unwrap();
        assert!(!of_path(&hub, DeviceKind::Cpu, None).unwrap().cpu_path);

        // Either path holds a KV cache per slot.
        let footprint = Footprint {
            weights_bytes: 1,
            kv_bytes_per_position: 10,
            context_length: 100,
            cpu_path: true,
        };
        assert_eq!(footprint.slots(4), 4);
        assert_eq!(footprint.slots(0), 1);
        assert_eq!(footprint.kv_cache_bytes(4), 4_000);
        let candle = Footprint {
            cpu_path: false,
            ..footprint
        };
        assert_eq!(candle.slots(4), 4);
    }

    #[test]
    fn the_context_is_the_workers_by_the_engines_rule() {
        let dir = tempfile::tempdir().unwrap();
        // Trained for more positions than candle's llama holds (4096).
        let spec = ModelSpec {
            context_length: 16384,
            ..ModelSpec::tiny()
        };
        let q8 = model_gen::ensure_generated(&spec, ModelFormat::Gguf(GgufType::Q8_0), dir.path())
            .unwrap();
        let context = |kind, ctx_size| of_path(&q8, kind, ctx_size).unwrap().context_length;
        if of_path(&q8, DeviceKind::Cpu, None).unwrap().cpu_path {
            // The engine's CPU path: the trained context, or the one asked for, even beyond it.
            assert_eq!(context(DeviceKind::Cpu, None), 16384);
            assert_eq!(context(DeviceKind::Cpu, Some(0)), 16384);
            assert_eq!(context(DeviceKind::Cpu, Some(6000)), 6000);
            assert_eq!(context(DeviceKind::Cpu, Some(20000)), 20000);
        }
        // candle's llama, which a GPU runs: at most 4096.
        assert_eq!(context(DeviceKind::Cuda, None), 4096);
        assert_eq!(context(DeviceKind::Cuda, Some(20000)), 4096);
        assert_eq!(context(DeviceKind::Cuda, Some(1000)), 1000);

        // A safetensors checkpoint: at most its trained context.
        let hub = model_gen::ensure_generated(&spec, ModelFormat::Hub, dir.path()).unwrap();
        let hub_context = |ctx_size| {
            of_path(&hub, DeviceKind::Cpu, ctx_size)
                .unwrap()
                .context_length
        };
        assert_eq!(hub_context(None), 16384);
        assert_eq!(hub_context(Some(6000)), 6000);
        assert_eq!(hub_context(Some(20000)), 16384);

        // The KV caches counted are of that context.
        let sized = of_path(&q8, DeviceKind::Cuda, Some(1000)).unwrap();
        assert_eq!(sized.kv_cache_bytes(1), sized.kv_bytes_per_position * 1000);
    }

    /// A file with a tensor of a type nothing in rbee computes is refused before a worker is
    /// spawned, naming the tensor and the type (candle's header reader would either read it, for
    /// Q8_1, or name only the type's number, for an IQ type).
    #[test]
    fn a_type_rbee_does_not_compute_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = model_gen::ensure_generated(
            &ModelSpec::tiny(),
            ModelFormat::Gguf(GgufType::Q8_1),
            dir.path(),
        )
        .unwrap();
        let err = of_path(&path, DeviceKind::Cpu, None).unwrap_err();
        assert!(
            err.contains("is Q8_1, a type rbee does not compute"),
            "{err}"
        );
    }

    #[test]
    fn files_that_are_not_models_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"not a model").unwrap();
        let err = of_path(&junk, DeviceKind::Cpu, None).unwrap_err();
        assert!(err.contains("not a readable GGUF file"), "{err}");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"hello").unwrap();
        let err = of_path(&text, DeviceKind::Cpu, None).unwrap_err();
        assert!(err.contains("config.json"), "{err}");
    }
}
