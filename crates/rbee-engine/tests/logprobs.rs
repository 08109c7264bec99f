//! Log-probabilities through the engine's public API: they are the log-softmax of the logits
//! the token was sampled from, the top list is sorted and led by the greedy choice, and a
//! sequence reports the same numbers alone and sharing steps with another.

use std::ops::ControlFlow;

use anyhow::Context;
use model_gen::{GgufType, ModelFormat, ModelSpec};
use rbee_engine::{
    DeviceSpec, Engine, GeneratedToken, GenerationParams, LoadOptions, PreparedRequest, Prompt,
    Sequence,
};

fn load(slots: usize) -> anyhow::Result<Engine> {
    let path = model_gen::ensure_generated(
        &ModelSpec::small(),
        ModelFormat::Gguf(GgufType::Q4_0),
        &model_gen::paths::generated_dir(),
    )?;
    let opts = LoadOptions {
        model_path: path.clone(),
        device: DeviceSpec::Cpu,
        slots,
        context_length: None,
    };
    Engine::load(&opts, &mut |_| {}).with_context(|| format!("loading {}", path.display()))
}

fn request(
    engine: &Engine,
    prompt: &str,
    temperature: f32,
    logprobs: Option<usize>,
) -> anyhow::Result<PreparedRequest> {
    let params = GenerationParams {
        max_tokens: Some(8),
        temperature,
        seed: 11,
        logprobs,
        ..GenerationParams::default()
    };
    Ok(engine.prepare(Prompt::Text(prompt.into()), params)?)
}

/// A generated token with the raw logits it was sampled from.
type Scored = (Vec<f32>, GeneratedToken);

/// Runs `seqs` to their ends sharing steps; each one's tokens, and before each token the raw
/// logits it was sampled from.
fn run(engine: &mut Engine, mut seqs: Vec<Sequence>) -> anyhow::Result<Vec<Vec<Scored>>> {
    let mut out: Vec<Vec<Scored>> = vec![Vec::new(); seqs.len()];
    while seqs.iter().any(|s| !s.is_finished()) {
        let mut live: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| !s.is_finished()).collect();
        engine.step(&mut live)?;
        for (i, seq) in seqs.iter_mut().enumerate() {
            if seq.is_finished() || !seq.has_logits() {
                continue;
            }
            let logits = seq.pending_logits().expect("logits wait").to_vec();
            let tokens = &mut out[i];
            engine.advance(seq, &mut |t| {
                tokens.push((logits.clone(), t));
                ControlFlow::Continue(())
            })?;
        }
    }
    Ok(out)
}

#[test]
fn logprobs_are_the_log_softmax_of_the_sampled_logits() -> anyhow::Result<()> {
    let mut engine = load(1)?;
    let vocab = engine.info().vocab_size;
    // The whole vocabulary as the top list: its probabilities must sum to 1.
    let req = request(&engine, "Once upon a time", 0.0, Some(vocab))?;
    let seq = engine.begin(0, &req)?;
    let tokens = run(&mut engine, vec![seq])?.remove(0);
    assert!(!tokens.is_empty());
    for (logits, t) in &tokens {
        let lp = t.logprobs.as_ref().context("asked for logprobs")?;
        assert_eq!(lp.top.len(), vocab);
        let mass: f64 = lp.top.iter().map(|l| f64::from(l.logprob).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-3, "probabilities sum to {mass}");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        // Greedy: the sampled token is the most likely one.
        assert_eq!(lp.top[0].token_id, t.token_id);
        assert_eq!(lp.top[0].logprob, lp.token.logprob);
        assert_eq!(lp.token.token_id, t.token_id);
        // Log-softmax: logprob differences are logit differences.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for l in lp.top.iter().take(5) {
            let want = (logits[l.token_id as usize] - max) + lp.top[0].logprob;
            assert!((l.logprob - want).abs() < 1e-4, "{} vs {want}", l.logprob);
        }
        assert_eq!(
            lp.token.text,
            engine.tokenizer().decode(&[t.token_id], false)?
        );
    }
    // Without asking, nothing is computed.
    let req = request(&engine, "Once upon a time", 0.0, None)?;
    let seq = engine.begin(0, &req)?;
    let plain = run(&mut engine, vec![seq])?.remove(0);
    assert!(plain.iter().all(|(_, t)| t.logprobs.is_none()));
    let ids = |ts: &[Scored]| ts.iter().map(|t| t.1.token_id).collect::<Vec<_>>();
    assert_eq!(ids(&plain), ids(&tokens));
    Ok(())
}

#[test]
fn a_sequence_reports_the_same_logprobs_alone_and_batched() -> anyhow::Result<()> {
    let mut engine = load(2)?;
    let sampled = request(&engine, "Hello world, this is", 0.9, Some(3))?;
    let other = request(&engine, "The number 42 is", 0.0, None)?;
    let seq = engine.begin(0, &sampled)?;
    let alone = run(&mut engine, vec![seq])?.remove(0);
    let a = engine.begin(0, &other)?;
    let b = engine.begin(1, &sampled)?;
    let batched = run(&mut engine, vec![a, b])?.remove(1);
    assert_eq!(alone.len(), batched.len());
    for ((_, x), (_, y)) in alone.iter().zip(&batched) {
        assert_eq!(x.token_id, y.token_id);
        let (x, y) = (x.logprobs.as_ref().unwrap(), y.logprobs.as_ref().unwrap());
        assert_eq!(x.top.len(), 3);
        assert!((x.token.logprob - y.token.logprob).abs() < 1e-4);
        for (p, q) in x.top.iter().zip(&y.top) {
            assert_eq!((p.token_id, &p.text), (q.token_id, &q.text));
            assert!((p.logprob - q.logprob).abs() < 1e-4);
        }
    }
    Ok(())
}
