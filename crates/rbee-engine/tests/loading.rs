//! Loading failures are errors with a class and a readable message, never panics.

use std::path::Path;

use candle_core::quantized::gguf_file;
use model_gen::{ModelFormat, ModelSpec};
use rbee_engine::{DeviceSpec, Engine, EngineError, ErrorKind, LoadOptions};

fn load(path: &Path, device: DeviceSpec) -> Result<Engine, EngineError> {
    Engine::load(
        &LoadOptions {
            model_path: path.to_owned(),
            device,
            slots: 1,
            context_length: None,
        },
        &mut |_| {},
    )
}

fn hub_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("hub");
    model_gen::write_model(&ModelSpec::tiny(), ModelFormat::Hub, &dir).unwrap();
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn a_missing_path_is_a_load_error() {
    let err = load(Path::new("/nonexistent/model.gguf"), DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Load);
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn a_directory_without_a_checkpoint_is_a_load_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load(tmp.path(), DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Load);
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn a_hub_directory_loads_from_the_directory_or_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hub_dir(tmp.path());
    let engine = load(&dir, DeviceSpec::Cpu).unwrap();
    assert_eq!(engine.info().architecture, "llama");
    assert_eq!(engine.info().n_layers, 2);
    let engine = load(&dir.join("config.json"), DeviceSpec::Cpu).unwrap();
    assert_eq!(engine.info().vocab_size, 512);
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_a_load_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hub_dir(tmp.path());
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    let err = load(&dir, DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Load);
    assert!(err.to_string().contains("mlp"), "{err}");
}

#[test]
fn a_missing_tensor_is_a_load_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hub_dir(tmp.path());
    edit_config(&dir, |c| c["num_hidden_layers"] = 3.into());
    let err = load(&dir, DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Load);
    assert!(err.to_string().contains("model.layers.2"), "{err}");
}

#[test]
fn an_unknown_safetensors_family_is_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hub_dir(tmp.path());
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    let err = load(&dir, DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedModel);
    assert!(err.to_string().contains("gpt_neox"), "{err}");
}

#[test]
fn an_unknown_gguf_architecture_is_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    gguf_file::write(&mut file, &[("general.architecture", &arch)], &[]).unwrap();
    drop(file);
    let err = load(&path, DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedModel);
    assert!(err.to_string().contains("gpt2"), "{err}");
}

#[test]
fn a_truncated_gguf_is_a_load_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.gguf");
    let spec = ModelSpec::tiny();
    model_gen::write_model(&spec, ModelFormat::Gguf(model_gen::GgufType::Q8_0), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&path, DeviceSpec::Cpu).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Load, "{err}");
}

#[test]
fn a_gpu_missing_from_the_build_is_a_device_error() {
    if candle_core::utils::cuda_is_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = hub_dir(tmp.path());
    let err = load(&dir, DeviceSpec::Cuda(0)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Device);
    assert!(err.to_string().contains("cuda"), "{err}");
}
