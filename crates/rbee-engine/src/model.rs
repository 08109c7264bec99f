//! Model families behind one trait, and what the engine reports about a loaded model.

mod candle_llama;
mod gguf;
mod safetensors;

use std::path::Path;

use candle_core::Device;

use crate::cpu::SeqTokens;
use crate::tokenizer::TextTokenizer;
use crate::{EngineError, LoadProgress};

/// A model that holds several sequences at once, one KV cache each, and feeds them in one step.
///
/// Both forward paths implement it: the engine's own CPU path ([`crate::cpu::CpuLlama`]) and
/// the one written with candle's ops ([`candle_llama::CandleLlama`]), which runs on every device.
/// The engine drives either the same way: each step feeds some sequences their next tokens
/// (a prompt chunk, or the token sampled last) and gets back each one's last logits.
pub(crate) trait CausalLm: Send {
    /// Holds `n` (at least one) sequences from now on; the caches of sequences beyond `n` are
    /// dropped. Returns how many it holds.
    fn hold_sequences(&mut self, n: usize) -> usize;

    /// Feeds every entry of `batch` in one pass: their tokens share each matrix product, and
    /// each attends over its own sequence's cache. Positions from an entry's `pos` on are
    /// dropped from its cache first, so `pos` 0 starts the sequence afresh. Returns the last
    /// position's logits of each entry, `[entry][vocab]`.
    fn feed(&mut self, batch: &[SeqTokens<'_>]) -> Result<Vec<f32>, EngineError>;

    /// The model as the prompt cache needs it (caches cut back to a prefix, copied out and back
    /// in), when it can: the engine's CPU path.
    fn prefix_cache(&mut self) -> Option<&mut crate::cpu::CpuLlama> {
        None
    }
}

/// How the weights are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `dtype` is the GGUF type holding most of the weight bytes, e.g. `Q4_1`, `Q8_0`, `F16`.
    Gguf { dtype: String },
    /// `dtype` is the type the weights were converted to for inference: `f32`, `f16` or `bf16`.
    Safetensors { dtype: String },
}

impl WeightsFormat {
    pub fn dtype(&self) -> &str {
        match self {
            WeightsFormat::Gguf { dtype } | WeightsFormat::Safetensors { dtype } => dtype,
        }
    }
}

/// What a loaded model is, in the terms a scheduler or a user cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// `general.name` of a GGUF file or the checkpoint directory's name.
    pub name: String,
    /// `general.architecture` (`llama`, `qwen2`, `gemma3`, …) or `llama` for a safetensors
    /// checkpoint.
    pub architecture: String,
    pub format: WeightsFormat,
    /// Positions a prompt plus its completion may occupy, in each slot: the context asked for
    /// at load ([`LoadOptions::context_length`](crate::LoadOptions::context_length)) or else
    /// the trained one, capped where the code that runs the model has a smaller fixed limit.
    pub context_length: usize,
    /// The context the model was trained for, as its file states it.
    pub trained_context_length: usize,
    /// Rows of the output layer, i.e. the number of logits per position.
    pub vocab_size: usize,
    /// Every token that ends a generation.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Bytes of weight data as held for inference (the quantized size for GGUF, the converted size
    /// for safetensors); roughly what each decoded token reads.
    pub weights_bytes: u64,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
}

/// A model ready to run, with the tokenizer that came with it.
pub(crate) struct LoadedModel {
    pub(crate) model: Box<dyn CausalLm>,
    pub(crate) info: ModelInfo,
    pub(crate) tokenizer: TextTokenizer,
}

/// Loads a `.gguf` file, or a safetensors llama checkpoint given as its directory or any file in it,
/// for a context of `context` positions (`None`: the trained context; see [`context_length`]).
pub(crate) fn load(
    path: &Path,
    device: &Device,
    context: Option<usize>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, EngineError> {
    if !path.exists() {
        return Err(EngineError::Load(format!(
            "{} does not exist",
            path.display()
        )));
    }
    let is_gguf = path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        || gguf::has_magic(path);
    if is_gguf {
        gguf::load(path, device, context, progress)
    } else {
        safetensors::load(path, device, context, progress)
    }
}

/// The context a model runs with: `requested`, or `trained` when none was (or 0 was, as
/// llama.cpp reads `-c 0`), capped at `limit`, the most positions the code that runs the model
/// (named `runner`, for the warning) holds (`None`: no fixed limit). A context beyond the
/// trained one is allowed, as llama.cpp allows it, with a warning; a cap is warned about when it
/// cuts what was asked for or trained.
pub(crate) fn context_length(
    requested: Option<usize>,
    trained: usize,
    limit: Option<usize>,
    runner: &str,
) -> usize {
    let wanted = requested.filter(|&n| n > 0).unwrap_or(trained);
    let resolved = resolve_context(requested, trained, limit);
    if wanted > trained && limit.is_none_or(|limit| limit > trained) {
        tracing::warn!(
            context_length = wanted,
            trained_context_length = trained,
            "the context asked for is longer than the model was trained for; its answers past \
             the trained context may degrade"
        );
    }
    if resolved < wanted {
        tracing::warn!(
            context_length = resolved,
            asked = wanted,
            "{runner} holds at most {resolved} positions; the context is capped there"
        );
    }
    resolved
}

/// [`context_length`] without the warnings: gguf-info's rule, the one the hive counts KV caches
/// by.
pub(crate) fn resolve_context(
    requested: Option<usize>,
    trained: usize,
    limit: Option<usize>,
) -> usize {
    gguf_info::context::resolve(requested, trained, limit)
}

/// Reports `fraction` of the load done, with a message.
pub(crate) fn report(
    progress: &mut dyn FnMut(LoadProgress),
    fraction: f32,
    message: impl Into<String>,
) {
    progress(LoadProgress {
        fraction: fraction.clamp(0.0, 1.0),
        message: message.into(),
    });
}
