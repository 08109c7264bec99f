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
    let mut all = vec![Kernels::scalar()];
    let detected = Kernels::detect();
    if detected.name != "scalar" {
        all.push(detected);
    }
    for kernels in &all {
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
    for kernels in [Kernels::scalar(), Kernels::detect()] {
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
