//! The llama-family forward pass on CPU: embedding lookup, then per layer RMSNorm, Q/K/V
//! products, interleaved RoPE, causal grouped-query attention over an f32 KV cache, the output
//! product with the residual add fused in, RMSNorm, gate/up products, SiLU × up, the down product
//! with the residual add fused in; then the final norm and the vocabulary product for the last
//! position only. It computes what candle's `quantized_llama` computes, with the same activation
//! quantization, so greedy decoding picks the same tokens.
//!
//! Every buffer a step needs is kept in [`Scratch`] and reused; the KV cache grows (amortized) to
//! the longest sequence seen and is kept across `reset`.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::kernels::{Activations, Kernels};
use super::ops::{MatMul, attention, formats, rms_norm, rope};
use super::pool::Pool;
use super::quant::dequantize_row;
use super::weights::{Mat, Tensors, Unsupported, read_data};
use crate::EngineError;
use crate::model::CausalLm;

/// Largest head size the CPU path accepts.
const MAX_HEAD_DIM: usize = 256;

#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) dim: usize,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) ffn: usize,
    pub(super) vocab: usize,
    pub(super) eps: f32,
    /// RoPE frequency of each rotated pair.
    pub(super) freqs: Vec<f32>,
    pub(super) max_positions: usize,
}

impl Config {
    pub(super) fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Mat,
    wk: Mat,
    wv: Mat,
    wo: Mat,
    ffn_norm: Vec<f32>,
    gate: Mat,
    up: Mat,
    down: Mat,
    /// Cached keys and values, `[position][kv_dim]`.
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

/// Buffers of one forward pass, sized for the largest batch seen.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    att_heads: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Products of a batch, `[row][token]`, before they are transposed into place.
    batch: Vec<f32>,
    act: Activations,
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
}

/// A llama-family GGUF model run by the engine's own CPU kernels.
pub(crate) struct CpuLlama {
    data: Vec<u8>,
    cfg: Config,
    embd: Mat,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    output: Mat,
    kernels: Kernels,
    pool: Pool,
    /// Positions held in the KV cache.
    len: usize,
    s: Scratch,
}

/// What the CPU path needs from the file, checked before any weight is read.
pub(crate) struct Plan {
    cfg: Config,
    embd: Mat,
    layers: Vec<LayerPlan>,
    out_norm: super::weights::VecRef,
    output: Mat,
}

struct LayerPlan {
    attn_norm: super::weights::VecRef,
    ffn_norm: super::weights::VecRef,
    mats: [Mat; 7],
}

fn md_usize(content: &gguf_file::Content, key: &str) -> Result<usize, Unsupported> {
    let v = content
        .metadata
        .get(key)
        .ok_or_else(|| Unsupported(format!("no {key}")))?;
    v.to_u32()
        .map(|n| n as usize)
        .or_else(|_| v.to_u64().map(|n| n as usize))
        .map_err(|_| Unsupported(format!("{key} is not an integer")))
}

fn md_f32(content: &gguf_file::Content, key: &str) -> Option<f32> {
    content.metadata.get(key).and_then(|v| v.to_f32().ok())
}

