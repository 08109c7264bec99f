//! x86-64 products of eight F16 or BF16 rows at once with f32 activations. A "tile" of a float
//! matrix is simply eight consecutive rows of the file: nothing is repacked.
//!
//! One token (decode) runs the one-row product ([`super::x86::dot_row_f16`]) on each row: it
//! streams one row at a time, which the hardware prefetches best. Four tokens (prefill) were the
//! weak case: a one-row product with four tokens loads four tokens' activations, from the
//! second cache level, for every eight weights, and F16 prefill was no faster per token than
//! decode. The four-token tile product instead walks the columns in chunks whose activations
//! (four tokens × [`CHUNK`] floats, 8 KiB) stay in the first level, and multiplies two rows by four
//! tokens at a time, so each widened weight vector feeds four FMAs and each loaded activation
//! vector two.
//!
//! Every (row, token) pair computes exactly the one-row product's operations: four 8-lane
//! chains of FMAs, chain `c` taking weights `32i + 8c..32i + 8c + 8` of each round `i` of 32 in
//! order, chain 0 then the remaining eights, the four chains summed `(c0 + c1) + (c2 + c3)` and
//! horizontally, then the tail's products added one by one. The chunks change only which
//! chain's FMA runs when, never the order within a chain, so a prompt gives the same sums in a
//! batch as token by token.
//!
//! Reachable only through [`super::x86::kernels`], which hands these functions out after
//! `is_x86_feature_detected!` has proved AVX2, FMA and F16C.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::tiled::TILE_ROWS;
use super::x86::hsum;
use super::x86_tiled::prefetch_ahead;

/// Columns per chunk of the four-token product: four tokens' activations of a chunk take
/// 8 KiB, and the eight rows' weights another 8 KiB, inside the first cache level.
const CHUNK: usize = 512;

/// A chunk's activations, aligned for whole-vector loads.
#[repr(align(32))]
struct Chunk([f32; 4 * CHUNK]);

/// The eight rows at `tile` (2-byte floats, rows of `n` values) against four activation
/// vectors of `n` values, as described in the module documentation. `load` widens the eight
/// weights at a pointer to f32 and `one` the single weight of the tail.
///
/// # Safety
/// `tile` is valid for `8 * 2 * n` bytes and each of `acts` for `n` floats; AVX2, FMA and F16C
/// are present.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // tokens and rows index several arrays in step
unsafe fn tile4(
    tile: *const u8,
    acts: [*const f32; 4],
    n: usize,
    load: impl Fn(*const u8) -> __m256,
    one: impl Fn(*const u8) -> f32,
) -> [[f32; TILE_ROWS]; 4] {
    let row = |r: usize| tile.wrapping_add(2 * n * r);
    let rounds = n / 32 * 32;
    // SAFETY: every read is at `i..i + 8 <= n` (or `k < n` in the tail) of a row or an
    // activation vector (the caller's guarantee).
    unsafe {
        // acc[row][token][chain]
        let mut acc = [[[_mm256_setzero_ps(); 4]; 4]; TILE_ROWS];
        let mut xs = Chunk([0f32; 4 * CHUNK]);
        let mut start = 0;
        while start < rounds {
            let end = rounds.min(start + CHUNK);
            // The chunk's activations, eight values of each token in turn: the four tokens'
            // own vectors lie a whole row apart, often a multiple of 4 KiB, where they (and the
            // weight rows) would compete for the same few sets of the first cache level.
            for g in 0..(end - start) / 8 {
                for t in 0..4 {
                    let v = _mm256_loadu_ps(acts[t].add(start + 8 * g));
                    _mm256_store_ps(xs.0.as_mut_ptr().add(32 * g + 8 * t), v);
                }
            }
            let xs = xs.0.as_ptr();
            for pair in 0..TILE_ROWS / 2 {
                let (r0, r1) = (row(2 * pair), row(2 * pair + 1));
                prefetch_ahead(r0.add(2 * start), 2 * (end - start));
                prefetch_ahead(r1.add(2 * start), 2 * (end - start));
                for c in 0..4 {
                    let (mut a0, mut a1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
                    for t in 0..4 {
                        a0[t] = acc[2 * pair][t][c];
                        a1[t] = acc[2 * pair + 1][t][c];
                    }
                    let mut i = start + 8 * c;
                    while i < end {
                        let (w0, w1) = (load(r0.add(2 * i)), load(r1.add(2 * i)));
                        let group = xs.add(4 * (i - start));
                        for t in 0..4 {
                            let x = _mm256_load_ps(group.add(8 * t));
                            a0[t] = _mm256_fmadd_ps(w0, x, a0[t]);
                            a1[t] = _mm256_fmadd_ps(w1, x, a1[t]);
                        }
                        i += 32;
                    }
                    for t in 0..4 {
                        acc[2 * pair][t][c] = a0[t];
                        acc[2 * pair + 1][t][c] = a1[t];
                    }
                }
            }
            start = end;
        }
        // The remaining eights, into chain 0.
        let mut i = rounds;
        while i + 8 <= n {
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = load(row(r).add(2 * i));
                for t in 0..4 {
                    acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(acts[t].add(i)), acc[t][0]);
                }
            }
            i += 8;
        }
        // Plain loops, not closures: a closure would not inherit the caller's target
        // features, and its vector additions would be calls.
        let mut out = [[0f32; TILE_ROWS]; 4];
        for (r, acc) in acc.iter().enumerate() {
            for (t, c) in acc.iter().enumerate() {
                let mut sum = hsum(_mm256_add_ps(
                    _mm256_add_ps(c[0], c[1]),
                    _mm256_add_ps(c[2], c[3]),
                ));
                for k in i..n {
                    sum += one(row(r).add(2 * k)) * *acts[t].add(k);
                }
                out[t][r] = sum;
            }
        }
        out
    }
}

