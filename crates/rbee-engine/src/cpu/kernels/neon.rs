//! NEON dot products of one weight row with quantized activations on aarch64, in the style of
//! ggml's: 2- to 8-bit weights are widened to signed bytes and multiplied with the activation
//! bytes into i32 lanes, then one f32 FMA per 32-weight block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), or
//! exact integer sums per 256-weight super-block scaled once as the scalar reference does (Q2_K,
//! Q3_K, Q4_K, Q5_K, Q6_K, which therefore give the reference's results bit for bit). F16, BF16
//! and F32 rows are widened to f32 and multiplied in f32 lanes ([`float`]).
//!
//! Two variants: baseline NEON (`smull` + `sadalp`: bytes multiplied to i16, pairs added into
//! i32 lanes), and one for CPUs with the `dotprod` extension, whose `sdot` multiplies four byte
//! pairs and adds them to an i32 lane in one instruction. `vdotq_s32` is still unstable in Rust
//! (`stdarch_neon_dotprod`), so `sdot` is emitted with `asm!` in [`dot_sdot`] and
//! [`super::neon_tiled::group_sdot`]. The four-token products run the one-token products'
//! operations in the same order for each token, so a prompt gives the same sums in a batch as
//! token by token.
//!
//! This module, [`super::neon_tiled`] and [`super::neon_tiled_k`] (the products of eight-row
//! Q4_0, Q8_0 and Q4_K tiles) are the only ones of the aarch64 CPU path with SIMD intrinsics.
//! NEON is part of the aarch64 baseline (the target enables it for every function), and the
//! `dotprod` functions are reachable only through [`variants`], which hands them out after
//! `is_aarch64_feature_detected!("dotprod")`; that is what makes every `unsafe` call of a
//! `target_feature` function below sound. Every load from a row or an activation block is
//! bounds-checked through [`ld_u8`] and [`ld_i8`] (and the float products' `ld_f32`); the
//! other vector loads read fixed-size arrays (a block's `bsums`, unpacked scales and mins)
//! within their length.
#![allow(unsafe_code)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::Kernels;
use super::{neon_tiled, neon_tiled_k};

/// The fastest NEON kernels this CPU runs (every aarch64 CPU runs the baseline ones).
pub(super) fn kernels() -> Option<Kernels> {
    variants().pop()
}

/// Every NEON variant this CPU runs, slowest first: baseline NEON, then with `dotprod`.
pub(super) fn variants() -> Vec<Kernels> {
    let neon = Kernels {
        name: "neon",
        q4_0: base::dot_q4_0,
        q4_1: base::dot_q4_1,
        q5_0: base::dot_q5_0,
        q5_1: base::dot_q5_1,
        q8_0: base::dot_q8_0,
        q4k: base::dot_q4k,
        q5k: base::dot_q5k,
        q6k: base::dot_q6k,
        f32: float::dot_f32,
        f16: float::dot_f16,
        bf16: float::dot_bf16,
        q4_0x4: base::dot_q4_0x4,
        q8_0x4: base::dot_q8_0x4,
        q4kx4: base::dot_q4kx4,
        q4_1x4: Some(base::dot_q4_1x4),
        q5_0x4: Some(base::dot_q5_0x4),
        q5_1x4: Some(base::dot_q5_1x4),
        q5kx4: Some(base::dot_q5kx4),
        f32x4: Some(float::dot_f32x4),
        f16x4: Some(float::dot_f16x4),
        bf16x4: Some(float::dot_bf16x4),
        q2k: base::dot_q2k,
        q3k: base::dot_q3k,
        q2kx4: Some(base::dot_q2kx4),
        q3kx4: Some(base::dot_q3kx4),
        q6kx4: Some(base::dot_q6kx4),
        q4_0_tile: neon_tiled::dot_neon,
        q4_0_tilex4: neon_tiled::dot4_neon,
        q8_0_tile: None,
        q4k_tile: Some((neon_tiled_k::dot_neon, neon_tiled_k::dot4_neon)),
        more_tiles: super::MoreTiles::default(),
        // NEON is the aarch64 baseline: the portable build already uses it.
        attend: super::super::attention::attend_head,
    };
    let mut out = vec![neon];
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        out.push(Kernels {
            name: "neon+dotprod",
            q4_0: dotprod::dot_q4_0,
            q4_1: dotprod::dot_q4_1,
            q5_0: dotprod::dot_q5_0,
            q5_1: dotprod::dot_q5_1,
            q8_0: dotprod::dot_q8_0,
            q4k: dotprod::dot_q4k,
            q5k: dotprod::dot_q5k,
            q6k: dotprod::dot_q6k,
            q4_0x4: dotprod::dot_q4_0x4,
            q8_0x4: dotprod::dot_q8_0x4,
            q4kx4: dotprod::dot_q4kx4,
            q4_1x4: Some(dotprod::dot_q4_1x4),
            q5_0x4: Some(dotprod::dot_q5_0x4),
            q5_1x4: Some(dotprod::dot_q5_1x4),
            q5kx4: Some(dotprod::dot_q5kx4),
            q6kx4: Some(dotprod::dot_q6kx4),
            q2k: dotprod::dot_q2k,
            q3k: dotprod::dot_q3k,
            q2kx4: Some(dotprod::dot_q2kx4),
            q3kx4: Some(dotprod::dot_q3kx4),
            q4_0_tile: neon_tiled::dot_dotprod,
            q4_0_tilex4: neon_tiled::dot4_dotprod,
            q8_0_tile: Some((neon_tiled::dot_q8_0_dotprod, neon_tiled::dot4_q8_0_dotprod)),
            q4k_tile: Some((neon_tiled_k::dot_dotprod, neon_tiled_k::dot4_dotprod)),
            ..neon
        });
    }
    out
}

