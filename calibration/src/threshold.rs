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
    /// The smallest normal score such that at most `false_reject` of the held-out normal images
    /// score above it: a stated false-reject budget (e.g. 0.01). With few images the budget is
    /// only as fine as `1 / count`.
    Quantile {
        /// Fraction of normal parts allowed to be rejected, in `[0, 1)`.
        false_reject: f64,
    },
}

impl std::str::FromStr for ThresholdRule {
    type Err = String;
    /// `max*1.05`, `mean+3sigma`, `quantile:0.01`.
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("threshold rule `{s}`: `{v}` is not a number"))
        };
        if let Some(m) = s.strip_prefix("max*") {
            Ok(ThresholdRule::MaxTimesMargin { margin: num(m)? })
        } else if let Some(k) = s
            .strip_prefix("mean+")
            .and_then(|r| r.strip_suffix("sigma"))
        {
            Ok(ThresholdRule::MeanPlusKSigma { k: num(k)? })
        } else if let Some(q) = s.strip_prefix("quantile:") {
            Ok(ThresholdRule::Quantile {
                false_reject: num(q)?,
            })
        } else {
            Err(format!(
                "unknown threshold rule `{s}`: expected max*MARGIN (e.g. max*1.05), mean+Ksigma (e.g. mean+3sigma) or quantile:BUDGET (e.g. quantile:0.01)"
            ))
        }
    }
}

