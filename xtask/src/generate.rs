//! `cargo xtask gen-model`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use model_gen::{Arch, ModelFormat, ModelSpec};

#[derive(clap::Args)]
pub struct GenArgs {
    /// Model size: tiny (hundreds of KB), small (a few MB) or tinyllama (1.1 B parameters).
    #[arg(long, value_parser = ["tiny", "small", "tinyllama"])]
    preset: String,
    /// llama or qwen2.
    #[arg(long, default_value = "llama")]
    arch: Arch,
    /// hub (a directory of safetensors and tokenizer files), f32, f16, q8_0, q4_0 or q4_k.
    #[arg(long)]
    format: ModelFormat,
    /// Output directory (hub) or file (GGUF).
    #[arg(long)]
    out: PathBuf,
    /// Weight seed; the same seed always writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: &GenArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::preset(&args.preset, args.arch)?.with_seed(args.seed);
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