/// The 16 bytes of `s` from `at`, as a vector; panics past the end of `s`.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn ld_u8(s: &[u8], at: usize) -> uint8x16_t {
    let s = &s[at..at + 16];
    // SAFETY: `s` is 16 readable bytes; `vld1q_u8` has no alignment requirement.
    unsafe { vld1q_u8(s.as_ptr()) }
}

/// The 16 signed bytes of `s` from `at`, as a vector; panics past the end of `s`.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn ld_i8(s: &[i8], at: usize) -> int8x16_t {
    let s = &s[at..at + 16];
    // SAFETY: `s` is 16 readable bytes; `vld1q_s8` has no alignment requirement.
    unsafe { vld1q_s8(s.as_ptr()) }
}

/// The f16 at `bytes[at..at + 2]` as f32 (`fcvtl`, part of baseline NEON).
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    vgetq_lane_f32::<0>(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(bits))))
}

/// `acc` plus the sixteen products `x·y`, added into the four lanes in pairs (baseline NEON: no
/// product or pair sum of two i8 overflows i16's `smull` lanes and i32's `sadalp` lanes). Which
/// lane a product lands in differs from [`dot_sdot`]; the sum of the lanes is the same.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn dot_mull(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(x), vget_low_s8(y));
    let hi = vmull_high_s8(x, y);
    vpadalq_s16(vpadalq_s16(acc, lo), hi)
}

