//! x86-64 products of eight-row Q4_K and Q5_K tiles ([`super::tiled_k`]) with Q8_K activations: the
//! one-token product (decode) and the four-token product (prefill, each tile column loaded and
//! unpacked once for four tokens), in two variants. AVX2 multiplies a nibble group with the
//! broadcast activations by `maddubs` and applies the eight rows' sub-block scales in the `madd`
//! that widens the products to i32 (the scales take the place of `madd`'s usual ones); AVX-512
//! VNNI (on 256-bit vectors) sums each sub-block's products with one `dpbusd` per group and
//! multiplies the eight sums by the scales once per sub-block.
//!
//! Each variant has one column function generic over the token count: the four-token product
//! computes, for each token, the same exact integer sums as the one-token product and then the
//! same floating-point operations in the same order, so a prompt gives the same sums in a batch
//! as token by token.
//!
//! Reachable only through [`super::x86::kernels`], which hands these functions out after
//! `is_x86_feature_detected!` has proved the features each one enables.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::quant::BlockQ8K;
use super::tiled::TILE_ROWS;
use super::tiled_k::{SCALES, TILE_BLOCK_Q4K, TILE_BLOCK_Q5K, nibble_group, q5_chunk};
use super::x86_tiled::prefetch_ahead;

/// Byte shuffle control picking, in every 32-bit lane `r`, bytes `4r + lo` and `4r + hi` of its
/// 128-bit half as two i16 (`hi = None`: as one i32). A lane of an unpacked scale vector holds
/// one row's four scales (or mins), so this gathers one sub-block's value for eight rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pick(lo: usize, hi: Option<usize>) -> __m256i {
    let step = match hi {
        Some(_) => _mm256_setr_epi32(
            0, 0x4_0004, 0x8_0008, 0xC_000C, 0, 0x4_0004, 0x8_0008, 0xC_000C,
        ),
        None => _mm256_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12),
    };
    let first = [lo as u8, 0x80, hi.map_or(0x80, |h| h as u8), 0x80];
    _mm256_add_epi32(_mm256_set1_epi32(i32::from_le_bytes(first)), step)
}

/// The scales and mins of the tile column at `blk`, unpacked to bytes: `s[h]` and `m[h]` hold,
/// in byte `4r + i`, row `r`'s scale and min of sub-block `4h + i`.
///
/// # Safety
/// `blk` points at a whole tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales(blk: *const u8) -> ([__m256i; 2], [__m256i; 2]) {
    // SAFETY: bytes `SCALES..SCALES + 96` of the column (the caller's guarantee).
    let (l0, l1, h) = unsafe {
        (
            _mm256_loadu_si256(blk.add(SCALES).cast()),
            _mm256_loadu_si256(blk.add(SCALES + 32).cast()),
            _mm256_loadu_si256(blk.add(SCALES + 64).cast()),
        )
    };
    let (m4, m30) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
    let low = |v: __m256i| _mm256_and_si256(v, m4);
    let high = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    let top = |v: __m256i| _mm256_and_si256(v, m30);
    (
        [
            _mm256_or_si256(low(l0), top(_mm256_slli_epi16::<4>(h))),
            _mm256_or_si256(high(l0), top(_mm256_slli_epi16::<2>(h))),
        ],
        [
            _mm256_or_si256(low(l1), top(h)),
            _mm256_or_si256(high(l1), top(_mm256_srli_epi16::<2>(h))),
        ],
    )
}

/// The eight rows' `Σ min · bsum` of one super-block: `m` from [`scales`], `a` one token's
/// activation block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mins(m: &[__m256i; 2], a: &BlockQ8K) -> __m256i {
    // SAFETY: `a.bsums` is 32 bytes.
    let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
    // i16 lanes per 128-bit half: the sums of 32 activations of sub-blocks 0..4 (low half) and
    // 4..8 (high half), so 32-bit lanes 0, 1, 4, 5 pair sub-blocks (0, 1), (2, 3), (4, 5), (6, 7).
    let pairs = _mm256_hadd_epi16(bsums, bsums);
    let mut sum = _mm256_setzero_si256();
    for (p, lane) in [0, 1, 4, 5].into_iter().enumerate() {
        let bs = _mm256_permutevar8x32_epi32(pairs, _mm256_set1_epi32(lane));
        let mp = _mm256_shuffle_epi8(m[p / 2], pick(2 * (p % 2), Some(2 * (p % 2) + 1)));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(mp, bs));
    }
    sum
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

