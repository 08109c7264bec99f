//! Every family's GGUF as llama.cpp expects it: tensor names (llama.cpp's `llama-arch.cpp`),
//! shapes, types, metadata keys and vocabularies, read back with candle's GGUF reader.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;
use model_gen::tokenizer::{TOKEN_TYPE_CONTROL, Vocab, tokenizer_json};
use model_gen::{Arch, ChatFormat, GgufType, ModelSpec, RopeScaling, use_more_bits, write_gguf};

fn write(spec: &ModelSpec, ty: GgufType, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}-{ty}.gguf", spec.cache_key()));
    write_gguf(spec, ty, &path).unwrap();
    path
}

fn read(path: &Path) -> Content {
    Content::read(&mut File::open(path).unwrap()).unwrap()
}

fn dims(content: &Content) -> BTreeMap<String, Vec<usize>> {
    content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name.clone(), info.shape.dims().to_vec()))
        .collect()
}

fn dtypes(content: &Content) -> BTreeMap<String, GgmlDType> {
    content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name.clone(), info.ggml_dtype))
        .collect()
}

fn values(content: &Content, path: &Path, name: &str) -> Vec<f32> {
    let mut reader = File::open(path).unwrap();
    content
        .tensor(&mut reader, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn u32_of(content: &Content, key: &str) -> u32 {
    content.metadata[key]
        .to_u32()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn f32_of(content: &Content, key: &str) -> f32 {
    content.metadata[key]
        .to_f32()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// The tensors llama.cpp's loader creates for `spec` (`load_arch_tensors` of each family),
/// GGUF shape order reversed to candle's `[rows, cols]`.
fn expected_tensors(spec: &ModelSpec) -> BTreeMap<String, Vec<usize>> {
    let (h, hd, ff) = (spec.hidden, spec.head_dim(), spec.ffn);
    let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
    let mut t = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        assert!(t.insert(name, shape).is_none());
    };
    add("token_embd.weight".into(), vec![spec.vocab, h]);
    add("output_norm.weight".into(), vec![h]);
    if !spec.tie_embeddings {
        add("output.weight".into(), vec![spec.vocab, h]);
    }
    match spec.rope_scaling {
        RopeScaling::Llama3 { .. } if spec.write_rope_freqs => {
            add("rope_freqs.weight".into(), vec![hd / 2]);
        }
        RopeScaling::LongRope { .. } => {
            add("rope_factors_long.weight".into(), vec![hd / 2]);
            add("rope_factors_short.weight".into(), vec![hd / 2]);
        }
        _ => {}
    }
    for n in 0..spec.layers {
        let mut blk = |s: &str, shape: Vec<usize>| add(format!("blk.{n}.{s}.weight"), shape);
        blk("attn_norm", vec![h]);
        blk("ffn_norm", vec![h]);
        blk("attn_output", vec![h, q]);
        blk("ffn_down", vec![h, ff]);
        if spec.arch == Arch::Phi3 {
            blk("attn_qkv", vec![q + 2 * kv, h]);
            blk("ffn_up", vec![2 * ff, h]);
        } else {
            blk("attn_q", vec![q, h]);
            blk("attn_k", vec![kv, h]);
            blk("attn_v", vec![kv, h]);
            blk("ffn_gate", vec![ff, h]);
            blk("ffn_up", vec![ff, h]);
        }
        if matches!(spec.arch, Arch::Qwen3 | Arch::Gemma3) {
            blk("attn_q_norm", vec![hd]);
            blk("attn_k_norm", vec![hd]);
        }
        if matches!(spec.arch, Arch::Gemma2 | Arch::Gemma3) {
            blk("post_attention_norm", vec![h]);
            blk("post_ffw_norm", vec![h]);
        }
        if spec.arch == Arch::Qwen2 {
            for (s, len) in [("q", q), ("k", kv), ("v", kv)] {
                add(format!("blk.{n}.attn_{s}.bias"), vec![len]);
            }
        }
    }
    t
}

fn all_specs() -> Vec<ModelSpec> {
    let mut specs: Vec<ModelSpec> = Arch::ALL
        .into_iter()
        .flat_map(|a| [ModelSpec::tiny_arch(a), ModelSpec::small_arch(a)])
        .collect();
    specs.extend([
        ModelSpec::tiny_llama3(),
        ModelSpec::small_llama3(),
        ModelSpec::tiny_llama3().without_rope_freqs(),
        ModelSpec::tiny_llama3().with_head_dim(32),
    ]);
    specs
}

#[test]
fn every_family_has_llama_cpp_tensor_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    for spec in all_specs() {
        let content = read(&write(&spec, GgufType::F32, dir.path()));
        assert_eq!(
            dims(&content),
            expected_tensors(&spec),
            "{} h{} head_dim {}",
            spec.arch,
            spec.hidden,
            spec.head_dim()
        );
        let arch = content.metadata["general.architecture"]
            .to_string()
            .unwrap();
        assert_eq!(arch, spec.arch.gguf_name());
    }
}

#[test]
fn presets_have_each_family_shape() {
    let gemma3 = ModelSpec::tiny_arch(Arch::Gemma3);
    // Five local layers per global one: layer 5 is global.
    assert!(gemma3.layers >= 6);
    for arch in [Arch::Gemma2, Arch::Gemma3] {
        for spec in [ModelSpec::tiny_arch(arch), ModelSpec::small_arch(arch)] {
            // A 40-token prompt plus 32 generated tokens crosses the window.
            assert!(spec.sliding_window.unwrap() < 40, "{arch}");
            assert!(spec.tie_embeddings);
            assert_ne!(
                spec.q_dim(),
                spec.hidden,
                "{arch}: heads * head_dim != hidden"
            );
        }
    }
    for spec in [
        ModelSpec::tiny_arch(Arch::Qwen3),
        ModelSpec::small_arch(Arch::Qwen3),
    ] {
        assert_ne!(spec.q_dim(), spec.hidden);
    }
    // Q4_K and Q6_K blocks fit every row of the small presets.
    for arch in Arch::ALL {
        let spec = ModelSpec::small_arch(arch);
        assert_eq!(spec.hidden, 256);
        for cols in [spec.hidden, spec.q_dim(), spec.ffn] {
            assert!(cols.is_multiple_of(256), "{arch}: {cols}");
        }
    }
    let phi3 = ModelSpec::small_arch(Arch::Phi3);
    let RopeScaling::LongRope { original_context } = phi3.rope_scaling else {
        panic!("phi3 without LongRoPE");
    };
    // llama.cpp runs at least 256 tokens of context: at 256 it takes the short factors, above
    // it the long ones.
    assert_eq!(original_context, 256);
    assert!(original_context < ModelSpec::tiny_arch(Arch::Phi3).context_length);
}

#[test]
fn metadata_keys_are_the_converters_per_family() {
    let dir = tempfile::tempdir().unwrap();

    let spec = ModelSpec::tiny_arch(Arch::Qwen3);
    let c = read(&write(&spec, GgufType::F32, dir.path()));
    assert_eq!(u32_of(&c, "qwen3.attention.key_length"), 32);
    assert_eq!(u32_of(&c, "qwen3.attention.value_length"), 32);
    assert_eq!(u32_of(&c, "qwen3.attention.head_count"), 4);
    assert_eq!(f32_of(&c, "qwen3.rope.freq_base"), 1e6);
    assert!(!c.tensor_infos.contains_key("blk.0.attn_q.bias"));

    let spec = ModelSpec::tiny_arch(Arch::Gemma2);
    let c = read(&write(&spec, GgufType::F32, dir.path()));
    assert_eq!(f32_of(&c, "gemma2.attn_logit_softcapping"), 50.0);
    assert_eq!(f32_of(&c, "gemma2.final_logit_softcapping"), 30.0);
    assert_eq!(u32_of(&c, "gemma2.attention.sliding_window"), 16);
    assert_eq!(u32_of(&c, "gemma2.attention.key_length"), 32);
    // Gemma 2's converter writes no rope base: llama.cpp's 10 000 applies.
    assert!(!c.metadata.contains_key("gemma2.rope.freq_base"));
    assert!(
        !c.metadata["tokenizer.ggml.add_space_prefix"]
            .to_bool()
            .unwrap()
    );

    let spec = ModelSpec::small_arch(Arch::Gemma3);
    let c = read(&write(&spec, GgufType::F32, dir.path()));
    assert_eq!(f32_of(&c, "gemma3.rope.freq_base"), 1e6);
    assert_eq!(u32_of(&c, "gemma3.attention.sliding_window"), 16);
    assert_eq!(u32_of(&c, "gemma3.block_count"), 6);
    assert_eq!(u32_of(&c, "gemma3.attention.head_count_kv"), 2);
    // No local base, no pattern, no soft caps: llama.cpp's defaults (10 000, five local layers
    // per global one, none) apply.
    for key in [
        "gemma3.rope.freq_base_swa",
        "gemma3.attention.sliding_window_pattern",
        "gemma3.final_logit_softcapping",
        "gemma3.attn_logit_softcapping",
    ] {
        assert!(!c.metadata.contains_key(key), "{key}");
    }

    let spec = ModelSpec::tiny_arch(Arch::Phi3);
    let c = read(&write(&spec, GgufType::F32, dir.path()));
    assert_eq!(u32_of(&c, "phi3.rope.scaling.original_context_length"), 256);
    assert_eq!(u32_of(&c, "phi3.context_length"), 512);
    // sqrt(1 + ln(512 / 256) / ln(256)), as the converter computes it.
    let expected = (1.0 + (2f64).ln() / (256f64).ln()).sqrt() as f32;
    assert_eq!(f32_of(&c, "phi3.rope.scaling.attn_factor"), expected);
    assert_eq!(u32_of(&c, "phi3.rope.dimension_count"), 16);
    assert!(c.metadata.contains_key("phi3.attention.sliding_window"));
    assert_eq!(
        c.metadata["tokenizer.ggml.pre"].to_string().unwrap(),
        "default"
    );

    let spec = ModelSpec::tiny_llama3().with_head_dim(32);
    let c = read(&write(&spec, GgufType::F32, dir.path()));
    assert_eq!(u32_of(&c, "llama.attention.key_length"), 32);
    assert_eq!(u32_of(&c, "llama.attention.value_length"), 32);
    // llama.cpp refuses a llama file whose rope dimension is not the head size.
    assert_eq!(u32_of(&c, "llama.rope.dimension_count"), 32);
    assert_eq!(f32_of(&c, "llama.rope.freq_base"), 500_000.0);
    let plain = read(&write(&ModelSpec::tiny(), GgufType::F32, dir.path()));
    assert!(!plain.metadata.contains_key("llama.attention.key_length"));
}

/// The converter's formula, evaluated independently in f32 as its torch code does.
fn llama3_factors(theta: f32, dim: usize, factor: f32, low: f32, high: f32, old: f32) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[test]
fn rope_freqs_follow_the_llama3_formula_and_can_be_left_out() {
    let dir = tempfile::tempdir().unwrap();
    for spec in [
        ModelSpec::tiny_llama3(),
        ModelSpec::small_llama3(),
        ModelSpec::small_llama3().with_head_dim(64),
    ] {
        let path = write(&spec, GgufType::Q4KM, dir.path());
        let c = read(&path);
        assert_eq!(dtypes(&c)["rope_freqs.weight"], GgmlDType::F32);
        let got = values(&c, &path, "rope_freqs.weight");
        let want = llama3_factors(500_000.0, spec.head_dim(), 8.0, 1.0, 4.0, 64.0);
        assert_eq!(got.len(), spec.head_dim() / 2);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w, "{got:?} vs {want:?}");
        }
        // The factors really scale: the first pair keeps its frequency, most are divided by 8,
        // at least one lies between.
        assert_eq!(got[0], 1.0);
        assert_eq!(*got.last().unwrap(), 8.0);
        assert!(got.iter().any(|&f| f > 1.0 && f < 8.0), "{got:?}");

        let without = spec.clone().without_rope_freqs();
        assert_ne!(without.cache_key(), spec.cache_key());
        let path2 = write(&without, GgufType::Q4KM, dir.path());
        let c2 = read(&path2);
        assert!(!c2.tensor_infos.contains_key("rope_freqs.weight"));
        assert_eq!(c2.tensor_infos.len(), c.tensor_infos.len() - 1);
        let md = |c: &Content| {
            format!("{:?}", {
                let mut m: Vec<_> = c
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), format!("{v:?}")))
                    .collect();
                m.sort();
                m
            })
        };
        assert_eq!(md(&c), md(&c2));
        for name in [
            "blk.0.attn_q.weight",
            "blk.1.ffn_down.weight",
            "token_embd.weight",
        ] {
            assert_eq!(values(&c, &path, name), values(&c2, &path2, name), "{name}");
        }
    }
}

