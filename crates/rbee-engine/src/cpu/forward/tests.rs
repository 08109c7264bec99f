//! The CPU forward pass against candle's `quantized_llama` on the same files.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use model_gen::{GgufType, ModelFormat, ModelSpec};

use super::*;

fn header(path: &Path) -> (gguf_file::Content, BufReader<File>) {
    let mut reader = BufReader::new(File::open(path).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    (content, reader)
}

fn cpu_model(path: &Path, threads: usize) -> CpuLlama {
    let (content, mut reader) = header(path);
    Plan::new(&gguf_info::Header::open(path).unwrap(), 4096)
        .unwrap()
        .load(&content, &mut reader, threads, &mut |_, _| {})
        .unwrap()
}

/// candle's model code for the file's architecture.
enum Reference {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Reference {
    fn clear_kv_cache(&mut self) {
        match self {
            Reference::Llama(m) => m.clear_kv_cache(),
            Reference::Qwen2(m) => m.clear_kv_cache(),
        }
    }
}

fn candle_model(path: &Path) -> Reference {
    let (content, mut reader) = header(path);
    let arch = content.metadata["general.architecture"]
        .to_string()
        .unwrap()
        .clone();
    match arch.as_str() {
        "qwen2" => Reference::Qwen2(
            quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap(),
        ),
        _ => Reference::Llama(
            quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap(),
        ),
    }
}

fn candle_logits(m: &mut Reference, tokens: &[u32], pos: usize) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = match m {
        Reference::Llama(m) => m.forward(&input, pos),
        Reference::Qwen2(m) => m.forward(&input, pos),
    };
    logits.unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Feeds `tokens` of sequence 0 at `pos`.
fn one<'a>(cpu: &'a mut CpuLlama, tokens: &[u32], pos: usize) -> Result<&'a [f32], EngineError> {
    cpu.step(&[SeqTokens {
        seq: 0,
        tokens,
        pos,
    }])
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

/// Same logits within the format's rounding and the same top token. The activations are
/// quantized the same way, but candle's kernels may round a block differently now and then,
/// which moves logits by a few percent on these random-weight models.
fn assert_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tolerance * scale.max(1.0),
        "{what}: max difference {worst} (scale {scale})"
    );
}

/// The tiny generated llama model of type `ty`, in a directory that lives as long as the guard.
fn tiny_model(ty: GgufType) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    model_gen::write_model(&ModelSpec::tiny(), ModelFormat::Gguf(ty), &path).unwrap();
    (dir, path)
}

#[test]
fn generated_models_match_candle_at_prefill_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (ModelSpec::tiny(), GgufType::Q8_0),
        (ModelSpec::tiny(), GgufType::Q4_0),
        (ModelSpec::small(), GgufType::Q4_0),
        (ModelSpec::small(), GgufType::Q4K),
        (ModelSpec::tiny_qwen2(), GgufType::Q8_0),
        (ModelSpec::small_qwen2(), GgufType::Q4_0),
        (ModelSpec::small_qwen2(), GgufType::Q4K),
    ];
    for (i, (spec, ty)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("m{i}.gguf"));
        model_gen::write_model(&spec, ModelFormat::Gguf(ty), &path).unwrap();
        let mut reference = candle_model(&path);
        for threads in [1, 3] {
            let mut cpu = cpu_model(&path, threads);
            reference.clear_kv_cache();
            let prompt = [1u32, 17, 300, 42, 5, 99, 7];
            let what = format!(
                "{:?} {ty:?} hidden {} threads {threads}",
                spec.arch, spec.hidden
            );
            let got = one(&mut cpu, &prompt, 0).unwrap().to_vec();
            let want = candle_logits(&mut reference, &prompt, 0);
            assert_close(&got, &want, 5e-2, &format!("{what} prefill"));
            assert_eq!(
                argmax(&got),
                argmax(&want),
                "{what}: top token after the prompt"
            );
            // The batched prefill (matrix-matrix products, causal attention over the batch) is the
            // same computation as feeding the tokens one by one.
            let mut one_by_one = cpu_model(&path, threads);
            let mut last = Vec::new();
            for (p, &tok) in prompt.iter().enumerate() {
                last = one(&mut one_by_one, &[tok], p).unwrap().to_vec();
            }
            assert_close(&got, &last, 1e-4, &format!("{what} prefill vs one by one"));
            let mut next = argmax(&got) as u32;
            for pos in prompt.len()..prompt.len() + 4 {
                let got = one(&mut cpu, &[next], pos).unwrap().to_vec();
                let want = candle_logits(&mut reference, &[next], pos);
                assert_close(&got, &want, 5e-2, &format!("{what} pos {pos}"));
                next = argmax(&got) as u32;
            }
        }
    }
}

