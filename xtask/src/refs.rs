//! `cargo xtask refs`: llama.cpp's own outputs on generated models, written as the engine's
//! test fixtures (`crates/rbee-engine/tests/fixtures/llama_cpp/`, checked by
//! `crates/rbee-engine/tests/llama_cpp_refs.rs`).
//!
//! llama.cpp runs through its Python binding, `llama-cpp-python`, pinned and built from its
//! PyPI source distribution (which vendors llama.cpp) into a venv under `target/`. Each case
//! generates a model with `model-gen`, feeds llama.cpp a fixed prompt of token ids, decodes
//! greedily for [`STEPS`] steps and keeps the argmax and the top [`TOP_K`] logits of every
//! step. The tests never need llama.cpp: they compare the engine with these files.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use candle_core::quantized::gguf_file::{Content, Value};
use model_gen::reference::{Fixture, ModelIdentity, Settings, Step};
use model_gen::{Arch, GENERATOR_VERSION, GgufType, ModelFormat, ModelSpec};
use serde::Deserialize;

use crate::tasks::{run, workspace_root};

/// The pinned reference. Its source distribution vendors the llama.cpp it was released with.
pub const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";
/// Relative to the workspace root.
const VENV: &str = "target/refs-venv";
const SCRIPT: &str = "xtask/refs/llama_cpp_refs.py";
const FIXTURES: &str = "crates/rbee-engine/tests/fixtures/llama_cpp";
/// Greedy steps recorded per case.
const STEPS: usize = 32;
/// Logits kept per step.
const TOP_K: usize = 8;
/// Prompt length, BOS included; longer where the model has a sliding window, so that the prompt
/// crosses it.
const PROMPT_LEN: usize = 40;
/// llama.cpp's thread count. Fixed so that a rerun sums in the same order.
const THREADS: usize = 2;
/// Significant digits kept of each logit: far below any tolerance the tests use, and the
/// fixtures stay small.
const LOGIT_DIGITS: usize = 5;

/// One reference case: a model-gen preset in one architecture and GGUF type.
struct Case {
    /// The fixture's file stem and the name tests report.
    name: &'static str,
    arch: Arch,
    /// A [`ModelSpec::preset`] name (`small`, `small-llama3`); the test generates the model
    /// again from the same name.
    preset: &'static str,
    ty: GgufType,
    /// The weight seed; the tests read it from the fixture.
    seed: u64,
    /// The context llama.cpp runs with (a multiple of 256, as llama.cpp pads it); `None`: the
    /// file's trained context. The fixture records the context either way, and the tests load
    /// the engine with it.
    n_ctx: Option<usize>,
}

const fn case(name: &'static str, arch: Arch, preset: &'static str, ty: GgufType) -> Case {
    Case {
        name,
        arch,
        preset,
        ty,
        seed: 0,
        n_ctx: None,
    }
}

impl Case {
    const fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    const fn with_n_ctx(self, n_ctx: usize) -> Self {
        Self {
            n_ctx: Some(n_ctx),
            ..self
        }
    }
}