#[test]
fn phi3_fuses_qkv_and_gate_up_and_carries_both_longrope_factor_sets() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny_arch(Arch::Phi3);
    let path = write(&spec, GgufType::F32, dir.path());
    let c = read(&path);
    let long = values(&c, &path, "rope_factors_long.weight");
    let short = values(&c, &path, "rope_factors_short.weight");
    let (want_short, want_long) = spec.longrope_factors().unwrap();
    assert_eq!((&short, &long), (&want_short, &want_long));
    assert_eq!(long.len(), spec.head_dim() / 2);
    assert!(
        long.iter()
            .zip(&short)
            .skip(1)
            .all(|(l, s)| l > s && *s > 1.0)
    );
    assert_eq!((long[0], short[0]), (1.0, 1.0));
    // attn_qkv holds q's rows, then k's, then v's.
    let qkv = values(&c, &path, "blk.0.attn_qkv.weight");
    assert_eq!(qkv.len(), (spec.q_dim() + 2 * spec.kv_dim()) * spec.hidden);
}

#[test]
fn gemma_norms_are_stored_as_one_plus_w() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Gemma2, Arch::Gemma3] {
        let spec = ModelSpec::tiny_arch(arch);
        let path = write(&spec, GgufType::F32, dir.path());
        let c = read(&path);
        let mut norms = vec!["blk.0.attn_norm.weight", "blk.1.post_ffw_norm.weight"];
        if arch == Arch::Gemma3 {
            norms.push("blk.5.attn_q_norm.weight");
        }
        for name in norms {
            assert!(
                values(&c, &path, name).iter().all(|&v| v == 1.0),
                "{arch} {name}"
            );
        }
        // The final norm's random signs carry the logit scale (tied head).
        let out = values(&c, &path, "output_norm.weight");
        assert!(out.iter().all(|v| v.abs() == spec.logit_std), "{arch}");
        assert!(out.iter().any(|&v| v > 0.0) && out.iter().any(|&v| v < 0.0));
        // The embedding is scaled down by sqrt(hidden), which llama.cpp scales back up; Gemma
        // 2's loud rows are that times their scale.
        let embd = values(&c, &path, "token_embd.weight");
        let want = 1.0 / (spec.hidden as f32).sqrt();
        let rms = |rows: &mut dyn Iterator<Item = &[f32]>| {
            let (sum, n) = rows
                .flatten()
                .fold((0f32, 0usize), |(sum, n), v| (sum + v * v, n + 1));
            (sum / n as f32).sqrt()
        };
        let is_loud = |row: &[f32]| rms(&mut std::iter::once(row)) > 2.0 * want;
        let quiet = rms(&mut embd.chunks(spec.hidden).filter(|r| !is_loud(r)));
        assert!((quiet / want - 1.0).abs() < 0.05, "{arch}: rms {quiet}");
        let loud: Vec<&[f32]> = embd.chunks(spec.hidden).filter(|r| is_loud(r)).collect();
        match spec.loud_rows {
            Some(l) => {
                assert!(!loud.is_empty(), "{arch}: no loud rows");
                let loud_rms = rms(&mut loud.into_iter());
                assert!(
                    (loud_rms / (l.scale * want) - 1.0).abs() < 0.1,
                    "{arch}: {loud_rms}"
                );
            }
            None => assert!(loud.is_empty(), "{arch}: {} loud rows", loud.len()),
        }
    }
}

