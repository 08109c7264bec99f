//! Causal grouped-query attention of a step's sequences, each over its own KV cache, in one
//! parallel section per layer with one piece of work per (sequence, KV head, span of query
//! rows); and the attention of such a span ([`attend_with`]), which the kernels compile once
//! more for wider vectors.
//!
//! A sequence's cache holds, per layer and KV head, keys and values `[position][head_dim]`, so
//! a head reads them as two contiguous runs, which the hardware prefetches. The query rows of
//! one piece of work are its tokens' queries of every head that shares the KV head, taken in
//! tiles: a block of keys (or values) is read from memory once per tile and then from the
//! first-level cache for each of the tile's rows, instead of once per token and head.

use std::ops::Range;

use super::forward::Config;
use super::kernels::Kernels;
use super::pool::Pool;

/// Query rows of one tile: the rows whose scores are kept at once, so also the rows of scores
/// a piece of work needs room for.
pub(crate) const TILE_ROWS: usize = 16;

/// Bytes of keys (or values) in one block of a tile's pass, which stays in the first-level
/// cache while every row of the tile uses it.
const KEY_BLOCK_BYTES: usize = 16 << 10;

/// Pieces of work per thread the layout aims for when a step has few sequences and KV heads,
/// so that the ones with more positions to attend to do not keep one thread busy alone.
const PARTS_PER_THREAD: usize = 4;

/// Rows of scores, per query head of an entry, that the pieces of work of one step may keep
/// room for together (each piece a tile of up to [`TILE_ROWS`] rows as long as the context).
const MAX_SCORE_ROWS_PER_HEAD: usize = 4;

/// One piece of work: an entry's KV head and a span of its query rows (see [`HeadAttn`]).
#[derive(Debug, Clone)]
struct Part {
    entry: usize,
    kv_head: usize,
    rows: Range<usize>,
}

