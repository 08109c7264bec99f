//! Causal grouped-query attention of a step's sequences, each over its own KV cache, in one
//! parallel section per layer with one piece of work per (sequence, head); and the attention of
//! one head ([`attend_head`]), which the kernels compile once more for wider vectors.
//!
//! A sequence's cache holds, per layer and KV head, keys and values `[position][head_dim]`, so
//! a head reads them as two contiguous runs, which the hardware prefetches.

use std::ops::Range;

use super::forward::Config;
use super::kernels::Kernels;
use super::pool::Pool;

/// Where the (entry, head) pairs of a step work: consecutive parts of one buffer, entry by
/// entry and head by head, each the head's output for the entry's tokens (`[token][head_dim]`)
/// followed by room for one row of scores. Each part is as long as its entry needs, so the
/// buffer is the step's outputs plus one row of scores per head and entry. Planned once per
/// step and kept across steps.
#[derive(Default)]
pub(super) struct Layout {
    /// End of each part in the buffer.
    ends: Vec<usize>,
    /// Each entry's first token among the step's, and its position; one more start at the end.
    starts: Vec<usize>,
    positions: Vec<usize>,
    n_heads: usize,
    head_dim: usize,
}

impl Layout {
    /// Plans the parts of entries given as `(first position, tokens)`; returns the buffer's
    /// length.
    pub(super) fn plan(
        &mut self,
        cfg: &Config,
        entries: impl Iterator<Item = (usize, usize)>,
    ) -> usize {
        self.ends.clear();
        self.starts.clear();
        self.positions.clear();
        self.n_heads = cfg.n_heads;
        self.head_dim = cfg.head_dim;
        let (mut end, mut token) = (0, 0);
        for (pos, tokens) in entries {
            self.starts.push(token);
            self.positions.push(pos);
            for _ in 0..cfg.n_heads {
                end += tokens * cfg.head_dim + pos + tokens;
                self.ends.push(end);
            }
            token += tokens;
        }
        self.starts.push(token);
        end
    }

    fn entries(&self) -> usize {
        self.positions.len()
    }

    fn tokens(&self, entry: usize) -> Range<usize> {
        self.starts[entry]..self.starts[entry + 1]
    }

    fn part(&self, entry: usize, head: usize) -> Range<usize> {
        let i = entry * self.n_heads + head;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        start..self.ends[i]
    }

    /// Moves the heads' outputs from `work` into `out`, `[token][dim]`.
    pub(super) fn gather(&self, work: &[f32], out: &mut [f32]) {
        let (hd, dim) = (self.head_dim, self.head_dim * self.n_heads);
        for entry in 0..self.entries() {
            let tokens = self.tokens(entry);
            for head in 0..self.n_heads {
                let part = &work[self.part(entry, head)];
                for (i, t) in tokens.clone().enumerate() {
                    out[t * dim + head * hd..t * dim + (head + 1) * hd]
                        .copy_from_slice(&part[i * hd..(i + 1) * hd]);
                }
            }
        }
    }
}

/// How a layer's heads weigh keys: the scale of the query-key products, the soft cap of the
/// scaled products (`cap · tanh(s / cap)`, gemma 2), and the sliding window of a local layer
/// (a token sees itself and the `window - 1` positions before it).
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadShape {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// Causal attention of every entry of `layout` over its own cache of one layer: `q` holds the
/// step's queries (`[token][n_heads · head_dim]`), and `kv(entry)` gives the entry's keys and values, one
/// `[position][head_dim]` buffer per KV head, which already hold its new tokens. Each head's
/// output lands in its part of `work` (see [`Layout`]; [`Layout::gather`] puts it in place).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention<'a>(
    cfg: &Config,
    shape: HeadShape,
    kernels: &Kernels,
    pool: &Pool,
    layout: &Layout,
    q: &[f32],
    kv: &(dyn Fn(usize) -> (&'a [Vec<f32>], &'a [Vec<f32>]) + Sync),
    work: &mut [f32],
) {
    let (hd, dim) = (cfg.head_dim, cfg.q_dim());
    let group = cfg.n_heads / cfg.n_kv_heads;
    pool.for_each_part_mut(work, &layout.ends, &|c, part| {
        let (entry, h) = (c / cfg.n_heads, c % cfg.n_heads);
        let tokens = layout.tokens(entry);
        let (k, v) = kv(entry);
        let head = HeadAttn {
            q: &q[tokens.start * dim + h * hd..],
            q_stride: dim,
            head_dim: hd,
            pos: layout.positions[entry],
            k: &k[h / group],
            v: &v[h / group],
            scale: shape.scale,
            softcap: shape.softcap.unwrap_or(0.0),
            window: shape.window.unwrap_or(usize::MAX),
        };
        let (out, scores) = part.split_at_mut(tokens.len() * hd);
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
    /// See [`HeadShape`]; a soft cap of 0 is none, a window of `usize::MAX` is none.
    pub scale: f32,
    pub softcap: f32,
    pub window: usize,
}

/// Values of the weighted sum that one pass over the positions accumulates in registers.
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
    let scale = a.scale;
    for (t, o) in out.chunks_exact_mut(hd).enumerate() {
        let q = &a.q[t * a.q_stride..t * a.q_stride + hd];
        let end = a.pos + t + 1;
        let first = end.saturating_sub(a.window);
        let scores = &mut scores[..end - first];
        let (keys, values) = (&a.k[first * hd..end * hd], &a.v[first * hd..end * hd]);
        let mut max = f32::NEG_INFINITY;
        for (sc, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
            *sc = dot(q, k) * scale;
            if a.softcap > 0.0 {
                *sc = (*sc / a.softcap).tanh() * a.softcap;
            }
            max = max.max(*sc);
        }
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = exp_le0(*sc - max);
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
                for (w, v) in scores.iter().zip(values.chunks_exact(hd)) {
                    let v = &v[i0..i0 + OUT_BLOCK];
                    for i in 0..OUT_BLOCK {
                        acc[i] += w * v[i];
                    }
                }
            } else {
                for (w, v) in scores.iter().zip(values.chunks_exact(hd)) {
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

/// `e^x` for `x ≤ 0` (a score minus the row's maximum), within about two units in the last
/// place. The C library's `expf` is a call per score, which a long context pays for every
/// (token, head, position): at a 4k-token prompt, more than the query-key products. This is
/// plain arithmetic the compiler vectorizes, in f32 operations with a fixed order and no fused
/// multiply-adds, so every kernel variant gets the same bits: `x = n·ln 2 + r` with `n`
/// rounded to nearest and `|r| ≤ ln 2 / 2`, `e^r` by Cephes' `expf` polynomial, and `2^n` put in
/// the exponent bits. Below -87 (where `e^x` is under f32's smallest normal) it gives 0.
#[inline(always)]
pub(crate) fn exp_le0(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 · 2^23 rounds to an integer (to nearest, ties to even).
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.0;
    let x = if below { 0.0 } else { x };
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * (r * r) + r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if below { 0.0 } else { y * scale }
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
