//! The pieces of the forward pass between the matrix products' kernels and the model: the
//! products over the thread pool (one token or a batch), RMSNorm, RoPE and causal attention.

use super::forward::Config;
use super::kernels::tiled::TILE_ROWS;
use super::kernels::{Activations, Kernels};
use super::pool::Pool;
use super::quant::ActFormat;
use super::weights::Mat;

/// The distinct activation formats `mats` consume (at most three), without allocating.
pub(super) fn formats(mats: &[Mat]) -> Formats {
    let mut out = Formats {
        list: [ActFormat::F32; 3],
        len: 0,
    };
    for m in mats {
        let f = m.ty.act_format();
        if !out.list[..out.len].contains(&f) {
            out.list[out.len] = f;
            out.len += 1;
        }
    }
    out
}

pub(super) struct Formats {
    list: [ActFormat; 3],
    len: usize,
}

impl std::ops::Deref for Formats {
    type Target = [ActFormat];
    fn deref(&self) -> &[ActFormat] {
        &self.list[..self.len]
    }
}

/// Matrix products over the pool.
pub(super) struct MatMul<'a> {
    pub data: &'a [u8],
    pub kernels: &'a Kernels,
    pub pool: &'a Pool,
}

/// Rows per unit of work for a product with `rows` rows: enough chunks that a thread the OS
/// takes away holds up little work, no fewer rows than keep the per-chunk overhead small, and a
/// multiple of the tile height so that chunks do not split tiles.
fn rows_per_chunk(rows: usize, threads: usize) -> usize {
    (rows / (threads * 16)).clamp(TILE_ROWS, 64) / TILE_ROWS * TILE_ROWS
}

