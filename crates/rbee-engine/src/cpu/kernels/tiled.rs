//! Q4_0 and Q8_0 matrices repacked at load into tiles of eight rows, and the scalar reference
//! products over them (Q4_K tiles, with their 256-element super-blocks, are in
//! [`super::tiled_k`]).
//!
//! A plain row interleaves a 2-byte scale with the weights of each 32-weight block, so a kernel
//! reading one row at a time pays, per block, a scalar scale load, a horizontal sum and the
//! preparation of the activation block for just one row; that makes the one-token product
//! compute-bound on one core. In a tile, each 32-column block of eight rows is stored as the
//! rows' eight f16 scales (16 bytes, loaded and converted as one vector) followed by the
//! weights in groups of four columns × eight rows: one 32-byte group multiplied (`dpbusd`, or
//! `maddubs` + `madd`) with four activations broadcast to every lane adds four products to each
//! of the eight rows' sums at once, so a column ends with the eight rows' sums in one vector and
//! needs no horizontal sum. A tile column takes exactly the bytes of the eight original blocks,
//! so the repacking happens in place in the loaded file data.
//!
//! A Q4_0 tile column (8 × 18 bytes) holds four 32-byte groups: group `k` holds bytes
//! `4k..4k + 4` of each row's 16 nibble bytes, whose low nibbles are weights `4k..4k + 4` and
//! high nibbles weights `16 + 4k..20 + 4k`. Nibbles are multiplied unsigned; the offset of 8
//! subtracts 8 × (sum of the activations) from every row alike, once per activation block.
//!
//! A Q5_0 tile column (8 × 22 bytes) is the Q4_0 column of its nibbles (values `0..32`, offset
//! 16) followed by eight 32-bit words of fifth bits: word `2k` holds, in bit `4r + e`, the fifth
//! bit of row `r`'s weight `4k + e` (the low nibbles of group `k`), word `2k + 1` that of its
//! weight `16 + 4k + e` (the high nibbles), so one word spreads to the 32 bytes of one
//! unpacked group.
//!
//! A Q8_0 tile column (8 × 34 bytes) holds the eight scales, then eight 32-byte groups: group
//! `k` holds weights `4k..4k + 4` of each of the eight rows, stored `w + 128` as unsigned bytes.
//! One `dpbusd` of a group with four activations broadcast to every lane adds four products to
//! each row's sum at once, so a column needs no horizontal sums; the +128 adds 128 × (sum of
//! the activations) to every row alike, taken out once per activation block. Only kernels with
//! that instruction (VNNI), or aarch64's `sdot` (which flips the bytes back to signed on load),
//! read this layout, so Q8_0 matrices are repacked only for them.

use super::super::quant::{BlockQ8, QK, f16_at};

/// Rows per tile.
pub(crate) const TILE_ROWS: usize = 8;
/// Bytes of one Q4_0 tile column: eight scales, then four groups of four nibble bytes of each row.
pub(crate) const TILE_BLOCK: usize = TILE_ROWS * 18;
/// Bytes of one Q5_0 tile column: a Q4_0 column, then eight 32-bit words of fifth bits.
pub(crate) const TILE_BLOCK_Q5_0: usize = TILE_ROWS * 22;
/// Bytes of one Q8_0 tile column: eight scales, then eight groups of four weights of each row.
pub(crate) const TILE_BLOCK_Q8: usize = TILE_ROWS * 34;

/// A Q8 activation block as the tile kernels take it: its values, its scale and the exact sum
/// of its values (for the offsets of the tiles' unsigned weights).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct TileAct {
    pub qs: [i8; QK],
    pub d: f32,
    pub sum: i32,
}

impl Default for TileAct {
    fn default() -> Self {
        TileAct {
            qs: [0; QK],
            d: 0.0,
            sum: 0,
        }
    }
}

impl TileAct {
    pub(crate) fn new(b: &BlockQ8) -> TileAct {
        TileAct {
            qs: b.qs,
            d: b.d,
            sum: b.qs.iter().map(|&q| i32::from(q)).sum(),
        }
    }
}

/// Rewrites `rows` (eight consecutive Q4_0 rows of `blocks` blocks) into one tile, in place.
/// `scratch` is reused between calls.
pub(crate) fn repack(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    assert_eq!(rows.len(), blocks * TILE_BLOCK);
    scratch.clear();
    scratch.extend_from_slice(rows);
    for (b, dst) in rows.chunks_exact_mut(TILE_BLOCK).enumerate() {
        for r in 0..TILE_ROWS {
            let src = &scratch[(r * blocks + b) * 18..][..18];
            dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
            for k in 0..4 {
                dst[16 + 32 * k + 4 * r..20 + 32 * k + 4 * r]
                    .copy_from_slice(&src[2 + 4 * k..6 + 4 * k]);
            }
        }
    }
}

