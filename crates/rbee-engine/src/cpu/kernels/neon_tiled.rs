//! aarch64 products of eight-row tiles ([`super::tiled`]) with Q8 activations: the one-token
//! product (decode) and the four-token product (prefill, each tile column loaded and unpacked
//! once for four tokens), which runs the one-token product's operations in the same order for
//! each token, so both give the same sums bit for bit.
//!
//! A tile group of four columns × eight rows is two 16-byte vectors (rows 0–3, rows 4–7), each
//! lane holding one row's four bytes: multiplying it with the four activations of those columns
//! in every lane, and adding each lane's four products, adds to four rows' sums at once. With
//! `dotprod` that is one `sdot` by element (the activations taken straight from a lane of the
//! loaded block); on baseline NEON it is `smull`, `addp` and `sadalp`, exact for Q4_0's nibbles
//! (a pair of their products fits i16). Q4_0 tiles in both variants; Q8_0 tiles with `dotprod`
//! only (their weights are stored `w + 128`, flipped back to signed bytes on load). The Q4_K
//! tiles, built on the same group products, are in [`super::neon_tiled_k`].
//!
//! Reachable only through [`super::neon::variants`], which hands out the `dotprod` functions
//! after `is_aarch64_feature_detected!("dotprod")`; NEON is baseline on aarch64.
#![allow(unsafe_code)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::neon::{ld_i8, ld_u8};
use super::tiled::{TILE_BLOCK, TILE_BLOCK_Q8, TILE_ROWS, TileAct};

/// `acc` plus, in each lane `i`, the four products of bytes `4i..4i + 4` of `w` with bytes
/// `4L..4L + 4` of `a` (baseline NEON). Exact only while a pair of products fits i16, as with
/// Q4_0's nibbles (at most 2 × 15 × 128).
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn group_mull<const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    let y = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(a)));
    let lo = vmull_s8(vget_low_s8(w), vget_low_s8(y));
    let hi = vmull_high_s8(w, y);
    vpadalq_s16(acc, vpaddq_s16(lo, hi))
}

/// As [`group_mull`], in one `sdot` by element, exact for any bytes.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(super) fn group_sdot<const L: i32>(
    mut acc: int32x4_t,
    w: int8x16_t,
    a: int8x16_t,
) -> int32x4_t {
    const { assert!(0 <= L && L < 4, "a lane of four") };
    // SAFETY: `sdot` reads the two byte vectors and updates `acc`, touching no memory, stack or
    // flags; the `dotprod` feature this function requires is what makes the instruction valid,
    // and `L` is one of its four lanes (checked at compile time above).
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            a = in(vreg) a,
            l = const L,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// The eight f16 at `blk[at..at + 16]` (eight rows' scales), as rows 0–3 and rows 4–7.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16x8(blk: &[u8], at: usize) -> [float32x4_t; 2] {
    let d = vreinterpretq_u16_u8(ld_u8(blk, at));
    [
        vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(d))),
        vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(d))),
    ]
}

/// `acc + s · d · a.d` for both halves of the rows: the step the one-token and four-token
/// products share.
#[inline]
#[target_feature(enable = "neon")]
fn accumulate(
    acc: [float32x4_t; 2],
    d: &[float32x4_t; 2],
    s: [int32x4_t; 2],
    a: &TileAct,
) -> [float32x4_t; 2] {
    let step = |h: usize| vfmaq_f32(acc[h], vcvtq_f32_s32(s[h]), vmulq_n_f32(d[h], a.d));
    [step(0), step(1)]
}

/// Eight f32 lanes as an array.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn lanes(acc: [float32x4_t; 2]) -> [f32; TILE_ROWS] {
    let mut out = [0f32; TILE_ROWS];
    // SAFETY: `out` is eight floats, each store writes four.
    unsafe {
        vst1q_f32(out.as_mut_ptr(), acc[0]);
        vst1q_f32(out.as_mut_ptr().add(4), acc[1]);
    }
    out
}

/// Defines the one-token and four-token products over tiles of `$bytes`-byte columns, each
/// unpacked by `$load` and multiplied with an activation block by `$column`.
macro_rules! tile_products {
    ($features:literal, $one:ident, $four:ident, $bytes:expr, $load:ident, $column:ident) => {
        pub(in super::super) fn $one(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
            #[target_feature(enable = $features)]
            fn inner(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
                let mut acc = [vdupq_n_f32(0.0); 2];
                for (blk, a) in tile.chunks_exact($bytes).zip(act) {
                    let (d, w) = $load(blk);
                    acc = accumulate(acc, &d, $column(&w, a), a);
                }
                lanes(acc)
            }
            assert!(tile.len() >= act.len() * $bytes);
            // SAFETY: the variant's features are present (baseline NEON, or `dotprod` detected
            // before this function was handed out).
            unsafe { inner(tile, act) }
        }

        pub(in super::super) fn $four(tile: &[u8], acts: [&[TileAct]; 4]) -> [[f32; TILE_ROWS]; 4] {
            #[target_feature(enable = $features)]
            fn inner(tile: &[u8], acts: [&[TileAct]; 4], n: usize) -> [[f32; TILE_ROWS]; 4] {
                let mut acc = [[vdupq_n_f32(0.0); 2]; 4];
                for (b, blk) in tile.chunks_exact($bytes).take(n).enumerate() {
                    let (d, w) = $load(blk);
                    for (acc, act) in acc.iter_mut().zip(acts) {
                        let a = &act[b];
                        *acc = accumulate(*acc, &d, $column(&w, a), a);
                    }
                }
                acc.map(|a| lanes(a))
            }
            let n = acts[0].len();
            assert!(tile.len() >= n * $bytes && acts.iter().all(|a| a.len() == n));
            // SAFETY: as in the one-token product.
            unsafe { inner(tile, acts, n) }
        }
    };
}