impl Plan {
    /// Checks that the file is a plain llama model whose matrices all have kernels here.
    pub(crate) fn new(
        content: &gguf_file::Content,
        max_positions: usize,
    ) -> Result<Plan, Unsupported> {
        if md_usize(content, "llama.expert_count").unwrap_or(0) > 1 {
            return Err(Unsupported("mixture of experts".into()));
        }
        let n_heads = md_usize(content, "llama.attention.head_count")?;
        let n_kv_heads = md_usize(content, "llama.attention.head_count_kv")?;
        let n_layers = md_usize(content, "llama.block_count")?;
        let dim = md_usize(content, "llama.embedding_length")?;
        let rope_dim = md_usize(content, "llama.rope.dimension_count")?;
        let eps = md_f32(content, "llama.attention.layer_norm_rms_epsilon")
            .ok_or_else(|| Unsupported("no llama.attention.layer_norm_rms_epsilon".into()))?;
        let base = md_f32(content, "llama.rope.freq_base").unwrap_or(10000.0);
        if n_heads == 0
            || n_kv_heads == 0
            || !dim.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(Unsupported("attention shape".into()));
        }
        let head_dim = dim / n_heads;
        if rope_dim != head_dim || head_dim > MAX_HEAD_DIM || !head_dim.is_multiple_of(2) {
            return Err(Unsupported(format!(
                "head size {head_dim}, rotary size {rope_dim}"
            )));
        }
        let t = Tensors::new(content);
        let embd = t.lookup("token_embd.weight")?;
        let output = if t.has("output.weight") {
            t.matmul("output.weight")?
        } else {
            t.matmul("token_embd.weight")?
        };
        let kv_dim = n_kv_heads * head_dim;
        let mut layers = Vec::with_capacity(n_layers);
        let mut ffn = 0;
        for i in 0..n_layers {
            let m = |n: &str| t.matmul(&format!("blk.{i}.{n}.weight"));
            let mats = [
                m("attn_q")?,
                m("attn_k")?,
                m("attn_v")?,
                m("attn_output")?,
                m("ffn_gate")?,
                m("ffn_up")?,
                m("ffn_down")?,
            ];
            ffn = mats[4].rows;
            let shapes = [
                (dim, dim),
                (kv_dim, dim),
                (kv_dim, dim),
                (dim, dim),
                (ffn, dim),
                (ffn, dim),
                (dim, ffn),
            ];
            if mats
                .iter()
                .zip(shapes)
                .any(|(m, (r, c))| (m.rows, m.cols) != (r, c))
            {
                return Err(Unsupported(format!("layer {i} shapes")));
            }
            if t.has(&format!("blk.{i}.attn_q.bias")) {
                return Err(Unsupported("attention biases".into()));
            }
            layers.push(LayerPlan {
                attn_norm: t.vector(&format!("blk.{i}.attn_norm.weight"), dim)?,
                ffn_norm: t.vector(&format!("blk.{i}.ffn_norm.weight"), dim)?,
                mats,
            });
        }
        if embd.cols != dim || output.cols != dim || output.rows != embd.rows {
            return Err(Unsupported("embedding shapes".into()));
        }
        let freqs = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        Ok(Plan {
            cfg: Config {
                dim,
                n_heads,
                n_kv_heads,
                head_dim,
                ffn,
                vocab: embd.rows,
                eps,
                freqs,
                max_positions,
            },
            embd,
            layers,
            out_norm: t.vector("output_norm.weight", dim)?,
            output,
        })
    }

    /// Reads the weights and starts the thread pool.
    pub(crate) fn load<R: std::io::Read + std::io::Seek>(
        self,
        content: &gguf_file::Content,
        reader: &mut R,
        threads: usize,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CpuLlama, EngineError> {
        let mut data = read_data(reader, &Tensors::new(content), progress)?;
        let kernels = Kernels::detect();
        let mut scratch = Vec::new();
        let mut output = self.output;
        if !output.same_tensor(&self.embd) {
            output.tile(&mut data, &kernels, &mut scratch);
        }
        let layers = self
            .layers
            .into_iter()
            .map(|mut l| {
                for m in &mut l.mats {
                    m.tile(&mut data, &kernels, &mut scratch);
                }
                let [wq, wk, wv, wo, gate, up, down] = l.mats;
                Layer {
                    attn_norm: l.attn_norm.read(&data),
                    ffn_norm: l.ffn_norm.read(&data),
                    wq,
                    wk,
                    wv,
                    wo,
                    gate,
                    up,
                    down,
                    k_cache: Vec::new(),
                    v_cache: Vec::new(),
                }
            })
            .collect();
        let pool = Pool::new(threads).map_err(|e| EngineError::load("CPU threads", e))?;
        tracing::info!(
            kernels = kernels.name,
            threads = pool.threads(),
            "CPU forward pass"
        );
        Ok(CpuLlama {
            out_norm: self.out_norm.read(&data),
            data,
            cfg: self.cfg,
            embd: self.embd,
            layers,
            output,
            kernels,
            pool,
            len: 0,
            s: Scratch::default(),
        })
    }
}

