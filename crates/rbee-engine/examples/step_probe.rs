//! Decode speed of the engine alone, without the worker's HTTP and the benchmark's clients on
//! the same cores: `N` sequences with the same 64-word prompt step together, and the probe
//! prints the rate their prompts were fed at, the aggregate decode rate and the time a decode
//! step takes. For profiling a step (`perf record`) and for comparing kernel changes quickly;
//! `cargo xtask bench worker` is the benchmark of record.
//!
//! `cargo run -p rbee-engine --example step_probe -- MODEL.gguf [THREADS] [N,N,…] [TOKENS]`

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::Context;
use rbee_engine::{DeviceSpec, Engine, GenerationParams, LoadOptions, Prompt, Sequence};

/// Steps after the prompt before the clock starts.
const WARMUP_STEPS: usize = 4;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: step_probe MODEL.gguf [THREADS] [N,N,…] [TOKENS]";
    let path = args.first().context(usage)?;
    let threads: usize = args.get(1).map_or(Ok(2), |s| s.parse()).context(usage)?;
    let counts: Vec<usize> = match args.get(2) {
        Some(list) => list
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context(usage)?,
        None => vec![1, 4],
    };
    let tokens: usize = args.get(3).map_or(Ok(64), |s| s.parse()).context(usage)?;
    anyhow::ensure!(counts.iter().all(|&n| n > 0), "{usage}");

    rbee_engine::set_cpu_threads(threads)?;
    let opts = LoadOptions {
        model_path: path.into(),
        device: DeviceSpec::Cpu,
        slots: counts.iter().copied().max().unwrap_or(1),
        context_length: None,
    };
    let mut engine = Engine::load(&opts, &mut |_| {})?;
    // Every count feeds the same prompt again: measure its prefill, not the prompt cache.
    engine.set_prompt_cache(rbee_engine::PromptCacheOptions {
        enabled: false,
        store_bytes: 0,
    });
    let prompt: String = (0..64).map(|i| format!("w{i} ")).collect();
    let params = GenerationParams {
        max_tokens: Some(WARMUP_STEPS + tokens),
        temperature: 0.0,
        ..Default::default()
    };
    let req = engine.prepare(Prompt::Text(prompt), params)?;
    for &n in &counts {
        let mut seqs: Vec<Sequence> = (0..n)
            .map(|slot| engine.begin(slot, &req))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        while !seqs.iter().all(|s| s.has_logits()) {
            engine.step(&mut seqs.iter_mut().collect::<Vec<_>>())?;
        }
        let prefill = started.elapsed().as_secs_f64();
        let mut generated = 0;
        let mut steps = 0;
        let mut clock = None;
        while seqs.iter().any(|s| !s.is_finished()) {
            if clock.is_none() && generated >= WARMUP_STEPS * n {
                clock = Some((Instant::now(), generated, steps));
            }
            engine.step(&mut seqs.iter_mut().collect::<Vec<_>>())?;
            steps += 1;
            for seq in seqs.iter_mut().filter(|s| s.has_logits()) {
                engine.advance(seq, &mut |_| {
                    generated += 1;
                    ControlFlow::Continue(())
                })?;
            }
        }
        let (started, generated0, steps0) = clock
            .filter(|&(_, _, steps0)| steps > steps0)
            .context("the sequences ended before the clock started (end of sequence?)")?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{n} sequence(s), {threads} thread(s): prefill {:.1} tok/s, decode {:.1} tok/s, {:.1} ms per decode step",
            (n * req.prompt_tokens().len()) as f64 / prefill,
            (generated - generated0) as f64 / seconds,
            1e3 * seconds / (steps - steps0) as f64
        );
    }
    Ok(())
}