/// `use_more_bits` as llama-quant.cpp writes it, for the expectations below.
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The Q2_K and Q3_K_M mixes as llama-quant.cpp picks them for a dense model (not Falcon) whose
/// query heads share KV heads two to one: Q2_K files raise `attn_v`, `attn_output` and
/// `ffn_down` to Q3_K; Q3_K_M files raise `attn_output` to Q4_K, `attn_v` to Q5_K on layers 0
/// and 1 and Q4_K after, `ffn_down` to Q5_K on the first sixteenth of the layers and Q4_K after.
/// Rows of 64 or 128 fall back to Q4_0 (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0).
#[test]
fn q2_k_and_q3_k_m_assign_llama_cpps_per_tensor_types() {
    use GgmlDType as G;
    let dir = tempfile::tempdir().unwrap();
    for mut spec in [ModelSpec::small(), ModelSpec::tiny()] {
        spec.layers = 32;
        assert!(spec.heads / spec.kv_heads < 4);
        let small = spec.hidden == 256;
        let fit = |t: G| match (small, t) {
            (true, t) => t,
            (false, G::Q4K) => G::Q5_0,
            (false, G::Q5K) => G::Q5_1,
            (false, G::Q6K) => G::Q8_0,
            (false, _) => G::Q4_0,
        };
        for (ty, file_type) in [(GgufType::Q2K, 10), (GgufType::Q3KM, 12)] {
            let c = read(&write(&spec, ty, dir.path()));
            assert_eq!(u32_of(&c, "general.file_type"), file_type);
            for (name, dtype) in dtypes(&c) {
                let layer = name
                    .strip_prefix("blk.")
                    .and_then(|r| r.split('.').next())
                    .map(|n| n.parse::<usize>().unwrap());
                let is = |suffix: &str| name.ends_with(suffix);
                let want = if c.tensor_infos[&name].shape.rank() == 1 {
                    G::F32
                } else if name == "output.weight"
                    || (name == "token_embd.weight" && spec.tie_embeddings)
                {
                    fit(G::Q6K)
                } else if ty == GgufType::Q2K {
                    if is("attn_v.weight") || is("attn_output.weight") || is("ffn_down.weight") {
                        fit(G::Q3K)
                    } else {
                        fit(G::Q2K)
                    }
                } else if is("attn_v.weight") && layer < Some(2)
                    || is("ffn_down.weight") && layer < Some(2)
                {
                    fit(G::Q5K)
                } else if is("attn_v.weight") || is("attn_output.weight") || is("ffn_down.weight") {
                    fit(G::Q4K)
                } else {
                    fit(G::Q3K)
                };
                assert_eq!(dtype, want, "{ty} h{} {name}", spec.hidden);
            }
        }
    }
}

