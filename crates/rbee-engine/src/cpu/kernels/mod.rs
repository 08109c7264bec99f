//! Dot products of quantized weight rows with quantized activations, chosen once per process
//! for the CPU at hand: AVX2 + FMA on x86-64 when present, with AVX-512 VNNI for the tile and
//! Q4_K products where the CPU has it; NEON on aarch64, with the `dotprod`
//! extension's `sdot` where the CPU has it; otherwise the portable scalar code in
//! [`super::quant::reference`], [`tiled`] and [`tiled_k`], which is also what the SIMD kernels
//! are tested against.
//!
//! Matrices of the types a set of kernels multiplies in eight-row tiles ([`Kernels::tiles`]:
//! Q4_0 always, Q8_0 with VNNI or `dotprod`, Q4_K with SIMD tile kernels, and on x86 Q5_0,
//! Q5_K, Q6_K, F16 and BF16) are repacked at load; the others keep the file's rows and go through the one-row kernels.
//!
//! The kernels also carry the attention of the query rows that share a KV head
//! ([`super::attention::attend_head`]), compiled for the vector width at hand.
//!
//! Activations are quantized once per matrix product ([`Activations`]) to the block format the
//! weight type pairs with, as ggml does: 32-element Q8 blocks for Q4_0, Q4_1, Q5_0, Q5_1 and
//! Q8_0, 256-element Q8_K super-blocks for the K-quants (Q2_K to Q6_K).

pub(crate) mod lowbit;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "aarch64")]
mod neon_tiled;
#[cfg(target_arch = "aarch64")]
mod neon_tiled_k;
pub(crate) mod tiled;
pub(crate) mod tiled_k;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86_attend;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86_lowbit;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86_tiled;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86_tiled_f;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86_tiled_k;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod x86_tiled_k6;

use tiled::{TILE_ROWS, TileAct};

use super::attention::{HeadAttn, attend_head};

use super::quant::{
    ActFormat, BlockQ8, BlockQ8K, QK, QK_K, WeightType, quantize_q8, quantize_q8k, reference,
    round_bf16, round_f16,
};

