//! The engine's own CPU inference path for GGUF models of every family in [`ARCHITECTURES`]
//! (llama, qwen2, qwen3, gemma2, gemma3, phi3): quantized matrix-vector and
//! matrix-matrix kernels (AVX2/FMA or AVX-512 VNNI on x86-64, NEON with or without `dotprod` on
//! aarch64, chosen at run time; a portable scalar reference otherwise; Q4_0, Q4_K with the SIMD
//! kernels, and Q8_0 with VNNI or `dotprod`, repacked at load into eight-row tiles), a
//! persistent thread pool that tolerates competing load, and a forward pass that keeps its working
//! buffers across steps (a decode step allocates only the logits handed back through
//! [`crate::model::CausalLm`]) and multiplies the weights in place in one copy of the file's
//! bytes.
//!
//! It is used when the device is the CPU and every matrix has a type with a kernel here (F32,
//! F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: every type of
//! llama.cpp's standard presets), unless `RBEE_CPU_KERNELS=0`; everything else (GPU devices,
//! safetensors) stays on candle's model code, for the files that code computes correctly. It is not a general tensor library: it knows one block
//! structure, llama's, with each family's differences as settings ([`arch`]).

mod arch;
mod attention;
mod forward;
mod kernels;
mod ops;
mod pool;
mod quant;
mod weights;

pub(crate) use arch::ARCHITECTURES;
pub(crate) use forward::{CpuLlama, KvPrefix, Plan, SeqTokens, check_batch};
pub(crate) use weights::{advise_huge_pages, ggml_name};

/// The environment variable that turns the CPU path off (`0`, `false` or `off`), e.g. to compare
/// with candle's kernels; the hive reads it by the same function, its workers inherit it.
pub(crate) use gguf_info::cpu_path::{ENABLE_ENV, enabled};
