//! The llama-family forward pass on CPU (llama, and qwen2: the same blocks plus Q/K/V biases and
//! RoPE over head halves): embedding lookup, then per layer RMSNorm, Q/K/V products (plus
//! biases), RoPE, causal grouped-query attention over an f32 KV cache, the output
//! product with the residual add fused in, RMSNorm, gate/up products, SiLU × up, the down product
//! with the residual add fused in; then the final norm and the vocabulary product for the last
//! position only. It computes what candle's `quantized_llama` and `quantized_qwen2` compute,
//! with the same activation quantization, so greedy decoding picks the same tokens.
//!
//! Every buffer a step needs is kept in [`Scratch`] and reused; each sequence's KV cache takes
//! room for `max_positions` (the context) the first time it is fed, never more, and is kept
//! across `reset`.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::attention::{Layout, attention};
use super::kernels::{Activations, Kernels};
use super::ops::{MatMul, RopeStyle, formats, rms_norm, rope, transpose};
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
    pub(super) rope: RopeStyle,
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
    /// Q, K and V biases (qwen2).
    qkv_bias: Option<[Vec<f32>; 3]>,
}

/// The KV cache of one sequence: per layer and KV head (`layer * n_kv_heads + head`), keys and
/// values `[position][head_dim]`, so that a head's attention reads two contiguous runs.
#[derive(Default)]
struct KvCache {
    /// Positions held.
    len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
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
    /// The heads' outputs and scores, laid out by `att_layout`.
    att_heads: Vec<f32>,
    att_layout: Layout,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Products of a batch, `[row][token]`, before they are transposed into place.
    batch: Vec<f32>,
    /// Each token's position.
    positions: Vec<usize>,
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
    /// One KV cache per sequence the model holds at once.
    caches: Vec<KvCache>,
    s: Scratch,
}

/// Tokens of one sequence fed in a step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqTokens<'a> {
    /// Which of the model's sequences (KV caches).
    pub seq: usize,
    pub tokens: &'a [u32],
    /// Position of the first token. Positions from `pos` on are dropped from the cache first,
    /// so 0 starts the sequence afresh; it may not lie beyond the cached positions.
    pub pos: usize,
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
    qkv_bias: Option<[super::weights::VecRef; 3]>,
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
    /// Checks that the file is a plain llama or qwen2 model whose matrices all have kernels
    /// here.
    pub(crate) fn new(
        content: &gguf_file::Content,
        max_positions: usize,
    ) -> Result<Plan, Unsupported> {
        let arch = match content.metadata.get("general.architecture") {
            Some(v) => v
                .to_string()
                .map_err(|_| Unsupported("general.architecture is not a string".into()))?
                .clone(),
            None => return Err(Unsupported("no general.architecture".into())),
        };
        let (rope_style, biased) = match arch.as_str() {
            "llama" => (RopeStyle::Interleaved, false),
            "qwen2" => (RopeStyle::Halves, true),
            other => return Err(Unsupported(format!("architecture {other}"))),
        };
        let key = |k: &str| format!("{arch}.{k}");
        if md_usize(content, &key("expert_count")).unwrap_or(0) > 1 {
            return Err(Unsupported("mixture of experts".into()));
        }
        let n_heads = md_usize(content, &key("attention.head_count"))?;
        let n_kv_heads = md_usize(content, &key("attention.head_count_kv"))?;
        let n_layers = md_usize(content, &key("block_count"))?;
        let dim = md_usize(content, &key("embedding_length"))?;
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let eps = md_f32(content, &eps_key).ok_or_else(|| Unsupported(format!("no {eps_key}")))?;
        let base = md_f32(content, &key("rope.freq_base")).unwrap_or(10000.0);
        if n_heads == 0
            || n_kv_heads == 0
            || !dim.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(Unsupported("attention shape".into()));
        }
        let head_dim = dim / n_heads;
        // qwen2 files do not state it: rotation covers the whole head, as candle does.
        let rope_dim = md_usize(content, &key("rope.dimension_count")).unwrap_or(head_dim);
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
            let qkv_bias = if biased {
                let b = |n: &str, len| t.vector(&format!("blk.{i}.{n}.bias"), len);
                Some([
                    b("attn_q", dim)?,
                    b("attn_k", kv_dim)?,
                    b("attn_v", kv_dim)?,
                ])
            } else if t.has(&format!("blk.{i}.attn_q.bias")) {
                return Err(Unsupported("attention biases in a llama file".into()));
            } else {
                None
            };
            layers.push(LayerPlan {
                attn_norm: t.vector(&format!("blk.{i}.attn_norm.weight"), dim)?,
                ffn_norm: t.vector(&format!("blk.{i}.ffn_norm.weight"), dim)?,
                mats,
                qkv_bias,
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
                rope: rope_style,
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
                    qkv_bias: l.qkv_bias.map(|b| b.map(|v| v.read(&data))),
                    attn_norm: l.attn_norm.read(&data),
                    ffn_norm: l.ffn_norm.read(&data),
                    wq,
                    wk,
                    wv,
                    wo,
                    gate,
                    up,
                    down,
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
            caches: vec![KvCache::default()],
            s: Scratch::default(),
        })
    }
}

