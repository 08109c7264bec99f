//! Q4_K matrices repacked at load into tiles of eight rows, and the scalar reference products
//! over them (the x86 kernels are in [`super::x86_tiled_k`]).
//!
//! A Q4_K row pays, per 256-weight super-block, the unpacking of its twelve bytes of 6-bit
//! scales and mins (scalar bit work for one row), a horizontal sum, and the preparation of the
//! activation super-block for just that row. In a tile, each super-block column of eight rows
//! (8 × 144 bytes, so the repacking happens in place in the loaded file data) is stored as:
//!
//! - bytes `0..16`: the eight rows' f16 `d`, and `16..32` their f16 `dmin`: one vector each;
//! - bytes `32..128`: the rows' 64 scales and 64 mins, still 6 bits each, arranged so that a few
//!   vector operations unpack them for all eight rows. With `S0`, `S1`, `M0`, `M1` the 32-byte
//!   vectors whose byte `4r + i` is row `r`'s scale of sub-block `i`, scale of sub-block
//!   `4 + i`, min of sub-block `i` and min of sub-block `4 + i`: bytes `32..64` hold
//!   `S0 & 15 | (S1 & 15) << 4`, bytes `64..96` hold `M0 & 15 | (M1 & 15) << 4`, and bytes
//!   `96..128` the high two bits of all four, `S0 >> 4 | (S1 >> 4) << 2 | (M0 >> 4) << 4 |
//!   (M1 >> 4) << 6`. A 32-bit lane `r` of `S0` then holds row `r`'s first four scales, which a
//!   byte shuffle turns into one vector of eight rows' scales for any sub-block;
//! - bytes `128..1152`: the nibbles, as in the Q4_0 tile ([`super::tiled`]) in groups of four
//!   columns × eight rows: group `k` of pair `p` (bytes `128 + 256p + 32k..`) holds bytes
//!   `32p + 4k..32p + 4k + 4` of each row's 128 nibble bytes, whose low nibbles are weights
//!   `64p + 4k..` (sub-block `2p`) and high nibbles weights `64p + 32 + 4k..` (sub-block
//!   `2p + 1`).
//!
//! One `dpbusd` (or `maddubs` + `madd`) of a group with four activations broadcast to every
//! lane adds four products to each of the eight rows' sums; the sub-block scales multiply the
//! eight sums as one vector and the mins are taken out with the activations' 16-element sums
//! (`bsums`), so a super-block ends with eight rows' results in one vector and no horizontal sum.

use super::super::quant::{BlockQ8K, QK_K, f16_at, scale_min_k4};
use super::tiled::TILE_ROWS;

/// Bytes of one Q4_K tile column: eight super-blocks' 144 bytes.
pub(crate) const TILE_BLOCK_Q4K: usize = TILE_ROWS * 144;
/// Where the packed scales and mins start in a tile column.
pub(crate) const SCALES: usize = 32;
/// Where the nibbles start in a tile column.
pub(crate) const NIBBLES: usize = 128;

/// Rewrites `rows` (eight consecutive Q4_K rows of `blocks` super-blocks) into one tile, in
/// place. `scratch` is reused between calls.
pub(crate) fn repack(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    assert_eq!(rows.len(), blocks * TILE_BLOCK_Q4K);
    scratch.clear();
    scratch.extend_from_slice(rows);
    for (b, dst) in rows.chunks_exact_mut(TILE_BLOCK_Q4K).enumerate() {
        for r in 0..TILE_ROWS {
            let src = &scratch[(r * blocks + b) * 144..][..144];
            dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
            dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&src[2..4]);
            for i in 0..4 {
                let (s0, m0) = scale_min_k4(i, &src[4..16]);
                let (s1, m1) = scale_min_k4(4 + i, &src[4..16]);
                let at = 4 * r + i;
                dst[SCALES + at] = s0 & 15 | (s1 & 15) << 4;
                dst[SCALES + 32 + at] = m0 & 15 | (m1 & 15) << 4;
                dst[SCALES + 64 + at] = s0 >> 4 | (s1 >> 4) << 2 | (m0 >> 4) << 4 | (m1 >> 4) << 6;
            }
            for p in 0..4 {
                for k in 0..8 {
                    let at = NIBBLES + 256 * p + 32 * k + 4 * r;
                    dst[at..at + 4].copy_from_slice(&src[16 + 32 * p + 4 * k..][..4]);
                }
            }
        }
    }
}

/// The scales and mins of row `lane` in tile column `b`, by sub-block.
pub(crate) fn scales_mins(b: &[u8], lane: usize) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for i in 0..4 {
        let at = SCALES + 4 * lane + i;
        let (ls, lm, h) = (b[at], b[at + 32], b[at + 64]);
        sc[i] = ls & 15 | (h & 3) << 4;
        sc[4 + i] = ls >> 4 | (h >> 2 & 3) << 4;
        mn[i] = lm & 15 | (h >> 4 & 3) << 4;
        mn[4 + i] = lm >> 4 | (h >> 6) << 4;
    }
    (sc, mn)
}

/// Dot product of row `lane` of a Q4_K tile with one activation vector, in the order of
/// [`super::super::quant::reference::dot_q4k`].
pub(crate) fn dot_lane(tile: &[u8], lane: usize, act: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in tile.chunks_exact(TILE_BLOCK_Q4K).zip(act) {
        let (d, dmin) = (f16_at(b, 2 * lane) * a.d, f16_at(b, 16 + 2 * lane) * a.d);
        let (sc, mn) = scales_mins(b, lane);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let (p, shift) = (j / 2, 4 * (j % 2));
            let s: i32 = (0..32)
                .map(|l| {
                    let q = b[NIBBLES + 256 * p + 32 * (l / 4) + 4 * lane + l % 4];
                    i32::from((q >> shift) & 0xF) * i32::from(a.qs[32 * j + l])
                })
                .sum();
            sumi += i32::from(sc[j]) * s;
            summ += i32::from(mn[j]) * (i32::from(a.bsums[2 * j]) + i32::from(a.bsums[2 * j + 1]));
        }
        sum += d * sumi as f32 - dmin * summ as f32;
    }
    sum
}

/// The eight rows of a Q4_K tile against one activation vector (the reference the SIMD tile
/// kernels are tested against; the portable kernels do not tile Q4_K).
#[cfg(test)]
pub(crate) fn dot(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
    std::array::from_fn(|lane| dot_lane(tile, lane, act))
}

/// The eight rows of a Q4_K tile against four activation vectors.
#[cfg(test)]
pub(crate) fn dot4(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
    acts.map(|a| dot(tile, a))
}

const _: () = assert!(NIBBLES + TILE_ROWS * QK_K / 2 == TILE_BLOCK_Q4K);
