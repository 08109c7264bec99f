//! Every kernel against dequantize-then-multiply in f32.

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::cpu::quant::dequantize_row;

/// Random but well-formed blocks: scales are small finite f16 values, everything else is
/// arbitrary bytes (every nibble and 6-bit pattern is a valid quantized value).
fn random_row(ty: WeightType, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut values = Vec::new();
    if matches!(ty, WeightType::F32 | WeightType::F16 | WeightType::BF16) {
        values.extend((0..cols).map(|_| rng.random_range(-0.5f32..0.5)));
    }
    match ty {
        WeightType::F32 => return values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightType::F16 => {
            return values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect();
        }
        WeightType::BF16 => {
            return values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect();
        }
        _ => {}
    }
    let mut row: Vec<u8> = (0..ty.row_bytes(cols)).map(|_| rng.random()).collect();
    let put = |row: &mut [u8], at: usize, v: f32| {
        row[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    };
    let bb = ty.block_bytes();
    for b in 0..cols / ty.block_elems() {
        let o = b * bb;
        match ty {
            WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => {
                put(&mut row, o, rng.random_range(0.001..0.05))
            }
            WeightType::Q5_1 => {
                put(&mut row, o, rng.random_range(0.001..0.05));
                put(&mut row, o + 2, rng.random_range(-0.05..0.05));
            }
            WeightType::Q4_1 | WeightType::Q4K | WeightType::Q5K => {
                put(&mut row, o, rng.random_range(0.001..0.05));
                put(&mut row, o + 2, rng.random_range(-0.05..0.05));
            }
            WeightType::Q6K => put(&mut row, o + 208, rng.random_range(0.0001..0.005)),
            WeightType::Q2K => {
                put(&mut row, o + 80, rng.random_range(0.001..0.05));
                put(&mut row, o + 82, rng.random_range(0.0..0.05));
            }
            WeightType::Q3K => put(&mut row, o + 108, rng.random_range(0.0001..0.005)),
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => {}
        }
    }
    row
}

fn check(kernels: &Kernels, ty: WeightType, cols: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let row = random_row(ty, cols, &mut rng);
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mut w = vec![0f32; cols];
    dequantize_row(ty, &row, &mut w);
    let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
    let magnitude: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
    let weight_mass: f32 = w.iter().map(|a| a.abs()).sum();

    let mut act = Activations::default();
    act.set(&x, cols, &[ty.act_format()]);
    let got = kernels.dot(ty, &row, &act, 0);
    // Quantizing the activations (|x| < 2) to 8 bits moves each by at most half a step,
    // 1/127; the scales' f16 rounding adds a relative 1e-3.
    let tol = weight_mass / 127.0 + magnitude * 2e-3 + 1e-4;
    assert!(
        (got - exact).abs() <= tol,
        "{} {ty:?} cols {cols}: {got} vs {exact} (tolerance {tol})",
        kernels.name
    );
    if kernels.name != "scalar" {
        let reference = Kernels::scalar().dot(ty, &row, &act, 0);
        assert!(
            (got - reference).abs() <= 1e-4 * magnitude.max(1.0),
            "{} {ty:?} cols {cols}: {got} vs scalar {reference}",
            kernels.name
        );
    }
}

const TYPES: [WeightType; 10] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q2K,
    WeightType::Q3K,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
];

#[test]
fn every_kernel_matches_dequantize_then_multiply() {
    for kernels in &Kernels::all() {
        for ty in TYPES {
            // Odd block counts: 1, 3, 7, 11 blocks.
            for (i, blocks) in [1usize, 3, 7, 11].into_iter().enumerate() {
                check(kernels, ty, blocks * ty.block_elems(), 17 * i as u64 + 3);
            }
        }
    }
}

