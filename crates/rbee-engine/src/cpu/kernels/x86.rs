//! AVX2 + FMA dot products of one weight row with quantized activations, in the style of
//! ggml's: 4-bit and 8-bit weights are widened to bytes and multiplied with the activation
//! bytes by `maddubs` (u8 × i8 pairs summed to i16), then `madd` to i32, then one f32 FMA per
//! block with the product of the two scales.
//!
//! The four-token Q4_K product also comes in an AVX-512 VNNI variant (`dpwssd` does the `madd`
//! and the add in one instruction). The attention of one head is the portable code of
//! [`super::super::attention`] compiled with AVX2, its query-key products in AVX2 intrinsics
//! with the portable order of additions. This module, [`super::x86_tiled`] and
//! [`super::x86_tiled_k`] (the products of eight-row tiles) are the only x86 ones of the CPU
//! path with SIMD intrinsics. Their functions are reachable only through [`kernels`], which
//! returns them after `is_x86_feature_detected!` has proved the CPU runs the features each
//! enables; that check is what makes every `unsafe` call below sound.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::attention::{HeadAttn, attend_head_with};
use super::super::quant::{BlockQ8, BlockQ8K, QK_K, scale_min_k4};
use super::Kernels;

/// The fastest kernels this CPU runs, when it has AVX2, FMA and F16C.
pub(super) fn kernels() -> Option<Kernels> {
    variants().pop()
}

/// Every x86 variant this CPU runs, slowest first: AVX2 (with FMA and F16C), then AVX2 with the
/// Q4_0, Q8_0 and Q4_K tile products and the four-token Q4_K row product on AVX-512 VNNI
/// (256-bit vectors).
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
        q8_0: dot_q8_0,
        q4k: dot_q4k,
        q6k: dot_q6k,
        f32: dot_row_f32,
        f16: dot_row_f16,
        q4_0x4: dot_q4_0x4,
        q8_0x4: dot_q8_0x4,
        q4kx4: dot_q4kx4,
        q4_0_tile: super::x86_tiled::dot_avx2,
        q4_0_tilex4: super::x86_tiled::dot4_avx2,
        q8_0_tile: None,
        q4k_tile: Some((super::x86_tiled_k::dot_avx2, super::x86_tiled_k::dot4_avx2)),
        attend,
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
            ..avx2
        });
    }
    out
}

// The safe wrappers below are private and handed out only by `kernels()` after the feature
// check, so calling the `target_feature` functions from them is sound.

fn dot_row_f32(row: &[u8], act: &[f32]) -> f32 {
    unsafe { dot_row_f32_avx2(row, act) }
}

fn dot_row_f16(row: &[u8], act: &[f32]) -> f32 {
    unsafe { dot_row_f16_avx2(row, act) }
}

/// An F32 row (little-endian bytes) against `act`.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_row_f32_avx2(row: &[u8], act: &[f32]) -> f32 {
    // SAFETY: `dot_float_row` asks for 32 readable bytes at each pointer it passes.
    dot_float_row::<4>(
        row,
        act,
        |w| unsafe { _mm256_loadu_ps(w.cast()) },
        |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    )
}

/// An F16 row against `act`: eight weights widened to f32 per `vcvtph2ps`.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_row_f16_avx2(row: &[u8], act: &[f32]) -> f32 {
    // SAFETY: `dot_float_row` asks for 16 readable bytes at each pointer it passes.
    dot_float_row::<2>(
        row,
        act,
        |w| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w.cast())) },
        |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
    )
}

