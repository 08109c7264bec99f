//! Model families behind one trait, and what the engine reports about a loaded model.

mod gguf;
mod safetensors;

pub(crate) use gguf::context_length_of as gguf_context_length;
pub(crate) use gguf::uncomputed_tensor as gguf_uncomputed_tensor;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::tokenizer::TextTokenizer;
use crate::{EngineError, LoadProgress};

/// One architecture's forward pass with its own KV cache.
///
/// The engine drives every family with the same loop: `reset`, then `forward` over the prompt
/// (in chunks, with increasing `pos`), then one token at a time.
pub(crate) trait CausalLm: Send {
    /// Runs `tokens` (shape `[1, n]`) at positions `pos..pos + n`, appending them to the KV cache,
    /// and returns the logits of the last position, shape `[1, vocab]`.
    fn forward(&mut self, tokens: &Tensor, pos: usize) -> candle_core::Result<Tensor>;

    /// Forgets every cached position so the next `forward` starts a new sequence at `pos` 0.
    fn reset(&mut self) -> Result<(), EngineError>;

    /// The model as one that holds several sequences and feeds them in one step, when it can
    /// (the engine's CPU path); `forward` and `reset` then act on its sequence 0.
    fn batched(&mut self) -> Option<&mut crate::cpu::CpuLlama> {
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
        let mut loaded = safetensors::load(path, device, progress)?;
        // candle's llama precomputes its rotary tables for the trained context and slides its
        // KV cache past it.
        let trained = loaded.info.trained_context_length;
        loaded.info.context_length =
            context_length(context, trained, Some(trained), "candle's llama");
        Ok(loaded)
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

/// [`context_length`] without the warnings.
pub(crate) fn resolve_context(
    requested: Option<usize>,
    trained: usize,
    limit: Option<usize>,
) -> usize {
    let wanted = requested.filter(|&n| n > 0).unwrap_or(trained);
    limit.map_or(wanted, |limit| wanted.min(limit))
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
