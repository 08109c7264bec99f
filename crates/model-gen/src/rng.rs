//! The generator's own PRNG and hash, written out so that the bytes of a generated model never
//! change with a dependency upgrade.

/// FNV-1a, 64 bit. Used to derive per-tensor streams and cache keys.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// SplitMix64: tiny state, full 64-bit output, and fast enough to fill a billion weights in
/// about a second.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A stream that depends only on the model seed and the tensor's name, so that tensors can
    /// be generated in any order (and each format sees the same values).
    pub(crate) fn for_tensor(seed: u64, name: &str) -> Self {
        let mut mix = Self::new(seed ^ fnv1a64(name.as_bytes()));
        Self::new(mix.next_u64())
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `out` with values uniform in `[-amplitude, amplitude)`. Each 64-bit draw yields two
    /// 24-bit mantissas, which is exactly what an f32 can hold.
    pub(crate) fn fill_uniform(&mut self, out: &mut [f32], amplitude: f32) {
        const SCALE: f32 = 2.0 / (1u32 << 24) as f32;
        let to_value = |bits: u64| ((bits & 0x00ff_ffff) as f32 * SCALE - 1.0) * amplitude;
        let mut pairs = out.chunks_exact_mut(2);
        for pair in &mut pairs {
            let r = self.next_u64();
            pair[0] = to_value(r >> 40);
            pair[1] = to_value(r >> 8);
        }
        if let [last] = pairs.into_remainder() {
            *last = to_value(self.next_u64() >> 40);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs of the reference C implementation seeded with 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn uniform_values_stay_in_range_and_are_centred() {
        let mut rng = SplitMix64::new(7);
        let mut v = vec![0f32; 100_001];
        rng.fill_uniform(&mut v, 0.5);
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        // Uniform on [-a, a) has variance a^2 / 3.
        assert!((var - 0.25 / 3.0).abs() < 0.002, "variance {var}");
    }
}
