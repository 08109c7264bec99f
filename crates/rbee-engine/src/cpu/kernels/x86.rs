//! AVX2 + FMA dot products of one weight row with quantized activations, in the style of
//! ggml's: 4-bit and 8-bit weights are widened to bytes and multiplied with the activation
//! bytes by `maddubs` (u8 × i8 pairs summed to i16), then `madd` to i32, then one f32 FMA per
//! block with the product of the two scales.
//!
//! The four-token Q4_K product also comes in an AVX-512 VNNI variant (`dpwssd` does the `madd`
//! and the add in one instruction). This module, [`super::x86_attend`] (attention),
//! [`super::x86_tiled`] and [`super::x86_tiled_k`] (the products of eight-row tiles) are the
//! only x86 ones of the CPU path with SIMD intrinsics. Their functions are reachable only
//! through [`kernels`], which returns them after `is_x86_feature_detected!` has proved the CPU
//! runs the features each enables; that check is what makes every `unsafe` call below sound.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::quant::{BlockQ8, BlockQ8K, QK_K};
use super::Kernels;

/// The fastest kernels this CPU runs, when it has AVX2, FMA and F16C.
pub(super) fn kernels() -> Option<Kernels> {
    variants().pop()
}

/// Every x86 variant this CPU runs, slowest first: AVX2 (with FMA and F16C), then AVX2 with the
/// Q4_0, Q8_0, Q5_0, Q4_K, Q5_K and Q6_K tile products and the four-token Q4_K row product on
/// AVX-512 VNNI (256-bit vectors).
pub(super) fn variants() -> Vec<Kernels> {
    let mut out = Vec::new();
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        return out;
    }
    let avx2 = Kernels {
        name: "avx2",
        q4_0: dot_q4_0,
        q4_1: dot_q4_1,
        q5_0: dot_q5_0,
        q5_1: dot_q5_1,
        q8_0: dot_q8_0,
        q2k: super::x86_lowbit::dot_q2k,
        q3k: super::x86_lowbit::dot_q3k,
        q4k: dot_q4k,
        q5k: dot_q5k,
        q6k: dot_q6k,
        f32: dot_row_f32,
        f16: dot_row_f16,
        bf16: dot_row_bf16,
        q4_0x4: dot_q4_0x4,
        q8_0x4: dot_q8_0x4,
        q4kx4: dot_q4kx4,
        q4_1x4: Some(dot_q4_1x4),
        q5_0x4: Some(dot_q5_0x4),
        q5_1x4: Some(dot_q5_1x4),
        q2kx4: Some(super::x86_lowbit::dot_q2kx4),
        q3kx4: Some(super::x86_lowbit::dot_q3kx4),
        q5kx4: Some(dot_q5kx4),
        q6kx4: Some(dot_q6kx4),
        f32x4: Some(dot_rows_f32),
        f16x4: Some(dot_rows_f16),
        bf16x4: Some(dot_rows_bf16),
        q4_0_tile: super::x86_tiled::dot_avx2,
        q4_0_tilex4: super::x86_tiled::dot4_avx2,
        q8_0_tile: None,
        q4k_tile: Some((super::x86_tiled_k::dot_avx2, super::x86_tiled_k::dot4_avx2)),
        more_tiles: super::MoreTiles {
            f16: Some(super::FloatTile {
                one: super::x86_tiled_f::f16::dot,
                four: super::x86_tiled_f::f16::dot4,
                lane: super::x86_tiled_f::f16::dot_lane,
            }),
            bf16: Some(super::FloatTile {
                one: super::x86_tiled_f::bf16::dot,
                four: super::x86_tiled_f::bf16::dot4,
                lane: super::x86_tiled_f::bf16::dot_lane,
            }),
            q5k: Some((
                super::x86_tiled_k::dot_q5k_avx2,
                super::x86_tiled_k::dot4_q5k_avx2,
            )),
            q6k: Some((
                super::x86_tiled_k6::dot_avx2,
                super::x86_tiled_k6::dot4_avx2,
            )),
            q5_0: Some((
                super::x86_tiled::dot_q5_0_avx2,
                super::x86_tiled::dot4_q5_0_avx2,
            )),
        },
        attend: super::x86_attend::attend,
    };
    out.push(avx2);
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
    {
        out.push(Kernels {
            name: "avx2+vnni",
            q4_0_tile: super::x86_tiled::dot_vnni,
            q4_0_tilex4: super::x86_tiled::dot4_vnni,
            q8_0_tile: Some((
                super::x86_tiled::dot_q8_0_vnni,
                super::x86_tiled::dot4_q8_0_vnni,
            )),
            q4kx4: dot_q4kx4_vnni,
            q4k_tile: Some((super::x86_tiled_k::dot_vnni, super::x86_tiled_k::dot4_vnni)),
            more_tiles: super::MoreTiles {
                q5k: Some((
                    super::x86_tiled_k::dot_q5k_vnni,
                    super::x86_tiled_k::dot4_q5k_vnni,
                )),
                q6k: Some((
                    super::x86_tiled_k6::dot_vnni,
                    super::x86_tiled_k6::dot4_vnni,
                )),
                q5_0: Some((
                    super::x86_tiled::dot_q5_0_vnni,
                    super::x86_tiled::dot4_q5_0_vnni,
                )),
                ..avx2.more_tiles
            },
            ..avx2
        });
    }
    out
}