/// Every reference case. The `small` presets are used throughout: their rows split into the
/// blocks of every type, so a Q4_K file is Q4_K, not its fallback. llama runs every weight
/// type the engine has kernels for, qwen2 all but BF16; the other families the float types,
/// Q8_0 and the mix of a typical download (Q4_K_M). A few cases add a setting real files have
/// that the plain presets lack (Gemma 3's linear RoPE scaling, Phi-3 at its original context).
const CASES: &[Case] = &[
    case("llama-small-f32", Arch::Llama, "small", GgufType::F32),
    case("llama-small-f16", Arch::Llama, "small", GgufType::F16),
    case("llama-small-q8_0", Arch::Llama, "small", GgufType::Q8_0),
    case("llama-small-q4_0", Arch::Llama, "small", GgufType::Q4_0),
    // Seed 0's weights put only 16 (Q4_K) and 12 (Q6_K) of the 32 greedy steps' top two
    // further apart than these types' tolerance: too many near-ties for the argmax to mean
    // much. Seed 2 is simply a draw with more clear steps (22 and 19); its Q4_K and Q6_K
    // files test the same kernels.
    case("llama-small-q4_k", Arch::Llama, "small", GgufType::Q4K).with_seed(2),
    case("llama-small-q6_k", Arch::Llama, "small", GgufType::Q6K).with_seed(2),
    case("llama-small-q4_k_m", Arch::Llama, "small", GgufType::Q4KM),
    case("llama-small-q5_k_m", Arch::Llama, "small", GgufType::Q5KM),
    case("llama-small-q3_k_m", Arch::Llama, "small", GgufType::Q3KM),
    case("llama-small-q2_k", Arch::Llama, "small", GgufType::Q2K),
    // Q5_0 matrices with a Q6_K head: 32- and 256-element blocks in one file (seed 3: seeds
    // 0, 1 and 2 have 12, 16 and 16 decisive steps).
    case("llama-small-q5_0", Arch::Llama, "small", GgufType::Q5_0).with_seed(3),
    // ggml multiplies BF16 rows with activations rounded to bf16.
    case("llama-small-bf16", Arch::Llama, "small", GgufType::BF16),
    case(
        "llama3-small-f32",
        Arch::Llama,
        "small-llama3",
        GgufType::F32,
    ),
    case(
        "llama3-small-f16",
        Arch::Llama,
        "small-llama3",
        GgufType::F16,
    ),
    case(
        "llama3-small-q8_0",
        Arch::Llama,
        "small-llama3",
        GgufType::Q8_0,
    ),
    case(
        "llama3-small-q4_k_m",
        Arch::Llama,
        "small-llama3",
        GgufType::Q4KM,
    ),
    case("qwen2-small-f32", Arch::Qwen2, "small", GgufType::F32),
    case("qwen2-small-f16", Arch::Qwen2, "small", GgufType::F16),
    case("qwen2-small-q8_0", Arch::Qwen2, "small", GgufType::Q8_0),
    case("qwen2-small-q4_0", Arch::Qwen2, "small", GgufType::Q4_0),
    case("qwen2-small-q4_k", Arch::Qwen2, "small", GgufType::Q4K),
    case("qwen2-small-q6_k", Arch::Qwen2, "small", GgufType::Q6K),
    case("qwen2-small-q4_k_m", Arch::Qwen2, "small", GgufType::Q4KM),
    case("qwen2-small-q5_k_m", Arch::Qwen2, "small", GgufType::Q5KM),
    case("qwen3-small-f32", Arch::Qwen3, "small", GgufType::F32),
    case("qwen3-small-f16", Arch::Qwen3, "small", GgufType::F16),
    case("qwen3-small-q8_0", Arch::Qwen3, "small", GgufType::Q8_0),
    case("qwen3-small-q4_k_m", Arch::Qwen3, "small", GgufType::Q4KM),
    case("gemma2-small-f32", Arch::Gemma2, "small", GgufType::F32),
    case("gemma2-small-f16", Arch::Gemma2, "small", GgufType::F16),
    case("gemma2-small-q8_0", Arch::Gemma2, "small", GgufType::Q8_0),
    case("gemma2-small-q4_k_m", Arch::Gemma2, "small", GgufType::Q4KM),
    case("gemma3-small-f32", Arch::Gemma3, "small", GgufType::F32),
    case("gemma3-small-f16", Arch::Gemma3, "small", GgufType::F16),
    case("gemma3-small-q8_0", Arch::Gemma3, "small", GgufType::Q8_0),
    case("gemma3-small-q4_k_m", Arch::Gemma3, "small", GgufType::Q4KM),
    // Linear RoPE scaling by 8 on the global layers, as in every Gemma 3 4B/12B/27B file.
    case(
        "gemma3-small-linear8-f32",
        Arch::Gemma3,
        "small-linear8",
        GgufType::F32,
    ),
    case(
        "gemma3-small-linear8-q8_0",
        Arch::Gemma3,
        "small-linear8",
        GgufType::Q8_0,
    ),
    case("phi3-small-f32", Arch::Phi3, "small", GgufType::F32),
    case("phi3-small-f16", Arch::Phi3, "small", GgufType::F16),
    case("phi3-small-q8_0", Arch::Phi3, "small", GgufType::Q8_0),
    case("phi3-small-q4_k_m", Arch::Phi3, "small", GgufType::Q4KM),
    // A context of 256, the original one: llama.cpp takes the short LongRoPE factors (the
    // other phi3 cases run at the trained context of 1024, so with the long ones).
    case("phi3-small-short-f32", Arch::Phi3, "small", GgufType::F32).with_n_ctx(256),
];

#[derive(Debug, clap::Args)]
pub struct RefsArgs {
    /// Only these cases (by name); all when none is given.
    cases: Vec<String>,
    /// List the cases and exit.
    #[arg(long)]
    list: bool,
}

