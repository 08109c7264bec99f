//! What a GGUF file's architecture asks of the forward pass, read from its metadata the way
//! llama.cpp reads it (`src/llama-model.cpp` and the graph of each architecture): head sizes,
//! RoPE layout, frequencies and scaling, attention scale, soft-capping, sliding-window layers,
//! the FFN's activation and which optional tensors a block has.
//!
//! The families differ only in these settings; the engine's one forward pass runs them all.

use crate::Unsupported;
use crate::header::{Array, Header, Value};

/// The GGUF architectures the engine runs, as `general.architecture` names them.
pub const ARCHITECTURES: [&str; 6] = {
    let mut names = [""; 6];
    let mut i = 0;
    while i < names.len() {
        names[i] = Family::ALL[i].name();
        i += 1;
    }
    names
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2 and 3.x, Mistral, SmolLM2, TinyLlama: llama.cpp's `llama` graph.
    Llama,
    /// Qwen2 and Qwen2.5: biases on Q, K and V.
    Qwen2,
    /// Qwen3: RMSNorm of each query and key head before RoPE, no biases.
    Qwen3,
    /// Gemma 2: scaled embeddings, norms after attention and FFN, GELU, soft-capped attention
    /// and logits, every other layer local (sliding window).
    Gemma2,
    /// Gemma 3: Gemma 2's block with query/key norms instead of attention soft-capping, five
    /// local layers per global one, local layers with their own RoPE base.
    Gemma3,
    /// Phi-3: fused QKV and gate-up products, LongRoPE factors.
    Phi3,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
    ];

    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The architecture's name in `general.architecture`.
    pub const fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// Which elements of a head RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)`: GGML's "normal" mode, for llama files (whose q/k rows llama.cpp's
    /// converter permuted to suit it).
    Interleaved,
    /// Pairs `(i, i + head_dim / 2)`: GGML's "neox" mode, for the other families.
    Halves,
}

/// The FFN's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnAct {
    /// `silu(gate) * up`.
    Silu,
    /// `gelu_tanh(gate) * up`, rounded through f16 as ggml's GELU table does.
    Gelu,
}

/// The architecture's settings for the whole model, in llama.cpp's terms.
#[derive(Debug, Clone)]
pub struct Hyper {
    pub family: Family,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope: RopeStyle,
    /// RoPE of the global layers, and of the sliding-window layers where they differ.
    pub rope_global: RopeParams,
    pub rope_local: Option<RopeParams>,
    /// The tensor whose values divide the global layers' frequencies, when the file has it:
    /// Llama 3's `rope_freqs`, or the one of Phi-3's LongRoPE pair that suits the context.
    pub rope_factors: Option<&'static str>,
    /// Multiplies RoPE's cosines and sines (`rope.scaling.attn_factor`).
    pub rope_mscale: f32,
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Multiplies the looked-up embeddings (Gemma: √dim).
    pub embed_scale: Option<f32>,
    pub ffn_act: FfnAct,
    /// Norms applied to the attention and FFN outputs before the residual add (Gemma).
    pub post_norms: bool,
    /// Per-head RMSNorm of queries and keys (Qwen3, Gemma 3).
    pub qk_norm: bool,
    pub qkv_bias: bool,
    /// Per layer: its sliding window, if it is a local layer, and its RoPE table.
    pub layers: Vec<LayerHyper>,
}

#[derive(Debug, Clone, Copy)]
pub struct LayerHyper {
    pub window: Option<usize>,
    pub rope_table: usize,
}

/// A RoPE base and linear scale: pair `i` turns at `scale · base^(-2i/head_dim)` per position.
#[derive(Debug, Clone, Copy)]
pub struct RopeParams {
    pub base: f32,
    pub scale: f32,
}

impl RopeParams {
    /// The frequency of each rotated pair, divided by `factors` where given.
    pub fn table(self, head_dim: usize, factors: Option<&[f32]>) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = self.scale / self.base.powf(2.0 * i as f32 / head_dim as f32);
                match factors {
                    Some(div) => f / div[i],
                    None => f,
                }
            })
            .collect()
    }
}

