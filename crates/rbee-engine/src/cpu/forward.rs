//! The forward pass on CPU of every family in [`super::arch::ARCHITECTURES`]: embedding lookup
//! (scaled, for gemma), then per layer RMSNorm, Q/K/V products (stacked or fused, plus qwen2's
//! biases, qwen3's and gemma3's per-head norms), RoPE (pairs or halves, per-layer tables,
//! factors from the file), causal grouped-query attention over an f32 KV cache (scaled,
//! soft-capped and windowed as the layer asks), the output product added to the residual
//! stream (normed first, for gemma), RMSNorm, gate/up products, SiLU or GELU × up, the down
//! product added likewise; then the final norm, the vocabulary product for the last position
//! only, and gemma's logit soft-capping. It computes what llama.cpp computes for these
//! architectures, with the same activation quantization (checked against llama.cpp's own
//! outputs in `tests/llama_cpp_refs.rs`), and what candle's `quantized_llama` and
//! `quantized_qwen2` compute for llama and qwen2.
//!
//! Every buffer a step needs is kept in [`Scratch`] and reused; each sequence's KV cache takes
//! room for `max_positions` (the context) the first time it is fed, never more, and is kept
//! across `reset`.

use candle_core::quantized::gguf_file;
use gguf_info::cpu_path as layout;

use super::arch::{FfnAct, RopeParams};
use super::attention::{HeadShape, Layout, attention};
use super::kernels::{Activations, Kernels};
use super::ops::{MatMul, RopeStyle, formats, gelu, rms_norm, rms_norm_in_place, rope, transpose};
use super::pool::Pool;
use super::quant::dequantize_row;
use super::weights::{Mat, Tensors, Unsupported, VecRef, read_data};
use crate::EngineError;
use crate::model::CausalLm;

#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) dim: usize,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) ffn: usize,
    pub(super) vocab: usize,
    pub(super) eps: f32,
    pub(super) rope: RopeStyle,
    /// RoPE frequency of each rotated pair, one table per variant (global, sliding-window).
    pub(super) rope_tables: Vec<Vec<f32>>,
    pub(super) rope_mscale: f32,
    pub(super) attn_scale: f32,
    pub(super) attn_softcap: Option<f32>,
    pub(super) final_softcap: Option<f32>,
    pub(super) embed_scale: Option<f32>,
    pub(super) ffn_act: FfnAct,
    pub(super) max_positions: usize,
}

