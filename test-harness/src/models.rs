use std::path::PathBuf;

use model_gen::{GgufType, ModelFormat, ModelSpec};

/// The SmolLM2 GGUF. Panics with the command that fetches it when it is missing: a test
/// that needs real text must not pass silently without it.
pub fn smollm2() -> PathBuf {
    model_gen::paths::smollm2_gguf().unwrap_or_else(|| {
        panic!(
            "SmolLM2 is not at {}; run `cargo xtask fetch-smollm2` (or set {})",
            model_gen::paths::smollm2_default_path().display(),
            model_gen::paths::SMOLLM2_ENV
        )
    })
}

/// The tiny generated llama model as a Q8_0 GGUF, generated into the shared cache if needed.
pub fn tiny_model() -> PathBuf {
    model_gen::ensure_generated(
        &ModelSpec::tiny(),
        ModelFormat::Gguf(GgufType::Q8_0),
        &model_gen::paths::generated_dir(),
    )
    .expect("generate the tiny test model")
}

/// The tiny generated llama model, as a Q8_0 GGUF, with a file that says it was trained for
/// 16,384 positions: a long context on a model fast enough to feed it in seconds.
pub fn long_context_model() -> PathBuf {
    let spec = ModelSpec {
        context_length: 16384,
        ..ModelSpec::tiny()
    };
    model_gen::ensure_generated(
        &spec,
        ModelFormat::Gguf(GgufType::Q8_0),
        &model_gen::paths::generated_dir(),
    )
    .expect("generate the long-context test model")
}

/// A generated llama model big enough that a long generation takes seconds on a CPU (about
/// 30 M parameters as Q8_0, a 2048-token context), for tests that must act while a stream is
/// still in flight.
pub fn slow_model() -> PathBuf {
    let spec = ModelSpec {
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 4,
        ffn: 1536,
        vocab: 4096,
        context_length: 2048,
        ..ModelSpec::tiny()
    };
    model_gen::ensure_generated(
        &spec,
        ModelFormat::Gguf(GgufType::Q8_0),
        &model_gen::paths::generated_dir(),
    )
    .expect("generate the slow test model")
}
