//! Continuous batching on candle's path (the path a GPU runs), tested on candle's CPU device:
//! a safetensors llama checkpoint, and an F16 GGUF forced off the engine's CPU path
//! (`RBEE_CPU_KERNELS=0`). Four slots, four prompts starting at different steps, so each joins
//! while the others are mid-generation; each stream gets exactly the tokens it gets alone, and
//! a stream alone gets exactly the tokens candle's own model code generates.

mod common;

use std::fs::File;
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::Context;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, quantized_llama};
use common::{Running, alone, generated, load};
use model_gen::{GgufType, ModelFormat};
use rbee_engine::{Engine, FinishReason, GenerationParams, PreparedRequest, Prompt, Sequence};

const SLOTS: usize = 4;

/// Four greedy requests with different prompts and lengths.
fn requests(engine: &Engine) -> anyhow::Result<Vec<PreparedRequest>> {
    let cases = [
        ("Once upon a time", 14),
        ("Hello world, this is a test of batching on candle", 10),
        ("What", 16),
        ("The number 42 is", 12),
    ];
    cases
        .into_iter()
        .map(|(prompt, n)| {
            let params = GenerationParams {
                max_tokens: Some(n),
                ..GenerationParams::greedy()
            };
            Ok(engine.prepare(Prompt::Text(prompt.into()), params)?)
        })
        .collect()
}

/// Request `i` begins in slot `i` at step `2 i`, while the earlier ones are decoding; returns
/// each request's tokens, and how many steps ran with more than one sequence fed.
fn interleaved(
    engine: &mut Engine,
    reqs: &[PreparedRequest],
) -> anyhow::Result<(Vec<Vec<u32>>, usize)> {
    let mut running: Vec<Running> = Vec::new();
    let mut got = vec![None; reqs.len()];
    let mut shared_steps = 0;
    let mut step = 0;
    while got.iter().any(Option::is_none) {
        if step % 2 == 0 && step / 2 < reqs.len() {
            let request = step / 2;
            let seq = engine.begin(request, &reqs[request])?;
            running.push(Running {
                request,
                seq,
                ids: Vec::new(),
            });
        }
        step += 1;
        if running.len() > 1 {
            shared_steps += 1;
        }
        let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
        engine.step(&mut seqs)?;
        let mut still = Vec::new();
        for mut r in running.drain(..) {
            let ids = &mut r.ids;
            let done = engine.advance(&mut r.seq, &mut |t| {
                ids.push(t.token_id);
                ControlFlow::Continue(())
            })?;
            match done {
                Some(c) => {
                    assert_ne!(c.finish_reason, FinishReason::Cancelled);
                    got[r.request] = Some(r.ids);
                }
                None => still.push(r),
            }
        }
        running = still;
        anyhow::ensure!(step < 1000, "the generations do not end");
    }
    Ok((got.into_iter().map(Option::unwrap).collect(), shared_steps))
}

/// `n` greedy tokens after a prompt's tokens, by candle's own model code.
type Reference<'a> = dyn Fn(&[u32], usize) -> anyhow::Result<Vec<u32>> + 'a;

/// The engine serves four slots on `path`; each of four interleaved streams gets what it gets
/// alone, and alone what `reference` (candle's code, greedy from the prompt's tokens) gets.
fn four_slots_batched(path: &Path, what: &str, reference: &Reference<'_>) -> anyhow::Result<()> {
    let mut engine = load(path, SLOTS)?;
    assert_eq!(engine.slots(), SLOTS, "{what}: slots");
    let reqs = requests(&engine)?;
    let mut want = Vec::new();
    // candle's path keeps no prompt cache (the engine's CPU path would reuse this prompt).
    alone(&mut engine, &reqs[0])?;
    let (_, again) = alone(&mut engine, &reqs[0])?;
    assert_eq!(again.cached_tokens, 0, "{what} runs on candle's path");
    for (i, req) in reqs.iter().enumerate() {
        let (ids, _) = alone(&mut engine, req)?;
        assert!(ids.len() >= 4, "{what} request {i}: {ids:?}");
        let theirs = reference(req.prompt_tokens(), ids.len())?;
        assert_eq!(ids, theirs, "{what} request {i}: alone vs candle's code");
        want.push(ids);
    }
    let (got, shared_steps) = interleaved(&mut engine, &reqs)?;
    assert!(shared_steps >= 10, "{what}: {shared_steps} shared steps");
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "{what} request {i}: batched vs alone");
    }
    Ok(())
}

fn argmax(logits: &Tensor) -> anyhow::Result<u32> {
    let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    Ok((0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .context("no logits")? as u32)
}

/// `n` greedy tokens after `prompt` from a forward function taking `(tokens, pos)`.
fn greedy(
    prompt: &[u32],
    n: usize,
    mut forward: impl FnMut(&[u32], usize) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Vec<u32>> {
    let mut ids = vec![argmax(&forward(prompt, 0)?)?];
    while ids.len() < n {
        let pos = prompt.len() + ids.len() - 1;
        ids.push(argmax(&forward(&ids[ids.len() - 1..], pos)?)?);
    }
    Ok(ids)
}

fn input(tokens: &[u32]) -> anyhow::Result<Tensor> {
    Ok(Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?)
}

#[test]
fn a_safetensors_checkpoint_serves_four_slots_batched() -> anyhow::Result<()> {
    let dir = generated(ModelFormat::Hub)?;
    let config: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let config = config.into_config(false);
    // Read whole: mapping the file takes unsafe code.
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = llama::Llama::load(vb, &config)?;
    let reference = |prompt: &[u32], n: usize| {
        let mut cache = llama::Cache::new(true, DType::F32, &config, &Device::Cpu)?;
        greedy(prompt, n, |tokens, pos| {
            Ok(model.forward(&input(tokens)?, pos, &mut cache)?)
        })
    };
    four_slots_batched(&dir, "safetensors", &reference)
}

/// The variable that turns the engine's CPU path off; set for a child run of this test binary,
/// since a test cannot change its own process's environment safely.
const CPU_PATH_OFF: (&str, &str) = ("RBEE_CPU_KERNELS", "0");

#[test]
fn an_f16_gguf_forced_onto_candles_path_serves_four_slots_batched() -> anyhow::Result<()> {
    let name = "an_f16_gguf_forced_onto_candles_path_serves_four_slots_batched";
    if std::env::var(CPU_PATH_OFF.0).as_deref() != Ok(CPU_PATH_OFF.1) {
        let output = std::process::Command::new(std::env::current_exe()?)
            .args([name, "--exact", "--nocapture", "--test-threads", "1"])
            .env(CPU_PATH_OFF.0, CPU_PATH_OFF.1)
            .output()?;
        let out = String::from_utf8_lossy(&output.stdout);
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{out}\n{err}");
        assert!(out.contains("1 passed"), "the test ran in the child: {out}");
        return Ok(());
    }
    let path = generated(ModelFormat::Gguf(GgufType::F16))?;
    let reference = |prompt: &[u32], n: usize| {
        let mut file = File::open(&path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let mut model = quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
        greedy(prompt, n, |tokens, pos| {
            Ok(model.forward(&input(tokens)?, pos)?)
        })
    };
    four_slots_batched(&path, "F16 GGUF", &reference)
}
