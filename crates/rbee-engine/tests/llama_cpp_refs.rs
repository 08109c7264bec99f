//! The engine against llama.cpp itself, on generated random-weight models: for every fixture
//! in `tests/fixtures/llama_cpp/` (written by `cargo xtask refs`, which runs the pinned
//! llama-cpp-python), the same prompt ids and the same greedy ids, fed one by one, at the
//! context llama.cpp ran with, give the same argmax and the same top logits within a stated
//! tolerance.
//!
//! Each fixture names the generated file it was made from (model-gen preset, architecture,
//! type, seed) and its SHA-256: the test generates the file again and refuses to compare
//! against a fixture made from other bytes. These tests never run llama.cpp.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use model_gen::reference::Fixture;
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};
use rbee_engine::{DeviceSpec, Engine, LoadOptions};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama_cpp");

/// How the engine's logits are compared with llama.cpp's, by weight type.
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    /// A logit may be off by `abs + rel * |reference|`.
    abs: f64,
    rel: f64,
    /// Whether the argmax must match at every step, or only at the decisive ones: where the
    /// reference's top two are further apart than the tolerance.
    argmax_everywhere: bool,
    /// Decisive steps a fixture needs to mean anything: with nearly tied top logits,
    /// agreeing on the argmax proves little.
    min_decisive: usize,
}

impl Tolerance {
    fn of(logit: f64, tol: Self) -> f64 {
        tol.abs + tol.rel * logit.abs()
    }

    /// The tolerances, set from measured differences with room for other CPUs' summation
    /// orders (the largest difference measured on x86-64 with AVX2, in parentheses).
    ///
    /// F32 (0.006 at a logit of 50): both sides compute in f32 and differ in summation order
    /// only. F16 (0.032 at 50, 0.06 %): llama.cpp rounds the activations to f16 before every
    /// product with F16 weights. BF16 (0.053 at 15, 0.35 %; 0.0085 for F16 on the same
    /// model): likewise in bf16, whose 8-bit significand is 3 bits shorter than f16's, so
    /// F16's tolerance times 8; and, as with quantized types, a difference upstream flips
    /// some of those coarse roundings, so near-ties (a margin of 0.035 at 19) can swap and
    /// the argmax is compared at the decisive steps only. Quantized types (3.2 % of the logit): both sides quantize the
    /// activations to 8 bits before every product, and any difference upstream, however small,
    /// flips some roundings, which changes the next products by whole quantization steps; so
    /// the two runs differ by about the activation quantization noise itself. llama.cpp differs
    /// from itself as much when only its KV cache is F16 instead of F32. That noise floor,
    /// a few percent of the logits' spread, also makes near-ties common, so a quantized fixture
    /// needs most steps (more than half) decisive rather than three quarters.
    fn for_type(ty: &str) -> anyhow::Result<Self> {
        let tol = match ty {
            "f32" => Self {
                abs: 5e-3,
                rel: 2e-4,
                argmax_everywhere: true,
                min_decisive: 24,
            },
            "f16" => Self {
                abs: 2e-2,
                rel: 1e-3,
                argmax_everywhere: true,
                min_decisive: 24,
            },
            "bf16" => Self {
                abs: 0.1,
                rel: 8e-3,
                argmax_everywhere: false,
                min_decisive: 24,
            },
            "q8_0" | "q4_0" | "q4_k" | "q6_k" | "q4_k_m" | "q5_k_m" | "q5_0" | "q3_k_m"
            | "q2_k" => Self {
                abs: 0.25,
                rel: 3.5e-2,
                argmax_everywhere: false,
                min_decisive: 17,
            },
            other => bail!("no tolerance for weight type {other:?}"),
        };
        Ok(tol)
    }
}

fn fixtures() -> anyhow::Result<Vec<(PathBuf, Fixture)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(FIXTURES)
        .with_context(|| format!("reading {FIXTURES}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let fixture: Fixture = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            Ok((path, fixture))
        })
        .collect()
}

