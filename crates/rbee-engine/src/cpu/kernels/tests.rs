//! Every kernel against dequantize-then-multiply in f32.

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::cpu::quant::dequantize_row;

/// Random but well-formed blocks: scales are small finite f16 values, everything else is
/// arbitrary bytes (every nibble and 6-bit pattern is a valid quantized value).
fn random_row(ty: WeightType, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut row: Vec<u8> = (0..ty.row_bytes(cols)).map(|_| rng.random()).collect();
    let put = |row: &mut [u8], at: usize, v: f32| {
        row[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    };
    let bb = ty.block_bytes();
    for b in 0..cols / ty.block_elems() {
        let o = b * bb;
        match ty {
            WeightType::Q4_0 | WeightType::Q8_0 => put(&mut row, o, rng.random_range(0.001..0.05)),
            WeightType::Q4_1 | WeightType::Q4K => {
                put(&mut row, o, rng.random_range(0.001..0.05));
                put(&mut row, o + 2, rng.random_range(-0.05..0.05));
            }
            WeightType::Q6K => put(&mut row, o + 208, rng.random_range(0.0001..0.005)),
            WeightType::F32 | WeightType::F16 => {}
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

const TYPES: [WeightType; 5] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q8_0,
    WeightType::Q4K,
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

#[test]
fn four_token_kernels_match_one_token_kernels() {
    let mut rng = StdRng::seed_from_u64(5);
    for kernels in Kernels::all() {
        for ty in [WeightType::Q4_0, WeightType::Q8_0, WeightType::Q4K] {
            for blocks in [1usize, 5, 64] {
                let cols = blocks * ty.block_elems();
                let row = random_row(ty, cols, &mut rng);
                let x: Vec<f32> = (0..6 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut act = Activations::default();
                act.set(&x, cols, &[ty.act_format()]);
                let four = kernels.dot4(ty, &row, &act, 2).unwrap();
                for (k, got) in four.iter().enumerate() {
                    let one = kernels.dot(ty, &row, &act, 2 + k);
                    assert!(
                        (got - one).abs() <= 1e-4 * one.abs().max(1.0),
                        "{ty:?} {got} vs {one}"
                    );
                }
            }
        }
    }
}

#[test]
fn tile_kernels_match_the_rows_they_were_packed_from() {
    let mut rng = StdRng::seed_from_u64(11);
    for ty in [WeightType::Q4_0, WeightType::Q8_0] {
        for blocks in [1usize, 3, 64] {
            let cols = blocks * QK;
            let rows: Vec<Vec<u8>> = (0..tiled::TILE_ROWS)
                .map(|_| random_row(ty, cols, &mut rng))
                .collect();
            let tile = packed(ty, &rows, blocks);
            let x: Vec<f32> = (0..5 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut act = Activations::default();
            act.set(&x, cols, &[ActFormat::Q8]);
            let scalar = Kernels::scalar();
            let want: Vec<Vec<f32>> = (0..5)
                .map(|t| rows.iter().map(|r| scalar.dot(ty, r, &act, t)).collect())
                .collect();
            let close = |got: f32, want: f32| (got - want).abs() <= 1e-4 * want.abs().max(1.0);
            for kernels in Kernels::all().into_iter().filter(|k| k.tiles(ty)) {
                let name = kernels.name;
                for (t, want_t) in want.iter().enumerate() {
                    let got = kernels.dot_tile(ty, &tile, &act, t);
                    for (lane, (g, w)) in got.iter().zip(want_t).enumerate() {
                        assert!(
                            close(*g, *w),
                            "{name} {ty:?} {blocks} t{t} row {lane}: {g} vs {w}"
                        );
                        let one = kernels.dot_tile_lane(ty, &tile, lane, &act, t);
                        assert!(close(one, *w), "{name} {ty:?} lane {lane}: {one} vs {w}");
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
                    for (lane, g) in lanes.iter().enumerate() {
                        let w = want[1 + j][lane];
                        assert!(
                            close(*g, w),
                            "{name} {ty:?} four-token {j} row {lane}: {g} vs {w}"
                        );
                    }
                }
            }
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
        _ => tiled::repack(&mut tile, blocks, &mut Vec::new()),
    }
    tile
}

/// Throughput of the four-token products of each implementation, for comparing kernels by hand
/// (`cargo test -p rbee-engine --lib kernel_throughput -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a check"]
fn kernel_throughput() {
    let mut rng = StdRng::seed_from_u64(1);
    let (rows, cols, tokens) = (256usize, 2048usize, 64usize);
    for ty in [WeightType::Q4_0, WeightType::Q8_0, WeightType::Q4K] {
        let mat: Vec<Vec<u8>> = (0..rows).map(|_| random_row(ty, cols, &mut rng)).collect();
        let tiles: Vec<Vec<u8>> = match ty {
            WeightType::Q4_0 | WeightType::Q8_0 => mat
                .chunks_exact(tiled::TILE_ROWS)
                .map(|rows| packed(ty, rows, cols / ty.block_elems()))
                .collect(),
            _ => Vec::new(),
        };
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let mut act = Activations::default();
        act.set(&x, cols, &[ty.act_format()]);
        for kernels in Kernels::all().into_iter().skip(1) {
            let started = std::time::Instant::now();
            let mut sink = 0f32;
            for _ in 0..4 {
                for t in (0..tokens).step_by(4) {
                    if kernels.tiles(ty) {
                        for tile in &tiles {
                            sink += kernels.dot_tile4(ty, tile, &act, t)[0][0];
                        }
                    } else {
                        for row in &mat {
                            sink += kernels.dot4(ty, row, &act, t).unwrap()[0];
                        }
                    }
                }
            }
            let per = started.elapsed().as_secs_f64() / (4 * rows * cols * tokens) as f64;
            println!(
                "{ty:?} {}: {:.3} ns per 1000 weight×token ({sink})",
                kernels.name,
                per * 1e12
            );
        }
    }
}