impl CpuLlama {
    /// Holds `n` (at least one) sequences at once; the caches of sequences beyond `n` are
    /// dropped.
    pub(crate) fn set_sequences(&mut self, n: usize) {
        self.caches.resize_with(n.max(1), KvCache::default);
    }

    #[cfg(test)]
    pub(crate) fn sequences(&self) -> usize {
        self.caches.len()
    }

    /// Feeds every entry of `batch` in one pass (their tokens share each matrix product, and
    /// each attends over its own sequence's cache); returns the last position's logits of each
    /// entry, `[entry][vocab]`.
    pub(crate) fn step(&mut self, batch: &[SeqTokens<'_>]) -> Result<&[f32], EngineError> {
        let cfg = &self.cfg;
        if batch.is_empty() || batch.iter().any(|e| e.tokens.is_empty()) {
            return Err(EngineError::EmptyPrompt);
        }
        for (i, e) in batch.iter().enumerate() {
            let Some(cache) = self.caches.get(e.seq) else {
                return Err(EngineError::Inference(format!(
                    "sequence {} is beyond the {} held",
                    e.seq,
                    self.caches.len()
                )));
            };
            if batch[..i].iter().any(|o| o.seq == e.seq) {
                return Err(EngineError::Inference(format!(
                    "sequence {} is fed twice in one step",
                    e.seq
                )));
            }
            if e.pos > cache.len {
                return Err(EngineError::Inference(format!(
                    "position {} does not follow the {} cached positions",
                    e.pos, cache.len
                )));
            }
            if e.pos + e.tokens.len() > cfg.max_positions {
                return Err(EngineError::Inference(format!(
                    "{} positions exceed the context of {}",
                    e.pos + e.tokens.len(),
                    cfg.max_positions
                )));
            }
            if let Some(&tok) = e.tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
                return Err(EngineError::Inference(format!(
                    "token {tok} is outside the vocabulary"
                )));
            }
        }
        let n: usize = batch.iter().map(|e| e.tokens.len()).sum();
        let entries = batch.len();
        let (dim, kv_dim, ffn, hd) = (cfg.dim, cfg.kv_dim(), cfg.ffn, cfg.head_dim);
        let n_layers = self.layers.len();
        let s = &mut self.s;
        s.x.resize(n * dim, 0.0);
        s.xn.resize(n * dim, 0.0);
        s.q.resize(n * dim, 0.0);
        s.k.resize(n * kv_dim, 0.0);
        s.v.resize(n * kv_dim, 0.0);
        s.att.resize(n * dim, 0.0);
        s.gate.resize(n * ffn, 0.0);
        s.up.resize(n * ffn, 0.0);
        s.logits.resize(entries * cfg.vocab, 0.0);
        let half = cfg.freqs.len();
        s.cos.resize(n * half, 0.0);
        s.sin.resize(n * half, 0.0);
        let work = s
            .att_layout
            .plan(cfg, batch.iter().map(|e| (e.pos, e.tokens.len())));
        s.att_heads.resize(work, 0.0);
        s.positions.clear();
        for e in batch {
            s.positions.extend(e.pos..e.pos + e.tokens.len());
            let cache = &mut self.caches[e.seq];
            cache.len = e.pos;
            cache.k.resize_with(n_layers * cfg.n_kv_heads, Vec::new);
            cache.v.resize_with(n_layers * cfg.n_kv_heads, Vec::new);
        }

        let tokens = batch.iter().flat_map(|e| e.tokens);
        for (t, (&tok, &p)) in tokens.zip(&s.positions).enumerate() {
            dequantize_row(
                self.embd.ty,
                self.embd.row(&self.data, tok as usize),
                &mut s.x[t * dim..(t + 1) * dim],
            );
            for (i, f) in cfg.freqs.iter().enumerate() {
                let angle = p as f32 * f;
                s.cos[t * half + i] = angle.cos();
                s.sin[t * half + i] = angle.sin();
            }
        }

        let mm = MatMul {
            data: &self.data,
            kernels: &self.kernels,
            pool: &self.pool,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, cfg.eps, &mut s.xn);
            s.act
                .set(&s.xn, dim, &formats(&[layer.wq, layer.wk, layer.wv]));
            // One parallel section for the three products.
            mm.run_fused(&[layer.wq, layer.wk, layer.wv], &s.act, &mut s.batch);
            unstack(&s.batch, n, &mut [&mut s.q[..], &mut s.k[..], &mut s.v[..]]);
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                add_rows(&mut s.q, bq);
                add_rows(&mut s.k, bk);
                add_rows(&mut s.v, bv);
            }
            rope(&mut s.q, hd, cfg.rope, &s.cos, &s.sin);
            rope(&mut s.k, hd, cfg.rope, &s.cos, &s.sin);
            let n_kv = cfg.n_kv_heads;
            let heads = l * n_kv..(l + 1) * n_kv;
            let mut t0 = 0;
            for e in batch {
                let cache = &mut self.caches[e.seq];
                for (h, (k_head, v_head)) in cache.k[heads.clone()]
                    .iter_mut()
                    .zip(&mut cache.v[heads.clone()])
                    .enumerate()
                {
                    k_head.truncate(e.pos * hd);
                    v_head.truncate(e.pos * hd);
                    // Room for the whole context at once: pages are touched only as positions
                    // fill them, and the cache never grows past what the hive's capacity check
                    // counted (amortized doubling would).
                    if k_head.capacity() == 0 {
                        k_head.reserve_exact(cfg.max_positions * hd);
                        v_head.reserve_exact(cfg.max_positions * hd);
                    }
                    for t in t0..t0 + e.tokens.len() {
                        let at = t * kv_dim + h * hd;
                        k_head.extend_from_slice(&s.k[at..at + hd]);
                        v_head.extend_from_slice(&s.v[at..at + hd]);
                    }
                }
                t0 += e.tokens.len();
            }
            let caches = &self.caches;
            let kv = |entry: usize| {
                let cache = &caches[batch[entry].seq];
                (&cache.k[heads.clone()], &cache.v[heads.clone()])
            };
            let layout = &s.att_layout;
            attention(
                cfg,
                &self.kernels,
                &self.pool,
                layout,
                &s.q,
                &kv,
                &mut s.att_heads,
            );
            layout.gather(&s.att_heads, &mut s.att);
            s.act.set(&s.att, dim, &formats(&[layer.wo]));
            mm.run(&layer.wo, &s.act, &mut s.x, &mut s.batch, true);

