//! GGUF files of the architectures in [`cpu::ARCHITECTURES`], quantized or not: on the engine's
//! CPU path, or on candle's path ([`CandleLlama`]: llama and qwen2, the files candle's model
//! code computes correctly, whose computation it reproduces).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, gguf_file};
use candle_core::{DType, Device};

use super::candle_llama::{self, CandleLlama, Matrix, Rope};
use super::{CausalLm, LoadedModel, ModelInfo, WeightsFormat, report};
use crate::cpu;
use crate::tokenizer::TextTokenizer;
use crate::{EngineError, LoadProgress};

mod types;

/// Share of the load progress bar spent before the weights are read (header, tokenizer).
const WEIGHTS_START: f32 = 0.1;
const WEIGHTS_END: f32 = 0.98;

/// True when `path` is a file starting with the GGUF magic, whatever its name.
pub(super) fn has_magic(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

pub(super) fn load(
    path: &Path,
    device: &Device,
    context: Option<usize>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, EngineError> {
    load_with(path, device, context, cpu::enabled(), progress)
}

/// [`load`], with the engine's CPU path on or off (`cpu_path`, from `RBEE_CPU_KERNELS`).
fn load_with(
    path: &Path,
    device: &Device,
    context: Option<usize>,
    cpu_path: bool,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, EngineError> {
    report(progress, 0.0, format!("reading {}", path.display()));
    let header = read_info(path)?;
    let (content, mut reader) = read_header(path)?;
    let arch = metadata_str(&content, "general.architecture")
        .ok_or_else(|| EngineError::Load("the GGUF file has no general.architecture".into()))?
        .to_owned();
    if !cpu::ARCHITECTURES.contains(&arch.as_str()) {
        return Err(EngineError::UnsupportedModel(format!(
            "GGUF architecture `{arch}` is not supported (supported: {})",
            cpu::ARCHITECTURES.join(", ")
        )));
    }
    if let Some(experts) = metadata_usize(&content, &format!("{arch}.expert_count"))
        && experts > 0
    {
        return Err(EngineError::UnsupportedModel(format!(
            "mixture-of-experts models are not supported (this `{arch}` file has {experts} experts; \
             supported: dense {})",
            cpu::ARCHITECTURES.join(", ")
        )));
    }

    report(progress, 0.05, "building the tokenizer from GGUF metadata");
    let tokenizer =
        TextTokenizer::from_gguf(&content).map_err(|e| EngineError::load("tokenizer", e))?;
    let mut info = describe(path, &content, &header, &arch, &tokenizer)?;
    let trained = info.trained_context_length;

    let total = info.weights_bytes;
    let mut reader = ProgressReader {
        inner: &mut reader,
        read: 0,
        total,
        reported: 0,
        progress,
    };
    // The engine's CPU path, or why not: candle's path then runs the file, where candle's model
    // code computes it correctly (the candle path reproduces that code).
    let plan = if !device.is_cpu() {
        Err("it runs on the CPU only".to_owned())
    } else if !cpu_path {
        Err(format!("{}=0 turns it off", cpu::ENABLE_ENV))
    } else {
        cpu::Plan::new(&header, super::resolve_context(context, trained, None)).map_err(|why| why.0)
    };
    if let Err(why) = &plan {
        if let Some(what) = candle_cannot_run(&content, &arch) {
            return Err(EngineError::UnsupportedModel(format!(
                "this `{arch}` file cannot be run: the engine's CPU path does not take it here \
                 ({why}), and candle's model code cannot run {what} correctly"
            )));
        }
        tracing::info!(reason = %why, "the engine's CPU path does not take this file; using candle's path");
    }
    let plan = plan.ok();
    info.context_length = if plan.is_some() {
        super::context_length(context, trained, None, "the engine's CPU path")
    } else {
        let limit = gguf_info::context::candle_limit(&arch, trained);
        super::context_length(context, trained, limit, "candle's path")
    };
    let model: Box<dyn CausalLm> = match plan {
        Some(plan) => {
            let threads = candle_core::utils::get_num_threads();
            Box::new(plan.load(&content, &mut reader, threads, &mut |_, _| {})?)
        }
        None => Box::new(candle_model(
            &content,
            &mut reader,
            &arch,
            info.context_length,
            device,
        )?),
    };
    report(progress, 1.0, "model loaded");
    Ok(LoadedModel {
        model,
        info,
        tokenizer,
    })
}

/// A llama or qwen2 file on candle's path, for `positions` positions per sequence: the tensors
/// and settings candle's `quantized_llama` and `quantized_qwen2` read, computed as they compute
/// them.
fn candle_model<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    arch: &str,
    positions: usize,
    device: &Device,
) -> Result<CandleLlama, EngineError> {
    let what = format!("{arch} weights");
    let err = |e: candle_core::Error| EngineError::load(&what, e);
    let required = |key: &str| {
        metadata_usize(content, &format!("{arch}.{key}"))
            .ok_or_else(|| EngineError::Load(format!("the GGUF file has no {arch}.{key}")))
    };
    let number = |key: &str| {
        content
            .metadata
            .get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_f32().ok())
    };
    let heads = required("attention.head_count")?;
    let kv_heads = required("attention.head_count_kv")?;
    let layers = required("block_count")?;
    let hidden = required("embedding_length")?;
    let eps = number("attention.layer_norm_rms_epsilon").ok_or_else(|| {
        EngineError::Load(format!(
            "the GGUF file has no {arch}.attention.layer_norm_rms_epsilon"
        ))
    })? as f64;
    let base = number("rope.freq_base").unwrap_or(10_000.0);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(EngineError::Load(format!(
            "the GGUF file has {heads} attention heads and {kv_heads} KV heads"
        )));
    }
    let head_dim = hidden / heads;
    // `quantized_llama` sizes its rotary tables by the stated RoPE dimensions, `quantized_qwen2`
    // by the head size.
    let (rope, rope_dim, qkv_bias) = match arch {
        "qwen2" => (Rope::Halves, head_dim, true),
        _ => (Rope::Interleaved, required("rope.dimension_count")?, false),
    };
    let mut tensor = |name: &str| content.tensor(reader, name, device).map_err(err);
    let matrix = |t: candle_core::quantized::QTensor| {
        QMatMul::from_qtensor(t).map(Matrix::Gguf).map_err(err)
    };
    let dense = |t: candle_core::quantized::QTensor| t.dequantize(device).map_err(err);

    // Dequantized for lookups, as candle's models hold it; a tied output multiplies by the
    // file's own tensor.
    let embedding_q = tensor("token_embd.weight")?;
    let embedding = embedding_q.dequantize(device).map_err(err)?;
    let norm = dense(tensor("output_norm.weight")?)?;
    let output = match content.tensor_infos.contains_key("output.weight") {
        true => tensor("output.weight")?,
        false => embedding_q,
    };
    let output = matrix(output)?;
    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let mut t = |name: &str| tensor(&format!("blk.{i}.{name}"));
        let q = matrix(t("attn_q.weight")?)?;
        let k = matrix(t("attn_k.weight")?)?;
        let v = matrix(t("attn_v.weight")?)?;
        let qkv_bias = if qkv_bias {
            Some([
                dense(t("attn_q.bias")?)?,
                dense(t("attn_k.bias")?)?,
                dense(t("attn_v.bias")?)?,
            ])
        } else {
            None
        };
        blocks.push(candle_llama::Layer {
            q,
            k,
            v,
            qkv_bias,
            o: matrix(t("attn_output.weight")?)?,
            gate: matrix(t("ffn_gate.weight")?)?,
            down: matrix(t("ffn_down.weight")?)?,
            up: matrix(t("ffn_up.weight")?)?,
            attn_norm: dense(t("attn_norm.weight")?)?,
            ffn_norm: dense(t("ffn_norm.weight")?)?,
        });
    }
    let cfg = candle_llama::Config {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim,
        eps,
        rope,
        metal_sdpa: arch == "llama",
    };
    let weights = candle_llama::Weights {
        embedding,
        layers: blocks,
        norm,
        output,
    };
    let inv_freq = candle_llama::inverse_frequencies(rope_dim, base);
    CandleLlama::new(cfg, weights, &inv_freq, positions, DType::F32, device).map_err(err)
}

