//! Which GGUF files the engine's own CPU path takes, and which of their tensors it reads as
//! what: a model of one of the [`ARCHITECTURES`](crate::arch::ARCHITECTURES) whose matrices all
//! have the path's kernels, with every tensor the block reads of the shape the architecture's
//! settings give, and no tensor it has no use for (llama.cpp refuses a file with tensors its
//! graph does not create). The engine builds its forward pass from the [`Layout`] this returns;
//! the hive asks [`runs_on_cpu_path`] before it counts a KV cache per slot.

use std::cell::RefCell;
use std::collections::HashSet;

use crate::Unsupported;
use crate::arch::{Family, Hyper};
use crate::header::{Header, TensorInfo};
use crate::types::GgmlType;

/// Largest head size the CPU path's attention takes.
pub const MAX_HEAD_DIM: usize = 256;

/// The environment variable that turns the CPU path off (`0`, `false` or `off`), e.g. to compare
/// with candle's kernels. A worker inherits it from its hive, so both read it.
pub const ENABLE_ENV: &str = "RBEE_CPU_KERNELS";

/// Whether `RBEE_CPU_KERNELS` leaves the CPU path on.
pub fn enabled() -> bool {
    !std::env::var(ENABLE_ENV).is_ok_and(|v| matches!(v.trim(), "0" | "false" | "off"))
}

/// Whether a GGUF file, loaded on the CPU with this process's environment, runs on the engine's
/// own CPU path: the path that holds the weights once, has no fixed context limit and keeps a
/// prompt cache (candle's path, which runs every other file, batches generations too).
pub fn runs_on_cpu_path(header: &Header) -> bool {
    enabled() && Layout::read(header, usize::MAX).is_ok()
}

/// A tensor the forward pass reads: its type (one with a kernel), its shape and where its data
/// is in the data section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRef {
    pub ty: GgmlType,
    /// Rows of a matrix; 1 for a vector.
    pub rows: usize,
    /// Elements of a row (a multiple of the type's block), or of the vector.
    pub cols: usize,
    pub offset: u64,
}

/// The query, key and value products: three matrices, or one (Phi-3).
#[derive(Debug, Clone)]
pub enum Qkv {
    Split([TensorRef; 3]),
    Fused(TensorRef),
}

/// The FFN's gate and up products: two matrices, or one of both (Phi-3).
#[derive(Debug, Clone)]
pub enum GateUp {
    Split([TensorRef; 2]),
    Fused(TensorRef),
}

#[derive(Debug, Clone)]
pub struct LayerLayout {
    pub attn_norm: TensorRef,
    pub ffn_norm: TensorRef,
    pub qkv: Qkv,
    pub wo: TensorRef,
    pub gate_up: GateUp,
    pub down: TensorRef,
    pub qkv_bias: Option<[TensorRef; 3]>,
    pub qk_norm: Option<[TensorRef; 2]>,
    pub post_norms: Option<[TensorRef; 2]>,
}

/// What the CPU path reads from a file, checked before any weight is read.
#[derive(Debug, Clone)]
pub struct Layout {
    pub hyper: Hyper,
    pub embd: TensorRef,
    /// The vocabulary product: `output.weight`, or the embedding when the file ties them.
    pub output: TensorRef,
    pub layers: Vec<LayerLayout>,
    pub out_norm: TensorRef,
    pub rope_factors: Option<TensorRef>,
    /// Rows of the FFN's down product's input.
    pub ffn: usize,
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Typed views of the header's tensors.
struct Tensors<'a> {
    header: &'a Header,
    /// Every tensor the block reads; any other one in the file is refused.
    used: RefCell<HashSet<String>>,
}

impl Tensors<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, Unsupported> {
        self.used.borrow_mut().insert(name.to_owned());
        self.header
            .tensor(name)
            .ok_or_else(|| Unsupported(format!("no tensor {name}")))
    }

    fn has(&self, name: &str) -> bool {
        self.header.tensor(name).is_some()
    }

    fn typed(&self, name: &str) -> Result<&TensorInfo, Unsupported> {
        let info = self.info(name)?;
        if !info.ty.computed() {
            return Err(Unsupported(format!("{name} is {}", info.ty.describe())));
        }
        Ok(info)
    }

    /// A matrix the forward pass multiplies with or looks rows up in (the token embedding).
    fn matmul(&self, name: &str) -> Result<TensorRef, Unsupported> {
        let info = self.typed(name)?;
        let Some((rows, cols)) = info.matrix() else {
            return Err(Unsupported(format!("{name} has shape {:?}", info.dims)));
        };
        let (block, _) = info.ty.block().expect("a computed type has a block size");
        if !cols.is_multiple_of(block) {
            return Err(Unsupported(format!("{name}: {cols} columns")));
        }
        Ok(TensorRef {
            ty: info.ty,
            rows: usize_of(rows),
            cols: usize_of(cols),
            offset: info.offset,
        })
    }

    /// A 1-D vector of `len` values.
    fn vector(&self, name: &str, len: usize) -> Result<TensorRef, Unsupported> {
        let info = self.typed(name)?;
        let (block, _) = info.ty.block().expect("a computed type has a block size");
        if info.dims != [len as u64] || !(len as u64).is_multiple_of(block) {
            return Err(Unsupported(format!("{name} has shape {:?}", info.dims)));
        }
        Ok(TensorRef {
            ty: info.ty,
            rows: 1,
            cols: len,
            offset: info.offset,
        })
    }
}