type DotF32 = fn(&[u8], &[f32]) -> f32;
type DotQ8 = fn(&[u8], &[BlockQ8]) -> f32;
type DotQ8K = fn(&[u8], &[BlockQ8K]) -> f32;
type DotQ8x4 = fn(&[u8], [&[BlockQ8]; 4]) -> [f32; 4];
type DotQ8Kx4 = fn(&[u8], [&[BlockQ8K]; 4]) -> [f32; 4];
type DotF32x4 = fn(&[u8], [&[f32]; 4]) -> [f32; 4];
type DotTile = fn(&[u8], &[TileAct]) -> [f32; TILE_ROWS];
type DotTilex4 = fn(&[u8], [&[TileAct]; 4]) -> [[f32; TILE_ROWS]; 4];
type DotTileK = fn(&[u8], &[BlockQ8K]) -> [f32; TILE_ROWS];
type DotTileKx4 = fn(&[u8], [&[BlockQ8K]; 4]) -> [[f32; TILE_ROWS]; 4];
type Attend = fn(&HeadAttn<'_>, &mut [f32], &mut [f32]);
type DotFloatTilex4 = fn(&[u8], [&[f32]; 4]) -> [[f32; TILE_ROWS]; 4];

/// The products of eight consecutive rows of a float matrix (F16 or BF16; not repacked) with
/// one token, four tokens, and one of the eight rows with one token.
#[derive(Clone, Copy)]
pub(crate) struct FloatTile {
    pub one: fn(&[u8], &[f32]) -> [f32; TILE_ROWS],
    pub four: DotFloatTilex4,
    pub lane: fn(&[u8], usize, &[f32]) -> f32,
}

/// Tile products of the types beyond Q4_0, Q8_0 and Q4_K, where these kernels have them;
/// matrices of a type are multiplied in tiles (and the quantized ones repacked) only then.
#[derive(Clone, Copy, Default)]
pub(crate) struct MoreTiles {
    pub f16: Option<FloatTile>,
    pub bf16: Option<FloatTile>,
    pub q5_0: Option<(DotTile, DotTilex4)>,
    pub q5k: Option<(DotTileK, DotTileKx4)>,
    pub q6k: Option<(DotTileK, DotTileKx4)>,
}

/// One implementation of every block dot product.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub name: &'static str,
    pub q4_0: DotQ8,
    pub q4_1: DotQ8,
    pub q5_0: DotQ8,
    pub q5_1: DotQ8,
    pub q8_0: DotQ8,
    pub q2k: DotQ8K,
    pub q3k: DotQ8K,
    pub q4k: DotQ8K,
    pub q5k: DotQ8K,
    pub q6k: DotQ8K,
    /// F32, F16 and BF16 rows against f32 activations (for F16 and BF16, rounded to that
    /// type already).
    pub f32: DotF32,
    pub f16: DotF32,
    pub bf16: DotF32,
    /// One row against four tokens, unpacking each weight block once (prefill).
    pub q4_0x4: DotQ8x4,
    pub q8_0x4: DotQ8x4,
    pub q4kx4: DotQ8Kx4,
    /// The four-token row products these kernels have for the other types (without one, a
    /// batch multiplies token by token).
    pub q4_1x4: Option<DotQ8x4>,
    pub q5_0x4: Option<DotQ8x4>,
    pub q5_1x4: Option<DotQ8x4>,
    pub q2kx4: Option<DotQ8Kx4>,
    pub q3kx4: Option<DotQ8Kx4>,
    pub q5kx4: Option<DotQ8Kx4>,
    pub q6kx4: Option<DotQ8Kx4>,
    pub f32x4: Option<DotF32x4>,
    pub f16x4: Option<DotF32x4>,
    pub bf16x4: Option<DotF32x4>,
    /// The eight rows of a Q4_0 tile ([`tiled`]) against one token (decode) and four (prefill).
    pub q4_0_tile: DotTile,
    pub q4_0_tilex4: DotTilex4,
    /// The Q8_0 tile products, where the CPU has them; Q8_0 matrices are repacked into tiles
    /// only then.
    pub q8_0_tile: Option<(DotTile, DotTilex4)>,
    /// The Q4_K tile products ([`tiled_k`]), where there are SIMD ones; Q4_K matrices are
    /// repacked into tiles only then (the portable code keeps the rows: its tile product is
    /// no faster).
    pub q4k_tile: Option<(DotTileK, DotTileKx4)>,
    /// The tile products of the other types.
    pub more_tiles: MoreTiles,
    /// The attention of the query rows that share a KV head ([`attend_head`], compiled for
    /// these kernels' vector width).
    pub attend: Attend,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Kernels {
    /// The portable reference implementation.
    pub(crate) fn scalar() -> Kernels {
        Kernels {
            name: "scalar",
            q4_0: reference::dot_q4_0,
            q4_1: reference::dot_q4_1,
            q5_0: reference::dot_q5_0,
            q5_1: reference::dot_q5_1,
            q8_0: reference::dot_q8_0,
            q2k: lowbit::dot_q2k,
            q3k: lowbit::dot_q3k,
            q4k: reference::dot_q4k,
            q5k: reference::dot_q5k,
            q6k: reference::dot_q6k,
            f32: reference::dot_f32,
            f16: reference::dot_f16,
            bf16: reference::dot_bf16,
            q4_0x4: |row, acts| acts.map(|a| reference::dot_q4_0(row, a)),
            q8_0x4: |row, acts| acts.map(|a| reference::dot_q8_0(row, a)),
            q4kx4: |row, acts| acts.map(|a| reference::dot_q4k(row, a)),
            q4_1x4: None,
            q5_0x4: None,
            q5_1x4: None,
            q2kx4: None,
            q3kx4: None,
            q5kx4: None,
            q6kx4: None,
            f32x4: None,
            f16x4: None,
            bf16x4: None,
            q4_0_tile: tiled::dot,
            q4_0_tilex4: tiled::dot4,
            q8_0_tile: None,
            q4k_tile: None,
            more_tiles: MoreTiles::default(),
            attend: attend_head,
        }
    }

    /// The fastest implementation this CPU runs.
    pub(crate) fn detect() -> Kernels {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if let Some(k) = x86::kernels() {
            return k;
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(k) = neon::kernels() {
            return k;
        }
        Kernels::scalar()
    }

    /// Every implementation this CPU runs, the scalar reference first (for the tests).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Kernels> {
        let mut out = vec![Kernels::scalar()];
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        out.extend(x86::variants());
        #[cfg(target_arch = "aarch64")]
        out.extend(neon::variants());
        out
    }

    /// Dot product of one weight row of type `ty` with token `t` of `act`.
    #[inline]
    pub(crate) fn dot(&self, ty: WeightType, row: &[u8], act: &Activations, t: usize) -> f32 {
        match ty {
            WeightType::Q4_0 => (self.q4_0)(row, act.q8(t)),
            WeightType::Q4_1 => (self.q4_1)(row, act.q8(t)),
            WeightType::Q5_0 => (self.q5_0)(row, act.q8(t)),
            WeightType::Q5_1 => (self.q5_1)(row, act.q8(t)),
            WeightType::Q8_0 => (self.q8_0)(row, act.q8(t)),
            WeightType::Q2K => (self.q2k)(row, act.q8k(t)),
            WeightType::Q3K => (self.q3k)(row, act.q8k(t)),
            WeightType::Q4K => (self.q4k)(row, act.q8k(t)),
            WeightType::Q5K => (self.q5k)(row, act.q8k(t)),
            WeightType::Q6K => (self.q6k)(row, act.q8k(t)),
            WeightType::F32 => (self.f32)(row, act.f32(t)),
            WeightType::F16 => (self.f16)(row, act.f16(t)),
            WeightType::BF16 => (self.bf16)(row, act.bf16(t)),
        }
    }
}

impl Kernels {
    /// Whether matrices of type `ty` are repacked into tiles for these kernels.
    pub(crate) fn tiles(&self, ty: WeightType) -> bool {
        match ty {
            WeightType::Q4_0 => true,
            WeightType::Q8_0 => self.q8_0_tile.is_some(),
            WeightType::Q4K => self.q4k_tile.is_some(),
            WeightType::F16 => self.more_tiles.f16.is_some(),
            WeightType::BF16 => self.more_tiles.bf16.is_some(),
            WeightType::Q5_0 => self.more_tiles.q5_0.is_some(),
            WeightType::Q5K => self.more_tiles.q5k.is_some(),
            WeightType::Q6K => self.more_tiles.q6k.is_some(),
            _ => false,
        }
    }

    /// The K-quant tile products of `ty`.
    fn k_tile(&self, ty: WeightType) -> Option<(DotTileK, DotTileKx4)> {
        match ty {
            WeightType::Q4K => self.q4k_tile,
            WeightType::Q5K => self.more_tiles.q5k,
            WeightType::Q6K => self.more_tiles.q6k,
            _ => None,
        }
    }

    /// The float tile products of `ty`.
    fn float_tile(&self, ty: WeightType) -> Option<FloatTile> {
        match ty {
            WeightType::F16 => self.more_tiles.f16,
            WeightType::BF16 => self.more_tiles.bf16,
            _ => None,
        }
    }

    fn tile_kernels(&self, ty: WeightType) -> (DotTile, DotTilex4) {
        match (ty, self.q8_0_tile, self.more_tiles.q5_0) {
            (WeightType::Q8_0, Some(k), _) | (WeightType::Q5_0, _, Some(k)) => k,
            (WeightType::Q4_0, ..) => (self.q4_0_tile, self.q4_0_tilex4),
            _ => unreachable!("{ty:?} matrices are not tiled for {}", self.name),
        }
    }

    /// The eight rows of tile `tile` (of type `ty`) against token `t` of `act`.
    #[inline]
    pub(crate) fn dot_tile(
        &self,
        ty: WeightType,
        tile: &[u8],
        act: &Activations,
        t: usize,
    ) -> [f32; TILE_ROWS] {
        if let Some((one, _)) = self.k_tile(ty) {
            return one(tile, act.q8k(t));
        }
        if let Some(k) = self.float_tile(ty) {
            return (k.one)(tile, act.floats(ty, t));
        }
        (self.tile_kernels(ty).0)(tile, act.tile(t))
    }

    /// The eight rows of tile `tile` against tokens `t0..t0 + 4` of `act`.
    #[inline]
    pub(crate) fn dot_tile4(
        &self,
        ty: WeightType,
        tile: &[u8],
        act: &Activations,
        t0: usize,
    ) -> [[f32; TILE_ROWS]; 4] {
        if let Some((_, four)) = self.k_tile(ty) {
            let acts = [
                act.q8k(t0),
                act.q8k(t0 + 1),
                act.q8k(t0 + 2),
                act.q8k(t0 + 3),
            ];
            return four(tile, acts);
        }
        if let Some(k) = self.float_tile(ty) {
            let acts = [t0, t0 + 1, t0 + 2, t0 + 3].map(|t| act.floats(ty, t));
            return (k.four)(tile, acts);
        }
        let acts = [
            act.tile(t0),
            act.tile(t0 + 1),
            act.tile(t0 + 2),
            act.tile(t0 + 3),
        ];
        (self.tile_kernels(ty).1)(tile, acts)
    }

    /// Row `lane` of tile `tile` against token `t` of `act`, for a tile a chunk of work
    /// splits (the portable code: this is not a hot path).
    pub(crate) fn dot_tile_lane(
        &self,
        ty: WeightType,
        tile: &[u8],
        lane: usize,
        act: &Activations,
        t: usize,
    ) -> f32 {
        if let Some(k) = self.float_tile(ty) {
            return (k.lane)(tile, lane, act.floats(ty, t));
        }
        match ty {
            WeightType::Q8_0 => tiled::dot_lane_q8_0(tile, lane, act.tile(t)),
            WeightType::Q5_0 => tiled::dot_lane_q5_0(tile, lane, act.tile(t)),
            WeightType::Q4K => tiled_k::dot_lane(tile, lane, act.q8k(t)),
            WeightType::Q5K => tiled_k::dot_lane_q5k(tile, lane, act.q8k(t)),
            WeightType::Q6K => tiled_k::dot_lane_q6k(tile, lane, act.q8k(t)),
            _ => tiled::dot_lane(tile, lane, act.tile(t)),
        }
    }

    /// Whether [`Kernels::dot4`] multiplies rows of type `ty` (rather than answering `None`).
    pub(crate) fn has_dot4(&self, ty: WeightType) -> bool {
        match ty {
            WeightType::Q4_0 | WeightType::Q8_0 | WeightType::Q4K => true,
            WeightType::Q4_1 => self.q4_1x4.is_some(),
            WeightType::Q5_0 => self.q5_0x4.is_some(),
            WeightType::Q5_1 => self.q5_1x4.is_some(),
            WeightType::Q5K => self.q5kx4.is_some(),
            WeightType::Q6K => self.q6kx4.is_some(),
            WeightType::F32 => self.f32x4.is_some(),
            WeightType::F16 => self.f16x4.is_some(),
            WeightType::BF16 => self.bf16x4.is_some(),
            WeightType::Q2K => self.q2kx4.is_some(),
            WeightType::Q3K => self.q3kx4.is_some(),
        }
    }

    /// Dot products of one weight row with tokens `t0..t0 + 4` of `act`, when this type has
    /// a four-token kernel.
    #[inline]
    pub(crate) fn dot4(
        &self,
        ty: WeightType,
        row: &[u8],
        act: &Activations,
        t0: usize,
    ) -> Option<[f32; 4]> {
        let acts = || [act.q8(t0), act.q8(t0 + 1), act.q8(t0 + 2), act.q8(t0 + 3)];
        let acts_k = || {
            [
                act.q8k(t0),
                act.q8k(t0 + 1),
                act.q8k(t0 + 2),
                act.q8k(t0 + 3),
            ]
        };
        let floats = |f: fn(&Activations, usize) -> &[f32]| {
            [f(act, t0), f(act, t0 + 1), f(act, t0 + 2), f(act, t0 + 3)]
        };
        match ty {
            WeightType::Q4_0 => Some((self.q4_0x4)(row, acts())),
            WeightType::Q8_0 => Some((self.q8_0x4)(row, acts())),
            WeightType::Q4K => Some((self.q4kx4)(row, acts_k())),
            WeightType::Q4_1 => self.q4_1x4.map(|k| k(row, acts())),
            WeightType::Q5_0 => self.q5_0x4.map(|k| k(row, acts())),
            WeightType::Q5_1 => self.q5_1x4.map(|k| k(row, acts())),
            WeightType::Q2K => self.q2kx4.map(|k| k(row, acts_k())),
            WeightType::Q3K => self.q3kx4.map(|k| k(row, acts_k())),
            WeightType::Q5K => self.q5kx4.map(|k| k(row, acts_k())),
            WeightType::Q6K => self.q6kx4.map(|k| k(row, acts_k())),
            WeightType::F32 => self.f32x4.map(|k| k(row, floats(Activations::f32))),
            WeightType::F16 => self.f16x4.map(|k| k(row, floats(Activations::f16))),
            WeightType::BF16 => self.bf16x4.map(|k| k(row, floats(Activations::bf16))),
        }
    }
}

/// A batch of activation vectors in the formats the next products need. Buffers grow to the
/// largest batch seen and are reused, so a decode step allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct Activations {
    cols: usize,
    tokens: usize,
    f32: Vec<f32>,
    /// The activations rounded to f16 and to bf16, still as f32.
    f16: Vec<f32>,
    bf16: Vec<f32>,
    q8: Vec<BlockQ8>,
    /// `q8` as the tile kernels take it.
    tile: Vec<TileAct>,
    q8k: Vec<BlockQ8K>,
}