// The safe wrappers below are private and handed out only by `kernels()` after the feature
// check, so calling the `target_feature` functions from them is sound.

fn dot_row_f32(row: &[u8], act: &[f32]) -> f32 {
    let [out] = dot_floats_f32(row, [act]);
    out
}

pub(super) fn dot_row_f16(row: &[u8], act: &[f32]) -> f32 {
    let [out] = dot_floats_f16(row, [act]);
    out
}

pub(super) fn dot_row_bf16(row: &[u8], act: &[f32]) -> f32 {
    let [out] = dot_floats_bf16(row, [act]);
    out
}

fn dot_rows_f32(row: &[u8], acts: [&[f32]; 4]) -> [f32; 4] {
    dot_floats_f32(row, acts)
}

fn dot_rows_f16(row: &[u8], acts: [&[f32]; 4]) -> [f32; 4] {
    dot_floats_f16(row, acts)
}

fn dot_rows_bf16(row: &[u8], acts: [&[f32]; 4]) -> [f32; 4] {
    dot_floats_bf16(row, acts)
}

/// An F32 row (little-endian bytes) against `N` activation vectors.
fn dot_floats_f32<const N: usize>(row: &[u8], acts: [&[f32]; N]) -> [f32; N] {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner<const N: usize>(row: &[u8], acts: [&[f32]; N]) -> [f32; N] {
        // SAFETY: `dot_float_rows` asks for 32 readable bytes at each pointer it passes.
        dot_float_rows::<4, N>(
            row,
            acts,
            |w| unsafe { _mm256_loadu_ps(w.cast()) },
            |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        )
    }
    // SAFETY: AVX2, FMA and F16C were detected before the kernels were handed out.
    unsafe { inner(row, acts) }
}

/// An F16 row against `N` activation vectors: eight weights widened to f32 per `vcvtph2ps`.
fn dot_floats_f16<const N: usize>(row: &[u8], acts: [&[f32]; N]) -> [f32; N] {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner<const N: usize>(row: &[u8], acts: [&[f32]; N]) -> [f32; N] {
        // SAFETY: `dot_float_rows` asks for 16 readable bytes at each pointer it passes.
        dot_float_rows::<2, N>(
            row,
            acts,
            |w| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w.cast())) },
            |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        )
    }
    // SAFETY: as in `dot_floats_f32`.
    unsafe { inner(row, acts) }
}

/// A BF16 row against `N` activation vectors: a bf16 is the top half of an f32, so eight
/// weights widen to f32 by a zero extension and a shift.
fn dot_floats_bf16<const N: usize>(row: &[u8], acts: [&[f32]; N]) -> [f32; N] {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner<const N: usize>(row: &[u8], acts: [&[f32]; N]) -> [f32; N] {
        // SAFETY: `dot_float_rows` asks for 16 readable bytes at each pointer it passes.
        dot_float_rows::<2, N>(
            row,
            acts,
            |w| unsafe {
                let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
            },
            |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        )
    }
    // SAFETY: as in `dot_floats_f32`.
    unsafe { inner(row, acts) }
}

/// Chains `first..first + C` of [`dot_float_rows`] over the whole row: their accumulators in
/// an array of constant size (so in registers), chain 0 (when `first` is 0) then taking the
/// remaining eights, whose end it stores in `rest`.
///
/// # Safety
/// `w` is valid for `BYTES * n` bytes and each of `x` for `n` floats; AVX2 and FMA present.
#[inline(always)]
unsafe fn float_pass<const BYTES: usize, const N: usize, const C: usize>(
    w: *const u8,
    x: &[*const f32; N],
    n: usize,
    first: usize,
    load: &impl Fn(*const u8) -> __m256,
    rest: &mut usize,
) -> [[__m256; C]; N] {
    // SAFETY: every load reads 8 values at `at..at + 8 <= n` (the caller's guarantee).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; N];
        let mut i = 0;
        while i + 32 <= n {
            for c in 0..C {
                let at = i + 8 * (first + c);
                let wv = load(w.add(BYTES * at));
                for (a, x) in acc.iter_mut().zip(x) {
                    a[c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(at)), a[c]);
                }
            }
            i += 32;
        }
        if first == 0 {
            while i + 8 <= n {
                let wv = load(w.add(BYTES * i));
                for (a, x) in acc.iter_mut().zip(x) {
                    a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i)), a[0]);
                }
                i += 8;
            }
            *rest = i;
        }
        acc
    }
}

