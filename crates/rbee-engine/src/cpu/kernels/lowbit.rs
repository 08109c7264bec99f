//! The 2- and 3-bit K-quants (Q2_K, Q3_K): their block layouts as ggml defines them, their
//! dequantization, and the scalar reference products with Q8_K activations that the SIMD
//! kernels ([`super::x86_lowbit`]) are tested against.
//!
//! Both types cut a 256-weight super-block into sixteen sub-blocks of 16 weights, the size of
//! the activation blocks' partial sums (`bsums`), so every per-sub-block offset is taken out of
//! the integer sum with one product per sub-block:
//!
//! - Q2_K (84 bytes): `scales[16]` (low nibble a sub-block's scale, high nibble its min), then
//!   `qs[64]` (2-bit values), then f16 `d` and `dmin`. Weight = `d · scale · q − dmin · min`,
//!   `q ∈ 0..4`.
//! - Q3_K (110 bytes): `hmask[32]` (each weight's third bit), `qs[64]` (its low two bits),
//!   `scales[12]` (sixteen 6-bit scales stored with a bias of 32), f16 `d`. Weight =
//!   `d · (scale − 32) · q`, `q ∈ −4..4`: the low bits minus 4 where the high bit is clear.
//!
//! In both, weight `128n + 32j + l` (`n < 2`, `j < 4`, `l < 32`) has its 2-bit value at bits
//! `2j` of byte `32n + l` of `qs`; in Q3_K its high bit is bit `4n + j` of `hmask[l]`. Its
//! sub-block is the weight's index over 16.

use super::super::quant::{BlockQ8K, QK_K, f16_at};

/// Bytes of a Q2_K super-block.
pub(crate) const Q2K_BYTES: usize = 84;
/// Bytes of a Q3_K super-block.
pub(crate) const Q3K_BYTES: usize = 110;

/// The 2-bit value of weight `e` of a super-block whose `qs` is `qs`.
#[inline]
fn low2(qs: &[u8], e: usize) -> u8 {
    let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
    (qs[32 * n + l] >> (2 * j)) & 3
}

/// The sixteen 2-bit values of each sub-block of a Q2_K super-block, and their scales and mins.
fn q2k_parts(b: &[u8]) -> ([u8; QK_K], [u8; 16], [u8; 16]) {
    let qs = &b[16..80];
    let mut q = [0u8; QK_K];
    for (e, v) in q.iter_mut().enumerate() {
        *v = low2(qs, e);
    }
    let scales = std::array::from_fn(|i| b[i] & 0xF);
    let mins = std::array::from_fn(|i| b[i] >> 4);
    (q, scales, mins)
}

/// The sixteen 6-bit scales of a Q3_K super-block (`packed`, 12 bytes), less their bias of 32:
/// scale `i` has its low four bits in nibble `i / 8` of byte `i % 8` and its high two in bits
/// `2 (i / 4)` of byte `8 + i % 4`.
pub(crate) fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0xF;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | high << 4) as i8 - 32
    })
}

/// The values (`−4..4`) of a Q3_K super-block's weights.
fn q3k_values(b: &[u8]) -> [i8; QK_K] {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    std::array::from_fn(|e| {
        let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
        let high = (hmask[l] >> (4 * n + j)) & 1;
        low2(qs, e) as i8 - if high == 0 { 4 } else { 0 }
    })
}

/// Dequantizes Q2_K super-blocks (`row`) into `out`.
pub(crate) fn dequantize_q2k(row: &[u8], out: &mut [f32]) {
    for (b, y) in row.chunks_exact(Q2K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        let (q, scales, mins) = q2k_parts(b);
        for (s, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let (dl, ml) = (d * f32::from(scales[s]), dmin * f32::from(mins[s]));
            for (y, &q) in ys.iter_mut().zip(qs) {
                *y = dl * f32::from(q) - ml;
            }
        }
    }
}

/// Dequantizes Q3_K super-blocks (`row`) into `out`.
pub(crate) fn dequantize_q3k(row: &[u8], out: &mut [f32]) {
    for (b, y) in row.chunks_exact(Q3K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 108);
        let scales = q3k_scales(&b[96..108]);
        let q = q3k_values(b);
        for (s, (ys, qs)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * f32::from(scales[s]);
            for (y, &q) in ys.iter_mut().zip(qs) {
                *y = dl * f32::from(q);
            }
        }
    }
}