/// Typed reads of `{arch}.*` metadata.
struct Meta<'a> {
    header: &'a Header,
    arch: &'a str,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.header.get(&format!("{}.{key}", self.arch))
    }

    fn usize(&self, key: &str) -> Result<Option<usize>, Unsupported> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = v.to_count().ok_or_else(|| {
            Unsupported(format!(
                "{}.{key} is not a count (a per-layer array, or negative)",
                self.arch
            ))
        })?;
        Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)))
    }

    fn required(&self, key: &str) -> Result<usize, Unsupported> {
        self.usize(key)?
            .ok_or_else(|| Unsupported(format!("no {}.{key}", self.arch)))
    }

    fn f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(Value::to_f32)
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
}

impl Hyper {
    /// Reads the settings of `header`'s architecture. `max_positions` is the context the
    /// model will run with: Phi-3's LongRoPE picks its factors by it, as llama.cpp does by its
    /// context size.
    pub fn read(header: &Header, max_positions: usize) -> Result<Hyper, Unsupported> {
        let arch = match header.get("general.architecture") {
            Some(v) => v
                .as_str()
                .ok_or_else(|| Unsupported("general.architecture is not a string".into()))?,
            None => return Err(Unsupported("no general.architecture".into())),
        };
        let family =
            Family::from_name(arch).ok_or_else(|| Unsupported(format!("architecture {arch}")))?;
        let md = Meta { header, arch };
        if md.usize("expert_count")?.unwrap_or(0) > 0 {
            return Err(Unsupported("mixture of experts".into()));
        }
        let n_layers = md.required("block_count")?;
        // Each layer has tensors of its own: a count beyond them is not allocated for.
        if n_layers > header.tensors().len() {
            return Err(Unsupported(format!(
                "{n_layers} layers, more than the file has tensors"
            )));
        }
        let dim = md.required("embedding_length")?;
        let n_heads = md.required("attention.head_count")?;
        let n_kv_heads = md.usize("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Unsupported(format!(
                "attention shape: {n_heads} heads, {n_kv_heads} KV heads"
            )));
        }
        let default_head = dim / n_heads;
        let head_dim = md.usize("attention.key_length")?.unwrap_or(default_head);
        let v_head_dim = md.usize("attention.value_length")?.unwrap_or(default_head);
        if head_dim != v_head_dim {
            return Err(Unsupported(format!(
                "key heads of {head_dim} and value heads of {v_head_dim}"
            )));
        }
        // The block's widths (`q_dim + 2 * kv_dim` rows at most) are counted in `usize`.
        if n_heads
            .checked_mul(head_dim)
            .and_then(|q_dim| q_dim.checked_mul(3))
            .is_none()
        {
            return Err(Unsupported(format!(
                "attention shape: {n_heads} heads of {head_dim}"
            )));
        }
        let rope_dim = md.usize("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim != head_dim || head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Unsupported(format!(
                "head size {head_dim}, rotary size {rope_dim}"
            )));
        }
        let eps_key = "attention.layer_norm_rms_epsilon";
        let eps = md
            .f32(eps_key)
            .ok_or_else(|| Unsupported(format!("no {arch}.{eps_key}")))?;

        // RoPE: base, linear scaling, and factors, as llama.cpp's hparams and context read them.
        let base = md.f32("rope.freq_base").unwrap_or(10_000.0);
        let scaling = md.str("rope.scaling.type").unwrap_or("linear");
        let freq_scale = match scaling {
            "none" => 1.0,
            "linear" | "longrope" => {
                let factor = md
                    .f32("rope.scaling.factor")
                    .or_else(|| md.f32("rope.scale_linear"))
                    .unwrap_or(0.0);
                if factor == 0.0 { 1.0 } else { 1.0 / factor }
            }
            other => return Err(Unsupported(format!("RoPE scaling {other}"))),
        };
        let rope_mscale = md.f32("rope.scaling.attn_factor").unwrap_or(1.0);
        let rope_factors = match family {
            // llama.cpp gives llama's LongRoPE files the pair too; no published file has that.
            Family::Llama if scaling == "longrope" => {
                return Err(Unsupported("LongRoPE in a llama file".into()));
            }
            Family::Llama => Some("rope_freqs.weight"),
            Family::Phi3 => {
                let original = md
                    .usize("rope.scaling.original_context_length")?
                    .or(md.usize("context_length")?)
                    .unwrap_or(0);
                Some(if max_positions > original {
                    "rope_factors_long.weight"
                } else {
                    "rope_factors_short.weight"
                })
            }
            _ => None,
        };
        let rope_global = RopeParams {
            base,
            scale: freq_scale,
        };
        let mut rope_local = None;

        let rope = match family {
            Family::Llama => RopeStyle::Interleaved,
            _ => RopeStyle::Halves,
        };

        // Local (sliding-window) layers.
        let mut layers = vec![
            LayerHyper {
                window: None,
                rope_table: 0,
            };
            n_layers
        ];
        let swa = match family {
            Family::Gemma2 => Some((md.usize("attention.sliding_window")?.unwrap_or(4096), 2)),
            Family::Gemma3 => md
                .usize("attention.sliding_window")?
                .filter(|&w| w > 0)
                .map(|w| (w, 6)),
            _ => None,
        };
        if let Some((window, default_pattern)) = swa {
            let local = local_layers(&md, n_layers, default_pattern)?;
            rope_local = Some(match family {
                Family::Gemma2 => RopeParams {
                    base: md.f32("rope.freq_base_swa").unwrap_or(base),
                    scale: freq_scale,
                },
                _ => RopeParams {
                    base: md.f32("rope.freq_base_swa").unwrap_or(10_000.0),
                    scale: 1.0,
                },
            });
            for (layer, local) in layers.iter_mut().zip(local) {
                if local {
                    *layer = LayerHyper {
                        window: Some(window),
                        rope_table: 1,
                    };
                }
            }
        }

        // The attention scale: gemma's 27B models scale by the hidden size per head, the
        // others by the head size (llama.cpp tells the 27B models by their layer count).
        let big_gemma = matches!(
            (family, n_layers),
            (Family::Gemma2, 46) | (Family::Gemma3, 62)
        );
        let attn_scale = if big_gemma {
            1.0 / (default_head as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let (attn_softcap, final_softcap) = match family {
            Family::Gemma2 => (
                Some(md.f32("attn_logit_softcapping").unwrap_or(50.0)),
                Some(md.f32("final_logit_softcapping").unwrap_or(30.0)),
            ),
            Family::Gemma3 => (None, md.f32("final_logit_softcapping")),
            _ => (None, None),
        };
        let (attn_softcap, final_softcap) = (
            attn_softcap.filter(|&c| c > 0.0),
            final_softcap.filter(|&c| c > 0.0),
        );
        Ok(Hyper {
            family,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            eps,
            rope,
            rope_global,
            rope_local,
            rope_factors,
            rope_mscale,
            attn_scale,
            attn_softcap,
            final_softcap,
            embed_scale: family.is_gemma().then(|| (dim as f32).sqrt()),
            ffn_act: if family.is_gemma() {
                FfnAct::Gelu
            } else {
                FfnAct::Silu
            },
            post_norms: family.is_gemma(),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            qkv_bias: family == Family::Qwen2,
            layers,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Which layers are local: `attention.sliding_window_pattern` as an array of flags, or as `n`
/// (every layer but each `n`-th is local), or the family's default `n`.
fn local_layers(md: &Meta<'_>, n_layers: usize, default: usize) -> Result<Vec<bool>, Unsupported> {
    let key = "attention.sliding_window_pattern";
    if let Some(Value::Array(flags)) = md.get(key) {
        return match flags {
            Array::Bool(f) if f.len() >= n_layers => Ok(f[..n_layers].to_vec()),
            _ => Err(Unsupported(format!("{}.{key}", md.arch))),
        };
    }
    let n = md.usize(key)?.unwrap_or(default);
    Ok((0..n_layers).map(|il| n == 0 || il % n < n - 1).collect())
}
