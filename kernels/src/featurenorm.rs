//! FeatureNorm scoring (spec §5): per-position norm → bilinear upsampling → mean over levels →
//! Gaussian smoothing → image score = max.

use crate::gemm::Par;
use crate::KernelError;
use rayon::prelude::*;

/// The per-position score of a feature `e`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormForm {
    /// `sqrt(‖e‖₂ + 1) − 1`: the authors' code (spec §5.1), the default.
    #[default]
    Code,
    /// `sqrt(‖e‖₂² + 1) − 1`: the paper's pseudo-Huber form.
    Paper,
}

impl NormForm {
    /// Score of a feature whose squared L2 norm is `sq`.
    pub fn apply(self, sq: f64) -> f32 {
        let n = match self {
            NormForm::Code => sq.sqrt() as f32,
            NormForm::Paper => sq as f32,
        };
        (n + 1.0).sqrt() - 1.0
    }
}

/// SciPy `gaussian_filter` taps for `sigma` with `truncate = 4`: radius `int(4σ + 0.5)`,
/// weights `exp(−t²/2σ²)` normalised to sum 1 (spec §5.2 step 3).
pub fn gaussian_taps(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius)
        .map(|t| (-(t * t) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

/// SciPy `reflect` border: `… x1 x0 | x0 x1 …` (the edge sample repeats), for any offset.
fn reflect(i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * n;
    let mut m = i.rem_euclid(period);
    if m >= n {
        m = period - 1 - m;
    }
    m as usize
}

/// One bilinear tap pair along an axis.
#[derive(Debug, Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    frac: f32,
}

/// `align_corners = True` sampling: output `i` reads source `i·(in−1)/(out−1)`, as PyTorch computes
/// it in f32.
fn bilinear_taps(input: usize, output: usize) -> Vec<Tap> {
    let scale = if output > 1 {
        (input as f32 - 1.0) / (output as f32 - 1.0)
    } else {
        0.0
    };
    (0..output)
        .map(|i| {
            let src = scale * i as f32;
            let i0 = (src as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            Tap {
                i0,
                i1,
                frac: src - i0 as f32,
            }
        })
        .collect()
}

/// A configured scorer: grid `h × w` of feature positions → map `out_h × out_w`.
#[derive(Debug, Clone)]
pub struct FeatureNorm {
    grid: (usize, usize),
    out: (usize, usize),
    form: NormForm,
    rows: Vec<Tap>,
    cols: Vec<Tap>,
    taps: Vec<f64>,
}

/// Per-frame scratch of [`FeatureNorm::score`].
#[derive(Debug, Default)]
pub struct ScoreWorkspace {
    level: Vec<f32>,
    smooth: SmoothWorkspace,
}

/// Scratch of [`FeatureNorm::smooth`].
#[derive(Debug, Default)]
pub struct SmoothWorkspace {
    tmp: Vec<f32>,
}

impl FeatureNorm {
    /// A scorer for `grid = (h, w)` positions upsampled to `out = (H, W)` pixels, smoothed with
    /// `sigma` (the spec's 4).
    pub fn new(
        grid: (usize, usize),
        out: (usize, usize),
        sigma: f64,
        form: NormForm,
    ) -> Result<Self, KernelError> {
        if grid.0 == 0 || grid.1 == 0 || out.0 == 0 || out.1 == 0 || sigma.is_nan() || sigma <= 0.0
        {
            return Err(KernelError::Shape(format!(
                "FeatureNorm grid {grid:?} → map {out:?}, sigma {sigma}: all must be positive"
            )));
        }
        Ok(Self {
            grid,
            out,
            form,
            rows: bilinear_taps(grid.0, out.0),
            cols: bilinear_taps(grid.1, out.1),
            taps: gaussian_taps(sigma),
        })
    }

    /// Feature grid `(h, w)`.
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }
    /// The per-position score form.
    pub fn form(&self) -> NormForm {
        self.form
    }
    /// Normalised Gaussian taps (`2·radius + 1`).
    pub fn taps(&self) -> &[f64] {
        &self.taps
    }
    /// Map size `(H, W)`.
    pub fn out_size(&self) -> (usize, usize) {
        self.out
    }

    /// Per-position scores of one level: `features` is `h·w × C` row-major, `out` has `h·w` entries.
    pub fn level_map(&self, features: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        let p = self.grid.0 * self.grid.1;
        if out.len() != p || !features.len().is_multiple_of(p) || features.is_empty() {
            return Err(KernelError::Shape(format!(
                "level map of {p} positions from {} values into {}",
                features.len(),
                out.len()
            )));
        }
        let c = features.len() / p;
        for (o, e) in out.iter_mut().zip(features.chunks_exact(c)) {
            let sq: f64 = e.iter().map(|&v| v as f64 * v as f64).sum();
            *o = self.form.apply(sq);
        }
        Ok(())
    }

    /// Bilinear (align_corners) upsampling of an `h × w` grid to the `H × W` map.
    pub fn upsample(&self, grid: &[f32], out: &mut [f32]) {
        for (r, row_out) in self.rows.iter().zip(out.chunks_exact_mut(self.out.1)) {
            self.upsample_row(grid, r, row_out);
        }
    }

    #[inline]
    fn upsample_row(&self, grid: &[f32], r: &Tap, row_out: &mut [f32]) {
        let w = self.grid.1;
        for (c, o) in self.cols.iter().zip(row_out.iter_mut()) {
            let a = grid[r.i0 * w + c.i0];
            let b = grid[r.i0 * w + c.i1];
            let cc = grid[r.i1 * w + c.i0];
            let d = grid[r.i1 * w + c.i1];
            let top = a + (b - a) * c.frac;
            let bot = cc + (d - cc) * c.frac;
            *o = top + (bot - top) * r.frac;
        }
    }

    /// Separable Gaussian with reflect borders: vertical pass, then horizontal; f64 accumulation,
    /// f32 storage after each pass (SciPy's order and precision, spec §5.2 step 3).
    ///
    /// Both passes run along contiguous rows (the vertical one adds whole shifted rows), so the
    /// inner loops vectorise; borders are resolved once per row, not per tap. Rows are split over
    /// the pool's threads with [`Par::Pool`].
    pub fn smooth(&self, map: &mut [f32], ws: &mut SmoothWorkspace, par: Par) {
        let (h, w) = self.out;
        let r = (self.taps.len() / 2) as i64;
        ws.tmp.resize(h * w, 0.0);
        let taps = &self.taps;
        // Vertical: out row y = Σ_t k_t · row(reflect(y + t − r)), 32 columns at a time on the stack.
        let vertical = |(y, out): (usize, &mut [f32])| {
            for x0 in (0..w).step_by(32) {
                let n = 32.min(w - x0);
                let mut acc = [0.0f64; 32];
                for (t, &k) in taps.iter().enumerate() {
                    let src = reflect(y as i64 + t as i64 - r, h as i64);
                    for (a, &v) in acc[..n]
                        .iter_mut()
                        .zip(&map[src * w + x0..src * w + x0 + n])
                    {
                        *a += k * v as f64;
                    }
                }
                for (o, &a) in out[x0..x0 + n].iter_mut().zip(&acc[..n]) {
                    *o = a as f32;
                }
            }
        };
        match par {
            Par::Pool => ws.tmp.par_chunks_mut(w).enumerate().for_each(vertical),
            Par::Single => ws.tmp.chunks_mut(w).enumerate().for_each(vertical),
        }
        // Horizontal: pad the row by reflection once, then a plain correlation.
        let tmp = &ws.tmp;
        let horizontal = |(y, out): (usize, &mut [f32])| {
            PADDED.with_borrow_mut(|padded| {
                padded.resize(w + 2 * r as usize, 0.0);
                let row = &tmp[y * w..(y + 1) * w];
                for (i, p) in padded.iter_mut().enumerate() {
                    *p = row[reflect(i as i64 - r, w as i64)] as f64;
                }
                for (x, o) in out.iter_mut().enumerate() {
                    let window = &padded[x..x + taps.len()];
                    *o = window.iter().zip(taps).map(|(&v, &k)| k * v).sum::<f64>() as f32;
                }
            })
        };
        match par {
            Par::Pool => map.par_chunks_mut(w).enumerate().for_each(horizontal),
            Par::Single => map.chunks_mut(w).enumerate().for_each(horizontal),
        }
    }

    /// The whole of §5: per-level maps of `levels` (each `h·w × C`), upsampled, averaged in level
    /// order, smoothed into `map` (`H × W`); returns the image score (the map's maximum).
    /// `level_maps`, when given, receives the `L × h·w` per-level scores.
    pub fn score(
        &self,
        levels: &[&[f32]],
        map: &mut [f32],
        level_maps: Option<&mut [f32]>,
        ws: &mut ScoreWorkspace,
        par: Par,
    ) -> Result<f32, KernelError> {
        let p = self.grid.0 * self.grid.1;
        let px = self.out.0 * self.out.1;
        if levels.is_empty() || map.len() != px {
            return Err(KernelError::Shape(format!(
                "score: {} levels into a map of {} (want ≥ 1 level, {px} pixels)",
                levels.len(),
                map.len()
            )));
        }
        ws.level.resize(levels.len() * p, 0.0);
        for (feats, grid) in levels.iter().zip(ws.level.chunks_exact_mut(p)) {
            self.level_map(feats, grid)?;
        }
        if let Some(lm) = level_maps {
            lm[..levels.len() * p].copy_from_slice(&ws.level);
        }
        // Upsample every level and average them, row by row: f32 sum in level order, then / L.
        let n = levels.len() as f32;
        let grids = &ws.level;
        let assemble = |(y, out): (usize, &mut [f32])| {
            ROW.with_borrow_mut(|up| {
                up.resize(self.out.1, 0.0);
                out.fill(0.0);
                for grid in grids.chunks_exact(p) {
                    self.upsample_row(grid, &self.rows[y], up);
                    for (o, &u) in out.iter_mut().zip(up.iter()) {
                        *o += u;
                    }
                }
                out.iter_mut().for_each(|o| *o /= n);
            })
        };
        match par {
            Par::Pool => map
                .par_chunks_mut(self.out.1)
                .enumerate()
                .for_each(assemble),
            Par::Single => map.chunks_mut(self.out.1).enumerate().for_each(assemble),
        }
        self.smooth(map, &mut ws.smooth, par);
        // NaN propagates (f32::max would skip it): a map with a NaN is not a score.
        Ok(map.iter().copied().fold(f32::NEG_INFINITY, |m, v| {
            if m.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                m.max(v)
            }
        }))
    }
}