/// A row of `BYTES`-byte floats against `N` activation vectors: `load` widens the eight weights
/// at a pointer (with `8 * BYTES` bytes readable there) to f32, and `one` reads each weight of
/// the tail.
///
/// Each token has four 8-lane accumulators, chain `j` taking weights `32i + 8j..32i + 8j + 8`
/// of each round `i` of 32, chain 0 then the remaining eights, and the tail's products are added
/// to their sum one by one. The chains are independent, so with several tokens (whose sixteen
/// accumulators would not fit in the registers) the row is run twice, two chains at a time: the
/// same operations in each chain's own order, so each token's result is the one-token result
/// bit for bit (a sequence gets the same logits alone and in a batch).
#[inline(always)]
fn dot_float_rows<const BYTES: usize, const N: usize>(
    row: &[u8],
    acts: [&[f32]; N],
    load: impl Fn(*const u8) -> __m256,
    one: impl Fn(&[u8]) -> f32,
) -> [f32; N] {
    let n = acts.first().map_or(0, |a| a.len());
    assert!(row.len() >= BYTES * n && acts.iter().all(|a| a.len() == n));
    let w = row.as_ptr();
    let x: [*const f32; N] = std::array::from_fn(|t| acts[t].as_ptr());
    let mut chains = [[unsafe { _mm256_setzero_ps() }; 4]; N];
    let mut rest = 0;
    // SAFETY: as in `float_pass`, whose contract the lengths checked above meet.
    unsafe {
        if N == 1 {
            let acc = float_pass::<BYTES, N, 4>(w, &x, n, 0, &load, &mut rest);
            for (c, a) in chains.iter_mut().zip(acc) {
                c.copy_from_slice(&a);
            }
        } else {
            for first in [0, 2] {
                let acc = float_pass::<BYTES, N, 2>(w, &x, n, first, &load, &mut rest);
                for (c, a) in chains.iter_mut().zip(acc) {
                    c[first..first + 2].copy_from_slice(&a);
                }
            }
        }
    }
    std::array::from_fn(|t| {
        let c = &chains[t];
        let mut sum = unsafe {
            hsum(_mm256_add_ps(
                _mm256_add_ps(c[0], c[1]),
                _mm256_add_ps(c[2], c[3]),
            ))
        };
        for (k, &v) in acts[t].iter().enumerate().skip(rest) {
            sum += one(&row[BYTES * k..BYTES * (k + 1)]) * v;
        }
        sum
    })
}

fn dot_q4_0(row: &[u8], act: &[BlockQ8]) -> f32 {
    assert!(row.len() >= act.len() * 18);
    // SAFETY: AVX2, FMA and F16C were detected before this function was handed out; the assert
    // above bounds every load to `row` and `act`.
    unsafe { q4_0_avx2(row, act) }
}

fn dot_q4_1(row: &[u8], act: &[BlockQ8]) -> f32 {
    assert!(row.len() >= act.len() * 20);
    // SAFETY: as in `dot_q4_0`.
    unsafe { q4_1_avx2(row, act) }
}

fn dot_q5_0(row: &[u8], act: &[BlockQ8]) -> f32 {
    assert!(row.len() >= act.len() * 22);
    // SAFETY: as in `dot_q4_0`.
    unsafe { q5_0_avx2(row, act) }
}

fn dot_q5_1(row: &[u8], act: &[BlockQ8]) -> f32 {
    assert!(row.len() >= act.len() * 24);
    // SAFETY: as in `dot_q4_0`.
    unsafe { q5_1_avx2(row, act) }
}

fn dot_q8_0(row: &[u8], act: &[BlockQ8]) -> f32 {
    assert!(row.len() >= act.len() * 34);
    // SAFETY: as in `dot_q4_0`.
    unsafe { q8_0_avx2(row, act) }
}

fn dot_q4k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert!(row.len() >= act.len() * 144);
    // SAFETY: as in `dot_q4_0`.
    unsafe { q4k_avx2(row, act) }
}