/// Where the pieces of work of a step work: consecutive parts of one buffer, each the outputs
/// of its rows (`[row][head_dim]`) followed by room for the scores of one tile of rows (up to
/// [`TILE_ROWS`] rows as long as the entry's context). An entry's rows are split into spans
/// only as far as the step needs pieces for the pool's threads, and at most so far that the
/// scores take [`MAX_SCORE_ROWS_PER_HEAD`] rows of context per query head and entry: linear in
/// the context, and independent of the threads. Planned once per step and
/// kept across steps.
#[derive(Default)]
pub(super) struct Layout {
    /// End of each part in the buffer.
    ends: Vec<usize>,
    parts: Vec<Part>,
    /// Each entry's first token among the step's, and its position; one more start at the end.
    starts: Vec<usize>,
    positions: Vec<usize>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Layout {
    /// Plans the parts of entries given as `(first position, tokens)` for a pool of `threads`;
    /// returns the buffer's length.
    pub(super) fn plan(
        &mut self,
        cfg: &Config,
        threads: usize,
        entries: impl Iterator<Item = (usize, usize)>,
    ) -> usize {
        self.ends.clear();
        self.parts.clear();
        self.starts.clear();
        self.positions.clear();
        self.n_heads = cfg.n_heads;
        self.n_kv_heads = cfg.n_kv_heads;
        self.head_dim = cfg.head_dim;
        let mut token = 0;
        for (pos, tokens) in entries {
            self.starts.push(token);
            self.positions.push(pos);
            token += tokens;
        }
        self.starts.push(token);
        let group = cfg.n_heads / cfg.n_kv_heads;
        let pieces = (self.entries() * cfg.n_kv_heads).max(1);
        // Each span keeps room for a tile of scores as long as the context, so the spans an
        // entry's KV head is split into are capped: an entry's scores take at most
        // `MAX_SCORE_ROWS_PER_HEAD` rows of context per query head, whatever the threads.
        let most = (MAX_SCORE_ROWS_PER_HEAD * cfg.n_heads / (cfg.n_kv_heads * TILE_ROWS)).max(1);
        let split = (PARTS_PER_THREAD * threads).div_ceil(pieces).clamp(1, most);
        let mut end = 0;
        for entry in 0..self.entries() {
            let tokens = self.tokens(entry).len();
            let (rows, context) = (tokens * group, self.positions[entry] + tokens);
            let spans = split.min(rows).max(1);
            for kv_head in 0..cfg.n_kv_heads {
                for s in 0..spans {
                    let part = rows * s / spans..rows * (s + 1) / spans;
                    end += part.len() * cfg.head_dim + part.len().min(TILE_ROWS) * context;
                    self.ends.push(end);
                    self.parts.push(Part {
                        entry,
                        kv_head,
                        rows: part,
                    });
                }
            }
        }
        end
    }

    fn entries(&self) -> usize {
        self.positions.len()
    }

    fn tokens(&self, entry: usize) -> Range<usize> {
        self.starts[entry]..self.starts[entry + 1]
    }

    fn part(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        start..self.ends[i]
    }

    /// Moves the heads' outputs from `work` into `out`, `[token][dim]`.
    pub(super) fn gather(&self, work: &[f32], out: &mut [f32]) {
        let (hd, dim) = (self.head_dim, self.head_dim * self.n_heads);
        let group = self.n_heads / self.n_kv_heads;
        for (i, p) in self.parts.iter().enumerate() {
            let part = &work[self.part(i)];
            let first = self.starts[p.entry];
            for (row, r) in part.chunks_exact(hd).zip(p.rows.clone()) {
                let at = (first + r / group) * dim + (p.kv_head * group + r % group) * hd;
                out[at..at + hd].copy_from_slice(row);
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
        let p = &layout.parts[c];
        let tokens = layout.tokens(p.entry);
        let (k, v) = kv(p.entry);
        let head = HeadAttn {
            q: &q[tokens.start * dim + p.kv_head * group * hd..],
            q_stride: dim,
            group,
            rows: p.rows.clone(),
            head_dim: hd,
            pos: layout.positions[p.entry],
            k: &k[p.kv_head],
            v: &v[p.kv_head],
            scale: shape.scale,
            softcap: shape.softcap.unwrap_or(0.0),
            window: shape.window.unwrap_or(usize::MAX),
        };
        let (out, scores) = part.split_at_mut(p.rows.len() * hd);
        (kernels.attend)(&head, out, scores);
    });
}

/// The attention of query rows of one sequence that share a KV head: row `r` is token
/// `r / group`'s query of the group's head `r % group`.
pub(crate) struct HeadAttn<'a> {
    /// Row `r`'s query is `q[(r / group) * q_stride + (r % group) * head_dim..][..head_dim]`.
    pub q: &'a [f32],
    pub q_stride: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// The rows to compute.
    pub rows: Range<usize>,
    pub head_dim: usize,
    /// Position of the first token.
    pub pos: usize,
    /// The KV head's keys and values, `[position][head_dim]`, through the last token's
    /// position.
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// See [`HeadShape`]; a soft cap of 0 is none, a window of `usize::MAX` is none.
    pub scale: f32,
    pub softcap: f32,
    pub window: usize,
}

impl HeadAttn<'_> {
    fn query(&self, r: usize) -> &[f32] {
        let at = r / self.group * self.q_stride + r % self.group * self.head_dim;
        &self.q[at..at + self.head_dim]
    }

    /// The positions row `r` attends to.
    fn keys(&self, r: usize) -> Range<usize> {
        let end = self.pos + r / self.group + 1;
        end.saturating_sub(self.window)..end
    }

    /// Room for the scores that [`attend_with`] needs: a row as long as the context for each
    /// row of one tile.
    pub(crate) fn scores_len(&self) -> usize {
        let context = self.rows.end.div_ceil(self.group) + self.pos;
        self.rows.len().min(TILE_ROWS) * context
    }
}

/// The query-key products of [`attend_with`], which must sum in [`dot_f32`]'s order.
pub(crate) trait Dots: Copy {
    /// `q · k` for one key.
    fn dot(self, q: &[f32], k: &[f32]) -> f32;
    /// `q · k` for the eight consecutive keys of `k` (`[8][q.len()]`).
    fn dot8(self, q: &[f32], k: &[f32]) -> [f32; 8];
}

/// [`dot_f32`] and [`dot8_f32`].
#[derive(Clone, Copy)]
pub(crate) struct PortableDots;

impl Dots for PortableDots {
    #[inline(always)]
    fn dot(self, q: &[f32], k: &[f32]) -> f32 {
        dot_f32(q, k)
    }

    #[inline(always)]
    fn dot8(self, q: &[f32], k: &[f32]) -> [f32; 8] {
        dot8_f32(q, k)
    }
}

