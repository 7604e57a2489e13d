//! The deterministic weight generator of the conformance cases (conformance README, "Generated
//! weights"): a SplitMix64 stream per tensor, seeded per key, every value exact in f32.
//!
//! Used to rebuild the full-size (N_r = 2048, C = 384) projector of case d, whose 12 M weights are
//! not stored, and as a reproducible test projector for benchmarks.

/// Element `i` (0-based, row-major) of the tensor generated with `seed` and `scale`.
pub fn generated_value(seed: u64, i: u64, scale: f32) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as i64 - (1 << 23)) as f32 / 8_388_608.0 * scale
}

/// A whole generated tensor of `len` elements.
pub fn generated_tensor(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    (0..len as u64)
        .map(|i| generated_value(seed, i, scale))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bounded_by_scale_and_deterministic() {
        let a = generated_tensor(11000033, 1000, 0.25);
        assert!(a.iter().all(|v| v.abs() <= 0.25));
        assert_eq!(a, generated_tensor(11000033, 1000, 0.25));
        assert_ne!(a, generated_tensor(11000034, 1000, 0.25));
    }
}
