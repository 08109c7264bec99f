//! Hugging Face hub layout: `config.json`, `model.safetensors` (F32), `tokenizer.json`,
//! `tokenizer_config.json`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, View};
use serde::Serialize;

use crate::spec::{Arch, ModelSpec, RopeScaling};
use crate::tokenizer::{self, Vocab};
use crate::weights::{TensorDef, tensor_defs};
use crate::{Error, io_error};

/// Writes the four hub files of `spec` into `dir` (created if missing). Hub layout is
/// written for llama and qwen2; the other families are written as GGUF only.
pub fn write_hub_dir(spec: &ModelSpec, dir: &Path) -> Result<(), Error> {
    spec.validate()?;
    if !matches!(spec.arch, Arch::Llama | Arch::Qwen2) {
        return Err(Error::InvalidSpec(format!(
            "hub layout is written for llama and qwen2, not {}; write it as GGUF",
            spec.arch
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let write_text = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text + "\n").map_err(|e| io_error(&path, e))
    };
    let vocab = Vocab::for_spec(spec);
    write_text(
        "config.json",
        serde_json::to_string_pretty(&HfConfig::new(spec, &vocab))?,
    )?;
    write_text("tokenizer.json", tokenizer::tokenizer_json(&vocab)?)?;
    write_text(
        "tokenizer_config.json",
        tokenizer::tokenizer_config_json(spec)?,
    )?;

    let views: Vec<(String, LazyTensor<'_>)> = tensor_defs(spec)
        .into_iter()
        .filter(TensorDef::in_hub)
        .map(|def| (def.hf_name.clone(), LazyTensor { def, spec }))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &dir.join("model.safetensors"))?;
    Ok(())
}

/// A tensor whose bytes are generated when the serializer asks for them, so only one tensor
/// is in memory at a time.
struct LazyTensor<'a> {
    def: TensorDef,
    spec: &'a ModelSpec,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.def.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.def.generate(self.spec);
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.def.elem_count() * 4
    }
}

/// The fields of transformers' `LlamaConfig` / `Qwen2Config` that loaders read.
#[derive(Serialize)]
struct HfConfig {
    architectures: [&'static str; 1],
    model_type: &'static str,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    hidden_act: &'static str,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    attention_bias: bool,
    bos_token_id: u32,
    eos_token_id: u32,
    torch_dtype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rope_scaling: Option<Llama3RopeScaling>,
    /// Qwen2 configs carry their sliding-window settings (unused: the window is the context).
    #[serde(flatten)]
    sliding_window: Option<SlidingWindow>,
}

/// transformers' `rope_scaling` for `rope_type: llama3`.
#[derive(Serialize)]
struct Llama3RopeScaling {
    rope_type: &'static str,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_position_embeddings: usize,
}

#[derive(Serialize)]
struct SlidingWindow {
    use_sliding_window: bool,
    sliding_window: usize,
    max_window_layers: usize,
}

impl HfConfig {
    fn new(spec: &ModelSpec, vocab: &Vocab) -> Self {
        let (architecture, model_type) = match spec.arch {
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            _ => ("LlamaForCausalLM", "llama"),
        };
        let rope_scaling = match spec.rope_scaling {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => Some(Llama3RopeScaling {
                rope_type: "llama3",
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original_context,
            }),
            _ => None,
        };
        Self {
            architectures: [architecture],
            model_type,
            hidden_size: spec.hidden,
            intermediate_size: spec.ffn,
            num_hidden_layers: spec.layers,
            num_attention_heads: spec.heads,
            num_key_value_heads: spec.kv_heads,
            head_dim: spec.head_dim(),
            hidden_act: "silu",
            vocab_size: spec.vocab,
            max_position_embeddings: spec.context_length,
            rms_norm_eps: spec.rms_eps,
            rope_theta: spec.rope_theta,
            tie_word_embeddings: spec.tie_embeddings,
            attention_bias: spec.arch.has_qkv_bias(),
            bos_token_id: vocab.bos_id(),
            eos_token_id: vocab.eos_id(),
            torch_dtype: "float32",
            rope_scaling,
            sliding_window: (spec.arch == Arch::Qwen2).then_some(SlidingWindow {
                use_sliding_window: false,
                sliding_window: spec.context_length,
                max_window_layers: spec.layers,
            }),
        }
    }
}
