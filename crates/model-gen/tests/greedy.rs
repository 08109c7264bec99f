//! The generated weights run through candle's own model code: the hub checkpoint and the F32
//! GGUF (with llama's permuted q/k rows) decode the same greedy tokens, and those tokens vary.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, quantized_llama, quantized_qwen2, qwen2};
use model_gen::{Arch, GgufType, ModelSpec, write_gguf, write_hub_dir};

const STEPS: usize = 16;
const PROMPT: [u32; 4] = [1, 300, 301, 302];

/// Greedy decoding with a `forward(tokens, position) -> last-position logits` function.
fn greedy(mut forward: impl FnMut(&[u32], usize) -> Tensor) -> Vec<u32> {
    let mut out = Vec::new();
    let mut input = PROMPT.to_vec();
    let mut position = 0;
    for _ in 0..STEPS {
        let logits = forward(&input, position).flatten_all().unwrap();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        position += input.len();
        input = vec![next];
        out.push(next);
    }
    out
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn hub_tokens(spec: &ModelSpec, dir: &Path) -> Vec<u32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).unwrap();
    let config = std::fs::read(dir.join("config.json")).unwrap();
    match spec.arch {
        Arch::Llama => {
            let cfg: llama::LlamaConfig = serde_json::from_slice(&config).unwrap();
            let cfg = cfg.into_config(false);
            let model = llama::Llama::load(vb, &cfg).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
            greedy(|t, pos| model.forward(&ids(t), pos, &mut cache).unwrap())
        }
        Arch::Qwen2 => {
            let cfg: qwen2::Config = serde_json::from_slice(&config).unwrap();
            let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
            greedy(|t, pos| model.forward(&ids(t), pos).unwrap())
        }
        other => panic!("no hub model for {other}"),
    }
}

fn gguf_tokens(spec: &ModelSpec, path: &Path) -> Vec<u32> {
    let mut file = File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    match spec.arch {
        Arch::Llama => {
            let mut m =
                quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
            greedy(|t, pos| m.forward(&ids(t), pos).unwrap())
        }
        Arch::Qwen2 => {
            let mut m =
                quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
            greedy(|t, pos| m.forward(&ids(t), pos).unwrap())
        }
        other => panic!("no candle GGUF model for {other} here"),
    }
}

fn distinct(tokens: &[u32]) -> usize {
    tokens
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
}

#[test]
fn hub_and_f32_gguf_decode_the_same_varied_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for spec in [
        ModelSpec::tiny(),
        ModelSpec::tiny_qwen2(),
        ModelSpec::small(),
    ] {
        let hub = dir.path().join(format!("{}-hub", spec.cache_key()));
        write_hub_dir(&spec, &hub).unwrap();
        let gguf = dir.path().join(format!("{}.gguf", spec.cache_key()));
        write_gguf(&spec, GgufType::F32, &gguf).unwrap();
        let from_hub = hub_tokens(&spec, &hub);
        let from_gguf = gguf_tokens(&spec, &gguf);
        assert_eq!(
            from_hub, from_gguf,
            "{:?} hidden {}",
            spec.arch, spec.hidden
        );
        assert!(
            distinct(&from_hub) >= 4,
            "greedy output barely varies: {from_hub:?}"
        );
    }
}

/// Last-position logits of `prompt` (prefilled in one pass) under the GGUF at `path`.
fn gguf_logits(spec: &ModelSpec, path: &Path, prompt: &[u32]) -> Vec<f32> {
    let mut file = File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let logits = match spec.arch {
        Arch::Llama => quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .unwrap()
            .forward(&ids(prompt), 0),
        Arch::Qwen2 => quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .unwrap()
            .forward(&ids(prompt), 0),
        other => panic!("no candle GGUF model for {other} here"),
    };
    logits.unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Pearson correlation of two logit vectors.
fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(a), mean(b));
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x) - ma, f64::from(y) - mb);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

/// How far below the best score token `i` is, in standard deviations of `logits`.
fn sd_below_best(logits: &[f32], i: usize) -> f64 {
    let n = logits.len() as f64;
    let mean = logits.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let sd = (logits
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    f64::from(logits[argmax(logits)] - logits[i]) / sd
}

fn argmax(logits: &[f32]) -> usize {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap()
}

/// Quantized files hold the same model: their logits correlate almost perfectly with F32's,
/// F16 and Q8_0 pick F32's greedy token, and 4-bit types pick a token F32 scores within 0.6
/// standard deviations of its best. Their noise (1-2% of the logit variance, about 0.15 sd per
/// logit) reorders near-ties at the top, whereas a file with misplaced or mis-permuted weights
/// would correlate near 0 and pick a token about 3 sd below the best.
#[test]
fn quantized_logits_track_f32() {
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| vec![1, 260 + 17 * i, 300 + 5 * i, 270 + 3 * i])
        .collect();
    for spec in [
        ModelSpec::tiny(),
        ModelSpec::small(),
        ModelSpec::tiny_qwen2(),
    ] {
        let path = |ty: GgufType| dir.path().join(format!("{}-{ty}.gguf", spec.cache_key()));
        write_gguf(&spec, GgufType::F32, &path(GgufType::F32)).unwrap();
        let reference: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| gguf_logits(&spec, &path(GgufType::F32), p))
            .collect();
        for (ty, min_correlation) in [
            (GgufType::F16, 0.999_99),
            (GgufType::Q8_0, 0.999),
            (GgufType::Q4_0, 0.95),
            (GgufType::Q4K, 0.95),
        ] {
            write_gguf(&spec, ty, &path(ty)).unwrap();
            for (prompt, reference) in prompts.iter().zip(&reference) {
                let logits = gguf_logits(&spec, &path(ty), prompt);
                let what = format!(
                    "{ty} {:?} hidden {} prompt {prompt:?}",
                    spec.arch, spec.hidden
                );
                let r = correlation(&logits, reference);
                assert!(r > min_correlation, "{what}: correlation {r}");
                let top = argmax(&logits);
                let below = sd_below_best(reference, top);
                assert!(
                    below < 0.6,
                    "{what}: F32 scores greedy token {top} {below:.2} sd below its best"
                );
                if matches!(ty, GgufType::F16 | GgufType::Q8_0) {
                    assert_eq!(top, argmax(reference), "{what}");
                }
            }
        }
    }
}
