//! `cargo xtask check-cuda`: compiles rbee's CUDA build on any Linux x86-64 machine, with the
//! CUDA toolkit installed from NVIDIA's PyPI wheels into a venv under `target/`.
//!
//! What candle's CUDA build needs, and where this module gets it:
//! - `nvcc` (with `cicc`, `ptxas`, the CUDA headers and CCCL) to compile `candle-kernels`' `.cu`
//!   files, to PTX and into a static library: the wheels `nvidia-cuda-nvcc`, `-crt`, `nvvm`,
//!   `-cuda-runtime`, `-cuda-cccl`. `cudaforge` (candle-kernels' build script) finds `nvcc` by
//!   `NVCC`, then `PATH`; `cudarc`'s build script runs `nvcc --version` from `PATH` to pick its
//!   CUDA API version, which is why the toolkit must be one `cudarc` knows (13.4 at most).
//! - `CUDA_COMPUTE_CAP`: which GPU the kernels are compiled for; without it `cudaforge` asks
//!   `nvidia-smi`, which a machine without a GPU does not have.
//! - For linking: `cudarc` (as candle enables it) links `libcuda`, `libnvrtc`, `libcublas`,
//!   `libcublasLt`, `libcurand` and `candle-kernels` links `libcudart`, searched under
//!   `CUDA_ROOT`'s `lib`/`lib64`. The wheels carry all of them but `libcuda`, which is the
//!   driver's, and only as versioned files (`libcublas.so.13`), so the layout step adds the
//!   unversioned names a linker looks for.
//!
//! So where the driver is installed the check builds the binaries (`cargo build`); where it is
//! not, nothing provides `libcuda` to link against, and the check is `cargo check`, which still
//! runs every build script: candle's kernels are all compiled by `nvcc`, and rbee's crates are
//! type-checked with the `cuda` feature. It builds into `target/cuda`, away from the main build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::tasks::{cargo, run, workspace_root};

/// The toolkit release, pinned through NVIDIA's `cuda-toolkit` metapackage (which pins each
/// component wheel of that release). 13.4 is the newest release `cudarc` 0.19 has bindings for.
const TOOLKIT_VERSION: &str = "13.4.3";
/// The components candle's build uses, as extras of the metapackage.
const TOOLKIT_EXTRAS: &str = "nvcc,cudart,cublas,curand,nvrtc,cccl";
/// The venv the wheels go into.
const VENV: &str = "target/cuda-toolkit";
/// The build's own target directory, so that the CUDA build never invalidates the main one.
pub const TARGET_DIR: &str = "target/cuda";

#[derive(Debug, clap::Args)]
pub struct CheckCudaArgs {
    /// The GPU compute capability candle's kernels are compiled for (80: A100; 86: RTX 30xx,
    /// A10; 89: L4, RTX 40xx; 90: H100). One architecture keeps nvcc's time down.
    #[arg(long, env = "CUDA_COMPUTE_CAP", default_value = "80")]
    pub compute_cap: String,
    /// Parallel jobs, for cargo and for nvcc.
    #[arg(long, short = 'j', default_value_t = 1)]
    pub jobs: usize,
    /// Only `cargo check`, even where the driver's `libcuda` is there to link against.
    #[arg(long)]
    pub check_only: bool,
}

/// A CUDA toolkit root: `bin/nvcc`, `include`, and the libraries under `lib` and `lib64`.
#[derive(Debug, Clone)]
pub struct Toolkit {
    pub root: PathBuf,
}

impl Toolkit {
    pub fn nvcc(&self) -> PathBuf {
        self.root.join("bin/nvcc")
    }

