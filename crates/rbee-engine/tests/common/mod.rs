//! What the engine's tests share: the generated test models, an engine with a number of
//! slots on the CPU device, and a request's tokens generated alone.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use model_gen::{ModelFormat, ModelSpec};
use rbee_engine::{Completion, DeviceSpec, Engine, LoadOptions, PreparedRequest, Sequence};

/// The small generated model in `format`, generated when missing.
pub fn generated(format: ModelFormat) -> anyhow::Result<PathBuf> {
    model_gen::ensure_generated(
        &ModelSpec::small(),
        format,
        &model_gen::paths::generated_dir(),
    )
    .with_context(|| format!("generating {format}"))
}

/// The engine on `path`, on the CPU device, with `slots` slots.
pub fn load(path: &Path, slots: usize) -> anyhow::Result<Engine> {
    let opts = LoadOptions {
        model_path: path.to_path_buf(),
        device: DeviceSpec::Cpu,
        slots,
        context_length: None,
    };
    Engine::load(&opts, &mut |_| {}).with_context(|| format!("loading {}", path.display()))
}

/// Token ids and completion of `req` generated alone.
pub fn alone(engine: &mut Engine, req: &PreparedRequest) -> anyhow::Result<(Vec<u32>, Completion)> {
    let mut ids = Vec::new();
    let completion = engine.generate(req, &mut |t| {
        ids.push(t.token_id);
        ControlFlow::Continue(())
    })?;
    Ok((ids, completion))
}

/// A request's sequence in a batch, and the tokens it got so far.
pub struct Running {
    pub request: usize,
    pub seq: Sequence,
    pub ids: Vec<u32>,
}
