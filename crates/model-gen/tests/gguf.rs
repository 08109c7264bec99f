//! GGUF files as candle reads them: names, dtypes, metadata, values and byte layout.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Content, Value, VersionedMagic};
use model_gen::{
    Arch, GgufType, ModelSpec, gguf_metadata, hf_permute, llama_cpp_permute, write_gguf,
    write_hub_dir,
};

fn read(path: &Path) -> Content {
    Content::read(&mut File::open(path).unwrap()).unwrap()
}

fn write(spec: &ModelSpec, ty: GgufType, dir: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("{}-{ty}.gguf", spec.cache_key()));
    write_gguf(spec, ty, &path).unwrap();
    path
}

fn dtypes(content: &Content) -> BTreeMap<String, GgmlDType> {
    content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name.clone(), info.ggml_dtype))
        .collect()
}

fn u32_of(content: &Content, key: &str) -> u32 {
    content.metadata[key].to_u32().unwrap()
}

#[test]
fn f32_gguf_has_llama_cpp_names_shapes_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny();
    let content = read(&write(&spec, GgufType::F32, dir.path()));

    assert_eq!(content.magic, VersionedMagic::GgufV3);
    let mut expected = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".into(),
        "output.weight".into(),
    ];
    for n in 0..spec.layers {
        for t in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            expected.push(format!("blk.{n}.{t}.weight"));
        }
    }
    expected.sort();
    let names: Vec<String> = dtypes(&content).into_keys().collect();
    assert_eq!(names, expected);
    assert!(dtypes(&content).values().all(|&d| d == GgmlDType::F32));

    let dims = |name: &str| content.tensor_infos[name].shape.dims().to_vec();
    assert_eq!(dims("token_embd.weight"), [512, 64]);
    assert_eq!(dims("blk.0.attn_k.weight"), [32, 64]);
    assert_eq!(dims("blk.1.ffn_down.weight"), [64, 128]);
    assert_eq!(dims("blk.1.ffn_norm.weight"), [64]);

    let md = &content.metadata;
    assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
    assert_eq!(u32_of(&content, "general.file_type"), 0);
    assert_eq!(u32_of(&content, "llama.block_count"), 2);
    assert_eq!(u32_of(&content, "llama.embedding_length"), 64);
    assert_eq!(u32_of(&content, "llama.feed_forward_length"), 128);
    assert_eq!(u32_of(&content, "llama.attention.head_count"), 4);
    assert_eq!(u32_of(&content, "llama.attention.head_count_kv"), 2);
    assert_eq!(u32_of(&content, "llama.rope.dimension_count"), 16);
    assert_eq!(u32_of(&content, "llama.context_length"), 512);
    assert_eq!(md["llama.rope.freq_base"].to_f32().unwrap(), 10_000.0);
    assert_eq!(
        md["llama.attention.layer_norm_rms_epsilon"]
            .to_f32()
            .unwrap(),
        1e-5
    );

    assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "llama");
    let tokens = md["tokenizer.ggml.tokens"].to_vec().unwrap();
    let types = md["tokenizer.ggml.token_type"].to_vec().unwrap();
    let scores = md["tokenizer.ggml.scores"].to_vec().unwrap();
    assert_eq!((tokens.len(), types.len(), scores.len()), (512, 512, 512));
    let token = |i: usize| tokens[i].to_string().unwrap().clone();
    assert_eq!(
        [token(0), token(1), token(2), token(3), token(258)],
        ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    );
    assert_eq!(token(259), "▁");
    let ty = |i: usize| types[i].to_i32().unwrap();
    assert_eq!(
        [ty(0), ty(1), ty(2), ty(3), ty(258), ty(259), ty(511)],
        [2, 3, 3, 6, 6, 1, 1]
    );
    assert_eq!(u32_of(&content, "tokenizer.ggml.bos_token_id"), 1);
    assert_eq!(u32_of(&content, "tokenizer.ggml.eos_token_id"), 2);
    assert!(md["tokenizer.ggml.add_bos_token"].to_bool().unwrap());
    assert!(
        md["tokenizer.chat_template"]
            .to_string()
            .unwrap()
            .contains("[INST]")
    );
}

