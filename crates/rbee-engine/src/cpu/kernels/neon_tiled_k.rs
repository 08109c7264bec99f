//! aarch64 products of eight-row Q4_K tiles ([`super::tiled_k`]) with Q8_K activations: the
//! one-token product (decode) and the four-token product (prefill, each tile column loaded and
//! unpacked once for four tokens), in the two variants of [`super::neon_tiled`] (a nibble group
//! multiplied with four broadcast activations by `sdot` by element, or by `smull` + `addp` +
//! `sadalp`).
//!
//! Each 16-byte half of a tile group holds four rows, so the eight rows' sums are two vectors
//! throughout. Per super-block, each sub-block's products are summed per row, multiplied by the
//! rows' scales of that sub-block (picked out of the unpacked scale bytes by a shift), and the
//! mins are taken out with the activations' 16-element sums; the integer sums are exact, and
//! the float operations are those of [`super::tiled_k::dot_lane`], so every row's result is the
//! scalar reference's bit for bit, in the one-token and the four-token product alike.
//!
//! Reachable only through [`super::neon::variants`], which hands out the `dotprod` functions
//! after `is_aarch64_feature_detected!("dotprod")`; NEON is baseline on aarch64.
#![allow(unsafe_code)]

use std::arch::aarch64::*;

use super::super::quant::BlockQ8K;
use super::neon::{ld_i8, ld_u8};
use super::neon_tiled::{f16x8, group_mull, group_sdot, lanes};
use super::tiled::TILE_ROWS;
use super::tiled_k::{NIBBLES, SCALES, TILE_BLOCK_Q4K};

/// A tile column's scales unpacked, per half `h` (rows `4h..4h + 4`).
struct Column {
    d: [float32x4_t; 2],
    dmin: [float32x4_t; 2],
    /// `scales[q][h]`: byte `4r + i` is row `4h + r`'s scale of sub-block `4q + i`.
    scales: [[uint8x16_t; 2]; 2],
    /// `mins[q][h][p]`: rows `4h + 2p` and `4h + 2p + 1`'s mins of sub-blocks `4q..4q + 4`, as
    /// i16 lanes `0..4` and `4..8`.
    mins: [[[int16x8_t; 2]; 2]; 2],
}

#[inline]
#[target_feature(enable = "neon")]
fn unpack(blk: &[u8]) -> Column {
    let m4 = vdupq_n_u8(0xF);
    let mut scales = [[vdupq_n_u8(0); 2]; 2];
    let mut mins = [[[vdupq_n_s16(0); 2]; 2]; 2];
    for h in 0..2 {
        let l0 = ld_u8(blk, SCALES + 16 * h);
        let l1 = ld_u8(blk, SCALES + 32 + 16 * h);
        let hb = ld_u8(blk, SCALES + 64 + 16 * h);
        let bits = |mask: u8| vandq_u8(hb, vdupq_n_u8(mask));
        scales[0][h] = vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8::<4>(bits(0x03)));
        scales[1][h] = vorrq_u8(vshrq_n_u8::<4>(l0), vshlq_n_u8::<2>(bits(0x0C)));
        let m = [
            vorrq_u8(vandq_u8(l1, m4), bits(0x30)),
            vorrq_u8(vshrq_n_u8::<4>(l1), vshrq_n_u8::<2>(bits(0xC0))),
        ];
        for q in 0..2 {
            mins[q][h] = [
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(m[q]))),
                vreinterpretq_s16_u16(vmovl_high_u8(m[q])),
            ];
        }
    }
    Column {
        d: f16x8(blk, 0),
        dmin: f16x8(blk, 16),
        scales,
        mins,
    }
}

/// Rows `4h..4h + 4`'s scales of sub-block `4q + i`, as i32 lanes.
#[inline]
#[target_feature(enable = "neon")]
fn scale(c: &Column, q: usize, i: usize, h: usize) -> int32x4_t {
    let v = vreinterpretq_u32_u8(c.scales[q][h]);
    let shifted = vshlq_u32(v, vdupq_n_s32(-8 * i as i32));
    vreinterpretq_s32_u32(vandq_u32(shifted, vdupq_n_u32(0xFF)))
}

