//! The shape of a generated model and its presets.

use crate::Error;
use crate::rng::fnv1a64;
use crate::tokenizer::ChatFormat;

/// Bumped whenever the bytes written for an unchanged spec change (new init scales, new
/// vocabulary rule, new metadata), so cached files from an older generator are not reused.
pub const GENERATOR_VERSION: u32 = 2;

/// Model family. Decides tensor names and layout, the metadata keys, and how llama.cpp's
/// converter transforms the Hugging Face weights (llama's q/k row permutation, Gemma's `1 + w`
/// norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Self::Llama,
        Self::Qwen2,
        Self::Qwen3,
        Self::Gemma2,
        Self::Gemma3,
        Self::Phi3,
    ];

    /// llama.cpp's architecture name: `general.architecture` and the prefix of its keys
    /// (`{arch}.block_count`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// Qwen2 has biases on the q/k/v projections; the other families have none.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }

    /// Qwen3 and Gemma 3 RMS-normalize each head of q and k (`attn_q_norm`, `attn_k_norm`).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Gemma's RMSNorm multiplies by `1 + w`; llama.cpp's converter stores `1 + w`, so the
    /// file holds the effective scale.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// Only llama's q/k rows are interleaved by the converter (llama.cpp's "normal" rope);
    /// the other families rotate halves (NEOX) and keep Hugging Face's row order.
    pub fn permutes_qk(self) -> bool {
        matches!(self, Arch::Llama)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.gguf_name())
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|a| a.gguf_name() == s)
            .ok_or_else(|| {
                Error::UnknownName(format!(
                    "unknown architecture {s:?} (expected llama, qwen2, qwen3, gemma2, gemma3 or phi3)"
                ))
            })
    }
}

/// RoPE frequency scaling, written the way llama.cpp's converter writes each kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1's `rope_scaling` (`rope_type: llama3`): the converter turns it into the
    /// `rope_freqs.weight` tensor of per-dimension frequency divisors.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// Phi-3's LongRoPE: `rope_factors_short.weight` and `rope_factors_long.weight` (llama.cpp
    /// uses the long ones when its context exceeds `original_context`), plus
    /// `rope.scaling.original_context_length` and `rope.scaling.attn_factor`. The factors
    /// follow a fixed rule (see [`ModelSpec::longrope_factors`]).
    LongRope {
        original_context: usize,
    },
}

/// Everything that determines a generated model's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub seed: u64,
    pub tie_embeddings: bool,
    /// A head size other than `hidden / heads` (Mistral-Nemo, Qwen3, Gemma), written as
    /// `attention.key_length` / `value_length`. `None`: `hidden / heads`, and no such keys
    /// (except for Gemma, whose converter always writes them).
    pub explicit_head_dim: Option<usize>,
    pub rope_scaling: RopeScaling,
    /// Whether a [`RopeScaling::Llama3`] spec writes its `rope_freqs.weight`. A file without
    /// it is otherwise identical, for a test that the tensor is read.
    pub write_rope_freqs: bool,
    /// Gemma's sliding-window attention size (`attention.sliding_window`).
    pub sliding_window: Option<usize>,
    /// Gemma 2's `attn_logit_softcapping`.
    pub attn_softcap: Option<f32>,
    /// Gemma's `final_logit_softcapping`.
    pub final_softcap: Option<f32>,
    /// Special tokens, their ids and the chat template of the vocabulary.
    pub chat: ChatFormat,
    /// The standard deviation the output head gives the logits of a unit-RMS final state
    /// (from its rows that are not [`LoudRows`]), which sets the gap between the top two
    /// logits.
    pub logit_std: f32,
    /// A few output-head rows (the embedding's, when the head is tied) with a larger norm.
    pub loud_rows: Option<LoudRows>,
    /// Gemma 3's linear RoPE scaling (`rope.scaling.type = linear`, `rope.scaling.factor`):
    /// the global layers' positions divided by this factor.
    pub rope_linear_factor: Option<f32>,
}

