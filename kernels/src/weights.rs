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

/// A generated projector of `levels` levels of width `c` with `refs` learnable references, as
/// safetensors bytes with the authors' keys (spec §4.3): weights scaled by 1/√fan-in, references
/// by 1, tensor `i` of level `l` seeded `100 + 20·l + i`. For tests and benchmarks at real shapes.
pub fn generated_projector(levels: usize, c: usize, refs: usize) -> Vec<u8> {
    use crate::projector::{se_width, state_dict_shapes};
    let mut shapes: Vec<(String, Vec<usize>, u64)> = Vec::new();
    for l in 0..levels {
        for (i, (k, s)) in state_dict_shapes(c, refs, se_width(c))
            .into_iter()
            .enumerate()
        {
            shapes.push((format!("l{}_proj.{k}", l + 1), s, (100 + 20 * l + i) as u64));
        }
    }
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(k, s, seed)| {
            let fan_in: usize = s[1..].iter().product::<usize>().max(1);
            let scale = if k.ends_with("x_ref") {
                1.0
            } else {
                1.0 / (fan_in as f32).sqrt()
            };
            generated_tensor(*seed, s.iter().product(), scale)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = shapes
        .iter()
        .zip(&data)
        .map(|((k, s, _), d)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .expect("sizes match shapes");
            (k.clone(), view)
        })
        .collect();
    safetensors::serialize(views, &None).expect("in-memory serialisation")
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

    #[test]
    fn generated_projector_loads_with_every_level() {
        let p = crate::Projector::from_safetensors(&generated_projector(3, 32, 5)).unwrap();
        assert_eq!(p.levels().len(), 3);
        assert!(p
            .levels()
            .iter()
            .all(|l| l.channels() == 32 && l.refs() == 5));
    }
}
