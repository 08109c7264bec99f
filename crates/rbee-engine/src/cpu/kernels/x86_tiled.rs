//! x86-64 products of eight-row tiles ([`super::tiled`]) with Q8 activations: the one-token
//! product (decode) and the four-token product (prefill, each tile column loaded and unpacked
//! once for four tokens). Q4_0 and Q5_0 tiles (a Q5_0 column is a Q4_0 column whose nibbles get
//! their fifth bits, OR-ed in as 16) in two variants: AVX2 (`maddubs` + `madd`) and AVX-512
//! VNNI on 256-bit vectors (`dpbusd`, one instruction for the same multiply-and-sum); Q8_0 tiles
//! with VNNI only (their unsigned bytes reach 255, which `maddubs` would saturate).
//!
//! Reachable only through [`super::x86::kernels`], which hands these functions out after
//! `is_x86_feature_detected!` has proved the features each one enables.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::tiled::{TILE_BLOCK, TILE_BLOCK_Q5_0, TILE_BLOCK_Q8, TILE_ROWS, TileAct};

/// `acc + Σ w·y` in groups of four bytes, as eight i32 (AVX2).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group_avx2(acc: __m256i, w: __m256i, y: __m256i) -> __m256i {
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1)),
    )
}

/// As [`group_avx2`], in one VNNI instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn group_vnni(acc: __m256i, w: __m256i, y: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, y)
}

/// How far ahead of the tile column being multiplied the four-token products ask for the
/// matrix's bytes (`cargo run -p rbee-engine --example step_probe` with four sequences: 1 KiB
/// and 3 KiB ahead decoded 10–20 % faster than without, 8 KiB and more no faster). Four tokens
/// spend long enough on a column that the hardware's own prefetching falls behind; one token
/// does not, and prefetching there made decode slower.
const PREFETCH_AHEAD: usize = 3072;

/// Asks for the cache lines [`PREFETCH_AHEAD`] bytes past a tile column of `len` bytes at `p`.
/// A hint only: an address past the end of the matrix is not read.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch_ahead(p: *const u8, len: usize) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD);
    for off in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
    }
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(len - 1).cast());
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

/// The scales and the four nibble groups of Q4_0 tile column `b`, unpacked to low and high
/// nibbles.
///
/// # Safety
/// `p` points at a Q4_0 tile of more than `b` columns.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_load(p: *const u8, b: usize) -> (__m256, [(__m256i, __m256i); 4]) {
    let m4 = _mm256_set1_epi8(0xF);
    // SAFETY: the column's 144 bytes lie inside the tile (the caller's guarantee).
    unsafe {
        let blk = p.add(TILE_BLOCK * b);
        (
            _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
            std::array::from_fn(|k| {
                let w = _mm256_loadu_si256(blk.add(16 + 32 * k).cast());
                (
                    _mm256_and_si256(w, m4),
                    _mm256_and_si256(_mm256_srli_epi16(w, 4), m4),
                )
            }),
        )
    }
}

/// The scales and the four groups of Q5_0 tile column `b`, unpacked to values `0..32` (low and
/// high nibbles with their fifth bits).
///
/// # Safety
/// `p` points at a Q5_0 tile of more than `b` columns.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_load(p: *const u8, b: usize) -> (__m256, [(__m256i, __m256i); 4]) {
    // SAFETY: the column's 176 bytes lie inside the tile (the caller's guarantee).
    unsafe {
        let blk = p.add(TILE_BLOCK_Q5_0 * b);
        let (d8, nibbles) = q4_load(blk, 0);
        let fifth = |word: usize| {
            let bits = blk.add(144 + 4 * word).cast::<u32>().read_unaligned();
            _mm256_and_si256(spread_bits(bits), _mm256_set1_epi8(0x10))
        };
        (
            d8,
            std::array::from_fn(|k| {
                let (lo, hi) = nibbles[k];
                (
                    _mm256_or_si256(lo, fifth(2 * k)),
                    _mm256_or_si256(hi, fifth(2 * k + 1)),
                )
            }),
        )
    }
}

