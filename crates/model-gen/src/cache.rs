//! Generated models shared between tests and benchmarks, cached by spec.

use std::path::{Path, PathBuf};

use crate::gguf::{GgufType, write_gguf};
use crate::hub::write_hub_dir;
use crate::spec::ModelSpec;
use crate::{Error, io_error, unique_temp_name};

/// A hub directory (safetensors and tokenizer files) or a single GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    Hub,
    Gguf(GgufType),
}

impl std::fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hub => f.write_str("hub"),
            Self::Gguf(ty) => ty.fmt(f),
        }
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.eq_ignore_ascii_case("hub") {
            Ok(Self::Hub)
        } else {
            s.parse().map(Self::Gguf)
        }
    }
}

/// Writes `spec` in `format` at `path`: a directory for [`ModelFormat::Hub`], a file for GGUF.
pub fn write_model(spec: &ModelSpec, format: ModelFormat, path: &Path) -> Result<(), Error> {
    match format {
        ModelFormat::Hub => write_hub_dir(spec, path),
        ModelFormat::Gguf(ty) => write_gguf(spec, ty, path),
    }
}

/// The cached model for `spec` in `format` under `cache_dir`, generated first if absent.
///
/// The path is `cache_dir/<spec key>/hub` or `cache_dir/<spec key>/model-<type>.gguf`, where
/// the key hashes every field of the spec and the generator version. A model is written under
/// a temporary name and renamed into place, so concurrent callers (parallel tests, a benchmark
/// next to a test run) never see a partial file; whoever renames last wins with identical bytes.
pub fn ensure_generated(
    spec: &ModelSpec,
    format: ModelFormat,
    cache_dir: &Path,
) -> Result<PathBuf, Error> {
    spec.validate()?;
    let dir = cache_dir.join(spec.cache_key());
    let target = match format {
        ModelFormat::Hub => dir.join("hub"),
        ModelFormat::Gguf(ty) => dir.join(format!("model-{ty}.gguf")),
    };
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    match format {
        ModelFormat::Gguf(ty) => write_gguf(spec, ty, &target)?,
        ModelFormat::Hub => {
            let temp = dir.join(unique_temp_name("hub"));
            let written = write_hub_dir(spec, &temp)
                .and_then(|()| std::fs::rename(&temp, &target).map_err(|e| io_error(&target, e)));
            if written.is_err() {
                // A concurrent writer finished first; its directory is as good as ours.
                std::fs::remove_dir_all(&temp).ok();
                if !target.join("model.safetensors").is_file() {
                    written?;
                }
            }
        }
    }
    Ok(target)
}
