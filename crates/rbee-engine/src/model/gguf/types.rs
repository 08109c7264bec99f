//! The refusal of a GGUF file with a tensor of a type rbee does not compute, tested through
//! the engine's load. The rule, and the reading of the types, are gguf-info's
//! ([`gguf_info::uncomputed_tensor`]): the hive refuses the same files by the same function
//! before it spawns a worker for one.

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_transformers::models::quantized_llama;
    use model_gen::{GgufType, ModelFormat, ModelSpec};

    /// A file with one tensor of a type rbee does not compute is refused with the tensor and
    /// the type named, whether candle's header reader knows the type (Q8_K, Q8_1) or not (IQ
    /// types, a number nothing defines).
    #[test]
    fn a_tensor_of_a_type_rbee_does_not_compute_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q4_0.gguf");
        let format = ModelFormat::Gguf(GgufType::Q4_0);
        model_gen::write_model(&ModelSpec::tiny(), format, &path).unwrap();
        let header = gguf_info::Header::open(&path).unwrap();
        let q = header.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.ty, gguf_info::GgmlType::Q4_0);
        assert!(gguf_info::uncomputed_tensor(&header).is_none());
        let target = header.tensor("blk.1.ffn_up.weight").unwrap();
        // IQ4_NL's blocks have Q4_0's size (an f16 scale and 16 bytes of 4-bit indices), so
        // that patched file is a well-formed IQ4_NL file.
        let cases = [
            (20, "IQ4_NL"),
            (16, "IQ2_XXS"),
            (34, "TQ1_0"),
            (15, "Q8_K"),
            (9, "Q8_1"),
            (99, "GGML type 99"),
        ];
        for (id, name) in cases {
            let mut bytes = std::fs::read(&path).unwrap();
            let at = target.type_position as usize;
            bytes[at..at + 4].copy_from_slice(&u32::to_le_bytes(id));
            let patched = dir.path().join(format!("{id}.gguf"));
            std::fs::write(&patched, bytes).unwrap();
            let err = super::super::load(&patched, &Device::Cpu, None, &mut |_| {})
                .err()
                .expect("refused")
                .to_string();
            let want = format!("tensor `blk.1.ffn_up.weight` is {name}, a type rbee does not");
            assert!(err.contains(&want), "{err}");
        }
    }

    /// gguf-info's context rule holds candle's llama to the positions its rotary tables cover.
    #[test]
    fn the_context_rule_knows_candles_llama_limit() {
        assert_eq!(
            gguf_info::context::CANDLE_LLAMA_MAX_SEQ_LEN,
            quantized_llama::MAX_SEQ_LEN
        );
    }

    /// Every file model-gen writes the way llama.cpp's presets do (Q2_K, Q3_K_M, Q4_K_M,
    /// Q5_K_M, …, each with its mix of types) runs on the engine's path, batched; Q8_1 files are
    /// refused by name.
    #[test]
    fn every_preset_type_runs_on_the_engine_path() {
        let dir = tempfile::tempdir().unwrap();
        for ty in GgufType::ALL {
            let path = dir.path().join(format!("{ty}.gguf"));
            model_gen::write_model(&ModelSpec::small(), ModelFormat::Gguf(ty), &path).unwrap();
            // The path on whatever `RBEE_CPU_KERNELS` says in the test's environment.
            let result = super::super::load_with(&path, &Device::Cpu, None, true, &mut |_| {});
            if ty == GgufType::Q8_1 {
                let err = result.err().expect("refused").to_string();
                assert!(
                    err.contains("is Q8_1, a type rbee does not compute"),
                    "{err}"
                );
                continue;
            }
            let mut loaded = result.unwrap_or_else(|e| panic!("{ty}: {e}"));
            assert!(
                loaded.model.prefix_cache().is_some(),
                "{ty} runs on candle's path"
            );
        }
    }
}