#[test]
fn q4_k_m_assigns_llama_cpps_per_tensor_types() {
    use GgmlDType as G;
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        (0..8).map(|i| use_more_bits(i, 8)).collect::<Vec<_>>(),
        [true, false, false, true, false, false, true, true]
    );
    for arch in Arch::ALL {
        for spec in [ModelSpec::small_arch(arch), ModelSpec::tiny_arch(arch)] {
            let c = read(&write(&spec, GgufType::Q4KM, dir.path()));
            assert_eq!(u32_of(&c, "general.file_type"), 15);
            let small = spec.hidden == 256;
            // Rows of 64 or 128 do not hold 256-blocks: Q4_K falls back to Q5_0, Q6_K to Q8_0.
            let (q4, q6) = if small {
                (G::Q4K, G::Q6K)
            } else {
                (G::Q5_0, G::Q8_0)
            };
            for (name, dtype) in dtypes(&c) {
                let layer = name
                    .strip_prefix("blk.")
                    .and_then(|r| r.split('.').next())
                    .map(|n| n.parse::<usize>().unwrap());
                let value_like =
                    name.ends_with("attn_v.weight") || name.ends_with("attn_qkv.weight");
                let want = if c.tensor_infos[&name].shape.rank() == 1 {
                    G::F32
                } else if name == "output.weight"
                    || (name == "token_embd.weight" && spec.tie_embeddings)
                {
                    q6
                } else if (value_like || name.ends_with("ffn_down.weight"))
                    && more_bits(layer.unwrap(), spec.layers)
                {
                    // ffn_down's rows are ffn long: 768 in small, 128 in tiny.
                    q6
                } else {
                    q4
                };
                assert_eq!(dtype, want, "{arch} h{} {name}", spec.hidden);
            }
        }
    }
    // Small presets of four layers: layers 2 and 3 get more bits.
    let c = read(&write(&ModelSpec::small(), GgufType::Q4KM, dir.path()));
    let d = dtypes(&c);
    assert_eq!(
        (0..4)
            .map(|n| d[&format!("blk.{n}.attn_v.weight")])
            .collect::<Vec<_>>(),
        [G::Q4K, G::Q4K, G::Q6K, G::Q6K]
    );
    assert_eq!(
        d["token_embd.weight"],
        G::Q4K,
        "an untied embedding stays Q4_K"
    );
    assert_eq!(d["output.weight"], G::Q6K);
}