/// The 16 bytes of `qs` (a super-block's 2-bit values) that hold sub-block `s`, and the shift
/// of its values in them: sub-block `s = 8n + 2j + h` is weights `128n + 32j + 16h..`, at bits
/// `2j` of bytes `32n + 16h..`.
#[inline]
fn sub_block(qs: &[u8], s: usize) -> (&[u8], usize) {
    let (n, j, h) = (s / 8, s % 8 / 2, s % 2);
    (&qs[32 * n + 16 * h..32 * n + 16 * h + 16], 2 * j)
}

/// Q2_K against Q8_K: `d_a · (d · Σ scale · Σ q·a − dmin · Σ min · bsum)` per super-block.
pub(crate) fn dot_q2k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.chunks_exact(Q2K_BYTES).zip(act) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for (s, y) in a.qs.chunks_exact(16).enumerate() {
            let (q, shift) = sub_block(qs, s);
            let dot: i32 = q
                .iter()
                .zip(y)
                .map(|(&q, &y)| i32::from((q >> shift) & 3) * i32::from(y))
                .sum();
            sumi += i32::from(scales[s] & 0xF) * dot;
            summ += i32::from(scales[s] >> 4) * i32::from(a.bsums[s]);
        }
        let (d, dmin) = (f16_at(b, 80) * a.d, f16_at(b, 82) * a.d);
        sum += d * sumi as f32 - dmin * summ as f32;
    }
    sum
}