#[test]
fn a_reset_model_repeats_itself_and_rejects_a_gap() {
    let (_dir, path) = tiny_model(GgufType::Q8_0);
    let mut cpu = cpu_model(&path, 2);
    let first = one(&mut cpu, &[1, 2, 3], 0).unwrap().to_vec();
    assert!(
        one(&mut cpu, &[4], 5).is_err(),
        "position 5 after 3 cached positions"
    );
    cpu.reset().unwrap();
    assert_eq!(one(&mut cpu, &[1, 2, 3], 0).unwrap(), &first[..]);
    assert!(
        one(&mut cpu, &[100_000], 3).is_err(),
        "token outside the vocabulary"
    );
}

/// Feeding from a position inside the cache drops the positions from there on: the logits are
/// those of a fresh sequence with the same tokens.
#[test]
fn feeding_from_an_earlier_position_forgets_what_followed_it() {
    let (_dir, path) = tiny_model(GgufType::Q4_0);
    let mut rewound = cpu_model(&path, 2);
    one(&mut rewound, &[1, 2, 3, 4, 5, 6], 0).unwrap();
    let got = one(&mut rewound, &[9, 8], 3).unwrap().to_vec();
    let mut fresh = cpu_model(&path, 2);
    let want = one(&mut fresh, &[1, 2, 3, 9, 8], 0).unwrap().to_vec();
    assert_close(&got, &want, 1e-4, "rewound to position 3");
    let got = one(&mut rewound, &[7], 5).unwrap().to_vec();
    let want = one(&mut fresh, &[7], 5).unwrap().to_vec();
    assert_eq!(got, want, "the next token after the rewind");
}

#[test]
fn unsupported_files_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    // Q8_1 has no kernel here.
    let specs = [
        ModelSpec::small(),
        ModelSpec::small_arch(model_gen::Arch::Gemma2),
    ];
    for spec in specs {
        let path = dir.path().join(format!("{}.gguf", spec.arch));
        model_gen::write_model(&spec, ModelFormat::Gguf(GgufType::Q8_1), &path).unwrap();
        let header = gguf_info::Header::open(&path).unwrap();
        let err = Plan::new(&header, 512).err().expect("refused");
        assert!(err.0.contains("Q8_1"), "{}: {}", spec.arch, err.0);
    }
}

/// SmolLM2 (Q4_1 layers, Q8_0 embedding) follows candle's greedy path: fed candle's own greedy
/// continuation, it picks candle's token at every step where candle's choice is not a near tie.
///
/// Bit-for-bit equality is not to be had: both quantize activations to 8 bits, so a last-bit
/// difference in a sum (attention, norms) can move a value across a rounding boundary; on this
/// model that moves logits by up to about 1 (candle's own quantized and dequantized-f32 runs
/// differ as much). A tie closer than that can go either way.
#[test]
fn smollm2_follows_candles_greedy_tokens() {
    let path = model_gen::paths::smollm2_gguf()
        .expect("SmolLM2 is missing: run `cargo xtask fetch-smollm2` (or set RBEE_SMOLLM2_GGUF)");
    let mut reference = candle_model(&path);
    let mut cpu = cpu_model(&path, 2);
    // "The capital of France is" in SmolLM2's vocabulary.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let mut ours = one(&mut cpu, &prompt, 0).unwrap().to_vec();
    let mut theirs = candle_logits(&mut reference, &prompt, 0);
    let mut decided = 0;
    for pos in prompt.len()..prompt.len() + 40 {
        let mut sorted = theirs.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let want = argmax(&theirs);
        if sorted[0] - sorted[1] > 1.0 {
            assert_eq!(argmax(&ours), want, "position {pos}");
            decided += 1;
        }
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2.0, "position {pos}: logits differ by {worst}");
        ours = one(&mut cpu, &[want as u32], pos).unwrap().to_vec();
        theirs = candle_logits(&mut reference, &[want as u32], pos);
    }
    assert!(
        decided >= 30,
        "only {decided} of 40 steps were clear choices"
    );
}

/// Greedy continuation of `prompt` run alone in sequence 0: the logits after the prompt and
/// after each of `steps` chosen tokens.
fn alone(cpu: &mut CpuLlama, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut out = vec![one(cpu, prompt, 0).unwrap().to_vec()];
    for i in 0..steps {
        let next = argmax(out.last().unwrap()) as u32;
        out.push(one(cpu, &[next], prompt.len() + i).unwrap().to_vec());
    }
    out
}

