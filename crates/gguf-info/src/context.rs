//! The context a worker runs a GGUF file with: the one asked for, or the trained one, capped
//! where the code that runs the file has a fixed limit. The engine sets its model's context by
//! these functions; the hive counts KV caches by them.

use crate::header::Header;

/// The positions candle's `quantized_llama` precomputes its rotary tables for (its
/// `MAX_SEQ_LEN`), and so the most it holds; also the trained context of a llama file that
/// states none. The engine checks it against candle's constant.
pub const CANDLE_LLAMA_MAX_SEQ_LEN: usize = 4096;

/// The context `requested`, or `trained` when none was (or 0 was, as llama.cpp reads `-c 0`),
/// capped at `limit` (`None`: no fixed limit). A context beyond the trained one is allowed, as
/// llama.cpp allows it.
pub fn resolve(requested: Option<usize>, trained: usize, limit: Option<usize>) -> usize {
    let wanted = requested.filter(|&n| n > 0).unwrap_or(trained);
    limit.map_or(wanted, |limit| wanted.min(limit))
}

/// The context the file was trained for: `{arch}.context_length`, or for a llama file that
/// states none, what candle's llama assumes. `None` when neither applies.
pub fn trained(header: &Header) -> Option<usize> {
    let arch = header.architecture()?;
    match header.count(&format!("{arch}.context_length")) {
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None if arch == "llama" => Some(CANDLE_LLAMA_MAX_SEQ_LEN),
        None => None,
    }
}

/// The most positions candle's model code for `arch` holds: `quantized_llama` precomputes its
/// rotary tables for [`CANDLE_LLAMA_MAX_SEQ_LEN`] positions and `quantized_qwen2` for the
/// trained context. The engine's CPU path has no such limit.
pub fn candle_limit(arch: &str, trained: usize) -> Option<usize> {
    match arch {
        "llama" => Some(CANDLE_LLAMA_MAX_SEQ_LEN),
        _ => Some(trained),
    }
}

/// The limit of the code that runs `arch`: none on the engine's CPU path (`on_cpu_path`),
/// candle's otherwise.
pub fn limit(arch: &str, trained: usize, on_cpu_path: bool) -> Option<usize> {
    if on_cpu_path {
        None
    } else {
        candle_limit(arch, trained)
    }
}

/// The context a worker loading this file runs with, from the header alone: `requested` or
/// the trained context, capped where candle's code runs it (`on_cpu_path` false). `None` when
/// the file does not state what is needed.
pub fn context_length(
    header: &Header,
    on_cpu_path: bool,
    requested: Option<usize>,
) -> Option<usize> {
    let arch = header.architecture()?;
    let trained = trained(header)?;
    Some(resolve(
        requested,
        trained,
        limit(arch, trained, on_cpu_path),
    ))
}