fn dot_q5k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let [out] = q5k_rows(row, [act]);
    out
}

fn dot_q5kx4(row: &[u8], acts: [&[BlockQ8K]; 4]) -> [f32; 4] {
    q5k_rows(row, acts)
}

fn dot_q6k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let [out] = q6k_rows(row, [act]);
    out
}

fn dot_q6kx4(row: &[u8], acts: [&[BlockQ8K]; 4]) -> [f32; 4] {
    q6k_rows(row, acts)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first, then high nibbles.
///
/// # Safety
/// `p` must be valid for reading 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` has no alignment requirement.
    let tmp = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// Signed bytes × signed bytes, summed in pairs of four into eight i32, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_u8_i8(ax, sy)
}

/// Unsigned bytes × signed bytes, summed in fours into eight i32, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_u8_i8(ux: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ux, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
}

/// The f16 at `p`, converted with F16C.
///
/// # Safety
/// `p` must be valid for reading 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_ptr(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes; `read_unaligned` needs no alignment.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Defines the one-token and four-token dot products of a weight type whose blocks unpack to
/// 32 signed bytes and one f16 scale; `$block(row, i)` reads block `i`. A macro rather than a
/// function taking the unpacker, so that the unpacking is inlined into each loop.
macro_rules! signed_kernels {
    ($one:ident, $four:ident, $bytes:literal, |$row:ident, $i:ident| $block:expr) => {
        /// One row against one activation vector, two accumulators (even and odd blocks) so
        /// the FMA latency does not serialize the loop. The blocks go in pairs so that each
        /// accumulator is a variable of its own: indexed by `i & 1`, they were kept on the
        /// stack, and every block waited for the store of the one before.
        ///
        /// # Safety
        /// AVX2, FMA and F16C present; `row` holds at least `act.len()` blocks.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $one(row: &[u8], act: &[BlockQ8]) -> f32 {
            let $row = row.as_ptr();
            let step = |$i: usize, acc: __m256| {
                let a = &act[$i];
                // SAFETY: block `i < act.len()` lies inside the row (the caller's guarantee);
                // `a.qs` is 32 bytes.
                let ((d, qx), qy) = unsafe { ($block, _mm256_loadu_si256(a.qs.as_ptr().cast())) };
                _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_i8(qx, qy), acc)
            };
            let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 2 <= act.len() {
                even = step(i, even);
                odd = step(i + 1, odd);
                i += 2;
            }
            if i < act.len() {
                even = step(i, even);
            }
            hsum(_mm256_add_ps(even, odd))
        }

        /// One row against four activation vectors: each weight block is unpacked once. Each
        /// token keeps two accumulators, alternating by block as the one-token product does,
        /// so the results are bit-identical to it (a sequence gets the same logits alone and
        /// in a batch).
        fn $four(row: &[u8], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
            let n = acts[0].len();
            assert!(row.len() >= n * $bytes && acts.iter().all(|a| a.len() == n));
            #[target_feature(enable = "avx2,fma,f16c")]
            fn inner(row: &[u8], acts: [&[BlockQ8]; 4], n: usize) -> [f32; 4] {
                let $row = row.as_ptr();
                let step = |$i: usize, acc: [__m256; 4]| {
                    // SAFETY: `i < n` blocks, inside the row by the assert above.
                    let (d, qx) = unsafe { $block };
                    let ax = _mm256_sign_epi8(qx, qx);
                    std::array::from_fn(|t| {
                        let a = &acts[t][$i];
                        // SAFETY: `a.qs` is 32 bytes.
                        let qy = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
                        let sy = _mm256_sign_epi8(qy, qx);
                        _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_u8_i8(ax, sy), acc[t])
                    })
                };
                let (mut even, mut odd) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                let mut i = 0;
                while i + 2 <= n {
                    even = step(i, even);
                    odd = step(i + 1, odd);
                    i += 2;
                }
                if i < n {
                    even = step(i, even);
                }
                std::array::from_fn(|t| hsum(_mm256_add_ps(even[t], odd[t])))
            }
            // SAFETY: the features were detected before this function was handed out.
            unsafe { inner(row, acts, n) }
        }
    };
}

signed_kernels!(q4_0_avx2, dot_q4_0x4, 18, |row, i| {
    let b = row.add(18 * i);
    (
        f16_ptr(b),
        _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8)),
    )
});

signed_kernels!(q8_0_avx2, dot_q8_0x4, 34, |row, i| {
    let b = row.add(34 * i);
    (f16_ptr(b), _mm256_loadu_si256(b.add(2).cast()))
});

