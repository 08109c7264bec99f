//! The GGUF block formats the CPU path reads, the activation blocks it quantizes to, and the
//! scalar reference code: row dequantization, activation quantization and the block dot
//! products every SIMD kernel is tested against.
//!
//! Weights are read straight from the file's bytes (little-endian, blocks unaligned); nothing
//! here copies a weight matrix.

use half::f16;

/// Elements in a K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Elements in a 32-element block (Q4_0, Q4_1, Q8_0).
pub(crate) const QK: usize = 32;

/// The weight types the CPU path multiplies with its own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Which activation blocks a weight type's dot product consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    /// Plain f32 (F32 weights).
    F32,
    /// f32 values rounded to f16 (F16 weights: ggml multiplies them with f16 activations).
    F16,
    /// f32 values rounded to bf16 (BF16 weights, likewise).
    BF16,
    /// [`BlockQ8`] (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
    Q8,
    /// [`BlockQ8K`] (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).
    Q8K,
}

impl WeightType {
    /// Elements per block.
    pub(crate) fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => QK,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block in the file.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => super::kernels::lowbit::Q2K_BYTES,
            Self::Q3K => super::kernels::lowbit::Q3K_BYTES,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    pub(crate) fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    pub(crate) fn act_format(self) -> ActFormat {
        match self {
            Self::F32 => ActFormat::F32,
            Self::F16 => ActFormat::F16,
            Self::BF16 => ActFormat::BF16,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => ActFormat::Q8,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => ActFormat::Q8K,
        }
    }
}

/// A quantized activation block of 32 values: `x ≈ d * qs`, `s = d * Σqs` (used by Q4_1's
/// offset). `d` and `s` are rounded through f16 as ggml's `block_q8_0`/`block_q8_1` do, so
/// results match candle's and llama.cpp's to the last rounding of the sum order.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

impl Default for BlockQ8 {
    fn default() -> Self {
        BlockQ8 {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }
    }
}

/// A quantized activation super-block of 256 values with the sums of each 16 (ggml's
/// `block_q8_K`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// `bytes[at..at + 2]` as a little-endian bf16.
pub(crate) fn bf16_at(bytes: &[u8], at: usize) -> f32 {
    half::bf16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// `x` rounded to the nearest bf16 (ties to even), as ggml rounds activations for BF16 weights.
pub(crate) fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `x.round() as i8`: the nearest integer, halves away from zero, saturated to the `i8` range
/// (NaN to 0), in a few plain instructions instead of a call to the C library's `roundf`, which
/// the baseline x86-64 target needs for `round` and which the compiler cannot vectorize.
#[inline]
pub(crate) fn round_i8(x: f32) -> i8 {
    let x = x.clamp(-128.0, 127.0);
    let whole = x as i32;
    // Exact: with |x| ≤ 128 the fraction loses no bits.
    let frac = x - whole as f32;
    (whole + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)) as i8
}

/// Quantizes `x` (a multiple of 32 long) into 32-element blocks.
pub(crate) fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (xs, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in y.qs.iter_mut().zip(xs) {
            *q = round_i8(v * id);
            sum += i32::from(*q);
        }
        y.d = round_f16(d);
        y.s = round_f16(round_f16(sum as f32) * y.d);
    }
}

/// Quantizes `x` (a multiple of 256 long) into K super-blocks.
pub(crate) fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xs, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in xs {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(xs) {
            *q = round_i8(iscale * v);
        }
        for (s, qs) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| i16::from(q)).sum();
        }
        y.d = 1.0 / iscale;
    }
}

