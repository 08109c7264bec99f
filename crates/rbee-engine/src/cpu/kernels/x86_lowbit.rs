//! AVX2 + FMA products of Q2_K and Q3_K rows ([`super::lowbit`]) with Q8_K activations, for one
//! token (decode) and four (prefill: each super-block unpacked once for the four).
//!
//! A K-quant super-block unpacks to eight vectors of 32 unsigned weight bytes, `maddubs` with
//! the activation bytes, then a `madd` whose i16 factors are the sub-block scales (the low half
//! of each vector is one 16-weight sub-block, the high half the next). What the unsigned bytes
//! leave out (Q2_K's mins, Q3_K's offset of 4) comes back as one `madd` of per-sub-block
//! factors with the activations' 16-element sums (`bsums`).
//!
//! Each type has one function generic over the token count, so the four-token product does, for
//! each token, exactly the one-token product's operations in the same order: a sequence gets the
//! same logits alone and in a batch.
//!
//! Reachable only through [`super::x86::kernels`], which hands these functions out after
//! `is_x86_feature_detected!` has proved the CPU runs AVX2, FMA and F16C.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::quant::BlockQ8K;
use super::lowbit::{Q2K_BYTES, Q3K_BYTES};
use super::x86::{f16_ptr, hsum};

// The safe wrappers below are handed out only after the feature check (see the module doc), so
// calling the `target_feature` functions from them is sound; the kernels slice every block they
// read out of the row, so a short row panics rather than reads past it.

pub(super) fn dot_q2k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert!(row.len() >= act.len() * Q2K_BYTES);
    // SAFETY: the features were detected before this function was handed out.
    let [out] = unsafe { q2k_avx2(row, [act]) };
    out
}

pub(super) fn dot_q2kx4(row: &[u8], acts: [&[BlockQ8K]; 4]) -> [f32; 4] {
    assert!(acts.iter().all(|a| a.len() == acts[0].len()));
    assert!(row.len() >= acts[0].len() * Q2K_BYTES);
    // SAFETY: as in `dot_q2k`.
    unsafe { q2k_avx2(row, acts) }
}

pub(super) fn dot_q3k(row: &[u8], act: &[BlockQ8K]) -> f32 {
    assert!(row.len() >= act.len() * Q3K_BYTES);
    // SAFETY: as in `dot_q2k`.
    let [out] = unsafe { q3k_avx2(row, [act]) };
    out
}

pub(super) fn dot_q3kx4(row: &[u8], acts: [&[BlockQ8K]; 4]) -> [f32; 4] {
    assert!(acts.iter().all(|a| a.len() == acts[0].len()));
    assert!(row.len() >= acts[0].len() * Q3K_BYTES);
    // SAFETY: as in `dot_q2k`.
    unsafe { q3k_avx2(row, acts) }
}

/// The sub-block scales of weight vector `k` as `madd` needs them against its `maddubs`
/// products: from `bytes`, the sixteen one-byte scales in both 128-bit halves, scale `2k` in
/// every i16 lane of the low half and `2k + 1` in every lane of the high half, each at `shift`
/// (0: its byte zero-extended, for unsigned scales; 8: its byte as the high byte, so a signed
/// scale keeps its sign, times 256). One byte shuffle, the only instruction on the shuffle port
/// per weight vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pair(bytes: __m256i, k: usize, shift: u32) -> __m256i {
    let pick = |s: usize| {
        let s = s as u8;
        let lane = if shift == 8 { [0x80, s] } else { [s, 0x80] };
        _mm_set1_epi16(i16::from_le_bytes(lane))
    };
    _mm256_shuffle_epi8(bytes, _mm256_set_m128i(pick(2 * k + 1), pick(2 * k)))
}

/// `v`'s 16-bit lanes shifted right by `bits` (`0..8`), by an immediate: the callers' loops are
/// unrolled, so the match folds away.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shr(v: __m256i, bits: usize) -> __m256i {
    match bits {
        0 => v,
        1 => _mm256_srli_epi16::<1>(v),
        2 => _mm256_srli_epi16::<2>(v),
        3 => _mm256_srli_epi16::<3>(v),
        4 => _mm256_srli_epi16::<4>(v),
        5 => _mm256_srli_epi16::<5>(v),
        6 => _mm256_srli_epi16::<6>(v),
        _ => _mm256_srli_epi16::<7>(v),
    }
}

/// The 2-bit values at bits `2j` of each byte of `q`, for `j` in `0..4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn crumbs(q: __m256i, j: usize) -> __m256i {
    _mm256_and_si256(shr(q, 2 * j), _mm256_set1_epi8(3))
}

/// Bit `k` (`0..8`) of each byte of `mask`, moved to bit 2 (a value of 4 or 0). The 16-bit
/// shifts carry no bit across a byte into bit 2 of either byte of a lane: bit 2 comes from
/// bit `k` of the same byte.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bit_as_four(mask: __m256i, k: usize) -> __m256i {
    let moved = match k {
        0 => _mm256_slli_epi16::<2>(mask),
        1 => _mm256_slli_epi16::<1>(mask),
        k => shr(mask, k - 2),
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(4))
}

/// The 32 activations of token block `a` that pair with weight vector `k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn act32(a: &BlockQ8K, k: usize) -> __m256i {
    let y = &a.qs[32 * k..32 * k + 32];
    // SAFETY: `y` is 32 bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(y.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bsums(a: &BlockQ8K) -> __m256i {
    // SAFETY: `bsums` is sixteen i16, 32 bytes.
    unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) }
}