signed_kernels!(q5_0_avx2, dot_q5_0x4, 22, |row, i| {
    let b = row.add(22 * i);
    // `nibble | 0xF0` is `nibble - 16` as a signed byte: the weight where the fifth bit is
    // clear; where it is set, the nibble alone is `nibble + 16 - 16`.
    let high = _mm256_andnot_si256(fifth_bits(b.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
    (f16_ptr(b), _mm256_or_si256(nibbles(b.add(6)), high))
});

/// The fifth bits of a Q5_0 or Q5_1 block (the four bytes at `p`) as 32 bytes: byte `j` is all
/// ones where bit `j` is set. Element `j` of the block is byte `j` of [`nibbles`].
///
/// # Safety
/// `p` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees four readable bytes; `read_unaligned` needs no alignment.
    let bits = unsafe { p.cast::<u32>().read_unaligned() };
    // Byte `j` gets byte `j / 8` of the bits, then every bit but `j % 8` set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1))
}

/// Defines the one-token and four-token dot products of a weight type whose blocks unpack to
/// 32 unsigned bytes, one f16 scale `d` and one f16 offset `m` (`w = d·q + m`, so a block adds
/// `d·d_a·Σq·a + m·s_a`); `$block(row, i)` reads block `i` as `(d, m, q)`.
macro_rules! offset_kernels {
    ($one:ident, $four:ident, $bytes:literal, |$row:ident, $i:ident| $block:expr) => {
        /// One row against one activation vector, two accumulators so the FMA latency does
        /// not serialize the loop; the offsets summed apart and added last.
        ///
        /// # Safety
        /// AVX2, FMA and F16C present; `row` holds at least `act.len()` blocks.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $one(row: &[u8], act: &[BlockQ8]) -> f32 {
            let $row = row.as_ptr();
            let mut offsets = 0f32;
            let mut step = |$i: usize, acc: __m256| {
                let a = &act[$i];
                // SAFETY: block `i < act.len()` lies inside the row (the caller's guarantee);
                // `a.qs` is 32 bytes.
                let ((d, m, qx), qy) =
                    unsafe { ($block, _mm256_loadu_si256(a.qs.as_ptr().cast())) };
                offsets += m * a.s;
                _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_u8_i8(qx, qy), acc)
            };
            // In pairs, for the reason given at `signed_kernels`.
            let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 2 <= act.len() {
                even = step(i, even);
                odd = step(i + 1, odd);
                i += 2;
            }
            if i < act.len() {
                even = step(i, even);
            }
            hsum(_mm256_add_ps(even, odd)) + offsets
        }

        /// One row against four activation vectors: each weight block is unpacked once, and
        /// each token gets the one-token product's operations in its order, so the same
        /// result bit for bit.
        fn $four(row: &[u8], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
            let n = acts[0].len();
            assert!(row.len() >= n * $bytes && acts.iter().all(|a| a.len() == n));
            #[target_feature(enable = "avx2,fma,f16c")]
            fn inner(row: &[u8], acts: [&[BlockQ8]; 4], n: usize) -> [f32; 4] {
                let $row = row.as_ptr();
                let mut offsets = [0f32; 4];
                let mut step = |$i: usize, acc: [__m256; 4]| {
                    // SAFETY: `i < n` blocks, inside the row by the assert above.
                    let (d, m, qx) = unsafe { $block };
                    std::array::from_fn(|t| {
                        let a = &acts[t][$i];
                        // SAFETY: `a.qs` is 32 bytes.
                        let qy = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
                        offsets[t] += m * a.s;
                        _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_u8_i8(qx, qy), acc[t])
                    })
                };
                let (mut even, mut odd) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                let mut i = 0;
                while i + 2 <= n {
                    even = step(i, even);
                    odd = step(i + 1, odd);
                    i += 2;
                }
                if i < n {
                    even = step(i, even);
                }
                std::array::from_fn(|t| hsum(_mm256_add_ps(even[t], odd[t])) + offsets[t])
            }
            // SAFETY: the features were detected before this function was handed out.
            unsafe { inner(row, acts, n) }
        }
    };
}

offset_kernels!(q4_1_avx2, dot_q4_1x4, 20, |row, i| {
    let b = row.add(20 * i);
    (f16_ptr(b), f16_ptr(b.add(2)), nibbles(b.add(4)))
});

offset_kernels!(q5_1_avx2, dot_q5_1x4, 24, |row, i| {
    let b = row.add(24 * i);
    let high = _mm256_and_si256(fifth_bits(b.add(4)), _mm256_set1_epi8(0x10));
    (
        f16_ptr(b),
        f16_ptr(b.add(2)),
        _mm256_or_si256(nibbles(b.add(8)), high),
    )
});