/// Output-head rows scaled up, so that the logits have a heavier upper tail than a normal
/// distribution's: the top logit usually belongs to one of these rows and stands clear of the
/// next. With normally distributed logits the gap between the top two of a few thousand is
/// about a quarter of their spread while the top one is about 3.5 spreads high, so a
/// tolerance relative to the logit (as quantized weights need) covers many gaps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoudRows {
    /// One row in this many, chosen by a generator seeded with the model seed.
    pub one_in: u32,
    /// The factor on those rows.
    pub scale: f32,
}

impl ModelSpec {
    /// A few hundred KB. Every row length is a multiple of 32, so Q8_0 and Q4_0 apply to
    /// every matrix; Q4_K (row blocks of 256) falls back to Q5_0 everywhere.
    pub fn tiny() -> Self {
        Self {
            arch: Arch::Llama,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            vocab: 512,
            context_length: 512,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            seed: 0,
            tie_embeddings: false,
            explicit_head_dim: None,
            rope_scaling: RopeScaling::None,
            write_rope_freqs: true,
            sliding_window: None,
            attn_softcap: None,
            final_softcap: None,
            chat: ChatFormat::Llama2,
            logit_std: 6.0,
            loud_rows: None,
            rope_linear_factor: None,
        }
    }

    /// A few MB. Hidden and FFN sizes are multiples of 256, so Q4_K applies to every matrix.
    pub fn small() -> Self {
        Self {
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            ffn: 768,
            vocab: 2048,
            context_length: 1024,
            ..Self::tiny()
        }
    }

    /// [`ModelSpec::small`] with one 512-wide attention head: a head size the engine's CPU
    /// path has no attention for while candle's llama code runs it, for tests of files that
    /// path does not take (whatever their weight type).
    pub fn small_wide_head() -> Self {
        Self {
            hidden: 512,
            heads: 1,
            kv_heads: 1,
            ..Self::small()
        }
    }

    /// The dimensions of TinyLlama-1.1B (1.1 B parameters), for benchmarks.
    pub fn tinyllama() -> Self {
        Self {
            hidden: 2048,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            ffn: 5632,
            vocab: 32_000,
            context_length: 2048,
            ..Self::tiny()
        }
    }

    /// [`ModelSpec::tiny`] as qwen2, with Qwen2's rope base and epsilon and a tied output
    /// head (as the small Qwen2 checkpoints have).
    pub fn tiny_qwen2() -> Self {
        Self::tiny().into_qwen2()
    }

    /// [`ModelSpec::small`] as qwen2 (see [`ModelSpec::tiny_qwen2`]).
    pub fn small_qwen2() -> Self {
        Self::small().into_qwen2()
    }

    fn into_qwen2(self) -> Self {
        Self {
            arch: Arch::Qwen2,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            tie_embeddings: true,
            chat: ChatFormat::ChatMl,
            logit_std: tied_unit_norm_std(self.hidden),
            ..self
        }
    }

    /// Llama 3.2 style at the tiny size: a tied head, rope base 500 000, llama3 RoPE scaling
    /// (factor 8 below an original context of 64 tokens, so most rotary dimensions of a
    /// 16-wide head are divided by 2.4 to 8 and a model that ignores `rope_freqs.weight`
    /// attends differently within a few dozen tokens), and the Llama 3 chat format.
    pub fn tiny_llama3() -> Self {
        Self::tiny().into_llama3(true)
    }

    /// Llama 3.1 8B style at the small size (separate output head); see
    /// [`ModelSpec::tiny_llama3`].
    pub fn small_llama3() -> Self {
        Self::small().into_llama3(false)
    }