#[test]
fn q6_k_is_q6_k_everywhere_with_q8_0_where_rows_do_not_fit() {
    use GgmlDType as G;
    let dir = tempfile::tempdir().unwrap();
    for (spec, want) in [
        (ModelSpec::small_arch(Arch::Gemma3), G::Q6K),
        (ModelSpec::tiny_arch(Arch::Phi3), G::Q8_0),
    ] {
        let c = read(&write(&spec, GgufType::Q6K, dir.path()));
        assert_eq!(u32_of(&c, "general.file_type"), 18);
        for (name, dtype) in dtypes(&c) {
            let rank = c.tensor_infos[&name].shape.rank();
            assert_eq!(dtype, if rank == 1 { G::F32 } else { want }, "{name}");
        }
    }
}

#[test]
fn every_family_writes_identical_bytes_for_the_same_spec() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for spec in all_specs() {
        for ty in [GgufType::F32, GgufType::Q4KM] {
            let first = std::fs::read(write(&spec, ty, a.path())).unwrap();
            let second = std::fs::read(write(&spec, ty, b.path())).unwrap();
            assert!(
                first == second,
                "{} {ty} differs between two runs",
                spec.arch
            );
        }
        let reseeded = spec.clone().with_seed(7);
        assert_ne!(reseeded.cache_key(), spec.cache_key());
    }
}