impl CpuLlama {
    /// Runs `tokens` at positions `pos..`, returning the last position's logits.
    fn step(&mut self, tokens: &[u32], pos: usize) -> Result<&[f32], EngineError> {
        let cfg = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if pos != self.len {
            return Err(EngineError::Inference(format!(
                "position {pos} does not follow the {} cached positions",
                self.len
            )));
        }
        if pos + n > cfg.max_positions {
            return Err(EngineError::Inference(format!(
                "{} positions exceed the context of {}",
                pos + n,
                cfg.max_positions
            )));
        }
        let (dim, kv_dim, ffn) = (cfg.dim, cfg.kv_dim(), cfg.ffn);
        let s = &mut self.s;
        s.x.resize(n * dim, 0.0);
        s.xn.resize(n * dim, 0.0);
        s.q.resize(n * dim, 0.0);
        s.k.resize(n * kv_dim, 0.0);
        s.v.resize(n * kv_dim, 0.0);
        s.att.resize(n * dim, 0.0);
        s.att_heads
            .resize(cfg.n_heads * (n * cfg.head_dim + pos + n), 0.0);
        s.gate.resize(n * ffn, 0.0);
        s.up.resize(n * ffn, 0.0);
        s.logits.resize(cfg.vocab, 0.0);
        s.cos.resize(n * cfg.freqs.len(), 0.0);
        s.sin.resize(n * cfg.freqs.len(), 0.0);

        for (t, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if tok >= cfg.vocab {
                return Err(EngineError::Inference(format!(
                    "token {tok} is outside the vocabulary"
                )));
            }
            dequantize_row(
                self.embd.ty,
                self.embd.row(&self.data, tok),
                &mut s.x[t * dim..(t + 1) * dim],
            );
            let half = cfg.freqs.len();
            for (i, f) in cfg.freqs.iter().enumerate() {
                let angle = (pos + t) as f32 * f;
                s.cos[t * half + i] = angle.cos();
                s.sin[t * half + i] = angle.sin();
            }
        }

        let mm = MatMul {
            data: &self.data,
            kernels: &self.kernels,
            pool: &self.pool,
        };
        for layer in &mut self.layers {
            rms_norm(&s.x, &layer.attn_norm, cfg.eps, &mut s.xn);
            s.act
                .set(&s.xn, dim, &formats(&[layer.wq, layer.wk, layer.wv]));
            if n == 1 {
                // One parallel section for the three products of a decode step.
                mm.run_fused(&[layer.wq, layer.wk, layer.wv], &s.act, &mut s.batch);
                let (q, rest) = s.batch.split_at(dim);
                let (k, v) = rest.split_at(kv_dim);
                s.q.copy_from_slice(q);
                s.k.copy_from_slice(k);
                s.v.copy_from_slice(&v[..kv_dim]);
            } else {
                mm.run(&layer.wq, &s.act, &mut s.q, &mut s.batch, false);
                mm.run(&layer.wk, &s.act, &mut s.k, &mut s.batch, false);
                mm.run(&layer.wv, &s.act, &mut s.v, &mut s.batch, false);
            }
            rope(&mut s.q, cfg.head_dim, &s.cos, &s.sin);
            rope(&mut s.k, cfg.head_dim, &s.cos, &s.sin);
            layer.k_cache.truncate(pos * kv_dim);
            layer.v_cache.truncate(pos * kv_dim);
            layer.k_cache.extend_from_slice(&s.k);
            layer.v_cache.extend_from_slice(&s.v);
            attention(
                cfg,
                &self.pool,
                pos,
                &s.q,
                &layer.k_cache,
                &layer.v_cache,
                &mut s.att_heads,
            );
            // Head-major `[head][token][head_dim]` (plus each head's scores) back to
            // `[token][dim]`.
            let per_head = n * cfg.head_dim + pos + n;
            for h in 0..cfg.n_heads {
                for t in 0..n {
                    let src = h * per_head + t * cfg.head_dim;
                    let dst = t * dim + h * cfg.head_dim;
                    s.att[dst..dst + cfg.head_dim]
                        .copy_from_slice(&s.att_heads[src..src + cfg.head_dim]);
                }
            }
            s.act.set(&s.att, dim, &formats(&[layer.wo]));
            mm.run(&layer.wo, &s.act, &mut s.x, &mut s.batch, true);

            rms_norm(&s.x, &layer.ffn_norm, cfg.eps, &mut s.xn);
            s.act.set(&s.xn, dim, &formats(&[layer.gate, layer.up]));
            if n == 1 {
                mm.run_fused(&[layer.gate, layer.up], &s.act, &mut s.batch);
                let (g, u) = s.batch.split_at(ffn);
                s.gate.copy_from_slice(g);
                s.up.copy_from_slice(&u[..ffn]);
            } else {
                mm.run(&layer.gate, &s.act, &mut s.gate, &mut s.batch, false);
                mm.run(&layer.up, &s.act, &mut s.up, &mut s.batch, false);
            }
            for (g, u) in s.gate.iter_mut().zip(&s.up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            s.act.set(&s.gate, ffn, &formats(&[layer.down]));
            mm.run(&layer.down, &s.act, &mut s.x, &mut s.batch, true);
        }
        self.len = pos + n;

        let last = &s.x[(n - 1) * dim..n * dim];
        rms_norm(last, &self.out_norm, cfg.eps, &mut s.xn[..dim]);
        s.act.set(&s.xn[..dim], dim, &formats(&[self.output]));
        mm.run(&self.output, &s.act, &mut s.logits, &mut s.batch, false);
        Ok(&s.logits)
    }
}

impl CausalLm for CpuLlama {
    fn forward(&mut self, tokens: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let tokens = tokens.flatten_all()?.to_vec1::<u32>()?;
        let logits = self.step(&tokens, pos).map_err(candle_core::Error::wrap)?;
        Tensor::from_slice(logits, (1, logits.len()), &Device::Cpu)
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