/// The weights of group `k` of pair `p` of the column at `blk`: low nibbles (sub-block `2p`)
/// and high nibbles (sub-block `2p + 1`), with their fifth bits for a Q5_K column (`Q5`).
///
/// # Safety
/// `blk` points at a whole tile column (of Q5_K when `Q5`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const Q5: bool>(blk: *const u8, p: usize, k: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0xF);
    // SAFETY: 32 bytes inside the column's nibbles (the caller's guarantee).
    let w = unsafe { _mm256_loadu_si256(blk.add(nibble_group(Q5, p, k)).cast()) };
    let (lo, hi) = (
        _mm256_and_si256(w, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4),
    );
    if !Q5 {
        return (lo, hi);
    }
    // SAFETY: 32 bytes inside the Q5_K column's fifth bits (the caller's guarantee).
    let bits = unsafe { _mm256_loadu_si256(blk.add(q5_chunk(k)).cast()) };
    // Bits `2p` and `2p + 1` of every byte to bit 0 and 1 (what the 16-bit shift brings in
    // from the next byte lands above them), then each to bit 4.
    let h = _mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * p as i32));
    let m16 = _mm256_set1_epi8(0x10);
    (
        _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(h), m16)),
        _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<3>(h), m16)),
    )
}

/// One tile column against `N` tokens (AVX2): per token, the eight rows' `Σ scale · q · a` and
/// `Σ min · bsum`.
///
/// # Safety
/// `blk` points at a whole tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column_avx2<const N: usize, const Q5: bool>(
    blk: *const u8,
    acts: [&BlockQ8K; N],
) -> [(__m256i, __m256i); N] {
    // SAFETY: the caller's guarantee.
    let (s, m) = unsafe { scales(blk) };
    // Each row's scale of sub-block `2p` (low nibbles) and `2p + 1` as both i16 of its lane, so
    // that `madd` applies it.
    let sc = |p: usize| {
        (
            _mm256_shuffle_epi8(s[p / 2], pick(2 * (p % 2), Some(2 * (p % 2)))),
            _mm256_shuffle_epi8(s[p / 2], pick(2 * (p % 2) + 1, Some(2 * (p % 2) + 1))),
        )
    };
    let mut sumi = [_mm256_setzero_si256(); N];
    // `maddubs` cannot saturate: a pair of weights (≤ 31) times activations (|a| ≤ 128) stays
    // within ±7936.
    let mut add = |(lo, hi): (__m256i, __m256i), (sc_lo, sc_hi), p: usize, k: usize| {
        for (sumi, a) in sumi.iter_mut().zip(acts) {
            let pl = _mm256_maddubs_epi16(lo, act4(a, 64 * p + 4 * k));
            let ph = _mm256_maddubs_epi16(hi, act4(a, 64 * p + 32 + 4 * k));
            *sumi = _mm256_add_epi32(
                *sumi,
                _mm256_add_epi32(_mm256_madd_epi16(pl, sc_lo), _mm256_madd_epi16(ph, sc_hi)),
            );
        }
    };
    if Q5 && N == 1 {
        // Chunk by chunk: the column front to back (the integer sums do not depend on the order).
        let sc: [_; 4] = std::array::from_fn(sc);
        for k in 0..8 {
            for (p, sc) in sc.iter().enumerate() {
                // SAFETY: the caller's guarantee.
                add(unsafe { group::<Q5>(blk, p, k) }, *sc, p, k);
            }
        }
    } else {
        for p in 0..4 {
            let sc = sc(p);
            for k in 0..8 {
                // SAFETY: the caller's guarantee.
                add(unsafe { group::<Q5>(blk, p, k) }, sc, p, k);
            }
        }
    }
    std::array::from_fn(|t| (sumi[t], mins(&m, acts[t])))
}

