//! What a GGUF file's header says, and what rbee's engine makes of it, without candle.
//!
//! [`Header`] reads a file's metadata and tensor descriptions (never its weights), bounded
//! against hostile headers. On it, the engine's rules: which tensor types rbee computes
//! ([`uncomputed_tensor`]), what each architecture asks of the forward pass ([`arch`]), which
//! files the engine's own CPU path takes and which tensors it reads as what ([`cpu_path`]), and
//! the context a worker runs a file with ([`context`]). The engine decides by these functions
//! when it loads a file; the hive asks the same functions before it spawns a worker for one, so
//! the two cannot disagree and the hive does not carry the engine.

pub mod arch;
pub mod context;
pub mod cpu_path;
mod header;
mod types;

pub use cpu_path::runs_on_cpu_path;
pub use header::{
    Array, DEFAULT_ALIGNMENT, Header, HeaderError, MAX_ARRAY_ITEMS, MAX_DIMS, MAX_STRING_BYTES,
    MAX_TENSOR_NAME_BYTES, TensorInfo, Value,
};
pub use types::{COMPUTED, GgmlType, refusal, uncomputed_tensor};

/// Why a file is not run by the code a rule is about (the engine's CPU path, an architecture's
/// settings): one line for a log, never shown to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
