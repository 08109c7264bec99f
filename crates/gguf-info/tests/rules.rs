//! The rules on a header, against files model-gen writes as llama.cpp's tools write them: which
//! files the CPU path takes and what it reads, which types are refused, the context.

use std::path::{Path, PathBuf};

use gguf_info::arch::Family;
use gguf_info::context::{self, CANDLE_LLAMA_MAX_SEQ_LEN};
use gguf_info::cpu_path::{Layout, Qkv};
use gguf_info::{GgmlType, Header, Value};
use model_gen::{Arch, GgufType, ModelFormat, ModelSpec};

fn generated(spec: &ModelSpec, ty: GgufType, dir: &Path) -> PathBuf {
    model_gen::ensure_generated(spec, ModelFormat::Gguf(ty), dir).unwrap()
}

#[test]
fn the_cpu_path_takes_every_architecture_and_reads_each_blocks_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let archs = [
        (Arch::Llama, Family::Llama),
        (Arch::Qwen2, Family::Qwen2),
        (Arch::Qwen3, Family::Qwen3),
        (Arch::Gemma2, Family::Gemma2),
        (Arch::Gemma3, Family::Gemma3),
        (Arch::Phi3, Family::Phi3),
    ];
    for (arch, family) in archs {
        let spec = ModelSpec::tiny_arch(arch);
        let header = Header::open(&generated(&spec, GgufType::Q8_0, dir.path())).unwrap();
        let layout = Layout::read(&header, 512).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        assert_eq!(layout.hyper.family, family);
        assert_eq!(layout.layers.len(), spec.layers);
        assert_eq!(
            (layout.embd.rows, layout.embd.cols),
            (spec.vocab, spec.hidden)
        );
        assert_eq!(layout.hyper.qkv_bias, layout.layers[0].qkv_bias.is_some());
        // Phi-3 fuses Q, K and V in one matrix.
        let fused = matches!(layout.layers[0].qkv, Qkv::Fused(_));
        assert_eq!(fused, arch == Arch::Phi3, "{arch:?}");
        let q = header.tensor("blk.0.ffn_down.weight").unwrap();
        assert_eq!(layout.layers[0].down.offset, q.offset);
    }
}

#[test]
fn files_the_cpu_path_does_not_take_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let why = |header: &Header| Layout::read(header, 512).expect_err("refused").0;

    // A head size its attention does not take.
    let wide = Header::open(&generated(
        &ModelSpec::small_wide_head(),
        GgufType::Q8_0,
        dir.path(),
    ))
    .unwrap();
    assert!(why(&wide).contains("head size"), "{}", why(&wide));

    // Q8_1 matrices: no kernel, and no code of rbee's computes them at all.
    let q8_1 = Header::open(&generated(&ModelSpec::tiny(), GgufType::Q8_1, dir.path())).unwrap();
    assert!(why(&q8_1).contains("is Q8_1"), "{}", why(&q8_1));
    let refusal = gguf_info::uncomputed_tensor(&q8_1).unwrap();
    assert!(
        refusal.contains("is Q8_1, a type rbee does not compute"),
        "{refusal}"
    );

    let tiny = generated(&ModelSpec::tiny(), GgufType::Q4_0, dir.path());
    let header = Header::open(&tiny).unwrap();
    assert!(gguf_info::uncomputed_tensor(&header).is_none());
    // An architecture it does not know, and a mixture of experts.
    let mut other = header.clone();
    other
        .metadata
        .insert("general.architecture".into(), Value::String("mamba".into()));
    assert!(
        why(&other).contains("architecture mamba"),
        "{}",
        why(&other)
    );
    let mut moe = header.clone();
    moe.metadata
        .insert("llama.expert_count".into(), Value::U32(8));
    assert!(why(&moe).contains("mixture of experts"), "{}", why(&moe));
    // A layer count from a hostile header is refused before anything is sized by it.
    let mut layers = header.clone();
    layers
        .metadata
        .insert("llama.block_count".into(), Value::U64(1 << 60));
    assert!(
        why(&layers).contains("more than the file has tensors"),
        "{}",
        why(&layers)
    );
    // A tensor its block does not read (llama.cpp refuses those too).
    let bias = Header::open(&generated(
        &ModelSpec::tiny_qwen2(),
        GgufType::Q8_0,
        dir.path(),
    ))
    .unwrap();
    let mut renamed = bias.clone();
    renamed.metadata = std::mem::take(&mut renamed.metadata)
        .into_iter()
        .map(|(k, v)| (k.replacen("qwen2.", "llama.", 1), v))
        .collect();
    renamed
        .metadata
        .insert("general.architecture".into(), Value::String("llama".into()));
    assert!(why(&renamed).contains(".bias, a tensor the llama block has no use for"));

    let f16 = Header::open(&generated(&ModelSpec::tiny(), GgufType::F16, dir.path())).unwrap();
    assert!(Layout::read(&f16, 512).is_ok());
    assert_eq!(
        Layout::read(&f16, 512).unwrap().layers[0].down.ty,
        GgmlType::F16
    );
}

#[test]
fn the_context_is_asked_for_or_trained_capped_where_candle_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec {
        context_length: 16384,
        ..ModelSpec::tiny()
    };
    let header = Header::open(&generated(&spec, GgufType::Q8_0, dir.path())).unwrap();
    assert_eq!(context::trained(&header), Some(16384));
    let ctx = |on_cpu_path, requested| context::context_length(&header, on_cpu_path, requested);
    assert_eq!(ctx(true, None), Some(16384));
    assert_eq!(ctx(true, Some(0)), Some(16384));
    assert_eq!(ctx(true, Some(20000)), Some(20000));
    assert_eq!(ctx(false, None), Some(CANDLE_LLAMA_MAX_SEQ_LEN));
    assert_eq!(ctx(false, Some(1000)), Some(1000));

    // A llama file that states no context: what candle's llama assumes.
    let mut unstated = header.clone();
    unstated.metadata.remove("llama.context_length");
    assert_eq!(context::trained(&unstated), Some(CANDLE_LLAMA_MAX_SEQ_LEN));
    // A qwen2 file off the CPU path: at most its trained context; without one, nothing.
    let qwen2 = Header::open(&generated(
        &ModelSpec::tiny_qwen2(),
        GgufType::Q8_0,
        dir.path(),
    ))
    .unwrap();
    let trained = context::trained(&qwen2).unwrap();
    assert_eq!(
        context::context_length(&qwen2, false, Some(trained + 1)),
        Some(trained)
    );
    let mut unstated = qwen2.clone();
    unstated.metadata.remove("qwen2.context_length");
    assert_eq!(context::context_length(&unstated, false, None), None);
}