/// # Safety
/// AVX2, FMA and F16C present; `row` holds at least `act.len()` Q4_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_avx2(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    for (i, a) in act.iter().enumerate() {
        let b = &row[144 * i..144 * i + 144];
        // SAFETY: `b` is 144 bytes.
        let (d, dmin) = unsafe { (f16_ptr(b.as_ptr()) * a.d, f16_ptr(b.as_ptr().add(2)) * a.d) };
        let unpacked = q4k_scales(&b[4..16]);
        // SAFETY: `a.bsums` is 32 bytes.
        let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
        let summ = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, unpacked.mins));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(-dmin), summ, acc);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / 64 {
            // SAFETY: `b[16 + 32j..16 + 32j + 32]` lies inside the 144-byte block; the two
            // activation loads read `a.qs[64j..64j + 64]`, inside its 256 bytes.
            let (q4, ql, qh) = unsafe {
                (
                    _mm256_loadu_si256(b.as_ptr().add(16 + 32 * j).cast()),
                    _mm256_loadu_si256(a.qs.as_ptr().add(64 * j).cast()),
                    _mm256_loadu_si256(a.qs.as_ptr().add(64 * j + 32).cast()),
                )
            };
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ql), unpacked.scales[2 * j]);
            let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, qh), unpacked.scales[2 * j + 1]);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

/// `acc + madd(a, b)` (AVX2).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn madd_add_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// `acc + madd(a, b)` in one VNNI instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn madd_add_vnni(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, a, b)
}

macro_rules! q4kx4 {
    ($name:ident, $features:literal, $madd_add:ident) => {
        /// One Q4_K row against four Q8_K activation vectors: the nibbles and scales of each
        /// super-block are unpacked once.
        fn $name(row: &[u8], acts: [&[BlockQ8K]; 4]) -> [f32; 4] {
            let n = acts[0].len();
            assert!(row.len() >= n * 144 && acts.iter().all(|a| a.len() == n));
            #[target_feature(enable = $features)]
            fn inner(row: &[u8], acts: [&[BlockQ8K]; 4], n: usize) -> [f32; 4] {
                let m4 = _mm256_set1_epi8(0xF);
                let mut acc = [_mm256_setzero_ps(); 4];
                for i in 0..n {
                    let b = &row[144 * i..144 * i + 144];
                    // SAFETY: `b` is 144 bytes.
                    let (d, dmin) = unsafe { (f16_ptr(b.as_ptr()), f16_ptr(b.as_ptr().add(2))) };
                    let unpacked = q4k_scales(&b[4..16]);
                    let mut nib = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
                    for (j, q) in nib.iter_mut().enumerate() {
                        // SAFETY: `b[16 + 32j..16 + 32j + 32]` lies inside the 144-byte block.
                        let q4 = unsafe { _mm256_loadu_si256(b.as_ptr().add(16 + 32 * j).cast()) };
                        *q = (
                            _mm256_and_si256(q4, m4),
                            _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4),
                        );
                    }
                    for t in 0..4 {
                        let a = &acts[t][i];
                        // SAFETY: `a.bsums` is 32 bytes.
                        let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
                        let summ = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, unpacked.mins));
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * a.d), summ, acc[t]);
                        let mut sumi = _mm256_setzero_si256();
                        for (j, (lo, hi)) in nib.iter().enumerate() {
                            // SAFETY: reads `a.qs[64j..64j + 64]`, inside its 256 bytes.
                            let (ql, qh) = unsafe {
                                (
                                    _mm256_loadu_si256(a.qs.as_ptr().add(64 * j).cast()),
                                    _mm256_loadu_si256(a.qs.as_ptr().add(64 * j + 32).cast()),
                                )
                            };
                            sumi = $madd_add(
                                sumi,
                                _mm256_maddubs_epi16(*lo, ql),
                                unpacked.scales[2 * j],
                            );
                            sumi = $madd_add(
                                sumi,
                                _mm256_maddubs_epi16(*hi, qh),
                                unpacked.scales[2 * j + 1],
                            );
                        }
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * a.d),
                            _mm256_cvtepi32_ps(sumi),
                            acc[t],
                        );
                    }
                }
                acc.map(|a| hsum(a))
            }
            // SAFETY: the features were detected before this function was handed out.
            unsafe { inner(row, acts, n) }
        }
    };
}

q4kx4!(dot_q4kx4, "avx2,fma,f16c", madd_add_avx2);
q4kx4!(
    dot_q4kx4_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    madd_add_vnni
);