impl Activations {
    /// Takes `x` (`tokens` rows of `cols`) and quantizes it to each format in `formats`.
    pub(crate) fn set(&mut self, x: &[f32], cols: usize, formats: &[ActFormat]) {
        let tokens = x.len() / cols;
        self.cols = cols;
        self.tokens = tokens;
        for f in formats {
            match f {
                ActFormat::F32 => {
                    self.f32.clear();
                    self.f32.extend_from_slice(x);
                }
                ActFormat::F16 => {
                    self.f16.clear();
                    self.f16.extend(x.iter().map(|&v| round_f16(v)));
                }
                ActFormat::BF16 => {
                    self.bf16.clear();
                    self.bf16.extend(x.iter().map(|&v| round_bf16(v)));
                }
                ActFormat::Q8 => {
                    self.q8.resize(tokens * cols / QK, BlockQ8::default());
                    quantize_q8(x, &mut self.q8);
                    self.tile.clear();
                    self.tile.extend(self.q8.iter().map(TileAct::new));
                }
                ActFormat::Q8K => {
                    self.q8k.resize(tokens * cols / QK_K, BlockQ8K::default());
                    quantize_q8k(x, &mut self.q8k);
                }
            }
        }
    }

    pub(crate) fn tokens(&self) -> usize {
        self.tokens
    }

    fn f32(&self, t: usize) -> &[f32] {
        &self.f32[t * self.cols..(t + 1) * self.cols]
    }

    fn f16(&self, t: usize) -> &[f32] {
        &self.f16[t * self.cols..(t + 1) * self.cols]
    }

    fn bf16(&self, t: usize) -> &[f32] {
        &self.bf16[t * self.cols..(t + 1) * self.cols]
    }

    /// Token `t` as float weights of type `ty` take it (rounded to their type).
    fn floats(&self, ty: WeightType, t: usize) -> &[f32] {
        match ty {
            WeightType::F16 => self.f16(t),
            WeightType::BF16 => self.bf16(t),
            _ => self.f32(t),
        }
    }

    fn q8(&self, t: usize) -> &[BlockQ8] {
        let n = self.cols / QK;
        &self.q8[t * n..(t + 1) * n]
    }

    fn tile(&self, t: usize) -> &[TileAct] {
        let n = self.cols / QK;
        &self.tile[t * n..(t + 1) * n]
    }

    fn q8k(&self, t: usize) -> &[BlockQ8K] {
        let n = self.cols / QK_K;
        &self.q8k[t * n..(t + 1) * n]
    }
}

#[cfg(test)]
mod tests;
