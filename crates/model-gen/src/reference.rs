//! The llama.cpp reference fixtures: what `cargo xtask refs` writes after running llama.cpp on
//! a generated model, and what the engine's tests read back to compare with.

use serde::{Deserialize, Serialize};

/// One fixture file: a reference case's model, how llama.cpp ran, the prompt and the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fixture {
    pub case: String,
    pub model: ModelIdentity,
    pub llama_cpp_python: String,
    pub settings: Settings,
    pub prompt: Vec<u32>,
    pub steps: Vec<Step>,
}

/// Which generated file the fixture was made from: enough to generate it again, and its hash
/// to tell whether the generator still writes the same bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub arch: String,
    pub preset: String,
    pub r#type: String,
    pub seed: u64,
    pub generator_version: u32,
    pub sha256: String,
}

/// How llama.cpp ran; the engine runs with the same context (Phi-3's LongRoPE picks its
/// factors by it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub n_ctx: usize,
    pub n_threads: usize,
    pub kv_cache: String,
    pub flash_attn: bool,
}

/// One greedy step: the argmax and the top logits of the last position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub argmax: u32,
    /// `(id, logit)`, highest logit first.
    pub top: Vec<(u32, f64)>,
}
