//! The llama block written with candle's ops, for every device candle runs on (CUDA, Metal, the
//! CPU): llama and qwen2 GGUF files that the engine's CPU path does not take, and safetensors
//! llama checkpoints.
//!
//! It computes what candle's own model code computes (`quantized_llama`, `quantized_qwen2`,
//! `llama`: the same tensors, operations and order, so one sequence's logits are those of that
//! code), but holds one KV cache per sequence and feeds several sequences in one step. Their
//! tokens are packed into one row block for the embedding, the norms, the Q/K/V and output
//! projections and the MLP, where one read of each weight matrix serves every row; RoPE and
//! attention run per sequence, against its own cache at its own positions.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear};
use candle_transformers::utils::{build_causal_mask, repeat_kv};

use super::CausalLm;
use crate::EngineError;
use crate::cpu::SeqTokens;

/// How RoPE pairs a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rope {
    /// Dimensions `2i` and `2i + 1`: llama GGUF files, whose Q and K rows llama.cpp's
    /// converter permuted into that order.
    Interleaved,
    /// Dimensions `i` and `i + d/2`: Hugging Face checkpoints, and qwen2 GGUF files.
    Halves,
}

/// A weight matrix: a GGUF tensor (quantized, or dequantized by candle for float types) or a
/// dense safetensors one. Both multiply rows of any leading shape.
pub(super) enum Matrix {
    Gguf(QMatMul),
    Dense(Linear),
}

impl Matrix {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Matrix::Gguf(m) => m.forward(x),
            Matrix::Dense(m) => m.forward(x),
        }
    }
}

pub(super) struct Layer {
    pub attn_norm: Tensor,
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    /// Biases of Q, K and V (qwen2).
    pub qkv_bias: Option<[Tensor; 3]>,
    pub o: Matrix,
    pub ffn_norm: Tensor,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

pub(super) struct Config {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub rope: Rope,
    /// Decode steps on Metal use candle's fused attention, as `quantized_llama` does there.
    pub metal_sdpa: bool,
}

pub(super) struct Weights {
    /// `[vocab, hidden]`, in the type the activations are computed in.
    pub embedding: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub output: Matrix,
}

/// RoPE's inverse frequencies for heads of `dim` dimensions, as candle's models compute them.
pub(super) fn inverse_frequencies(dim: usize, base: f32) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / dim as f32))
        .collect()
}

/// Keys and values of one sequence: per layer, `[1, kv_heads, positions, head_dim]` each.
#[derive(Default)]
struct SeqCache {
    len: usize,
    layers: Vec<Option<(Tensor, Tensor)>>,
}

/// A llama-family model on candle's ops, holding several sequences.
pub(crate) struct CandleLlama {
    cfg: Config,
    w: Weights,
    embedding: Embedding,
    /// `[positions, rope_dim / 2]`, for every position the model holds.
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    device: Device,
    caches: Vec<SeqCache>,
}

impl CandleLlama {
    /// A model holding one sequence of up to `positions` positions, with RoPE frequencies
    /// `inv_freq`, its tables in `dtype`.
    pub(super) fn new(
        cfg: Config,
        w: Weights,
        inv_freq: &[f32],
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if inv_freq.len() * 2 != cfg.head_dim {
            candle_core::bail!(
                "RoPE covers {} dimensions of heads of {}",
                inv_freq.len() * 2,
                cfg.head_dim
            );
        }
        let theta = Tensor::new(inv_freq, device)?;
        let angles = Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?
            .matmul(&theta.reshape((1, theta.elem_count()))?)?;
        let hidden = w.embedding.dim(1)?;
        Ok(CandleLlama {
            embedding: Embedding::new(w.embedding.clone(), hidden),
            cfg,
            w,
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            neg_inf: Tensor::new(f32::NEG_INFINITY, device)?,
            device: device.clone(),
            caches: vec![SeqCache::default()],
        })
    }

    fn positions(&self) -> usize {
        self.cos.dims()[0]
    }