/// Values of the weighted sum that one pass over the positions accumulates in registers.
const OUT_BLOCK: usize = 32;

/// [`HeadAttn`] into `out` (`[row][head_dim]`), with `scores` as room for
/// [`HeadAttn::scores_len`] weights: [`attend_with`] with the portable products.
pub(crate) fn attend_head(a: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32]) {
    attend_with(a, out, scores, PortableDots);
}

/// [`attend_head`] with `dots` for the query-key products. Each row's softmax is computed as
/// candle computes it (scores, max, exponentials, normalized weights, then the weighted sum of
/// values, each value in position order), the same operations in the same order whichever
/// rows share a tile, so a token's output does not depend on how a prompt is split into steps
/// or which sequences share one; only loads are shared. Written so that the compiler keeps the
/// running sums in vector registers; the x86 kernels compile it once more with AVX2 and AVX2
/// products ([`super::kernels::Kernels::attend`]), which give the same results bit for bit.
#[inline(always)]
pub(crate) fn attend_with(a: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32], dots: impl Dots) {
    let hd = a.head_dim;
    let n = a.rows.len();
    assert_eq!(out.len(), n * hd, "attention output of the wrong size");
    if n == 0 {
        return;
    }
    let context = a.rows.end.div_ceil(a.group) + a.pos;
    assert!(
        scores.len() >= a.scores_len() && a.k.len() >= context * hd && a.v.len() >= context * hd,
        "attention buffers shorter than the context"
    );
    let cached_keys = a.k.len() / hd;
    let block = (KEY_BLOCK_BYTES / (hd * 4)).max(8) / 8 * 8;
    for (at, out) in (0..n)
        .step_by(TILE_ROWS)
        .zip(out.chunks_mut(TILE_ROWS * hd))
    {
        let rows = a.rows.start + at..a.rows.start + (at + TILE_ROWS).min(n);
        let m = rows.len();
        let mut spans = [const { 0..0 }; TILE_ROWS];
        for (span, r) in spans.iter_mut().zip(rows.clone()) {
            *span = a.keys(r);
        }
        let spans = &spans[..m];
        let lo = spans.iter().map(|s| s.start).min().unwrap_or(0);
        let hi = spans.iter().map(|s| s.end).max().unwrap_or(0);

        // The scores, block of keys by block of keys. A product's keys past the row's end are
        // ones the cache holds (a later token's), computed in the same pass of eight and
        // dropped.
        let mut b = lo;
        while b < hi {
            let b_end = (b + block).min(hi);
            for ((span, r), row) in spans
                .iter()
                .zip(rows.clone())
                .zip(scores.chunks_mut(context))
            {
                let (s, e) = (b.max(span.start), b_end.min(span.end));
                let q = a.query(r);
                let mut j = s;
                while j < e {
                    let at = j - span.start;
                    if j + 8 <= e {
                        row[at..at + 8].copy_from_slice(&dots.dot8(q, &a.k[j * hd..(j + 8) * hd]));
                        j += 8;
                    } else if j + 8 <= cached_keys {
                        let d = dots.dot8(q, &a.k[j * hd..(j + 8) * hd]);
                        for (s, d) in row[at..e - span.start].iter_mut().zip(d) {
                            *s = d;
                        }
                        j = e;
                    } else {
                        row[at] = dots.dot(q, &a.k[j * hd..(j + 1) * hd]);
                        j += 1;
                    }
                }
            }
            b = b_end;
        }

        // The weights: scaled (and capped) scores less their maximum, exponentials, and the
        // exponentials over their sum. The maximum is exact whatever order it is taken in; the
        // sums run in position order, the tile's rows side by side.
        let mut sums = [0f32; TILE_ROWS];
        for (span, row) in spans.iter().zip(scores.chunks_mut(context)) {
            let row = &mut row[..span.len()];
            let mut lanes = [f32::NEG_INFINITY; 8];
            let mut chunks = row.chunks_exact_mut(8);
            if a.softcap > 0.0 {
                let cap = |s: f32| (s * a.scale / a.softcap).tanh() * a.softcap;
                for c in &mut chunks {
                    for (s, l) in c.iter_mut().zip(&mut lanes) {
                        *s = cap(*s);
                        *l = l.max(*s);
                    }
                }
                for s in chunks.into_remainder() {
                    *s = cap(*s);
                    lanes[0] = lanes[0].max(*s);
                }
            } else {
                for c in &mut chunks {
                    for (s, l) in c.iter_mut().zip(&mut lanes) {
                        *s *= a.scale;
                        *l = l.max(*s);
                    }
                }
                for s in chunks.into_remainder() {
                    *s *= a.scale;
                    lanes[0] = lanes[0].max(*s);
                }
            }
            let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            for s in row.iter_mut() {
                *s = exp_le0(*s - max);
            }
        }
        let common = spans.iter().map(|s| s.len()).min().unwrap_or(0);
        for i in (0..m).step_by(4) {
            // Four rows at a time (the last one again where fewer are left).
            let row = |l: usize| &scores[(i + l).min(m - 1) * context..][..common];
            let mut four = [0f32; 4];
            for (((a, b), c), d) in row(0).iter().zip(row(1)).zip(row(2)).zip(row(3)) {
                four[0] += a;
                four[1] += b;
                four[2] += c;
                four[3] += d;
            }
            for (sum, s) in sums[i..m.min(i + 4)].iter_mut().zip(four) {
                *sum = s;
            }
        }
        for ((span, row), sum) in spans.iter().zip(scores.chunks_mut(context)).zip(&mut sums) {
            let row = &mut row[..span.len()];
            for s in &row[common..] {
                *sum += *s;
            }
            for s in row.iter_mut() {
                *s /= *sum;
            }
        }

        // The weighted sums of the values, block by block of positions, two rows at a time
        // over the positions they share.
        out.fill(0.0);
        let mut b = lo;
        while b < hi {
            let b_end = (b + block).min(hi);
            let within = |i: usize| {
                let s = b.max(spans[i].start);
                s..b_end.min(spans[i].end).max(s)
            };
            let weights = |i: usize, p: &Range<usize>| -> &[f32] {
                &scores[i * context + p.start - spans[i].start..][..p.len()]
            };
            let mut i = 0;
            while i < m {
                let p0 = within(i);
                if i + 1 == m {
                    weighted_sum(
                        weights(i, &p0),
                        &a.v[p0.start * hd..],
                        &mut out[i * hd..][..hd],
                    );
                    break;
                }
                let p1 = within(i + 1);
                let (o0, o1) = out[i * hd..(i + 2) * hd].split_at_mut(hd);
                let both = p0.start.max(p1.start)..p0.end.min(p1.end);
                if both.is_empty() {
                    weighted_sum(weights(i, &p0), &a.v[p0.start * hd..], o0);
                    weighted_sum(weights(i + 1, &p1), &a.v[p1.start * hd..], o1);
                } else {
                    for (p, o, r) in [(&p0, &mut *o0, i), (&p1, &mut *o1, i + 1)] {
                        let before = p.start..both.start;
                        weighted_sum(weights(r, &before), &a.v[before.start * hd..], o);
                    }
                    weighted_sum2(
                        [weights(i, &both), weights(i + 1, &both)],
                        &a.v[both.start * hd..],
                        [&mut *o0, &mut *o1],
                    );
                    for (p, o, r) in [(&p0, o0, i), (&p1, o1, i + 1)] {
                        let after = both.end..p.end;
                        weighted_sum(weights(r, &after), &a.v[after.start * hd..], o);
                    }
                }
                i += 2;
            }
            b = b_end;
        }
    }
}

