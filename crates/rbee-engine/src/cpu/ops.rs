//! The pieces of the forward pass between the matrix products' kernels and the model: the
//! products over the thread pool (one token or a batch), the transposes of batched products,
//! RMSNorm and RoPE. Attention is in [`super::attention`].

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
        let (data, kernels) = (self.data, self.kernels);
        let n = act.tokens();
        let rows = part.len() / n;
        if !m.tiled {
            self.batch_plain_rows(m, r0, act, part);
            return;
        }
        let mut k = 0;
        while k < rows {
            let r = r0 + k;
            if r.is_multiple_of(TILE_ROWS) && k + TILE_ROWS <= rows {
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
            let tile = m.tile_at(data, r / TILE_ROWS);
            for (t, o) in row_out.iter_mut().enumerate() {
                *o = kernels.dot_tile_lane(m.ty, tile, r % TILE_ROWS, act, t);
            }
            k += 1;
        }
    }

    /// [`MatMul::batch_rows`] for a matrix of plain rows: four tokens against every row of the
    /// chunk, then the next four, so that the four tokens' activations stay in the first cache
    /// level while the chunk's rows come from the second (row by row, every row would read
    /// the whole batch's activations, several times its own bytes, from the second level);
    /// the tokens left over, and every token of a type without a four-token kernel, one at a
    /// time.
    fn batch_plain_rows(&self, m: &Mat, r0: usize, act: &Activations, part: &mut [f32]) {
        let (data, kernels, ty) = (self.data, self.kernels, m.ty);
        let n = act.tokens();
        let mut t = 0;
        if kernels.has_dot4(ty) {
            while t + 4 <= n {
                for (k, row_out) in part.chunks_exact_mut(n).enumerate() {
                    if let Some(four) = kernels.dot4(ty, m.row(data, r0 + k), act, t) {
                        row_out[t..t + 4].copy_from_slice(&four);
                    }
                }
                t += 4;
            }
        }
        for (k, row_out) in part.chunks_exact_mut(n).enumerate() {
            let row = m.row(data, r0 + k);
            for (j, o) in row_out[t..].iter_mut().enumerate() {
                *o = kernels.dot(ty, row, act, t + j);
            }
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
    if n == 1 {
        dst.iter_mut().zip(src).for_each(|(o, v)| op(o, *v));
        return;
    }
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
        let root = rms_root(xs, eps);
        for ((o, v), g) in os.iter_mut().zip(xs).zip(w) {
            *o = v / root * g;
        }
    }
}

/// [`rms_norm`] of each `w.len()`-long row of `x`, in place (per-head query and key norms).
pub(super) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for xs in x.chunks_exact_mut(w.len()) {
        let root = rms_root(xs, eps);
        for (v, g) in xs.iter_mut().zip(w) {
            *v = *v / root * g;
        }
    }
}

/// `sqrt(mean(x²) + eps)`.
fn rms_root(xs: &[f32], eps: f32) -> f32 {
    let ss: f32 = xs.iter().map(|v| v * v).sum();
    (ss / xs.len() as f32 + eps).sqrt()
}

/// GELU with the tanh approximation, as ggml computes it on the CPU: the input rounded to f16
/// and the result looked up in a table of f16 values (so rounded to f16 too), except beyond
/// ±10, where it is 0 or the input.
#[inline]
pub(super) fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let table = GELU_TABLE.get_or_init(|| (0..=u16::MAX).map(gelu_of_f16).collect());
    let h = half::f16::from_f32(x).to_bits();
    half::f16::from_bits(table[usize::from(h)]).to_f32()
}

/// The f16 GELU of every f16 input, by bit pattern (128 KiB, made on first use).
static GELU_TABLE: std::sync::OnceLock<Box<[u16]>> = std::sync::OnceLock::new();

fn gelu_of_f16(bits: u16) -> u16 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    let h = half::f16::from_bits(bits).to_f32();
    let y = 0.5 * h * (1.0 + (SQRT_2_OVER_PI * h * (1.0 + COEF_A * h * h)).tanh());
    half::f16::from_f32(y).to_bits()
}

/// Which elements of a head RoPE rotates together: each architecture's, as gguf-info reads it.
pub(super) use super::arch::RopeStyle;

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
