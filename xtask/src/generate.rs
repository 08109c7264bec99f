//! `cargo xtask gen-model`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use model_gen::{Arch, ModelFormat, ModelSpec};

#[derive(clap::Args)]
pub struct GenArgs {
    /// Model size: tiny (hundreds of KB), small (a few MB) or tinyllama (1.1 B parameters),
    /// in the family's own defaults; tiny-llama3, small-llama3 and tinyllama-llama3 are llama
    /// with Llama 3 RoPE scaling (`rope_freqs.weight`) and chat format; small-linear8 is
    /// gemma3 with Gemma 3's linear RoPE scaling (factor 8) on its global layers.
    #[arg(long, value_parser = [
        "tiny", "small", "tinyllama", "tiny-llama3", "small-llama3", "tinyllama-llama3",
        "small-linear8",
    ])]
    preset: String,
    /// llama, qwen2, qwen3, gemma2, gemma3 or phi3.
    #[arg(long, default_value = "llama")]
    arch: Arch,
    /// hub (a directory of safetensors and tokenizer files; llama and qwen2 only), f32, f16,
    /// q8_0, q4_0, q4_k, q6_k, q4_k_m or q5_k.
    #[arg(long)]
    format: ModelFormat,
    /// An explicit attention head size (`attention.key_length`), as Mistral-Nemo has.
    #[arg(long)]
    head_dim: Option<usize>,
    /// Leave out `rope_freqs.weight` of a llama3 preset (otherwise the same file).
    #[arg(long)]
    without_rope_freqs: bool,
    /// Output directory (hub) or file (GGUF).
    #[arg(long)]
    out: PathBuf,
    /// Weight seed; the same seed always writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: &GenArgs) -> anyhow::Result<()> {
    let mut spec = ModelSpec::preset(&args.preset, args.arch)?.with_seed(args.seed);
    if let Some(head_dim) = args.head_dim {
        spec = spec.with_head_dim(head_dim);
    }
    if args.without_rope_freqs {
        spec = spec.without_rope_freqs();
    }
    let started = Instant::now();
    model_gen::write_model(&spec, args.format, &args.out)
        .with_context(|| format!("writing {} to {}", args.format, args.out.display()))?;
    eprintln!(
        "wrote {} {} ({} parameters) in {:.1}s",
        args.preset,
        args.format,
        spec.parameter_count(),
        started.elapsed().as_secs_f64()
    );
    match args.format {
        ModelFormat::Hub => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&args.out)?
                .map(|entry| entry.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            files.sort();
            for file in files {
                println!("{}", file.display());
            }
        }
        ModelFormat::Gguf(_) => println!("{}", args.out.display()),
    }
    Ok(())
}