/// The eight 6-bit scales of a Q4_K super-block, each broadcast to sixteen i16 lanes, and its
/// eight mins laid out to pair with the sixteen `bsums` of a Q8_K block (`m0 m0 m1 m1 …`).
struct Q4kScales {
    scales: [__m256i; 8],
    mins: __m256i,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_scales(packed: &[u8]) -> Q4kScales {
    // The twelve bytes as three words, rearranged with word-wide masks into the eight scales
    // (bytes 0..8) and the eight mins (8..16) as ggml does: scales and mins 0..4 are the low
    // six bits of bytes 0..4 and 4..8; 4..8 take their low four bits from the nibbles of bytes
    // 8..12 and their top two from the top bits of bytes 0..4 and 4..8.
    let word = |k: usize| {
        u32::from_le_bytes([
            packed[4 * k],
            packed[4 * k + 1],
            packed[4 * k + 2],
            packed[4 * k + 3],
        ])
    };
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let bytes = _mm_setr_epi32(
        (w0 & low6) as i32,
        ((w2 & low4) | ((w0 >> 6) & top2) << 4) as i32,
        (w1 & low6) as i32,
        (((w2 >> 4) & low4) | ((w1 >> 6) & top2) << 4) as i32,
    );
    let widen = |pick: __m128i| _mm256_cvtepu8_epi16(_mm_shuffle_epi8(bytes, pick));
    let scales = std::array::from_fn(|j| widen(_mm_set1_epi8(j as i8)));
    let mins = widen(_mm_setr_epi8(
        8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15,
    ));
    Q4kScales { scales, mins }
}

/// One Q5_K row against `N` Q8_K activation vectors: as Q4_K, with each nibble's fifth bit
/// from the 32 bytes of `qh` (bit `2j` for the low nibbles of chunk `j`, `2j + 1` for its high
/// nibbles). The weights and scales of each super-block are unpacked once for the `N` tokens,
/// and each token gets the same operations in the same order whatever `N`, so a sequence gets
/// the same result alone and in a batch.
fn q5k_rows<const N: usize>(row: &[u8], acts: [&[BlockQ8K]; N]) -> [f32; N] {
    let n = acts[0].len();
    assert!(row.len() >= n * 176 && acts.iter().all(|a| a.len() == n));
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner<const N: usize>(row: &[u8], acts: [&[BlockQ8K]; N], n: usize) -> [f32; N] {
        let m4 = _mm256_set1_epi8(0xF);
        let bit4 = _mm256_set1_epi8(0x10);
        let mut acc = [_mm256_setzero_ps(); N];
        for i in 0..n {
            let b = &row[176 * i..176 * i + 176];
            // SAFETY: `b` is 176 bytes: `d`, `dmin`, then the 32 bytes of `qh` at 16.
            let (d, dmin, mut qh) = unsafe {
                (
                    f16_ptr(b.as_ptr()),
                    f16_ptr(b.as_ptr().add(2)),
                    _mm256_loadu_si256(b.as_ptr().add(16).cast()),
                )
            };
            let unpacked = q4k_scales(&b[4..16]);
            for t in 0..N {
                let a = &acts[t][i];
                // SAFETY: `a.bsums` is 32 bytes.
                let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
                let summ = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, unpacked.mins));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * a.d), summ, acc[t]);
            }
            let mut sumi = [_mm256_setzero_si256(); N];
            for j in 0..QK_K / 64 {
                // SAFETY: `b[48 + 32j..80 + 32j]` lies inside the 176-byte block.
                let q4 = unsafe { _mm256_loadu_si256(b.as_ptr().add(48 + 32 * j).cast()) };
                // Bit 0 of each byte of `qh` to bit 4 for the low nibbles, bit 1 for the high
                // ones; then the next two bits down (what a 16-bit shift brings into a byte's
                // top bits is never read).
                let lo = _mm256_or_si256(
                    _mm256_and_si256(q4, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bit4),
                );
                let hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4),
                    _mm256_and_si256(_mm256_slli_epi16::<3>(qh), bit4),
                );
                qh = _mm256_srli_epi16::<2>(qh);
                for t in 0..N {
                    let a = &acts[t][i];
                    // SAFETY: reads `a.qs[64j..64j + 64]`, inside its 256 bytes.
                    let (yl, yh) = unsafe {
                        (
                            _mm256_loadu_si256(a.qs.as_ptr().add(64 * j).cast()),
                            _mm256_loadu_si256(a.qs.as_ptr().add(64 * j + 32).cast()),
                        )
                    };
                    // `maddubs` cannot saturate: 31 · 128 · 2 < 32767.
                    let pl =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, yl), unpacked.scales[2 * j]);
                    let ph =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yh), unpacked.scales[2 * j + 1]);
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(pl, ph));
                }
            }
            for t in 0..N {
                let ad = _mm256_set1_ps(d * acts[t][i].d);
                acc[t] = _mm256_fmadd_ps(ad, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            }
        }
        acc.map(|a| hsum(a))
    }
    // SAFETY: AVX2, FMA and F16C were detected before the kernels were handed out.
    unsafe { inner(row, acts, n) }
}

