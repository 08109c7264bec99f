//! rbee's inference engine: loads a model with candle, tokenizes and renders prompts, samples
//! tokens and streams them to a callback.
//!
//! It runs GGUF files of the llama, qwen2, qwen3, gemma2, gemma3 and phi3 architectures
//! (quantized or not) and safetensors llama checkpoints in Hugging Face hub layout, on CPU, CUDA
//! or Metal (the last two behind the `cuda` / `metal` features). Every family sits behind one
//! trait and shares one generation loop, one sampler and one incremental detokenizer. On CPU,
//! GGUF files whose matrices are F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K or Q6_K run on the
//! engine's own kernels and thread pool (`cpu` module), computed as llama.cpp computes them;
//! everything else runs on candle's path, which takes only the llama and qwen2 files candle's
//! model code computes correctly and computes them as that code does. Either path holds one KV
//! cache per slot and feeds several generations in one forward pass (continuous batching: see
//! [`Engine::step`]).
//!
//! The API is blocking and synchronous: it knows nothing of HTTP, jobs, async runtimes or the
//! wire contract. The worker owns an [`Engine`] on a dedicated thread and turns its callbacks
//! into events.

mod constraint;
mod cpu;
mod device;
mod engine;
mod error;
mod model;
mod params;
mod prompt_cache;
mod prompter;
mod sampling;
mod sequence;
mod stop;

pub mod chat;
pub mod tokenizer;

pub use chat::{ChatTemplate, ChatTool, ChatToolCall, ChatTurn};
pub use constraint::{Constraint, ConstraintEnv, OutputFormat, check_output_format};
pub use device::{DeviceSpec, ParseDeviceError};
pub use engine::{Completion, Engine, FinishReason, GeneratedToken, LoadOptions, LoadProgress};
pub use error::{EngineError, ErrorKind};
pub use model::{ModelInfo, WeightsFormat};
pub use params::{GenerationParams, PreparedRequest, Prompt};
pub use prompt_cache::{MAX_ROUTING_KEYS, PromptCacheOptions};
pub use prompter::Prompter;
pub use sampling::{Logprob, TokenLogprobs};
pub use sequence::Sequence;
pub use tokenizer::TextTokenizer;

/// Backs the 2 MiB-aligned part of a fresh, not yet touched buffer with huge pages where Linux
/// allows it, as the CPU path does for its weights; a benchmark measuring the memory bandwidth
/// the weights are read at backs its buffer the same way.
pub fn advise_huge_pages(buf: &mut [u8]) {
    cpu::advise_huge_pages(buf);
}

/// Sets how many CPU threads inference uses (candle's pools and the engine's own CPU pool, which
/// is sized from the same setting when a model loads); 0 keeps candle's default.
///
/// candle sizes its thread pools once, from the `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS`
/// environment variables, the first time it computes anything on the CPU. This function sets
/// both, so it must run before the first model is loaded, and, because changing the
/// environment is only sound while no other thread exists, before the process starts any
/// thread (first thing in `main`, before an async runtime is built).
///
/// Returns an error, and changes nothing, when other threads are already running (detected
/// on Linux).
pub fn set_cpu_threads(n: usize) -> Result<(), EngineError> {
    if n == 0 {
        return Ok(());
    }
    if let Some(threads) = running_threads()
        && threads > 1
    {
        return Err(EngineError::Device(format!(
            "cannot set the CPU thread count: {threads} threads are already running; \
             set it before starting any thread, or set CANDLE_NUM_THREADS and RAYON_NUM_THREADS"
        )));
    }
    let value = n.to_string();
    // SAFETY: `set_var` races only with concurrent access to the environment from other
    // threads. On Linux the check above proved this is the only thread; elsewhere the
    // documented contract is that callers run this before starting any thread.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", &value);
        std::env::set_var("RAYON_NUM_THREADS", &value);
    }
    candle_core::utils::init_global_threadpool();
    Ok(())
}

/// Number of threads in this process, where the OS lets us count them cheaply.
fn running_threads() -> Option<usize> {
    if cfg!(target_os = "linux") {
        std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
    } else {
        None
    }
}