/// A Q4_0 tile column: its scales, and per group `k` and half `h` the low and high nibbles.
#[inline]
#[target_feature(enable = "neon")]
fn q4_load(blk: &[u8]) -> ([float32x4_t; 2], [[[int8x16_t; 2]; 2]; 4]) {
    let m4 = vdupq_n_u8(0xF);
    let mut w = [[[vdupq_n_s8(0); 2]; 2]; 4];
    for (k, w) in w.iter_mut().enumerate() {
        for (h, w) in w.iter_mut().enumerate() {
            let q = ld_u8(blk, 16 + 32 * k + 16 * h);
            *w = [
                vreinterpretq_s8_u8(vandq_u8(q, m4)),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)),
            ];
        }
    }
    (f16x8(blk, 0), w)
}

/// Defines the Q4_0 tile products of one variant, built on the group product `$group`.
macro_rules! q4_tiles {
    ($features:literal, $group:ident) => {
        use super::*;

        /// One Q4_0 tile column against one activation block: the eight rows' integer sums,
        /// the nibbles' offset removed. Low nibbles of group `k` take activations `4k..4k + 4`
        /// (lane `k` of the first half of the block), high nibbles `16 + 4k..` (of the second).
        #[inline]
        #[target_feature(enable = $features)]
        fn column(w: &[[[int8x16_t; 2]; 2]; 4], a: &TileAct) -> [int32x4_t; 2] {
            let (a0, a1) = (ld_i8(&a.qs, 0), ld_i8(&a.qs, 16));
            let mut out = [vdupq_n_s32(0); 2];
            for (h, out) in out.iter_mut().enumerate() {
                let mut s0 = vdupq_n_s32(-8 * a.sum);
                let mut s1 = vdupq_n_s32(0);
                s0 = $group::<0>(s0, w[0][h][0], a0);
                s1 = $group::<0>(s1, w[0][h][1], a1);
                s0 = $group::<1>(s0, w[1][h][0], a0);
                s1 = $group::<1>(s1, w[1][h][1], a1);
                s0 = $group::<2>(s0, w[2][h][0], a0);
                s1 = $group::<2>(s1, w[2][h][1], a1);
                s0 = $group::<3>(s0, w[3][h][0], a0);
                s1 = $group::<3>(s1, w[3][h][1], a1);
                *out = vaddq_s32(s0, s1);
            }
            out
        }

        tile_products!($features, dot, dot4, TILE_BLOCK, q4_load, column);
    };
}

mod base {
    q4_tiles!("neon", group_mull);
}

mod dotprod {
    q4_tiles!("neon,dotprod", group_sdot);
}

pub(super) use base::{dot as dot_neon, dot4 as dot4_neon};
pub(super) use dotprod::{dot as dot_dotprod, dot4 as dot4_dotprod};

/// A Q8_0 tile column: its scales and its eight groups of weights as signed bytes, per group
/// `k` rows 0–3 then rows 4–7.
#[inline]
#[target_feature(enable = "neon")]
fn q8_load(blk: &[u8]) -> ([float32x4_t; 2], [[int8x16_t; 2]; 8]) {
    let bias = vdupq_n_u8(0x80);
    let mut w = [[vdupq_n_s8(0); 2]; 8];
    for (k, w) in w.iter_mut().enumerate() {
        for (h, w) in w.iter_mut().enumerate() {
            *w = vreinterpretq_s8_u8(veorq_u8(ld_u8(blk, 16 + 32 * k + 16 * h), bias));
        }
    }
    (f16x8(blk, 0), w)
}

/// One Q8_0 tile column against one activation block: group `k` takes activations
/// `4k..4k + 4`, lane `k % 4` of the block's first or second half.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn q8_column(w: &[[int8x16_t; 2]; 8], a: &TileAct) -> [int32x4_t; 2] {
    let (a0, a1) = (ld_i8(&a.qs, 0), ld_i8(&a.qs, 16));
    let mut out = [vdupq_n_s32(0); 2];
    for (h, out) in out.iter_mut().enumerate() {
        let mut s0 = vdupq_n_s32(0);
        let mut s1 = vdupq_n_s32(0);
        s0 = group_sdot::<0>(s0, w[0][h], a0);
        s1 = group_sdot::<0>(s1, w[4][h], a1);
        s0 = group_sdot::<1>(s0, w[1][h], a0);
        s1 = group_sdot::<1>(s1, w[5][h], a1);
        s0 = group_sdot::<2>(s0, w[2][h], a0);
        s1 = group_sdot::<2>(s1, w[6][h], a1);
        s0 = group_sdot::<3>(s0, w[3][h], a0);
        s1 = group_sdot::<3>(s1, w[7][h], a1);
        *out = vaddq_s32(s0, s1);
    }
    out
}

mod q8_dotprod {
    use super::*;
    tile_products!("neon,dotprod", dot, dot4, TILE_BLOCK_Q8, q8_load, q8_column);
}

pub(super) use q8_dotprod::{dot as dot_q8_0_dotprod, dot4 as dot4_q8_0_dotprod};
