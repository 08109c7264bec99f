//! Safetensors llama checkpoints in Hugging Face hub layout: `config.json`, one
//! `model.safetensors` or shards listed in `model.safetensors.index.json`, `tokenizer.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;
use candle_transformers::models::llama::{
    Llama3RopeConfig, Llama3RopeType, LlamaConfig, LlamaEosToks,
};

use super::candle_llama::{self, CandleLlama, Matrix, Rope};
use super::{LoadedModel, ModelInfo, WeightsFormat, report};
use crate::tokenizer::TextTokenizer;
use crate::{EngineError, LoadProgress};

const TENSORS_START: f32 = 0.1;
const TENSORS_END: f32 = 0.95;

/// Loads the checkpoint onto candle's path, for a context of `context` positions (`None`: the
/// trained one, which is also the most it holds, as candle's llama holds).
pub(super) fn load(
    path: &Path,
    device: &Device,
    context: Option<usize>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, EngineError> {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(EngineError::Load(format!(
            "{} is neither a GGUF file nor a checkpoint directory with a config.json",
            path.display()
        )));
    }
    report(progress, 0.0, format!("reading {}", config_path.display()));
    let raw_config = read_json(&config_path)?;
    check_architecture(&raw_config)?;
    check_candle_computes(&raw_config)?;
    let mut config: LlamaConfig = serde_json::from_value(raw_config.clone())
        .map_err(|e| EngineError::load("config.json is not a llama config", e))?;
    check_dimensions(&config)?;

    report(progress, 0.05, "loading tokenizer.json");
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))
        .map_err(|e| EngineError::load("tokenizer", e))?;

    let files = weight_files(dir)?;
    // SAFETY: the files are mapped read-only and only read while `tensors` lives, within this
    // function. Another process truncating them meanwhile would fault; that is the documented
    // risk of memory-mapping model files, accepted here as every candle loader does.
    #[allow(unsafe_code)]
    let tensors = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| EngineError::load("reading safetensors", e))?;

    if config.tie_word_embeddings != Some(true) && tensors.get("lm_head.weight").is_err() {
        // Checkpoints that tie the output to the embedding do not always say so in config.json.
        config.tie_word_embeddings = Some(true);
    }
    let dtype = compute_dtype(&raw_config, device);
    let expected = expected_tensors(&config);
    check_tensors(&tensors, &expected)?;

    let total_elems: usize = expected
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    let mut loaded_elems = 0usize;
    let mut weights = HashMap::with_capacity(expected.len());
    for (name, shape) in &expected {
        let tensor = tensors
            .load(name, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| EngineError::load(format_args!("tensor {name}"), e))?;
        weights.insert(name.clone(), tensor);
        loaded_elems += shape.iter().product::<usize>();
        let fraction = TENSORS_START
            + (TENSORS_END - TENSORS_START) * loaded_elems as f32 / total_elems as f32;
        report(progress, fraction, format!("loaded {name}"));
    }
    drop(tensors);

    let mut info = describe(dir, &config, dtype, total_elems, &tokenizer);
    let trained = info.trained_context_length;
    info.context_length = super::context_length(context, trained, Some(trained), "candle's path");
    let model = candle_model(&config, weights, dtype, info.context_length, device)
        .map_err(|e| EngineError::load("llama weights", e))?;
    report(progress, 1.0, "model loaded");
    Ok(LoadedModel {
        model: Box::new(model),
        info,
        tokenizer,
    })
}

/// The checkpoint's tensors (each one [`expected_tensors`] names, checked) as candle's llama
/// computes them, for `positions` positions per sequence.
fn candle_model(
    c: &LlamaConfig,
    mut weights: HashMap<String, Tensor>,
    dtype: DType,
    positions: usize,
    device: &Device,
) -> candle_core::Result<CandleLlama> {
    let mut take = |name: String| {
        weights
            .remove(&name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor {name}")))
    };
    let linear = |w: Tensor| Matrix::Dense(Linear::new(w, None));
    let embedding = take("model.embed_tokens.weight".into())?;
    let output = if c.tie_word_embeddings == Some(true) {
        linear(embedding.clone())
    } else {
        linear(take("lm_head.weight".into())?)
    };
    let norm = take("model.norm.weight".into())?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let mut t = |name: &str| take(format!("model.layers.{i}.{name}.weight"));
        layers.push(candle_llama::Layer {
            attn_norm: t("input_layernorm")?,
            q: linear(t("self_attn.q_proj")?),
            k: linear(t("self_attn.k_proj")?),
            v: linear(t("self_attn.v_proj")?),
            qkv_bias: None,
            o: linear(t("self_attn.o_proj")?),
            ffn_norm: t("post_attention_layernorm")?,
            gate: linear(t("mlp.gate_proj")?),
            up: linear(t("mlp.up_proj")?),
            down: linear(t("mlp.down_proj")?),
        });
    }
    let head_dim = c.hidden_size / c.num_attention_heads;
    let cfg = candle_llama::Config {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads(),
        head_dim,
        eps: c.rms_norm_eps,
        rope: Rope::Halves,
        metal_sdpa: false,
    };
    let inv_freq = inverse_frequencies(c, head_dim);
    let weights = candle_llama::Weights {
        embedding,
        layers,
        norm,
        output,
    };
    CandleLlama::new(cfg, weights, &inv_freq, positions, dtype, device)
}