/// Byte shuffles of a Q6_K block's sixteen scales: entry `p` repeats scale `2p` eight times,
/// then scale `2p + 1` eight times, the scales of the two 16-weight halves of one 32-byte
/// group of weights.
static Q6K_SCALE_PAIRS: [[u8; 16]; 8] = {
    let mut out = [[0u8; 16]; 8];
    let mut p = 0;
    while p < 8 {
        let mut k = 0;
        while k < 16 {
            out[p][k] = (2 * p + k / 8) as u8;
            k += 1;
        }
        p += 1;
    }
    out
};

/// One Q6_K row against `N` Q8_K activation vectors. The weights are stored as `q + 32` with
/// `q` in `[-32, 31]`: the unsigned values are multiplied (`maddubs` cannot saturate:
/// 63 · 128 · 2 < 32767) and 32 × Σ scale · (sum of 16 activations) is taken back out with the
/// activations' `bsums`, whose 16-element groups are the scales' groups. Unpacked once per
/// super-block for the `N` tokens, each token getting the same operations whatever `N`.
fn q6k_rows<const N: usize>(row: &[u8], acts: [&[BlockQ8K]; N]) -> [f32; N] {
    let n = acts[0].len();
    assert!(row.len() >= n * 210 && acts.iter().all(|a| a.len() == n));
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner<const N: usize>(row: &[u8], acts: [&[BlockQ8K]; N], n: usize) -> [f32; N] {
        let m4 = _mm256_set1_epi8(0xF);
        let m2 = _mm256_set1_epi8(0x30);
        let mut acc = [_mm256_setzero_ps(); N];
        for i in 0..n {
            let b = &row[210 * i..210 * i + 210];
            // SAFETY: `b` is 210 bytes: the scales at 192..208, `d` at 208.
            let (d, scales) = unsafe {
                (
                    f16_ptr(b.as_ptr().add(208)),
                    _mm_loadu_si128(b.as_ptr().add(192).cast()),
                )
            };
            let wide = _mm256_cvtepi8_epi16(scales);
            let mut sumi: [__m256i; N] = std::array::from_fn(|t| {
                // SAFETY: `bsums` is 32 bytes.
                let bsums = unsafe { _mm256_loadu_si256(acts[t][i].bsums.as_ptr().cast()) };
                _mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    _mm256_slli_epi32::<5>(_mm256_madd_epi16(wide, bsums)),
                )
            });
            for h in 0..2 {
                // SAFETY: ql at `64h..64h + 64` and qh at `128 + 32h..160 + 32h` lie inside
                // the 210-byte block.
                let (l1, l2, qh) = unsafe {
                    (
                        _mm256_loadu_si256(b.as_ptr().add(64 * h).cast()),
                        _mm256_loadu_si256(b.as_ptr().add(64 * h + 32).cast()),
                        _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h).cast()),
                    )
                };
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(l1, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(l2, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                        _mm256_and_si256(qh, m2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                    ),
                ];
                for (k, qk) in q.iter().enumerate() {
                    // SAFETY: each entry of the table is 16 bytes.
                    let pick =
                        unsafe { _mm_loadu_si128(Q6K_SCALE_PAIRS[4 * h + k].as_ptr().cast()) };
                    let sv = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                    for t in 0..N {
                        // SAFETY: reads `qs[128h + 32k..128h + 32k + 32]`, inside its 256
                        // bytes.
                        let y = unsafe {
                            _mm256_loadu_si256(acts[t][i].qs.as_ptr().add(128 * h + 32 * k).cast())
                        };
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*qk, y), sv);
                        sumi[t] = _mm256_add_epi32(sumi[t], p);
                    }
                }
            }
            for t in 0..N {
                let ad = _mm256_set1_ps(d * acts[t][i].d);
                acc[t] = _mm256_fmadd_ps(ad, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            }
        }
        acc.map(|a| hsum(a))
    }
    // SAFETY: AVX2, FMA and F16C were detected before the kernels were handed out.
    unsafe { inner(row, acts, n) }
}