/// Q3_K against Q8_K: `d · d_a · Σ (scale − 32) · Σ q·a` per super-block.
pub(crate) fn dot_q3k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.chunks_exact(Q3K_BYTES).zip(act) {
        let (hmask, qs) = (&b[..32], &b[32..96]);
        let scales = q3k_scales(&b[96..108]);
        let mut sumi = 0i32;
        for (s, y) in a.qs.chunks_exact(16).enumerate() {
            let (q, shift) = sub_block(qs, s);
            // The high bits of sub-block `8n + 2j + h`: bit `4n + j` of mask bytes `16h..`.
            let (high, bit) = (
                &hmask[16 * (s % 2)..16 * (s % 2) + 16],
                4 * (s / 8) + s % 8 / 2,
            );
            let dot: i32 = q
                .iter()
                .zip(high)
                .zip(y)
                .map(|((&q, &h), &y)| {
                    let v = i32::from((q >> shift) & 3) - 4 * i32::from((h >> bit) & 1 ^ 1);
                    v * i32::from(y)
                })
                .sum();
            sumi += i32::from(scales[s]) * dot;
        }
        sum += f16_at(b, 108) * a.d * sumi as f32;
    }
    sum
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::{Activations, Kernels};
    use super::*;
    use crate::cpu::quant::{WeightType, dequantize_row};

    /// A row of `blocks` super-blocks of `ty` with every weight, scale and min at its largest
    /// (all bits set) and scales of 1, against activations that all quantize to ±127: every
    /// kernel gives the dequantized row's product, so no intermediate sum saturates or wraps.
    #[test]
    fn extreme_blocks_give_the_dequantized_product() {
        for ty in [WeightType::Q2K, WeightType::Q3K] {
            for sign in [1.0f32, -1.0] {
                let blocks = 3;
                let cols = blocks * QK_K;
                let mut row = vec![0xFFu8; ty.row_bytes(cols)];
                for b in row.chunks_exact_mut(ty.block_bytes()) {
                    let one = f16::ONE.to_le_bytes();
                    match ty {
                        WeightType::Q2K => {
                            b[80..82].copy_from_slice(&one);
                            b[82..84].copy_from_slice(&one);
                        }
                        _ => b[108..110].copy_from_slice(&one),
                    }
                }
                let x = vec![sign; 4 * cols];
                let mut w = vec![0f32; cols];
                dequantize_row(ty, &row, &mut w);
                let want: f32 = w.iter().map(|w| w * sign).sum();
                let mut act = Activations::default();
                act.set(&x, cols, &[ty.act_format()]);
                for kernels in Kernels::all() {
                    let one = kernels.dot(ty, &row, &act, 0);
                    let case = format!("{} {ty:?} sign {sign}", kernels.name);
                    assert!(
                        (one - want).abs() <= 1e-3 * want.abs(),
                        "{case}: {one} vs {want}"
                    );
                    if let Some(four) = kernels.dot4(ty, &row, &act, 0) {
                        assert_eq!(four, [one; 4], "{case}");
                    }
                }
            }
        }
    }

    /// The weights of one Q2_K and one Q3_K super-block built value by value: weight `e` sits
    /// at bits `2j` of byte `32n + l` (`e = 128n + 32j + l`), its high bit (Q3_K) at bit
    /// `4n + j` of mask byte `l`, and sub-block `e / 16` takes scale (and min) `e / 16`.
    #[test]
    fn weights_sit_where_ggml_puts_them() {
        let value = |e: usize| (e * 7 + e / 16) % 4;
        let high = |e: usize| e.is_multiple_of(3);
        let scale = |s: usize| (s * 5 + 3) % 16;
        let min = |s: usize| (s * 3 + 1) % 16;
        let mut q2 = vec![0u8; Q2K_BYTES];
        let mut q3 = vec![0u8; Q3K_BYTES];
        for e in 0..QK_K {
            let (n, j, l) = (e / 128, e % 128 / 32, e % 32);
            q2[16 + 32 * n + l] |= (value(e) as u8) << (2 * j);
            q3[32 + 32 * n + l] |= (value(e) as u8) << (2 * j);
            q3[l] |= u8::from(high(e)) << (4 * n + j);
        }
        for s in 0..16 {
            q2[s] = scale(s) as u8 | (min(s) as u8) << 4;
            // Q3_K's 6-bit scale `s`, here `scale(s) + 16` (so that some exceed 32, the bias).
            let v = scale(s) as u8 + 16;
            q3[96 + s % 8] |= (v & 0xF) << (4 * (s / 8));
            q3[104 + s % 4] |= (v >> 4) << (2 * (s / 4));
        }
        let half = f16::from_f32(0.5).to_le_bytes();
        q2[80..82].copy_from_slice(&half);
        q2[82..84].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        q3[108..110].copy_from_slice(&half);
        let (mut y2, mut y3) = (vec![0f32; QK_K], vec![0f32; QK_K]);
        dequantize_q2k(&q2, &mut y2);
        dequantize_q3k(&q3, &mut y3);
        for e in 0..QK_K {
            let s = e / 16;
            let want2 = 0.5 * (scale(s) * value(e)) as f32 - 0.25 * min(s) as f32;
            assert_eq!(y2[e], want2, "Q2_K weight {e}");
            let q = value(e) as i32 - if high(e) { 0 } else { 4 };
            let want3 = 0.5 * ((scale(s) as i32 + 16 - 32) * q) as f32;
            assert_eq!(y3[e], want3, "Q3_K weight {e}");
        }
    }

    /// Throughput of each SIMD implementation's Q2_K and Q3_K products (Q4_K's for scale), one
    /// token and four, on rows that stay in L2, for comparing kernels by hand (`cargo test -p
    /// rbee-engine --release --lib lowbit_throughput -- --ignored --nocapture`): the fastest of
    /// 16 passes, in ns per 1000 weight × token.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn lowbit_throughput() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(1);
        let (rows, cols, tokens) = (256usize, 2048usize, 64usize);
        for ty in [WeightType::Q2K, WeightType::Q3K, WeightType::Q4K] {
            let mut mat: Vec<u8> = (0..rows * ty.row_bytes(cols))
                .map(|_| rng.random())
                .collect();
            // Finite scales: random ones would include NaNs and infinities.
            for b in mat.chunks_exact_mut(ty.block_bytes()) {
                let scales: &[usize] = match ty {
                    WeightType::Q2K => &[80, 82],
                    WeightType::Q3K => &[108],
                    _ => &[0, 2],
                };
                for &at in scales {
                    b[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                }
            }
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let mut act = Activations::default();
            act.set(&x, cols, &[ty.act_format()]);
            for kernels in Kernels::all().into_iter().skip(1) {
                let mut sink = 0f32;
                let mut pass = |four: bool| {
                    let started = std::time::Instant::now();
                    for t in (0..tokens).step_by(if four { 4 } else { 1 }) {
                        for row in mat.chunks_exact(ty.row_bytes(cols)) {
                            sink += match four {
                                true => kernels.dot4(ty, row, &act, t).map_or(0.0, |s| s[0]),
                                false => kernels.dot(ty, row, &act, t),
                            };
                        }
                    }
                    started.elapsed().as_secs_f64() / (rows * cols * tokens) as f64 * 1e12
                };
                let [one, four] =
                    [false, true].map(|f| (0..16).map(|_| pass(f)).fold(f64::MAX, f64::min));
                println!(
                    "{ty:?} {}: one token {one:.2}, four tokens {four:.2} ns per 1000 weight×token",
                    kernels.name
                );
                assert!(sink.is_finite());
            }
        }
    }
}