impl MatMul<'_> {
    /// Rows `r0..r0 + n` of `m` against token `t` of `act`: `emit(k, row r0 + k · act[t])`.
    /// Whole tiles of a tiled matrix go through the tile kernels.
    #[inline]
    fn rows(
        &self,
        m: &Mat,
        r0: usize,
        n: usize,
        act: &Activations,
        t: usize,
        emit: &mut impl FnMut(usize, f32),
    ) {
        let (data, kernels) = (self.data, self.kernels);
        if !m.tiled {
            for k in 0..n {
                emit(k, kernels.dot(m.ty, m.row(data, r0 + k), act, t));
            }
            return;
        }
        let mut k = 0;
        while k < n {
            let r = r0 + k;
            let tile = m.tile_at(data, r / TILE_ROWS);
            if r.is_multiple_of(TILE_ROWS) && k + TILE_ROWS <= n {
                for (lane, v) in kernels.dot_tile(m.ty, tile, act, t).into_iter().enumerate() {
                    emit(k + lane, v);
                }
                k += TILE_ROWS;
            } else {
                emit(k, kernels.dot_tile_lane(m.ty, tile, r % TILE_ROWS, act, t));
                k += 1;
            }
        }
    }

    /// `out = [m₀; m₁; …] · act`: the matrices' rows stacked, in one parallel section, for
    /// every token of `act`. `out` grows to the total row count times the tokens and holds, per
    /// stacked row, one value per token (`[row][token]`; for one token simply the rows).
    pub(super) fn run_fused(&self, mats: &[Mat], act: &Activations, out: &mut Vec<f32>) {
        let n = act.tokens();
        let total: usize = mats.iter().map(|m| m.rows).sum();
        out.resize(total * n, 0.0);
        let rpc = rows_per_chunk(total, self.pool.threads());
        self.pool
            .for_each_chunk_mut(&mut out[..], rpc * n, &|c, part| {
                // The matrix holding global row `c * rpc`, and that row's index in it.
                let mut r = c * rpc;
                let mut mi = 0;
                while r >= mats[mi].rows {
                    r -= mats[mi].rows;
                    mi += 1;
                }
                let rows = part.len() / n;
                let mut done = 0;
                while done < rows {
                    let m = &mats[mi];
                    let k = (m.rows - r).min(rows - done);
                    let seg = &mut part[done * n..(done + k) * n];
                    if n == 1 {
                        self.rows(m, r, k, act, 0, &mut |i, v| seg[i] = v);
                    } else {
                        self.batch_rows(m, r, act, seg);
                    }
                    done += k;
                    r = 0;
                    mi += 1;
                }
            });
    }

    /// `out[t][r] (+)= m[r] · act[t]` for every token `t` of `act` and row `r` of `m`.
    pub(super) fn run(
        &self,
        m: &Mat,
        act: &Activations,
        out: &mut [f32],
        batch: &mut Vec<f32>,
        accumulate: bool,
    ) {
        let n = act.tokens();
        let rpc = rows_per_chunk(m.rows, self.pool.threads());
        if n == 1 {
            self.pool
                .for_each_chunk_mut(&mut out[..m.rows], rpc, &|c, part| {
                    self.rows(m, c * rpc, part.len(), act, 0, &mut |k, v| {
                        if accumulate {
                            part[k] += v;
                        } else {
                            part[k] = v;
                        }
                    });
                });
            return;
        }
        batch.resize(m.rows * n, 0.0);
        self.pool
            .for_each_chunk_mut(&mut batch[..], rpc * n, &|c, part| {
                self.batch_rows(m, c * rpc, act, part);
            });
        let out = &mut out[..n * m.rows];
        if accumulate {
            transpose(batch, n, out, |o, v| *o += v);
        } else {
            transpose(batch, n, out, |o, v| *o = v);
        }
    }

    /// Rows `r0..` of `m` against every token of `act`, into `part` (row-major, one row of
    /// `tokens` values per weight row): four tokens per kernel call where the type has a
    /// four-token kernel, whole tiles through the tile kernels.
    fn batch_rows(&self, m: &Mat, r0: usize, act: &Activations, part: &mut [f32]) {
        let (data, kernels, ty) = (self.data, self.kernels, m.ty);
        let n = act.tokens();
        let rows = part.len() / n;
        let mut k = 0;
        while k < rows {
            let r = r0 + k;
            if m.tiled && r.is_multiple_of(TILE_ROWS) && k + TILE_ROWS <= rows {
                let tile = m.tile_at(data, r / TILE_ROWS);
                let out = &mut part[k * n..(k + TILE_ROWS) * n];
                let mut t = 0;
                while t + 4 <= n {
                    for (j, lanes) in kernels.dot_tile4(m.ty, tile, act, t).iter().enumerate() {
                        for (lane, v) in lanes.iter().enumerate() {
                            out[lane * n + t + j] = *v;
                        }
                    }
                    t += 4;
                }
                for t in t..n {
                    for (lane, v) in kernels.dot_tile(m.ty, tile, act, t).into_iter().enumerate() {
                        out[lane * n + t] = v;
                    }
                }
                k += TILE_ROWS;
                continue;
            }
            let row_out = &mut part[k * n..(k + 1) * n];
            if m.tiled {
                let tile = m.tile_at(data, r / TILE_ROWS);
                for (t, o) in row_out.iter_mut().enumerate() {
                    *o = kernels.dot_tile_lane(m.ty, tile, r % TILE_ROWS, act, t);
                }
                k += 1;
                continue;
            }
            let row = m.row(data, r);
            let mut t = 0;
            while t + 4 <= n {
                match kernels.dot4(ty, row, act, t) {
                    Some(four) => row_out[t..t + 4].copy_from_slice(&four),
                    None => break,
                }
                t += 4;
            }
            for (j, o) in row_out[t..].iter_mut().enumerate() {
                *o = kernels.dot(ty, row, act, t + j);
            }
            k += 1;
        }
    }
}

/// Rows of `src` per block of [`transpose`]: a block's values (`ROWS × n`) stay in the first
/// cache level while it is read token by token.
const TRANSPOSE_ROWS: usize = 16;

