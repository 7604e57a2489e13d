//! Which product is in front of the camera (docs/line.md, "Products", `select = "auto"`):
//! training-free, from the features the frame is inspected with anyway.
//!
//! Each bank gets a signature: one global descriptor per reference image (its mean feature on
//! the bank's highest stored level, unit length; for semantic-aligned banks one per pool image),
//! a radius, the largest distance from one of those descriptors to its nearest other one (how
//! far apart the product's own good parts lie), and a gap, the distance from its descriptors to
//! the nearest descriptor of another product. A frame's descriptor is compared with every
//! product's descriptors (cosine distance to the nearest); it is recognised as the nearest
//! product when that distance is within the product's limit, the larger of [`RADIUS_FACTOR`] ×
//! radius and half the gap; otherwise as none (an empty conveyor, a product that is not
//! configured).
//!
//! Half the gap is the midpoint between two products: a defective part moves its descriptor away
//! from its good parts (measured: a cracked demo plate lies 2× the plates' radius from them), but
//! far less than to another product (25× there). A frame recognised as the wrong product is still
//! scored against that product's bank, where it looks anomalous: the part is rejected, not
//! passed.

use crate::pipeline::FrameFeatures;
use edge_ad_calibration::{BankFile, LevelData};

/// A frame belongs to a product when its distance is within this many times the largest
/// nearest-neighbour distance among the product's references (or within half the gap to the
/// next product): a new good part lies among the references about as far as they lie from each
/// other, and twice that leaves room for the spread a handful of references underestimates.
pub const RADIUS_FACTOR: f32 = 2.0;

/// The recognition data of one bank.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The model level (1-based) the descriptors come from.
    pub level: usize,
    /// Its channels.
    pub channels: usize,
    /// Unit-length descriptors, one per reference (or pool) image.
    pub descriptors: Vec<Vec<f32>>,
    /// Largest nearest-neighbour distance among the descriptors.
    pub radius: f32,
    /// Distance to the nearest descriptor of another product (infinite alone); see
    /// [`set_gaps`].
    pub gap: f32,
}

/// Why a bank cannot be recognised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Fewer than two reference images: no spread to measure.
    #[error("auto recognition needs a bank of at least 2 reference images (this one has {0})")]
    TooFewImages(usize),
    /// The bank stores no level that every product's bank stores.
    #[error("the banks share no stored level to compare frames on")]
    NoLevel,
    /// The bank's rows do not divide into its windows (a damaged or hand-made header).
    #[error("{rows} rows do not divide into {windows} windows")]
    Layout {
        /// Rows of the level.
        rows: usize,
        /// Windows the header declares.
        windows: usize,
    },
}

/// The highest model level every bank stores: signatures must compare frames in one feature
/// space.
pub fn common_level(files: &[&BankFile]) -> Option<usize> {
    let first = files.first()?.header.scored_levels();
    first
        .into_iter()
        .filter(|l| files.iter().all(|f| f.header.scored_levels().contains(l)))
        .max()
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// Cosine distance of two unit vectors.
fn distance(a: &[f32], b: &[f32]) -> f32 {
    1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
}

impl Signature {
    /// The signature of a bank file on model level `level` (see [`common_level`]).
    pub fn of(file: &BankFile, level: usize) -> Result<Self, SignatureError> {
        let h = &file.header;
        let li = h
            .scored_levels()
            .iter()
            .position(|&l| l == level)
            .ok_or(SignatureError::NoLevel)?;
        let info = &h.levels[li];
        let c = info.channels.max(1);
        let rows_of = |r: usize| -> Vec<f32> {
            match &file.levels[li] {
                LevelData::F16(v) => v[r * c..(r + 1) * c].iter().map(|x| x.to_f32()).collect(),
                LevelData::F32(v) => v[r * c..(r + 1) * c].to_vec(),
            }
        };
        // Windows per image: the aligned pool says so; a fixed bank splits its windows evenly
        // among its references when they divide, else each window counts as an image.
        let windows: Vec<usize> = match &h.aligned {
            Some(pool) => pool.windows.clone(),
            None => {
                let refs = h.references.len().max(1);
                // 0: banks written before the field existed held one window per reference.
                let w = if h.windows == 0 { refs } else { h.windows };
                if w.is_multiple_of(refs) {
                    vec![w / refs; refs]
                } else {
                    vec![1; w.min(info.rows)]
                }
            }
        };
        let total: usize = windows.iter().sum();
        let positions = info.rows.checked_div(total).unwrap_or(0);
        if positions == 0 || positions * total != info.rows {
            return Err(SignatureError::Layout {
                rows: info.rows,
                windows: total,
            });
        }
        // Rows the level data really holds (a bank file is checked on load; this keeps a
        // malformed one from reading past its data).
        let avail = match &file.levels[li] {
            LevelData::F16(v) => v.len() / c,
            LevelData::F32(v) => v.len() / c,
        };
        let mut descriptors = Vec::with_capacity(windows.len());
        let mut row = 0;
        for w in windows {
            let n = w * positions;
            let mut sum = vec![0f32; c];
            for r in row..(row + n).min(avail) {
                for (s, x) in sum.iter_mut().zip(rows_of(r)) {
                    *s += x;
                }
            }
            row += n;
            descriptors.push(unit(sum));
        }
        if descriptors.len() < 2 {
            return Err(SignatureError::TooFewImages(descriptors.len()));
        }
        let radius = descriptors
            .iter()
            .enumerate()
            .map(|(i, a)| {
                descriptors
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, b)| distance(a, b))
                    .fold(f32::INFINITY, f32::min)
            })
            .fold(0f32, f32::max);
        Ok(Self {
            level,
            channels: c,
            descriptors,
            radius,
            gap: f32::INFINITY,
        })
    }

    /// The largest distance at which a frame is still this product.
    pub fn limit(&self) -> f32 {
        let half_gap = if self.gap.is_finite() {
            self.gap / 2.0
        } else {
            0.0
        };
        (RADIUS_FACTOR * self.radius).max(half_gap)
    }

    /// Distance of a frame descriptor (unit length, same level) to this product: to its
    /// nearest reference descriptor.
    pub fn distance(&self, frame: &[f32]) -> f32 {
        self.descriptors
            .iter()
            .map(|d| distance(d, frame))
            .fold(f32::INFINITY, f32::min)
    }
}