/// The eight rows' `Σ min · (sum of the sub-block's activations)` against one token.
#[inline]
#[target_feature(enable = "neon")]
fn mins(c: &Column, a: &BlockQ8K) -> [int32x4_t; 2] {
    // SAFETY: `a.bsums` is sixteen i16.
    let (b0, b1) = unsafe {
        (
            vld1q_s16(a.bsums.as_ptr()),
            vld1q_s16(a.bsums.as_ptr().add(8)),
        )
    };
    // The sums of each sub-block's 32 activations (each fits i16: at most 32 × 128), then
    // sub-blocks 0..4 and 4..8 each repeated for two rows.
    let bs = vpaddq_s16(b0, b1);
    let bq = [
        vcombine_s16(vget_low_s16(bs), vget_low_s16(bs)),
        vcombine_s16(vget_high_s16(bs), vget_high_s16(bs)),
    ];
    // Rows `4h + 2p` and `4h + 2p + 1`: four products each, then their lanes summed in pairs.
    let pair = |h: usize, p: usize| {
        let (m0, m1) = (c.mins[0][h][p], c.mins[1][h][p]);
        let first = vmull_s16(vget_low_s16(m0), vget_low_s16(bq[0]));
        let first = vmlal_s16(first, vget_low_s16(m1), vget_low_s16(bq[1]));
        let second = vmlal_high_s16(vmull_high_s16(m0, bq[0]), m1, bq[1]);
        vpaddq_s32(first, second)
    };
    [
        vpaddq_s32(pair(0, 0), pair(0, 1)),
        vpaddq_s32(pair(1, 0), pair(1, 1)),
    ]
}

/// `acc + d · a.d · sumi - dmin · a.d · summ` per row, as the scalar reference rounds it.
#[inline]
#[target_feature(enable = "neon")]
fn finish(
    acc: [float32x4_t; 2],
    c: &Column,
    sumi: [int32x4_t; 2],
    summ: [int32x4_t; 2],
    a: &BlockQ8K,
) -> [float32x4_t; 2] {
    let half = |h: usize| {
        let d = vmulq_f32(vmulq_n_f32(c.d[h], a.d), vcvtq_f32_s32(sumi[h]));
        let m = vmulq_f32(vmulq_n_f32(c.dmin[h], a.d), vcvtq_f32_s32(summ[h]));
        vaddq_f32(acc[h], vsubq_f32(d, m))
    };
    [half(0), half(1)]
}

/// Super-block `b` of each of `N` activation vectors.
fn column_acts<const N: usize>(acts: [&[BlockQ8K]; N], b: usize) -> [&BlockQ8K; N] {
    std::array::from_fn(|t| &acts[t][b])
}