#[test]
fn each_family_vocabulary_has_its_control_tokens_ids_and_template() {
    let dir = tempfile::tempdir().unwrap();
    // (spec, BOS, EOS, add BOS, other control tokens, a marker of the chat template)
    type Case = (
        ModelSpec,
        &'static str,
        &'static str,
        bool,
        &'static [&'static str],
        &'static str,
    );
    let cases: [Case; 6] = [
        (ModelSpec::tiny(), "<s>", "</s>", true, &[], "[INST]"),
        (
            ModelSpec::tiny_llama3(),
            "<|begin_of_text|>",
            "<|eot_id|>",
            true,
            &[
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|end_of_text|>",
            ],
            "<|start_header_id|>",
        ),
        (
            ModelSpec::tiny_arch(Arch::Qwen3),
            "<|endoftext|>",
            "<|im_end|>",
            false,
            &["<|im_start|>"],
            "<|im_start|>",
        ),
        (
            ModelSpec::tiny_arch(Arch::Qwen2),
            "<|endoftext|>",
            "<|im_end|>",
            false,
            &["<|im_start|>"],
            "<|im_end|>",
        ),
        (
            ModelSpec::tiny_arch(Arch::Gemma3),
            "<bos>",
            "<eos>",
            true,
            &["<start_of_turn>", "<end_of_turn>", "<pad>"],
            "<start_of_turn>",
        ),
        (
            ModelSpec::tiny_arch(Arch::Phi3),
            "<s>",
            "<|endoftext|>",
            false,
            &["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
            "<|assistant|>",
        ),
    ];
    for (spec, bos, eos, add_bos, controls, template_marker) in cases {
        let c = read(&write(&spec, GgufType::Q8_0, dir.path()));
        let tokens: Vec<String> = c.metadata["tokenizer.ggml.tokens"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect();
        let types: Vec<i32> = c.metadata["tokenizer.ggml.token_type"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_i32().unwrap())
            .collect();
        assert_eq!(tokens.len(), spec.vocab);
        let id = |t: &str| {
            tokens
                .iter()
                .position(|x| x == t)
                .unwrap_or_else(|| panic!("{t} missing"))
        };
        let what = format!("{:?}", spec.chat);
        assert_eq!(
            u32_of(&c, "tokenizer.ggml.bos_token_id") as usize,
            id(bos),
            "{what}"
        );
        assert_eq!(
            u32_of(&c, "tokenizer.ggml.eos_token_id") as usize,
            id(eos),
            "{what}"
        );
        assert_eq!(
            c.metadata["tokenizer.ggml.add_bos_token"]
                .to_bool()
                .unwrap(),
            add_bos,
            "{what}"
        );
        for t in controls.iter().chain([&bos, &eos]) {
            assert_eq!(types[id(t)], TOKEN_TYPE_CONTROL, "{what} {t}");
        }
        let template = c.metadata["tokenizer.chat_template"].to_string().unwrap();
        assert!(template.contains(template_marker), "{what}");
        // Byte tokens exist for llama.cpp's SentencePiece newline lookup.
        assert!(tokens.iter().any(|t| t == "<0x0A>"));
        // The vocabulary of the metadata is Vocab::for_spec's.
        assert_eq!(tokens, Vocab::for_spec(&spec).tokens);
    }
    // The llama 2 vocabulary is unchanged: Vocab::new is its vocabulary.
    assert_eq!(Vocab::new(512), Vocab::for_spec(&ModelSpec::tiny()));
    assert_eq!(ModelSpec::tiny().chat, ChatFormat::Llama2);
}

#[test]
fn chatml_tokenizer_json_keeps_control_tokens_whole_and_adds_no_bos() {
    let vocab = Vocab::with_format(512, ChatFormat::ChatMl);
    let tok = tokenizers::Tokenizer::from_bytes(tokenizer_json(&vocab).unwrap()).unwrap();
    let enc = tok
        .encode("<|im_start|>user Hello<|im_end|>", true)
        .unwrap();
    let ids = enc.get_ids();
    assert_eq!(ids[0], vocab.id_of("<|im_start|>").unwrap());
    assert_eq!(*ids.last().unwrap(), vocab.eos_id());
    assert!(!ids.contains(&vocab.bos_id()));
}

#[test]
fn invalid_family_specs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ModelSpec {
            tie_embeddings: false,
            ..ModelSpec::tiny_arch(Arch::Gemma2)
        },
        ModelSpec {
            sliding_window: Some(8),
            ..ModelSpec::tiny()
        },
        ModelSpec {
            rope_scaling: ModelSpec::tiny_llama3().rope_scaling,
            ..ModelSpec::tiny_arch(Arch::Phi3)
        },
        ModelSpec {
            final_softcap: Some(30.0),
            ..ModelSpec::tiny_arch(Arch::Qwen3)
        },
        ModelSpec::tiny().with_head_dim(15),
    ];
    for spec in bad {
        let path = dir.path().join("bad.gguf");
        assert!(write_gguf(&spec, GgufType::F32, &path).is_err(), "{spec:?}");
        assert!(!path.exists());
    }
    // Hub layout is not written for the families candle's hub loaders here do not cover.
    let err = model_gen::write_hub_dir(&ModelSpec::tiny_arch(Arch::Gemma2), dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("gemma2"), "{err}");
}

#[test]
fn arch_names_round_trip() {
    for arch in Arch::ALL {
        assert_eq!(arch.gguf_name().parse::<Arch>().unwrap(), arch);
    }
    assert!("mixtral".parse::<Arch>().is_err());
    assert_eq!(
        ModelSpec::preset("small-llama3", Arch::Llama).unwrap(),
        ModelSpec::small_llama3()
    );
    assert!(ModelSpec::preset("tiny-llama3", Arch::Gemma2).is_err());
    for ty in [GgufType::Q6K, GgufType::Q4KM] {
        assert_eq!(ty.to_string().parse::<GgufType>().unwrap(), ty);
    }
}