/// What in `content` candle's `quantized_llama` and `quantized_qwen2` would compute wrongly,
/// if anything: they know plain llama and qwen2 blocks only, and read no RoPE factors or
/// scaling, no explicit head size and no biases but qwen2's Q, K and V ones.
fn candle_cannot_run(content: &gguf_file::Content, arch: &str) -> Option<String> {
    if arch != "llama" && arch != "qwen2" {
        return Some(format!("`{arch}` files"));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Some("Llama 3's RoPE scaling (the file's rope_freqs.weight)".into());
    }
    let key = |k: &str| metadata_usize(content, &format!("{arch}.{k}"));
    if let (Some(dim), Some(heads)) = (key("embedding_length"), key("attention.head_count"))
        && heads > 0
        && [key("attention.key_length"), key("attention.value_length")]
            .into_iter()
            .flatten()
            .any(|len| len * heads != dim)
    {
        return Some("a head size other than the hidden size over the head count".into());
    }
    if metadata_str(content, &format!("{arch}.rope.scaling.type")).is_some_and(|t| t != "none") {
        return Some("RoPE scaling".into());
    }
    // llama.cpp reads a linear scale without a type too, and an attention factor.
    let number = |k: &str| {
        content
            .metadata
            .get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
    };
    let scaled = |k: &str, neutral: &[f32]| number(k).is_some_and(|x| !neutral.contains(&x));
    if scaled("rope.scaling.factor", &[0.0, 1.0])
        || scaled("rope.scale_linear", &[0.0, 1.0])
        || scaled("rope.scaling.attn_factor", &[1.0])
    {
        return Some("RoPE scaling".into());
    }
    // candle's llama reads no biases; its qwen2 reads those of Q, K and V only.
    let qwen2_bias = |name: &str| {
        arch == "qwen2"
            && ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
                .iter()
                .any(|b| name.ends_with(b))
    };
    if let Some(name) = content
        .tensor_infos
        .keys()
        .find(|name| name.ends_with(".bias") && !qwen2_bias(name))
    {
        return Some(format!("a file with bias tensors ({name})"));
    }
    None
}

