//! x86-64 (AVX2) products of eight-row Q6_K tiles ([`super::tiled_k::repack_q6k`]) with Q8_K
//! activations: the one-token product (decode) and the four-token product (prefill, each tile
//! column loaded and unpacked once for four tokens).
//!
//! A group of four columns × eight rows gets its six-bit values from a nibble group and a
//! high-bit group (one shift and two masks each), `maddubs` multiplies it with four activations
//! broadcast to every lane, and the `madd` that widens the products to i32 applies the eight
//! rows' scales of that group's sub-block (sign-extended to i16, in place of `madd`'s usual
//! ones). The values are taken unsigned (0..63); `32 · Σ scale · bsum` comes off once per
//! super-block, so a column ends with the eight rows' exact integer sums in one vector.
//!
//! One column function, generic over the token count, gives each token the same integer sums
//! and then the same floating-point operations in the same order, so a prompt gives the same
//! sums in a batch as token by token.
//!
//! Reachable only through [`super::x86::kernels`], which hands these functions out after
//! `is_x86_feature_detected!` has proved AVX2, FMA and F16C.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::quant::BlockQ8K;
use super::tiled::TILE_ROWS;
use super::tiled_k::{Q6_HIGH, Q6_LOW, Q6_SCALES, TILE_BLOCK_Q6K};
use super::x86_tiled::prefetch_ahead;

/// Shuffle control putting, in both i16 halves of every 32-bit lane `r` (of its 128-bit half),
/// byte `4r + lo` and `4r + hi` of the scale vector into the high byte: an arithmetic shift
/// right by 8 then sign-extends the two scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pick_signed(lo: usize, hi: usize) -> __m256i {
    let base = i32::from_le_bytes([0x80, lo as u8, 0x80, hi as u8]);
    let step = _mm256_setr_epi32(
        0,
        0x0400_0400,
        0x0800_0800,
        0x0C00_0C00,
        0,
        0x0400_0400,
        0x0800_0800,
        0x0C00_0C00,
    );
    _mm256_add_epi32(_mm256_set1_epi32(base), step)
}

/// Eight rows' scale of sub-block `j` (of the scale vectors `s`) as both i16 of each lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale16(s: &[__m256i; 4], j: usize) -> __m256i {
    _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(s[j / 4], pick_signed(j % 4, j % 4)))
}

/// Four activations of `a` from value `at`, broadcast to every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn act4(a: &BlockQ8K, at: usize) -> __m256i {
    let q = &a.qs[at..at + 4];
    _mm256_set1_epi32(i32::from_le_bytes([
        q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
    ]))
}

/// One tile column against `N` tokens: per token, the eight rows' `Σ scale · (q - 32) · a`.
///
/// # Safety
/// `blk` points at a whole Q6_K tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column<const N: usize>(blk: *const u8, acts: [&BlockQ8K; N]) -> [__m256i; N] {
    // SAFETY: every load lies inside the column (the caller's guarantee).
    unsafe {
        let s: [__m256i; 4] =
            std::array::from_fn(|h| _mm256_loadu_si256(blk.add(Q6_SCALES + 32 * h).cast()));
        let (m4, m30) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
        let mut sumi = [_mm256_setzero_si256(); N];
        for p in 0..4 {
            let (h, sh) = (p / 2, p % 2);
            let shift = _mm_cvtsi32_si128(2 * sh as i32);
            for half in 0..2 {
                // Groups `4 half..4 half + 4` share their sub-blocks.
                let j = 8 * h + 2 * sh + half;
                let (sc_lo, sc_hi) = (scale16(&s, j), scale16(&s, j + 4));
                for k in 4 * half..4 * half + 4 {
                    let w = _mm256_loadu_si256(blk.add(Q6_LOW + 256 * p + 32 * k).cast());
                    let bits = _mm256_loadu_si256(blk.add(Q6_HIGH + 256 * h + 32 * k).cast());
                    // Bits `2sh, 2sh + 1` of each byte to bits 0, 1 (and `4 + 2sh, 5 + 2sh`
                    // to 4, 5); what the 16-bit shift brings in from the next byte is masked.
                    let hb = _mm256_srl_epi16(bits, shift);
                    let lo = _mm256_or_si256(
                        _mm256_and_si256(w, m4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(hb), m30),
                    );
                    let hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4),
                        _mm256_and_si256(hb, m30),
                    );
                    let at = 128 * h + 32 * sh + 4 * k;
                    for (sumi, a) in sumi.iter_mut().zip(acts) {
                        // Cannot saturate: a pair of values (≤ 63) times activations
                        // (|a| ≤ 128) stays within ±16128.
                        let pl = _mm256_maddubs_epi16(lo, act4(a, at));
                        let ph = _mm256_maddubs_epi16(hi, act4(a, at + 64));
                        *sumi = _mm256_add_epi32(
                            *sumi,
                            _mm256_add_epi32(
                                _mm256_madd_epi16(pl, sc_lo),
                                _mm256_madd_epi16(ph, sc_hi),
                            ),
                        );
                    }
                }
            }
        }
        // `Σ scale · bsum`, sub-blocks in pairs: lane `q` of the bsums holds sums `2q, 2q + 1`.
        let pairs: [__m256i; 8] = std::array::from_fn(|q| {
            let j = 2 * q;
            _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(s[j / 4], pick_signed(j % 4, j % 4 + 1)))
        });
        std::array::from_fn(|t| {
            let bsums = _mm256_loadu_si256(acts[t].bsums.as_ptr().cast());
            let mut off = _mm256_setzero_si256();
            for (q, sc) in pairs.iter().enumerate() {
                let bs = _mm256_permutevar8x32_epi32(bsums, _mm256_set1_epi32(q as i32));
                off = _mm256_add_epi32(off, _mm256_madd_epi16(*sc, bs));
            }
            _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(off))
        })
    }
}

/// The eight rows of a tile against `N` activation vectors of `n` super-blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // a column index into the tile and every token's blocks
fn tile_n<const N: usize>(tile: &[u8], acts: [&[BlockQ8K]; N], n: usize) -> [[f32; TILE_ROWS]; N] {
    assert!(tile.len() >= n * TILE_BLOCK_Q6K && acts.iter().all(|a| a.len() == n));
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..n {
        let blk = tile.as_ptr().wrapping_add(TILE_BLOCK_Q6K * b);
        // The column is read out of order (low nibbles, then high bits from the column's end),
        // which the hardware prefetcher does not follow, so one token takes the hint too.
        prefetch_ahead(blk, TILE_BLOCK_Q6K);
        // SAFETY: column `b < n` lies inside the tile (asserted above); its first 16 bytes
        // are the eight `d`.
        let (d8, sums) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                column::<N>(blk, std::array::from_fn(|t| &acts[t][b])),
            )
        };
        for (t, sumi) in sums.into_iter().enumerate() {
            let d = _mm256_mul_ps(d8, _mm256_set1_ps(acts[t][b].d));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), d, acc[t]);
        }
    }
    let mut out = [[0f32; TILE_ROWS]; N];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` is 8 floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
    }
    out
}

/// The eight rows of a Q6_K tile against one activation vector.
pub(super) fn dot(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
    // SAFETY: the features were detected before this function was handed out.
    let [out] = unsafe { tile_n::<1>(tile, [act], act.len()) };
    out
}

/// The eight rows of a Q6_K tile against four activation vectors: each column is loaded and
/// unpacked once for the four tokens.
pub(super) fn dot4(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
    // SAFETY: the features were detected before this function was handed out.
    unsafe { tile_n::<4>(tile, acts, acts[0].len()) }
}
