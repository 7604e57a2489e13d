//! Decision thresholds from the scores of held-out normal images.

use serde::{Deserialize, Serialize};

/// How a threshold is derived from normal scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum ThresholdRule {
    /// `max(normal scores) × margin`: no held-out normal image would be rejected, with head-room
    /// for the spread of parts not seen at calibration (default margin 1.05).
    MaxTimesMargin {
        /// Multiplier ≥ 1.
        margin: f64,
    },
    /// `mean + k · standard deviation` of the normal scores.
    MeanPlusKSigma {
        /// Number of standard deviations.
        k: f64,
    },
}

impl Default for ThresholdRule {
    fn default() -> Self {
        ThresholdRule::MaxTimesMargin { margin: 1.05 }
    }
}

/// A threshold with the numbers that produced it (kept in the bank, shown to people).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// Scores strictly above are NG.
    pub value: f64,
    /// The rule applied.
    pub rule: ThresholdRule,
    /// Normal images scored.
    pub normal_count: usize,
    /// Smallest normal score.
    pub normal_min: f64,
    /// Largest normal score.
    pub normal_max: f64,
    /// Mean normal score.
    pub normal_mean: f64,
    /// Standard deviation of the normal scores.
    pub normal_std: f64,
}

impl Threshold {
    /// Apply `rule` to `scores` (at least one, all finite).
    pub fn from_scores(scores: &[f64], rule: ThresholdRule) -> Result<Self, String> {
        if scores.is_empty() {
            return Err("no normal scores to set a threshold from".into());
        }
        if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
            return Err(format!("a normal score is not finite ({bad})"));
        }
        let n = scores.len() as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
        let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let value = match rule {
            ThresholdRule::MaxTimesMargin { margin } if margin >= 1.0 && margin.is_finite() => {
                max * margin
            }
            ThresholdRule::MaxTimesMargin { margin } => {
                return Err(format!("margin {margin} must be ≥ 1"))
            }
            ThresholdRule::MeanPlusKSigma { k } if k.is_finite() => mean + k * std,
            ThresholdRule::MeanPlusKSigma { k } => return Err(format!("k {k} must be finite")),
        };
        Ok(Self {
            value,
            rule,
            normal_count: scores.len(),
            normal_min: min,
            normal_max: max,
            normal_mean: mean,
            normal_std: std,
        })
    }

    /// True when `score` is rejected (NG). NaN is rejected: a part is never passed in doubt.
    pub fn rejects(&self, score: f64) -> bool {
        score.is_nan() || score > self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_times_margin_and_mean_plus_k_sigma() {
        let s = [1.0, 2.0, 3.0];
        let t = Threshold::from_scores(&s, ThresholdRule::MaxTimesMargin { margin: 1.1 }).unwrap();
        assert!((t.value - 3.3).abs() < 1e-12);
        assert!(!t.rejects(3.3) && t.rejects(3.31) && t.rejects(f64::NAN));
        let t = Threshold::from_scores(&s, ThresholdRule::MeanPlusKSigma { k: 3.0 }).unwrap();
        assert!((t.value - (2.0 + 3.0 * (2.0f64 / 3.0).sqrt())).abs() < 1e-12);
        assert_eq!((t.normal_min, t.normal_max, t.normal_count), (1.0, 3.0, 3));
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(Threshold::from_scores(&[], ThresholdRule::default()).is_err());
        assert!(Threshold::from_scores(&[1.0, f64::NAN], ThresholdRule::default()).is_err());
        assert!(
            Threshold::from_scores(&[1.0], ThresholdRule::MaxTimesMargin { margin: 0.5 }).is_err()
        );
    }
}
