//! The shape of a generated model and its presets.

use crate::Error;
use crate::rng::fnv1a64;
use crate::tokenizer::MIN_VOCAB;

/// Bumped whenever the bytes written for an unchanged spec change (new init scales, new
/// vocabulary rule, new metadata), so cached files from an older generator are not reused.
pub const GENERATOR_VERSION: u32 = 1;

/// Model family. Decides tensor names, q/k/v biases, the rope layout in GGUF and the
/// `architectures` entry of `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    /// The name used in GGUF metadata keys (`{arch}.block_count`) and `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Qwen2 has biases on the q/k/v projections; llama has none.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
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
        match s {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(Error::UnknownName(format!(
                "unknown architecture {other:?} (expected llama or qwen2)"
            ))),
        }
    }
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
        }
    }

    /// A few MB. Hidden and FFN sizes are multiples of 256, so Q4_K applies to every matrix.
    pub fn small() -> Self {
        Self {
            arch: Arch::Llama,
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            ffn: 768,
            vocab: 2048,
            context_length: 1024,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            seed: 0,
            tie_embeddings: false,
        }
    }

    /// The dimensions of TinyLlama-1.1B (1.1 B parameters), for benchmarks.
    pub fn tinyllama() -> Self {
        Self {
            arch: Arch::Llama,
            hidden: 2048,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            ffn: 5632,
            vocab: 32_000,
            context_length: 2048,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            seed: 0,
            tie_embeddings: false,
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
            ..self
        }
    }

    /// A preset by name: `tiny`, `small` or `tinyllama`, in the given architecture.
    pub fn preset(name: &str, arch: Arch) -> Result<Self, Error> {
        let spec = match (name, arch) {
            ("tiny", Arch::Llama) => Self::tiny(),
            ("small", Arch::Llama) => Self::small(),
            ("tinyllama", Arch::Llama) => Self::tinyllama(),
            ("tiny", Arch::Qwen2) => Self::tiny_qwen2(),
            ("small", Arch::Qwen2) => Self::small_qwen2(),
            ("tinyllama", Arch::Qwen2) => Self::tinyllama().into_qwen2(),
            (other, _) => {
                return Err(Error::UnknownName(format!(
                    "unknown preset {other:?} (expected tiny, small or tinyllama)"
                )));
            }
        };
        Ok(spec)
    }

    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
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
        if !self.hidden.is_multiple_of(self.heads) {
            return fail(format!(
                "hidden {} is not a multiple of heads {}",
                self.hidden, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "heads {} is not a multiple of kv_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "head_dim {} must be even for rope",
                self.head_dim()
            ));
        }
        if self.vocab < MIN_VOCAB {
            return fail(format!(
                "vocab {} is below the {MIN_VOCAB} entries of specials, bytes and characters",
                self.vocab
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_eps > 0.0) {
            return fail("rope_theta and rms_eps must be positive".into());
        }
        Ok(())
    }

    /// A stable key for caches: readable prefix plus a hash of every field and the generator
    /// version.
    pub fn cache_key(&self) -> String {
        let canonical = format!(
            "v{GENERATOR_VERSION}|{}|{}|{}|{}|{}|{}|{}|{}|{:e}|{:e}|{}|{}",
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
            self.tie_embeddings
        );
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
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}