/// The fixture's model, generated again into the shared test-model cache, checked against the
/// fixture's hash.
fn model_of(fixture: &Fixture) -> anyhow::Result<PathBuf> {
    let m = &fixture.model;
    let arch: Arch = m.arch.parse()?;
    let ty: GgufType = m.r#type.parse()?;
    let spec = ModelSpec::preset(&m.preset, arch)?.with_seed(m.seed);
    let path = model_gen::ensure_generated(
        &spec,
        ModelFormat::Gguf(ty),
        &model_gen::paths::generated_dir(),
    )?;
    let sha = model_gen::paths::sha256_file(&path)?;
    ensure!(
        sha == m.sha256,
        "fixture is stale: run cargo xtask refs (model-gen now writes {} with sha256 {sha}, \
         the fixture was made from {} by generator version {}, this is version {})",
        path.display(),
        m.sha256,
        m.generator_version,
        model_gen::GENERATOR_VERSION
    );
    Ok(path)
}

/// The engine on `path` with a context of `n_ctx` positions, as llama.cpp ran.
fn load(path: &Path, n_ctx: usize) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        model_path: path.to_path_buf(),
        device: DeviceSpec::Cpu,
        slots: 1,
        context_length: Some(n_ctx),
    };
    Engine::load(&opts, &mut |_| {}).with_context(|| format!("loading {}", path.display()))
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The engine's last-position logits after the prompt, then after each of `ids` in turn.
fn engine_logits(
    engine: &mut Engine,
    prompt: &[u32],
    ids: &[u32],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut all = Vec::with_capacity(ids.len() + 1);
    all.push(engine.logits_for_test(prompt, 0)?);
    for (i, &id) in ids.iter().enumerate() {
        all.push(engine.logits_for_test(&[id], prompt.len() + i)?);
    }
    Ok(all)
}

#[derive(Debug, Default)]
struct Summary {
    max_abs_error: f64,
    /// The largest error as a fraction of the reference logit.
    max_rel_error: f64,
    /// Steps whose argmax was compared (all of them, or the decisive ones).
    argmax_compared: usize,
    /// Steps whose top-two margin exceeds the tolerance.
    decisive: usize,
    problems: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max logit error {:.4} ({:.2}% of the logit), argmax compared at {} steps, {} decisive",
            self.max_abs_error,
            100.0 * self.max_rel_error,
            self.argmax_compared,
            self.decisive
        )
    }
}

/// Compares the engine's logits, step by step, with the fixture's.
fn compare(fixture: &Fixture, logits: &[Vec<f32>], tol: Tolerance) -> Summary {
    let mut summary = Summary::default();
    for (n, (step, logits)) in fixture.steps.iter().zip(logits).enumerate() {
        let (top1, top2) = (step.top[0].1, step.top[1].1);
        let decisive = top1 - top2 > Tolerance::of(top1, tol);
        summary.decisive += usize::from(decisive);
        let ours = argmax(logits);
        if tol.argmax_everywhere || decisive {
            summary.argmax_compared += 1;
            if ours != step.argmax {
                summary.problems.push(format!(
                    "step {n}: argmax {ours} (logit {:.4}), llama.cpp {} (logit {top1:.4}, \
                     margin {:.4})",
                    logits[ours as usize],
                    step.argmax,
                    top1 - top2
                ));
            }
        }
        for &(id, reference) in &step.top {
            let got = f64::from(logits[id as usize]);
            let err = (got - reference).abs();
            summary.max_abs_error = summary.max_abs_error.max(err);
            summary.max_rel_error = summary.max_rel_error.max(err / reference.abs().max(1.0));
            if err > Tolerance::of(reference, tol) {
                summary.problems.push(format!(
                    "step {n}: logit of {id} is {got:.4}, llama.cpp {reference:.4} (error \
                     {err:.4}, tolerance {:.4})",
                    Tolerance::of(reference, tol)
                ));
            }
        }
    }
    summary
}

