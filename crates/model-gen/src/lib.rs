//! Deterministic random-weight models of the llama, qwen2, qwen3, gemma2, gemma3 and phi3
//! families for tests and benchmarks.
//!
//! A [`ModelSpec`] (dimensions plus a seed) fully determines the bytes written, in Hugging Face
//! hub layout ([`write_hub_dir`]) or as GGUF ([`write_gguf`]): the same spec always gives
//! byte-identical files, and the same weights in every format, so a test can compare the
//! greedy tokens of two loaders. The weights are scaled so greedy decisions have wide margins.
//! Every generated model comes with a generated SentencePiece-style vocabulary
//! ([`tokenizer`]). [`paths`] says where test models live on this machine.
//!
//! This crate does not run models and does not download anything.

mod cache;
mod gguf;
mod hub;
pub mod paths;
pub mod reference;
mod rng;
mod spec;
pub mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use cache::{ModelFormat, ensure_generated, write_model};
pub use gguf::{GgufType, gguf_metadata, use_more_bits, write_gguf};
pub use hub::write_hub_dir;
pub use spec::{Arch, GENERATOR_VERSION, LoudRows, ModelSpec, RopeScaling};
pub use tokenizer::ChatFormat;
pub use weights::{hf_permute, llama_cpp_permute};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    /// A preset, architecture or format name that does not exist.
    #[error("{0}")]
    UnknownName(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("quantization failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("writing safetensors failed: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error("writing JSON failed: {0}")]
    Json(#[from] serde_json::Error),
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A hidden name unique to this process and call, for write-then-rename.
fn unique_temp_name(stem: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{stem}.tmp-{}-{n}", std::process::id())
}

/// Writes a file through `write` under a temporary name beside `path`, then renames it into
/// place, so `path` is either absent or complete.
fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), Error>,
) -> Result<(), Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    let name = path
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy());
    let temp = parent.join(unique_temp_name(&name));
    let result = std::fs::File::create(&temp)
        .map_err(|e| io_error(&temp, e))
        .and_then(|mut file| write(&mut file))
        .and_then(|()| std::fs::rename(&temp, path).map_err(|e| io_error(path, e)));
    if result.is_err() {
        std::fs::remove_file(&temp).ok();
    }
    result
}