/// `op(dst[t][r], src[r][t])` for every token `t` of `n` and every row `r`: products laid out
/// `[row][token]` into `[token][row]`, a block of rows at a time, so that neither side is read
/// or written with a stride that misses the cache on every value.
#[inline]
pub(super) fn transpose(src: &[f32], n: usize, dst: &mut [f32], op: impl Fn(&mut f32, f32)) {
    let rows = dst.len() / n;
    let mut r0 = 0;
    while r0 < rows {
        let width = TRANSPOSE_ROWS.min(rows - r0);
        let block = &src[r0 * n..(r0 + width) * n];
        for t in 0..n {
            let out = &mut dst[t * rows + r0..t * rows + r0 + width];
            for (o, v) in out.iter_mut().zip(block.iter().skip(t).step_by(n)) {
                op(o, *v);
            }
        }
        r0 += width;
    }
}

/// RMSNorm of each `w.len()`-long row of `x` into `out`, with candle's operation order (divide
/// by the root, then scale) so that the quantized products that follow see the same values.
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (xs, os) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss: f32 = xs.iter().map(|v| v * v).sum();
        let root = (ss / dim as f32 + eps).sqrt();
        for ((o, v), g) in os.iter_mut().zip(xs).zip(w) {
            *o = v / root * g;
        }
    }
}

/// Which elements of a head RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RopeStyle {
    /// Pairs `(2i, 2i + 1)`: GGML's "normal" mode, for llama files (whose q/k rows llama.cpp's
    /// converter permuted to suit it).
    Interleaved,
    /// Pairs `(i, i + head_dim / 2)`: GGML's "neox" mode, for qwen2.
    Halves,
}

/// Rotary embedding of every head of every token in `x`, with the tokens' `cos`/`sin` tables.
pub(super) fn rope(x: &mut [f32], head_dim: usize, style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let tokens = cos.len() / half;
    let width = x.len() / tokens;
    for (t, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            match style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c[i] - b * s[i];
                        pair[1] = a * s[i] + b * c[i];
                    }
                }
                RopeStyle::Halves => {
                    let (lo, hi) = head.split_at_mut(half);
                    for (i, (a, b)) in lo.iter_mut().zip(hi).enumerate() {
                        let (x1, x2) = (*a, *b);
                        *a = x1 * c[i] - x2 * s[i];
                        *b = x2 * c[i] + x1 * s[i];
                    }
                }
            }
        }
    }
}

/// One sequence's share of a step's attention: its tokens' queries `[token][dim]`, at
/// positions `pos..`, over its cache of one layer, which already holds those tokens' keys and
/// values; `k` and `v` hold one `[position][head_dim]` buffer per KV head.
pub(super) struct AttnEntry<'a> {
    pub pos: usize,
    pub q: &'a [f32],
    pub k: &'a [Vec<f32>],
    pub v: &'a [Vec<f32>],
}

impl AttnEntry<'_> {
    fn tokens(&self, dim: usize) -> usize {
        self.q.len() / dim
    }
}

