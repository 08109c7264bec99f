//! x86-64 products of eight-row Q6_K tiles ([`super::tiled_k::repack_q6k`]) with Q8_K
//! activations: the one-token product (decode) and the four-token product (prefill, each tile
//! column loaded and unpacked once for four tokens), in two variants.
//!
//! A quad of a column (its high bits, then the two nibble groups they complete) gives four
//! groups of four columns × eight rows of six-bit values, with one shift and one masked merge
//! each. AVX2 multiplies a group with four activations broadcast to every lane by `maddubs`
//! and applies the eight rows' scales of the group's sub-block in the `madd` that widens the
//! products to i32 (sign-extended to i16, in place of `madd`'s usual ones); AVX-512 VNNI (on
//! 256-bit vectors) sums each sub-block's products with one `dpbusd` per group and multiplies
//! the eight sums by the scales once per sub-block. The values are taken unsigned (0..63);
//! `32 · Σ scale · bsum` comes off once per super-block, so a column ends with the eight rows'
//! exact integer sums in one vector.
//!
//! Each variant has one column function, generic over the token count, which gives each token
//! the same integer sums and then the same floating-point operations in the same order, so a
//! prompt gives the same sums in a batch as token by token, and both variants the same results.
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
use super::tiled_k::{Q6_SCALES, TILE_BLOCK_Q6K, q6_quad};
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

/// Eight rows' scale of sub-block `j` as the i32 of each lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale32(s: &[__m256i; 4], j: usize) -> __m256i {
    // Byte `4r + j % 4` to the top byte of lane `r` (the low i16's control bytes pick nothing).
    let ctrl = _mm256_or_si256(
        pick_signed(j % 4, j % 4),
        _mm256_set1_epi32(0x0000_FFFF_u32 as i32),
    );
    _mm256_srai_epi32::<24>(_mm256_shuffle_epi8(s[j / 4], ctrl))
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

/// The four groups of six-bit values of quad `8h + k` of the column at `blk`, and the offsets of
/// their activations: the low and the high nibbles of `ql` bytes `64h + 4k..` (weights
/// `128h + 4k..` and `128h + 64 + 4k..`), then those of `ql` bytes `64h + 32 + 4k..`.
///
/// # Safety
/// `blk` points at a whole Q6_K tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quad(blk: *const u8, h: usize, k: usize) -> [(__m256i, usize); 4] {
    // SAFETY: the quad's 96 bytes lie inside the column (the caller's guarantee).
    let (bits, w0, w1) = unsafe {
        let q = blk.add(q6_quad(h, k));
        (
            _mm256_loadu_si256(q.cast()),
            _mm256_loadu_si256(q.add(32).cast()),
            _mm256_loadu_si256(q.add(64).cast()),
        )
    };
    let (m4, m30) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
    // Each value's two high bits to bits 4 and 5 of its byte; what a 16-bit shift brings in
    // from the neighbouring byte is masked off.
    let value = |nibble: __m256i, high: __m256i| {
        _mm256_or_si256(_mm256_and_si256(nibble, m4), _mm256_and_si256(high, m30))
    };
    let at = 128 * h + 4 * k;
    [
        (value(w0, _mm256_slli_epi16::<4>(bits)), at),
        (value(_mm256_srli_epi16::<4>(w0), bits), at + 64),
        (value(w1, _mm256_slli_epi16::<2>(bits)), at + 32),
        (
            value(_mm256_srli_epi16::<4>(w1), _mm256_srli_epi16::<2>(bits)),
            at + 96,
        ),
    ]
}

/// The sub-blocks of quad `8h + k`'s four groups ([`quad`]'s order), `half = k / 4`.
fn sub_blocks(h: usize, half: usize) -> [usize; 4] {
    let j = 8 * h + half;
    [j, j + 4, j + 2, j + 6]
}

/// Per token, the eight rows' `Σ scale · q · a` less `32 · Σ scale · bsum`, from `sumi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn offset<const N: usize>(
    s: &[__m256i; 4],
    sumi: [__m256i; N],
    acts: [&BlockQ8K; N],
) -> [__m256i; N] {
    // `Σ scale · bsum`, sub-blocks in pairs: lane `q` of the bsums holds sums `2q, 2q + 1`.
    let pairs: [__m256i; 8] = std::array::from_fn(|q| {
        let j = 2 * q;
        _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(s[j / 4], pick_signed(j % 4, j % 4 + 1)))
    });
    std::array::from_fn(|t| {
        // SAFETY: `bsums` is 32 bytes.
        let bsums = unsafe { _mm256_loadu_si256(acts[t].bsums.as_ptr().cast()) };
        let mut off = _mm256_setzero_si256();
        for (q, sc) in pairs.iter().enumerate() {
            let bs = _mm256_permutevar8x32_epi32(bsums, _mm256_set1_epi32(q as i32));
            off = _mm256_add_epi32(off, _mm256_madd_epi16(*sc, bs));
        }
        _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(off))
    })
}

