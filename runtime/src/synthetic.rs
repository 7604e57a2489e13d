//! Synthetic defects drawn on normal images: the unsupervised stand-in for known-bad parts when
//! calibration chooses its levels without `--defects` (in the spirit of CutPaste and DRAEM, which
//! train on such images; here they only rank level sets).
//!
//! Two kinds, alternating, sized relative to the frame's shorter side so that they are visible at
//! the network's scale: a thin stroke (a scratch or crack: a two-segment polyline 1.5 % of the short
//! side wide) and a blob (a pit or stain: an ellipse 3–6 % of the short side), each darker or
//! lighter than the surface by 45–75 % of the way to black or white. Deterministic for a seed.

use crate::preprocess::Rgb8;
use edge_ad_calibration::select::SplitMix64;

/// Which synthetic defect [`draw_defect`] drew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A thin polyline.
    Stroke,
    /// A filled ellipse.
    Blob,
}

fn shade(px: &mut [u8], dark: bool, amount: f32) {
    for v in px.iter_mut() {
        let x = *v as f32;
        let target = if dark { 0.0 } else { 255.0 };
        *v = (x + (target - x) * amount).round().clamp(0.0, 255.0) as u8;
    }
}

/// Draw one synthetic defect on a copy of `img` inside `region` (`[x, y, width, height]`, the
/// inspected area), seeded by `seed`; `index` alternates the kind.
pub fn draw_defect(img: &Rgb8, region: [usize; 4], seed: u64, index: usize) -> (Rgb8, Kind) {
    let mut out = img.clone();
    let mut rng = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
    let [rx, ry, rw, rh] = region;
    let short = rw.min(rh) as f32;
    let dark = rng.next_f64() < 0.5;
    let amount = 0.45 + 0.3 * rng.next_f64() as f32;
    // Keep the defect away from the border by 10 % so that it is inside the part.
    let pick = |rng: &mut SplitMix64, lo: usize, len: usize| {
        lo as f32 + len as f32 * (0.1 + 0.8 * rng.next_f64() as f32)
    };
    let kind = if index.is_multiple_of(2) {
        Kind::Stroke
    } else {
        Kind::Blob
    };
    let paint = |x: f32, y: f32, out: &mut Rgb8| {
        let (xi, yi) = (x.round() as i64, y.round() as i64);
        if xi >= rx as i64 && yi >= ry as i64 && xi < (rx + rw) as i64 && yi < (ry + rh) as i64 {
            let o = (yi as usize * out.width + xi as usize) * 3;
            shade(&mut out.data[o..o + 3], dark, amount);
        }
    };
    match kind {
        Kind::Stroke => {
            let half = (0.0075 * short).max(0.75);
            let len = short * (0.25 + 0.2 * rng.next_f64() as f32);
            let mut p = (pick(&mut rng, rx, rw), pick(&mut rng, ry, rh));
            let mut angle = rng.next_f64() as f32 * std::f32::consts::TAU;
            let mut visited = std::collections::HashSet::new();
            for _ in 0..2 {
                let steps = (len / 2.0).ceil() as usize * 2;
                let (dx, dy) = (angle.cos() * len / 2.0, angle.sin() * len / 2.0);
                for s in 0..=steps {
                    let t = s as f32 / steps as f32;
                    let (cx, cy) = (p.0 + dx * t, p.1 + dy * t);
                    let r = half.ceil() as i64;
                    for oy in -r..=r {
                        for ox in -r..=r {
                            if ((ox * ox + oy * oy) as f32) <= half * half + 0.25 {
                                let key = ((cx.round() as i64 + ox), (cy.round() as i64 + oy));
                                if visited.insert(key) {
                                    paint(key.0 as f32, key.1 as f32, &mut out);
                                }
                            }
                        }
                    }
                }
                p = (p.0 + dx, p.1 + dy);
                angle += (rng.next_f64() as f32 - 0.5) * 1.2;
            }
        }
        Kind::Blob => {
            let a = short * (0.03 + 0.03 * rng.next_f64() as f32);
            let b = a * (0.6 + 0.4 * rng.next_f64() as f32);
            let (cx, cy) = (pick(&mut rng, rx, rw), pick(&mut rng, ry, rh));
            let r = a.ceil() as i64 + 1;
            for oy in -r..=r {
                for ox in -r..=r {
                    let (fx, fy) = (ox as f32 / a, oy as f32 / b);
                    if fx * fx + fy * fy <= 1.0 {
                        paint(cx + ox as f32, cy + oy as f32, &mut out);
                    }
                }
            }
        }
    }
    (out, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defects_change_pixels_only_inside_the_region_and_repeat_with_the_seed() {
        let img = Rgb8 {
            width: 120,
            height: 80,
            data: vec![128; 120 * 80 * 3],
        };
        let region = [20, 10, 80, 60];
        for index in 0..4 {
            let (a, kind) = draw_defect(&img, region, 5, index);
            let (b, _) = draw_defect(&img, region, 5, index);
            assert_eq!(a, b);
            let changed: Vec<usize> = (0..120 * 80).filter(|&p| a.data[p * 3] != 128).collect();
            assert!(changed.len() >= 10, "{kind:?}: {} pixels", changed.len());
            assert!(
                changed.len() < 80 * 60 / 5,
                "{kind:?}: {} pixels",
                changed.len()
            );
            for p in changed {
                let (x, y) = (p % 120, p / 120);
                assert!((20..100).contains(&x) && (10..70).contains(&y), "({x},{y})");
            }
        }
        assert_ne!(
            draw_defect(&img, region, 5, 0).0,
            draw_defect(&img, region, 6, 0).0
        );
    }
}
