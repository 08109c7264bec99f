//! What a GGUF file's architecture asks of the forward pass (head sizes, RoPE layout,
//! frequencies and scaling, attention scale, soft-capping, sliding-window layers, the FFN's
//! activation and which optional tensors a block has), read from its metadata the way llama.cpp
//! reads it. The reading is gguf-info's ([`gguf_info::arch`]), so that the hive, which asks
//! whether a file runs on this path without carrying the engine, decides by the same rules.
//!
//! The families differ only in these settings; one forward pass ([`super::forward`]) runs them
//! all.

pub(crate) use gguf_info::arch::{ARCHITECTURES, FfnAct, RopeParams, RopeStyle};