/// A row of `BYTES`-byte floats against `act`: `load` widens the eight weights at a pointer
/// (with `8 * BYTES` bytes readable there) to f32, four 8-lane accumulators take 32 weights a
/// round, then eight at a time, and `one` reads each weight of the tail.
#[inline(always)]
fn dot_float_row<const BYTES: usize>(
    row: &[u8],
    act: &[f32],
    load: impl Fn(*const u8) -> __m256,
    one: impl Fn(&[u8]) -> f32,
) -> f32 {
    let n = act.len();
    assert!(row.len() >= BYTES * n);
    let (w, x) = (row.as_ptr(), act.as_ptr());
    let mut acc = [unsafe { _mm256_setzero_ps() }; 4];
    let mut i = 0;
    // SAFETY: every load reads 8 values at `i..i + 8 <= n` of `act` and `8 * BYTES` bytes at
    // `BYTES * i` of `row`, whose length was checked above; unaligned loads accept any
    // address. The callers run with AVX2 and FMA enabled.
    unsafe {
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let at = i + 8 * j;
                *a = _mm256_fmadd_ps(load(w.add(BYTES * at)), _mm256_loadu_ps(x.add(at)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load(w.add(BYTES * i)), _mm256_loadu_ps(x.add(i)), acc[0]);
            i += 8;
        }
    }
    let mut sum = unsafe {
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    };
    for (k, &x) in act.iter().enumerate().skip(i) {
        sum += one(&row[BYTES * k..BYTES * (k + 1)]) * x;
    }
    sum
}

fn attend(head: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    fn inner(head: &HeadAttn<'_>, out: &mut [f32], scores: &mut [f32]) {
        attend_head_with(head, out, scores, |a, b| dot_f32_avx2(a, b));
    }
    // SAFETY: AVX2, FMA and F16C were detected before this function was handed out.
    unsafe { inner(head, out, scores) }
}

/// [`super::super::attention::dot_f32`] in AVX2, with the same order of additions (so the same
/// result bit for bit): one vector of eight partial sums, its halves added as 128, 64 and 32
/// bits, then the tail's products.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let body = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..body).step_by(8) {
        // SAFETY: `i + 8 <= body <= len` for both slices.
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
    }
    let tail: f32 = a[body..].iter().zip(&b[body..]).map(|(x, y)| x * y).sum();
    let quads = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pairs = _mm_add_ps(quads, _mm_movehl_ps(quads, quads));
    let one = _mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs));
    _mm_cvtss_f32(one) + tail
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

fn dot_q6k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert!(row.len() >= act.len() * 210);
    // SAFETY: as in `dot_q4_0`.
    unsafe { q6k_avx2(row, act) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
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
unsafe fn f16_ptr(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes; `read_unaligned` needs no alignment.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Defines the one-token and four-token dot products of a weight type whose blocks unpack to
/// 32 signed bytes and one f16 scale; `$block(row, i)` reads block `i`. A macro rather than a
/// function taking the unpacker, so that the unpacking is inlined into each loop.
macro_rules! signed_kernels {
    ($one:ident, $four:ident, $bytes:literal, |$row:ident, $i:ident| $block:expr) => {
        /// One row against one activation vector, two accumulators so the FMA latency does
        /// not serialize the loop.
        ///
        /// # Safety
        /// AVX2, FMA and F16C present; `row` holds at least `act.len()` blocks.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $one(row: &[u8], act: &[BlockQ8]) -> f32 {
            let $row = row.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 2];
            for ($i, a) in act.iter().enumerate() {
                // SAFETY: block `i < act.len()` lies inside the row (the caller's guarantee);
                // `a.qs` is 32 bytes.
                let ((d, qx), qy) =
                    unsafe { ($block, _mm256_loadu_si256(a.qs.as_ptr().cast())) };
                let k = $i & 1;
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), mul_sum_i8(qx, qy), acc[k]);
            }
            hsum(_mm256_add_ps(acc[0], acc[1]))
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
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for $i in 0..n {
                    // SAFETY: `i < n` blocks, inside the row by the assert above.
                    let (d, qx) = unsafe { $block };
                    let ax = _mm256_sign_epi8(qx, qx);
                    let k = $i & 1;
                    for (acc, act) in acc.iter_mut().zip(acts) {
                        let a = &act[$i];
                        // SAFETY: `a.qs` is 32 bytes.
                        let qy = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
                        let sy = _mm256_sign_epi8(qy, qx);
                        acc[k] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * a.d),
                            mul_sum_u8_i8(ax, sy),
                            acc[k],
                        );
                    }
                }
                acc.map(|[a, b]| hsum(_mm256_add_ps(a, b)))
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

