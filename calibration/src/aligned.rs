//! Semantic-aligned per-image references (ADPretrain Appendix C; spec §7.1): instead of one fixed
//! bank, every frame gets the K pool images that look most like it.
//!
//! Procedure (spec §7.1 steps, with the choices the paper leaves open stated):
//! 1. Low-level features of every pool image (the backbone's first tapped level, unit length), each
//!    assigned to one cell of an S×S grid over the frame (S = 5) by its position.
//! 2. Per cell, k-means with `clusters` centres (5) over that cell's features of the whole pool:
//!    S²·clusters = 125 centres.
//! 3. A feature's histogram: its cosine similarities to all centres through a softmax of
//!    temperature `τ` (0.1) — how negative similarities enter is unspecified; the softmax keeps
//!    every bin positive and sums to 1.
//! 4. **Deviation from the paper**: images of different sizes (and tile counts) have different
//!    numbers of positions per cell, so positions cannot be paired one to one; a cell's histogram
//!    is the mean of its features' histograms, and the distance is the mean over cells of
//!    `KL(frame ‖ pool image)` (ε = 1e-8) instead of the mean of per-cell maxima over positions.
//! 5. The K pool images with the smallest distance form the frame's bank.

use crate::select::kmeans;
use edge_ad_kernels::gemm::{matmul, Rhs};
use edge_ad_kernels::Par;
use serde::{Deserialize, Serialize};

/// Unit-length features of one image, grouped by grid cell (`grid²` cells, row-major).
#[derive(Debug, Clone, Default)]
pub struct CellFeatures {
    /// Per cell, its features (each `channels` long).
    pub cells: Vec<Vec<Vec<f32>>>,
}

/// The centres and the pool's histograms: what inspection needs to choose references per frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignmentIndex {
    /// Grid size S.
    pub grid: usize,
    /// Centres per cell.
    pub clusters: usize,
    /// Feature channels.
    pub channels: usize,
    /// Softmax temperature of the histograms.
    pub temperature: f32,
    /// `grid² · clusters` unit centres, `channels` each, row-major.
    pub centres: Vec<f32>,
    /// Per pool image, `grid²` cell histograms of `grid² · clusters` bins, row-major.
    pub histograms: Vec<Vec<f32>>,
    /// `ln(h + ε)` of the pool histograms, computed on first use: a distance is then one dot
    /// product per pool image instead of a logarithm per bin.
    #[serde(skip)]
    log_histograms: std::sync::OnceLock<Vec<Vec<f32>>>,
}

const KL_EPS: f64 = 1e-8;

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

impl AlignmentIndex {
    /// Build the index from the pool (`pool[i]` = image i's cell features).
    pub fn build(
        pool: &[CellFeatures],
        grid: usize,
        clusters: usize,
        channels: usize,
        seed: u64,
    ) -> Self {
        let cells = grid * grid;
        let mut centres = Vec::with_capacity(cells * clusters * channels);
        for c in 0..cells {
            let feats: Vec<Vec<f32>> = pool
                .iter()
                .flat_map(|img| img.cells.get(c).into_iter().flatten().cloned())
                .collect();
            if feats.is_empty() {
                // No pool feature falls in this cell: neutral centres (zero similarity).
                centres.extend(std::iter::repeat_n(0.0, clusters * channels));
                continue;
            }
            let k = clusters.min(feats.len());
            let cl = kmeans(&feats, k, seed ^ c as u64, 50);
            for j in 0..clusters {
                // Fewer features than centres: the last centre repeats (the bins stay aligned).
                centres.extend(unit(&cl.centres[j.min(k - 1)]));
            }
        }
        let mut idx = Self {
            grid,
            clusters,
            channels,
            temperature: 0.1,
            centres,
            histograms: Vec::new(),
            log_histograms: std::sync::OnceLock::new(),
        };
        idx.histograms = pool.iter().map(|img| idx.histogram(img)).collect();
        idx
    }

    /// Bins per histogram.
    pub fn bins(&self) -> usize {
        self.grid * self.grid * self.clusters
    }