#[test]
fn quantized_files_pick_llama_cpp_dtypes_and_fallbacks() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = ModelSpec::tiny();
    let expect = |spec: &ModelSpec,
                  ty: GgufType,
                  embd: GgmlDType,
                  linear: GgmlDType,
                  head: Option<GgmlDType>| {
        let content = read(&write(spec, ty, dir.path()));
        let d = dtypes(&content);
        assert_eq!(d["token_embd.weight"], embd, "{ty} embedding");
        assert_eq!(d.get("output.weight").copied(), head, "{ty} output");
        for (name, dtype) in &d {
            if name.starts_with("blk.") && name.ends_with("weight") && !name.contains("norm") {
                assert_eq!(*dtype, linear, "{ty} {name}");
            } else if name.contains("norm") || name.ends_with("bias") {
                assert_eq!(*dtype, GgmlDType::F32, "{ty} {name}");
            }
        }
        let quantized = !matches!(ty, GgufType::F32 | GgufType::F16 | GgufType::BF16);
        assert_eq!(
            content
                .metadata
                .contains_key("general.quantization_version"),
            quantized
        );
        assert_eq!(u32_of(&content, "general.file_type"), ty.file_type());
    };
    use GgmlDType as G;
    expect(&tiny, GgufType::F16, G::F16, G::F16, Some(G::F16));
    expect(&tiny, GgufType::BF16, G::BF16, G::BF16, Some(G::BF16));
    expect(&tiny, GgufType::Q8_0, G::Q8_0, G::Q8_0, Some(G::Q8_0));
    expect(&tiny, GgufType::Q4_0, G::Q4_0, G::Q4_0, Some(G::Q8_0));
    // Rows of 64 and 128 do not hold a 256-element Q4_K block: llama.cpp's fallback is Q5_0.
    expect(&tiny, GgufType::Q4K, G::Q5_0, G::Q5_0, Some(G::Q8_0));
    expect(
        &ModelSpec::small(),
        GgufType::Q4K,
        G::Q4K,
        G::Q4K,
        Some(G::Q8_0),
    );
    // A tied embedding is the output head too.
    expect(
        &ModelSpec::tiny_qwen2(),
        GgufType::Q4_0,
        G::Q8_0,
        G::Q4_0,
        None,
    );
}

#[test]
fn qwen2_gguf_has_qkv_biases_and_qwen2_keys() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny_qwen2();
    let content = read(&write(&spec, GgufType::F32, dir.path()));
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "qwen2"
    );
    assert_eq!(u32_of(&content, "qwen2.block_count"), 2);
    assert_eq!(
        content.metadata["qwen2.rope.freq_base"].to_f32().unwrap(),
        1e6
    );
    for n in 0..spec.layers {
        for (t, len) in [("q", 64), ("k", 32), ("v", 32)] {
            let info = &content.tensor_infos[&format!("blk.{n}.attn_{t}.bias")];
            assert_eq!(info.shape.dims(), [len]);
        }
    }
    assert!(!content.tensor_infos.contains_key("output.weight"));
}

/// Gemma 3's `small-linear8` preset writes the two keys the converter writes for a config's
/// `rope_scaling: {rope_type: linear, factor: 8}`; the plain preset writes neither.
#[test]
fn gemma3_linear_rope_scaling_is_written_only_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let scaled = ModelSpec::preset("small-linear8", Arch::Gemma3).unwrap();
    let md = gguf_metadata(&scaled, GgufType::F32);
    let get = |md: &[(String, Value)], key: &str| {
        md.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    assert_eq!(
        get(&md, "gemma3.rope.scaling.type")
            .unwrap()
            .to_string()
            .unwrap(),
        "linear"
    );
    assert_eq!(
        get(&md, "gemma3.rope.scaling.factor")
            .unwrap()
            .to_f32()
            .unwrap(),
        8.0
    );
    let plain = ModelSpec::preset("small", Arch::Gemma3).unwrap();
    let md = gguf_metadata(&plain, GgufType::F32);
    assert!(get(&md, "gemma3.rope.scaling.type").is_none());
    assert!(get(&md, "gemma3.rope.scaling.factor").is_none());
    assert_ne!(scaled.cache_key(), plain.cache_key());
    // Only the two keys differ: the weights are the same.
    let a = read(&write(&scaled, GgufType::F32, dir.path()));
    let b = read(&write(&plain, GgufType::F32, dir.path()));
    assert_eq!(a.metadata.len(), b.metadata.len() + 2);
    assert_eq!(dtypes(&a), dtypes(&b));
    assert!(ModelSpec::preset("small-linear8", Arch::Llama).is_err());
}

/// A BF16 file holds each matrix rounded to bf16 (to nearest, ties to even, as llama.cpp's
/// converter rounds) and its norms in F32.
#[test]
fn bf16_files_hold_the_f32_weights_rounded_to_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny();
    let f32_file = write(&spec, GgufType::F32, dir.path());
    let bf16_file = write(&spec, GgufType::BF16, dir.path());
    let (full, half) = (read(&f32_file), read(&bf16_file));
    assert_eq!(u32_of(&half, "general.file_type"), 32);
    // Round to nearest even on the upper 16 bits (the weights are finite).
    let to_bf16 = |x: f32| {
        let bits = x.to_bits();
        f32::from_bits(((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) << 16)
    };
    for name in ["blk.0.attn_q.weight", "output.weight"] {
        let expected: Vec<f32> = f32_values(&full, &f32_file, name)
            .into_iter()
            .map(to_bf16)
            .collect();
        assert_eq!(f32_values(&half, &bf16_file, name), expected, "{name}");
    }
    let norm = "blk.1.ffn_norm.weight";
    assert_eq!(dtypes(&half)[norm], GgmlDType::F32);
    assert_eq!(
        f32_values(&half, &bf16_file, norm),
        f32_values(&full, &f32_file, norm)
    );
}