/// Adds `w[j] · v[j]` to `out` for each `j` in order, where `v[j]` is `v[j * out.len()..]`.
#[inline(always)]
fn weighted_sum(w: &[f32], v: &[f32], out: &mut [f32]) {
    let hd = out.len();
    if w.is_empty() {
        return;
    }
    let mut i0 = 0;
    while i0 < hd {
        let width = OUT_BLOCK.min(hd - i0);
        if width == OUT_BLOCK {
            let mut acc: [f32; OUT_BLOCK] = out[i0..i0 + OUT_BLOCK].try_into().unwrap();
            for (w, v) in w.iter().zip(v.chunks_exact(hd)) {
                let v = &v[i0..i0 + OUT_BLOCK];
                for i in 0..OUT_BLOCK {
                    acc[i] += w * v[i];
                }
            }
            out[i0..i0 + OUT_BLOCK].copy_from_slice(&acc);
        } else {
            for (w, v) in w.iter().zip(v.chunks_exact(hd)) {
                for (o, v) in out[i0..i0 + width].iter_mut().zip(&v[i0..i0 + width]) {
                    *o += w * v;
                }
            }
        }
        i0 += width;
    }
}

/// [`weighted_sum`] for two rows of weights over the same values, each value loaded once.
#[inline(always)]
fn weighted_sum2(w: [&[f32]; 2], v: &[f32], out: [&mut [f32]; 2]) {
    let [o0, o1] = out;
    let hd = o0.len();
    let mut i0 = 0;
    while i0 < hd {
        let width = OUT_BLOCK.min(hd - i0);
        if width == OUT_BLOCK {
            let mut a0: [f32; OUT_BLOCK] = o0[i0..i0 + OUT_BLOCK].try_into().unwrap();
            let mut a1: [f32; OUT_BLOCK] = o1[i0..i0 + OUT_BLOCK].try_into().unwrap();
            for ((w0, w1), v) in w[0].iter().zip(w[1]).zip(v.chunks_exact(hd)) {
                let v = &v[i0..i0 + OUT_BLOCK];
                for i in 0..OUT_BLOCK {
                    a0[i] += w0 * v[i];
                    a1[i] += w1 * v[i];
                }
            }
            o0[i0..i0 + OUT_BLOCK].copy_from_slice(&a0);
            o1[i0..i0 + OUT_BLOCK].copy_from_slice(&a1);
        } else {
            for ((w0, w1), v) in w[0].iter().zip(w[1]).zip(v.chunks_exact(hd)) {
                for i in i0..i0 + width {
                    o0[i] += w0 * v[i];
                    o1[i] += w1 * v[i];
                }
            }
        }
        i0 += width;
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
    // `n + 127` (in 1..=127) as the exponent bits: the low bits of `n + 127 + 2^23`, which is
    // exact, so the vectorized code needs no float-to-integer conversion (whose saturating
    // form the compiler does lane by lane).
    let scale = f32::from_bits((n + 8_388_735.0).to_bits() << 23);
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

/// [`dot_f32`] of `q` with each of the eight consecutive keys of `k` (`[8][q.len()]`), each
/// summed in [`dot_f32`]'s order; the eight sums side by side keep the vector units busy where
/// one product is a chain of dependent additions.
#[inline(always)]
pub(crate) fn dot8_f32(q: &[f32], k: &[f32]) -> [f32; 8] {
    const LANES: usize = 8;
    let hd = q.len();
    assert_eq!(k.len(), 8 * hd);
    let body = hd / LANES * LANES;
    let mut acc = [[0f32; LANES]; 8];
    for c in (0..body).step_by(LANES) {
        let x: &[f32; LANES] = q[c..c + LANES].try_into().unwrap();
        for (j, acc) in acc.iter_mut().enumerate() {
            let y: &[f32; LANES] = k[j * hd + c..j * hd + c + LANES].try_into().unwrap();
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
    }
    let mut out = [0f32; 8];
    for (j, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        let tail: f32 = q[body..]
            .iter()
            .zip(&k[j * hd + body..(j + 1) * hd])
            .map(|(x, y)| x * y)
            .sum();
        *o = (((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))) + tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// One row at a time, each over all its keys: the products one by one, the softmax, then
    /// the weighted sum in blocks of [`OUT_BLOCK`] values, each a pass over the positions.
    fn one_row_at_a_time(a: &HeadAttn<'_>) -> Vec<f32> {
        let hd = a.head_dim;
        let mut out = vec![0f32; a.rows.len() * hd];
        for (r, o) in a.rows.clone().zip(out.chunks_exact_mut(hd)) {
            let q = a.query(r);
            let keys = a.keys(r);
            let (k, v) = (
                &a.k[keys.start * hd..keys.end * hd],
                &a.v[keys.start * hd..keys.end * hd],
            );
            let mut scores = Vec::new();
            let mut max = f32::NEG_INFINITY;
            for k in k.chunks_exact(hd) {
                let mut s = dot_f32(q, k) * a.scale;
                if a.softcap > 0.0 {
                    s = (s / a.softcap).tanh() * a.softcap;
                }
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0f32;
            for s in &mut scores {
                *s = exp_le0(*s - max);
                sum += *s;
            }
            for s in &mut scores {
                *s /= sum;
            }
            for i0 in (0..hd).step_by(OUT_BLOCK) {
                let width = OUT_BLOCK.min(hd - i0);
                let mut acc = [0f32; OUT_BLOCK];
                for (w, v) in scores.iter().zip(v.chunks_exact(hd)) {
                    for (acc, v) in acc.iter_mut().zip(&v[i0..i0 + width]) {
                        *acc += w * v;
                    }
                }
                o[i0..i0 + width].copy_from_slice(&acc[..width]);
            }
        }
        out
    }

    /// The exponent bits of `2^n` that `exp_le0` takes from a float sum are those of the
    /// integer `n + 127`, for every `n` it reaches (`x` in -87..=0).
    #[test]
    fn the_exponent_from_a_float_sum_is_the_integer_one() {
        for n in -127..=0 {
            let float = (n as f32 + 8_388_735.0).to_bits() << 23;
            assert_eq!(float, ((n + 127) as u32) << 23, "n = {n}");
        }
    }

    #[test]
    fn eight_products_at_once_sum_as_one_at_a_time() {
        let mut rng = StdRng::seed_from_u64(3);
        for len in [1, 7, 8, 20, 64, 80, 128, 131] {
            let q: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0..2.0)).collect();
            let k: Vec<f32> = (0..8 * len).map(|_| rng.random_range(-2.0..2.0)).collect();
            let eight = dot8_f32(&q, &k);
            for (j, got) in eight.iter().enumerate() {
                let one = dot_f32(&q, &k[j * len..(j + 1) * len]);
                assert_eq!(got.to_bits(), one.to_bits(), "length {len}, key {j}");
            }
        }
    }

    /// Rows in tiles, in any span of a sequence's rows and in every kernel variant, give each
    /// row the bits of the row computed alone over all its keys: with token counts and spans
    /// that are not multiples of a tile, heads that share a KV head, head sizes that are not
    /// multiples of eight or of the value blocks, sliding windows, soft caps, and contexts of
    /// several blocks of keys.
    #[test]
    fn tiles_of_rows_give_each_row_the_bits_it_gets_alone() {
        let mut rng = StdRng::seed_from_u64(11);
        // (head_dim, group, pos, tokens, softcap, window)
        let cases = [
            (64, 8, 0, 1, 0.0, usize::MAX),
            (64, 8, 1100, 3, 0.0, usize::MAX),
            (64, 8, 37, 19, 0.0, usize::MAX),
            (64, 1, 300, 21, 0.0, usize::MAX),
            (128, 4, 5, 9, 0.0, usize::MAX),
            (20, 3, 9, 5, 0.0, usize::MAX),
            (80, 2, 70, 6, 0.0, usize::MAX),
            (64, 8, 300, 7, 0.0, 8),
            (64, 3, 3, 11, 0.0, 100),
            (96, 2, 250, 5, 0.0, 130),
            (128, 2, 20, 4, 1.5, usize::MAX),
            (256, 2, 40, 3, 30.0, 17),
            (64, 5, 30, 5, 2.0, 16),
        ];
        for (hd, group, pos, tokens, softcap, window) in cases {
            let stride = group * hd + 3 * hd;
            let context = pos + tokens;
            let mut values =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let (q, k, v) = (
                values(tokens * stride),
                values(context * hd),
                values(context * hd),
            );
            let rows = tokens * group;
            let attn = |span: Range<usize>| HeadAttn {
                q: &q[hd..],
                q_stride: stride,
                group,
                rows: span,
                head_dim: hd,
                pos,
                k: &k,
                v: &v,
                scale: 1.0 / (hd as f32).sqrt(),
                softcap,
                window,
            };
            let alone = one_row_at_a_time(&attn(0..rows));
            let splits = [vec![0, rows], vec![0, rows / 3, rows / 2 + 1, rows]];
            for kernels in Kernels::all() {
                for split in &splits {
                    let mut got = Vec::new();
                    for w in split.windows(2) {
                        let head = attn(w[0]..w[1].max(w[0]));
                        let mut out = vec![f32::NAN; head.rows.len() * hd];
                        let mut scores = vec![f32::NAN; head.scores_len()];
                        (kernels.attend)(&head, &mut out, &mut scores);
                        got.extend(out);
                    }
                    let same = got
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same && got.len() == alone.len(),
                        "{} differs from one row at a time: head_dim {hd}, group {group}, \
                         position {pos}, {tokens} tokens, spans {split:?}",
                        kernels.name
                    );
                }
            }
        }
    }
}
