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
    /// A false-reject budget with a guarantee (split conformal prediction): with `n` held-out
    /// normal scores, the `⌈(n+1)(1−P)⌉`-th smallest is the threshold, and a new good part that
    /// is exchangeable with them is rejected with probability at most `P` — exactly
    /// `(n+1−k)/(n+1)` for continuous scores, whatever their distribution. Needs
    /// `n ≥ ⌈1/P⌉ − 1` held-out scores; references scored leave-one-out are not held out (they
    /// score high: a k-means reference is the only member of its cluster in the bank).
    Conformal {
        /// The false-reject budget `P`, in `(0, 0.5)`.
        reject_rate: f64,
    },
}

/// Beyond this many held-out scores no pool is real: budgets that would need more are reported
/// as such instead of as an overflowing count.
const MAX_POOL: usize = 1 << 40;

/// The smallest number of held-out normal scores for which the conformal rule can guarantee a
/// false-reject rate of at most `p` (`⌈(n+1)(1−p)⌉ ≤ n`); `usize::MAX` beyond any pool.
pub fn conformal_min_scores(p: f64) -> usize {
    // (n+1)·p ≥ 1 ⇔ n ≥ 1/p − 1; computed with the same rank as the rule to agree at edges.
    let approx = ((1.0 / p) - 1.0).ceil().max(1.0);
    if approx.is_nan() || approx >= MAX_POOL as f64 {
        return usize::MAX;
    }
    let mut n = approx as usize;
    while conformal_rank(n, p) > n {
        n += 1;
    }
    while n > 1 && conformal_rank(n - 1, p) < n {
        n -= 1;
    }
    n
}

/// The 1-based rank `⌈(n+1)(1−p)⌉` of the conformal threshold among `n` sorted scores, never one
/// whose stated rate `(n+1−k)/(n+1)` exceeds `p`.
pub fn conformal_rank(n: usize, p: f64) -> usize {
    let n1 = n.saturating_add(1);
    // A tiny slack keeps (n+1)(1−p) that is an integer in exact arithmetic from rounding up…
    let mut k = ((n1 as f64) * (1.0 - p) - 1e-9).ceil().max(0.0) as usize;
    // …and this keeps the slack from ever stating more than the budget.
    while k <= n && (n1 - k) as f64 / n1 as f64 > p {
        k += 1;
    }
    k
}

/// A rate as people read it: short when short (`0.02`), else 4 significant digits (`0.1111`,
/// `1e-300` as `1.000e-300`).
pub fn fmt_rate(p: f64) -> String {
    let short = format!("{p}");
    if short.len() <= 8 {
        short
    } else if p.abs() >= 1e-4 {
        format!("{p:.4}")
    } else {
        format!("{p:.3e}")
    }
}

fn fmt_count(n: usize) -> String {
    if n == usize::MAX {
        "more than any pool holds".into()
    } else {
        n.to_string()
    }
}