    fn check(&self, batch: &[SeqTokens<'_>]) -> Result<(), EngineError> {
        crate::cpu::check_batch(
            batch,
            self.caches.len(),
            |seq| self.caches.get(seq).map(|c| c.len),
            self.positions(),
            self.w.embedding.dims()[0],
        )
    }

    /// The forward pass over the packed tokens of `batch` (checked); the last position's logits
    /// of each entry, `[entry, vocab]`.
    fn forward(&mut self, batch: &[SeqTokens<'_>]) -> candle_core::Result<Tensor> {
        let CandleLlama {
            cfg,
            w,
            embedding,
            cos,
            sin,
            neg_inf,
            device,
            caches,
        } = self;
        let ids: Vec<u32> = batch
            .iter()
            .flat_map(|e| e.tokens.iter().copied())
            .collect();
        let total = ids.len();
        let mut x = embedding.forward(&Tensor::from_vec(ids, (1, total), device)?)?;
        let eps = cfg.eps as f32;
        for (l, layer) in w.layers.iter().enumerate() {
            let residual = &x;
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut q = layer.q.forward(&xn)?;
            let mut k = layer.k.forward(&xn)?;
            let mut v = layer.v.forward(&xn)?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let mut heads = Vec::with_capacity(batch.len());
            let mut start = 0;
            for e in batch {
                let n = e.tokens.len();
                let cache = &mut caches[e.seq];
                if cache.layers.len() != w.layers.len() {
                    cache.layers.resize_with(w.layers.len(), || None);
                }
                heads.push(attend(
                    cfg,
                    (cos, sin, neg_inf),
                    &mut cache.layers[l],
                    e.pos,
                    [
                        &q.narrow(1, start, n)?,
                        &k.narrow(1, start, n)?,
                        &v.narrow(1, start, n)?,
                    ],
                )?);
                start += n;
            }
            let y = match heads.len() {
                1 => heads.pop().expect("one entry"),
                _ => Tensor::cat(&heads, 1)?,
            };
            let x1 = (layer.o.forward(&y)? + residual)?;
            let xn = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, eps)?;
            let gate = layer.gate.forward(&xn)?;
            let up = layer.up.forward(&xn)?;
            let mlp = layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (mlp + x1)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &w.norm, eps)?;
        let mut end = 0u32;
        let last: Vec<u32> = batch
            .iter()
            .map(|e| {
                end += e.tokens.len() as u32;
                end - 1
            })
            .collect();
        let last = Tensor::new(last.as_slice(), device)?;
        let rows = x.squeeze(0)?.index_select(&last, 0)?.contiguous()?;
        w.output.forward(&rows)?.to_dtype(DType::F32)
    }
}

/// Attention of one sequence's `n` new positions from `pos` (`[1, n, heads × head_dim]` of Q,
/// K and V), against what `cache` holds before `pos`, which then holds these too. Returns
/// `[1, n, heads × head_dim]`.
fn attend(
    cfg: &Config,
    (cos, sin, neg_inf): (&Tensor, &Tensor, &Tensor),
    cache: &mut Option<(Tensor, Tensor)>,
    pos: usize,
    [q, k, v]: [&Tensor; 3],
) -> candle_core::Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    let hd = cfg.head_dim;
    let q = q
        .reshape((b, n, cfg.n_heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let k = k
        .reshape((b, n, cfg.n_kv_heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let v = v
        .reshape((b, n, cfg.n_kv_heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let cos = cos.narrow(0, pos, n)?;
    let sin = sin.narrow(0, pos, n)?;
    let rope = |x: &Tensor| match cfg.rope {
        Rope::Interleaved => candle_nn::rotary_emb::rope_i(x, &cos, &sin),
        Rope::Halves => candle_nn::rotary_emb::rope(x, &cos, &sin),
    };
    let q = rope(&q)?;
    let k = rope(&k)?;
    let (k, v) = match cache.take() {
        Some((ck, cv)) if pos > 0 => (
            Tensor::cat(&[&ck.narrow(2, 0, pos)?, &k], 2)?,
            Tensor::cat(&[&cv.narrow(2, 0, pos)?, &v], 2)?,
        ),
        _ => (k, v),
    };
    *cache = Some((k.clone(), v.clone()));

    let y = if cfg.metal_sdpa && q.device().is_metal() && n == 1 {
        // Grouped-query attention is handled inside the fused kernel.
        let scale = 1. / (hd as f32).sqrt();
        candle_nn::ops::sdpa(&q, &k, &v, None, false, scale, 1.)?
    } else {
        let rep = cfg.n_heads / cfg.n_kv_heads;
        let k = repeat_kv(k, rep)?;
        let v = repeat_kv(v, rep)?;
        // Scores and their softmax in f32 whatever the activations' type, as candle's llama.
        let in_dtype = q.dtype();
        let q = q.to_dtype(DType::F32)?;
        let k = k.to_dtype(DType::F32)?;
        let v = v.to_dtype(DType::F32)?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = if n == 1 {
            att
        } else {
            let mask = build_causal_mask(n, pos, q.device())?.broadcast_as(att.shape())?;
            mask.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v.contiguous()?)?.to_dtype(in_dtype)?
    };
    y.transpose(1, 2)?.reshape((b, n, cfg.n_heads * hd))
}

impl CausalLm for CandleLlama {
    fn hold_sequences(&mut self, n: usize) -> usize {
        self.caches.resize_with(n.max(1), SeqCache::default);
        self.caches.len()
    }

    fn feed(&mut self, batch: &[SeqTokens<'_>]) -> Result<Vec<f32>, EngineError> {
        self.check(batch)?;
        let device = self.device.clone();
        // On the CPU, `with_context` runs the pass inside candle's own thread pool, which keeps
        // its workers warm between the many small parallel sections of a forward pass.
        let logits = device.with_context(|| self.forward(batch)?.flatten_all()?.to_vec1::<f32>());
        match logits {
            Ok(logits) => {
                for e in batch {
                    self.caches[e.seq].len = e.pos + e.tokens.len();
                }
                Ok(logits)
            }
            Err(err) => {
                // A layer may have cached the step's positions before a later one failed:
                // those sequences start over.
                for e in batch {
                    self.caches[e.seq] = SeqCache::default();
                }
                Err(EngineError::inference(err))
            }
        }
    }
}
