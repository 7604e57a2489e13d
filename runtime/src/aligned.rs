//! Semantic-aligned references at inspection (spec §7.1; the index is
//! [`edge_ad_calibration::aligned`]): the frame's low-level features are binned into the S×S
//! cells of the stitched map, the K nearest pool images chosen, and the frame's bank built from
//! their stored features.

use crate::error::{Error, Result};
use crate::model::ModelDescription;
use crate::pipeline::{Bank, FrameFeatures};
use edge_ad_calibration::aligned::{AlignmentIndex, CellFeatures};
use edge_ad_calibration::bankfile::AlignedPool;
use edge_ad_calibration::LevelData;
use edge_ad_kernels::LevelBank;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Grid of the alignment cells (spec §7.1: S = 5).
pub const GRID: usize = 5;
/// Centres per cell (spec §7.1: N_c = 5).
pub const CLUSTERS: usize = 5;

/// Unit-length features of model level `tap` (0-based) of every window of `frame`, each in the cell
/// of the `grid × grid` grid over the stitched map that contains its position's centre.
pub fn cell_features(
    desc: &ModelDescription,
    frame: &FrameFeatures,
    tap: usize,
    grid: usize,
) -> CellFeatures {
    let (gh, gw) = (desc.features.grid[0], desc.features.grid[1]);
    let (ih, iw) = (desc.input.size[0], desc.input.size[1]);
    let c = desc.features.channels;
    let (mh, mw) = frame.map_size;
    let mut cells = vec![Vec::new(); grid * grid];
    for (t, &(ox, oy)) in frame.tiles.iter().zip(&frame.offsets) {
        for (p, row) in t.levels[tap].chunks_exact(c).enumerate() {
            let (i, j) = (p / gw, p % gw);
            let y = oy as f64 + (i as f64 + 0.5) * ih as f64 / gh as f64;
            let x = ox as f64 + (j as f64 + 0.5) * iw as f64 / gw as f64;
            let u = ((y / mh as f64 * grid as f64) as usize).min(grid - 1);
            let v = ((x / mw as f64 * grid as f64) as usize).min(grid - 1);
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            cells[u * grid + v].push(row.iter().map(|x| x / n).collect());
        }
    }
    CellFeatures { cells }
}

/// The per-frame reference choice (spec §7.1), one function for `calibrate`, `eval` and
/// inspection: the frame's cell features at 0-based `level` binned by the index, then the `k`
/// pool images nearest. `pool_image`: the frame is that pool image (scored leave-one-out), so
/// its stored histogram is used and it is never its own reference.
pub fn choose_references(
    index: &AlignmentIndex,
    desc: &ModelDescription,
    frame: &FrameFeatures,
    level: usize,
    k: usize,
    pool_image: Option<usize>,
) -> Vec<usize> {
    let h = match pool_image.and_then(|i| index.histograms.get(i)) {
        Some(h) => h.clone(),
        None => index.histogram(&cell_features(desc, frame, level, index.grid)),
    };
    index.nearest_to(&h, k, pool_image)
}

/// The pool of a semantic-aligned bank file, ready to build per-frame banks.
#[derive(Debug, Clone)]
pub struct AlignedBank {
    pool: AlignedPool,
    /// Per scored level, the pool's rows in f16 (as stored).
    levels: Vec<Vec<half::f16>>,
    taps: Vec<usize>,
    /// First row of each pool image.
    first_row: Vec<usize>,
    positions: usize,
    channels: usize,
}

impl AlignedBank {
    /// From a bank file's aligned pool and level data (`taps`: 0-based scored levels).
    pub fn new(
        pool: AlignedPool,
        data: &[LevelData],
        taps: Vec<usize>,
        desc: &ModelDescription,
    ) -> Result<Self> {
        let positions = desc.positions();
        let channels = desc.features.channels;
        // The index bins this model's features: its centres must have the model's width (the
        // bank reader can only check this when the alignment level is one of the bank's levels).
        if pool.index.channels != channels {
            return Err(Error::Invalid(format!(
                "aligned pool: the alignment index has {} channels, the model's features {channels}",
                pool.index.channels
            )));
        }
        let mut first_row = Vec::with_capacity(pool.windows.len());
        let mut rows = 0usize;
        for w in &pool.windows {
            first_row.push(rows);
            rows = w
                .checked_mul(positions)
                .and_then(|n| rows.checked_add(n))
                .ok_or_else(|| Error::Invalid("aligned pool: window counts overflow".into()))?;
        }
        if pool.images.len() != pool.windows.len()
            || pool.index.histograms.len() != pool.images.len()
        {
            return Err(Error::Invalid(format!(
                "aligned pool: {} images, {} window counts, {} histograms",
                pool.images.len(),
                pool.windows.len(),
                pool.index.histograms.len()
            )));
        }
        if pool.k == 0
            || pool.k > pool.images.len()
            || pool.level == 0
            || pool.level > desc.taps.len()
        {
            return Err(Error::Invalid(format!(
                "aligned pool: k = {} of {} images, level {} of {}",
                pool.k,
                pool.images.len(),
                pool.level,
                desc.taps.len()
            )));
        }
        let levels = data
            .iter()
            .map(|d| match d {
                LevelData::F16(v) if v.len() == rows * channels => Ok(v.clone()),
                LevelData::F16(v) => Err(Error::Invalid(format!(
                    "aligned pool: {} values per level, the pool's windows need {}",
                    v.len(),
                    rows * channels
                ))),
                LevelData::F32(_) => Err(Error::Invalid(
                    "aligned pool: level data must be f16".into(),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pool,
            levels,
            taps,
            first_row,
            positions,
            channels,
        })
    }

    /// References per frame.
    pub fn k(&self) -> usize {
        self.pool.k
    }

    /// Pool image names.
    pub fn images(&self) -> &[String] {
        &self.pool.images
    }

    /// The bank of the pool images nearest `frame`, and their indices (nearest first).
    pub fn bank_for(
        &self,
        desc: &ModelDescription,
        frame: &FrameFeatures,
    ) -> Result<(Bank, Vec<usize>)> {
        let chosen = choose_references(
            &self.pool.index,
            desc,
            frame,
            self.pool.level - 1,
            self.pool.k,
            None,
        );
        let rows: usize = chosen
            .iter()
            .map(|&i| self.pool.windows[i] * self.positions)
            .sum();
        let build = |data: &Vec<half::f16>| {
            let mut wide = vec![0.0f32; rows * self.channels];
            let mut at = 0;
            for &i in &chosen {
                let n = self.pool.windows[i] * self.positions * self.channels;
                let a = self.first_row[i] * self.channels;
                data[a..a + n].convert_to_f32_slice(&mut wide[at..at + n]);
                at += n;
            }
            LevelBank::from_f16_widened(rows, self.channels, wide)
        };
        // Levels are independent: build them in parallel on the caller's pool.
        let levels = self
            .levels
            .par_iter()
            .map(build)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((Bank::with_taps(levels, self.taps.clone())?, chosen))
    }
}
