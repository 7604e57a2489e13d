//! Reference selection: which K of a pool of N normal images form the bank.
//!
//! The paper's recommendation (ADPretrain Appendix C, first paragraph; spec §7.1 end): cluster the
//! normal images and spread the K references over the clusters, each the image nearest its
//! cluster's centre. With 8 references, which 8 decides a lot: the first 8 files of a folder often
//! come from one acquisition batch.

use serde::{Deserialize, Serialize};

/// How references are chosen from the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// The first K in file-name order.
    First,
    /// K drawn uniformly with a fixed seed.
    Random,
    /// k-means (K clusters, k-means++ start, fixed seed) on a global descriptor per image; from
    /// each cluster the image nearest its centre.
    #[default]
    Kmeans,
    /// No fixed bank: every frame gets the K pool images nearest it in low-level appearance
    /// (semantic-aligned references, spec §7.1, [`crate::aligned`]); the bank file keeps the pool.
    Aligned,
}

impl Selection {
    /// Every mode, for parsing and messages.
    pub const ALL: [Selection; 4] = [
        Selection::First,
        Selection::Random,
        Selection::Kmeans,
        Selection::Aligned,
    ];

    /// The name used on the command line and in banks.
    pub fn name(self) -> &'static str {
        match self {
            Selection::First => "first",
            Selection::Random => "random",
            Selection::Kmeans => "kmeans",
            Selection::Aligned => "aligned",
        }
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Selection::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown selection `{s}`: expected first, random, kmeans or aligned")
            })
    }
}

/// SplitMix64: a small, well-mixed generator, so that selections are reproducible from the seed
/// recorded in the bank, across platforms and versions (no dependency whose stream may change).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n
    }
}

/// `k` distinct indices of `0..n` drawn with `seed`, in increasing order.
pub fn random_indices(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    let k = k.min(n);
    for i in 0..k {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
    }
    let mut out = idx[..k].to_vec();
    out.sort_unstable();
    out
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum()
}

/// Result of [`kmeans`].
#[derive(Debug, Clone, PartialEq)]
pub struct Clusters {
    /// Centre of each cluster, `k × dim`.
    pub centres: Vec<Vec<f32>>,
    /// Cluster of each point.
    pub assignment: Vec<usize>,
    /// Sum of squared distances of the points to their centres.
    pub inertia: f64,
}