fn f32_values(content: &Content, file: &Path, name: &str) -> Vec<f32> {
    let mut reader = File::open(file).unwrap();
    let tensor = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
    tensor
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn safetensors_values(dir: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn gguf_holds_the_hub_weights_with_llama_rows_permuted() {
    let dir = tempfile::tempdir().unwrap();
    for spec in [ModelSpec::tiny(), ModelSpec::tiny_qwen2()] {
        let hub = dir.path().join(spec.cache_key());
        write_hub_dir(&spec, &hub).unwrap();
        let gguf = write(&spec, GgufType::F32, dir.path());
        let content = read(&gguf);
        let llama = spec.arch == model_gen::Arch::Llama;
        for (hf, gg, rows, heads) in [
            (
                "model.layers.1.self_attn.q_proj.weight",
                "blk.1.attn_q.weight",
                64,
                spec.heads,
            ),
            (
                "model.layers.1.self_attn.k_proj.weight",
                "blk.1.attn_k.weight",
                32,
                spec.kv_heads,
            ),
        ] {
            let hf_values = safetensors_values(&hub, hf);
            let gguf_values = f32_values(&content, &gguf, gg);
            if llama {
                assert_eq!(gguf_values, llama_cpp_permute(&hf_values, rows, 64, heads));
                assert_eq!(hf_permute(&gguf_values, rows, 64, heads), hf_values);
            } else {
                assert_eq!(gguf_values, hf_values, "qwen2 keeps Hugging Face row order");
            }
        }
        for (hf, gg) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.0.self_attn.v_proj.weight",
                "blk.0.attn_v.weight",
            ),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
            ),
            ("model.norm.weight", "output_norm.weight"),
        ] {
            assert_eq!(
                safetensors_values(&hub, hf),
                f32_values(&content, &gguf, gg),
                "{hf}"
            );
        }
    }
}

/// The streaming writer must produce exactly what candle's in-memory writer does (which stamps
/// version 2 where ours says 3) for the same metadata and tensors.
#[test]
fn streaming_writer_matches_candles_writer() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, ty) in [
        (ModelSpec::tiny(), GgufType::Q4_0),
        (ModelSpec::tiny_qwen2(), GgufType::Q4K),
    ] {
        let path = write(&spec, ty, dir.path());
        let content = read(&path);
        let mut infos: Vec<(&String, u64)> = content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n, i.offset))
            .collect();
        infos.sort_by_key(|(_, offset)| *offset);
        let mut reader = File::open(&path).unwrap();
        let tensors: Vec<(&str, _)> = infos
            .iter()
            .map(|(name, _)| {
                (
                    name.as_str(),
                    content.tensor(&mut reader, name, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        let metadata = gguf_metadata(&spec, ty);
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &_)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut candle_bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut candle_bytes, &metadata, &tensor_refs).unwrap();
        let mut candle_bytes = candle_bytes.into_inner();
        candle_bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        let ours = std::fs::read(&path).unwrap();
        assert_eq!(ours.len(), candle_bytes.len(), "{ty}");
        assert!(
            ours == candle_bytes,
            "{ty}: bytes differ from candle's writer"
        );
    }
}

#[test]
fn same_spec_gives_identical_bytes_and_another_seed_does_not() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny();
    for ty in [GgufType::F32, GgufType::Q4_0, GgufType::Q4K] {
        let first = std::fs::read(write(&spec, ty, a.path())).unwrap();
        let second = std::fs::read(write(&spec, ty, b.path())).unwrap();
        assert!(first == second, "{ty} differs between two runs");
    }
    write_hub_dir(&spec, &a.path().join("hub")).unwrap();
    write_hub_dir(&spec, &b.path().join("hub")).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let first = std::fs::read(a.path().join("hub").join(file)).unwrap();
        let second = std::fs::read(b.path().join("hub").join(file)).unwrap();
        assert!(first == second, "{file} differs between two runs");
    }
    let reseeded = spec.clone().with_seed(42);
    let other = std::fs::read(write(&reseeded, GgufType::F32, a.path())).unwrap();
    let original = std::fs::read(write(&spec, GgufType::F32, a.path())).unwrap();
    assert!(other != original);
}