/// Float rows multiply the activations rounded as ggml rounds them for that weight type (f16
/// for F16, bf16 for BF16, none for F32), in any order of additions: every kernel gives the
/// exact products' sum within f32 rounding, at lengths with and without a tail.
#[test]
fn float_rows_multiply_the_rounded_activations() {
    for kernels in &Kernels::all() {
        for ty in [WeightType::F32, WeightType::F16, WeightType::BF16] {
            for (i, cols) in [8usize, 37, 64, 100, 2048].into_iter().enumerate() {
                let mut rng = StdRng::seed_from_u64(31 + i as u64);
                let row = random_row(ty, cols, &mut rng);
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let rounded: Vec<f32> = match ty {
                    WeightType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                    WeightType::BF16 => x
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_f32())
                        .collect(),
                    _ => x.clone(),
                };
                let mut w = vec![0f32; cols];
                dequantize_row(ty, &row, &mut w);
                let exact: f64 = w
                    .iter()
                    .zip(&rounded)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let magnitude: f64 = w
                    .iter()
                    .zip(&rounded)
                    .map(|(a, b)| (a * b).abs() as f64)
                    .sum();
                let mut act = Activations::default();
                act.set(&x, cols, &[ty.act_format()]);
                let got = kernels.dot(ty, &row, &act, 0) as f64;
                assert!(
                    (got - exact).abs() <= 1e-6 * magnitude + 1e-7,
                    "{} {ty:?} cols {cols}: {got} vs {exact}",
                    kernels.name
                );
                if ty != WeightType::F32 {
                    let unrounded: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    assert!(
                        (got - exact).abs() < (got - unrounded).abs() || exact == unrounded,
                        "{} {ty:?} cols {cols}: the activations were not rounded",
                        kernels.name
                    );
                }
            }
        }
    }
}

/// On aarch64, detection picks the last (fastest) NEON variant; each variant's four-token row
/// products give its one-token products bit for bit, and its K-quant row and Q4_K tile products
/// the scalar reference's (they keep its integer sums and its float operations).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_kernels_are_detected_and_bit_identical_where_they_promise() {
    let variants = neon::variants();
    let names: Vec<_> = variants.iter().map(|k| k.name).collect();
    eprintln!("NEON variants on this CPU: {names:?}");
    assert_eq!(Some(&Kernels::detect().name), names.last());
    let mut rng = StdRng::seed_from_u64(23);
    let scalar = Kernels::scalar();
    for kernels in &variants {
        for ty in TYPES {
            for blocks in [1usize, 5, 64] {
                let cols = blocks * ty.block_elems();
                let row = random_row(ty, cols, &mut rng);
                let x: Vec<f32> = (0..4 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut act = Activations::default();
                act.set(&x, cols, &[ty.act_format()]);
                let one: Vec<f32> = (0..4).map(|t| kernels.dot(ty, &row, &act, t)).collect();
                if let Some(four) = kernels.dot4(ty, &row, &act, 0) {
                    assert_eq!(four.as_slice(), one, "{} {ty:?} {blocks}", kernels.name);
                }
                if matches!(
                    ty,
                    WeightType::Q2K
                        | WeightType::Q3K
                        | WeightType::Q4K
                        | WeightType::Q5K
                        | WeightType::Q6K
                ) {
                    let want: Vec<f32> = (0..4).map(|t| scalar.dot(ty, &row, &act, t)).collect();
                    assert_eq!(one, want, "{} {ty:?} {blocks}", kernels.name);
                }
            }
        }
        // Q4_K tiles likewise give the scalar tile product's results.
        for blocks in [1usize, 3] {
            let cols = blocks * QK_K;
            let rows: Vec<Vec<u8>> = (0..tiled::TILE_ROWS)
                .map(|_| random_row(WeightType::Q4K, cols, &mut rng))
                .collect();
            let tile = packed(WeightType::Q4K, &rows, blocks);
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut act = Activations::default();
            act.set(&x, cols, &[ActFormat::Q8K]);
            assert!(kernels.tiles(WeightType::Q4K), "{}", kernels.name);
            assert_eq!(
                kernels.dot_tile(WeightType::Q4K, &tile, &act, 0),
                tiled_k::dot(&tile, act.q8k(0)),
                "{} Q4K tile {blocks}",
                kernels.name
            );
        }
    }
}