/// Lloyd's k-means with a k-means++ start, deterministic for a seed. `points` all of one length;
/// `1 ≤ k ≤ points.len()`.
pub fn kmeans(points: &[Vec<f32>], k: usize, seed: u64, iterations: usize) -> Clusters {
    assert!(
        k >= 1 && k <= points.len(),
        "kmeans: k = {k} for {} points",
        points.len()
    );
    let mut rng = SplitMix64::new(seed);
    // k-means++: first centre uniform, then proportional to the squared distance to the nearest.
    let mut centres = vec![points[rng.below(points.len())].clone()];
    let mut d2: Vec<f64> = points.iter().map(|p| dist2(p, &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = d2.iter().sum();
        let next = if total <= 0.0 {
            // All remaining points coincide with centres: take the first not yet a centre.
            (0..points.len())
                .find(|&i| !centres.iter().any(|c| c == &points[i]))
                .unwrap_or(0)
        } else {
            let mut r = rng.next_f64() * total;
            let mut pick = points.len() - 1;
            for (i, &d) in d2.iter().enumerate() {
                if r < d {
                    pick = i;
                    break;
                }
                r -= d;
            }
            pick
        };
        centres.push(points[next].clone());
        for (d, p) in d2.iter_mut().zip(points) {
            *d = d.min(dist2(p, centres.last().expect("just pushed")));
        }
    }
    let dim = points[0].len();
    let mut assignment = vec![usize::MAX; points.len()];
    for _ in 0..iterations.max(1) {
        let mut changed = false;
        for (i, p) in points.iter().enumerate() {
            let best = (0..k)
                .min_by(|&a, &b| dist2(p, &centres[a]).total_cmp(&dist2(p, &centres[b])))
                .expect("k ≥ 1");
            if assignment[i] != best {
                assignment[i] = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        for (c, centre) in centres.iter_mut().enumerate() {
            let members: Vec<&Vec<f32>> = points
                .iter()
                .zip(&assignment)
                .filter(|(_, &a)| a == c)
                .map(|(p, _)| p)
                .collect();
            if members.is_empty() {
                continue; // keep an emptied centre where it was
            }
            let mut sum = vec![0.0f64; dim];
            for m in &members {
                for (s, &v) in sum.iter_mut().zip(m.iter()) {
                    *s += v as f64;
                }
            }
            *centre = sum
                .iter()
                .map(|s| (s / members.len() as f64) as f32)
                .collect();
        }
    }
    let inertia = points
        .iter()
        .zip(&assignment)
        .map(|(p, &a)| dist2(p, &centres[a]))
        .sum();
    Clusters {
        centres,
        assignment,
        inertia,
    }
}

/// K references spread over the pool: k-means with K clusters on `descriptors`, then from each
/// cluster the member nearest its centre. Returns pool indices in increasing order.
pub fn kmeans_references(descriptors: &[Vec<f32>], k: usize, seed: u64) -> Vec<usize> {
    let k = k.min(descriptors.len());
    if k == 0 {
        return Vec::new();
    }
    let cl = kmeans(descriptors, k, seed, 100);
    let mut chosen = Vec::with_capacity(k);
    for (c, centre) in cl.centres.iter().enumerate() {
        let nearest = (0..descriptors.len())
            .filter(|&i| cl.assignment[i] == c && !chosen.contains(&i))
            .min_by(|&a, &b| {
                dist2(&descriptors[a], centre).total_cmp(&dist2(&descriptors[b], centre))
            });
        if let Some(i) = nearest {
            chosen.push(i);
        }
    }
    // Empty clusters (duplicated points): fill with the points farthest from everything chosen.
    while chosen.len() < k {
        let far = (0..descriptors.len())
            .filter(|i| !chosen.contains(i))
            .max_by(|&a, &b| {
                let da = chosen
                    .iter()
                    .map(|&c| dist2(&descriptors[a], &descriptors[c]))
                    .fold(f64::INFINITY, f64::min);
                let db = chosen
                    .iter()
                    .map(|&c| dist2(&descriptors[b], &descriptors[c]))
                    .fold(f64::INFINITY, f64::min);
                da.total_cmp(&db)
            })
            .expect("k ≤ n");
        chosen.push(far);
    }
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_stream() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn random_indices_are_distinct_sorted_and_reproducible() {
        let a = random_indices(60, 8, 7);
        assert_eq!(a.len(), 8);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[7] < 60);
        assert_eq!(a, random_indices(60, 8, 7));
        assert_ne!(a, random_indices(60, 8, 8));
        assert_eq!(random_indices(3, 8, 0), vec![0, 1, 2]);
    }

    /// Three tight, well-separated groups: k-means finds them and picks one image from each,
    /// the one nearest the group's centre.
    #[test]
    fn kmeans_spreads_references_over_the_groups() {
        let mut pts = Vec::new();
        for (cx, cy) in [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)] {
            for (dx, dy) in [
                (0.3, 0.0),
                (-0.3, 0.0),
                (0.0, 0.3),
                (0.0, -0.3),
                (0.01, 0.01),
            ] {
                pts.push(vec![cx + dx, cy + dy]);
            }
        }
        // Points 4, 9, 14 sit nearest their group centres.
        for seed in 0..5 {
            assert_eq!(
                kmeans_references(&pts, 3, seed),
                vec![4, 9, 14],
                "seed {seed}"
            );
        }
        let cl = kmeans(&pts, 3, 0, 100);
        // Each group: four points 0.3 from the centre (4 × 0.09), the fifth on it.
        assert!((cl.inertia - 1.08).abs() < 0.01, "{}", cl.inertia);
        // Duplicates never yield fewer references than asked.
        let dup = vec![vec![1.0f32, 1.0]; 5];
        assert_eq!(kmeans_references(&dup, 3, 0).len(), 3);
    }

    #[test]
    fn selection_names_round_trip() {
        for s in Selection::ALL {
            assert_eq!(s.name().parse::<Selection>().unwrap(), s);
        }
        assert!("best".parse::<Selection>().unwrap_err().contains("kmeans"));
    }
}