/// The column's scale vectors.
///
/// # Safety
/// `blk` points at a whole Q6_K tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales(blk: *const u8) -> [__m256i; 4] {
    // SAFETY: bytes `Q6_SCALES..Q6_SCALES + 128` of the column (the caller's guarantee).
    std::array::from_fn(|v| unsafe { _mm256_loadu_si256(blk.add(Q6_SCALES + 32 * v).cast()) })
}

/// One tile column against `N` tokens (AVX2): per token, the eight rows' `Σ scale · (q - 32) · a`.
///
/// # Safety
/// `blk` points at a whole Q6_K tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn column_avx2<const N: usize>(blk: *const u8, acts: [&BlockQ8K; N]) -> [__m256i; N] {
    // SAFETY: the caller's guarantee.
    let s = unsafe { scales(blk) };
    let mut sumi = [_mm256_setzero_si256(); N];
    for h in 0..2 {
        for half in 0..2 {
            let sc = sub_blocks(h, half).map(|j| scale16(&s, j));
            for k in 4 * half..4 * half + 4 {
                // SAFETY: the caller's guarantee.
                let groups = unsafe { quad(blk, h, k) };
                for (sumi, a) in sumi.iter_mut().zip(acts) {
                    for ((v, at), sc) in groups.iter().zip(&sc) {
                        // Cannot saturate: a pair of values (≤ 63) times activations
                        // (|a| ≤ 128) stays within ±16128.
                        let p = _mm256_maddubs_epi16(*v, act4(a, *at));
                        *sumi = _mm256_add_epi32(*sumi, _mm256_madd_epi16(p, *sc));
                    }
                }
            }
        }
    }
    offset(&s, sumi, acts)
}

/// As [`column_avx2`] with VNNI: one `dpbusd` per group and token, the scales applied to each
/// sub-block's sums.
///
/// # Safety
/// `blk` points at a whole Q6_K tile column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn column_vnni<const N: usize>(blk: *const u8, acts: [&BlockQ8K; N]) -> [__m256i; N] {
    // SAFETY: the caller's guarantee.
    let s = unsafe { scales(blk) };
    let mut sumi = [_mm256_setzero_si256(); N];
    for h in 0..2 {
        for half in 0..2 {
            let mut sub = [[_mm256_setzero_si256(); 4]; N];
            for k in 4 * half..4 * half + 4 {
                // SAFETY: the caller's guarantee.
                let groups = unsafe { quad(blk, h, k) };
                for (sub, a) in sub.iter_mut().zip(acts) {
                    for (sub, (v, at)) in sub.iter_mut().zip(groups) {
                        *sub = _mm256_dpbusd_epi32(*sub, v, act4(a, at));
                    }
                }
            }
            let sc = sub_blocks(h, half).map(|j| scale32(&s, j));
            for (sumi, sub) in sumi.iter_mut().zip(sub) {
                for (sub, sc) in sub.iter().zip(&sc) {
                    *sumi = _mm256_add_epi32(*sumi, _mm256_mullo_epi32(*sub, *sc));
                }
            }
        }
    }
    offset(&s, sumi, acts)
}

macro_rules! q6k_tile_kernels {
    ($features:literal, $column:ident) => {
        /// The eight rows of a tile against `N` activation vectors of `n` super-blocks.
        #[inline]
        #[target_feature(enable = $features)]
        fn tile_n<const N: usize>(
            tile: &[u8],
            acts: [&[BlockQ8K]; N],
            n: usize,
        ) -> [[f32; TILE_ROWS]; N] {
            assert!(tile.len() >= n * TILE_BLOCK_Q6K && acts.iter().all(|a| a.len() == n));
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..n {
                let blk = tile.as_ptr().wrapping_add(TILE_BLOCK_Q6K * b);
                if N > 1 {
                    prefetch_ahead(blk, TILE_BLOCK_Q6K);
                }
                // SAFETY: column `b < n` lies inside the tile (asserted above); its first 16
                // bytes are the eight `d`.
                let (d8, sums) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                        $column::<N>(blk, std::array::from_fn(|t| &acts[t][b])),
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
        pub(crate) fn dot(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
            // SAFETY: the features were detected before this function was handed out.
            let [out] = unsafe { tile_n::<1>(tile, [act], act.len()) };
            out
        }

        /// The eight rows of a Q6_K tile against four activation vectors: each column is
        /// loaded and unpacked once for the four tokens.
        pub(crate) fn dot4(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
            // SAFETY: the features were detected before this function was handed out.
            unsafe { tile_n::<4>(tile, acts, acts[0].len()) }
        }
    };
}

mod avx2 {
    use super::*;
    q6k_tile_kernels!("avx2,fma,f16c", column_avx2);
}

mod vnni {
    use super::*;
    q6k_tile_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", column_vnni);
}

pub(super) use avx2::{dot as dot_avx2, dot4 as dot4_avx2};
pub(super) use vnni::{dot as dot_vnni, dot4 as dot4_vnni};