    /// An installed toolkit: the `nvcc` on `PATH`, else `/usr/local/cuda`'s.
    pub fn system() -> Option<Toolkit> {
        let on_path = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("nvcc"))
                .find(|nvcc| nvcc.is_file())
        });
        let nvcc = on_path.or_else(|| {
            let nvcc = PathBuf::from("/usr/local/cuda/bin/nvcc");
            nvcc.is_file().then_some(nvcc)
        })?;
        let nvcc = nvcc.canonicalize().unwrap_or(nvcc);
        let root = nvcc.parent()?.parent()?.to_path_buf();
        Some(Toolkit { root })
    }

    /// Where the binaries built against this toolkit find its libraries when they run.
    pub fn library_path(&self) -> std::ffi::OsString {
        let lib = self.root.join("lib");
        let lib64 = self.root.join("lib64");
        let mut dirs = vec![lib64, lib];
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            dirs.extend(std::env::split_paths(&old));
        }
        std::env::join_paths(dirs).expect("library directories have no separator in them")
    }

    /// Points a cargo command's CUDA build at this toolkit, compiling kernels for
    /// `compute_cap` (`None`: the GPU's, which candle's build asks `nvidia-smi` for) with `jobs`
    /// nvcc processes at once, into [`TARGET_DIR`].
    pub fn configure(&self, command: &mut Command, compute_cap: Option<&str>, jobs: usize) {
        let bin = self.root.join("bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
            .expect("the toolkit's path has no separator in it");
        command
            .env("PATH", path)
            .env("NVCC", self.nvcc())
            .env("CUDA_ROOT", &self.root)
            .env("CUDA_PATH", &self.root)
            .env("CUDA_HOME", &self.root)
            .env("CUDAFORGE_THREADS", jobs.to_string())
            .env("LD_LIBRARY_PATH", self.library_path())
            .env("CARGO_TARGET_DIR", workspace_root().join(TARGET_DIR));
        if let Some(cap) = compute_cap {
            command.env("CUDA_COMPUTE_CAP", cap);
        }
    }

    /// `nvcc --version`'s release line, e.g. `Cuda compilation tools, release 13.4, V13.4.92`.
    pub fn release(&self) -> anyhow::Result<String> {
        let out = Command::new(self.nvcc())
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run {}", self.nvcc().display()))?;
        ensure!(
            out.status.success(),
            "nvcc --version failed ({})",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .find(|l| l.contains("release"))
            .unwrap_or("nvcc (no release line)")
            .trim()
            .to_owned())
    }

    /// Whether candle's CUDA bindings know this toolkit's release: `cudarc`'s build script
    /// refuses a release newer than [`NEWEST_RELEASE`].
    pub fn supported(&self) -> bool {
        self.release()
            .ok()
            .and_then(|line| release_of(&line))
            .is_some_and(|release| release <= NEWEST_RELEASE)
    }
}

/// The newest CUDA release `cudarc` 0.19 has bindings for.
const NEWEST_RELEASE: (u32, u32) = (13, 4);

/// `(13, 4)` from `Cuda compilation tools, release 13.4, V13.4.92`.
fn release_of(line: &str) -> Option<(u32, u32)> {
    let version = line.split("release ").nth(1)?.split(',').next()?;
    let (major, minor) = version.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

pub fn check(args: &CheckCudaArgs) -> anyhow::Result<()> {
    ensure!(args.jobs > 0, "--jobs must be at least 1");
    let started = Instant::now();
    let toolkit = ensure_wheel_toolkit()?;
    eprintln!(
        "CUDA toolkit: {} ({})",
        toolkit.root.display(),
        toolkit.release()?
    );
    let installed = started.elapsed();

    let driver = driver_library();
    let link = driver.is_some() && !args.check_only;
    match &driver {
        Some(lib) if link => eprintln!("the driver's libcuda is {}: building", lib.display()),
        Some(_) => eprintln!("--check-only: checking without linking"),
        None => eprintln!(
            "no libcuda on this machine (no NVIDIA driver) and no package ships one: \
             `cargo check` (runs candle's kernel build with nvcc) instead of linking"
        ),
    }
    if let Some(lib) = &driver {
        link_driver(&toolkit, lib)?;
    }
    let mut command = cargo();
    command
        .arg(if link { "build" } else { "check" })
        .args(["-p", "llm-worker-rbee", "-p", "rbee-hive"])
        .args(["--features", "llm-worker-rbee/cuda"])
        .args(["--jobs", &args.jobs.to_string()]);
    toolkit.configure(&mut command, Some(&args.compute_cap), args.jobs);
    let what = format!(
        "cargo {} --features cuda (sm_{}, into {TARGET_DIR})",
        if link { "build" } else { "check" },
        args.compute_cap
    );
    eprintln!("{what}");
    run(command, &what)?;
    if !link {
        confirm_kernels_built(&args.compute_cap)?;
    }
    eprintln!(
        "check-cuda passed in {:.0?} (toolkit {:.0?}, {} {:.0?})",
        started.elapsed(),
        installed,
        if link { "build" } else { "check" },
        started.elapsed() - installed
    );
    Ok(())
}

/// The wheels' toolkit under [`VENV`], installed and laid out first when needed. pip returns
/// at once when the pinned release is already there.
pub fn ensure_wheel_toolkit() -> anyhow::Result<Toolkit> {
    let venv = workspace_root().join(VENV);
    let python = venv.join("bin/python");
    if !python.exists() {
        let mut create = Command::new("python3");
        create.args(["-m", "venv"]).arg(&venv);
        run(create, &format!("python3 -m venv {VENV}"))?;
    }
    let mut install = Command::new(&python);
    install
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("cuda-toolkit[{TOOLKIT_EXTRAS}]=={TOOLKIT_VERSION}"));
    run(
        install,
        &format!("pip install cuda-toolkit=={TOOLKIT_VERSION}"),
    )?;

    let out = Command::new(&python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .context("asking the venv's python for its site-packages")?;
    ensure!(
        out.status.success(),
        "the venv's python failed ({})",
        out.status
    );
    let site = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // Every CUDA 13 wheel installs into this one tree, which is laid out as a toolkit root.
    let root = site.join("nvidia/cu13");
    ensure!(
        root.join("bin/nvcc").is_file(),
        "the wheels installed no {}",
        root.join("bin/nvcc").display()
    );
    lay_out(&root)?;
    Ok(Toolkit { root })
}

/// Makes the wheels' tree look like an installed toolkit: `lib64` beside `lib` (where
/// `cudaforge` looks), and each versioned library also under its unversioned name (what
/// `-lcublas` finds).
fn lay_out(root: &Path) -> anyhow::Result<()> {
    let lib = root.join("lib");
    let lib64 = root.join("lib64");
    if std::fs::symlink_metadata(&lib64).is_err() {
        std::os::unix::fs::symlink("lib", &lib64)
            .with_context(|| format!("linking {}", lib64.display()))?;
    }
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let Some((stem, _version)) = name.split_once(".so.") else {
            continue;
        };
        let plain = lib.join(format!("{stem}.so"));
        if std::fs::symlink_metadata(&plain).is_err() {
            std::os::unix::fs::symlink(name.as_ref(), &plain)
                .with_context(|| format!("linking {}", plain.display()))?;
        }
    }
    Ok(())
}