/// RoPE's inverse frequencies as candle's llama computes them, with Llama 3's scaling when the
/// config asks for it.
fn inverse_frequencies(c: &LlamaConfig, head_dim: usize) -> Vec<f32> {
    use std::f32::consts::PI;
    let base = candle_llama::inverse_frequencies(head_dim, c.rope_theta);
    let scaling = match &c.rope_scaling {
        None
        | Some(Llama3RopeConfig {
            rope_type: Llama3RopeType::Default,
            ..
        }) => return base,
        Some(scaling) => scaling,
    };
    let original = scaling.original_max_position_embeddings as f32;
    let low_freq_wavelen = original / scaling.low_freq_factor;
    let high_freq_wavelen = original / scaling.high_freq_factor;
    base.into_iter()
        .map(|freq| {
            let wavelen = 2. * PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / scaling.factor
            } else {
                let smooth = (original / wavelen - scaling.low_freq_factor)
                    / (scaling.high_freq_factor - scaling.low_freq_factor);
                (1. - smooth) * freq / scaling.factor + smooth * freq
            }
        })
        .collect()
}

fn read_json(path: &Path) -> Result<serde_json::Value, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::load(path.display(), e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::load(path.display(), e))
}

fn check_architecture(config: &serde_json::Value) -> Result<(), EngineError> {
    let model_type = config.get("model_type").and_then(|v| v.as_str());
    let is_llama_class = config
        .get("architectures")
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("LlamaForCausalLM")));
    match model_type {
        Some("llama") => Ok(()),
        None if is_llama_class => Ok(()),
        Some(other) => Err(EngineError::UnsupportedModel(format!(
            "safetensors model_type `{other}` is not supported (supported: llama)"
        ))),
        None => Err(EngineError::UnsupportedModel(
            "config.json names neither model_type nor a supported architecture".into(),
        )),
    }
}

/// What in `config` candle's llama would compute wrongly: it reads Llama 3's RoPE scaling but
/// no other kind, and derives the head size from the hidden size.
fn check_candle_computes(config: &serde_json::Value) -> Result<(), EngineError> {
    let number = |key: &str| config.get(key).and_then(serde_json::Value::as_u64);
    if let (Some(head_dim), Some(hidden), Some(heads)) = (
        number("head_dim"),
        number("hidden_size"),
        number("num_attention_heads"),
    ) && head_dim * heads != hidden
    {
        return Err(EngineError::UnsupportedModel(format!(
            "safetensors checkpoints with a head size other than hidden_size / num_attention_heads \
             ({head_dim} vs {hidden} / {heads}) are not supported; use a GGUF file of the model"
        )));
    }
    if let Some(scaling) = config.get("rope_scaling").filter(|v| !v.is_null()) {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown");
        if kind != "llama3" {
            return Err(EngineError::UnsupportedModel(format!(
                "safetensors checkpoints with `{kind}` RoPE scaling are not supported (only \
                 Llama 3's); use a GGUF file of the model"
            )));
        }
    }
    Ok(())
}

fn check_dimensions(c: &LlamaConfig) -> Result<(), EngineError> {
    let kv_heads = c.num_key_value_heads();
    let ok = c.hidden_size > 0
        && c.num_attention_heads > 0
        && kv_heads > 0
        && c.vocab_size > 0
        && c.max_position_embeddings > 0
        && c.hidden_size.is_multiple_of(c.num_attention_heads)
        && c.num_attention_heads.is_multiple_of(kv_heads);
    if ok {
        Ok(())
    } else {
        Err(EngineError::Load(format!(
            "inconsistent config.json: hidden_size {}, {} heads, {} KV heads, vocab {}, {} positions",
            c.hidden_size, c.num_attention_heads, kv_heads, c.vocab_size, c.max_position_embeddings
        )))
    }
}