            rms_norm(&s.x, &layer.ffn_norm, cfg.eps, &mut s.xn);
            s.act.set(&s.xn, dim, &formats(&[layer.gate, layer.up]));
            mm.run_fused(&[layer.gate, layer.up], &s.act, &mut s.batch);
            unstack(&s.batch, n, &mut [&mut s.gate[..], &mut s.up[..]]);
            for (g, u) in s.gate.iter_mut().zip(&s.up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            s.act.set(&s.gate, ffn, &formats(&[layer.down]));
            mm.run(&layer.down, &s.act, &mut s.x, &mut s.batch, true);
        }
        for e in batch {
            self.caches[e.seq].len = e.pos + e.tokens.len();
        }

        // The last position of each entry, normed, against the vocabulary.
        let mut t_end = 0;
        for (i, e) in batch.iter().enumerate() {
            t_end += e.tokens.len();
            let last = &s.x[(t_end - 1) * dim..t_end * dim];
            rms_norm(
                last,
                &self.out_norm,
                cfg.eps,
                &mut s.xn[i * dim..(i + 1) * dim],
            );
        }
        let normed = &s.xn[..entries * dim];
        s.act.set(normed, dim, &formats(&[self.output]));
        mm.run(&self.output, &s.act, &mut s.logits, &mut s.batch, false);
        Ok(&s.logits)
    }
}

/// Splits the `[row][token]` products of stacked matrices (from `run_fused`) into one
/// `[token][row]` buffer per matrix, in stacking order; each buffer holds `n` times its
/// matrix's rows.
fn unstack(stacked: &[f32], n: usize, outs: &mut [&mut [f32]]) {
    let mut row0 = 0;
    for out in outs.iter_mut() {
        let rows = out.len() / n;
        transpose(&stacked[row0 * n..(row0 + rows) * n], n, out, |o, v| *o = v);
        row0 += rows;
    }
}

/// Adds `bias` to every `bias.len()`-long row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

impl CausalLm for CpuLlama {
    fn forward(&mut self, tokens: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let tokens = tokens.flatten_all()?.to_vec1::<u32>()?;
        let entry = SeqTokens {
            seq: 0,
            tokens: &tokens,
            pos,
        };
        let logits = self.step(&[entry]).map_err(candle_core::Error::wrap)?;
        Tensor::from_slice(logits, (1, logits.len()), &Device::Cpu)
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        self.caches[0].len = 0;
        Ok(())
    }

    fn batched(&mut self) -> Option<&mut CpuLlama> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
