//! Continuous batching through the engine's public API: sequences that share steps, join a
//! running batch and leave it produce exactly what each produces alone, with sampling on too,
//! on the engine's CPU path and on candle's path.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use common::{Running, alone, generated, load};
use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_engine::{
    Completion, Engine, FinishReason, GenerationParams, PreparedRequest, Prompt, Sequence,
};

/// Requests with different prompts, lengths and sampling settings (one greedy, two sampled
/// with their own seeds, one with a repeat penalty).
fn requests(engine: &Engine) -> anyhow::Result<Vec<PreparedRequest>> {
    let cases = [
        ("Once upon a time", 12, 0.0, 1),
        ("Hello world, this is a test of batching", 9, 0.8, 7),
        ("What", 14, 1.0, 42),
        ("The number 42 is", 6, 0.0, 3),
    ];
    cases
        .into_iter()
        .map(|(prompt, n, temperature, seed)| {
            let params = GenerationParams {
                max_tokens: Some(n),
                temperature,
                seed,
                repeat_penalty: if seed == 3 { 1.3 } else { 1.0 },
                ..Default::default()
            };
            Ok(engine.prepare(Prompt::Text(prompt.into()), params)?)
        })
        .collect()
}

#[test]
fn batched_sequences_generate_what_they_generate_alone() -> anyhow::Result<()> {
    for ty in [GgufType::Q4_0, GgufType::Q4K] {
        let path = generated(ModelFormat::Gguf(ty))?;
        batched_equals_alone(&path, 2, &format!("{ty:?}"))?;
    }
    Ok(())
}

/// Every family, four requests in four slots: each stream gets exactly the tokens it gets
/// alone.
#[test]
fn every_family_serves_four_slots_batched() -> anyhow::Result<()> {
    use model_gen::Arch;
    let specs = [
        ModelSpec::small_llama3(),
        ModelSpec::small_arch(Arch::Qwen3),
        ModelSpec::small_arch(Arch::Gemma2),
        ModelSpec::small_arch(Arch::Gemma3),
        ModelSpec::small_arch(Arch::Phi3),
    ];
    for spec in specs {
        let format = ModelFormat::Gguf(GgufType::Q4KM);
        let path = model_gen::ensure_generated(&spec, format, &model_gen::paths::generated_dir())?;
        batched_equals_alone(&path, 4, &format!("{} {format}", spec.arch))?;
    }
    Ok(())
}

/// Runs [`requests`] alone, then in `slots` slots (each waiting request taking the first slot
/// that comes free), and checks that each got the same tokens, text and finish both ways.
fn batched_equals_alone(path: &Path, slots: usize, what: &str) -> anyhow::Result<()> {
    let mut engine = load(path, slots)?;
    assert_eq!(engine.slots(), slots, "{what}");
    let reqs = requests(&engine)?;
    let want = reqs
        .iter()
        .map(|r| alone(&mut engine, r))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Four requests: each waiting request takes the first slot that comes free, between
    // steps, while the other slots' sequences keep decoding.
    let mut waiting: Vec<usize> = (0..reqs.len()).rev().collect();
    let mut running: Vec<Running> = Vec::new();
    let mut got: Vec<Option<(Vec<u32>, Completion)>> = vec![None; reqs.len()];
    let mut steps = 0;
    while !(waiting.is_empty() && running.is_empty()) {
        for slot in 0..engine.slots() {
            if running.iter().all(|r| r.seq.slot() != slot)
                && let Some(request) = waiting.pop()
            {
                let seq = engine.begin(slot, &reqs[request])?;
                running.push(Running {
                    request,
                    seq,
                    ids: Vec::new(),
                });
            }
        }
        let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
        engine.step(&mut seqs)?;
        steps += 1;
        let mut still = Vec::new();
        for mut r in running.drain(..) {
            let ids = &mut r.ids;
            let done = engine.advance(&mut r.seq, &mut |t| {
                ids.push(t.token_id);
                ControlFlow::Continue(())
            })?;
            match done {
                Some(c) => got[r.request] = Some((r.ids, c)),
                None => still.push(r),
            }
        }
        running = still;
    }
    let sequential: usize = want.iter().map(|(ids, _)| ids.len()).sum();
    assert!(
        steps < sequential,
        "{what}: {steps} shared steps for {sequential} tokens"
    );
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let (ids, completion) = g.as_ref().expect("every request finished");
        assert_eq!(ids, &w.0, "{what} request {i}: tokens");
        assert_eq!(completion.text, w.1.text, "{what} request {i}: text");
        assert_eq!(completion.finish_reason, w.1.finish_reason, "{what} {i}");
        assert_eq!(completion.completion_tokens, w.1.completion_tokens);
    }
    Ok(())
}