/// `acc` plus the sixteen products `x·y`, lane `i` taking bytes `4i..4i + 4` (`sdot`).
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(super) fn dot_sdot(mut acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` reads the two byte vectors and updates `acc`, touching no memory, stack or
    // flags; the `dotprod` feature this function requires is what makes the instruction valid.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {x:v}.16b, {y:v}.16b",
            acc = inout(vreg) acc,
            x = in(vreg) x,
            y = in(vreg) y,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Defines every row kernel of one variant: the functions of `target_feature` `$features`
/// built on the byte dot product `$dot`. A macro rather than functions taking `$dot`, so that
/// it is inlined into each loop under the variant's features.
macro_rules! row_kernels {
    ($features:literal, $dot:ident) => {
        use std::arch::aarch64::*;

        use super::super::super::quant::{BlockQ8, BlockQ8K, scale_min_k4};
        use super::{f16_at, ld_i8, ld_u8, $dot};

        /// A Q4_0 block's nibbles as signed weights `q - 8`: weights 0..16, then 16..32.
        #[inline]
        #[target_feature(enable = $features)]
        fn q4_0_block(b: &[u8]) -> [int8x16_t; 2] {
            let q = ld_u8(b, 2);
            let eight = vdupq_n_s8(8);
            [
                vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0xF))), eight),
                vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)), eight),
            ]
        }

        /// A Q8_0 block's 32 weights.
        #[inline]
        #[target_feature(enable = $features)]
        fn q8_0_block(b: &[u8]) -> [int8x16_t; 2] {
            [
                vreinterpretq_s8_u8(ld_u8(b, 2)),
                vreinterpretq_s8_u8(ld_u8(b, 18)),
            ]
        }

        /// `acc + d · Σ w·a`, over one 32-weight block: the step the one-token and four-token
        /// products share, so both round alike.
        #[inline]
        #[target_feature(enable = $features)]
        fn block_fma(acc: float32x4_t, w: &[int8x16_t; 2], a: &BlockQ8, d: f32) -> float32x4_t {
            let p = $dot(
                $dot(vdupq_n_s32(0), w[0], ld_i8(&a.qs, 0)),
                w[1],
                ld_i8(&a.qs, 16),
            );
            vfmaq_f32(acc, vcvtq_f32_s32(p), vdupq_n_f32(d * a.d))
        }

        /// Defines the one-token and four-token products of a 32-weight block type whose
        /// blocks take `$bytes` bytes and unpack with `$unpack`.
        macro_rules! block_kernels {
            ($one:ident, $four:ident, $bytes:literal, $unpack:ident) => {
                pub(super) fn $one(row: &[u8], act: &[BlockQ8]) -> f32 {
                    #[target_feature(enable = $features)]
                    fn inner(row: &[u8], act: &[BlockQ8]) -> f32 {
                        let mut acc = vdupq_n_f32(0.0);
                        for (b, a) in row.chunks_exact($bytes).zip(act) {
                            acc = block_fma(acc, &$unpack(b), a, f16_at(b, 0));
                        }
                        vaddvq_f32(acc)
                    }
                    assert!(row.len() >= act.len() * $bytes);
                    // SAFETY: the variant's features are present (baseline NEON, or `dotprod`
                    // detected before this function was handed out).
                    unsafe { inner(row, act) }
                }

                /// One row against four activation vectors: each weight block is unpacked
                /// once.
                pub(super) fn $four(row: &[u8], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
                    #[target_feature(enable = $features)]
                    fn inner(row: &[u8], acts: [&[BlockQ8]; 4], n: usize) -> [f32; 4] {
                        let mut acc = [vdupq_n_f32(0.0); 4];
                        for (i, b) in row.chunks_exact($bytes).take(n).enumerate() {
                            let (w, d) = ($unpack(b), f16_at(b, 0));
                            for (acc, act) in acc.iter_mut().zip(acts) {
                                *acc = block_fma(*acc, &w, &act[i], d);
                            }
                        }
                        acc.map(|a| vaddvq_f32(a))
                    }
                    let n = acts[0].len();
                    assert!(row.len() >= n * $bytes && acts.iter().all(|a| a.len() == n));
                    // SAFETY: as in the one-token product.
                    unsafe { inner(row, acts, n) }
                }
            };
        }

        block_kernels!(dot_q4_0, dot_q4_0x4, 18, q4_0_block);
        block_kernels!(dot_q8_0, dot_q8_0x4, 34, q8_0_block);

        /// The fifth bits of sixteen weights, bits `0..16` of the little-endian `qh[0..2]`,
        /// as 0x10 where set and 0 where clear.
        #[inline]
        #[target_feature(enable = $features)]
        fn fifth_bits(qh: &[u8]) -> uint8x16_t {
            let bytes = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1]));
            // Lane `i` tests bit `i % 8` of its byte.
            let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
            vandq_u8(vtstq_u8(bytes, bit), vdupq_n_u8(0x10))
        }

        /// The 5-bit values (0..32) of the Q5_0 or Q5_1 block part `b` (`qh[4]`, then the
        /// nibbles `qs[16]`): weights 0..16 (low nibbles, bits 0..16 of `qh`), then 16..32.
        #[inline]
        #[target_feature(enable = $features)]
        fn q5_values(b: &[u8]) -> [uint8x16_t; 2] {
            let q = ld_u8(b, 4);
            [
                vorrq_u8(vandq_u8(q, vdupq_n_u8(0xF)), fifth_bits(&b[0..2])),
                vorrq_u8(vshrq_n_u8::<4>(q), fifth_bits(&b[2..4])),
            ]
        }

        /// A Q5_0 block's weights `q - 16`.
        #[inline]
        #[target_feature(enable = $features)]
        fn q5_0_block(b: &[u8]) -> [int8x16_t; 2] {
            let sixteen = vdupq_n_s8(16);
            q5_values(&b[2..22]).map(|q| vsubq_s8(vreinterpretq_s8_u8(q), sixteen))
        }

        block_kernels!(dot_q5_0, dot_q5_0x4, 22, q5_0_block);

        /// A Q4_1 block's nibbles (0..16: valid signed bytes, multiplied as they are).
        #[inline]
        #[target_feature(enable = $features)]
        fn q4_1_block(b: &[u8]) -> [int8x16_t; 2] {
            let q = ld_u8(b, 4);
            [vandq_u8(q, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(q)].map(|q| vreinterpretq_s8_u8(q))
        }

        /// A Q5_1 block's 5-bit values (0..32).
        #[inline]
        #[target_feature(enable = $features)]
        fn q5_1_block(b: &[u8]) -> [int8x16_t; 2] {
            q5_values(&b[4..24]).map(|q| vreinterpretq_s8_u8(q))
        }

        /// Defines the one-token and four-token products of a 32-weight block type with a
        /// minimum (f16 scale `d`, then f16 minimum `m`, then `$bytes - 4` bytes of unsigned
        /// values that `$unpack` reads): `Σ d·d_a·Σ q·a` in the vector, and `Σ m·s_a` (the
        /// minimum against the activation block's sum) alongside, added once at the end.
        macro_rules! offset_kernels {
            ($one:ident, $four:ident, $bytes:literal, $unpack:ident) => {
                pub(super) fn $one(row: &[u8], act: &[BlockQ8]) -> f32 {
                    #[target_feature(enable = $features)]
                    fn inner(row: &[u8], act: &[BlockQ8]) -> f32 {
                        let mut acc = vdupq_n_f32(0.0);
                        let mut offsets = 0f32;
                        for (b, a) in row.chunks_exact($bytes).zip(act) {
                            acc = block_fma(acc, &$unpack(b), a, f16_at(b, 0));
                            offsets += f16_at(b, 2) * a.s;
                        }
                        vaddvq_f32(acc) + offsets
                    }
                    assert!(row.len() >= act.len() * $bytes);
                    // SAFETY: as in `dot_q4_0`.
                    unsafe { inner(row, act) }
                }

                /// One row against four activation vectors: each weight block is unpacked
                /// once.
                pub(super) fn $four(row: &[u8], acts: [&[BlockQ8]; 4]) -> [f32; 4] {
                    #[target_feature(enable = $features)]
                    fn inner(row: &[u8], acts: [&[BlockQ8]; 4], n: usize) -> [f32; 4] {
                        let mut acc = [vdupq_n_f32(0.0); 4];
                        let mut offsets = [0f32; 4];
                        for (i, b) in row.chunks_exact($bytes).take(n).enumerate() {
                            let (w, d, m) = ($unpack(b), f16_at(b, 0), f16_at(b, 2));
                            for ((acc, offsets), act) in acc.iter_mut().zip(&mut offsets).zip(acts)
                            {
                                *acc = block_fma(*acc, &w, &act[i], d);
                                *offsets += m * act[i].s;
                            }
                        }
                        std::array::from_fn(|k| vaddvq_f32(acc[k]) + offsets[k])
                    }
                    let n = acts[0].len();
                    assert!(row.len() >= n * $bytes && acts.iter().all(|a| a.len() == n));
                    // SAFETY: as in `dot_q4_0`.
                    unsafe { inner(row, acts, n) }
                }
            };
        }

        offset_kernels!(dot_q4_1, dot_q4_1x4, 20, q4_1_block);
        offset_kernels!(dot_q5_1, dot_q5_1x4, 24, q5_1_block);

        /// A Q4_K super-block unpacked: its two scales, its eight sub-block scales and mins,
        /// and its nibbles (`w[j]` the low then high nibbles of bytes `32j..32j + 32`, i.e.
        /// sub-blocks `2j` and `2j + 1`).
        struct Q4k {
            d: f32,
            dmin: f32,
            scales: [i32; 8],
            mins: int16x8_t,
            w: [[int8x16_t; 4]; 4],
        }

        /// The eight 6-bit sub-block scales and mins of a Q4_K or Q5_K super-block (`b`).
        #[inline]
        #[target_feature(enable = $features)]
        fn k4_scales(b: &[u8]) -> ([i32; 8], int16x8_t) {
            let mut scales = [0i32; 8];
            let mut mins = [0i16; 8];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &b[4..16]);
                scales[j] = i32::from(s);
                mins[j] = i16::from(m);
            }
            // SAFETY: `mins` is eight i16.
            (scales, unsafe { vld1q_s16(mins.as_ptr()) })
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn q4k_block(b: &[u8]) -> Q4k {
            let m4 = vdupq_n_u8(0xF);
            let (scales, mins) = k4_scales(b);
            let mut w = [[vdupq_n_s8(0); 4]; 4];
            for (j, w) in w.iter_mut().enumerate() {
                let (q0, q1) = (ld_u8(b, 16 + 32 * j), ld_u8(b, 32 + 32 * j));
                *w = [
                    vreinterpretq_s8_u8(vandq_u8(q0, m4)),
                    vreinterpretq_s8_u8(vandq_u8(q1, m4)),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(q0)),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(q1)),
                ];
            }
            Q4k {
                d: f16_at(b, 0),
                dmin: f16_at(b, 2),
                scales,
                mins,
                w,
            }
        }

        /// A Q5_K super-block unpacked as [`Q4k`] is, with each weight's fifth bit (bit `j` of
        /// `qh[l]` for sub-block `j`, the low nibbles of chunk `j / 2` for even `j`) on top of
        /// its nibble: values 0..32, which [`q4k_add`] sums like Q4_K's.
        #[inline]
        #[target_feature(enable = $features)]
        fn q5k_block(b: &[u8]) -> Q4k {
            let (m4, one, two) = (vdupq_n_u8(0xF), vdupq_n_u8(1), vdupq_n_u8(2));
            let (scales, mins) = k4_scales(b);
            // The fifth bits of weights `l` and `16 + l` of every chunk; shifted right by two
            // per chunk, so that chunk `j`'s two bits are bits 0 and 1.
            let (mut h0, mut h1) = (ld_u8(b, 16), ld_u8(b, 32));
            let mut w = [[vdupq_n_s8(0); 4]; 4];
            for (j, w) in w.iter_mut().enumerate() {
                let (q0, q1) = (ld_u8(b, 48 + 32 * j), ld_u8(b, 64 + 32 * j));
                let lo = |q, h| vorrq_u8(vandq_u8(q, m4), vshlq_n_u8::<4>(vandq_u8(h, one)));
                let hi = |q, h| vorrq_u8(vshrq_n_u8::<4>(q), vshlq_n_u8::<3>(vandq_u8(h, two)));
                *w = [lo(q0, h0), lo(q1, h1), hi(q0, h0), hi(q1, h1)]
                    .map(|q| vreinterpretq_s8_u8(q));
                h0 = vshrq_n_u8::<2>(h0);
                h1 = vshrq_n_u8::<2>(h1);
            }
            Q4k {
                d: f16_at(b, 0),
                dmin: f16_at(b, 2),
                scales,
                mins,
                w,
            }
        }

        /// `sum` plus one unpacked Q4_K super-block against one Q8_K block, with the scalar
        /// reference's integer sums and its float operations.
        #[inline]
        #[target_feature(enable = $features)]
        fn q4k_add(sum: f32, q: &Q4k, a: &BlockQ8K) -> f32 {
            // SAFETY: `a.bsums` is sixteen i16.
            let (b0, b1) = unsafe {
                (
                    vld1q_s16(a.bsums.as_ptr()),
                    vld1q_s16(a.bsums.as_ptr().add(8)),
                )
            };
            // Sums of 32 activations, one per sub-block; each fits i16 (at most 32 × 128).
            let bs = vpaddq_s16(b0, b1);
            let summ = vmull_s16(vget_low_s16(bs), vget_low_s16(q.mins));
            let summ = vaddvq_s32(vmlal_high_s16(summ, bs, q.mins));
            let mut sumi = vdupq_n_s32(0);
            for (j, w) in q.w.iter().enumerate() {
                let lo = $dot(
                    $dot(vdupq_n_s32(0), w[0], ld_i8(&a.qs, 64 * j)),
                    w[1],
                    ld_i8(&a.qs, 64 * j + 16),
                );
                let hi = $dot(
                    $dot(vdupq_n_s32(0), w[2], ld_i8(&a.qs, 64 * j + 32)),
                    w[3],
                    ld_i8(&a.qs, 64 * j + 48),
                );
                sumi = vmlaq_n_s32(sumi, lo, q.scales[2 * j]);
                sumi = vmlaq_n_s32(sumi, hi, q.scales[2 * j + 1]);
            }
            let sumi = vaddvq_s32(sumi);
            sum + (q.d * a.d * sumi as f32 - q.dmin * a.d * summ as f32)
        }

        /// Defines the one-token and four-token products of a K-quant type whose super-blocks
        /// take `$bytes` bytes, unpack with `$unpack` and add to a sum with `$add` (or only the
        /// four-token one).
        macro_rules! k_kernels {
            ($one:ident, $four:ident, $bytes:literal, $unpack:ident, $add:ident) => {
                pub(super) fn $one(row: &[u8], act: &[BlockQ8K]) -> f32 {
                    #[target_feature(enable = $features)]
                    fn inner(row: &[u8], act: &[BlockQ8K]) -> f32 {
                        let mut sum = 0f32;
                        for (b, a) in row.chunks_exact($bytes).zip(act) {
                            sum = $add(sum, &$unpack(b), a);
                        }
                        sum
                    }
                    assert!(row.len() >= act.len() * $bytes);
                    // SAFETY: as in `dot_q4_0`.
                    unsafe { inner(row, act) }
                }

                k_kernels!($four, $bytes, $unpack, $add);
            };
            ($four:ident, $bytes:literal, $unpack:ident, $add:ident) => {
                /// One row against four Q8_K activation vectors: the weights and scales of
                /// each super-block are unpacked once.
                pub(super) fn $four(row: &[u8], acts: [&[BlockQ8K]; 4]) -> [f32; 4] {
                    #[target_feature(enable = $features)]
                    fn inner(row: &[u8], acts: [&[BlockQ8K]; 4], n: usize) -> [f32; 4] {
                        let mut sum = [0f32; 4];
                        for (i, b) in row.chunks_exact($bytes).take(n).enumerate() {
                            let q = $unpack(b);
                            for (sum, act) in sum.iter_mut().zip(acts) {
                                *sum = $add(*sum, &q, &act[i]);
                            }
                        }
                        sum
                    }
                    let n = acts[0].len();
                    assert!(row.len() >= n * $bytes && acts.iter().all(|a| a.len() == n));
                    // SAFETY: as in `dot_q4_0`.
                    unsafe { inner(row, acts, n) }
                }
            };
        }

        k_kernels!(dot_q4k, dot_q4kx4, 144, q4k_block, q4k_add);
        k_kernels!(dot_q5k, dot_q5kx4, 176, q5k_block, q4k_add);

        /// A Q2_K, Q3_K or Q6_K super-block unpacked: its scales, its sixteen sub-blocks'
        /// scales (and for Q2_K mins) and their weights (`w[s]`: sub-block `s`, weights
        /// `16s..`).
        struct Low {
            d: f32,
            dmin: f32,
            scales: [i32; 16],
            mins: [int16x8_t; 2],
            w: [int8x16_t; 16],
        }

        /// `Σ scale · Σ q·a` over the sixteen sub-blocks of `q` against `a`.
        #[inline]
        #[target_feature(enable = $features)]
        fn low_sumi(q: &Low, a: &BlockQ8K) -> i32 {
            let mut sumi = vdupq_n_s32(0);
            for (s, w) in q.w.iter().enumerate() {
                let p = $dot(vdupq_n_s32(0), *w, ld_i8(&a.qs, 16 * s));
                sumi = vmlaq_n_s32(sumi, p, q.scales[s]);
            }
            vaddvq_s32(sumi)
        }

        /// Sub-block `s = 8n + 2j + h` of a Q2_K or Q3_K super-block has its 2-bit values at
        /// bits `2j` of bytes `32n + 16h..` of `qs`: `f(s, v)` takes sub-block `s` and its
        /// values `v` (0..4), and gives its weights.
        #[inline]
        #[target_feature(enable = $features)]
        fn low2_values(
            qs: &[u8],
            mut f: impl FnMut(usize, uint8x16_t) -> int8x16_t,
        ) -> [int8x16_t; 16] {
            let three = vdupq_n_u8(3);
            let mut w = [vdupq_n_s8(0); 16];
            for n in 0..2 {
                let (mut q0, mut q1) = (ld_u8(qs, 32 * n), ld_u8(qs, 32 * n + 16));
                for j in 0..4 {
                    let s = 8 * n + 2 * j;
                    w[s] = f(s, vandq_u8(q0, three));
                    w[s + 1] = f(s + 1, vandq_u8(q1, three));
                    q0 = vshrq_n_u8::<2>(q0);
                    q1 = vshrq_n_u8::<2>(q1);
                }
            }
            w
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn q2k_block(b: &[u8]) -> Low {
            let packed = ld_u8(b, 0);
            let mins = vshrq_n_u8::<4>(packed);
            let mins = [
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mins))),
                vreinterpretq_s16_u16(vmovl_high_u8(mins)),
            ];
            Low {
                d: f16_at(b, 80),
                dmin: f16_at(b, 82),
                scales: std::array::from_fn(|s| i32::from(b[s] & 0xF)),
                mins,
                w: low2_values(&b[16..80], |_, v| vreinterpretq_s8_u8(v)),
            }
        }

        /// `sum` plus one unpacked Q2_K super-block against one Q8_K block, with the scalar
        /// reference's integer sums and float operations.
        #[inline]
        #[target_feature(enable = $features)]
        fn q2k_add(sum: f32, q: &Low, a: &BlockQ8K) -> f32 {
            // SAFETY: `a.bsums` is sixteen i16.
            let (b0, b1) = unsafe {
                (
                    vld1q_s16(a.bsums.as_ptr()),
                    vld1q_s16(a.bsums.as_ptr().add(8)),
                )
            };
            // Each product is at most 15 × 2048 (a min times a sum of 16 activations): i32 lanes
            // hold it and the sums.
            let summ = vmull_s16(vget_low_s16(b0), vget_low_s16(q.mins[0]));
            let summ = vmlal_high_s16(summ, b0, q.mins[0]);
            let summ = vmlal_s16(summ, vget_low_s16(b1), vget_low_s16(q.mins[1]));
            let summ = vaddvq_s32(vmlal_high_s16(summ, b1, q.mins[1]));
            let sumi = low_sumi(q, a);
            sum + (q.d * a.d * sumi as f32 - q.dmin * a.d * summ as f32)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn q3k_block(b: &[u8]) -> Low {
            let one = vdupq_n_u8(1);
            // The high bits of sub-block `8n + 2j + h`: bit `4n + j` of `hmask[16h..16h + 16]`.
            let hmask = [ld_u8(b, 0), ld_u8(b, 16)];
            let scales = super::super::lowbit::q3k_scales(&b[96..108]);
            Low {
                d: f16_at(b, 108),
                dmin: 0.0,
                scales: scales.map(i32::from),
                mins: [vdupq_n_s16(0); 2],
                w: low2_values(&b[32..96], |s, v| {
                    let bit = 4 * (s / 8) + s % 8 / 2;
                    let high = vtstq_u8(hmask[s % 2], vdupq_n_u8(1u8 << bit));
                    // Minus 4 where the high bit is clear.
                    let four = vshlq_n_u8::<2>(vbicq_u8(one, high));
                    vsubq_s8(vreinterpretq_s8_u8(v), vreinterpretq_s8_u8(four))
                }),
            }
        }

        /// `sum` plus one unpacked Q3_K super-block against one Q8_K block, with the scalar
        /// reference's float operations.
        #[inline]
        #[target_feature(enable = $features)]
        fn q3k_add(sum: f32, q: &Low, a: &BlockQ8K) -> f32 {
            sum + q.d * a.d * low_sumi(q, a) as f32
        }

        k_kernels!(dot_q2k, dot_q2kx4, 84, q2k_block, q2k_add);
        k_kernels!(dot_q3k, dot_q3kx4, 110, q3k_block, q3k_add);

        /// A Q6_K super-block unpacked for the four-token product: sub-block `s = 8n + 2k + c`
        /// (weights `128n + 32k + 16c..`) as [`dot_q6k`] reads it, and its signed scales.
        #[inline]
        #[target_feature(enable = $features)]
        fn q6k_block(b: &[u8]) -> Low {
            let mut w = [vdupq_n_s8(0); 16];
            for n in 0..2 {
                for c in 0..2 {
                    for (k, q) in q6k_values(b, n, c).into_iter().enumerate() {
                        w[8 * n + 2 * k + c] = q;
                    }
                }
            }
            Low {
                d: f16_at(b, 208),
                dmin: 0.0,
                scales: std::array::from_fn(|s| i32::from(b[192 + s] as i8)),
                mins: [vdupq_n_s16(0); 2],
                w,
            }
        }

        /// `sum` plus one unpacked Q6_K super-block against one Q8_K block, with
        /// [`dot_q6k`]'s (and the scalar reference's) float operations.
        #[inline]
        #[target_feature(enable = $features)]
        fn q6k_add(sum: f32, q: &Low, a: &BlockQ8K) -> f32 {
            sum + low_sumi(q, a) as f32 * q.d * a.d
        }

        k_kernels!(dot_q6kx4, 210, q6k_block, q6k_add);

        /// Weights `32k + 16c..32k + 16c + 16` of half `n` of a Q6_K super-block, for k in
        /// 0..4: low nibbles of bytes `l`, of `l + 32`, high nibbles of each, with bit pairs 0,
        /// 1, 2, 3 of the high bits on top; stored + 32.
        #[inline]
        #[target_feature(enable = $features)]
        fn q6k_values(b: &[u8], n: usize, c: usize) -> [int8x16_t; 4] {
            let m4 = vdupq_n_u8(0xF);
            let l1 = ld_u8(b, 64 * n + 16 * c);
            let l2 = ld_u8(b, 64 * n + 32 + 16 * c);
            let h = ld_u8(b, 128 + 32 * n + 16 * c);
            let q = [
                vorrq_u8(
                    vandq_u8(l1, m4),
                    vshlq_n_u8::<4>(vandq_u8(h, vdupq_n_u8(3))),
                ),
                vorrq_u8(
                    vandq_u8(l2, m4),
                    vshlq_n_u8::<2>(vandq_u8(h, vdupq_n_u8(0xC))),
                ),
                vorrq_u8(vshrq_n_u8::<4>(l1), vandq_u8(h, vdupq_n_u8(0x30))),
                vorrq_u8(
                    vshrq_n_u8::<4>(l2),
                    vshrq_n_u8::<2>(vandq_u8(h, vdupq_n_u8(0xC0))),
                ),
            ];
            q.map(|q| vsubq_s8(vreinterpretq_s8_u8(q), vdupq_n_s8(32)))
        }

        pub(super) fn dot_q6k(row: &[u8], act: &[BlockQ8K]) -> f32 {
            #[target_feature(enable = $features)]
            fn inner(row: &[u8], act: &[BlockQ8K]) -> f32 {
                let mut sum = 0f32;
                for (b, a) in row.chunks_exact(210).zip(act) {
                    let scales = &b[192..208];
                    let mut sumi = vdupq_n_s32(0);
                    for n in 0..2 {
                        for c in 0..2 {
                            for (k, w) in q6k_values(b, n, c).into_iter().enumerate() {
                                let y = ld_i8(&a.qs, 128 * n + 32 * k + 16 * c);
                                let s = i32::from(scales[8 * n + 2 * k + c] as i8);
                                sumi = vmlaq_n_s32(sumi, $dot(vdupq_n_s32(0), w, y), s);
                            }
                        }
                    }
                    sum += vaddvq_s32(sumi) as f32 * f16_at(b, 208) * a.d;
                }
                sum
            }
            assert!(row.len() >= act.len() * 210);
            // SAFETY: as in `dot_q4_0`.
            unsafe { inner(row, act) }
        }
    };
}

/// Baseline NEON.
mod base {
    row_kernels!("neon", dot_mull);
}

/// NEON with `dotprod`.
mod dotprod {
    row_kernels!("neon,dotprod", dot_sdot);
}

/// F16, BF16 and F32 rows against f32 activations (already rounded to the row's type), for
/// both variants: sixteen weights per step, widened to f32 and multiplied into four vector
/// accumulators, which are added together once at the end, then the tail of fewer than sixteen
/// weights one by one. The four-token products run the same operations per token.
mod float {
    use std::arch::aarch64::*;

    use super::super::super::quant::{bf16_at, f16_at};
    use super::ld_u8;

    /// The four f32 of `s` from `at`; panics past the end of `s`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn ld_f32(s: &[f32], at: usize) -> float32x4_t {
        let s = &s[at..at + 4];
        // SAFETY: `s` is four readable f32.
        unsafe { vld1q_f32(s.as_ptr()) }
    }

    /// Weights `i..i + 8` of an F16 row.
    #[inline]
    #[target_feature(enable = "neon")]
    fn f16x8(row: &[u8], i: usize) -> [float32x4_t; 2] {
        let h = vreinterpretq_u16_u8(ld_u8(row, 2 * i));
        [
            vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h))),
            vcvt_high_f32_f16(vreinterpretq_f16_u16(h)),
        ]
    }

    /// Weights `i..i + 8` of a BF16 row: a bf16 is the top half of the f32 it stands for.
    #[inline]
    #[target_feature(enable = "neon")]
    fn bf16x8(row: &[u8], i: usize) -> [float32x4_t; 2] {
        let h = vreinterpretq_u16_u8(ld_u8(row, 2 * i));
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
        ]
    }

    /// Weights `i..i + 8` of an F32 row.
    #[inline]
    #[target_feature(enable = "neon")]
    fn f32x8(row: &[u8], i: usize) -> [float32x4_t; 2] {
        [
            vreinterpretq_f32_u8(ld_u8(row, 4 * i)),
            vreinterpretq_f32_u8(ld_u8(row, 4 * i + 16)),
        ]
    }

    fn f32_at(row: &[u8], at: usize) -> f32 {
        f32::from_le_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]])
    }

    /// `acc` after sixteen weights (`w`) against activations `x[i..i + 16]`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn step(acc: &mut [float32x4_t; 4], w: &[float32x4_t; 4], x: &[f32], i: usize) {
        for (k, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
            *acc = vfmaq_f32(*acc, *w, ld_f32(x, i + 4 * k));
        }
    }

    /// The sum of the accumulators, then the tail's products `row[i] · x[i]` from `from`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn finish(
        acc: &[float32x4_t; 4],
        row: &[u8],
        x: &[f32],
        from: usize,
        at: fn(&[u8], usize) -> f32,
        size: usize,
    ) -> f32 {
        let mut sum = vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ));
        for (i, &x) in x.iter().enumerate().skip(from) {
            sum += at(row, size * i) * x;
        }
        sum
    }

    /// Defines the one-token and four-token products of rows of `$size`-byte floats that
    /// `$load` widens eight at a time and `$at` one at a time.
    macro_rules! float_kernels {
        ($one:ident, $four:ident, $size:literal, $load:ident, $at:ident) => {
            pub(super) fn $one(row: &[u8], act: &[f32]) -> f32 {
                #[target_feature(enable = "neon")]
                fn inner(row: &[u8], act: &[f32]) -> f32 {
                    let body = act.len() / 16 * 16;
                    let mut acc = [vdupq_n_f32(0.0); 4];
                    for i in (0..body).step_by(16) {
                        let ([w0, w1], [w2, w3]) = ($load(row, i), $load(row, i + 8));
                        step(&mut acc, &[w0, w1, w2, w3], act, i);
                    }
                    finish(&acc, row, act, body, $at, $size)
                }
                assert!(row.len() >= act.len() * $size);
                // SAFETY: NEON is part of the aarch64 baseline.
                unsafe { inner(row, act) }
            }

            /// One row against four activation vectors: each weight is widened once.
            pub(super) fn $four(row: &[u8], acts: [&[f32]; 4]) -> [f32; 4] {
                #[target_feature(enable = "neon")]
                fn inner(row: &[u8], acts: [&[f32]; 4], n: usize) -> [f32; 4] {
                    let body = n / 16 * 16;
                    let mut acc = [[vdupq_n_f32(0.0); 4]; 4];
                    for i in (0..body).step_by(16) {
                        let ([w0, w1], [w2, w3]) = ($load(row, i), $load(row, i + 8));
                        for (acc, act) in acc.iter_mut().zip(acts) {
                            step(acc, &[w0, w1, w2, w3], act, i);
                        }
                    }
                    std::array::from_fn(|k| finish(&acc[k], row, acts[k], body, $at, $size))
                }
                let n = acts[0].len();
                assert!(row.len() >= n * $size && acts.iter().all(|a| a.len() == n));
                // SAFETY: NEON is part of the aarch64 baseline.
                unsafe { inner(row, acts, n) }
            }
        };
    }

    float_kernels!(dot_f16, dot_f16x4, 2, f16x8, f16_at);
    float_kernels!(dot_bf16, dot_bf16x4, 2, bf16x8, bf16_at);
    float_kernels!(dot_f32, dot_f32x4, 4, f32x8, f32_at);
}

#[cfg(test)]
mod tests {
    use half::f16;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::super::quant::{ActFormat, QK_K, WeightType};
    use super::super::{Activations, DotQ8K, lowbit};

    /// Every variant's Q2_K and Q3_K products, one token and four, give the portable code's
    /// results bit for bit (they keep its integer sums and float operations); the kernel tests
    /// hold the portable code to dequantize-then-multiply.
    #[test]
    fn low_bit_k_quants_give_the_portable_results_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(41);
        let types: [(WeightType, DotQ8K, &[usize]); 2] = [
            (WeightType::Q2K, lowbit::dot_q2k, &[80, 82]),
            (WeightType::Q3K, lowbit::dot_q3k, &[108]),
        ];
        for kernels in super::variants() {
            for (ty, reference, scales) in types {
                for blocks in [1usize, 3, 16] {
                    let cols = blocks * QK_K;
                    let mut row: Vec<u8> = (0..ty.row_bytes(cols)).map(|_| rng.random()).collect();
                    for b in row.chunks_exact_mut(ty.block_bytes()) {
                        for &at in scales {
                            let d = f16::from_f32(rng.random_range(0.001..0.05));
                            b[at..at + 2].copy_from_slice(&d.to_le_bytes());
                        }
                    }
                    let x: Vec<f32> = (0..4 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let mut act = Activations::default();
                    act.set(&x, cols, &[ActFormat::Q8K]);
                    let want: Vec<u32> = (0..4)
                        .map(|t| reference(&row, act.q8k(t)).to_bits())
                        .collect();
                    let one: Vec<u32> = (0..4)
                        .map(|t| kernels.dot(ty, &row, &act, t).to_bits())
                        .collect();
                    let case = format!("{} {ty:?} {blocks}", kernels.name);
                    assert_eq!(one, want, "{case}");
                    let four = kernels.dot4(ty, &row, &act, 0).expect(&case);
                    assert_eq!(four.map(f32::to_bits).as_slice(), want, "{case}");
                }
            }
        }
    }
}