    /// The `grid²` cell histograms of an image.
    pub fn histogram(&self, img: &CellFeatures) -> Vec<f32> {
        let (cells, bins) = (self.grid * self.grid, self.bins());
        let mut out = vec![1.0 / bins as f32; cells * bins];
        let mut sims = Vec::new();
        let mut e: Vec<f32> = Vec::with_capacity(bins);
        for (c, feats) in img.cells.iter().enumerate().take(cells) {
            if feats.is_empty() {
                continue;
            }
            let flat: Vec<f32> = feats.iter().flatten().copied().collect();
            sims.resize(feats.len() * bins, 0.0);
            matmul(
                feats.len(),
                bins,
                self.channels,
                &flat,
                &self.centres,
                Rhs::NxK,
                &mut sims,
                false,
                Par::Single,
            );
            let h = &mut out[c * bins..(c + 1) * bins];
            h.fill(0.0);
            for row in sims.chunks_exact(bins) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                e.clear();
                e.extend(row.iter().map(|&s| ((s - m) / self.temperature).exp()));
                let z: f32 = e.iter().sum();
                for (hb, ev) in h.iter_mut().zip(&e) {
                    *hb += ev / z;
                }
            }
            let n = feats.len() as f32;
            h.iter_mut().for_each(|v| *v /= n);
        }
        out
    }

    /// Mean over cells of `KL(a ‖ b)`.
    pub fn distance(&self, a: &[f32], b: &[f32]) -> f64 {
        let bins = self.bins();
        let cells = self.grid * self.grid;
        let mut total = 0.0;
        for c in 0..cells {
            let (pa, pb) = (&a[c * bins..(c + 1) * bins], &b[c * bins..(c + 1) * bins]);
            total += pa
                .iter()
                .zip(pb)
                .map(|(&p, &q)| {
                    let (p, q) = (p as f64, q as f64);
                    p * ((p + KL_EPS) / (q + KL_EPS)).ln()
                })
                .sum::<f64>();
        }
        total / cells as f64
    }

    /// The `k` pool images closest to `img`, closest first (ties: lower index first).
    pub fn nearest(&self, img: &CellFeatures, k: usize) -> Vec<usize> {
        self.nearest_to(&self.histogram(img), k, None)
    }

    /// The `k` pool images closest to histograms `h`, leaving out pool image `exclude` (a pool
    /// image scored leave-one-out).
    pub fn nearest_to(&self, h: &[f32], k: usize, exclude: Option<usize>) -> Vec<usize> {
        // KL(p ‖ q) = Σ p·ln(p+ε) − Σ p·ln(q+ε): the first sum is the same for every pool image.
        let logs = self.log_histograms.get_or_init(|| {
            self.histograms
                .iter()
                .map(|q| {
                    q.iter()
                        .map(|&v| ((v as f64) + KL_EPS).ln() as f32)
                        .collect()
                })
                .collect()
        });
        let cells = (self.grid * self.grid) as f64;
        let own: f64 = h
            .iter()
            .map(|&p| p as f64 * ((p as f64) + KL_EPS).ln())
            .sum();
        let mut d: Vec<(f64, usize)> = logs
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != exclude)
            .map(|(i, lq)| {
                let cross: f64 = h.iter().zip(lq).map(|(&p, &l)| p as f64 * l as f64).sum();
                ((own - cross) / cells, i)
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        d.into_iter().take(k).map(|x| x.1).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two kinds of image: "A" has direction e0 in the top cells and e1 below, "B" the reverse.
    /// A frame like A must pick the A images first.
    fn image(kind: bool, jitter: f32, grid: usize) -> CellFeatures {
        let cells = (0..grid * grid)
            .map(|c| {
                let top = c / grid < grid / 2;
                let dir = if top == kind { 0 } else { 1 };
                (0..3)
                    .map(|j| {
                        let mut v = vec![0.05 * (j as f32 + jitter); 4];
                        v[dir] = 1.0;
                        unit(&v)
                    })
                    .collect()
            })
            .collect();
        CellFeatures { cells }
    }

    #[test]
    fn frames_choose_the_pool_images_that_look_like_them() {
        let grid = 3;
        let pool: Vec<CellFeatures> = (0..6)
            .map(|i| image(i % 2 == 0, i as f32 * 0.1, grid))
            .collect();
        let idx = AlignmentIndex::build(&pool, grid, 2, 4, 0);
        assert_eq!(idx.centres.len(), 9 * 2 * 4);
        for h in &idx.histograms {
            for cell in h.chunks_exact(idx.bins()) {
                assert!((cell.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            }
        }
        let like_a = image(true, 0.33, grid);
        let mut near = idx.nearest(&like_a, 3);
        near.sort();
        assert_eq!(near, vec![0, 2, 4]);
        let mut near_b = idx.nearest(&image(false, 0.2, grid), 3);
        near_b.sort();
        assert_eq!(near_b, vec![1, 3, 5]);
        // Leaving image 0 out: its nearest are the other A images.
        let h0 = idx.histograms[0].clone();
        let mut loo = idx.nearest_to(&h0, 2, Some(0));
        loo.sort();
        assert_eq!(loo, vec![2, 4]);
        // An image is at distance ~0 from itself.
        let h = idx.histogram(&pool[0]);
        assert!(idx.distance(&h, &idx.histograms[0]).abs() < 1e-9);
    }

    #[test]
    fn index_survives_json() {
        let grid = 2;
        let pool: Vec<CellFeatures> = (0..3).map(|i| image(i == 0, 0.0, grid)).collect();
        let idx = AlignmentIndex::build(&pool, grid, 2, 4, 1);
        let back: AlignmentIndex =
            serde_json::from_str(&serde_json::to_string(&idx).unwrap()).unwrap();
        assert_eq!(back.histograms, idx.histograms);
        assert_eq!(back.centres, idx.centres);
        // The fast distance of nearest_to ranks like the direct KL.
        let h = idx.histogram(&image(true, 0.5, grid));
        let mut direct: Vec<(f64, usize)> = (0..3)
            .map(|i| (idx.distance(&h, &idx.histograms[i]), i))
            .collect();
        direct.sort_by(|a, b| a.0.total_cmp(&b.0));
        let fast = back.nearest_to(&h, 3, None);
        assert_eq!(fast, direct.iter().map(|d| d.1).collect::<Vec<_>>());
    }
}