/// `Σ_k madd(maddubs(w[k], activations k), pair(scales, k))`: each sub-block's scale times the
/// sum of its weights times activations, as eight i32 partial sums. `maddubs` cannot saturate:
/// weights are at most 7, so a pair of products is at most 1,792 in size.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_sums(w: &[__m256i; 8], pairs: &[__m256i; 8], a: &BlockQ8K) -> __m256i {
    let mut sumi = _mm256_setzero_si256();
    for k in 0..8 {
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[k], act32(a, k)), pairs[k]);
        sumi = _mm256_add_epi32(sumi, p);
    }
    sumi
}

/// `N` tokens against one Q2_K row: per super-block, `d · d_a · Σ scale · Σ q·a − dmin · d_a ·
/// Σ min · bsum`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2k_avx2<const N: usize>(row: &[u8], acts: [&[BlockQ8K]; N]) -> [f32; N] {
    let m4 = _mm_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..acts[0].len() {
        let b = &row[Q2K_BYTES * i..Q2K_BYTES * (i + 1)];
        // SAFETY: 16 bytes at 0 and 32 at 16 and 48 of the 84-byte block; 2 at 80 and 82.
        let (sc, q, d, dmin) = unsafe {
            let p = b.as_ptr();
            (
                _mm_loadu_si128(p.cast()),
                [
                    _mm256_loadu_si256(p.add(16).cast()),
                    _mm256_loadu_si256(p.add(48).cast()),
                ],
                f16_ptr(p.add(80)),
                f16_ptr(p.add(82)),
            )
        };
        let scales = _mm256_broadcastsi128_si256(_mm_and_si128(sc, m4));
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), m4));
        let w: [__m256i; 8] = std::array::from_fn(|k| crumbs(q[k / 4], k % 4));
        let pairs: [__m256i; 8] = std::array::from_fn(|k| pair(scales, k, 0));
        for (acc, act) in acc.iter_mut().zip(acts) {
            let a = &act[i];
            let sumi = scaled_sums(&w, &pairs, a);
            let summ = _mm256_madd_epi16(mins, bsums(a));
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi), *acc);
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * a.d), _mm256_cvtepi32_ps(summ), *acc);
        }
    }
    acc.map(|a| hsum(a))
}

/// The sixteen 6-bit scales of a Q3_K super-block (`p`: its 12 packed bytes), less their bias
/// of 32, as i8: the layout of [`super::lowbit::q3k_scales`], unpacked four at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_scales(p: &[u8]) -> __m128i {
    let word = |k: usize| u32::from_le_bytes([p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3]]);
    let (a0, a1, high) = (word(0), word(1), word(2));
    let (low4, low2) = (0x0F0F_0F0F, 0x0303_0303);
    let s = [
        (a0 & low4) | (high & low2) << 4,
        (a1 & low4) | (high >> 2 & low2) << 4,
        (a0 >> 4 & low4) | (high >> 4 & low2) << 4,
        (a1 >> 4 & low4) | (high >> 6 & low2) << 4,
    ];
    let s = _mm_setr_epi32(s[0] as i32, s[1] as i32, s[2] as i32, s[3] as i32);
    _mm_sub_epi8(s, _mm_set1_epi8(32))
}

/// `N` tokens against one Q3_K row. Weights are taken as `q + 4` (`0..8`, unsigned for
/// `maddubs`); per super-block `d · d_a · (Σ scale · Σ (q + 4)·a − 4 · Σ scale · bsum)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_avx2<const N: usize>(row: &[u8], acts: [&[BlockQ8K]; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..acts[0].len() {
        let b = &row[Q3K_BYTES * i..Q3K_BYTES * (i + 1)];
        // SAFETY: 32 bytes at 0, 32 and 64 of the 110-byte block; 2 at 108.
        let (hmask, q, d) = unsafe {
            let p = b.as_ptr();
            (
                _mm256_loadu_si256(p.cast()),
                [
                    _mm256_loadu_si256(p.add(32).cast()),
                    _mm256_loadu_si256(p.add(64).cast()),
                ],
                f16_ptr(p.add(108)),
            )
        };
        let packed = q3k_scales(&b[96..108]);
        let scales = _mm256_cvtepi8_epi16(packed);
        // Weight vector `k = 4n + j` has its high bits at bit `k` of the mask bytes.
        let w: [__m256i; 8] = std::array::from_fn(|k| {
            _mm256_or_si256(crumbs(q[k / 4], k % 4), bit_as_four(hmask, k))
        });
        // The scales times 256 (signed bytes as high bytes); the sum is shifted back once.
        let pairs: [__m256i; 8] =
            std::array::from_fn(|k| pair(_mm256_broadcastsi128_si256(packed), k, 8));
        for (acc, act) in acc.iter_mut().zip(acts) {
            let a = &act[i];
            // Exact: every term of the sum is a multiple of 256, and its size stays below 2^28
            // (eight products of at most 1,792 × 32 × 2 per lane, times 256).
            let sumi = _mm256_srai_epi32::<8>(scaled_sums(&w, &pairs, a));
            let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(scales, bsums(a)));
            let sumi = _mm256_sub_epi32(sumi, offset);
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi), *acc);
        }
    }
    acc.map(|a| hsum(a))
}