/// As [`column_avx2`] with VNNI: one `dpbusd` per group and token, the scales applied to each
/// sub-block's sums.
///
/// # Safety
/// `blk` points at a whole tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn column_vnni<const N: usize, const Q5: bool>(
    blk: *const u8,
    acts: [&BlockQ8K; N],
) -> [(__m256i, __m256i); N] {
    // SAFETY: the caller's guarantee.
    let (s, m) = unsafe { scales(blk) };
    let mut sumi = [_mm256_setzero_si256(); N];
    if Q5 && N == 1 {
        // Chunk by chunk: the column front to back, one chain per sub-block.
        let mut sub = [[_mm256_setzero_si256(); 2]; 4];
        for k in 0..8 {
            for (p, sub) in sub.iter_mut().enumerate() {
                // SAFETY: the caller's guarantee.
                let (lo, hi) = unsafe { group::<Q5>(blk, p, k) };
                let a = acts[0];
                sub[0] = _mm256_dpbusd_epi32(sub[0], lo, act4(a, 64 * p + 4 * k));
                sub[1] = _mm256_dpbusd_epi32(sub[1], hi, act4(a, 64 * p + 32 + 4 * k));
            }
        }
        for (p, sub) in sub.iter().enumerate() {
            let sc_lo = _mm256_shuffle_epi8(s[p / 2], pick(2 * (p % 2), None));
            let sc_hi = _mm256_shuffle_epi8(s[p / 2], pick(2 * (p % 2) + 1, None));
            sumi[0] = _mm256_add_epi32(
                sumi[0],
                _mm256_add_epi32(
                    _mm256_mullo_epi32(sub[0], sc_lo),
                    _mm256_mullo_epi32(sub[1], sc_hi),
                ),
            );
        }
        return std::array::from_fn(|t| (sumi[t], mins(&m, acts[t])));
    }
    for p in 0..4 {
        // One token: two chains per sub-block (even and odd groups), so that the `dpbusd`
        // latencies overlap. Four tokens have chains enough, and no registers to spare.
        let mut lo_sum = [[_mm256_setzero_si256(); N]; 2];
        let mut hi_sum = [[_mm256_setzero_si256(); N]; 2];
        for k in 0..8 {
            // SAFETY: the caller's guarantee.
            let (lo, hi) = unsafe { group::<Q5>(blk, p, k) };
            let chain = if N == 1 { k % 2 } else { 0 };
            let (lo_sum, hi_sum) = (&mut lo_sum[chain], &mut hi_sum[chain]);
            for t in 0..N {
                let a = acts[t];
                lo_sum[t] = _mm256_dpbusd_epi32(lo_sum[t], lo, act4(a, 64 * p + 4 * k));
                hi_sum[t] = _mm256_dpbusd_epi32(hi_sum[t], hi, act4(a, 64 * p + 32 + 4 * k));
            }
        }
        let lo_sum: [__m256i; N] =
            std::array::from_fn(|t| _mm256_add_epi32(lo_sum[0][t], lo_sum[1][t]));
        let hi_sum: [__m256i; N] =
            std::array::from_fn(|t| _mm256_add_epi32(hi_sum[0][t], hi_sum[1][t]));
        let sc_lo = _mm256_shuffle_epi8(s[p / 2], pick(2 * (p % 2), None));
        let sc_hi = _mm256_shuffle_epi8(s[p / 2], pick(2 * (p % 2) + 1, None));
        for t in 0..N {
            sumi[t] = _mm256_add_epi32(
                sumi[t],
                _mm256_add_epi32(
                    _mm256_mullo_epi32(lo_sum[t], sc_lo),
                    _mm256_mullo_epi32(hi_sum[t], sc_hi),
                ),
            );
        }
    }
    std::array::from_fn(|t| (sumi[t], mins(&m, acts[t])))
}