thread_local! {
    /// One padded row of the horizontal Gaussian pass, per thread.
    static PADDED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One upsampled level row, per thread.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_has_33_taps_for_sigma_4_and_sums_to_one() {
        let t = gaussian_taps(4.0);
        assert_eq!(t.len(), 33);
        assert!((t.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!(t[16] > t[15] && (t[15] - t[17]).abs() < 1e-18);
    }

    #[test]
    fn reflect_repeats_the_edge_sample() {
        let idx: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(idx, [2, 1, 0, 0, 1, 2, 3, 4, 4, 3, 2]);
    }

    #[test]
    fn align_corners_hits_both_ends_exactly() {
        let fnorm = FeatureNorm::new((2, 2), (3, 3), 1.0, NormForm::Code).unwrap();
        let mut out = [0.0f32; 9];
        fnorm.upsample(&[0.0, 1.0, 2.0, 3.0], &mut out);
        assert_eq!(out, [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]);
    }

    #[test]
    fn norm_forms_differ_as_documented() {
        // ‖e‖ = 3: code form sqrt(3+1)−1 = 1, paper form sqrt(9+1)−1.
        assert_eq!(NormForm::Code.apply(9.0), 1.0);
        assert!((NormForm::Paper.apply(9.0) - (10f32.sqrt() - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn constant_features_give_a_flat_map_and_that_score() {
        let fnorm = FeatureNorm::new((4, 4), (9, 9), 2.0, NormForm::Code).unwrap();
        let feats = vec![3.0f32 / 2.0; 16 * 4]; // ‖e‖ = 3 at every position (C = 4)
        let mut map = vec![0.0; 81];
        let s = fnorm
            .score(
                &[&feats, &feats],
                &mut map,
                None,
                &mut Default::default(),
                Par::Single,
            )
            .unwrap();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(map.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }
}