/// The NVIDIA driver's `libcuda`, where the dynamic linker would find it; `None` on a machine
/// without the driver.
pub fn driver_library() -> Option<PathBuf> {
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/nvidia/lib64",
        "/usr/lib/wsl/lib",
    ];
    dirs.iter()
        .flat_map(|dir| ["libcuda.so", "libcuda.so.1"].map(|f| Path::new(dir).join(f)))
        .find(|p| p.exists())
}

/// Gives the toolkit a `libcuda.so` to link against: the driver's, under its unversioned name
/// (drivers often install only `libcuda.so.1`).
pub fn link_driver(toolkit: &Toolkit, driver: &Path) -> anyhow::Result<()> {
    let plain = toolkit.root.join("lib/libcuda.so");
    if std::fs::symlink_metadata(&plain).is_ok() {
        std::fs::remove_file(&plain).with_context(|| format!("replacing {}", plain.display()))?;
    }
    std::os::unix::fs::symlink(driver, &plain)
        .with_context(|| format!("linking {} to {}", plain.display(), driver.display()))
}

/// `cargo check` succeeds only if candle-kernels' build script did, but says nothing of what it
/// produced: the check looks at the PTX and the static library nvcc wrote.
fn confirm_kernels_built(compute_cap: &str) -> anyhow::Result<()> {
    let build = workspace_root().join(TARGET_DIR).join("debug/build");
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(&build).with_context(|| format!("reading {}", build.display()))?
    {
        let dir = entry?.path();
        let is_kernels = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("candle-kernels-"));
        let out = dir.join("out");
        if is_kernels && out.join("libmoe.a").is_file() {
            found.push(out);
        }
    }
    // The newest build directory is this run's (an older feature set or toolkit leaves others).
    found.sort_by_key(|out| {
        std::fs::metadata(out.join("libmoe.a"))
            .and_then(|m| m.modified())
            .ok()
    });
    let Some(out) = found.last() else {
        bail!(
            "candle-kernels' build left no libmoe.a under {}",
            build.display()
        );
    };
    let ptx: Vec<PathBuf> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .collect();
    ensure!(
        !ptx.is_empty(),
        "candle-kernels' build wrote no PTX in {}",
        out.display()
    );
    let target = format!(".target sm_{compute_cap}");
    for file in &ptx {
        let text = std::fs::read_to_string(file)?;
        ensure!(
            text.contains(&target),
            "{} was not compiled for sm_{compute_cap}",
            file.display()
        );
    }
    eprintln!(
        "nvcc compiled candle's kernels: {} PTX files for sm_{compute_cap} and libmoe.a in {}",
        ptx.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_release_is_read_from_nvccs_version_line() {
        let line = "Cuda compilation tools, release 13.4, V13.4.92";
        assert_eq!(super::release_of(line), Some((13, 4)));
        assert_eq!(
            super::release_of("Cuda compilation tools, release 12.10, V12.10.1"),
            Some((12, 10))
        );
        assert_eq!(super::release_of("nvcc (no release line)"), None);
    }
}