/// Three sequences fed in shared steps (joining and leaving at different steps, a prompt fed
/// beside the others' next tokens) get, bit for bit, the logits each gets alone.
fn check_batched_equals_alone(spec: &ModelSpec, ty: GgufType, dir: &Path) {
    let what = format!("{} {ty}", spec.arch);
    let path = dir.join(format!("{}-{ty}.gguf", spec.cache_key()));
    model_gen::write_model(spec, ModelFormat::Gguf(ty), &path).unwrap();
    let mut cpu = cpu_model(&path, 2);
    // Long enough prompts that gemma's sliding windows are crossed.
    let long: Vec<u32> = (0..24).map(|i| 1 + (i * 37 % 300)).collect();
    let prompts: [&[u32]; 3] = [&[1, 5, 9, 13, 17], &long, &[1, 40, 41, 42, 43, 44, 45]];
    let want: Vec<_> = prompts.iter().map(|p| alone(&mut cpu, p, 4)).collect();

    cpu.set_sequences(3);
    assert_eq!(cpu.sequences(), 3);
    // Sequences 0 and 1 start together; sequence 2 joins two steps later, its prompt fed
    // in the same step as the others' next tokens; sequence 0 leaves after three tokens.
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    let mut fed = [0usize; 3];
    for step in 0..7 {
        let mut inputs: Vec<(usize, Vec<u32>, usize)> = Vec::new();
        for seq in 0..3 {
            let joins = [0, 0, 2][seq];
            let leaves = [3, 5, 5][seq];
            if step < joins || got[seq].len() > leaves {
                continue;
            }
            let tokens = match got[seq].last() {
                None => prompts[seq].to_vec(),
                Some(logits) => vec![argmax(logits) as u32],
            };
            inputs.push((seq, tokens, fed[seq]));
        }
        let entries: Vec<_> = inputs
            .iter()
            .map(|(seq, tokens, pos)| SeqTokens {
                seq: *seq,
                tokens,
                pos: *pos,
            })
            .collect();
        let logits = cpu.step(&entries).unwrap().to_vec();
        let vocab = logits.len() / entries.len();
        for (i, e) in entries.iter().enumerate() {
            got[e.seq].push(logits[i * vocab..(i + 1) * vocab].to_vec());
            fed[e.seq] += e.tokens.len();
        }
    }
    for seq in 0..3 {
        let n = got[seq].len();
        assert!(n >= 4, "{what} sequence {seq} ran {n} steps");
        for (i, (g, w)) in got[seq].iter().zip(&want[seq]).enumerate() {
            assert_eq!(g, w, "{what} sequence {seq} step {i}");
        }
    }
}

#[test]
fn sequences_batched_together_get_the_logits_they_get_alone() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgufType::Q4_0, GgufType::Q8_0, GgufType::Q4K] {
        check_batched_equals_alone(&ModelSpec::small(), ty, dir.path());
    }
}

#[test]
fn every_family_batched_gets_the_logits_it_gets_alone() {
    use model_gen::Arch;
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen3, Arch::Gemma2, Arch::Gemma3, Arch::Phi3] {
        check_batched_equals_alone(&ModelSpec::small_arch(arch), GgufType::Q4KM, dir.path());
        check_batched_equals_alone(&ModelSpec::tiny_arch(arch), GgufType::F16, dir.path());
    }
    check_batched_equals_alone(&ModelSpec::small_llama3(), GgufType::Q4KM, dir.path());
    check_batched_equals_alone(
        &ModelSpec::tiny().with_head_dim(32),
        GgufType::F32,
        dir.path(),
    );
}

#[test]
fn a_step_refuses_a_sequence_it_does_not_hold_or_feeds_twice() {
    let (_dir, path) = tiny_model(GgufType::Q8_0);
    let mut cpu = cpu_model(&path, 1);
    cpu.set_sequences(2);
    let entry = |seq| SeqTokens {
        seq,
        tokens: &[1, 2],
        pos: 0,
    };
    assert!(cpu.step(&[entry(2)]).is_err(), "only sequences 0 and 1");
    assert!(cpu.step(&[entry(1), entry(1)]).is_err(), "sequence 1 twice");
    assert_eq!(cpu.step(&[entry(0), entry(1)]).unwrap().len() % 2, 0);
}