/// Eight f32 lanes as an array.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes(v: __m256) -> [f32; TILE_ROWS] {
    let mut out = [0f32; TILE_ROWS];
    // SAFETY: `out` is 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

macro_rules! q4k_tile_kernels {
    ($features:literal, $column:ident) => {
        /// The eight rows of a tile (of Q5_K when `Q5`, columns of `COLUMN` bytes) against `N`
        /// activation vectors of `n` super-blocks.
        #[inline]
        #[target_feature(enable = $features)]
        fn tile_n<const N: usize, const Q5: bool, const COLUMN: usize>(
            tile: &[u8],
            acts: [&[BlockQ8K]; N],
            n: usize,
        ) -> [[f32; TILE_ROWS]; N] {
            assert!(tile.len() >= n * COLUMN && acts.iter().all(|a| a.len() == n));
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..n {
                // Four tokens spend long enough on a column (and take a Q5_K column out of
                // order) that the hardware's prefetching falls behind.
                if N > 1 {
                    let column = tile.as_ptr().wrapping_add(COLUMN * b);
                    prefetch_ahead(column, COLUMN);
                }
                // SAFETY: column `b < n` lies inside the tile (asserted above); its first 32
                // bytes are the eight `d` and the eight `dmin`.
                let (d8, dmin8, sums) = unsafe {
                    let blk = tile.as_ptr().add(COLUMN * b);
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16).cast())),
                        $column::<N, Q5>(blk, std::array::from_fn(|t| &acts[t][b])),
                    )
                };
                for (t, (sumi, summ)) in sums.into_iter().enumerate() {
                    let ad = _mm256_set1_ps(acts[t][b].d);
                    let d = _mm256_mul_ps(d8, ad);
                    let dmin = _mm256_mul_ps(dmin8, ad);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), d, acc[t]);
                    acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(summ), dmin, acc[t]);
                }
            }
            acc.map(|a| lanes(a))
        }

        /// The eight rows of a Q4_K tile against one activation vector.
        pub(crate) fn dot(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
            // SAFETY: the features were detected before this function was handed out.
            let [out] = unsafe { tile_n::<1, false, TILE_BLOCK_Q4K>(tile, [act], act.len()) };
            out
        }

        /// The eight rows of a Q4_K tile against four activation vectors: each column is
        /// loaded and unpacked once for the four tokens.
        pub(crate) fn dot4(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
            // SAFETY: the features were detected before this function was handed out.
            unsafe { tile_n::<4, false, TILE_BLOCK_Q4K>(tile, acts, acts[0].len()) }
        }

        /// The eight rows of a Q5_K tile against one activation vector.
        pub(crate) fn dot_q5k(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
            // SAFETY: the features were detected before this function was handed out.
            let [out] = unsafe { tile_n::<1, true, TILE_BLOCK_Q5K>(tile, [act], act.len()) };
            out
        }

        /// The eight rows of a Q5_K tile against four activation vectors.
        pub(crate) fn dot4_q5k(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
            // SAFETY: the features were detected before this function was handed out.
            unsafe { tile_n::<4, true, TILE_BLOCK_Q5K>(tile, acts, acts[0].len()) }
        }
    };
}

mod avx2 {
    use super::*;
    q4k_tile_kernels!("avx2,fma,f16c", column_avx2);
}

mod vnni {
    use super::*;
    q4k_tile_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", column_vnni);
}

pub(super) use avx2::{
    dot as dot_avx2, dot_q5k as dot_q5k_avx2, dot4 as dot4_avx2, dot4_q5k as dot4_q5k_avx2,
};
pub(super) use vnni::{
    dot as dot_vnni, dot_q5k as dot_q5k_vnni, dot4 as dot4_vnni, dot4_q5k as dot4_q5k_vnni,
};