/// `model.safetensors`, or the shards named by `model.safetensors.index.json`, or failing both
/// every `*.safetensors` file in the directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let index = read_json(&index)?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                EngineError::Load("model.safetensors.index.json has no weight_map".into())
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::load(dir.display(), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::Load(format!(
            "no .safetensors files in {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// f32 on CPU, where half-precision matmuls are slow; the checkpoint's own half type on GPUs.
fn compute_dtype(config: &serde_json::Value, device: &Device) -> DType {
    let declared = config.get("torch_dtype").and_then(|v| v.as_str());
    match (device, declared) {
        (Device::Cpu, _) => DType::F32,
        (Device::Cuda(_), Some("bfloat16")) => DType::BF16,
        (_, Some("float16" | "bfloat16")) => DType::F16,
        _ => DType::F32,
    }
}

/// Every tensor candle's llama reads (and the candle path with it), with its shape.
fn expected_tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size;
    let head_dim = h / c.num_attention_heads;
    let q = head_dim * c.num_attention_heads;
    let kv = head_dim * c.num_key_value_heads();
    let i = c.intermediate_size;
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_owned(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_owned(), vec![h]),
    ];
    if c.tie_word_embeddings != Some(true) {
        out.push(("lm_head.weight".to_owned(), vec![c.vocab_size, h]));
    }
    for layer in 0..c.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        out.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        ]);
    }
    out
}

/// Checks names and shapes from the safetensors headers before any data is read, so a
/// mismatched checkpoint fails with a message instead of deep inside the model builder.
fn check_tensors(
    tensors: &MmapedSafetensors,
    expected: &[(String, Vec<usize>)],
) -> Result<(), EngineError> {
    for (name, shape) in expected {
        let view = tensors
            .get(name)
            .map_err(|_| EngineError::Load(format!("the checkpoint has no tensor {name}")))?;
        if view.shape() != shape.as_slice() {
            return Err(EngineError::Load(format!(
                "tensor {name} has shape {:?}, config.json implies {shape:?}",
                view.shape()
            )));
        }
    }
    Ok(())
}

fn describe(
    dir: &Path,
    c: &LlamaConfig,
    dtype: DType,
    elems: usize,
    tokenizer: &TextTokenizer,
) -> ModelInfo {
    let mut eos = tokenizer.eos_token_ids().to_vec();
    let mut add = |id: u32| {
        if !eos.contains(&id) {
            eos.push(id);
        }
    };
    match &c.eos_token_id {
        Some(LlamaEosToks::Single(id)) => add(*id),
        Some(LlamaEosToks::Multiple(ids)) => ids.iter().copied().for_each(&mut add),
        None => {}
    }
    // generation_config.json often lists the end-of-turn tokens of chat models.
    if let Ok(generation) = read_json(&dir.join("generation_config.json"))
        && let Some(ids) = generation.get("eos_token_id")
    {
        let ids = ids.as_array().cloned().unwrap_or_else(|| vec![ids.clone()]);
        ids.iter()
            .filter_map(|v| v.as_u64())
            .filter_map(|v| u32::try_from(v).ok())
            .for_each(&mut add);
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    ModelInfo {
        name,
        architecture: "llama".to_owned(),
        format: WeightsFormat::Safetensors {
            dtype: dtype.as_str().to_owned(),
        },
        context_length: c.max_position_embeddings,
        trained_context_length: c.max_position_embeddings,
        vocab_size: c.vocab_size,
        eos_token_ids: eos,
        bos_token_id: tokenizer.bos_token_id().or(c.bos_token_id),
        weights_bytes: (elems * dtype.size_in_bytes()) as u64,
        n_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::check_candle_computes;

    #[test]
    fn checkpoints_candle_would_compute_wrongly_are_refused() {
        let base = json!({"hidden_size": 64, "num_attention_heads": 4});
        assert!(check_candle_computes(&base).is_ok());
        let llama3 = json!({"hidden_size": 64, "num_attention_heads": 4,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0}});
        assert!(check_candle_computes(&llama3).is_ok());
        let nemo = json!({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32});
        let err = check_candle_computes(&nemo).unwrap_err().to_string();
        assert!(err.contains("head size"), "{err}");
        let yarn = json!({"hidden_size": 64, "num_attention_heads": 4,
            "rope_scaling": {"type": "yarn", "factor": 4.0}});
        let err = check_candle_computes(&yarn).unwrap_err().to_string();
        assert!(err.contains("`yarn` RoPE scaling"), "{err}");
    }
}