#[test]
fn q8_activation_blocks_round_trip_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(9);
    let x: Vec<f32> = (0..3 * QK_K).map(|_| rng.random_range(-3.0..3.0)).collect();
    let mut act = Activations::default();
    act.set(&x, x.len(), &[ActFormat::Q8, ActFormat::Q8K]);
    for (b, xs) in act.q8(0).iter().zip(x.chunks(QK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
        assert!((b.s - b.d * sum as f32).abs() <= 1e-2 * b.s.abs().max(1.0));
        for (q, v) in b.qs.iter().zip(xs) {
            assert!((f32::from(*q) * b.d - v).abs() <= amax / 127.0);
        }
    }
    for (b, xs) in act.q8k(0).iter().zip(x.chunks(QK_K)) {
        for (q, v) in b.qs.iter().zip(xs) {
            assert!((f32::from(*q) * b.d - v).abs() <= b.d.abs());
        }
        for (s, qs) in b.bsums.iter().zip(b.qs.chunks(16)) {
            assert_eq!(i32::from(*s), qs.iter().map(|&q| i32::from(q)).sum::<i32>());
        }
    }
}

/// Every four-token row product gives its kernels' one-token results bit for bit, for every
/// type (float rows at lengths with and without a tail); the SIMD kernels have one for every
/// type.
#[test]
fn four_token_kernels_match_one_token_kernels() {
    let mut rng = StdRng::seed_from_u64(5);
    let floats = [WeightType::F32, WeightType::F16, WeightType::BF16];
    for kernels in Kernels::all() {
        for ty in TYPES.into_iter().chain(floats) {
            for (i, blocks) in [1usize, 5, 64].into_iter().enumerate() {
                let cols = match ty.block_elems() {
                    1 => [37, 256, 2056][i],
                    elems => blocks * elems,
                };
                let row = random_row(ty, cols, &mut rng);
                let x: Vec<f32> = (0..6 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut act = Activations::default();
                act.set(&x, cols, &[ty.act_format()]);
                let Some(four) = kernels.dot4(ty, &row, &act, 2) else {
                    let simd = kernels.name != "scalar";
                    assert!(!simd, "{}: no four-token {ty:?} product", kernels.name);
                    continue;
                };
                for (k, got) in four.iter().enumerate() {
                    // Bit-identical: a sequence must get the same logits alone and batched.
                    let one = kernels.dot(ty, &row, &act, 2 + k);
                    assert_eq!(
                        got.to_bits(),
                        one.to_bits(),
                        "{}: {ty:?} {got} vs {one}",
                        kernels.name
                    );
                }
            }
        }
    }
}

/// The activations' rounding is `round() as i8`, on halves, near-halves, the ends of the range
/// and beyond, and random values.
/// The softmax's exponential gives `e^x` within a few units in the last place over the whole
/// range scores minus their maximum take, and exactly 1 at 0.
#[test]
fn softmax_exponential_is_within_a_few_ulp() {
    use crate::cpu::attention::exp_le0;
    assert_eq!(exp_le0(0.0), 1.0);
    assert_eq!(exp_le0(-200.0), 0.0);
    let mut x = 0f32;
    while x > -87.0 {
        let want = (f64::from(x)).exp();
        let got = f64::from(exp_le0(x));
        assert!(
            ((got - want) / want).abs() <= 3e-7,
            "e^{x}: {got} vs {want}"
        );
        x -= 0.000_37 * (1.0 - x);
    }
}

#[test]
fn activation_rounding_is_round_half_away_from_zero_saturated() {
    use crate::cpu::quant::round_i8;
    let mut cases = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1e30,
        -1e30,
    ];
    for i in -130..=130 {
        let x = i as f32 + 0.5;
        cases.extend([x, x.next_up(), x.next_down(), i as f32, -x]);
    }
    let mut rng = StdRng::seed_from_u64(6);
    cases.extend((0..100_000).map(|_| rng.random_range(-140.0f32..140.0)));
    for x in cases {
        assert_eq!(round_i8(x), x.round() as i8, "{x}");
    }
}

