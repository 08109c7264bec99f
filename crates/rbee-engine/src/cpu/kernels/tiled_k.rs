//! Q4_K, Q5_K and Q6_K matrices repacked at load into tiles of eight rows, and the scalar reference
//! products over them (the x86 kernels are in [`super::x86_tiled_k`]).
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
//!
//! A Q5_K tile column (8 × 176 bytes) has the Q4_K column's first 128 bytes, then eight chunks
//! of 160 bytes, chunk `k` (bytes `128 + 160k..`) holding a group of fifth bits followed by the
//! four nibble groups they complete. The fifth bits are grouped as the nibbles are: the group
//! holds bytes `4k..4k + 4` of each row's 32 bytes of high bits, whose bit `j` belongs to weight
//! `32j + 4k + e` (sub-block `j`), so it serves the nibble group `k` of every pair `p` (bytes
//! `128 + 160k + 32 + 32p..`): bit `2p` for its low nibbles, bit `2p + 1` for its high ones.
//! A one-token product that takes the chunks in order reads the column front to back, the
//! order the hardware prefetcher follows, and each group of fifth bits once.

use super::super::quant::{BlockQ8K, QK_K, f16_at, scale_min_k4};
use super::tiled::TILE_ROWS;

/// Bytes of one Q4_K tile column: eight super-blocks' 144 bytes.
pub(crate) const TILE_BLOCK_Q4K: usize = TILE_ROWS * 144;
/// Where the packed scales and mins start in a tile column.
pub(crate) const SCALES: usize = 32;
/// Where the nibbles start in a tile column.
pub(crate) const NIBBLES: usize = 128;
/// Bytes of one Q5_K tile column: eight super-blocks' 176 bytes.
pub(crate) const TILE_BLOCK_Q5K: usize = TILE_ROWS * 176;
/// Bytes of one chunk of a Q5_K tile column: a group of fifth bits and four nibble groups.
pub(crate) const Q5_CHUNK: usize = 160;

/// Where chunk `k` of a Q5_K tile column starts: its fifth bits, then nibble group `k` of
/// pairs `0..4`, 32 bytes each.
pub(crate) const fn q5_chunk(k: usize) -> usize {
    NIBBLES + Q5_CHUNK * k
}

/// Where nibble group `k` of pair `p` lies in a tile column (of Q5_K when `q5`).
pub(crate) const fn nibble_group(q5: bool, p: usize, k: usize) -> usize {
    if q5 {
        q5_chunk(k) + 32 + 32 * p
    } else {
        NIBBLES + 256 * p + 32 * k
    }
}

/// Rewrites `rows` (eight consecutive Q4_K rows of `blocks` super-blocks) into one tile, in
/// place. `scratch` is reused between calls.
pub(crate) fn repack(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    repack_with(rows, blocks, scratch, false);
}

/// Rewrites `rows` (eight consecutive Q5_K rows of `blocks` super-blocks) into one tile, in
/// place.
pub(crate) fn repack_q5k(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    repack_with(rows, blocks, scratch, true);
}

