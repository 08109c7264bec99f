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
use crate::spec::ModelSpec;
use crate::tokenizer::{self, Vocab};
use crate::weights::{Role, TensorDef, tensor_defs};

const GGUF_MAGIC: u32 = 0x4655_4747;
const GGUF_VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// The weight type of a GGUF file. Norm scales and biases stay F32 in every file.
///
/// Quantized files follow llama.cpp's choices where they matter: a matrix whose rows do not
/// split into the type's blocks falls back (Q4_K to Q5_0, then anything to F16), and in the
/// 4-bit files the output head (the embedding when tied) is Q8_0, since llama.cpp also keeps
/// it at a higher precision (it uses Q6_K).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl GgufType {
    pub const ALL: [GgufType; 5] = [Self::F32, Self::F16, Self::Q8_0, Self::Q4_0, Self::Q4K];

    /// Lowercase name as used on the command line and in file names (`q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`). Q4_K files are all-Q4_K like
    /// `MOSTLY_Q4_K_S`.
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4K => 14,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16)
    }

    /// The dtype one tensor gets in a file of this type.
    pub(crate) fn dtype_for(self, def: &TensorDef, spec: &ModelSpec) -> GgmlDType {
        let is_head =
            def.role == Role::Output || (spec.tie_embeddings && def.role == Role::Embedding);
        let wanted = match def.role {
            Role::Norm | Role::OutputNorm | Role::Bias => return GgmlDType::F32,
            _ if is_head && matches!(self, Self::Q4_0 | Self::Q4K) => GgmlDType::Q8_0,
            _ => self.ggml(),
        };
        let fits = |dtype: GgmlDType| def.cols().is_multiple_of(dtype.block_size());
        if fits(wanted) {
            wanted
        } else if wanted == GgmlDType::Q4K && fits(GgmlDType::Q5_0) {
            GgmlDType::Q5_0
        } else {
            GgmlDType::F16
        }
    }
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
                    "unknown GGUF type {s:?} (expected f32, f16, q8_0, q4_0 or q4_k)"
                ))
            })
    }
}

/// The metadata of a GGUF file for `spec`, in the order it is written.
pub fn gguf_metadata(spec: &ModelSpec, ty: GgufType) -> Vec<(String, Value)> {
    let arch = spec.arch.gguf_name();
    let u32v = |v: usize| Value::U32(v as u32);
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
    let arch_keys = [
        ("context_length", u32v(spec.context_length)),
        ("embedding_length", u32v(spec.hidden)),
        ("block_count", u32v(spec.layers)),
        ("feed_forward_length", u32v(spec.ffn)),
        ("attention.head_count", u32v(spec.heads)),
        ("attention.head_count_kv", u32v(spec.kv_heads)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(spec.rms_eps as f32),
        ),
        ("rope.dimension_count", u32v(spec.head_dim())),
        ("rope.freq_base", Value::F32(spec.rope_theta as f32)),
        ("vocab_size", u32v(spec.vocab)),
    ];
    md.extend(
        arch_keys
            .into_iter()
            .map(|(k, v)| (format!("{arch}.{k}"), v)),
    );

    let vocab = Vocab::new(spec.vocab);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    md.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(vocab.tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(vocab.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.token_types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(tokenizer::BOS_ID),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(tokenizer::EOS_ID),
        ),
        (
            "tokenizer.ggml.unknown_token_id".into(),
            Value::U32(tokenizer::UNK_ID),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(tokenizer::CHAT_TEMPLATE.into()),
        ),
    ]);
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