/// # Safety
/// AVX2, FMA and F16C present; `row` holds at least `act.len()` Q4_1 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_avx2(row: &[u8], act: &[BlockQ8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut offsets = 0f32;
    for (i, a) in act.iter().enumerate() {
        let b = &row[20 * i..20 * i + 20];
        // SAFETY: `b` is 20 bytes.
        let (dw, m) = unsafe { (f16_ptr(b.as_ptr()), f16_ptr(b.as_ptr().add(2))) };
        let d = _mm256_set1_ps(dw * a.d);
        offsets += m * a.s;
        // SAFETY: `b[4..20]` is 16 bytes; `a.qs` is 32 bytes.
        let (qx, qy) = unsafe {
            (
                nibbles(b.as_ptr().add(4)),
                _mm256_loadu_si256(a.qs.as_ptr().cast()),
            )
        };
        acc = _mm256_fmadd_ps(d, mul_sum_u8_i8(qx, qy), acc);
    }
    hsum(acc) + offsets
}

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
    let mut scales = [_mm256_setzero_si256(); 8];
    let mut mins = [0i16; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        let (scale, min) = scale_min_k4(j, packed);
        *s = _mm256_set1_epi16(i16::from(scale));
        mins[2 * j] = i16::from(min);
        mins[2 * j + 1] = i16::from(min);
    }
    // SAFETY: `mins` is 32 bytes.
    let mins = unsafe { _mm256_loadu_si256(mins.as_ptr().cast()) };
    Q4kScales { scales, mins }
}

/// # Safety
/// AVX2, FMA and F16C present; `row` holds at least `act.len()` Q6_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_avx2(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let m4 = _mm256_set1_epi8(0xF);
    let m3 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for (i, a) in act.iter().enumerate() {
        let b = &row[210 * i..210 * i + 210];
        // SAFETY: `b` is 210 bytes.
        let d = unsafe { f16_ptr(b.as_ptr().add(208)) } * a.d;
        let scales = &b[192..208];
        // Weights are stored as q + 32 with q in [-32, 31]: multiply the unsigned value and
        // take 32 × (scale × sum of 16 activations) back out; scale groups and `bsums` both
        // cover 16 elements, in the same order.
        let corr: i32 = scales
            .iter()
            .zip(a.bsums.iter())
            .map(|(&s, &bs)| i32::from(s as i8) * i32::from(bs))
            .sum();
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            // SAFETY: ql at `64n..64n + 64` and qh at `128 + 32n..128 + 32n + 32` lie inside
            // the 210-byte block.
            let (l1, l2, h) = unsafe {
                (
                    _mm256_loadu_si256(b.as_ptr().add(64 * n).cast()),
                    _mm256_loadu_si256(b.as_ptr().add(64 * n + 32).cast()),
                    _mm256_loadu_si256(b.as_ptr().add(128 + 32 * n).cast()),
                )
            };
            let h0 = _mm256_slli_epi16(_mm256_and_si256(h, m3), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4);
            let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4);
            let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4);
            let q = [
                _mm256_or_si256(_mm256_and_si256(l1, m4), h0),
                _mm256_or_si256(_mm256_and_si256(l2, m4), h1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), h2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m4), h3),
            ];
            for (k, qk) in q.iter().enumerate() {
                // SAFETY: reads `a.qs[128n + 32k..128n + 32k + 32]`, inside its 256 bytes.
                let y = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(128 * n + 32 * k).cast()) };
                let s = 8 * n + 2 * k;
                let sv = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(scales[s + 1] as i8)),
                    _mm_set1_epi16(i16::from(scales[s] as i8)),
                );
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(*qk, y), sv);
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        let sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * corr, 0, 0, 0, 0, 0, 0, 0));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}