fn repack_with(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>, q5: bool) {
    let (column, block) = if q5 {
        (TILE_BLOCK_Q5K, 176)
    } else {
        (TILE_BLOCK_Q4K, 144)
    };
    assert_eq!(rows.len(), blocks * column);
    scratch.clear();
    scratch.extend_from_slice(rows);
    for (b, dst) in rows.chunks_exact_mut(column).enumerate() {
        for r in 0..TILE_ROWS {
            let src = &scratch[(r * blocks + b) * block..][..block];
            // A Q5_K block is a Q4_K block with its 32 bytes of fifth bits before the nibbles.
            let (src, high) = if q5 {
                let mut q4 = [0u8; 144];
                q4[..16].copy_from_slice(&src[..16]);
                q4[16..].copy_from_slice(&src[48..176]);
                let mut high = [0u8; 32];
                high.copy_from_slice(&src[16..48]);
                (q4, Some(high))
            } else {
                let mut q4 = [0u8; 144];
                q4.copy_from_slice(src);
                (q4, None)
            };
            if let Some(high) = high {
                for k in 0..8 {
                    let at = q5_chunk(k) + 4 * r;
                    dst[at..at + 4].copy_from_slice(&high[4 * k..4 * k + 4]);
                }
            }
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
                    let at = nibble_group(q5, p, k) + 4 * r;
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
    dot_lane_with(tile, lane, act, false)
}

/// Dot product of row `lane` of a Q5_K tile with one activation vector, in the order of
/// [`super::super::quant::reference::dot_q5k`].
pub(crate) fn dot_lane_q5k(tile: &[u8], lane: usize, act: &[BlockQ8K]) -> f32 {
    dot_lane_with(tile, lane, act, true)
}

fn dot_lane_with(tile: &[u8], lane: usize, act: &[BlockQ8K], q5: bool) -> f32 {
    let column = if q5 { TILE_BLOCK_Q5K } else { TILE_BLOCK_Q4K };
    let mut sum = 0f32;
    for (b, a) in tile.chunks_exact(column).zip(act) {
        let (d, dmin) = (f16_at(b, 2 * lane) * a.d, f16_at(b, 16 + 2 * lane) * a.d);
        let (sc, mn) = scales_mins(b, lane);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let (p, shift) = (j / 2, 4 * (j % 2));
            let s: i32 = (0..32)
                .map(|l| {
                    let (k, at) = (l / 4, 4 * lane + l % 4);
                    let q = b[nibble_group(q5, p, k) + at];
                    let high = if q5 {
                        (b[q5_chunk(k) + at] >> j) & 1
                    } else {
                        0
                    };
                    i32::from((q >> shift) & 0xF | high << 4) * i32::from(a.qs[32 * j + l])
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

/// The eight rows of a Q5_K tile against one activation vector (the reference of the SIMD tile
/// kernels).
#[cfg(test)]
pub(crate) fn dot_q5k(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
    std::array::from_fn(|lane| dot_lane_q5k(tile, lane, act))
}

/// The eight rows of a Q5_K tile against four activation vectors.
#[cfg(test)]
pub(crate) fn dot4_q5k(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
    acts.map(|a| dot_q5k(tile, a))
}

const _: () = assert!(NIBBLES + TILE_ROWS * QK_K / 2 == TILE_BLOCK_Q4K);
const _: () = assert!(q5_chunk(8) == TILE_BLOCK_Q5K);
const _: () = assert!(Q5_CHUNK == 5 * 4 * TILE_ROWS);

/// Bytes of one Q6_K tile column: eight super-blocks' 210 bytes.
///
/// A Q6_K super-block is 128 bytes of low nibbles (`ql`), 64 bytes of high bit pairs (`qh`),
/// sixteen signed 8-bit scales (one per 16 weights) and an f16 `d`; weight `q - 32`, with `q`
/// six bits. Half `h` of a super-block (weights `128h..128h + 128`) takes `ql` bytes
/// `64h..64h + 64` and `qh` bytes `32h..32h + 32`: with `l < 32`, `ql` byte `64h + 32s + l`
/// holds in its low nibble weight `128h + 32s + l` and in its high nibble weight
/// `128h + 64 + 32s + l`, whose two high bits are bits `2s, 2s + 1` and `4 + 2s, 5 + 2s` of `qh`
/// byte `32h + l`. In a tile column:
///
/// - bytes `0..16`: the eight rows' `d`;
/// - bytes `16..144`: four vectors of scales, vector `v` holding in byte `4r + i` row `r`'s
///   scale of sub-block `4v + i`;
/// - bytes `144..1680`: sixteen quads of 96 bytes, quad `8h + k` holding three groups of four
///   columns × eight rows (as in the Q4_K tile): the `qh` bytes `32h + 4k..32h + 4k + 4` of each
///   row, then the `ql` bytes `64h + 4k..` and `64h + 32 + 4k..` those high bits belong to.
///
/// The one-token product reads a column front to back, each quad once (the high bits serve
/// both nibble groups), which is the order the hardware prefetcher follows. The six-bit values
/// are multiplied unsigned, and the offset of 32 is taken out once per super-block with the
/// activations' 16-element sums (`bsums`), weighted by the scales.
pub(crate) const TILE_BLOCK_Q6K: usize = TILE_ROWS * 210;
/// Where a Q6_K tile column's scales and quads start.
pub(crate) const Q6_SCALES: usize = 16;
pub(crate) const Q6_QUADS: usize = 144;
/// Bytes of one quad of a Q6_K tile column: the high bits and the two nibble groups they
/// complete.
pub(crate) const Q6_QUAD: usize = 96;

/// Where quad `8h + k` of a Q6_K tile column starts; its high bits come first, then the
/// nibbles of `ql` bytes `64h + 4k..` and `64h + 32 + 4k..`.
pub(crate) const fn q6_quad(h: usize, k: usize) -> usize {
    Q6_QUADS + Q6_QUAD * (8 * h + k)
}

/// Rewrites `rows` (eight consecutive Q6_K rows of `blocks` super-blocks) into one tile, in
/// place.
pub(crate) fn repack_q6k(rows: &mut [u8], blocks: usize, scratch: &mut Vec<u8>) {
    assert_eq!(rows.len(), blocks * TILE_BLOCK_Q6K);
    scratch.clear();
    scratch.extend_from_slice(rows);
    for (b, dst) in rows.chunks_exact_mut(TILE_BLOCK_Q6K).enumerate() {
        for r in 0..TILE_ROWS {
            let src = &scratch[(r * blocks + b) * 210..][..210];
            dst[2 * r..2 * r + 2].copy_from_slice(&src[208..210]);
            for j in 0..16 {
                dst[Q6_SCALES + 32 * (j / 4) + 4 * r + j % 4] = src[192 + j];
            }
            for h in 0..2 {
                for k in 0..8 {
                    let at = q6_quad(h, k) + 4 * r;
                    dst[at..at + 4].copy_from_slice(&src[128 + 32 * h + 4 * k..][..4]);
                    for s in 0..2 {
                        let at = at + 32 * (1 + s);
                        dst[at..at + 4].copy_from_slice(&src[64 * h + 32 * s + 4 * k..][..4]);
                    }
                }
            }
        }
    }
}

/// Dot product of row `lane` of a Q6_K tile with one activation vector.
pub(crate) fn dot_lane_q6k(tile: &[u8], lane: usize, act: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in tile.chunks_exact(TILE_BLOCK_Q6K).zip(act) {
        let sc = |j: usize| i32::from(b[Q6_SCALES + 32 * (j / 4) + 4 * lane + j % 4] as i8);
        let mut sumi = 0i32;
        for h in 0..2 {
            for s in 0..2 {
                for l in 0..32 {
                    let (k, e) = (l / 4, l % 4);
                    let at = q6_quad(h, k) + 4 * lane + e;
                    let (hb, q) = (b[at], b[at + 32 * (1 + s)]);
                    let lo = i32::from(q & 0xF | ((hb >> (2 * s)) & 3) << 4) - 32;
                    let hi = i32::from(q >> 4 | ((hb >> (4 + 2 * s)) & 3) << 4) - 32;
                    let w = 128 * h + 32 * s + l;
                    sumi += sc(w / 16) * lo * i32::from(a.qs[w]);
                    sumi += sc(w / 16 + 4) * hi * i32::from(a.qs[w + 64]);
                }
            }
        }
        sum += sumi as f32 * f16_at(b, 2 * lane) * a.d;
    }
    sum
}

/// The eight rows of a Q6_K tile against one activation vector (the reference of the SIMD tile
/// kernels).
#[cfg(test)]
pub(crate) fn dot_q6k(tile: &[u8], act: &[BlockQ8K]) -> [f32; TILE_ROWS] {
    std::array::from_fn(|lane| dot_lane_q6k(tile, lane, act))
}

/// The eight rows of a Q6_K tile against four activation vectors.
#[cfg(test)]
pub(crate) fn dot4_q6k(tile: &[u8], acts: [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4] {
    acts.map(|a| dot_q6k(tile, a))
}

const _: () = assert!(q6_quad(2, 0) == TILE_BLOCK_Q6K);
const _: () = assert!(Q6_QUAD == 3 * 4 * TILE_ROWS);