/// 32 bits as 32 bytes: byte `j` all ones where bit `j` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn spread_bits(bits: u32) -> __m256i {
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

macro_rules! q4_tile_kernels {
    ($features:literal, $group:ident, $one:ident, $four:ident) => {
        q4_tile_kernels!(
            $features, $group, $one, $four, q4_load, TILE_BLOCK, 8, column
        );
    };
    ($features:literal, $group:ident, $one:ident, $four:ident, $load:ident, $block:ident,
     $offset:literal, $column:ident) => {
        /// One tile column against one activation block: the eight rows' integer sums, the
        /// unsigned values' offset removed. Two chains so their latencies overlap.
        #[inline]
        #[target_feature(enable = $features)]
        fn $column(w: &[(__m256i, __m256i); 4], a: &TileAct) -> __m256i {
            let mut s0 = _mm256_set1_epi32(-$offset * a.sum);
            let mut s1 = _mm256_setzero_si256();
            for (k, (lo, hi)) in w.iter().enumerate() {
                s0 = $group(s0, *lo, act_group(a, k));
                s1 = $group(s1, *hi, act_group(a, k + 4));
            }
            _mm256_add_epi32(s0, s1)
        }

        /// Eight rows of a tile against one activation vector, with the operations of
        /// the four-token product in the same order, so that a prompt gives the same sums in a
        /// batch as token by token.
        pub(crate) fn $one(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
            assert!(tile.len() >= act.len() * $block);
            #[target_feature(enable = $features)]
            fn inner(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
                let mut acc = _mm256_setzero_ps();
                for (b, a) in act.iter().enumerate() {
                    // SAFETY: `b < act.len()` columns lie inside the tile (asserted above).
                    let (d8, w) = unsafe { $load(tile.as_ptr(), b) };
                    let s = _mm256_cvtepi32_ps($column(&w, a));
                    acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d8, _mm256_set1_ps(a.d)), acc);
                }
                lanes(acc)
            }
            // SAFETY: the features were detected before this function was handed out.
            unsafe { inner(tile, act) }
        }

        /// Eight rows of a tile against four activation vectors: each column is loaded
        /// and unpacked once for the four tokens.
        pub(crate) fn $four(tile: &[u8], acts: [&[TileAct]; 4]) -> [[f32; TILE_ROWS]; 4] {
            let n = acts[0].len();
            assert!(tile.len() >= n * $block && acts.iter().all(|a| a.len() == n));
            #[target_feature(enable = $features)]
            fn inner(tile: &[u8], acts: [&[TileAct]; 4], n: usize) -> [[f32; TILE_ROWS]; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..n {
                    // SAFETY: `b < n` columns lie inside the tile (asserted above).
                    let (d8, w) = unsafe { $load(tile.as_ptr(), b) };
                    prefetch_ahead(tile.as_ptr().wrapping_add($block * b), $block);
                    for (acc, act) in acc.iter_mut().zip(acts) {
                        let a = &act[b];
                        let s = _mm256_cvtepi32_ps($column(&w, a));
                        *acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d8, _mm256_set1_ps(a.d)), *acc);
                    }
                }
                acc.map(|a| lanes(a))
            }
            // SAFETY: the features were detected before this function was handed out.
            unsafe { inner(tile, acts, n) }
        }
    };
}

mod avx2 {
    use super::*;
    q4_tile_kernels!("avx2,fma,f16c", group_avx2, dot, dot4);
    q4_tile_kernels!(
        "avx2,fma,f16c",
        group_avx2,
        dot_q5_0,
        dot4_q5_0,
        q5_load,
        TILE_BLOCK_Q5_0,
        16,
        column_q5_0
    );
}

mod vnni {
    use super::*;
    q4_tile_kernels!(
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        group_vnni,
        dot,
        dot4
    );
    q4_tile_kernels!(
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        group_vnni,
        dot_q5_0,
        dot4_q5_0,
        q5_load,
        TILE_BLOCK_Q5_0,
        16,
        column_q5_0
    );
}