macro_rules! float_tile_kernels {
    ($module:ident, $row:path, $load:expr, $one:expr) => {
        pub(super) mod $module {
            use super::*;

            /// The eight rows of `tile` against one activation vector, row by row.
            pub(crate) fn dot(tile: &[u8], act: &[f32]) -> [f32; TILE_ROWS] {
                let bytes = 2 * act.len();
                assert!(tile.len() >= TILE_ROWS * bytes);
                std::array::from_fn(|r| $row(&tile[r * bytes..(r + 1) * bytes], act))
            }

            /// Row `lane` of `tile` against one activation vector.
            pub(crate) fn dot_lane(tile: &[u8], lane: usize, act: &[f32]) -> f32 {
                let bytes = 2 * act.len();
                $row(&tile[lane * bytes..(lane + 1) * bytes], act)
            }

            /// The eight rows of `tile` against four activation vectors.
            pub(crate) fn dot4(tile: &[u8], acts: [&[f32]; 4]) -> [[f32; TILE_ROWS]; 4] {
                let n = acts[0].len();
                assert!(tile.len() >= TILE_ROWS * 2 * n && acts.iter().all(|a| a.len() == n));
                #[target_feature(enable = "avx2,fma,f16c")]
                fn inner(tile: &[u8], acts: [&[f32]; 4], n: usize) -> [[f32; TILE_ROWS]; 4] {
                    let (load, one) = ($load, $one);
                    // SAFETY: eight rows of `2n` bytes and four vectors of `n` (asserted by
                    // the caller).
                    unsafe { tile4(tile.as_ptr(), acts.map(|a| a.as_ptr()), n, load, one) }
                }
                // SAFETY: the features were detected before this function was handed out.
                unsafe { inner(tile, acts, n) }
            }
        }
    };
}

float_tile_kernels!(
    f16,
    super::super::x86::dot_row_f16,
    // SAFETY (the closures of both types): `tile4` passes pointers with 16 (or 2) readable
    // bytes.
    |w: *const u8| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w.cast())) },
    |w: *const u8| unsafe { half::f16::from_bits(w.cast::<u16>().read_unaligned()).to_f32() }
);

float_tile_kernels!(
    bf16,
    super::super::x86::dot_row_bf16,
    |w: *const u8| unsafe {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    },
    |w: *const u8| unsafe { half::bf16::from_bits(w.cast::<u16>().read_unaligned()).to_f32() }
);