/// The header as gguf-info reads it, by whose rules the file is judged (the hive judges it by
/// the same ones). A file with a tensor of a type rbee does not compute is refused here, naming
/// the tensor and the type (candle's reader stops at a type it does not know and names only its
/// number, and reads Q8_1 and Q8_K, which nothing here computes as weights).
fn read_info(path: &Path) -> Result<gguf_info::Header, EngineError> {
    let file = File::open(path).map_err(|e| EngineError::load(path.display(), e))?;
    let header = gguf_info::Header::read(&mut BufReader::new(file)).map_err(|e| {
        EngineError::Load(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    match gguf_info::uncomputed_tensor(&header) {
        Some(refusal) => Err(EngineError::UnsupportedModel(refusal)),
        None => Ok(header),
    }
}

fn read_header(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), EngineError> {
    let file = File::open(path).map_err(|e| EngineError::load(path.display(), e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        EngineError::Load(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    Ok((content, reader))
}

fn describe(
    path: &Path,
    content: &gguf_file::Content,
    header: &gguf_info::Header,
    arch: &str,
    tokenizer: &TextTokenizer,
) -> Result<ModelInfo, EngineError> {
    let required = |key: &str| {
        metadata_usize(content, &format!("{arch}.{key}"))
            .ok_or_else(|| EngineError::Load(format!("the GGUF file has no {arch}.{key}")))
    };
    let n_layers = required("block_count")?;
    let hidden_size = required("embedding_length")?;
    let n_heads = required("attention.head_count")?;
    let n_kv_heads = required("attention.head_count_kv").unwrap_or(n_heads);
    // gguf-info's rule (a llama file that states none gets what candle's llama assumes), the
    // one the hive counts by.
    let trained_context_length = gguf_info::context::trained(header)
        .ok_or_else(|| EngineError::Load(format!("the GGUF file has no {arch}.context_length")))?;
    // The caller sets the context the model runs with once it knows which code runs it.
    let context_length = trained_context_length;
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| EngineError::Load("the GGUF file has no token_embd.weight".into()))?;
    let consistent = n_heads > 0 && n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads);
    if !consistent {
        return Err(EngineError::Load(format!(
            "inconsistent attention shape: hidden {hidden_size}, {n_heads} heads, {n_kv_heads} KV heads"
        )));
    }

    let mut bytes_by_dtype: Vec<(GgmlDType, u64)> = Vec::new();
    let mut weights_bytes = 0u64;
    for t in content.tensor_infos.values() {
        let bytes =
            (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64;
        weights_bytes += bytes;
        if t.shape.rank() >= 2 {
            match bytes_by_dtype.iter_mut().find(|(d, _)| *d == t.ggml_dtype) {
                Some((_, b)) => *b += bytes,
                None => bytes_by_dtype.push((t.ggml_dtype, bytes)),
            }
        }
    }
    let dtype = bytes_by_dtype
        .iter()
        .max_by_key(|(_, b)| *b)
        .map_or("unknown", |(d, _)| cpu::ggml_name(*d));

    let name = metadata_str(content, "general.name")
        .map(str::to_owned)
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Ok(ModelInfo {
        name,
        architecture: arch.to_owned(),
        format: WeightsFormat::Gguf {
            dtype: dtype.to_owned(),
        },
        context_length,
        trained_context_length,
        vocab_size,
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        bos_token_id: tokenizer.bos_token_id(),
        weights_bytes,
        n_layers,
        hidden_size,
        n_heads,
        n_kv_heads,
    })
}

fn metadata_str<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

fn metadata_usize(content: &gguf_file::Content, key: &str) -> Option<usize> {
    let v = content.metadata.get(key)?;
    v.to_u32()
        .map(|n| n as usize)
        .or_else(|_| v.to_u64().map(|n| n as usize))
        .ok()
}

/// Passes reads through and turns the bytes read into load progress.
struct ProgressReader<'a, R> {
    inner: R,
    read: u64,
    total: u64,
    /// Last reported percentage, so the callback fires at most about a hundred times.
    reported: u64,
    progress: &'a mut dyn FnMut(LoadProgress),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let percent = (self.read * 100)
            .checked_div(self.total)
            .unwrap_or(100)
            .min(100);
        if percent > self.reported {
            self.reported = percent;
            let fraction = WEIGHTS_START + (WEIGHTS_END - WEIGHTS_START) * percent as f32 / 100.0;
            let mib = |b: u64| b / (1024 * 1024);
            report(
                self.progress,
                fraction,
                format!(
                    "loading weights: {} of {} MiB",
                    mib(self.read.min(self.total)),
                    mib(self.total)
                ),
            );
        }
        Ok(n)
    }
}

impl<R: Seek> Seek for ProgressReader<'_, R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use model_gen::{GgufType, ModelFormat, ModelSpec};

    use super::*;

    use candle_core::Tensor;
    use candle_transformers::models::{quantized_llama, quantized_qwen2};

    use crate::cpu::SeqTokens;

    fn logits(model: &mut dyn CausalLm, tokens: &[u32]) -> Vec<f32> {
        feed(model, &[(0, tokens, 0)])
    }

    /// Feeds `(sequence, tokens, pos)` entries in one step.
    fn feed(model: &mut dyn CausalLm, entries: &[(usize, &[u32], usize)]) -> Vec<f32> {
        let batch: Vec<SeqTokens<'_>> = entries
            .iter()
            .map(|&(seq, tokens, pos)| SeqTokens { seq, tokens, pos })
            .collect();
        model.feed(&batch).unwrap()
    }

    /// candle's own model code for the file, which the candle path reproduces.
    enum Reference {
        Llama(quantized_llama::ModelWeights),
        Qwen2(quantized_qwen2::ModelWeights),
    }

    impl Reference {
        fn load(path: &Path) -> Reference {
            let (content, mut reader) = read_header(path).unwrap();
            match metadata_str(&content, "general.architecture") {
                Some("qwen2") => Reference::Qwen2(
                    quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)
                        .unwrap(),
                ),
                _ => Reference::Llama(
                    quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)
                        .unwrap(),
                ),
            }
        }

        fn logits(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
            let input = Tensor::new(tokens, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let out = match self {
                Reference::Llama(m) => m.forward(&input, pos),
                Reference::Qwen2(m) => m.forward(&input, pos),
            };
            out.unwrap().flatten_all().unwrap().to_vec1().unwrap()
        }
    }

    fn argmax(logits: &[f32]) -> u32 {
        (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32
    }

    /// One sequence on the candle path gets exactly the logits candle's model code computes,
    /// over a prompt and greedy decode steps, for llama and qwen2 files of float and quantized
    /// types; three sequences fed together, joining at different steps, each get the logits
    /// they get alone.
    #[test]
    fn the_candle_path_computes_what_candles_code_computes_for_each_of_several_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (ModelSpec::tiny(), GgufType::F32),
            (ModelSpec::tiny(), GgufType::F16),
            (ModelSpec::tiny(), GgufType::Q8_0),
            (ModelSpec::tiny(), GgufType::Q4K),
            (ModelSpec::tiny_qwen2(), GgufType::F16),
            (ModelSpec::tiny_qwen2(), GgufType::Q4_0),
        ];
        for (i, (spec, ty)) in cases.into_iter().enumerate() {
            let what = format!("{} {ty:?}", spec.arch);
            let path = dir.path().join(format!("m{i}.gguf"));
            model_gen::write_model(&spec, ModelFormat::Gguf(ty), &path).unwrap();
            let mut loaded = load_with(&path, &Device::Cpu, None, false, &mut |_| {}).unwrap();
            let model = loaded.model.as_mut();
            assert!(
                model.prefix_cache().is_none(),
                "{what} runs on candle's path"
            );
            assert_eq!(model.hold_sequences(3), 3);

            let prompts: [&[u32]; 3] = [&[1, 40, 41, 42, 43], &[1, 7], &[1, 300, 9, 12]];
            // Alone, against candle's code.
            let mut alone = Vec::new();
            for prompt in prompts {
                let mut reference = Reference::load(&path);
                let mut want = reference.logits(prompt, 0);
                assert_eq!(logits(model, prompt), want, "{what}: prompt {prompt:?}");
                let mut steps = vec![want.clone()];
                for pos in prompt.len()..prompt.len() + 5 {
                    let next = argmax(&want);
                    want = reference.logits(&[next], pos);
                    assert_eq!(
                        feed(model, &[(0, &[next], pos)]),
                        want,
                        "{what}: prompt {prompt:?}, position {pos}"
                    );
                    steps.push(want.clone());
                }
                alone.push(steps);
            }

            // Together: sequence 0 starts alone, 1 joins at its second step, 2 at its third.
            let vocab = alone[0][0].len();
            let mut fed = [0usize; 3];
            let mut last: [Option<u32>; 3] = [None; 3];
            for step in 0..8 {
                let live: Vec<usize> = (0..3).filter(|&s| s <= step && fed[s] < 6).collect();
                let inputs: Vec<Vec<u32>> = live
                    .iter()
                    .map(|&s| match last[s] {
                        None => prompts[s].to_vec(),
                        Some(t) => vec![t],
                    })
                    .collect();
                let entries: Vec<(usize, &[u32], usize)> = live
                    .iter()
                    .zip(&inputs)
                    .map(|(&s, input)| {
                        let pos = if fed[s] == 0 {
                            0
                        } else {
                            prompts[s].len() + fed[s] - 1
                        };
                        (s, input.as_slice(), pos)
                    })
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let got = feed(model, &entries);
                for (&s, got) in live.iter().zip(got.chunks_exact(vocab)) {
                    let want = &alone[s][fed[s]];
                    let close = got.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-4);
                    assert!(close, "{what}: sequence {s}, output {}", fed[s]);
                    assert_eq!(argmax(got), argmax(want), "{what}: sequence {s}");
                    last[s] = Some(argmax(want));
                    fed[s] += 1;
                }
            }
            assert_eq!(fed, [6, 6, 6], "{what}");
        }
    }

    /// A prompt fed in chunks (the engine's prefill steps: several tokens from a position
    /// the cache already holds, beside another sequence's decode step) ends with the logits
    /// of the whole prompt fed at once: each chunk attends to the cached positions and,
    /// causally, to its own.
    #[test]
    fn a_prompt_fed_in_chunks_after_cached_positions_gets_the_logits_of_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (ModelSpec::tiny(), GgufType::F32),
            (ModelSpec::tiny_qwen2(), GgufType::F16),
        ];
        for (i, (spec, ty)) in cases.into_iter().enumerate() {
            let what = format!("{} {ty:?}", spec.arch);
            let path = dir.path().join(format!("m{i}.gguf"));
            model_gen::write_model(&spec, ModelFormat::Gguf(ty), &path).unwrap();
            let mut loaded = load_with(&path, &Device::Cpu, None, false, &mut |_| {}).unwrap();
            let model = loaded.model.as_mut();
            assert!(
                model.prefix_cache().is_none(),
                "{what} runs on candle's path"
            );
            assert_eq!(model.hold_sequences(2), 2);
            let prompt: Vec<u32> = (0..11).map(|t| 1 + t * 37 % 200).collect();
            let whole = logits(model, &prompt);
            let vocab = whole.len();

            // Sequence 1 decodes while sequence 0 takes the prompt in three chunks.
            feed(model, &[(1, &[1, 5, 9], 0)]);
            let mut got = Vec::new();
            for (at, (from, to)) in [(0, 3), (3, 8), (8, 11)].into_iter().enumerate() {
                let other = [17 + at as u32];
                got = feed(model, &[(0, &prompt[from..to], from), (1, &other, 3 + at)]);
            }
            let got = &got[..vocab];
            let close = got.iter().zip(&whole).all(|(a, b)| (a - b).abs() <= 1e-4);
            assert!(
                close,
                "{what}: chunked {:?}… vs whole {:?}…",
                &got[..4],
                &whole[..4]
            );
            assert_eq!(argmax(got), argmax(&whole), "{what}");
        }
    }

    #[test]
    fn llama_gguf_loads_and_repeats_itself_from_position_0() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llama.gguf");
        let format = ModelFormat::Gguf(GgufType::Q8_0);
        model_gen::write_model(&ModelSpec::tiny(), format, &path).unwrap();
        let mut loaded = load(&path, &Device::Cpu, None, &mut |_| {}).unwrap();
        assert_eq!(
            loaded.info.format,
            WeightsFormat::Gguf {
                dtype: "Q8_0".into()
            }
        );
        let first = logits(loaded.model.as_mut(), &[1, 7, 8]);
        assert_eq!(logits(loaded.model.as_mut(), &[1, 7, 8]), first);
    }

    /// Files candle's model code would compute wrongly are refused, with both reasons, where
    /// the engine's path does not take them (here: with that path off, as `RBEE_CPU_KERNELS=0`
    /// turns it off; every GGUF type candle's code loads is on it); the plain llama file of
    /// the same type still runs on candle's code.
    #[test]
    fn what_candle_would_get_wrong_is_refused_off_the_engine_path() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (ModelSpec::small_llama3(), Some("rope_freqs")),
            (ModelSpec::small().with_head_dim(64), Some("head size")),
            (
                ModelSpec::small_arch(model_gen::Arch::Gemma3),
                Some("`gemma3` files"),
            ),
            (ModelSpec::small(), None),
            (ModelSpec::small_qwen2(), None),
        ];
        for (i, (spec, refusal)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("m{i}.gguf"));
            model_gen::write_model(&spec, ModelFormat::Gguf(GgufType::Q8_0), &path).unwrap();
            let (content, _) = read_header(&path).unwrap();
            let arch = metadata_str(&content, "general.architecture")
                .unwrap()
                .to_owned();
            let result = load_with(&path, &Device::Cpu, None, false, &mut |_| {});
            match refusal {
                Some(what) => {
                    let err = result.err().expect("refused").to_string();
                    assert!(err.contains(what), "{arch}: {err}");
                    assert!(err.contains("RBEE_CPU_KERNELS=0"), "{arch}: {err}");
                    assert!(candle_cannot_run(&content, &arch).is_some());
                }
                None => {
                    let mut loaded = result.unwrap();
                    assert!(
                        loaded.model.prefix_cache().is_none(),
                        "{arch} runs on candle's path"
                    );
                    assert!(candle_cannot_run(&content, &arch).is_none());
                }
            }
        }
    }

    /// A llama file with tensors its block does not read (here, qwen2's biases under a llama
    /// name) is refused by the engine's path and by candle's; a linear RoPE scale without a
    /// scaling type is seen too.
    #[test]
    fn biases_and_untyped_rope_scaling_are_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qwen2.gguf");
        let format = ModelFormat::Gguf(GgufType::Q8_0);
        model_gen::write_model(&ModelSpec::tiny_qwen2(), format, &path).unwrap();
        let (mut content, _) = read_header(&path).unwrap();
        content.metadata = std::mem::take(&mut content.metadata)
            .into_iter()
            .map(|(k, v)| (k.replacen("qwen2.", "llama.", 1), v))
            .collect();
        content.metadata.insert(
            "general.architecture".into(),
            gguf_file::Value::String("llama".into()),
        );
        let mut header = gguf_info::Header::open(&path).unwrap();
        header.metadata = std::mem::take(&mut header.metadata)
            .into_iter()
            .map(|(k, v)| (k.replacen("qwen2.", "llama.", 1), v))
            .collect();
        header.metadata.insert(
            "general.architecture".into(),
            gguf_info::Value::String("llama".into()),
        );
        let why = cpu::Plan::new(&header, 512).err().expect("refused").0;
        assert!(why.contains(".bias"), "{why}");
        let what = candle_cannot_run(&content, "llama").expect("refused");
        assert!(what.contains("bias"), "{what}");

        let path = dir.path().join("llama.gguf");
        model_gen::write_model(&ModelSpec::tiny(), format, &path).unwrap();
        let (mut content, _) = read_header(&path).unwrap();
        assert!(candle_cannot_run(&content, "llama").is_none());
        content
            .metadata
            .insert("llama.rope.scale_linear".into(), gguf_file::Value::F32(2.0));
        let what = candle_cannot_run(&content, "llama").expect("refused");
        assert!(what.contains("RoPE scaling"), "{what}");
        let mut header = gguf_info::Header::open(&path).unwrap();
        header
            .metadata
            .insert("llama.rope.scale_linear".into(), gguf_info::Value::F32(2.0));
        assert!(
            cpu::Plan::new(&header, 512).is_ok(),
            "the engine's path scales"
        );
    }
}