/// Set each signature's gap: the distance from its descriptors to the nearest descriptor of
/// another product on the same level (products on other levels do not compare).
pub fn set_gaps(signatures: &mut [Signature]) {
    let gaps: Vec<f32> = signatures
        .iter()
        .enumerate()
        .map(|(i, a)| {
            signatures
                .iter()
                .enumerate()
                .filter(|(j, b)| *j != i && b.level == a.level && b.channels == a.channels)
                .flat_map(|(_, b)| {
                    a.descriptors
                        .iter()
                        .flat_map(move |x| b.descriptors.iter().map(move |y| distance(x, y)))
                })
                .fold(f32::INFINITY, f32::min)
        })
        .collect();
    for (s, g) in signatures.iter_mut().zip(gaps) {
        s.gap = g;
    }
}

/// The unit-length mean feature of a frame on `level` (1-based, `channels` wide) over all its
/// windows; `None` when the frame has no such level.
pub fn frame_descriptor(frame: &FrameFeatures, level: usize, channels: usize) -> Option<Vec<f32>> {
    let tap = level.checked_sub(1)?;
    if frame.tiles.is_empty() {
        return None;
    }
    let mut sum = vec![0f32; channels];
    for t in &frame.tiles {
        let f = t.levels.get(tap)?;
        if channels == 0 || !f.len().is_multiple_of(channels) {
            return None;
        }
        for row in f.chunks_exact(channels) {
            for (s, x) in sum.iter_mut().zip(row) {
                *s += x;
            }
        }
    }
    Some(unit(sum))
}

/// What recognition found for a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Recognition {
    /// The product (bank index) recognised, or `None`: no product close enough.
    pub bank: Option<usize>,
    /// The frame's distance to each bank.
    pub distances: Vec<f32>,
}

/// Recognise a frame among `signatures` (each on its own level).
pub fn recognise(signatures: &[Signature], frame: &FrameFeatures) -> Recognition {
    let distances: Vec<f32> = signatures
        .iter()
        .map(|s| {
            frame_descriptor(frame, s.level, s.channels).map_or(f32::INFINITY, |d| s.distance(&d))
        })
        .collect();
    let best = distances
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i);
    let bank = best.filter(|&i| distances[i] <= signatures[i].limit());
    Recognition { bank, distances }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Features;

    fn frame(v: &[f32]) -> FrameFeatures {
        FrameFeatures {
            tiles: vec![Features {
                levels: vec![v.to_vec()],
            }],
            offsets: vec![(0, 0)],
            placement: crate::preprocess::Placement {
                origin: (0, 0),
                frame: (1, 1),
                resized: (1, 1),
                offset: (0, 0),
            },
            map_size: (1, 1),
        }
    }

    /// The nearest product within twice its references' spacing is recognised; a frame far
    /// from every product is none.
    #[test]
    fn nearest_within_the_radius_else_none() {
        let sig = |ds: &[[f32; 3]]| Signature {
            level: 1,
            channels: 3,
            descriptors: ds.iter().map(|d| unit(d.to_vec())).collect(),
            radius: 0.0,
            gap: f32::INFINITY,
        };
        let mut a = sig(&[[1.0, 0.0, 0.0], [1.0, 0.1, 0.0]]);
        let mut b = sig(&[[0.0, 1.0, 0.0], [0.1, 1.0, 0.0]]);
        for s in [&mut a, &mut b] {
            s.radius = distance(&s.descriptors[0], &s.descriptors[1]);
        }
        let mut sigs = [a, b];
        set_gaps(&mut sigs);
        // The gap: from a's [1, 0.1] to b's [0.1, 1].
        assert!(
            (sigs[0].gap - (1.0 - 0.2 / 1.01)).abs() < 1e-5,
            "{}",
            sigs[0].gap
        );
        // Two positions of one window: their mean is the descriptor.
        let r = recognise(&sigs, &frame(&[1.0, 0.05, 0.0, 1.0, 0.05, 0.0]));
        assert_eq!(r.bank, Some(0), "{r:?}");
        assert_eq!(recognise(&sigs, &frame(&[0.05, 1.0, 0.0])).bank, Some(1));
        // Far from both (beyond half the gap and twice the radius): none.
        let r = recognise(&sigs, &frame(&[0.2, 0.1, 1.0]));
        assert_eq!(r.bank, None, "{r:?}");
        // Moved from a well past its radius but nearer a than the midpoint: still a (a
        // defective part is its product, not none).
        let r = recognise(&sigs, &frame(&[1.0, 0.5, 0.0]));
        assert!(r.distances[0] > 2.0 * sigs[0].radius, "{r:?}");
        assert_eq!(r.bank, Some(0), "{r:?}");
        // A frame without windows is no product.
        let empty = FrameFeatures {
            tiles: vec![],
            ..frame(&[1.0, 0.0])
        };
        assert_eq!(recognise(&sigs, &empty).bank, None);
    }
}