impl Layout {
    /// Checks that the file is a model the CPU path runs and says what it reads.
    /// `max_positions` is the context it will run with (Phi-3's LongRoPE factors depend on it).
    pub fn read(header: &Header, max_positions: usize) -> Result<Layout, Unsupported> {
        let t = Tensors {
            header,
            used: RefCell::default(),
        };
        let h = Hyper::read(header, max_positions)?;
        if h.head_dim > MAX_HEAD_DIM {
            return Err(Unsupported(format!("head size {}", h.head_dim)));
        }
        let (dim, q_dim, kv_dim) = (h.dim, h.q_dim(), h.kv_dim());
        let embd = t.matmul("token_embd.weight")?;
        // Gemma 2's head is always its embedding (llama.cpp never reads an `output.weight`).
        let output = if h.family != Family::Gemma2 && t.has("output.weight") {
            t.matmul("output.weight")?
        } else {
            embd
        };
        let shape = |m: &TensorRef, rows: usize, cols: usize, what: &str| {
            if (m.rows, m.cols) == (rows, cols) {
                Ok(())
            } else {
                Err(Unsupported(format!(
                    "{what} is {}×{}, expected {rows}×{cols}",
                    m.rows, m.cols
                )))
            }
        };
        let mut layers = Vec::with_capacity(h.n_layers.min(header.tensors().len()));
        let mut ffn = 0;
        for i in 0..h.layers.len() {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let m = |n: &str| t.matmul(&name(n));
            let v = |n: &str, len| t.vector(&name(n), len);
            let qkv = if t.has(&name("attn_qkv")) {
                let fused = m("attn_qkv")?;
                shape(&fused, q_dim + 2 * kv_dim, dim, &name("attn_qkv"))?;
                Qkv::Fused(fused)
            } else {
                let [q, k, v] = [m("attn_q")?, m("attn_k")?, m("attn_v")?];
                shape(&q, q_dim, dim, &name("attn_q"))?;
                shape(&k, kv_dim, dim, &name("attn_k"))?;
                shape(&v, kv_dim, dim, &name("attn_v"))?;
                Qkv::Split([q, k, v])
            };
            let wo = m("attn_output")?;
            shape(&wo, dim, q_dim, &name("attn_output"))?;
            let down = m("ffn_down")?;
            ffn = down.cols;
            shape(&down, dim, ffn, &name("ffn_down"))?;
            let gate_up = if t.has(&name("ffn_gate")) {
                let [g, u] = [m("ffn_gate")?, m("ffn_up")?];
                shape(&g, ffn, dim, &name("ffn_gate"))?;
                shape(&u, ffn, dim, &name("ffn_up"))?;
                GateUp::Split([g, u])
            } else {
                let fused = m("ffn_up")?;
                shape(&fused, 2 * ffn, dim, &name("ffn_up"))?;
                GateUp::Fused(fused)
            };
            let bias = |n: &str, len| t.vector(&format!("blk.{i}.{n}.bias"), len);
            let qkv_bias = if h.qkv_bias {
                Some([
                    bias("attn_q", q_dim)?,
                    bias("attn_k", kv_dim)?,
                    bias("attn_v", kv_dim)?,
                ])
            } else {
                None
            };
            let qk_norm = if h.qk_norm {
                Some([v("attn_q_norm", h.head_dim)?, v("attn_k_norm", h.head_dim)?])
            } else {
                None
            };
            let post_norms = if h.post_norms {
                Some([v("post_attention_norm", dim)?, v("post_ffw_norm", dim)?])
            } else {
                None
            };
            layers.push(LayerLayout {
                attn_norm: v("attn_norm", dim)?,
                ffn_norm: v("ffn_norm", dim)?,
                qkv,
                wo,
                gate_up,
                down,
                qkv_bias,
                qk_norm,
                post_norms,
            });
        }
        if embd.cols != dim || output.cols != dim || output.rows != embd.rows {
            return Err(Unsupported("embedding shapes".into()));
        }
        let rope_factors = match h.rope_factors {
            Some(name) if t.has(name) => Some(t.vector(name, h.head_dim / 2)?),
            _ => None,
        };
        let out_norm = t.vector("output_norm.weight", dim)?;
        // Phi-3 files carry both LongRoPE factor sets; the one the context needs was taken.
        let known = |name: &str| {
            t.used.borrow().contains(name)
                || (h.family == Family::Phi3 && name.starts_with("rope_factors_"))
        };
        if let Some(extra) = header.tensors().iter().find(|t| !known(&t.name)) {
            return Err(Unsupported(format!(
                "{}, a tensor the {} block has no use for",
                extra.name,
                h.family.name()
            )));
        }
        Ok(Layout {
            hyper: h,
            embd,
            output,
            layers,
            out_norm,
            rope_factors,
            ffn,
        })
    }
}