pub fn run_refs(args: &RefsArgs) -> anyhow::Result<()> {
    if args.list {
        for case in CASES {
            println!("{}", case.name);
        }
        return Ok(());
    }
    let selected: Vec<&Case> = if args.cases.is_empty() {
        CASES.iter().collect()
    } else {
        args.cases
            .iter()
            .map(|name| {
                CASES.iter().find(|c| c.name == name).with_context(|| {
                    format!("no case named {name:?}; `cargo xtask refs --list` lists them")
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let python = ensure_llama_cpp_python()?;

    let models = model_gen::paths::generated_dir();
    let mut jobs = Vec::with_capacity(selected.len());
    for case in &selected {
        let spec = ModelSpec::preset(case.preset, case.arch)?.with_seed(case.seed);
        let path = model_gen::ensure_generated(&spec, ModelFormat::Gguf(case.ty), &models)
            .with_context(|| format!("generating the model of {}", case.name))?;
        let prompt = prompt_ids(case.name, &path)?;
        jobs.push(Job {
            name: case.name,
            model: ModelIdentity {
                arch: case.arch.to_string(),
                preset: case.preset.to_string(),
                r#type: case.ty.to_string(),
                seed: spec.seed,
                generator_version: GENERATOR_VERSION,
                sha256: model_gen::paths::sha256_file(&path)?,
            },
            path,
            prompt,
            n_ctx: case.n_ctx,
        });
    }

    let root = workspace_root();
    let work = tempfile::tempdir().context("creating a work directory")?;
    let job_file = work.path().join("job.json");
    let cases: Vec<serde_json::Value> = jobs
        .iter()
        .map(|job| {
            serde_json::json!({
                "name": job.name,
                "model": job.path,
                "prompt": job.prompt,
                "steps": STEPS,
                "n_ctx": job.n_ctx.unwrap_or(0),
            })
        })
        .collect();
    let job_json = serde_json::json!({ "n_threads": THREADS, "top_k": TOP_K, "cases": cases });
    std::fs::write(&job_file, serde_json::to_vec(&job_json)?)
        .with_context(|| format!("writing {}", job_file.display()))?;
    let output = Command::new(&python)
        .arg(root.join(SCRIPT))
        .arg(&job_file)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {SCRIPT} with {}", python.display()))?;
    ensure!(
        output.status.success(),
        "{SCRIPT} failed ({}); its messages are above",
        output.status
    );
    let mut results: ScriptOutput = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("reading the output of {SCRIPT}"))?;
    ensure!(
        results.llama_cpp_python == LLAMA_CPP_PYTHON_VERSION,
        "the script ran llama-cpp-python {}, not the pinned {LLAMA_CPP_PYTHON_VERSION}",
        results.llama_cpp_python
    );

    let dir = root.join(FIXTURES);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if args.cases.is_empty() {
        remove_dropped_fixtures(&dir)?;
    }
    for job in jobs {
        let steps = results
            .cases
            .remove(job.name)
            .with_context(|| format!("{SCRIPT} gave no result for {}", job.name))?;
        ensure!(
            steps.len() == STEPS,
            "{}: {} steps, expected {STEPS}",
            job.name,
            steps.len()
        );
        let n_ctx = results.n_ctx.get(job.name).copied().unwrap_or_default();
        if let Some(wanted) = job.n_ctx {
            ensure!(
                n_ctx == wanted,
                "{}: llama.cpp ran with a context of {n_ctx}, not the {wanted} asked for",
                job.name
            );
        }
        let fixture = Fixture {
            case: job.name.to_string(),
            model: job.model,
            llama_cpp_python: results.llama_cpp_python.clone(),
            settings: Settings {
                n_ctx,
                n_threads: THREADS,
                kv_cache: "f32".into(),
                flash_attn: false,
            },
            prompt: job.prompt,
            steps: steps
                .into_iter()
                .map(|s| Step {
                    argmax: s.argmax,
                    top: s
                        .top
                        .into_iter()
                        .map(|(id, logit)| (id, round_significant(logit, LOGIT_DIGITS)))
                        .collect(),
                })
                .collect(),
        };
        let path = dir.join(format!("{}.json", job.name));
        std::fs::write(&path, render(&fixture)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let margins = fixture
            .steps
            .iter()
            .filter_map(|s| Some(s.top.first()?.1 - s.top.get(1)?.1))
            .fold(f64::INFINITY, f64::min);
        eprintln!(
            "{}: {} (smallest top-two margin {margins:.4})",
            job.name,
            path.strip_prefix(&root).unwrap_or(&path).display()
        );
    }
    Ok(())
}

/// Removes the fixtures of cases no longer in [`CASES`], which the tests would still check.
fn remove_dropped_fixtures(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let is_fixture = path.extension().is_some_and(|e| e == "json");
        if is_fixture && !CASES.iter().any(|c| c.name == stem) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            eprintln!("removed {} (no such case)", path.display());
        }
    }
    Ok(())
}

struct Job {
    name: &'static str,
    model: ModelIdentity,
    path: PathBuf,
    prompt: Vec<u32>,
    n_ctx: Option<usize>,
}

/// What the script prints.
#[derive(Deserialize)]
struct ScriptOutput {
    llama_cpp_python: String,
    n_ctx: std::collections::HashMap<String, usize>,
    cases: std::collections::HashMap<String, Vec<Step>>,
}

/// JSON in the field order above, with the model, the settings and the prompt on one line each
/// and one line per step, so that a fixture diff reads step by step.
fn render(fixture: &Fixture) -> anyhow::Result<String> {
    use serde_json::to_string as json;
    let steps: Vec<String> = fixture.steps.iter().map(json).collect::<Result<_, _>>()?;
    Ok(format!(
        "{{\n  \"case\": {},\n  \"model\": {},\n  \"llama_cpp_python\": {},\n  \
         \"settings\": {},\n  \"prompt\": {},\n  \"steps\": [\n    {}\n  ]\n}}\n",
        json(&fixture.case)?,
        json(&fixture.model)?,
        json(&fixture.llama_cpp_python)?,
        json(&fixture.settings)?,
        json(&fixture.prompt)?,
        steps.join(",\n    ")
    ))
}

/// `x` to `digits` significant digits, as the shortest decimal that reads back as it.
fn round_significant(x: f64, digits: usize) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{x:.*e}", digits - 1).parse().unwrap_or(x)
}

/// A fixed prompt for a case: BOS when the file asks for one, then token ids of the file's
/// normal (non-control, non-byte) tokens picked by a generator seeded with the case name. Long
/// enough to cross the model's sliding window, if it has one.
fn prompt_ids(case: &str, model: &Path) -> anyhow::Result<Vec<u32>> {
    let mut file =
        std::fs::File::open(model).with_context(|| format!("opening {}", model.display()))?;
    let content = Content::read(&mut file)
        .with_context(|| format!("reading the GGUF header of {}", model.display()))?;
    let md = &content.metadata;
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let bos = md
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.to_u32().ok());
    let normal: Vec<u32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .context("the file has no tokenizer.ggml.token_type")?
        .iter()
        .enumerate()
        .filter(
            |(_, t)| matches!(t, Value::I32(t) if *t == model_gen::tokenizer::TOKEN_TYPE_NORMAL),
        )
        .map(|(id, _)| id as u32)
        .collect();
    ensure!(!normal.is_empty(), "the vocabulary has no normal tokens");
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .context("the file has no general.architecture")?;
    let key = |name: &str| {
        md.get(&format!("{arch}.{name}"))
            .and_then(|v| v.to_u32().ok())
    };
    let context = key("context_length").context("the file has no context_length")? as usize;
    // A window as long as the context (Phi-3 files carry one) limits nothing.
    let len = match key("attention.sliding_window") {
        Some(window) if (window as usize) < context => PROMPT_LEN.max(window as usize + 8),
        _ => PROMPT_LEN,
    };
    ensure!(
        len + STEPS <= context,
        "a prompt of {len} tokens and {STEPS} steps do not fit the context of {context}"
    );

    let mut prompt = Vec::with_capacity(len);
    if add_bos {
        prompt.push(bos.context("the file asks for a BOS token but names none")?);
    }
    let mut state = case.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    while prompt.len() < len {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        prompt.push(normal[(z % normal.len() as u64) as usize]);
    }
    Ok(prompt)
}

/// Build flags for llama.cpp: portable code (no `-march=native`, so the venv runs on any
/// machine of the architecture), no libcurl (models are local files), no tests or examples.
fn cmake_args() -> String {
    let mut args = vec![
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ];
    if cfg!(target_arch = "x86_64") {
        // Every x86-64 machine rbee targets has these; without them ggml falls back to its
        // slow scalar code.
        args.extend(["-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]);
    }
    args.join(" ")
}

/// The venv's python with the pinned llama-cpp-python, built first when missing (several
/// minutes: pip compiles llama.cpp).
fn ensure_llama_cpp_python() -> anyhow::Result<PathBuf> {
    let venv = workspace_root().join(VENV);
    let python = venv.join("bin/python");
    let installed = |python: &Path| -> Option<String> {
        let out = Command::new(python)
            .args(["-c", "import llama_cpp; print(llama_cpp.__version__)"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    match installed(&python) {
        Some(v) if v == LLAMA_CPP_PYTHON_VERSION => return Ok(python),
        Some(v) => {
            eprintln!("{VENV} has llama-cpp-python {v}; installing {LLAMA_CPP_PYTHON_VERSION}")
        }
        None => eprintln!(
            "building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} into {VENV} (compiles llama.cpp; takes a while)"
        ),
    }
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
            "--disable-pip-version-check",
            "--no-binary",
            "llama-cpp-python",
        ])
        .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"))
        .env("CMAKE_ARGS", cmake_args());
    run(install, "pip install llama-cpp-python")?;
    match installed(&python) {
        Some(v) if v == LLAMA_CPP_PYTHON_VERSION => Ok(python),
        Some(v) => {
            bail!("{VENV} reports llama-cpp-python {v} after installing {LLAMA_CPP_PYTHON_VERSION}")
        }
        None => bail!("{} still cannot import llama_cpp", python.display()),
    }
}