/// Attention by every variant gives the portable code's outputs bit for bit (so a sequence
/// decodes alike whichever variant the CPU gets), and they are a softmax-weighted mean of the
/// values: the scores computed in f64 give the same outputs within f32 rounding, also with a
/// soft cap and a sliding window.
#[test]
fn attention_variants_agree_bit_for_bit_and_with_an_f64_softmax() {
    use crate::cpu::attention::{HeadAttn, attend_head};
    let mut rng = StdRng::seed_from_u64(5);
    let cases = [
        (64, 0, 3, 0.0, usize::MAX),
        (64, 37, 1, 0.0, usize::MAX),
        (128, 5, 4, 0.0, usize::MAX),
        (20, 9, 2, 0.0, usize::MAX),
        (64, 37, 3, 0.0, 8),
        (64, 3, 4, 0.0, 8),
        (128, 20, 2, 1.5, usize::MAX),
        (64, 30, 5, 2.0, 16),
    ];
    for (head_dim, pos, tokens, softcap, window) in cases {
        let stride = 3 * head_dim;
        let len = pos + tokens;
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (q, k, v) = (
            values(tokens * stride),
            values(len * head_dim),
            values(len * head_dim),
        );
        let scale = 1.0 / (head_dim as f32).sqrt();
        let head = HeadAttn {
            q: &q[head_dim..],
            q_stride: stride,
            group: 1,
            rows: 0..tokens,
            head_dim,
            pos,
            k: &k,
            v: &v,
            scale,
            softcap,
            window,
        };
        let run = |attend: fn(&HeadAttn<'_>, &mut [f32], &mut [f32])| {
            let (mut out, mut scores) =
                (vec![0f32; tokens * head_dim], vec![0f32; head.scores_len()]);
            attend(&head, &mut out, &mut scores);
            out
        };
        let portable = run(attend_head);
        for kernels in Kernels::all() {
            assert!(
                run(kernels.attend) == portable,
                "{} attention differs from the portable code (head_dim {head_dim})",
                kernels.name
            );
        }
        for t in 0..tokens {
            let qv = &q[t * stride + head_dim..t * stride + 2 * head_dim];
            let end = pos + t + 1;
            let first = end.saturating_sub(window);
            let scores: Vec<f64> = (first..end)
                .map(|j| {
                    let kj = &k[j * head_dim..(j + 1) * head_dim];
                    let dot: f64 = qv.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let s = dot / (head_dim as f64).sqrt();
                    if softcap > 0.0 {
                        (s / softcap as f64).tanh() * softcap as f64
                    } else {
                        s
                    }
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..head_dim {
                let want: f64 = (first..end)
                    .map(|j| weights[j - first] / total * v[j * head_dim + i] as f64)
                    .sum();
                let got = portable[t * head_dim + i] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "token {t} value {i}: {got} vs {want}"
                );
            }
        }
    }
}

/// Eight rows of `ty` with `blocks` blocks: random, or (`extreme`) every weight and scale at
/// its largest, to catch an intermediate sum that saturates or overflows.
fn tile_rows(ty: WeightType, blocks: usize, extreme: bool, rng: &mut StdRng) -> Vec<Vec<u8>> {
    let cols = blocks * ty.block_elems();
    (0..tiled::TILE_ROWS)
        .map(|_| {
            let mut row = random_row(ty, cols, rng);
            if extreme {
                for b in row.chunks_exact_mut(ty.block_bytes()) {
                    match ty {
                        WeightType::Q4K | WeightType::Q5K => b[4..].fill(0xFF),
                        WeightType::Q8_0 => b[2..].fill(0x7F),
                        // Every value 63 and every scale -128 (d stays).
                        WeightType::Q6K => {
                            b[..192].fill(0xFF);
                            b[192..208].fill(0x80);
                        }
                        _ => b[2..].fill(0xFF),
                    }
                }
            }
            row
        })
        .collect()
}

/// Every tile kernel of `ty` on one tile of `blocks` blocks against dequantize-then-multiply,
/// against the one-row kernels on the rows the tile was packed from, and its four-token product
/// against its one-token product.
fn check_tile(ty: WeightType, blocks: usize, extreme: bool, rng: &mut StdRng) {
    let cols = blocks * ty.block_elems();
    let rows = tile_rows(ty, blocks, extreme, rng);
    let tile = packed(ty, &rows, blocks);
    let x: Vec<f32> = if extreme {
        // Every activation quantizes to -127.
        vec![2.0; 5 * cols]
    } else {
        (0..5 * cols).map(|_| rng.random_range(-2.0..2.0)).collect()
    };
    let mut act = Activations::default();
    act.set(&x, cols, &[ty.act_format()]);
    let scalar = Kernels::scalar();
    let want: Vec<Vec<f32>> = (0..5)
        .map(|t| rows.iter().map(|r| scalar.dot(ty, r, &act, t)).collect())
        .collect();
    let close = |got: f32, want: f32| (got - want).abs() <= 1e-4 * want.abs().max(1.0);
    // Dequantize-then-multiply, within the activations' 8-bit rounding (as in `check`).
    let exact: Vec<Vec<(f32, f32)>> = (0..5)
        .map(|t| {
            let xs = &x[t * cols..(t + 1) * cols];
            rows.iter()
                .map(|r| {
                    let mut w = vec![0f32; cols];
                    dequantize_row(ty, r, &mut w);
                    let exact: f32 = w.iter().zip(xs).map(|(a, b)| a * b).sum();
                    let magnitude: f32 = w.iter().zip(xs).map(|(a, b)| (a * b).abs()).sum();
                    let mass: f32 = w.iter().map(|a| a.abs()).sum();
                    (exact, mass / 127.0 + magnitude * 2e-3 + 1e-4)
                })
                .collect()
        })
        .collect();
    let mut tile_kernels: Vec<(&str, Kernels)> = Kernels::all()
        .into_iter()
        .filter(|k| k.tiles(ty))
        .map(|k| (k.name, k))
        .collect();
    if ty == WeightType::Q4K {
        // The portable reference tile product, which no portable `Kernels` uses.
        let reference = Kernels {
            q4k_tile: Some((tiled_k::dot, tiled_k::dot4)),
            ..Kernels::scalar()
        };
        tile_kernels.push(("scalar tile", reference));
    }
    let scalar_tiles = match ty {
        WeightType::Q5_0 => Some(MoreTiles {
            q5_0: Some((tiled::dot_q5_0, tiled::dot4_q5_0)),
            ..MoreTiles::default()
        }),
        WeightType::Q5K => Some(MoreTiles {
            q5k: Some((tiled_k::dot_q5k, tiled_k::dot4_q5k)),
            ..MoreTiles::default()
        }),
        WeightType::Q6K => Some(MoreTiles {
            q6k: Some((tiled_k::dot_q6k, tiled_k::dot4_q6k)),
            ..MoreTiles::default()
        }),
        _ => None,
    };
    if let Some(more_tiles) = scalar_tiles {
        let reference = Kernels {
            more_tiles,
            ..Kernels::scalar()
        };
        tile_kernels.push(("scalar tile", reference));
    }
    for (name, kernels) in &tile_kernels {
        let rows_own: Vec<Vec<f32>> = (0..5)
            .map(|t| rows.iter().map(|r| kernels.dot(ty, r, &act, t)).collect())
            .collect();
        for t in 0..5 {
            let got = kernels.dot_tile(ty, &tile, &act, t);
            for (lane, g) in got.iter().enumerate() {
                let w = want[t][lane];
                let case = format!("{name} {ty:?} {blocks} blocks t{t} row {lane}");
                assert!(close(*g, w), "{case}: {g} vs scalar row {w}");
                let own = rows_own[t][lane];
                assert!(close(*g, own), "{case}: {g} vs the kernels' row {own}");
                let (e, tol) = exact[t][lane];
                assert!((g - e).abs() <= tol, "{case}: {g} vs f32 {e} ± {tol}");
                let one = kernels.dot_tile_lane(ty, &tile, lane, &act, t);
                assert!(close(one, w), "{case}: lane product {one} vs {w}");
            }
        }
        let four = kernels.dot_tile4(ty, &tile, &act, 1);
        for (j, lanes) in four.iter().enumerate() {
            // The batched prefill must give what decoding token by token gives.
            assert_eq!(
                *lanes,
                kernels.dot_tile(ty, &tile, &act, 1 + j),
                "{name} {ty:?}"
            );
        }
    }
}

#[test]
fn tile_kernels_match_the_rows_they_were_packed_from() {
    let mut rng = StdRng::seed_from_u64(11);
    for ty in [
        WeightType::Q4_0,
        WeightType::Q5_0,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
    ] {
        for (blocks, extreme) in [(1, false), (3, false), (64, false), (3, true)] {
            check_tile(ty, blocks, extreme, &mut rng);
        }
    }
    // Float tiles: whole eights only, a tail only, and both.
    for ty in [WeightType::F16, WeightType::BF16] {
        for cols in [64, 5, 2048 + 13] {
            check_tile(ty, cols, false, &mut rng);
        }
    }
    // The Q8_0 layout is exercised by the scalar lane product even where no kernel tiles it.
    let rows: Vec<Vec<u8>> = (0..tiled::TILE_ROWS)
        .map(|_| random_row(WeightType::Q8_0, 2 * QK, &mut rng))
        .collect();
    let tile = packed(WeightType::Q8_0, &rows, 2);
    let x: Vec<f32> = (0..2 * QK).map(|_| rng.random_range(-2.0..2.0)).collect();
    let mut act = Activations::default();
    act.set(&x, 2 * QK, &[ActFormat::Q8]);
    for (lane, row) in rows.iter().enumerate() {
        let want = reference::dot_q8_0(row, act.q8(0));
        let got = tiled::dot_lane_q8_0(&tile, lane, act.tile(0));
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
}

/// Eight rows of type `ty` packed into one tile.
fn packed(ty: WeightType, rows: &[Vec<u8>], blocks: usize) -> Vec<u8> {
    let mut tile = rows.concat();
    match ty {
        WeightType::Q8_0 => tiled::repack_q8_0(&mut tile, blocks, &mut Vec::new()),
        WeightType::Q5_0 => tiled::repack_q5_0(&mut tile, blocks, &mut Vec::new()),
        WeightType::Q4K => tiled_k::repack(&mut tile, blocks, &mut Vec::new()),
        WeightType::Q5K => tiled_k::repack_q5k(&mut tile, blocks, &mut Vec::new()),
        WeightType::Q6K => tiled_k::repack_q6k(&mut tile, blocks, &mut Vec::new()),
        WeightType::F16 | WeightType::BF16 => {}
        _ => tiled::repack(&mut tile, blocks, &mut Vec::new()),
    }
    tile
}

/// The eight Q4_K rows a tile was packed from, rebuilt from the tile's layout alone.
fn unpacked_q4k(tile: &[u8], blocks: usize) -> Vec<Vec<u8>> {
    let mut rows = vec![vec![0u8; blocks * 144]; tiled::TILE_ROWS];
    for (b, col) in tile.chunks_exact(tiled_k::TILE_BLOCK_Q4K).enumerate() {
        for (r, row) in rows.iter_mut().enumerate() {
            let dst = &mut row[144 * b..144 * b + 144];
            dst[..2].copy_from_slice(&col[2 * r..2 * r + 2]);
            dst[2..4].copy_from_slice(&col[16 + 2 * r..18 + 2 * r]);
            let (sc, mn) = tiled_k::scales_mins(col, r);
            for j in 0..4 {
                dst[4 + j] = sc[j] | (sc[4 + j] >> 4) << 6;
                dst[8 + j] = mn[j] | (mn[4 + j] >> 4) << 6;
                dst[12 + j] = sc[4 + j] & 15 | (mn[4 + j] & 15) << 4;
            }
            for l in 0..128 {
                let (p, k, e) = (l / 32, l % 32 / 4, l % 4);
                dst[16 + l] = col[tiled_k::NIBBLES + 256 * p + 32 * k + 4 * r + e];
            }
        }
    }
    rows
}

#[test]
fn q4k_tiles_hold_exactly_the_rows_they_were_packed_from() {
    let mut rng = StdRng::seed_from_u64(21);
    for blocks in [1usize, 2, 22] {
        let rows = tile_rows(WeightType::Q4K, blocks, false, &mut rng);
        let tile = packed(WeightType::Q4K, &rows, blocks);
        assert_eq!(tile.len(), rows.concat().len());
        assert_eq!(unpacked_q4k(&tile, blocks), rows);
    }
}

/// Throughput of the one-token (decode) and four-token (prefill) products of each SIMD
/// implementation, on plain rows and, where the implementation tiles the type, on tiles, for
/// comparing kernels by hand (`cargo test -p rbee-engine --lib kernel_throughput -- --ignored
/// --nocapture`). The weights (256 × 2048) stay in L2, so this measures compute, not memory;
/// each figure is the fastest of 16 passes over 64 tokens.
#[test]
#[ignore = "a measurement, not a check"]
fn kernel_throughput() {
    let mut rng = StdRng::seed_from_u64(1);
    let (rows, cols, tokens) = (256usize, 2048usize, 64usize);
    for ty in TYPES.into_iter().chain([WeightType::F16, WeightType::BF16]) {
        let mat: Vec<Vec<u8>> = (0..rows).map(|_| random_row(ty, cols, &mut rng)).collect();
        let tileable = Kernels::detect().tiles(ty);
        let tiles: Vec<Vec<u8>> = mat
            .chunks_exact(tiled::TILE_ROWS)
            .filter(|_| tileable)
            .map(|rows| packed(ty, rows, cols / ty.block_elems()))
            .collect();
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let mut act = Activations::default();
        act.set(&x, cols, &[ty.act_format()]);
        for kernels in Kernels::all().into_iter().skip(1) {
            let mut sink = 0f32;
            let mut pass = |tiled: bool, four: bool| {
                let started = std::time::Instant::now();
                let step = if four { 4 } else { 1 };
                for t in (0..tokens).step_by(step) {
                    match (tiled, four) {
                        (true, true) => {
                            for tile in &tiles {
                                sink += kernels.dot_tile4(ty, tile, &act, t)[0][0];
                            }
                        }
                        (true, false) => {
                            for tile in &tiles {
                                sink += kernels.dot_tile(ty, tile, &act, t)[0];
                            }
                        }
                        (false, true) => {
                            for row in &mat {
                                sink += kernels.dot4(ty, row, &act, t).map_or(0.0, |s| s[0]);
                            }
                        }
                        (false, false) => {
                            for row in &mat {
                                sink += kernels.dot(ty, row, &act, t);
                            }
                        }
                    }
                }
                started.elapsed().as_secs_f64() / (rows * cols * tokens) as f64 * 1e12
            };
            let layouts: &[bool] = if kernels.tiles(ty) {
                &[false, true]
            } else {
                &[false]
            };
            for &tiled in layouts {
                let [one, four] = [false, true]
                    .map(|four| (0..16).map(|_| pass(tiled, four)).fold(f64::MAX, f64::min));
                println!(
                    "{ty:?} {} {}: one token {one:.2}, four tokens {four:.2} ns per 1000 \
                     weight×token",
                    kernels.name,
                    if tiled { "tiles" } else { "rows" },
                );
            }
            assert!(sink.is_finite());
        }
    }
    decode_from_memory();
}

/// The one-token products (tiles and plain rows) of the fastest kernels over a matrix far
/// larger than the caches, as a share of the bandwidth of a plain read of the same bytes on one
/// thread: how close decode can come to the memory limit.
fn decode_from_memory() {
    let mut rng = StdRng::seed_from_u64(2);
    let kernels = Kernels::detect();
    let (cols, tiles) = (2048usize, 8192usize);
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                f();
                started.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    for ty in [
        WeightType::Q4_0,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
        WeightType::F16,
    ] {
        if !kernels.tiles(ty) {
            continue;
        }
        let rows = tile_rows(ty, cols / ty.block_elems(), false, &mut rng);
        let tile = packed(ty, &rows, cols / ty.block_elems());
        let mat = tile.repeat(tiles);
        let mut act = Activations::default();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        act.set(&x, cols, &[ty.act_format()]);
        let mut sink = 0f32;
        let from_tiles = best(&mut || {
            for t in mat.chunks_exact(tile.len()) {
                sink += kernels.dot_tile(ty, t, &act, 0)[0];
            }
        });
        let plain = rows.concat().repeat(tiles);
        let from_rows = best(&mut || {
            for r in plain.chunks_exact(ty.row_bytes(cols)) {
                sink += kernels.dot(ty, r, &act, 0);
            }
        });
        let mut words = 0u64;
        let read = best(&mut || {
            words = mat.chunks_exact(8).fold(words, |s, w| {
                s.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()))
            });
        });
        let gb = mat.len() as f64 / 1e9;
        println!(
            "{ty:?} {} one-token products from memory, share of a plain read ({:.1} GB/s): \
             tiles {:.0} %, rows {:.0} % ({sink} {words})",
            kernels.name,
            gb / read,
            100.0 * read / from_tiles,
            100.0 * read / from_rows,
        );
    }
}