pub(super) use avx2::{
    dot as dot_avx2, dot_q5_0 as dot_q5_0_avx2, dot4 as dot4_avx2, dot4_q5_0 as dot4_q5_0_avx2,
};
pub(super) use vnni::{
    dot as dot_vnni, dot_q5_0 as dot_q5_0_vnni, dot4 as dot4_vnni, dot4_q5_0 as dot4_q5_0_vnni,
};

/// Four activations starting at value `4k` of `a`, broadcast to every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn act_group(a: &TileAct, k: usize) -> __m256i {
    let q = &a.qs[4 * k..4 * k + 4];
    _mm256_set1_epi32(i32::from_le_bytes([
        q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
    ]))
}

/// One Q8_0 tile column against one activation block: the eight rows' integer sums, bias
/// removed. Two chains of four `dpbusd` so their latencies overlap.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn q8_column(w: &[__m256i; 8], a: &TileAct) -> __m256i {
    let mut s0 = _mm256_set1_epi32(-128 * a.sum);
    let mut s1 = _mm256_setzero_si256();
    for k in 0..4 {
        s0 = _mm256_dpbusd_epi32(s0, w[k], act_group(a, k));
        s1 = _mm256_dpbusd_epi32(s1, w[k + 4], act_group(a, k + 4));
    }
    _mm256_add_epi32(s0, s1)
}

/// The scales and the eight weight groups of Q8_0 tile column `b`.
///
/// # Safety
/// `p` points at a tile of more than `b` columns.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_load(p: *const u8, b: usize) -> (__m256, [__m256i; 8]) {
    // SAFETY: the column's 272 bytes lie inside the tile (the caller's guarantee).
    unsafe {
        let blk = p.add(TILE_BLOCK_Q8 * b);
        (
            _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
            std::array::from_fn(|k| _mm256_loadu_si256(blk.add(16 + 32 * k).cast())),
        )
    }
}

/// Eight rows of a Q8_0 tile against one activation vector (VNNI).
pub(super) fn dot_q8_0_vnni(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
    assert!(tile.len() >= act.len() * TILE_BLOCK_Q8);
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    fn inner(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
        let mut acc = _mm256_setzero_ps();
        for (b, a) in act.iter().enumerate() {
            // SAFETY: `b < act.len()` columns lie inside the tile (asserted by the caller).
            let (d8, w) = unsafe { q8_load(tile.as_ptr(), b) };
            let s = _mm256_cvtepi32_ps(q8_column(&w, a));
            acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d8, _mm256_set1_ps(a.d)), acc);
        }
        lanes(acc)
    }
    // SAFETY: the features were detected before this function was handed out.
    unsafe { inner(tile, act) }
}

/// Eight rows of a Q8_0 tile against four activation vectors (VNNI): each column is loaded
/// once for the four tokens.
pub(super) fn dot4_q8_0_vnni(tile: &[u8], acts: [&[TileAct]; 4]) -> [[f32; TILE_ROWS]; 4] {
    let n = acts[0].len();
    assert!(tile.len() >= n * TILE_BLOCK_Q8 && acts.iter().all(|a| a.len() == n));
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    fn inner(tile: &[u8], acts: [&[TileAct]; 4], n: usize) -> [[f32; TILE_ROWS]; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..n {
            // SAFETY: `b < n` columns lie inside the tile (asserted above).
            let (d8, w) = unsafe { q8_load(tile.as_ptr(), b) };
            prefetch_ahead(tile.as_ptr().wrapping_add(TILE_BLOCK_Q8 * b), TILE_BLOCK_Q8);
            for (acc, act) in acc.iter_mut().zip(acts) {
                let a = &act[b];
                let s = _mm256_cvtepi32_ps(q8_column(&w, a));
                *acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d8, _mm256_set1_ps(a.d)), *acc);
            }
        }
        acc.map(|a| lanes(a))
    }
    // SAFETY: the features were detected before this function was handed out.
    unsafe { inner(tile, acts, n) }
}