#[test]
fn a_sequence_cancelled_mid_batch_ends_alone() -> anyhow::Result<()> {
    let path = generated(ModelFormat::Gguf(GgufType::Q4_0))?;
    let mut engine = load(&path, 2)?;
    let reqs = requests(&engine)?;
    let want = alone(&mut engine, &reqs[0])?;
    let mut keep = engine.begin(0, &reqs[0])?;
    let mut cut = engine.begin(1, &reqs[2])?;
    let mut kept = Vec::new();
    let mut cut_done = None;
    let mut kept_done = None;
    while kept_done.is_none() {
        let mut seqs: Vec<&mut Sequence> = vec![&mut keep];
        if cut_done.is_none() {
            seqs.push(&mut cut);
        }
        engine.step(&mut seqs)?;
        if cut_done.is_none() {
            // The client of the second sequence goes away after its second token.
            cut_done = engine.advance(&mut cut, &mut |t| {
                if t.index == 1 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
        }
        kept_done = engine.advance(&mut keep, &mut |t| {
            kept.push(t.token_id);
            ControlFlow::Continue(())
        })?;
    }
    let cut_done = cut_done.expect("the cut sequence ended");
    assert_eq!(cut_done.finish_reason, FinishReason::Cancelled);
    assert_eq!(cut_done.completion_tokens, 2);
    assert_eq!(kept, want.0, "the other sequence is unaffected");
    assert!(
        engine
            .advance(&mut cut, &mut |_| ControlFlow::Continue(()))
            .is_err(),
        "an ended sequence samples nothing more"
    );
    Ok(())
}

/// A file the engine's CPU path does not take runs on candle's path, which batches too (see
/// also `tests/candle_batching.rs`).
#[test]
fn a_model_on_candles_path_serves_four_slots_batched() -> anyhow::Result<()> {
    // A head size the engine's path has no attention for.
    let path = model_gen::ensure_generated(
        &ModelSpec::small_wide_head(),
        ModelFormat::Gguf(GgufType::Q8_0),
        &model_gen::paths::generated_dir(),
    )?;
    batched_equals_alone(&path, 4, "wide head Q8_0")?;
    let mut engine = load(&path, 4)?;
    let reqs = requests(&engine)?;
    let err = engine.begin(4, &reqs[0]).unwrap_err();
    assert!(err.to_string().contains("slot 4"), "{err}");
    Ok(())
}

#[test]
fn a_sequence_cancelled_between_steps_reports_what_it_generated() -> anyhow::Result<()> {
    let path = generated(ModelFormat::Gguf(GgufType::Q4_0))?;
    let mut engine = load(&path, 1)?;
    let reqs = requests(&engine)?;
    let mut seq = engine.begin(0, &reqs[0])?;
    engine.step(&mut [&mut seq])?;
    let first = engine.advance(&mut seq, &mut |_| ControlFlow::Continue(()))?;
    assert!(first.is_none());
    let done = seq.cancel();
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert_eq!(done.completion_tokens, 1);
    assert!(seq.is_finished());
    engine.step(&mut [&mut seq])?;
    assert!(!seq.has_logits(), "an ended sequence is not fed");
    Ok(())
}

#[test]
fn a_long_prompt_joining_a_batch_is_fed_over_several_steps_with_the_same_result()
-> anyhow::Result<()> {
    let path = generated(ModelFormat::Gguf(GgufType::Q4_0))?;
    let mut engine = load(&path, 3)?;
    let long = "the quick brown fox jumps over the lazy dog and runs ".repeat(10);
    let params = GenerationParams {
        max_tokens: Some(6),
        temperature: 0.0,
        ..Default::default()
    };
    let long = engine.prepare(Prompt::Text(long), params)?;
    assert!(
        long.prompt_tokens().len() > 200,
        "a prompt of several chunks"
    );
    let reqs = requests(&engine)?;
    let (want_long, _) = alone(&mut engine, &long)?;
    let (want_short, _) = alone(&mut engine, &reqs[0])?;

    let mut short = engine.begin(0, &reqs[0])?;
    let mut joined = engine.begin(1, &long)?;
    let (mut got_short, mut got_long) = (Vec::new(), Vec::new());
    let (mut short_done, mut long_done) = (false, false);
    let mut steps_while_prefilling = 0;
    while !(short_done && long_done) {
        let mut seqs: Vec<&mut Sequence> = Vec::new();
        if !short_done {
            seqs.push(&mut short);
        }
        if !long_done {
            seqs.push(&mut joined);
        }
        engine.step(&mut seqs)?;
        if !joined.is_prefilled() && !joined.has_logits() {
            steps_while_prefilling += 1;
        }
        for (seq, ids, done) in [
            (&mut short, &mut got_short, &mut short_done),
            (&mut joined, &mut got_long, &mut long_done),
        ] {
            if !*done && seq.has_logits() {
                *done = engine
                    .advance(seq, &mut |t| {
                        ids.push(t.token_id);
                        ControlFlow::Continue(())
                    })?
                    .is_some();
            }
        }
    }
    assert!(
        steps_while_prefilling >= 3,
        "the long prompt went in 64-token chunks beside the short one ({steps_while_prefilling} steps)"
    );
    assert_eq!(got_short, want_short, "the short sequence");
    assert_eq!(got_long, want_long, "the long sequence");
    Ok(())
}

#[test]
fn a_replaced_sequence_cannot_be_stepped() -> anyhow::Result<()> {
    let path = generated(ModelFormat::Gguf(GgufType::Q4_0))?;
    let mut engine = load(&path, 1)?;
    let reqs = requests(&engine)?;
    let mut old = engine.begin(0, &reqs[0])?;
    engine.step(&mut [&mut old])?;
    let mut new = engine.begin(0, &reqs[1])?;
    let err = engine.step(&mut [&mut old]).unwrap_err();
    assert!(err.to_string().contains("replaced"), "{err}");
    engine.step(&mut [&mut new])?;
    assert!(new.has_logits());
    Ok(())
}