/// Compares the engine with one fixture; an error says how they differ.
fn check(fixture: &Fixture) -> anyhow::Result<Summary> {
    let tol = Tolerance::for_type(&fixture.model.r#type)?;
    ensure!(
        fixture.steps.len() >= 2 && fixture.steps.iter().all(|s| s.top.len() >= 2),
        "a fixture needs steps with at least two logits each"
    );
    let path = model_of(fixture)?;
    let mut engine = load(&path, fixture.settings.n_ctx)?;
    // The reference's own greedy ids, fed back one by one: every step sees the same context.
    let forced: Vec<u32> = fixture.steps[..fixture.steps.len() - 1]
        .iter()
        .map(|s| s.argmax)
        .collect();
    let logits = engine_logits(&mut engine, &fixture.prompt, &forced)?;
    let summary = compare(fixture, &logits, tol);
    if !summary.problems.is_empty() {
        let shown = summary.problems.len().min(8);
        bail!(
            "{} differences from llama.cpp {} ({summary}):\n  {}{}",
            summary.problems.len(),
            fixture.llama_cpp_python,
            summary.problems[..shown].join("\n  "),
            if summary.problems.len() > shown {
                "\n  …"
            } else {
                ""
            }
        );
    }
    ensure!(
        summary.decisive >= tol.min_decisive,
        "the weights give no margin: only {} of {} steps have a top-two margin above the \
         tolerance, {} needed, so agreeing on the argmax would mean little ({summary})",
        summary.decisive,
        fixture.steps.len(),
        tol.min_decisive
    );
    Ok(summary)
}

#[test]
fn the_engine_matches_llama_cpp_on_every_fixture() -> anyhow::Result<()> {
    let fixtures = fixtures()?;
    ensure!(!fixtures.is_empty(), "no fixtures in {FIXTURES}");
    let mut failures = BTreeMap::new();
    for (path, fixture) in &fixtures {
        ensure!(
            path.file_stem().is_some_and(|s| s == fixture.case.as_str()),
            "{} holds case {:?}",
            path.display(),
            fixture.case
        );
        match check(fixture) {
            Ok(summary) => eprintln!("{}: {summary}", fixture.case),
            Err(e) => {
                eprintln!("{}: FAILED: {e:#}", fixture.case);
                failures.insert(fixture.case.clone(), format!("{e:#}"));
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp: {}",
        failures.len(),
        fixtures.len(),
        failures.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// The engine's own greedy ids for `steps` steps after `prompt`.
fn greedy_ids(engine: &mut Engine, prompt: &[u32], steps: usize) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::with_capacity(steps);
    let mut logits = engine.logits_for_test(prompt, 0)?;
    for n in 0..steps {
        let id = argmax(&logits);
        ids.push(id);
        if n + 1 < steps {
            logits = engine.logits_for_test(&[id], prompt.len() + n)?;
        }
    }
    Ok(ids)
}

/// A Llama 3.x file decodes llama.cpp's greedy tokens; the same file without
/// `rope_freqs.weight` (llama.cpp's converter writes the llama3 RoPE scaling there and nowhere
/// else) decodes other tokens, so the engine's match comes from reading the tensor.
#[test]
fn a_llama3_file_decodes_llama_cpp_tokens_only_with_its_rope_freqs() -> anyhow::Result<()> {
    const CASE: &str = "llama3-small-f32";
    let fixtures = fixtures()?;
    let (_, fixture) = fixtures
        .iter()
        .find(|(_, f)| f.case == CASE)
        .with_context(|| format!("no fixture {CASE} in {FIXTURES}"))?;
    let reference: Vec<u32> = fixture.steps.iter().map(|s| s.argmax).collect();

    let with = model_of(fixture)?;
    let ids = greedy_ids(
        &mut load(&with, fixture.settings.n_ctx)?,
        &fixture.prompt,
        reference.len(),
    )?;
    assert_eq!(ids, reference, "{CASE}: the file with rope_freqs.weight");

    let arch: Arch = fixture.model.arch.parse()?;
    let spec = ModelSpec::preset(&fixture.model.preset, arch)?
        .with_seed(fixture.model.seed)
        .without_rope_freqs();
    let ty: GgufType = fixture.model.r#type.parse()?;
    let without = model_gen::ensure_generated(
        &spec,
        ModelFormat::Gguf(ty),
        &model_gen::paths::generated_dir(),
    )?;
    let mut engine = load(&without, fixture.settings.n_ctx)?;
    let ids = greedy_ids(&mut engine, &fixture.prompt, reference.len())?;
    let differing = ids.iter().zip(&reference).filter(|(a, b)| a != b).count();
    eprintln!(
        "{CASE} without rope_freqs.weight: {differing} of {} greedy ids differ",
        reference.len()
    );
    assert_ne!(
        ids, reference,
        "without rope_freqs.weight the engine still decodes llama.cpp's tokens: the tensor \
         makes no difference"
    );
    Ok(())
}

/// The greedy ids of `fixture`'s prompt from the engine on `path` with a context of `n_ctx`,
/// and how many differ from llama.cpp's.
fn differing_greedy_ids(fixture: &Fixture, path: &Path, n_ctx: usize) -> anyhow::Result<usize> {
    let reference: Vec<u32> = fixture.steps.iter().map(|s| s.argmax).collect();
    let ids = greedy_ids(&mut load(path, n_ctx)?, &fixture.prompt, reference.len())?;
    Ok(ids.iter().zip(&reference).filter(|(a, b)| a != b).count())
}

fn fixture_named(case: &str) -> anyhow::Result<Fixture> {
    fixtures()?
        .into_iter()
        .map(|(_, f)| f)
        .find(|f| f.case == case)
        .with_context(|| format!("no fixture {case} in {FIXTURES}"))
}

/// phi3-small-short-f32 runs at the original context, so with the short LongRoPE factors: the
/// same file at its trained context (the long factors) decodes other tokens, so the fixture
/// checks the choice of factors and not only what phi3-small-f32 checks.
#[test]
fn a_phi3_file_at_its_original_context_decodes_other_tokens_than_at_its_trained_one()
-> anyhow::Result<()> {
    const CASE: &str = "phi3-small-short-f32";
    let fixture = fixture_named(CASE)?;
    let path = model_of(&fixture)?;
    assert_eq!(
        differing_greedy_ids(&fixture, &path, fixture.settings.n_ctx)?,
        0,
        "{CASE} at a context of {}",
        fixture.settings.n_ctx
    );
    let trained =
        ModelSpec::preset(&fixture.model.preset, fixture.model.arch.parse()?)?.context_length;
    assert!(
        trained > fixture.settings.n_ctx,
        "{CASE} runs at the trained context"
    );
    let differing = differing_greedy_ids(&fixture, &path, trained)?;
    eprintln!(
        "{CASE} at the trained context {trained}: {differing} of {} greedy ids differ",
        fixture.steps.len()
    );
    assert_ne!(
        differing, 0,
        "the long LongRoPE factors decode the same tokens as the short ones"
    );
    Ok(())
}

/// gemma3-small-linear8-f32's file scales the global layers' RoPE by 8: the same weights
/// without the scaling decode other tokens, so the fixture checks that the engine reads it.
#[test]
fn a_gemma3_file_decodes_llama_cpp_tokens_only_with_its_linear_rope_scaling() -> anyhow::Result<()>
{
    const CASE: &str = "gemma3-small-linear8-f32";
    let fixture = fixture_named(CASE)?;
    let with = model_of(&fixture)?;
    assert_eq!(
        differing_greedy_ids(&fixture, &with, fixture.settings.n_ctx)?,
        0,
        "{CASE}: the file with linear RoPE scaling"
    );
    let spec = ModelSpec::preset(&fixture.model.preset, fixture.model.arch.parse()?)?
        .with_seed(fixture.model.seed);
    ensure!(
        spec.rope_linear_factor.is_some(),
        "preset {} has no linear RoPE scaling",
        fixture.model.preset
    );
    let unscaled = ModelSpec {
        rope_linear_factor: None,
        ..spec
    };
    let without = model_gen::ensure_generated(
        &unscaled,
        ModelFormat::Gguf(fixture.model.r#type.parse()?),
        &model_gen::paths::generated_dir(),
    )?;
    let differing = differing_greedy_ids(&fixture, &without, fixture.settings.n_ctx)?;
    eprintln!(
        "{CASE} without the scaling: {differing} of {} greedy ids differ",
        fixture.steps.len()
    );
    assert_ne!(
        differing, 0,
        "without the linear RoPE scaling the engine still decodes llama.cpp's tokens"
    );
    Ok(())
}