/// The 5-bit values of a Q5_0 or Q5_1 block from its high bits (`qh`, four bytes) and nibbles
/// (`qs`, 16 bytes) as ggml lays them out: elements `0..16` are the low nibbles with bits
/// `0..16` of `qh`, elements `16..32` the high nibbles with bits `16..32`.
#[inline]
pub(crate) fn q5_values(block: &[u8]) -> [[u8; 16]; 2] {
    let qh = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    let qs = &block[4..20];
    let mut out = [[0u8; 16]; 2];
    for j in 0..16 {
        out[0][j] = (qs[j] & 0xF) | ((((qh >> j) << 4) & 0x10) as u8);
        out[1][j] = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
    }
    out
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K super-block.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one row (`out.len()` elements) of type `ty` from its bytes.
pub(crate) fn dequantize_row(ty: WeightType, row: &[u8], out: &mut [f32]) {
    let be = ty.block_bytes();
    match ty {
        WeightType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        WeightType::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16_at(row, 2 * i);
            }
        }
        WeightType::BF16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = bf16_at(row, 2 * i);
            }
        }
        WeightType::Q4_0 => {
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for l in 0..16 {
                    y[l] = (f32::from(b[2 + l] & 0xF) - 8.0) * d;
                    y[l + 16] = (f32::from(b[2 + l] >> 4) - 8.0) * d;
                }
            }
        }
        WeightType::Q5_0 | WeightType::Q5_1 => {
            let (header, min_at) = if ty == WeightType::Q5_0 {
                (2, None)
            } else {
                (4, Some(2))
            };
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                let m = min_at.map_or(0.0, |at| f16_at(b, at));
                let offset = if min_at.is_some() { 0 } else { 16 };
                let [lo, hi] = q5_values(&b[header..]);
                for l in 0..16 {
                    y[l] = (i32::from(lo[l]) - offset) as f32 * d + m;
                    y[l + 16] = (i32::from(hi[l]) - offset) as f32 * d + m;
                }
            }
        }
        WeightType::Q4_1 => {
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for l in 0..16 {
                    y[l] = f32::from(b[4 + l] & 0xF) * d + m;
                    y[l + 16] = f32::from(b[4 + l] >> 4) * d + m;
                }
            }
        }
        WeightType::Q8_0 => {
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for l in 0..QK {
                    y[l] = f32::from(b[2 + l] as i8) * d;
                }
            }
        }
        WeightType::Q4K => {
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for j in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    let q = &qs[32 * j..32 * j + 32];
                    for l in 0..32 {
                        y[64 * j + l] = d1 * f32::from(q[l] & 0xF) - m1;
                        y[64 * j + 32 + l] = d2 * f32::from(q[l] >> 4) - m2;
                    }
                }
            }
        }
        WeightType::Q2K => super::kernels::lowbit::dequantize_q2k(row, out),
        WeightType::Q3K => super::kernels::lowbit::dequantize_q3k(row, out),
        WeightType::Q5K => {
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for j in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    let q = &qs[32 * j..32 * j + 32];
                    for l in 0..32 {
                        let (h1, h2) = ((qh[l] >> (2 * j)) & 1, (qh[l] >> (2 * j + 1)) & 1);
                        y[64 * j + l] = d1 * f32::from((q[l] & 0xF) | h1 << 4) - m1;
                        y[64 * j + 32 + l] = d2 * f32::from((q[l] >> 4) | h2 << 4) - m2;
                    }
                }
            }
        }
        WeightType::Q6K => {
            for (b, y) in row.chunks_exact(be).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, 208);
                for n in 0..2 {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    let y = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                        let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        let s = |k: usize| d * f32::from(sc[is + k] as i8);
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
    }
}

/// Scalar reference dot products of one weight row with quantized activations.
pub(crate) mod reference {
    use super::*;

    pub(crate) fn dot_q4_0(row: &[u8], act: &[BlockQ8]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(18).zip(act) {
            let mut s = 0i32;
            for l in 0..16 {
                s += (i32::from(b[2 + l] & 0xF) - 8) * i32::from(a.qs[l]);
                s += (i32::from(b[2 + l] >> 4) - 8) * i32::from(a.qs[l + 16]);
            }
            sum += s as f32 * f16_at(b, 0) * a.d;
        }
        sum
    }

    pub(crate) fn dot_q4_1(row: &[u8], act: &[BlockQ8]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(20).zip(act) {
            let mut s = 0i32;
            for l in 0..16 {
                s += i32::from(b[4 + l] & 0xF) * i32::from(a.qs[l]);
                s += i32::from(b[4 + l] >> 4) * i32::from(a.qs[l + 16]);
            }
            sum += s as f32 * f16_at(b, 0) * a.d + f16_at(b, 2) * a.s;
        }
        sum
    }

    /// Q5_0 against Q8_0 activations: `d_w · d_a · Σ (q - 16) · a`.
    pub(crate) fn dot_q5_0(row: &[u8], act: &[BlockQ8]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(22).zip(act) {
            let [lo, hi] = q5_values(&b[2..]);
            let mut s = 0i32;
            for l in 0..16 {
                s += (i32::from(lo[l]) - 16) * i32::from(a.qs[l]);
                s += (i32::from(hi[l]) - 16) * i32::from(a.qs[l + 16]);
            }
            sum += s as f32 * f16_at(b, 0) * a.d;
        }
        sum
    }