/// Rewrites `rows` (eight consecutive Q5_0 rows of `blocks` blocks) into one Q5_0 tile, in
/// place.
pub(crate) fn repack_q5_0(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    assert_eq!(rows.len(), blocks * TILE_BLOCK_Q5_0);
    scratch.clear();
    scratch.extend_from_slice(rows);
    for (b, dst) in rows.chunks_exact_mut(TILE_BLOCK_Q5_0).enumerate() {
        dst[144..].fill(0);
        for r in 0..TILE_ROWS {
            let src = &scratch[(r * blocks + b) * 22..][..22];
            dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
            for k in 0..4 {
                dst[16 + 32 * k + 4 * r..20 + 32 * k + 4 * r]
                    .copy_from_slice(&src[6 + 4 * k..10 + 4 * k]);
            }
            let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
            for k in 0..4 {
                for e in 0..4 {
                    for (word, j) in [(2 * k, 4 * k + e), (2 * k + 1, 16 + 4 * k + e)] {
                        let bit = (qh >> j) & 1;
                        let at = 144 + 4 * word;
                        let mut w =
                            u32::from_le_bytes([dst[at], dst[at + 1], dst[at + 2], dst[at + 3]]);
                        w |= bit << (4 * r + e);
                        dst[at..at + 4].copy_from_slice(&w.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// Dot product of row `lane` of a Q5_0 tile with one activation vector, in the order of
/// [`super::super::quant::reference::dot_q5_0`].
pub(crate) fn dot_lane_q5_0(tile: &[u8], lane: usize, act: &[TileAct]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in tile.chunks_exact(TILE_BLOCK_Q5_0).zip(act) {
        let fifth = |word: usize, e: usize| {
            let at = 144 + 4 * word;
            let w = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            ((w >> (4 * lane + e)) & 1) as u8
        };
        let mut s = 0i32;
        for l in 0..16 {
            let (k, e) = (l / 4, l % 4);
            let q = b[16 + 32 * k + 4 * lane + e];
            let lo = q & 0xF | fifth(2 * k, e) << 4;
            let hi = q >> 4 | fifth(2 * k + 1, e) << 4;
            s += (i32::from(lo) - 16) * i32::from(a.qs[l]);
            s += (i32::from(hi) - 16) * i32::from(a.qs[l + 16]);
        }
        sum += s as f32 * f16_at(b, 2 * lane) * a.d;
    }
    sum
}

/// The eight rows of a Q5_0 tile against one activation vector (the reference of the SIMD
/// tile kernels).
#[cfg(test)]
pub(crate) fn dot_q5_0(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
    std::array::from_fn(|lane| dot_lane_q5_0(tile, lane, act))
}

/// The eight rows of a Q5_0 tile against four activation vectors.
#[cfg(test)]
pub(crate) fn dot4_q5_0(tile: &[u8], acts: [&[TileAct]; 4]) -> [[f32; TILE_ROWS]; 4] {
    acts.map(|a| dot_q5_0(tile, a))
}

/// Rewrites `rows` (eight consecutive Q8_0 rows of `blocks` blocks) into one Q8_0 tile, in
/// place.
pub(crate) fn repack_q8_0(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    assert_eq!(rows.len(), blocks * TILE_BLOCK_Q8);
    scratch.clear();
    scratch.extend_from_slice(rows);
    for (b, dst) in rows.chunks_exact_mut(TILE_BLOCK_Q8).enumerate() {
        for r in 0..TILE_ROWS {
            let src = &scratch[(r * blocks + b) * 34..][..34];
            dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
            for k in 0..8 {
                for e in 0..4 {
                    dst[16 + 32 * k + 4 * r + e] = src[2 + 4 * k + e] ^ 0x80;
                }
            }
        }
    }
}

/// Dot product of row `lane` of a Q8_0 tile with one activation vector.
pub(crate) fn dot_lane_q8_0(tile: &[u8], lane: usize, act: &[TileAct]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in tile.chunks_exact(TILE_BLOCK_Q8).zip(act) {
        let mut s = 0i32;
        for k in 0..8 {
            for e in 0..4 {
                let w = i32::from((b[16 + 32 * k + 4 * lane + e] ^ 0x80) as i8);
                s += w * i32::from(a.qs[4 * k + e]);
            }
        }
        sum += s as f32 * f16_at(b, 2 * lane) * a.d;
    }
    sum
}

/// Dot product of row `lane` of a tile with one activation vector, in the order of
/// [`super::super::quant::reference::dot_q4_0`].
pub(crate) fn dot_lane(tile: &[u8], lane: usize, act: &[TileAct]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in tile.chunks_exact(TILE_BLOCK).zip(act) {
        let mut s = 0i32;
        for l in 0..16 {
            let q = b[16 + 32 * (l / 4) + 4 * lane + l % 4];
            s += (i32::from(q & 0xF) - 8) * i32::from(a.qs[l]);
            s += (i32::from(q >> 4) - 8) * i32::from(a.qs[l + 16]);
        }
        sum += s as f32 * f16_at(b, 2 * lane) * a.d;
    }
    sum
}

/// The eight rows of a tile against one activation vector.
pub(crate) fn dot(tile: &[u8], act: &[TileAct]) -> [f32; TILE_ROWS] {
    std::array::from_fn(|lane| dot_lane(tile, lane, act))
}

/// The eight rows of a tile against four activation vectors.
pub(crate) fn dot4(tile: &[u8], acts: [&[TileAct]; 4]) -> [[f32; TILE_ROWS]; 4] {
    acts.map(|a| dot(tile, a))
}