/// Block layouts as ggml defines them: rows quantized by candle (an implementation of ggml's
/// formats of its own) dequantize here to what candle dequantizes them to.
#[test]
fn block_layouts_dequantize_as_ggml_defines_them() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let cols = 512;
    let mut rng = StdRng::seed_from_u64(41);
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let source = Tensor::from_vec(x, (1, cols), &Device::Cpu).unwrap();
    let types = [
        (GgmlDType::Q4_0, WeightType::Q4_0),
        (GgmlDType::Q4_1, WeightType::Q4_1),
        (GgmlDType::Q5_0, WeightType::Q5_0),
        (GgmlDType::Q5_1, WeightType::Q5_1),
        (GgmlDType::Q8_0, WeightType::Q8_0),
        (GgmlDType::Q4K, WeightType::Q4K),
        (GgmlDType::Q2K, WeightType::Q2K),
        (GgmlDType::Q3K, WeightType::Q3K),
        (GgmlDType::Q5K, WeightType::Q5K),
        (GgmlDType::Q6K, WeightType::Q6K),
        (GgmlDType::F16, WeightType::F16),
        (GgmlDType::BF16, WeightType::BF16),
    ];
    for (ggml, ty) in types {
        let q = QTensor::quantize(&source, ggml).unwrap();
        let bytes = q.data().unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut got = vec![0f32; cols];
        dequantize_row(ty, &bytes, &mut got);
        assert_eq!(got, want, "{ty:?}");
    }
}
