//! GGUF output: llama.cpp tensor names and metadata, quantized by candle, streamed to disk one
//! tensor at a time.
//!
//! candle's own `gguf_file::write` needs every tensor in memory at once and stamps version 2;
//! this writer lays out the same bytes (32-byte alignment, tensor infos, padded data) as
//! version 3, and generates and quantizes each tensor only when its data is written, so a
//! TinyLlama-sized file needs one tensor's worth of memory.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::Error;
use crate::spec::{Arch, ModelSpec, RopeScaling};
use crate::tokenizer::Vocab;
use crate::weights::{Role, TensorDef, tensor_defs};

const GGUF_MAGIC: u32 = 0x4655_4747;
const GGUF_VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// The weight type of a GGUF file. Norm scales, biases and RoPE factors stay F32 in every
/// file.
///
/// Quantized files follow llama.cpp's choices where they matter: a matrix whose rows do not
/// split into the type's blocks falls back (Q2_K and Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to
/// Q5_1, Q6_K to Q8_0, then anything to F16). In the Q4_0 and Q4_K files the output head (the
/// embedding when tied) is Q8_0; [`GgufType::Q6K`], [`GgufType::Q4KM`], [`GgufType::Q5KM`],
/// [`GgufType::Q5_0`], [`GgufType::Q2K`] and [`GgufType::Q3KM`] pick every tensor's type as
/// llama.cpp's quantizer does for `MOSTLY_Q6_K`, `MOSTLY_Q4_K_M`, `MOSTLY_Q5_K_M`,
/// `MOSTLY_Q5_0`, `MOSTLY_Q2_K` and `MOSTLY_Q3_K_M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4K,
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K matrices; Q6_K for the output head (the embedding when
    /// tied) and for `attn_v` (`attn_qkv` when fused) and `ffn_down` on the layers
    /// llama.cpp's `use_more_bits` picks (the first and last eighth and every third layer
    /// between); an untied embedding stays Q4_K.
    Q4KM,
    /// Q5_K matrices (the output head Q6_K), like llama.cpp's `MOSTLY_Q5_K_S`.
    Q5K,
    /// llama.cpp's Q5_K_M mix: as Q4_K_M with Q5_K in place of Q4_K.
    Q5KM,
    /// llama.cpp's `MOSTLY_Q5_0`: Q5_0 matrices (an untied embedding too), the output head
    /// Q6_K; a file of mixed 32- and 256-element block types.
    Q5_0,
    /// Q8_1 matrices, a type no llama.cpp preset writes and nothing computes as weights (the
    /// engine's CPU path has no kernel for it, candle's model code cannot load it, and rbee
    /// refuses it at load by name): tests use it for a file of an uncomputed type.
    Q8_1,
    /// BF16 matrices, like llama.cpp's `MOSTLY_BF16` (the converter's `--outtype bf16`).
    BF16,
    /// llama.cpp's Q2_K mix (`MOSTLY_Q2_K`): Q2_K matrices (an untied embedding too); Q3_K for
    /// `attn_output`, `ffn_down` and `attn_v` (Q4_K when four or more query heads share a KV
    /// head); the output head Q6_K.
    Q2K,
    /// llama.cpp's Q3_K_M mix: Q3_K matrices; Q4_K for `attn_output` and for `attn_v` and
    /// `ffn_down` past the first layers (Q5_K for `attn_v` of layers 0 and 1 and `ffn_down` of
    /// the first sixteenth); the output head Q6_K.
    Q3KM,
}

impl GgufType {
    pub const ALL: [GgufType; 14] = [
        Self::F32,
        Self::F16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4K,
        Self::Q6K,
        Self::Q4KM,
        Self::Q5K,
        Self::BF16,
        Self::Q2K,
        Self::Q3KM,
        Self::Q5KM,
        Self::Q5_0,
        Self::Q8_1,
    ];