/// Defines the Q4_K tile products of one variant, built on the group product `$group`.
macro_rules! q4k_tiles {
    ($features:literal, $group:ident) => {
        use super::*;

        /// The eight rows' `Σ scale · q · a` of one tile column against `N` tokens. Group `k`
        /// of pair `p` takes activations `64p + 4k..` (low nibbles, sub-block `2p`) and
        /// `64p + 32 + 4k..` (high nibbles, sub-block `2p + 1`): lane `k % 4` of the 16 bytes
        /// from `64p + 16 (k / 4)` and from `64p + 32 + 16 (k / 4)`.
        #[inline]
        #[target_feature(enable = $features)]
        fn sums<const N: usize>(
            blk: &[u8],
            c: &Column,
            acts: [&BlockQ8K; N],
        ) -> [[int32x4_t; 2]; N] {
            let m4 = vdupq_n_u8(0xF);
            let zero = vdupq_n_s32(0);
            let mut sumi = [[zero; 2]; N];
            for p in 0..4 {
                let (mut lo, mut hi) = ([[zero; 2]; N], [[zero; 2]; N]);
                // Groups `4g..4g + 4`, one half of the rows at a time: their activations are
                // the four lanes of one 16-byte load.
                for g in 0..2 {
                    for h in 0..2 {
                        let mut w = [[vdupq_n_s8(0); 2]; 4];
                        for (l, w) in w.iter_mut().enumerate() {
                            let q = ld_u8(blk, NIBBLES + 256 * p + 32 * (4 * g + l) + 16 * h);
                            *w = [
                                vreinterpretq_s8_u8(vandq_u8(q, m4)),
                                vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)),
                            ];
                        }
                        for (t, a) in acts.iter().enumerate() {
                            let al = ld_i8(&a.qs, 64 * p + 16 * g);
                            let ah = ld_i8(&a.qs, 64 * p + 32 + 16 * g);
                            let (mut l, mut u) = (lo[t][h], hi[t][h]);
                            l = $group::<0>(l, w[0][0], al);
                            u = $group::<0>(u, w[0][1], ah);
                            l = $group::<1>(l, w[1][0], al);
                            u = $group::<1>(u, w[1][1], ah);
                            l = $group::<2>(l, w[2][0], al);
                            u = $group::<2>(u, w[2][1], ah);
                            l = $group::<3>(l, w[3][0], al);
                            u = $group::<3>(u, w[3][1], ah);
                            (lo[t][h], hi[t][h]) = (l, u);
                        }
                    }
                }
                let (q, i) = (p / 2, 2 * (p % 2));
                for h in 0..2 {
                    let (sl, sh) = (scale(c, q, i, h), scale(c, q, i + 1, h));
                    for t in 0..N {
                        sumi[t][h] = vmlaq_s32(vmlaq_s32(sumi[t][h], lo[t][h], sl), hi[t][h], sh);
                    }
                }
            }
            sumi
        }

        /// The eight rows of a tile against `N` activation vectors of `n` super-blocks.
        #[inline]
        #[target_feature(enable = $features)]
        fn tile_n<const N: usize>(
            tile: &[u8],
            acts: [&[BlockQ8K]; N],
            n: usize,
        ) -> [[f32; TILE_ROWS]; N] {
            let mut acc = [[vdupq_n_f32(0.0); 2]; N];
            for (b, blk) in tile.chunks_exact(TILE_BLOCK_Q4K).take(n).enumerate() {
                let c = unpack(blk);
                let col = column_acts(acts, b);
                let sumi = sums::<N>(blk, &c, col);
                for t in 0..N {
                    acc[t] = finish(acc[t], &c, sumi[t], mins(&c, col[t]), col[t]);
                }
            }
            acc.map(|a| lanes(a))
        }

        /// The eight rows of a Q4_K tile against one activation vector.
        pub(in super::super) fn dot(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
            assert!(tile.len() >= act.len() * TILE_BLOCK_Q4K);
            // SAFETY: the variant's features are present (baseline NEON, or `dotprod` detected
            // before this function was handed out).
            let [out] = unsafe { tile_n::<1>(tile, [act], act.len()) };
            out
        }

        /// The eight rows of a Q4_K tile against four activation vectors: each column is
        /// loaded and unpacked once for the four tokens.
        pub(in super::super) fn dot4(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
            let n = acts[0].len();
            assert!(tile.len() >= n * TILE_BLOCK_Q4K && acts.iter().all(|a| a.len() == n));
            // SAFETY: as in `dot`.
            unsafe { tile_n::<4>(tile, acts, n) }
        }
    };
}

mod base {
    q4k_tiles!("neon", group_mull);
}

mod dotprod {
    q4k_tiles!("neon,dotprod", group_sdot);
}

pub(super) use base::{dot as dot_neon, dot4 as dot4_neon};
pub(super) use dotprod::{dot as dot_dotprod, dot4 as dot4_dotprod};