impl std::fmt::Display for ThresholdRule {
    /// As `--rule` reads it (`conformal:0.02`, `max*1.05`, `mean+3sigma`, `quantile:0.01`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThresholdRule::MaxTimesMargin { margin } => write!(f, "max*{margin}"),
            ThresholdRule::MeanPlusKSigma { k } => write!(f, "mean+{k}sigma"),
            ThresholdRule::Quantile { false_reject } => write!(f, "quantile:{false_reject}"),
            ThresholdRule::Conformal { reject_rate } => {
                write!(f, "conformal:{}", fmt_rate(*reject_rate))
            }
        }
    }
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
        } else if let Some(p) = s.strip_prefix("conformal:") {
            Ok(ThresholdRule::Conformal {
                reject_rate: num(p)?,
            })
        } else {
            Err(format!(
                "unknown threshold rule `{s}`: expected max*MARGIN (e.g. max*1.05), mean+Ksigma (e.g. mean+3sigma), quantile:BUDGET (e.g. quantile:0.01) or conformal:P (e.g. conformal:0.02)"
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

/// The default false-reject budget: 2 % of good parts. A line engineer can afford to re-check
/// one good part in fifty; the guarantee needs 49 held-out scores, which a pool of 60 gives
/// (docs/calibration.md §4).
pub const DEFAULT_REJECT_RATE: f64 = 0.02;

impl Default for ThresholdRule {
    /// `conformal:0.02` ([`DEFAULT_REJECT_RATE`]); see [`ThresholdRule::default_for`] for pools
    /// too small to guarantee it.
    fn default() -> Self {
        ThresholdRule::Conformal {
            reject_rate: DEFAULT_REJECT_RATE,
        }
    }
}

impl ThresholdRule {
    /// Refuse a rule no pool can apply, naming the value: the check a command makes before any
    /// work, and the words [`Threshold::from_scores`] refuses with.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            ThresholdRule::MaxTimesMargin { margin } if !(margin.is_finite() && margin >= 1.0) => {
                Err(format!("margin {margin} must be finite and ≥ 1"))
            }
            // k < 0 puts the threshold below the mean: most good parts would be rejected.
            ThresholdRule::MeanPlusKSigma { k } if !(k.is_finite() && k >= 0.0) => {
                Err(format!("k {k} must be finite and ≥ 0 (mean + k·sigma)"))
            }
            ThresholdRule::Quantile { false_reject } if !(0.0..1.0).contains(&false_reject) => {
                Err(format!(
                    "false-reject budget {false_reject} must be in [0, 1)"
                ))
            }
            ThresholdRule::Conformal { reject_rate } if !(reject_rate > 0.0 && reject_rate < 0.5) => {
                Err(format!(
                    "false-reject budget {} (--reject-rate, --rule conformal:P): must be in (0, 0.5), e.g. 0.02 for 2 % of good parts rejected",
                    fmt_rate(reject_rate)
                ))
            }
            _ => Ok(()),
        }
    }

    /// The default rule for `n` held-out normal scores: `conformal:0.02` when `n` is large enough
    /// to guarantee it (49), otherwise the largest held-out score — the conformal rule at the
    /// finest budget `n` scores can state, `1/(n+1)` — with the reason in words (for the log and
    /// the report): nobody asked for 2 %, so a small pool is no error, but the stated rate says
    /// what it really rests on.
    pub fn default_for(n: usize) -> (ThresholdRule, Option<String>) {
        let need = conformal_min_scores(DEFAULT_REJECT_RATE);
        if n >= need {
            return (ThresholdRule::default(), None);
        }
        let p = 1.0 / (n.max(1) + 1) as f64;
        (
            ThresholdRule::Conformal { reject_rate: p },
            Some(format!(
                "{n} held-out good images are too few for the default 2 % false-reject budget (it needs {need}): the threshold is their highest score, which bounds the false-reject rate by 1/(n+1) = {:.1} %; calibrate with a pool of more good parts for a finer one",
                100.0 * p
            )),
        )
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
    /// The conformal rule's false-reject rate for a new good part, `(n+1−k)/(n+1)` (at most the
    /// budget asked); `None` for the other rules, which state no rate.
    #[serde(default)]
    pub expected_false_reject: Option<f64>,
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
        // 0.5 itself only from `default_for(1)`: one held-out score states no finer rate.
        if rule != (ThresholdRule::Conformal { reject_rate: 0.5 }) {
            rule.validate()?;
        }
        let value = match rule {
            ThresholdRule::MaxTimesMargin { margin } => max * margin,
            ThresholdRule::MeanPlusKSigma { k } => mean + k * std,
            ThresholdRule::Quantile { false_reject } => {
                let mut sorted = scores.to_vec();
                sorted.sort_by(f64::total_cmp);
                let keep = ((1.0 - false_reject) * n).ceil() as usize;
                sorted[keep.clamp(1, scores.len()) - 1]
            }
            ThresholdRule::Conformal { reject_rate: p } => {
                let k = conformal_rank(scores.len(), p);
                if k > scores.len() {
                    return Err(format!(
                        "false-reject budget {}: {} held-out normal scores are too few to guarantee it; at least {} are needed",
                        fmt_rate(p),
                        scores.len(),
                        fmt_count(conformal_min_scores(p))
                    ));
                }
                let mut sorted = scores.to_vec();
                sorted.sort_by(f64::total_cmp);
                sorted[k.max(1) - 1]
            }
        };
        let expected_false_reject = match rule {
            ThresholdRule::Conformal { reject_rate } => {
                let k = conformal_rank(scores.len(), reject_rate);
                Some((scores.len() + 1 - k) as f64 / (scores.len() + 1) as f64)
            }
            _ => None,
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
            expected_false_reject,
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
        // The rule's stated rate was for its own threshold; the placed one states its own: the
        // conformal bound (n+1−k)/(n+1), k the held-out scores at or below it.
        if t.expected_false_reject.is_some() {
            let n = normal.len();
            let k = normal.iter().filter(|&&s| s <= value).count();
            t.expected_false_reject = Some((n + 1 - k) as f64 / (n + 1) as f64);
        }
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

    /// The conformal rule: the ⌈(n+1)(1−P)⌉-th smallest held-out score, its stated rate, and a
    /// clear refusal when the pool is too small.
    #[test]
    fn conformal_rule_takes_the_order_statistic_and_states_its_rate() {
        let scores: Vec<f64> = (1..=52).map(|i| i as f64 / 100.0).collect();
        // n = 52, P = 0.02: k = ⌈53 × 0.98⌉ = 52 → the largest; rate 1/53.
        let t = Threshold::from_scores(&scores, ThresholdRule::Conformal { reject_rate: 0.02 })
            .unwrap();
        assert_eq!(t.value, 0.52);
        assert!((t.expected_false_reject.unwrap() - 1.0 / 53.0).abs() < 1e-12);
        // P = 0.05: k = ⌈50.35⌉ = 51 → second largest; rate 2/53 ≤ 0.05.
        let t = Threshold::from_scores(&scores, ThresholdRule::Conformal { reject_rate: 0.05 })
            .unwrap();
        assert_eq!(t.value, 0.51);
        assert!((t.expected_false_reject.unwrap() - 2.0 / 53.0).abs() < 1e-12);
        // P = 0.01 needs n ≥ 99.
        let e = Threshold::from_scores(&scores, ThresholdRule::Conformal { reject_rate: 0.01 })
            .unwrap_err();
        assert!(
            e.contains("52 held-out") && e.contains("at least 99"),
            "{e}"
        );
        assert_eq!(conformal_min_scores(0.01), 99);
        assert_eq!(conformal_min_scores(0.02), 49);
        assert_eq!(conformal_min_scores(0.05), 19);
        assert_eq!(conformal_rank(99, 0.01), 99);
        for p in [0.0, 0.7, -0.1, f64::NAN] {
            let e = Threshold::from_scores(&scores, ThresholdRule::Conformal { reject_rate: p })
                .unwrap_err();
            assert!(e.contains("(0, 0.5)"), "{p}: {e}");
        }
        assert_eq!(
            "conformal:0.02".parse::<ThresholdRule>().unwrap(),
            ThresholdRule::Conformal { reject_rate: 0.02 }
        );
    }

    /// The guarantee, checked by simulation: over many draws of n held-out scores and a new one
    /// from the same distribution, the new one is rejected at the stated rate, never above P.
    #[test]
    fn conformal_false_reject_rate_holds_by_simulation() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut uniform = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (n, p, trials) = (52usize, 0.05, 40_000);
        let mut rejected = 0;
        for _ in 0..trials {
            // A skewed score distribution: the rule must not care.
            let s: Vec<f64> = (0..n).map(|_| (-uniform().ln()).powf(1.5)).collect();
            let t =
                Threshold::from_scores(&s, ThresholdRule::Conformal { reject_rate: p }).unwrap();
            if t.rejects((-uniform().ln()).powf(1.5)) {
                rejected += 1;
            }
        }
        let rate = rejected as f64 / trials as f64;
        let stated = 2.0 / 53.0;
        // Binomial standard error ≈ 0.00095: 4 of them.
        assert!(
            (rate - stated).abs() < 0.004,
            "rate {rate}, stated {stated}"
        );
        assert!(rate < p, "{rate}");
    }

    /// The biased-reference case of issue 14: leave-one-out scores of k-means references are
    /// high (each is alone in its cluster); the max of all normal scores sits above every good
    /// part, while the conformal rule on the held-out scores alone sits where good parts are.
    #[test]
    fn biased_reference_scores_do_not_lift_the_conformal_threshold() {
        let held_out: Vec<f64> = (0..52).map(|i| 0.60 + 0.004 * i as f64).collect(); // ≤ 0.804
        let references = [0.90, 0.86, 0.85, 0.84, 0.83, 0.82, 0.81, 0.80];
        let all: Vec<f64> = held_out.iter().chain(&references).copied().collect();
        let old =
            Threshold::from_scores(&all, ThresholdRule::MaxTimesMargin { margin: 1.05 }).unwrap();
        assert!((old.value - 0.945).abs() < 1e-9, "{}", old.value);
        let new = Threshold::from_scores(&held_out, ThresholdRule::Conformal { reject_rate: 0.02 })
            .unwrap();
        assert!((new.value - 0.804).abs() < 1e-9, "{}", new.value);
        // A defect scoring 0.85 escapes the old rule and is caught by the new one.
        assert!(!old.rejects(0.85) && new.rejects(0.85));
    }

    /// The default rule: 2 % with a guarantee when the pool allows it; below 49 held-out scores
    /// their maximum, stated as 1/(n+1), with the reason.
    #[test]
    fn default_rule_follows_the_held_out_count() {
        assert_eq!(
            ThresholdRule::default(),
            ThresholdRule::Conformal { reject_rate: 0.02 }
        );
        assert_eq!(
            ThresholdRule::default_for(49),
            (ThresholdRule::default(), None)
        );
        assert_eq!(ThresholdRule::default_for(60).0, ThresholdRule::default());
        let (rule, why) = ThresholdRule::default_for(8);
        assert_eq!(
            rule,
            ThresholdRule::Conformal {
                reject_rate: 1.0 / 9.0
            }
        );
        let why = why.unwrap();
        assert!(
            why.contains("8 held-out") && why.contains("needs 49") && why.contains("11.1 %"),
            "{why}"
        );
        let scores = [0.3, 0.9, 0.5, 0.4, 0.6, 0.2, 0.7, 0.8];
        let t = Threshold::from_scores(&scores, rule).unwrap();
        assert_eq!(t.value, 0.9);
        assert!((t.expected_false_reject.unwrap() - 1.0 / 9.0).abs() < 1e-12);
        // One held-out score: the threshold is that score, rate one half.
        let (rule, _) = ThresholdRule::default_for(1);
        let t = Threshold::from_scores(&[0.4], rule).unwrap();
        assert_eq!((t.value, t.expected_false_reject), (0.4, Some(0.5)));
    }

    /// The rank never states more than the budget, whatever the float slack; budgets no pool
    /// can meet are said so; rates print short.
    #[test]
    fn conformal_edges_never_state_more_than_asked() {
        // n = 3, P just under 1/4: the 3rd of 3 would state 1/4 > P → refused.
        let e = Threshold::from_scores(
            &[1.0, 2.0, 3.0],
            ThresholdRule::Conformal {
                reject_rate: 0.2499999999,
            },
        )
        .unwrap_err();
        assert!(e.contains("too few"), "{e}");
        for n in 1..200 {
            for p in [0.01, 0.02, 0.05, 0.1, 0.2499999999, 0.3333333, 0.49] {
                let k = conformal_rank(n, p);
                if k <= n {
                    assert!(
                        ((n + 1 - k) as f64 / (n + 1) as f64) <= p,
                        "n {n} p {p} k {k}"
                    );
                }
            }
        }
        assert_eq!(conformal_min_scores(1e-300), usize::MAX);
        let e = Threshold::from_scores(
            &[1.0],
            ThresholdRule::Conformal {
                reject_rate: 1e-300,
            },
        )
        .unwrap_err();
        assert!(
            e.contains("1.000e-300") && e.contains("more than any pool holds"),
            "{e}"
        );
        assert_eq!(fmt_rate(0.02), "0.02");
        assert_eq!(fmt_rate(1.0 / 9.0), "0.1111");
        assert_eq!(
            ThresholdRule::default_for(8).0.to_string(),
            "conformal:0.1111"
        );
    }

    /// With known-bad parts the threshold moves; the stated rate follows it (the conformal bound
    /// at the placed threshold), not the rule's own.
    #[test]
    fn defects_restate_the_rate_of_the_placed_threshold() {
        let normal: Vec<f64> = (1..=9).map(f64::from).collect();
        let rule = ThresholdRule::Conformal { reject_rate: 0.4 };
        // Alone: k = ⌈10 × 0.6⌉ = 6 → 6.0, rate 4/10.
        let t = Threshold::from_scores(&normal, rule).unwrap();
        assert_eq!((t.value, t.expected_false_reject), (6.0, Some(0.4)));
        // Defects above every normal: midway 9.5, all 9 at or below → 1/10.
        let t = Threshold::between(&normal, &[10.0, 11.0], rule).unwrap();
        assert_eq!(t.value, 9.5);
        assert!((t.expected_false_reject.unwrap() - 0.1).abs() < 1e-12);
        // Other rules state none.
        let t = Threshold::between(
            &normal,
            &[10.0],
            ThresholdRule::MaxTimesMargin { margin: 1.0 },
        )
        .unwrap();
        assert_eq!(t.expected_false_reject, None);
    }

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
        // mean − 3σ would reject most good parts; an infinite margin passes everything.
        let e = Threshold::from_scores(&s, ThresholdRule::MeanPlusKSigma { k: -3.0 }).unwrap_err();
        assert!(e.contains("≥ 0"), "{e}");
        let e = Threshold::from_scores(
            &s,
            ThresholdRule::MaxTimesMargin {
                margin: f64::INFINITY,
            },
        )
        .unwrap_err();
        assert!(e.contains("finite"), "{e}");
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
        for r in [
            ThresholdRule::default(),
            ThresholdRule::MaxTimesMargin { margin: 1.05 },
            ThresholdRule::MeanPlusKSigma { k: 3.0 },
            ThresholdRule::Quantile { false_reject: 0.01 },
        ] {
            assert_eq!(r.to_string().parse::<ThresholdRule>().unwrap(), r);
        }
        assert_eq!(ThresholdRule::default().to_string(), "conformal:0.02");
        let e = "max*x".parse::<ThresholdRule>().unwrap_err();
        assert!(e.contains("`x`"), "{e}");
        assert!("median".parse::<ThresholdRule>().is_err());
    }

    #[test]
    fn defects_place_the_threshold_between_the_classes() {
        let normal = [1.0, 2.0, 3.0];
        let t = Threshold::between(
            &normal,
            &[5.0, 6.0],
            ThresholdRule::MaxTimesMargin { margin: 1.05 },
        )
        .unwrap();
        assert_eq!(t.value, 4.0);
        let d = t.defects.as_ref().unwrap();
        assert_eq!((d.gap, d.false_rejects, d.misses), (2.0, 0, 0));
        // Overlap: defect 2.5 lies among the normals. Cuts: at 2.0 → 1 false reject (3.0) and
        // 0 misses; at 3.0 → 0 false rejects, 1 miss (2.5). Equal errors: the lower cut wins.
        let t = Threshold::between(
            &normal,
            &[2.5, 6.0],
            ThresholdRule::MaxTimesMargin { margin: 1.05 },
        )
        .unwrap();
        assert_eq!(t.value, 2.0);
        let d = t.defects.unwrap();
        assert_eq!((d.false_rejects, d.misses), (1, 0));
        assert!(d.gap < 0.0);
        assert!(
            Threshold::between(&normal, &[], ThresholdRule::MaxTimesMargin { margin: 1.05 })
                .is_err()
        );
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(
            Threshold::from_scores(&[], ThresholdRule::MaxTimesMargin { margin: 1.05 }).is_err()
        );
        assert!(Threshold::from_scores(
            &[1.0, f64::NAN],
            ThresholdRule::MaxTimesMargin { margin: 1.05 }
        )
        .is_err());
        assert!(
            Threshold::from_scores(&[1.0], ThresholdRule::MaxTimesMargin { margin: 0.5 }).is_err()
        );
    }

    #[test]
    fn separation_without_spread_stays_finite_and_survives_json() {
        // One image per class: no spread, the ratio overflowed to infinity (written as `null`).
        let t = Threshold::between(
            &[1.0],
            &[10.0],
            ThresholdRule::MaxTimesMargin { margin: 1.05 },
        )
        .unwrap();
        let d = t.defects.as_ref().unwrap();
        assert_eq!((d.gap, d.separation), (9.0, f64::MAX));
        let back: Threshold = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