    /// Lowercase name as used on the command line and in file names (`q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
            Self::Q4KM => "q4_k_m",
            Self::Q5K => "q5_k",
            Self::BF16 => "bf16",
            Self::Q2K => "q2_k",
            Self::Q3KM => "q3_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q5_0 => "q5_0",
            Self::Q8_1 => "q8_1",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`). Q4_K files are all-Q4_K like
    /// `MOSTLY_Q4_K_S`; Q8_1 files have no llama.cpp type and say so (`GUESSED`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q2K => 10,
            Self::Q3KM => 12,
            Self::Q4K => 14,
            Self::Q4KM => 15,
            Self::Q5K => 16,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::BF16 => 32,
            Self::Q8_1 => 1024,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// The dtype one tensor gets in a file of this type.
    pub(crate) fn dtype_for(self, def: &TensorDef, spec: &ModelSpec) -> GgmlDType {
        use GgmlDType as G;
        let is_head =
            def.role == Role::Output || (spec.tie_embeddings && def.role == Role::Embedding);
        let fits = |dtype: GgmlDType| def.cols().is_multiple_of(dtype.block_size());
        let wanted = match (self, def.role) {
            (_, Role::Norm | Role::OutputNorm | Role::Bias | Role::RopeFactors) => {
                return G::F32;
            }
            (Self::F32, _) => G::F32,
            (Self::F16, _) => G::F16,
            (Self::BF16, _) => G::BF16,
            (Self::Q8_0, _) => G::Q8_0,
            (Self::Q8_1, _) => G::Q8_1,
            (Self::Q4_0 | Self::Q4K, _) if is_head => G::Q8_0,
            (Self::Q4_0, _) => G::Q4_0,
            (Self::Q4K, _) => G::Q4K,
            // The quantizer's output rule: Q6_K when the rows hold 256-blocks, else Q8_0.
            (
                Self::Q6K
                | Self::Q4KM
                | Self::Q5K
                | Self::Q5KM
                | Self::Q5_0
                | Self::Q2K
                | Self::Q3KM,
                _,
            ) if is_head => {
                return if fits(G::Q6K) { G::Q6K } else { G::Q8_0 };
            }
            (Self::Q6K, _) => G::Q6K,
            (Self::Q5K, _) => G::Q5K,
            (Self::Q5_0, _) => G::Q5_0,
            (Self::Q2K, _) => match def.category() {
                Category::AttnV if spec.heads / spec.kv_heads >= 4 => G::Q4K,
                Category::AttnV | Category::AttnOutput | Category::FfnDown => G::Q3K,
                Category::Other => G::Q2K,
            },
            (Self::Q3KM, _) => match (def.category(), def.layer()) {
                (Category::AttnV, Some(layer)) if layer < 2 => G::Q5K,
                (Category::FfnDown, Some(layer)) if layer < spec.layers / 16 => G::Q5K,
                (Category::AttnV | Category::AttnOutput | Category::FfnDown, _) => G::Q4K,
                _ => G::Q3K,
            },
            (Self::Q4KM | Self::Q5KM, _) => match (def.category(), def.layer()) {
                (Category::AttnV | Category::FfnDown, Some(layer))
                    if use_more_bits(layer, spec.layers) =>
                {
                    G::Q6K
                }
                _ if self == Self::Q5KM => G::Q5K,
                _ => G::Q4K,
            },
        };
        if fits(wanted) {
            wanted
        } else if wanted == G::Q4K && fits(G::Q5_0) {
            G::Q5_0
        } else if wanted == G::Q5K && fits(G::Q5_1) {
            G::Q5_1
        } else if matches!(wanted, G::Q2K | G::Q3K) && fits(G::Q4_0) {
            G::Q4_0
        } else if wanted == G::Q6K && fits(G::Q8_0) {
            G::Q8_0
        } else {
            G::F16
        }
    }
}

/// llama.cpp's tensor categories for quantization, by name as its quantizer tells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    /// `attn_v` or a fused `attn_qkv`: llama.cpp treats both as the value projection.
    AttnV,
    AttnOutput,
    FfnDown,
    Other,
}

impl TensorDef {
    pub(crate) fn category(&self) -> Category {
        let name = self.gguf_name.as_str();
        if name.contains("attn_qkv.weight") || name.contains("attn_v.weight") {
            Category::AttnV
        } else if name.contains("attn_output") {
            Category::AttnOutput
        } else if name.contains("ffn_down") {
            Category::FfnDown
        } else {
            Category::Other
        }
    }

    /// The block index of a `blk.N.` tensor.
    pub(crate) fn layer(&self) -> Option<usize> {
        let rest = self.gguf_name.strip_prefix("blk.")?;
        rest.split('.').next()?.parse().ok()
    }
}

/// llama.cpp's quantizer gives these layers' `attn_v` and `ffn_down` more bits: the first
/// and last eighth, and every third layer between.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GgufType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::UnknownName(format!(
                    "unknown GGUF type {s:?} (expected f32, f16, bf16, q8_0, q4_0, q4_k, q6_k, q4_k_m, q5_k, q5_k_m, q5_0, q2_k, q3_k_m or q8_1)"
                ))
            })
    }
}

/// The metadata of a GGUF file for `spec`, in the order it is written: the keys llama.cpp's
/// converter writes for the family, then the quantizer's, then the vocabulary's.
pub fn gguf_metadata(spec: &ModelSpec, ty: GgufType) -> Vec<(String, Value)> {
    let arch = spec.arch.gguf_name();
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.name".into(), Value::String(spec.display_name())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
    ];
    if ty.is_quantized() {
        md.push(("general.quantization_version".into(), Value::U32(2)));
    }
    md.extend(
        arch_keys(spec)
            .into_iter()
            .map(|(k, v)| (format!("{arch}.{k}"), v)),
    );
    md.extend(tokenizer_metadata(spec));
    md
}

/// `{arch}.*` keys (without the prefix).
fn arch_keys(spec: &ModelSpec) -> Vec<(&'static str, Value)> {
    let u32v = |v: usize| Value::U32(v as u32);
    let f32v = |v: f64| Value::F32(v as f32);
    let head_lengths = [
        ("attention.key_length", u32v(spec.head_dim())),
        ("attention.value_length", u32v(spec.head_dim())),
    ];
    let sizes = [
        ("context_length", u32v(spec.context_length)),
        ("embedding_length", u32v(spec.hidden)),
        ("block_count", u32v(spec.layers)),
        ("feed_forward_length", u32v(spec.ffn)),
        ("attention.head_count", u32v(spec.heads)),
        ("attention.head_count_kv", u32v(spec.kv_heads)),
    ];
    let eps = ("attention.layer_norm_rms_epsilon", f32v(spec.rms_eps));
    let mut keys = Vec::new();
    match spec.arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {
            keys.extend(sizes);
            keys.extend([
                eps,
                ("rope.dimension_count", u32v(spec.head_dim())),
                ("rope.freq_base", f32v(spec.rope_theta)),
                ("vocab_size", u32v(spec.vocab)),
            ]);
            if spec.explicit_head_dim.is_some() {
                keys.extend(head_lengths);
            }
        }
        // Gemma 2's converter writes no rope keys: llama.cpp's default base (10 000) applies
        // to every layer.
        Arch::Gemma2 => {
            keys.extend(sizes);
            keys.push(eps);
            keys.extend(head_lengths);
            if let Some(cap) = spec.attn_softcap {
                keys.push(("attn_logit_softcapping", Value::F32(cap)));
            }
            if let Some(cap) = spec.final_softcap {
                keys.push(("final_logit_softcapping", Value::F32(cap)));
            }
            if let Some(window) = spec.sliding_window {
                keys.push(("attention.sliding_window", u32v(window)));
            }
        }
        // Gemma 3's `rope.freq_base` is the global layers'; the converter writes no base for
        // the local ones, so llama.cpp uses its default 10 000 there.
        Arch::Gemma3 => {
            keys.extend(sizes);
            keys.extend([("rope.freq_base", f32v(spec.rope_theta)), eps]);
            keys.extend(head_lengths);
            if let Some(cap) = spec.final_softcap {
                keys.push(("final_logit_softcapping", Value::F32(cap)));
            }
            if let Some(window) = spec.sliding_window {
                keys.push(("attention.sliding_window", u32v(window)));
            }
            // Gemma 3 4B/12B/27B configs carry `rope_scaling: {rope_type: linear, factor: 8}`,
            // which the converter writes as these two keys; llama.cpp applies it to the global
            // layers only.
            if let Some(factor) = spec.rope_linear_factor {
                keys.extend([
                    ("rope.scaling.type", Value::String("linear".into())),
                    ("rope.scaling.factor", Value::F32(factor)),
                ]);
            }
        }
        Arch::Phi3 => {
            keys.push(sizes[0].clone());
            if let RopeScaling::LongRope { original_context } = spec.rope_scaling {
                keys.push((
                    "rope.scaling.original_context_length",
                    u32v(original_context),
                ));
            }
            keys.extend(sizes[1..].iter().cloned());
            keys.extend([
                eps,
                ("rope.dimension_count", u32v(spec.head_dim())),
                ("rope.freq_base", f32v(spec.rope_theta)),
            ]);
            if spec.explicit_head_dim.is_some() {
                keys.extend(head_lengths);
            }
            // Phi-3 mini and 3.5 configs carry a sliding window, which llama.cpp ignores
            // (with a warning); the window here spans the whole context.
            keys.push(("attention.sliding_window", u32v(spec.context_length)));
            if let Some(factor) = spec.longrope_attn_factor() {
                keys.push(("rope.scaling.attn_factor", Value::F32(factor)));
            }
        }
    }
    keys
}

/// `tokenizer.ggml.*` keys and the chat template.
fn tokenizer_metadata(spec: &ModelSpec) -> Vec<(String, Value)> {
    let vocab = Vocab::for_spec(spec);
    let format = vocab.format;
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let (bos, eos, unk, pad) = (
        vocab.bos_id(),
        vocab.eos_id(),
        vocab.unk_id(),
        vocab.pad_id(),
    );
    let mut md = vec![(
        "tokenizer.ggml.model".to_string(),
        Value::String("llama".into()),
    )];
    if spec.arch == Arch::Phi3 {
        md.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
    }
    md.extend([
        ("tokenizer.ggml.tokens".into(), strings(vocab.tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(vocab.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.token_types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(unk)),
    ]);
    if let Some(pad) = pad {
        md.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(pad)));
    }
    md.extend([
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(format.add_bos()),
        ),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ]);
    if !format.add_space_prefix() {
        md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    }
    md.push((
        "tokenizer.chat_template".into(),
        Value::String(format.chat_template().into()),
    ));
    md
}

/// Writes `spec` as a GGUF v3 file of type `ty`. The file appears at `path` only once complete
/// (it is written beside it and renamed).
pub fn write_gguf(spec: &ModelSpec, ty: GgufType, path: &Path) -> Result<(), Error> {
    spec.validate()?;
    let tensors: Vec<(TensorDef, GgmlDType)> = tensor_defs(spec)
        .into_iter()
        .map(|def| {
            let dtype = ty.dtype_for(&def, spec);
            (def, dtype)
        })
        .collect();
    let metadata = gguf_metadata(spec, ty);
    crate::atomic_write(path, |file| {
        let io = |e: std::io::Error| crate::io_error(path, e);
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write_header(&mut w, &metadata, &tensors).map_err(io)?;
        for (def, dtype) in &tensors {
            let bytes = encode(&def.generate_gguf(spec), &def.shape, *dtype)?;
            w.write_all(&bytes).map_err(io)?;
            pad(&mut w, bytes.len() as u64).map_err(io)?;
        }
        w.flush().map_err(io)
    })
}

fn write_header<W: Write + Seek>(
    w: &mut W,
    metadata: &[(String, Value)],
    tensors: &[(TensorDef, GgmlDType)],
) -> std::io::Result<()> {
    w.write_all(&GGUF_MAGIC.to_le_bytes())?;
    w.write_all(&GGUF_VERSION.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata {
        write_string(w, key)?;
        w.write_all(&value_type(value).to_le_bytes())?;
        write_value(w, value)?;
    }
    let mut offset = 0u64;
    for (def, dtype) in tensors {
        write_string(w, &def.gguf_name)?;
        w.write_all(&(def.shape.len() as u32).to_le_bytes())?;
        // GGUF lists dimensions innermost first.
        for &dim in def.shape.iter().rev() {
            w.write_all(&(dim as u64).to_le_bytes())?;
        }
        w.write_all(&ggml_type_id(*dtype).to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        let size = (def.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
        offset += size.next_multiple_of(ALIGNMENT);
    }
    let position = w.stream_position()?;
    pad(w, position)
}

fn pad<W: Write>(w: &mut W, written: u64) -> std::io::Result<()> {
    let padding = written.next_multiple_of(ALIGNMENT) - written;
    w.write_all(&[0u8; ALIGNMENT as usize][..padding as usize])?;
    Ok(())
}

/// Quantizes one tensor. Rows are split across threads (each part is a whole number of
/// blocks, and block data is a flat sequence), which gives the same bytes as one call.
fn encode(values: &[f32], shape: &[usize], dtype: GgmlDType) -> Result<Vec<u8>, Error> {
    if dtype == GgmlDType::F32 {
        return Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    let cols = *shape.last().expect("tensors have at least one dimension");
    let rows = values.len() / cols;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Small tensors are not worth a thread.
    let parts = threads.min(values.len().div_ceil(1 << 20)).max(1);
    let rows_per_part = rows.div_ceil(parts);
    let quantize = |chunk: &[f32]| -> Result<Vec<u8>, Error> {
        let t = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)?;
        Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
    };
    let chunks: Vec<&[f32]> = values.chunks(rows_per_part * cols).collect();
    if chunks.len() == 1 {
        return quantize(chunks[0]);
    }
    let encoded: Vec<Result<Vec<u8>, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| scope.spawn(|| quantize(chunk)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("quantization thread panicked"))
            .collect()
    });
    let mut out = Vec::new();
    for part in encoded {
        out.extend_from_slice(&part?);
    }
    Ok(out)
}

/// GGML type ids (candle keeps its own mapping crate-private).
fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_string<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())?;
    Ok(())
}

fn write_value<W: Write>(w: &mut W, value: &Value) -> std::io::Result<()> {
    match value {
        Value::U8(v) => w.write_all(&v.to_le_bytes())?,
        Value::I8(v) => w.write_all(&v.to_le_bytes())?,
        Value::U16(v) => w.write_all(&v.to_le_bytes())?,
        Value::I16(v) => w.write_all(&v.to_le_bytes())?,
        Value::U32(v) => w.write_all(&v.to_le_bytes())?,
        Value::I32(v) => w.write_all(&v.to_le_bytes())?,
        Value::U64(v) => w.write_all(&v.to_le_bytes())?,
        Value::I64(v) => w.write_all(&v.to_le_bytes())?,
        Value::F32(v) => w.write_all(&v.to_le_bytes())?,
        Value::F64(v) => w.write_all(&v.to_le_bytes())?,
        Value::Bool(v) => w.write_all(&[u8::from(*v)])?,
        Value::String(s) => write_string(w, s)?,
        Value::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is typed as u32 (any type would do).
            let elem_type = items.first().map_or(4, value_type);
            w.write_all(&elem_type.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                write_value(w, item)?;
            }
        }
    }
    Ok(())
}