    /// Q5_1 against Q8_1-style activations: `d_w · d_a · Σ q · a + m_w · s_a`.
    pub(crate) fn dot_q5_1(row: &[u8], act: &[BlockQ8]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(24).zip(act) {
            let [lo, hi] = q5_values(&b[4..]);
            let mut s = 0i32;
            for l in 0..16 {
                s += i32::from(lo[l]) * i32::from(a.qs[l]);
                s += i32::from(hi[l]) * i32::from(a.qs[l + 16]);
            }
            sum += s as f32 * f16_at(b, 0) * a.d + f16_at(b, 2) * a.s;
        }
        sum
    }

    pub(crate) fn dot_q8_0(row: &[u8], act: &[BlockQ8]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(34).zip(act) {
            let s: i32 = (0..QK)
                .map(|l| i32::from(b[2 + l] as i8) * i32::from(a.qs[l]))
                .sum();
            sum += s as f32 * f16_at(b, 0) * a.d;
        }
        sum
    }

    pub(crate) fn dot_q4k(row: &[u8], act: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(144).zip(act) {
            let (d, dmin) = (f16_at(b, 0) * a.d, f16_at(b, 2) * a.d);
            let scales = &b[4..16];
            let qs = &b[16..144];
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let shift = 4 * (j % 2);
                let s: i32 = (0..32)
                    .map(|l| i32::from((q[l] >> shift) & 0xF) * i32::from(a.qs[32 * j + l]))
                    .sum();
                sumi += i32::from(sc) * s;
                summ += i32::from(m) * (i32::from(a.bsums[2 * j]) + i32::from(a.bsums[2 * j + 1]));
            }
            sum += d * sumi as f32 - dmin * summ as f32;
        }
        sum
    }

    /// Q5_K as Q4_K with a fifth bit per weight: bit `2j` (low nibbles) or `2j + 1` (high
    /// nibbles) of byte `l` of `qh` for the weights of chunk `j` at `l`.
    pub(crate) fn dot_q5k(row: &[u8], act: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in row.chunks_exact(176).zip(act) {
            let (d, dmin) = (f16_at(b, 0) * a.d, f16_at(b, 2) * a.d);
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let shift = 4 * (j % 2);
                let s: i32 = (0..32)
                    .map(|l| {
                        let v = (q[l] >> shift) & 0xF | ((qh[l] >> j) & 1) << 4;
                        i32::from(v) * i32::from(a.qs[32 * j + l])
                    })
                    .sum();
                sumi += i32::from(sc) * s;
                summ += i32::from(m) * (i32::from(a.bsums[2 * j]) + i32::from(a.bsums[2 * j + 1]));
            }
            sum += d * sumi as f32 - dmin * summ as f32;
        }
        sum
    }

    pub(crate) fn dot_q6k(row: &[u8], act: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        let mut vals = [0f32; QK_K];
        for (b, a) in row.chunks_exact(210).zip(act) {
            // Reuse the dequantizer with d = 1 to get scale * q, all exact integers in f32.
            let mut unit = [0u8; 210];
            unit.copy_from_slice(b);
            unit[208..210].copy_from_slice(&f16::ONE.to_le_bytes());
            dequantize_row(WeightType::Q6K, &unit, &mut vals);
            let s: i32 = vals
                .iter()
                .zip(a.qs.iter())
                .map(|(&v, &q)| v as i32 * i32::from(q))
                .sum();
            sum += s as f32 * f16_at(b, 208) * a.d;
        }
        sum
    }

    pub(crate) fn dot_f32(row: &[u8], act: &[f32]) -> f32 {
        row.chunks_exact(4)
            .zip(act)
            .map(|(b, &x)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * x)
            .sum()
    }

    pub(crate) fn dot_f16(row: &[u8], act: &[f32]) -> f32 {
        act.iter()
            .enumerate()
            .map(|(i, &x)| f16_at(row, 2 * i) * x)
            .sum()
    }

    pub(crate) fn dot_bf16(row: &[u8], act: &[f32]) -> f32 {
        act.iter()
            .enumerate()
            .map(|(i, &x)| bf16_at(row, 2 * i) * x)
            .sum()
    }
}