/// Known-bad parts at calibration (NAGL): where they score and how the threshold separates them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefectStats {
    /// Defective images scored.
    pub count: usize,
    /// Lowest defect score.
    pub min: f64,
    /// Highest defect score.
    pub max: f64,
    /// `min(defect) − max(normal)`: positive when the classes separate.
    pub gap: f64,
    /// `gap / (normal std + defect std)`: the separation in units of the classes' spread.
    pub separation: f64,
    /// Normal images the threshold rejects.
    pub false_rejects: usize,
    /// Defective images the threshold passes.
    pub misses: usize,
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
    /// With known-bad parts: the threshold lies between the classes (see [`Threshold::between`]).
    #[serde(default)]
    pub defects: Option<DefectStats>,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (
        mean,
        (v.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt(),
    )
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
        let (mean, std) = mean_std(scores);
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
            ThresholdRule::Quantile { false_reject } if (0.0..1.0).contains(&false_reject) => {
                let mut sorted = scores.to_vec();
                sorted.sort_by(f64::total_cmp);
                let keep = ((1.0 - false_reject) * n).ceil() as usize;
                sorted[keep.clamp(1, scores.len()) - 1]
            }
            ThresholdRule::Quantile { false_reject } => {
                return Err(format!(
                    "false-reject budget {false_reject} must be in [0, 1)"
                ))
            }
        };
        Ok(Self {
            value,
            rule,
            normal_count: scores.len(),
            normal_min: min,
            normal_max: max,
            normal_mean: mean,
            normal_std: std,
            defects: None,
        })
    }

    /// With known-bad parts (NAGL's point): when the classes separate, the threshold sits midway
    /// between the highest normal and the lowest defect score; when they overlap, at the cut that
    /// makes the fewest errors (false rejects + misses), ties going to the lower cut (a miss ships
    /// a bad part; a false reject only costs a good one). `rule` is recorded for the normal side.
    pub fn between(normal: &[f64], defects: &[f64], rule: ThresholdRule) -> Result<Self, String> {
        let mut t = Self::from_scores(normal, rule)?;
        if defects.is_empty() {
            return Err("no defect scores to place the threshold against".into());
        }
        if let Some(bad) = defects.iter().find(|s| !s.is_finite()) {
            return Err(format!("a defect score is not finite ({bad})"));
        }
        let dmin = defects.iter().copied().fold(f64::INFINITY, f64::min);
        let dmax = defects.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let value = if t.normal_max < dmin {
            0.5 * (t.normal_max + dmin)
        } else {
            // Candidate cuts: every score (rejecting strictly above it) and just below the lowest.
            let errors = |c: f64| {
                normal.iter().filter(|&&s| s > c).count()
                    + defects.iter().filter(|&&s| s <= c).count()
            };
            let mut cands: Vec<f64> = normal.iter().chain(defects).copied().collect();
            cands.push(t.normal_min.min(dmin) - 1e-9);
            cands.sort_by(f64::total_cmp);
            let mut best = (usize::MAX, f64::NAN);
            for c in cands {
                let e = errors(c);
                if e < best.0 {
                    best = (e, c);
                }
            }
            best.1
        };
        let (_, dstd) = mean_std(defects);
        let gap = dmin - t.normal_max;
        t.value = value;
        t.defects = Some(DefectStats {
            count: defects.len(),
            min: dmin,
            max: dmax,
            gap,
            // Clamped: with no spread (one image per class) the ratio overflows, and JSON
            // cannot hold an infinity: the bank would be written with `null` and not load.
            separation: (gap / (t.normal_std + dstd).max(f64::MIN_POSITIVE))
                .clamp(-f64::MAX, f64::MAX),
            false_rejects: normal.iter().filter(|&&s| t.rejects(s)).count(),
            misses: defects.iter().filter(|&&s| !t.rejects(s)).count(),
        });
        Ok(t)
    }

    /// True when `score` is rejected (NG). The one verdict rule of every command: a score that
    /// is not finite (NaN, ±inf: a broken bank or frame) is rejected, never passed in doubt.
    pub fn rejects(&self, score: f64) -> bool {
        !score.is_finite() || score > self.value
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
        // H4: −inf used to pass as OK (below every threshold).
        assert!(t.rejects(f64::NEG_INFINITY) && t.rejects(f64::INFINITY));
        let t = Threshold::from_scores(&s, ThresholdRule::MeanPlusKSigma { k: 3.0 }).unwrap();
        assert!((t.value - (2.0 + 3.0 * (2.0f64 / 3.0).sqrt())).abs() < 1e-12);
        assert_eq!((t.normal_min, t.normal_max, t.normal_count), (1.0, 3.0, 3));
    }

    #[test]
    fn quantile_keeps_the_false_reject_budget() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let t = Threshold::from_scores(&s, ThresholdRule::Quantile { false_reject: 0.05 }).unwrap();
        assert_eq!(t.value, 95.0);
        assert_eq!(s.iter().filter(|&&x| t.rejects(x)).count(), 5);
        let t = Threshold::from_scores(&s, ThresholdRule::Quantile { false_reject: 0.0 }).unwrap();
        assert_eq!(t.value, 100.0);
        // 3 scores, 10 % budget: no rejection possible at that resolution → the maximum.
        let t = Threshold::from_scores(
            &[3.0, 1.0, 2.0],
            ThresholdRule::Quantile { false_reject: 0.1 },
        )
        .unwrap();
        assert_eq!(t.value, 3.0);
        assert!(Threshold::from_scores(&s, ThresholdRule::Quantile { false_reject: 1.0 }).is_err());
    }

    #[test]
    fn rules_parse_from_text() {
        assert_eq!(
            "max*1.1".parse::<ThresholdRule>().unwrap(),
            ThresholdRule::MaxTimesMargin { margin: 1.1 }
        );
        assert_eq!(
            "mean+3sigma".parse::<ThresholdRule>().unwrap(),
            ThresholdRule::MeanPlusKSigma { k: 3.0 }
        );
        assert_eq!(
            "quantile:0.02".parse::<ThresholdRule>().unwrap(),
            ThresholdRule::Quantile { false_reject: 0.02 }
        );
        let e = "max*x".parse::<ThresholdRule>().unwrap_err();
        assert!(e.contains("`x`"), "{e}");
        assert!("median".parse::<ThresholdRule>().is_err());
    }

    #[test]
    fn defects_place_the_threshold_between_the_classes() {
        let normal = [1.0, 2.0, 3.0];
        let t = Threshold::between(&normal, &[5.0, 6.0], ThresholdRule::default()).unwrap();
        assert_eq!(t.value, 4.0);
        let d = t.defects.as_ref().unwrap();
        assert_eq!((d.gap, d.false_rejects, d.misses), (2.0, 0, 0));
        // Overlap: defect 2.5 lies among the normals. Cuts: at 2.0 → 1 false reject (3.0) and
        // 0 misses; at 3.0 → 0 false rejects, 1 miss (2.5). Equal errors: the lower cut wins.
        let t = Threshold::between(&normal, &[2.5, 6.0], ThresholdRule::default()).unwrap();
        assert_eq!(t.value, 2.0);
        let d = t.defects.unwrap();
        assert_eq!((d.false_rejects, d.misses), (1, 0));
        assert!(d.gap < 0.0);
        assert!(Threshold::between(&normal, &[], ThresholdRule::default()).is_err());
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(Threshold::from_scores(&[], ThresholdRule::default()).is_err());
        assert!(Threshold::from_scores(&[1.0, f64::NAN], ThresholdRule::default()).is_err());
        assert!(
            Threshold::from_scores(&[1.0], ThresholdRule::MaxTimesMargin { margin: 0.5 }).is_err()
        );
    }

    #[test]
    fn separation_without_spread_stays_finite_and_survives_json() {
        // One image per class: no spread, the ratio overflowed to infinity (written as `null`).
        let t = Threshold::between(&[1.0], &[10.0], ThresholdRule::default()).unwrap();
        let d = t.defects.as_ref().unwrap();
        assert_eq!((d.gap, d.separation), (9.0, f64::MAX));
        let back: Threshold = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