/// Room [`attention`] needs per (entry, head): the head's output `[token][head_dim]` plus one
/// row of scores.
pub(super) fn attention_work(cfg: &Config, entries: &[AttnEntry<'_>]) -> usize {
    entries
        .iter()
        .map(|e| {
            let m = e.tokens(cfg.dim);
            m * cfg.head_dim + e.pos + m
        })
        .max()
        .unwrap_or(0)
}

/// Causal attention of every entry's tokens over its own cache, in one parallel section of one
/// (entry, head) per chunk. Chunk `e * n_heads + h` of `work` (each [`attention_work`] long)
/// receives head `h`'s output for entry `e`'s tokens, `[token][head_dim]`.
pub(super) fn attention(
    cfg: &Config,
    kernels: &Kernels,
    pool: &Pool,
    entries: &[AttnEntry<'_>],
    work: &mut [f32],
) {
    let hd = cfg.head_dim;
    let dim = cfg.dim;
    let per_head = attention_work(cfg, entries);
    let group = cfg.n_heads / cfg.n_kv_heads;
    let work = &mut work[..entries.len() * cfg.n_heads * per_head];
    pool.for_each_chunk_mut(work, per_head, &|c, chunk| {
        let (e, h) = (&entries[c / cfg.n_heads], c % cfg.n_heads);
        let n = e.tokens(dim);
        let head = HeadAttn {
            q: &e.q[h * hd..],
            q_stride: dim,
            head_dim: hd,
            pos: e.pos,
            k: &e.k[h / group],
            v: &e.v[h / group],
        };
        let (out, scores) = chunk.split_at_mut(n * hd);
        (kernels.attend)(&head, out, scores);
    });
}

/// One head's attention for the tokens of one sequence.
pub(crate) struct HeadAttn<'a> {
    /// Token `t`'s query is `q[t * q_stride..][..head_dim]`.
    pub q: &'a [f32],
    pub q_stride: usize,
    pub head_dim: usize,
    /// Position of the first token.
    pub pos: usize,
    /// The head's keys and values, `[position][head_dim]`, through the last token's position.
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Values of the weighted sum that one pass over the keys accumulates in registers.
const OUT_BLOCK: usize = 32;

/// [`HeadAttn`] into `out` (`[token][head_dim]`), with `scores` as room for one row of
/// weights. The softmax is computed as candle computes it (scores, max, exponentials,
/// normalized weights, then the weighted sum of values, each value in position order).
pub(crate) fn attend_head(a: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32]) {
    attend_head_with(a, out, scores, dot_f32);
}

/// [`attend_head`] with `dot` for the query-key products, which must sum in [`dot_f32`]'s
/// order. Written so that the compiler keeps the running sums of the weighted values in vector
/// registers; the x86 kernels compile it once more with AVX2 and an AVX2 `dot`
/// ([`super::kernels::Kernels::attend`]), which gives the same results bit for bit.
#[inline(always)]
pub(crate) fn attend_head_with(
    a: &HeadAttn<'_>,
    out: &mut [f32],
    scores: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let hd = a.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    for (t, o) in out.chunks_exact_mut(hd).enumerate() {
        let q = &a.q[t * a.q_stride..t * a.q_stride + hd];
        let visible = a.pos + t + 1;
        let scores = &mut scores[..visible];
        let mut max = f32::NEG_INFINITY;
        for (sc, k) in scores.iter_mut().zip(a.k.chunks_exact(hd)) {
            *sc = dot(q, k) * scale;
            max = max.max(*sc);
        }
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        for sc in scores.iter_mut() {
            *sc /= sum;
        }
        let mut i0 = 0;
        while i0 < hd {
            let width = OUT_BLOCK.min(hd - i0);
            let mut acc = [0f32; OUT_BLOCK];
            if width == OUT_BLOCK {
                for (w, v) in scores.iter().zip(a.v.chunks_exact(hd)) {
                    let v = &v[i0..i0 + OUT_BLOCK];
                    for i in 0..OUT_BLOCK {
                        acc[i] += w * v[i];
                    }
                }
            } else {
                for (w, v) in scores.iter().zip(a.v.chunks_exact(hd)) {
                    for (acc, v) in acc.iter_mut().zip(&v[i0..i0 + width]) {
                        *acc += w * v;
                    }
                }
            }
            o[i0..i0 + width].copy_from_slice(&acc[..width]);
            i0 += width;
        }
    }
}

/// `a · b` (of equal lengths) over eight interleaved partial sums (lane `i` adds the products
/// of elements `8j + i`), which are then added as halves: lanes `i` and `i + 4`, then `i` and
/// `i + 2`, then 0 and 1; the products of the last `len % 8` elements are added last. One fixed
/// order on every machine and in every batch, and unlike a plain running sum not one chain of
/// dependent additions.
#[inline(always)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (a8, b8) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}
