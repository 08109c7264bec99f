//! The context a model runs with (`LoadOptions::context_length`): the trained one by default,
//! uncapped on the engine's CPU path, capped at what candle's llama holds on candle's code, and,
//! when asked for, smaller than trained: then it bounds prompt plus generation.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_engine::{
    DeviceSpec, Engine, EngineError, FinishReason, GenerationParams, LoadOptions, Prompt,
};

/// The most positions candle's `quantized_llama` holds.
const CANDLE_LLAMA_POSITIONS: usize = 4096;

/// The tiny llama, trained (as its file says) for 16,384 positions: more than candle's llama
/// holds.
fn long_spec() -> ModelSpec {
    ModelSpec {
        context_length: 16384,
        ..ModelSpec::tiny()
    }
}

fn generated(spec: &ModelSpec, ty: GgufType) -> anyhow::Result<PathBuf> {
    let format = ModelFormat::Gguf(ty);
    model_gen::ensure_generated(spec, format, &model_gen::paths::generated_dir())
        .with_context(|| format!("generating {format}"))
}

fn load(path: &Path, slots: usize, context_length: Option<usize>) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        model_path: path.to_path_buf(),
        device: DeviceSpec::Cpu,
        slots,
        context_length,
    };
    Engine::load(&opts, &mut |_| {}).with_context(|| format!("loading {}", path.display()))
}

/// Whether `path` runs on the engine's CPU path here (not with `RBEE_CPU_KERNELS=0`).
fn on_cpu_path(path: &Path) -> anyhow::Result<bool> {
    Ok(gguf_info::runs_on_cpu_path(&gguf_info::Header::open(path)?))
}

/// A text prompt of `words` words, each one or more tokens.
fn words(words: usize) -> String {
    (0..words).map(|i| format!("w{i} ")).collect()
}

#[test]
fn the_cpu_path_runs_the_trained_context_or_the_one_asked_for() -> anyhow::Result<()> {
    let path = generated(&long_spec(), GgufType::Q8_0)?;
    if !on_cpu_path(&path)? {
        eprintln!("skipped: the engine's CPU path is turned off");
        return Ok(());
    }
    let engine = load(&path, 1, None)?;
    assert_eq!(engine.info().trained_context_length, 16384);
    assert_eq!(
        engine.info().context_length,
        16384,
        "the CPU path has no fixed limit: the trained context, not candle's {CANDLE_LLAMA_POSITIONS}"
    );
    assert_eq!(
        load(&path, 1, Some(0))?.info().context_length,
        16384,
        "0: the trained context"
    );
    assert_eq!(load(&path, 1, Some(1000))?.info().context_length, 1000);
    // More than trained is allowed, as llama.cpp allows it.
    assert_eq!(load(&path, 1, Some(20000))?.info().context_length, 20000);
    Ok(())
}

#[test]
fn candles_llama_caps_the_context_at_what_it_holds() -> anyhow::Result<()> {
    // A head size the engine's path has no attention for: the file runs on candle's
    // `quantized_llama`.
    let spec = ModelSpec {
        context_length: 16384,
        ..ModelSpec::small_wide_head()
    };
    let path = generated(&spec, GgufType::Q8_0)?;
    assert!(
        !on_cpu_path(&path)?,
        "a file with a wide head runs on candle's code"
    );
    let engine = load(&path, 1, None)?;
    assert_eq!(engine.info().trained_context_length, 16384);
    assert_eq!(engine.info().context_length, CANDLE_LLAMA_POSITIONS);
    assert_eq!(
        load(&path, 1, Some(9000))?.info().context_length,
        CANDLE_LLAMA_POSITIONS
    );
    assert_eq!(load(&path, 1, Some(1000))?.info().context_length, 1000);
    Ok(())
}

#[test]
fn a_context_smaller_than_trained_bounds_prompt_and_generation() -> anyhow::Result<()> {
    const CONTEXT: usize = 48;
    for ty in [GgufType::Q8_0, GgufType::F32] {
        let path = generated(&ModelSpec::tiny(), ty)?;
        let mut engine = load(&path, 1, Some(CONTEXT))?;
        assert_eq!(engine.info().trained_context_length, 512);
        assert_eq!(engine.info().context_length, CONTEXT, "{ty}");

        // A prompt that fills the context leaves no room: refused before anything runs.
        let long = engine.prepare(Prompt::Text(words(CONTEXT)), GenerationParams::greedy());
        match long {
            Err(EngineError::ContextLengthExceeded {
                prompt_tokens,
                context_length,
            }) => {
                assert!(prompt_tokens >= CONTEXT, "{prompt_tokens}");
                assert_eq!(context_length, CONTEXT);
            }
            other => panic!("{ty}: expected ContextLengthExceeded, got {other:?}"),
        }

        // A shorter prompt generates at most what the context leaves, even when asked for more.
        // The random model may pick its end-of-sequence token first, so several prompts run,
        // and at least one must reach the context.
        let mut reached = 0;
        for n in 4..12 {
            let params = GenerationParams {
                max_tokens: Some(1000),
                ..GenerationParams::greedy()
            };
            let req = engine.prepare(Prompt::Text(words(n)), params)?;
            let prompt = req.prompt_tokens().len();
            assert!(prompt < CONTEXT, "{prompt}");
            assert_eq!(req.max_tokens(), CONTEXT - prompt, "{ty}");
            let mut ids = Vec::new();
            let completion = engine.generate(&req, &mut |t| {
                ids.push(t.token_id);
                ControlFlow::Continue(())
            })?;
            assert_eq!(completion.prompt_tokens, prompt);
            assert_eq!(completion.completion_tokens, ids.len());
            match completion.finish_reason {
                FinishReason::Length => {
                    assert_eq!(prompt + ids.len(), CONTEXT, "{ty}");
                    reached += 1;
                }
                FinishReason::Stop => {
                    assert!(prompt + ids.len() <= CONTEXT, "{ty}");
                    assert!(engine.info().eos_token_ids.contains(ids.last().unwrap()));
                }
                other => panic!("{ty}: {other:?}"),
            }
        }
        assert!(reached > 0, "{ty}: no generation reached the context");
    }
    Ok(())
}

#[test]
fn a_kv_cache_too_large_to_set_aside_fails_the_request_with_a_reason() -> anyhow::Result<()> {
    let path = generated(&ModelSpec::tiny(), GgufType::Q8_0)?;
    if !on_cpu_path(&path)? {
        eprintln!("skipped: the engine's CPU path is turned off");
        return Ok(());
    }
    // More positions than any allocation may hold: the cache is set aside for the whole
    // context at its first use, so the request fails there, clearly, instead of the process.
    let mut engine = load(&path, 1, Some(usize::MAX / 2))?;
    let params = GenerationParams {
        max_tokens: Some(4),
        ..GenerationParams::greedy()
    };
    let req = engine.prepare(Prompt::Text(words(4)), params)?;
    let err = engine
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .expect_err("no such KV cache");
    assert!(
        err.to_string().contains("cannot set aside a KV cache"),
        "{err}"
    );
    Ok(())
}