impl Config {
    pub(super) fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub(super) fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// The Q/K/V products: three matrices, or one with the three stacked (Phi-3).
#[derive(Clone, Copy)]
enum Qkv {
    Split([Mat; 3]),
    Fused(Mat),
}

impl Qkv {
    fn mats(&self) -> &[Mat] {
        match self {
            Qkv::Split(m) => m,
            Qkv::Fused(m) => std::slice::from_ref(m),
        }
    }
}

/// The gate and up products: two matrices, or one with both stacked, gate first (Phi-3).
#[derive(Clone, Copy)]
enum GateUp {
    Split([Mat; 2]),
    Fused(Mat),
}

impl GateUp {
    fn mats(&self) -> &[Mat] {
        match self {
            GateUp::Split(m) => m,
            GateUp::Fused(m) => std::slice::from_ref(m),
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Qkv,
    wo: Mat,
    ffn_norm: Vec<f32>,
    gate_up: GateUp,
    down: Mat,
    /// Q, K and V biases (qwen2).
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head norms of queries and keys (qwen3, gemma3).
    qk_norm: Option<[Vec<f32>; 2]>,
    /// Norms of the attention and FFN outputs before their residual adds (gemma).
    post_norms: Option<[Vec<f32>; 2]>,
    /// The sliding window of a local layer.
    window: Option<usize>,
    rope_table: usize,
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

/// A copy of the first positions of a sequence's KV cache, kept by the prompt cache to be put
/// back into any sequence later ([`CpuLlama::save_prefix`], [`CpuLlama::restore_prefix`]).
pub(crate) struct KvPrefix {
    len: usize,
    /// Per layer and KV head (as in [`KvCache`]), `len` positions of keys, then of values.
    data: Vec<f32>,
}

impl KvPrefix {
    pub(crate) fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
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
    /// A block's output before its post-norm (gemma).
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Products of a batch, `[row][token]`, before they are transposed into place.
    batch: Vec<f32>,
    /// Each token's position.
    positions: Vec<usize>,
    act: Activations,
    /// Per RoPE table, each token's cosines and sines.
    cos: Vec<f32>,
    sin: Vec<f32>,
    logits: Vec<f32>,
}

/// A GGUF model of one of the [`ARCHITECTURES`] run by the engine's own CPU kernels.
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

/// Checks a step's `batch` before anything is computed, the same for both forward paths: each
/// entry names a sequence held (`cached(seq)` gives its cached positions) once, starts at or
/// before its cached end, stays within `max_positions` and holds tokens of the vocabulary.
pub(crate) fn check_batch(
    batch: &[SeqTokens<'_>],
    held: usize,
    cached: impl Fn(usize) -> Option<usize>,
    max_positions: usize,
    vocab: usize,
) -> Result<(), EngineError> {
    if batch.is_empty() || batch.iter().any(|e| e.tokens.is_empty()) {
        return Err(EngineError::EmptyPrompt);
    }
    for (i, e) in batch.iter().enumerate() {
        let Some(cached) = cached(e.seq) else {
            return Err(EngineError::Inference(format!(
                "sequence {} is beyond the {held} held",
                e.seq
            )));
        };
        if batch[..i].iter().any(|o| o.seq == e.seq) {
            return Err(EngineError::Inference(format!(
                "sequence {} is fed twice in one step",
                e.seq
            )));
        }
        if e.pos > cached {
            return Err(EngineError::Inference(format!(
                "position {} does not follow the {cached} cached positions",
                e.pos
            )));
        }
        if e.pos + e.tokens.len() > max_positions {
            return Err(EngineError::Inference(format!(
                "{} positions exceed the context of {max_positions}",
                e.pos + e.tokens.len()
            )));
        }
        if let Some(&tok) = e.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Inference(format!(
                "token {tok} is outside the vocabulary of {vocab}"
            )));
        }
    }
    Ok(())
}

/// What the CPU path needs from the file, checked before any weight is read.
pub(crate) struct Plan {
    cfg: Config,
    rope_global: RopeParams,
    rope_local: Option<RopeParams>,
    rope_factors: Option<VecRef>,
    embd: Mat,
    layers: Vec<LayerPlan>,
    out_norm: VecRef,
    output: Mat,
}

struct LayerPlan {
    attn_norm: VecRef,
    ffn_norm: VecRef,
    qkv: Qkv,
    wo: Mat,
    gate_up: GateUp,
    down: Mat,
    qkv_bias: Option<[VecRef; 3]>,
    qk_norm: Option<[VecRef; 2]>,
    post_norms: Option<[VecRef; 2]>,
    window: Option<usize>,
    rope_table: usize,
}

impl LayerPlan {
    fn mats_mut(&mut self) -> impl Iterator<Item = &mut Mat> {
        let qkv: &mut [Mat] = match &mut self.qkv {
            Qkv::Split(m) => m,
            Qkv::Fused(m) => std::slice::from_mut(m),
        };
        let gate_up: &mut [Mat] = match &mut self.gate_up {
            GateUp::Split(m) => m,
            GateUp::Fused(m) => std::slice::from_mut(m),
        };
        qkv.iter_mut()
            .chain(gate_up)
            .chain([&mut self.wo, &mut self.down])
    }
}

impl Plan {
    /// The plan of what gguf-info's [`Layout`] of the file says the CPU path reads: the
    /// decision whether the path takes a file is that layout's, the one the hive asks too.
    /// `max_positions` is the context it will run with.
    pub(crate) fn new(
        header: &gguf_info::Header,
        max_positions: usize,
    ) -> Result<Plan, Unsupported> {
        let l = layout::Layout::read(header, max_positions)?;
        let h = l.hyper;
        let mut layers = Vec::with_capacity(l.layers.len());
        for (ll, lh) in l.layers.iter().zip(&h.layers) {
            let qkv = match &ll.qkv {
                layout::Qkv::Split([q, k, v]) => {
                    Qkv::Split([Mat::of(q)?, Mat::of(k)?, Mat::of(v)?])
                }
                layout::Qkv::Fused(m) => Qkv::Fused(Mat::of(m)?),
            };
            let gate_up = match &ll.gate_up {
                layout::GateUp::Split([g, u]) => GateUp::Split([Mat::of(g)?, Mat::of(u)?]),
                layout::GateUp::Fused(m) => GateUp::Fused(Mat::of(m)?),
            };
            let pair =
                |v: &Option<[layout::TensorRef; 2]>| -> Result<Option<[VecRef; 2]>, Unsupported> {
                    v.as_ref()
                        .map(|[a, b]| Ok([VecRef::of(a)?, VecRef::of(b)?]))
                        .transpose()
                };
            let qkv_bias = match &ll.qkv_bias {
                Some([q, k, v]) => Some([VecRef::of(q)?, VecRef::of(k)?, VecRef::of(v)?]),
                None => None,
            };
            layers.push(LayerPlan {
                attn_norm: VecRef::of(&ll.attn_norm)?,
                ffn_norm: VecRef::of(&ll.ffn_norm)?,
                qkv,
                wo: Mat::of(&ll.wo)?,
                gate_up,
                down: Mat::of(&ll.down)?,
                qkv_bias,
                qk_norm: pair(&ll.qk_norm)?,
                post_norms: pair(&ll.post_norms)?,
                window: lh.window,
                rope_table: lh.rope_table,
            });
        }
        Ok(Plan {
            rope_global: h.rope_global,
            rope_local: h.rope_local,
            rope_factors: l.rope_factors.as_ref().map(VecRef::of).transpose()?,
            cfg: Config {
                dim: h.dim,
                n_heads: h.n_heads,
                n_kv_heads: h.n_kv_heads,
                head_dim: h.head_dim,
                ffn: l.ffn,
                vocab: l.embd.rows,
                eps: h.eps,
                rope: h.rope,
                rope_tables: Vec::new(),
                rope_mscale: h.rope_mscale,
                attn_scale: h.attn_scale,
                attn_softcap: h.attn_softcap,
                final_softcap: h.final_softcap,
                embed_scale: h.embed_scale,
                ffn_act: h.ffn_act,
                max_positions,
            },
            embd: Mat::of(&l.embd)?,
            layers,
            out_norm: VecRef::of(&l.out_norm)?,
            output: Mat::of(&l.output)?,
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
                for m in l.mats_mut() {
                    m.tile(&mut data, &kernels, &mut scratch);
                }
                let read = |v: VecRef| v.read(&data);
                Layer {
                    qkv_bias: l.qkv_bias.map(|b| b.map(read)),
                    qk_norm: l.qk_norm.map(|b| b.map(read)),
                    post_norms: l.post_norms.map(|b| b.map(read)),
                    attn_norm: read(l.attn_norm),
                    ffn_norm: read(l.ffn_norm),
                    qkv: l.qkv,
                    wo: l.wo,
                    gate_up: l.gate_up,
                    down: l.down,
                    window: l.window,
                    rope_table: l.rope_table,
                }
            })
            .collect();
        let mut cfg = self.cfg;
        let factors = self.rope_factors.map(|f| f.read(&data));
        cfg.rope_tables = std::iter::once(self.rope_global.table(cfg.head_dim, factors.as_deref()))
            .chain(self.rope_local.map(|r| r.table(cfg.head_dim, None)))
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
            cfg,
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

    /// Forgets every cached position of sequence 0.
    #[cfg(test)]
    pub(crate) fn reset(&mut self) -> Result<(), EngineError> {
        self.caches[0].len = 0;
        Ok(())
    }

    /// Bytes one position takes in a sequence's KV cache (keys and values of every layer).
    pub(crate) fn kv_bytes_per_position(&self) -> usize {
        2 * self.layers.len() * self.cfg.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Positions sequence `seq`'s cache holds.
    pub(crate) fn cached_positions(&self, seq: usize) -> usize {
        self.caches.get(seq).map_or(0, |c| c.len)
    }

    /// A copy of the first `len` positions of sequence `seq`'s cache (fewer if it holds fewer).
    pub(crate) fn save_prefix(&self, seq: usize, len: usize) -> Result<KvPrefix, EngineError> {
        let hd = self.cfg.head_dim;
        let Some(cache) = self.caches.get(seq) else {
            return Ok(KvPrefix {
                len: 0,
                data: Vec::new(),
            });
        };
        let len = len.min(cache.len);
        let mut data = Vec::new();
        data.try_reserve_exact(2 * cache.k.len() * len * hd)
            .map_err(|e| EngineError::Inference(format!("cannot keep a prompt prefix: {e}")))?;
        for (k, v) in cache.k.iter().zip(&cache.v) {
            data.extend_from_slice(&k[..len * hd]);
            data.extend_from_slice(&v[..len * hd]);
        }
        Ok(KvPrefix { len, data })
    }

    /// Makes the first `len` positions of `prefix` (at most its length) the whole content of
    /// sequence `seq`'s cache.
    pub(crate) fn restore_prefix(
        &mut self,
        seq: usize,
        prefix: &KvPrefix,
        len: usize,
    ) -> Result<(), EngineError> {
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let heads = self.layers.len() * cfg.n_kv_heads;
        let len = len.min(prefix.len).min(cfg.max_positions);
        let Some(cache) = self.caches.get_mut(seq) else {
            return Err(EngineError::Inference(format!(
                "sequence {seq} is beyond the {} held",
                self.caches.len()
            )));
        };
        if prefix.data.len() != 2 * heads * prefix.len * hd {
            return Err(EngineError::Inference(
                "a stored prompt prefix does not fit this model".into(),
            ));
        }
        cache.len = 0;
        cache.k.resize_with(heads, Vec::new);
        cache.v.resize_with(heads, Vec::new);
        let run = prefix.len * hd;
        for (h, (k, v)) in cache.k.iter_mut().zip(&mut cache.v).enumerate() {
            let at = 2 * h * run;
            k.clear();
            v.clear();
            reserve_context(k, cfg)?;
            reserve_context(v, cfg)?;
            k.extend_from_slice(&prefix.data[at..at + len * hd]);
            v.extend_from_slice(&prefix.data[at + run..at + run + len * hd]);
        }
        cache.len = len;
        Ok(())
    }

    /// Feeds every entry of `batch` in one pass (their tokens share each matrix product, and
    /// each attends over its own sequence's cache); returns the last position's logits of each
    /// entry, `[entry][vocab]`.
    pub(crate) fn step(&mut self, batch: &[SeqTokens<'_>]) -> Result<&[f32], EngineError> {
        let cfg = &self.cfg;
        check_batch(
            batch,
            self.caches.len(),
            |seq| self.caches.get(seq).map(|c| c.len),
            cfg.max_positions,
            cfg.vocab,
        )?;
        let n: usize = batch.iter().map(|e| e.tokens.len()).sum();
        let entries = batch.len();
        let (dim, q_dim, kv_dim, ffn, hd) =
            (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn, cfg.head_dim);
        let n_layers = self.layers.len();
        let s = &mut self.s;
        s.x.resize(n * dim, 0.0);
        s.xn.resize(n * dim, 0.0);
        s.q.resize(n * q_dim, 0.0);
        s.k.resize(n * kv_dim, 0.0);
        s.v.resize(n * kv_dim, 0.0);
        s.att.resize(n * q_dim, 0.0);
        s.gate.resize(n * ffn, 0.0);
        s.up.resize(n * ffn, 0.0);
        s.logits.resize(entries * cfg.vocab, 0.0);
        let half = hd / 2;
        let table_len = n * half;
        s.cos.resize(cfg.rope_tables.len() * table_len, 0.0);
        s.sin.resize(cfg.rope_tables.len() * table_len, 0.0);
        let work = s.att_layout.plan(
            cfg,
            self.pool.threads(),
            batch.iter().map(|e| (e.pos, e.tokens.len())),
        );
        if let Some(more) = work.checked_sub(s.att_heads.len()) {
            s.att_heads.try_reserve(more).map_err(|_| {
                EngineError::Inference(format!(
                    "cannot allocate {} MiB for the attention of this step",
                    (work * 4) >> 20
                ))
            })?;
        }
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
            let x = &mut s.x[t * dim..(t + 1) * dim];
            dequantize_row(self.embd.ty, self.embd.row(&self.data, tok as usize), x);
            if let Some(scale) = cfg.embed_scale {
                x.iter_mut().for_each(|v| *v *= scale);
            }
            for (table, freqs) in cfg.rope_tables.iter().enumerate() {
                let at = table * table_len + t * half;
                for (i, f) in freqs.iter().enumerate() {
                    let angle = p as f32 * f;
                    s.cos[at + i] = angle.cos() * cfg.rope_mscale;
                    s.sin[at + i] = angle.sin() * cfg.rope_mscale;
                }
            }
        }

        let mm = MatMul {
            data: &self.data,
            kernels: &self.kernels,
            pool: &self.pool,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, cfg.eps, &mut s.xn);
            let qkv = layer.qkv.mats();
            s.act.set(&s.xn, dim, &formats(qkv));
            // One parallel section for the three products.
            mm.run_fused(qkv, &s.act, &mut s.batch);
            unstack(&s.batch, n, &mut [&mut s.q[..], &mut s.k[..], &mut s.v[..]]);
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                add_rows(&mut s.q, bq);
                add_rows(&mut s.k, bk);
                add_rows(&mut s.v, bv);
            }
            if let Some([nq, nk]) = &layer.qk_norm {
                rms_norm_in_place(&mut s.q, nq, cfg.eps);
                rms_norm_in_place(&mut s.k, nk, cfg.eps);
            }
            let table = layer.rope_table * table_len..(layer.rope_table + 1) * table_len;
            let (cos, sin) = (&s.cos[table.clone()], &s.sin[table]);
            rope(&mut s.q, hd, cfg.rope, cos, sin);
            rope(&mut s.k, hd, cfg.rope, cos, sin);
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
                    reserve_context(k_head, cfg)?;
                    reserve_context(v_head, cfg)?;
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
            let shape = HeadShape {
                scale: cfg.attn_scale,
                softcap: cfg.attn_softcap,
                window: layer.window,
            };
            attention(
                cfg,
                shape,
                &self.kernels,
                &self.pool,
                layout,
                &s.q,
                &kv,
                &mut s.att_heads,
            );
            layout.gather(&s.att_heads, &mut s.att);
            s.act.set(&s.att, q_dim, &formats(&[layer.wo]));
            add_block_output(
                &mm,
                &layer.wo,
                layer.post_norms.as_ref().map(|[a, _]| a),
                cfg.eps,
                s,
            );

            rms_norm(&s.x, &layer.ffn_norm, cfg.eps, &mut s.xn);
            let gate_up = layer.gate_up.mats();
            s.act.set(&s.xn, dim, &formats(gate_up));
            mm.run_fused(gate_up, &s.act, &mut s.batch);
            unstack(&s.batch, n, &mut [&mut s.gate[..], &mut s.up[..]]);
            gated_activation(&self.pool, cfg.ffn_act, &mut s.gate, &s.up);
            s.act.set(&s.gate, ffn, &formats(&[layer.down]));
            add_block_output(
                &mm,
                &layer.down,
                layer.post_norms.as_ref().map(|[_, b]| b),
                cfg.eps,
                s,
            );
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
        if let Some(cap) = cfg.final_softcap {
            for v in &mut s.logits {
                *v = (*v / cap).tanh() * cap;
            }
        }
        Ok(&s.logits)
    }
}

/// Room in one head's keys or values for the whole context at once: pages are touched only as
/// positions fill them, and the cache never grows past what the hive's capacity check counted
/// (amortized doubling would).
fn reserve_context(head: &mut Vec<f32>, cfg: &Config) -> Result<(), EngineError> {
    let room = cfg.max_positions.saturating_mul(cfg.head_dim);
    if head.capacity() < room {
        head.try_reserve_exact(room - head.len()).map_err(|e| {
            EngineError::Inference(format!(
                "cannot set aside a KV cache of {} positions: {e}",
                cfg.max_positions
            ))
        })?;
    }
    Ok(())
}

/// `gate = act(gate) × up`, over the pool: the gate of a step is `tokens × ffn` values.
fn gated_activation(pool: &Pool, act: FfnAct, gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 2048;
    pool.for_each_chunk_mut(gate, CHUNK, &|c, part| {
        let up = &up[c * CHUNK..c * CHUNK + part.len()];
        match act {
            FfnAct::Silu => {
                for (g, u) in part.iter_mut().zip(up) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            }
            FfnAct::Gelu => {
                for (g, u) in part.iter_mut().zip(up) {
                    *g = gelu(*g) * u;
                }
            }
        }
    });
}

/// Adds the product of `m` and the activations in `s.act` to the residual stream `s.x`:
/// straight into it, or, where the block has a post-norm (gemma), normed first.
fn add_block_output(
    mm: &MatMul<'_>,
    m: &Mat,
    post_norm: Option<&Vec<f32>>,
    eps: f32,
    s: &mut Scratch,
) {
    let Scratch {
        act,
        x,
        xn,
        out,
        batch,
        ..
    } = s;
    let Some(norm) = post_norm else {
        mm.run(m, act, x, batch, true);
        return;
    };
    out.resize(x.len(), 0.0);
    mm.run(m, act, out, batch, false);
    rms_norm(out, norm, eps, xn);
    for (x, o) in x.iter_mut().zip(xn.iter()) {
        *x += o;
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
    fn hold_sequences(&mut self, n: usize) -> usize {
        self.set_sequences(n);
        self.caches.len()
    }

    fn feed(&mut self, batch: &[SeqTokens<'_>]) -> Result<Vec<f32>, EngineError> {
        self.step(batch).map(<[f32]>::to_vec)
    }

    fn prefix_cache(&mut self) -> Option<&mut CpuLlama> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