    fn into_llama3(self, tied: bool) -> Self {
        Self {
            rope_theta: 500_000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 64,
            },
            tie_embeddings: tied,
            chat: ChatFormat::Llama3,
            logit_std: WIDE_LOGIT_STD,
            ..self
        }
    }

    /// Each family's own defaults at the tiny size (hidden 64, a few hundred KB).
    pub fn tiny_arch(arch: Arch) -> Self {
        Self::tiny().into_arch(arch)
    }

    /// Each family's own defaults at the small size (hidden 256; every row length a multiple
    /// of 256, so Q4_K and Q6_K apply to every matrix).
    pub fn small_arch(arch: Arch) -> Self {
        Self::small().into_arch(arch)
    }

    /// The family defaults over the dimensions of a llama preset. Head sizes are twice
    /// `hidden / heads` where the real family's are larger than that (Qwen3, Gemma), so
    /// `heads * head_dim != hidden` as in those checkpoints.
    fn into_arch(self, arch: Arch) -> Self {
        let wide_head = Some(2 * self.hidden / self.heads);
        match arch {
            Arch::Llama => self,
            Arch::Qwen2 => self.into_qwen2(),
            Arch::Qwen3 => Self {
                arch,
                explicit_head_dim: wide_head,
                logit_std: WIDE_LOGIT_STD,
                ..self.into_qwen2()
            },
            // Gemma 2 2B: 8 heads over 4 KV heads, window 4096, caps 50 and 30, rope base
            // 10 000, a tied head. Here a 16-token window, so a 40-token prompt crosses it.
            Arch::Gemma2 => Self {
                arch,
                explicit_head_dim: wide_head,
                rms_eps: 1e-6,
                tie_embeddings: true,
                sliding_window: Some(16),
                attn_softcap: Some(50.0),
                final_softcap: Some(30.0),
                chat: ChatFormat::Gemma,
                // tanh(x / 30) * 30 flattens the top logits, so a wide spread does not set
                // them apart: a narrow one with a few loud rows keeps the top logit at about
                // 20, where the cap still passes two thirds of a gap, and usually well clear
                // of the next.
                logit_std: GEMMA2_LOGIT_STD,
                loud_rows: Some(GEMMA2_LOUD_ROWS),
                ..self
            },
            // Gemma 3 1B: global rope base 1 000 000 (local layers use llama.cpp's 10 000),
            // five local layers per global one, one KV head per four query heads, no soft
            // caps. Six layers so that layer 5 is global.
            Arch::Gemma3 => Self {
                arch,
                layers: 6,
                kv_heads: self.heads / 4,
                explicit_head_dim: wide_head,
                rope_theta: 1_000_000.0,
                rms_eps: 1e-6,
                tie_embeddings: true,
                sliding_window: Some(16),
                chat: ChatFormat::Gemma,
                logit_std: WIDE_LOGIT_STD,
                ..self
            },
            // Phi-3 mini: as many KV heads as heads, a separate head, LongRoPE. An original
            // context of 256 below the trained context: llama.cpp takes the long factors for a
            // context above 256 and the short ones otherwise (it pads every context to a
            // multiple of 256, so 256 is the smallest it runs).
            Arch::Phi3 => Self {
                arch,
                kv_heads: self.heads,
                rope_scaling: RopeScaling::LongRope {
                    original_context: 256,
                },
                chat: ChatFormat::Phi3,
                logit_std: WIDE_LOGIT_STD,
                ..self
            },
        }
    }

    /// The benchmark size class in each family: hidden 2048 and about 1.1 B parameters like
    /// TinyLlama, with the family's own proportions (Qwen3-1.7B's 16 heads of 128 over 8 KV
    /// heads; Gemma's heads of 256 and an FFN four times the hidden size, so fewer layers;
    /// Phi-3's one KV head per head and fused tensors, so fewer layers too), so that the
    /// families' speeds compare.
    pub fn tinyllama_arch(arch: Arch) -> Self {
        let base = Self::tinyllama().into_arch(arch);
        match arch {
            Arch::Llama | Arch::Qwen2 => base,
            Arch::Qwen3 => Self {
                heads: 16,
                kv_heads: 8,
                explicit_head_dim: Some(128),
                ..base
            },
            Arch::Gemma2 => Self {
                layers: 16,
                heads: 8,
                kv_heads: 4,
                explicit_head_dim: Some(256),
                ffn: 8192,
                sliding_window: Some(4096),
                ..base
            },
            Arch::Gemma3 => Self {
                layers: 17,
                heads: 8,
                kv_heads: 2,
                explicit_head_dim: Some(256),
                ffn: 8192,
                sliding_window: Some(512),
                ..base
            },
            Arch::Phi3 => Self { layers: 19, ..base },
        }
    }

    /// A preset by name: `tiny`, `small`, `tinyllama`, `tiny-llama3` / `small-llama3` /
    /// `tinyllama-llama3` (llama only), or `small-linear8` (gemma3 only: [`ModelSpec::small`]
    /// with the linear RoPE scaling by 8 of every Gemma 3 4B/12B/27B file), in the given
    /// architecture.
    pub fn preset(name: &str, arch: Arch) -> Result<Self, Error> {
        let spec = match (name, arch) {
            ("tiny", _) => Self::tiny_arch(arch),
            ("small", _) => Self::small_arch(arch),
            ("tinyllama", _) => Self::tinyllama_arch(arch),
            ("tiny-llama3", Arch::Llama) => Self::tiny_llama3(),
            ("small-llama3", Arch::Llama) => Self::small_llama3(),
            ("tinyllama-llama3", Arch::Llama) => Self::tinyllama().into_llama3(false),
            ("small-linear8", Arch::Gemma3) => Self::small_arch(arch).with_rope_linear_factor(8.0),
            ("tiny-llama3" | "small-llama3" | "tinyllama-llama3", _) => {
                return Err(Error::UnknownName(format!(
                    "preset {name:?} is a llama preset, not {arch}"
                )));
            }
            ("small-linear8", _) => {
                return Err(Error::UnknownName(format!(
                    "preset {name:?} is a gemma3 preset, not {arch}"
                )));
            }
            (other, _) => {
                return Err(Error::UnknownName(format!(
                    "unknown preset {other:?} (expected tiny, small, tinyllama, tiny-llama3, small-llama3, tinyllama-llama3 or small-linear8)"
                )));
            }
        };
        Ok(spec)
    }

    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    /// An explicit head size (Mistral-Nemo style: q is `[heads * head_dim, hidden]`, the
    /// output projection `[hidden, heads * head_dim]`).
    pub fn with_head_dim(self, head_dim: usize) -> Self {
        Self {
            explicit_head_dim: Some(head_dim),
            ..self
        }
    }

    /// Gemma 3's linear RoPE scaling of the global layers by `factor`.
    pub fn with_rope_linear_factor(self, factor: f32) -> Self {
        Self {
            rope_linear_factor: Some(factor),
            ..self
        }
    }

    /// The same file without `rope_freqs.weight` (everything else byte for byte as before,
    /// apart from the tensor's absence).
    pub fn without_rope_freqs(self) -> Self {
        Self {
            write_rope_freqs: false,
            ..self
        }
    }

    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim.unwrap_or(self.hidden / self.heads)
    }

    /// Rows of the query projection: `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim()
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// The `rope_freqs.weight` values of a llama3-scaled spec, computed as llama.cpp's
    /// converter computes them from `rope_scaling` (one divisor per rotary pair:
    /// 1 for short wavelengths, `factor` for long ones, a smooth blend between).
    pub fn llama3_rope_freqs(&self) -> Option<Vec<f32>> {
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } = self.rope_scaling
        else {
            return None;
        };
        let dim = self.head_dim();
        let (factor, low, high) = (
            f64::from(factor),
            f64::from(low_freq_factor),
            f64::from(high_freq_factor),
        );
        let old_context = original_context as f64;
        let low_freq_wavelen = old_context / low;
        let high_freq_wavelen = old_context / high;
        let values = (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let divisor = if wavelen < high_freq_wavelen {
                    1.0
                } else if wavelen > low_freq_wavelen {
                    factor
                } else {
                    let smooth = (old_context / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                divisor as f32
            })
            .collect();
        Some(values)
    }

    /// The `(short, long)` LongRoPE factors of a Phi-3 spec, one divisor per rotary pair.
    /// Like Phi-3's, both grow from 1 towards the low frequencies: the short ones to 3, the
    /// long ones to 16.
    pub fn longrope_factors(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        let RopeScaling::LongRope { .. } = self.rope_scaling else {
            return None;
        };
        let n = self.head_dim() / 2;
        let t = |i: usize| i as f64 / (n.max(2) - 1) as f64;
        let short = (0..n).map(|i| (1.0 + 2.0 * t(i) * t(i)) as f32).collect();
        let long = (0..n).map(|i| (1.0 + 15.0 * t(i)) as f32).collect();
        Some((short, long))
    }

    /// `rope.scaling.attn_factor` of a LongRoPE spec, as the converter derives it:
    /// `sqrt(1 + ln(s) / ln(original))` for `s = context / original > 1`, else 1.
    pub fn longrope_attn_factor(&self) -> Option<f32> {
        let RopeScaling::LongRope { original_context } = self.rope_scaling else {
            return None;
        };
        let scale = self.context_length as f64 / original_context as f64;
        let factor = if scale > 1.0 {
            (1.0 + scale.ln() / (original_context as f64).ln()).sqrt()
        } else {
            1.0
        };
        Some(factor as f32)
    }

    /// Checks the constraints every writer relies on.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |msg: String| Err(Error::InvalidSpec(msg));
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return fail("hidden, layers, heads and kv_heads must be non-zero".into());
        }
        if self.ffn == 0 || self.context_length == 0 {
            return fail("ffn and context_length must be non-zero".into());
        }
        if self.explicit_head_dim.is_none() && !self.hidden.is_multiple_of(self.heads) {
            return fail(format!(
                "hidden {} is not a multiple of heads {} (give an explicit head size)",
                self.hidden, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "heads {} is not a multiple of kv_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "head_dim {} must be even and non-zero for rope",
                self.head_dim()
            ));
        }
        let min_vocab = self.chat.min_vocab();
        if self.vocab < min_vocab {
            return fail(format!(
                "vocab {} is below the {min_vocab} entries of specials, bytes and characters",
                self.vocab
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_eps > 0.0) {
            return fail("rope_theta and rms_eps must be positive".into());
        }
        if !positive(self.logit_std) {
            return fail("logit_std must be positive".into());
        }
        if let Some(loud) = self.loud_rows
            && (loud.one_in == 0 || !positive(loud.scale))
        {
            return fail("loud rows need a non-zero one_in and a positive scale".into());
        }
        match (self.rope_scaling, self.arch) {
            (RopeScaling::None, _)
            | (RopeScaling::Llama3 { .. }, Arch::Llama)
            | (RopeScaling::LongRope { .. }, Arch::Phi3) => {}
            (RopeScaling::Llama3 { .. }, arch) => {
                return fail(format!("llama3 rope scaling is for llama, not {arch}"));
            }
            (RopeScaling::LongRope { .. }, arch) => {
                return fail(format!("LongRoPE is for phi3, not {arch}"));
            }
        }
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } = self.rope_scaling
            && !(factor > 0.0 && low_freq_factor < high_freq_factor && original_context > 0)
        {
            return fail(
                "llama3 rope scaling needs factor > 0, low_freq_factor < high_freq_factor \
                 and an original context"
                    .into(),
            );
        }
        if let RopeScaling::LongRope { original_context } = self.rope_scaling
            && original_context < 2
        {
            return fail("LongRoPE needs an original context of at least 2".into());
        }
        if self.sliding_window.is_some() && !self.arch.is_gemma() {
            return fail(format!(
                "sliding-window layers are written for gemma, not {}",
                self.arch
            ));
        }
        if self.sliding_window == Some(0) {
            return fail("a sliding window must be non-zero".into());
        }
        if self.attn_softcap.is_some() && self.arch != Arch::Gemma2 {
            return fail(format!(
                "attention soft-capping is gemma2's, not {}'s",
                self.arch
            ));
        }
        if self.final_softcap.is_some() && !self.arch.is_gemma() {
            return fail(format!(
                "final soft-capping is gemma's, not {}'s",
                self.arch
            ));
        }
        if self.attn_softcap.is_some_and(|c| !positive(c))
            || self.final_softcap.is_some_and(|c| !positive(c))
        {
            return fail("soft-capping values must be positive".into());
        }
        if let Some(factor) = self.rope_linear_factor {
            if self.arch != Arch::Gemma3 {
                return fail(format!(
                    "linear RoPE scaling is written for gemma3, not {}",
                    self.arch
                ));
            }
            if !positive(factor) {
                return fail("the linear RoPE scaling factor must be positive".into());
            }
        }
        // llama.cpp's gemma2 always reads the embedding as the output head.
        if self.arch == Arch::Gemma2 && !self.tie_embeddings {
            return fail("gemma2 ties its output head to the embedding".into());
        }
        Ok(())
    }

    /// A stable key for caches: readable prefix plus a hash of every field and the generator
    /// version.
    pub fn cache_key(&self) -> String {
        let canonical = format!(
            "v{GENERATOR_VERSION}|{}|{}|{}|{}|{}|{}|{}|{}|{:e}|{:e}|{}|{}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:e}",
            self.arch,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.ffn,
            self.vocab,
            self.context_length,
            self.rope_theta,
            self.rms_eps,
            self.seed,
            self.tie_embeddings,
            self.explicit_head_dim,
            self.rope_scaling,
            self.write_rope_freqs,
            self.sliding_window,
            self.attn_softcap,
            self.final_softcap,
            self.chat,
            self.logit_std,
        );
        // Appended only when set, so that specs without loud rows or linear RoPE scaling keep
        // their keys (and their cached files).
        let canonical = match self.loud_rows {
            Some(LoudRows { one_in, scale }) => format!("{canonical}|loud{one_in}x{scale:e}"),
            None => canonical,
        };
        let canonical = match self.rope_linear_factor {
            Some(factor) => format!("{canonical}|ropelinear{factor:e}"),
            None => canonical,
        };
        format!(
            "{}-h{}-l{}-{:016x}",
            self.arch,
            self.hidden,
            self.layers,
            fnv1a64(canonical.as_bytes())
        )
    }

    /// `general.name` in GGUF files.
    pub fn display_name(&self) -> String {
        format!(
            "rbee-generated-{}-h{}-l{}-s{}",
            self.arch, self.hidden, self.layers, self.seed
        )
    }

    /// Number of weights, biases and norm scales.
    pub fn parameter_count(&self) -> usize {
        crate::weights::tensor_defs(self)
            .iter()
            .filter(|t| t.in_hub())
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

/// The logits' spread in the presets added with the newer families: the gap between the
/// top two of a few hundred logits averages about 0.28 of it, so 16 puts about nine greedy
/// decisions in ten more than half a logit apart.
const WIDE_LOGIT_STD: f32 = 16.0;

/// Gemma 2's logit spread and loud rows: one embedding row in 100 (about 20 of the small
/// preset's 2048) at four times the norm. With the quantized types' tolerance, this puts 27
/// to 31 of 32 greedy steps of the small preset clear of a near-tie (seeds 0, 1 and 3), where
/// a spread of 8 and no loud rows put 8 to 11.
const GEMMA2_LOGIT_STD: f32 = 3.0;
const GEMMA2_LOUD_ROWS: LoudRows = LoudRows {
    one_in: 100,
    scale: 4.0,
};

fn positive(x: f32) -> bool {
    x.is_finite() && x > 0.0
}

/// The `logit_std` under which a tied head's final-norm signs have magnitude exactly 1 (the
/// embedding has unit variance, so the logits' spread is `sqrt(hidden)`).
fn tied_unit_norm_std(hidden: usize) -> f32 {
    (hidden as f32).sqrt()
}
