//! The shared cache of generated models and spec validation.

use model_gen::{Arch, GgufType, ModelFormat, ModelSpec, ensure_generated};

#[test]
fn ensure_generated_writes_once_and_reuses_the_file() {
    let cache = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny();
    let format = ModelFormat::Gguf(GgufType::Q8_0);
    let first = ensure_generated(&spec, format, cache.path()).unwrap();
    let written_at = std::fs::metadata(&first).unwrap().modified().unwrap();
    let second = ensure_generated(&spec, format, cache.path()).unwrap();
    assert_eq!(first, second);
    assert_eq!(
        std::fs::metadata(&second).unwrap().modified().unwrap(),
        written_at
    );

    let reseeded = ensure_generated(&spec.clone().with_seed(9), format, cache.path()).unwrap();
    assert_ne!(reseeded, first);
}

#[test]
fn concurrent_callers_all_get_a_complete_hub_dir() {
    let cache = tempfile::tempdir().unwrap();
    let spec = ModelSpec::tiny();
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| ensure_generated(&spec, ModelFormat::Hub, cache.path()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(paths[0].join(file).is_file(), "{file} missing");
    }
    // No temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(paths[0].parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["hub"]);
}

#[test]
fn formats_and_presets_parse_from_their_names() {
    assert_eq!("hub".parse::<ModelFormat>().unwrap(), ModelFormat::Hub);
    for ty in GgufType::ALL {
        assert_eq!(
            ty.to_string().parse::<ModelFormat>().unwrap(),
            ModelFormat::Gguf(ty)
        );
    }
    assert!("q5_1".parse::<ModelFormat>().is_err());
    let spec = ModelSpec::preset("tinyllama", Arch::Llama).unwrap();
    assert_eq!(
        (
            spec.hidden,
            spec.layers,
            spec.heads,
            spec.kv_heads,
            spec.ffn
        ),
        (2048, 22, 32, 4, 5632)
    );
    assert_eq!((spec.vocab, spec.context_length), (32_000, 2048));
    // TinyLlama-1.1B has 1,100,048,384 parameters.
    assert_eq!(spec.parameter_count(), 1_100_048_384);
    assert_eq!(
        ModelSpec::preset("small", Arch::Qwen2).unwrap().arch,
        Arch::Qwen2
    );
    assert!(ModelSpec::preset("huge", Arch::Llama).is_err());
}

#[test]
fn invalid_specs_are_rejected_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ModelSpec {
            heads: 5,
            ..ModelSpec::tiny()
        },
        ModelSpec {
            kv_heads: 3,
            ..ModelSpec::tiny()
        },
        ModelSpec {
            vocab: 100,
            ..ModelSpec::tiny()
        },
        ModelSpec {
            layers: 0,
            ..ModelSpec::tiny()
        },
    ];
    for spec in bad {
        let path = dir.path().join("bad.gguf");
        assert!(
            model_gen::write_gguf(&spec, GgufType::F32, &path).is_err(),
            "{spec:?}"
        );
        assert!(!path.exists());
    }
}
