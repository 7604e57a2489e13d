//! Detection metrics: the field's (AUROC, AUPRO, F1-max) and the line's (verdicts at a threshold).

/// Image-level AUROC: the probability that a random defective image scores above a random normal
/// one (ties count one half). `None` when either class is empty.
pub fn auroc(normal: &[f64], defective: &[f64]) -> Option<f64> {
    let mut all: Vec<(f64, bool)> = normal
        .iter()
        .map(|&s| (s, false))
        .chain(defective.iter().map(|&s| (s, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    rank_sum_auroc(&all)
}

/// Mann–Whitney U over pairs sorted by score, average ranks for ties: O(n).
fn rank_sum_auroc<T: PartialEq>(sorted: &[(T, bool)]) -> Option<f64> {
    let n1 = sorted.iter().filter(|p| p.1).count() as f64;
    let n0 = sorted.len() as f64 - n1;
    if n0 == 0.0 || n1 == 0.0 {
        return None;
    }
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1].0 == sorted[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += sorted[i..=j].iter().filter(|x| x.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    Some((rank_sum - n1 * (n1 + 1.0) / 2.0) / (n0 * n1))
}

/// AUROC of scores against labels (`true` = defective / anomalous pixel), ties counting one half:
/// the same quantity as scikit-learn's `roc_auc_score`. Sorts `pairs` in place. `None` when a
/// class is empty.
pub fn auroc_pairs(pairs: &mut [(f32, bool)]) -> Option<f64> {
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    rank_sum_auroc(pairs)
}

/// The best F1 over all thresholds (each distinct score tried as the lowest score called
/// positive), with the threshold that gives it. Sorts `pairs`. `None` without positives.
pub fn f1_max(pairs: &mut [(f32, bool)]) -> Option<(f64, f32)> {
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let positives = pairs.iter().filter(|p| p.1).count() as f64;
    if positives == 0.0 {
        return None;
    }
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut best = (0.0f64, f32::INFINITY);
    let mut i = 0;
    while i < pairs.len() {
        let s = pairs[i].0;
        while i < pairs.len() && pairs[i].0 == s {
            if pairs[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        let f1 = 2.0 * tp / (tp + fp + positives);
        if f1 > best.0 {
            best = (f1, s);
        }
    }
    Some(best)
}

/// Connected regions of a binary mask (8-connectivity): a region id per pixel (`u32::MAX` for
/// background) and each region's size.
pub fn label_regions(mask: &[bool], width: usize, height: usize) -> (Vec<u32>, Vec<usize>) {
    let mut label = vec![u32::MAX; mask.len()];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != u32::MAX {
            continue;
        }
        let id = sizes.len() as u32;
        let mut size = 0;
        label[start] = id;
        stack.push(start);
        while let Some(p) = stack.pop() {
            size += 1;
            let (x, y) = ((p % width) as i64, (p / width) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as i64 || ny >= height as i64 {
                        continue;
                    }
                    let q = ny as usize * width + nx as usize;
                    if mask[q] && label[q] == u32::MAX {
                        label[q] = id;
                        stack.push(q);
                    }
                }
            }
        }
        sizes.push(size);
    }
    (label, sizes)
}

/// One image's anomaly map with its ground truth, for the pixel metrics.
#[derive(Debug, Clone)]
pub struct PixelCase<'a> {
    /// Map in frame pixels, `width × height`.
    pub map: &'a [f32],
    /// Ground truth, same size (`true` = defect).
    pub mask: &'a [bool],
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

/// Area under the per-region-overlap curve up to a false-positive rate of `max_fpr`, divided by
/// `max_fpr` (MVTec AD, Bergmann et al. 2021: PRO = mean over ground-truth regions of the fraction
/// of the region above the threshold; FPR over all defect-free pixels of all images; regions are
/// 8-connected). Computed exactly over every distinct score rather than on a threshold grid, with
/// linear interpolation at `max_fpr`. `None` without regions or without defect-free pixels.
pub fn aupro(cases: &[PixelCase], max_fpr: f64) -> Option<f64> {
    // (score, region id or u32::MAX for a normal pixel) over all images, regions numbered globally.
    let mut pix: Vec<(f32, u32)> = Vec::new();
    let mut region_sizes: Vec<usize> = Vec::new();
    for c in cases {
        let (labels, sizes) = label_regions(c.mask, c.width, c.height);
        let base = region_sizes.len() as u32;
        region_sizes.extend(sizes);
        pix.extend(
            c.map
                .iter()
                .zip(&labels)
                .map(|(&s, &l)| (s, if l == u32::MAX { u32::MAX } else { base + l })),
        );
    }
    let negatives = pix.iter().filter(|p| p.1 == u32::MAX).count() as f64;
    if region_sizes.is_empty() || negatives == 0.0 {
        return None;
    }
    let inv: Vec<f64> = region_sizes
        .iter()
        .map(|&s| 1.0 / (s as f64 * region_sizes.len() as f64))
        .collect();
    pix.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let (mut fp, mut pro) = (0.0f64, 0.0f64);
    let (mut prev_fpr, mut prev_pro) = (0.0f64, 0.0f64);
    let mut area = 0.0f64;
    let mut i = 0;
    while i < pix.len() {
        let s = pix[i].0;
        while i < pix.len() && pix[i].0 == s {
            match pix[i].1 {
                u32::MAX => fp += 1.0,
                r => pro += inv[r as usize],
            }
            i += 1;
        }
        let fpr = fp / negatives;
        if fpr >= max_fpr {
            let t = if fpr > prev_fpr {
                (max_fpr - prev_fpr) / (fpr - prev_fpr)
            } else {
                0.0
            };
            let pro_at = prev_pro + t * (pro - prev_pro);
            area += 0.5 * (prev_pro + pro_at) * (max_fpr - prev_fpr);
            return Some(area / max_fpr);
        }
        area += 0.5 * (prev_pro + pro) * (fpr - prev_fpr);
        prev_fpr = fpr;
        prev_pro = pro;
    }
    Some(area / max_fpr)
}

/// A line's view of a threshold: how many good parts it rejects and how many defective parts
/// it passes. A part is NG when its score is above the threshold or not finite (the one verdict
/// rule, [`crate::Threshold::rejects`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct OperatingPoint {
    /// Scores strictly above are NG.
    pub threshold: f64,
    /// Good parts rejected.
    pub false_rejects: usize,
    /// Good parts scored.
    pub good: usize,
    /// Defective parts passed as OK.
    pub escapes: usize,
    /// Defective parts scored.
    pub defective: usize,
}

impl OperatingPoint {
    /// Count the verdicts of `good` and `defective` scores at `threshold`.
    pub fn at(threshold: f64, good: &[f64], defective: &[f64]) -> Self {
        let ng = |s: f64| !s.is_finite() || s > threshold;
        Self {
            threshold,
            false_rejects: good.iter().filter(|&&s| ng(s)).count(),
            good: good.len(),
            escapes: defective.iter().filter(|&&s| !ng(s)).count(),
            defective: defective.len(),
        }
    }

    /// The operating point that rejects at most `rate` of the `good` scores (the oracle: the
    /// threshold is read off the test goods themselves, so it says what the ranking allows, not
    /// what a calibrated box does): the threshold is the `(⌊rate·n⌋+1)`-th largest good score.
    /// `None` without good scores or for a rate outside `[0, 1)`.
    pub fn at_false_reject_rate(rate: f64, good: &[f64], defective: &[f64]) -> Option<Self> {
        if good.is_empty() || !(0.0..1.0).contains(&rate) {
            return None;
        }
        let mut sorted: Vec<f64> = good.to_vec();
        // Non-finite good scores are rejected whatever the threshold: they count first.
        sorted.sort_by(|a, b| a.is_finite().cmp(&b.is_finite()).then(b.total_cmp(a)));
        let allowed = (rate * good.len() as f64 + 1e-9).floor() as usize;
        let threshold = sorted[allowed.min(good.len() - 1)];
        Some(Self::at(threshold, good, defective))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        assert_eq!(auroc(&[0.1, 0.2], &[0.3, 0.4]), Some(1.0));
        assert_eq!(auroc(&[0.3, 0.4], &[0.1, 0.2]), Some(0.0));
        assert_eq!(auroc(&[0.5], &[0.5]), Some(0.5));
        // 3 normals, 2 defects: pairs won 5 of 6.
        assert!((auroc(&[0.1, 0.2, 0.35], &[0.3, 0.4]).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(auroc(&[], &[1.0]), None);
    }

    #[test]
    fn pair_auroc_equals_the_rank_form() {
        let mut p = vec![
            (0.1, false),
            (0.35, false),
            (0.2, false),
            (0.3, true),
            (0.4, true),
        ];
        assert!((auroc_pairs(&mut p).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        let mut t = vec![(0.5, true), (0.5, false)];
        assert_eq!(auroc_pairs(&mut t), Some(0.5));
        assert_eq!(auroc_pairs(&mut [(1.0, true)]), None);
    }

    #[test]
    fn f1_max_by_hand() {
        // Scores 0.9 P, 0.8 N, 0.7 P, 0.1 N; P = 2. Cuts: ≥0.9: tp1 fp0 → F1 2/3;
        // ≥0.8: tp1 fp1 → 2/4; ≥0.7: tp2 fp1 → 4/5 (best); ≥0.1: tp2 fp2 → 4/6.
        let mut p = vec![(0.1, false), (0.9, true), (0.7, true), (0.8, false)];
        let (f1, t) = f1_max(&mut p).unwrap();
        assert!((f1 - 0.8).abs() < 1e-12 && t == 0.7, "{f1} {t}");
        assert_eq!(f1_max(&mut [(0.3, false)]), None);
    }

    #[test]
    fn regions_are_eight_connected() {
        // Two diagonal pixels touch (one region), a separate pixel is another.
        #[rustfmt::skip]
        let m = [true, false, false, false,
                 false, true, false, true];
        let (l, sizes) = label_regions(&m, 4, 2);
        assert_eq!(sizes, vec![2, 1]);
        assert_eq!((l[0], l[5], l[7], l[1]), (0, 0, 1, u32::MAX));
    }

    /// One 1×6 image: region A = pixels 0,1 (scores 0.9, 0.2), region B = pixel 3 (0.8), normal
    /// pixels 2, 4, 5 (0.7, 0.3, 0.1). Sweep: 0.9 → PRO ¼ (half of A), FPR 0; 0.8 → PRO ¾; 0.7 →
    /// FPR ⅓; 0.3 → FPR ⅔; 0.2 → PRO 1; 0.1 → FPR 1. Up to FPR 0.3 the curve is flat at ¾: area
    /// 0.3·¾, normalised ¾. Up to FPR 1: ⅓·¾ + ⅓·¾ + ⅓·1 = 0.8333.
    #[test]
    fn aupro_by_hand() {
        let map = [0.9f32, 0.2, 0.7, 0.8, 0.3, 0.1];
        let mask = [true, true, false, true, false, false];
        let case = PixelCase {
            map: &map,
            mask: &mask,
            width: 6,
            height: 1,
        };
        assert!((aupro(std::slice::from_ref(&case), 0.3).unwrap() - 0.75).abs() < 1e-12);
        let full = aupro(&[case], 1.0).unwrap();
        assert!((full - (0.25 + 0.25 + 1.0 / 3.0)).abs() < 1e-12, "{full}");
    }

    /// Operating points on a constructed score set: 100 goods 0.00..0.99, defects 0.50..0.99.
    #[test]
    fn operating_points_count_verdicts() {
        let good: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        let defective: Vec<f64> = (50..100).map(|i| i as f64 / 100.0 + 0.005).collect();
        let p = OperatingPoint::at(0.9, &good, &defective);
        // Goods 0.91..0.99 rejected (9); defects 0.505..0.895 pass (40).
        assert_eq!(
            (p.false_rejects, p.escapes, p.good, p.defective),
            (9, 40, 100, 50)
        );
        // 1 %: the 2nd largest good (0.98) → 1 false reject; defects ≤ 0.98: 0.505..0.975 = 48.
        let p = OperatingPoint::at_false_reject_rate(0.01, &good, &defective).unwrap();
        assert_eq!((p.threshold, p.false_rejects, p.escapes), (0.98, 1, 48));
        // 5 %: the 6th largest (0.94) → 5 false rejects, 44 escapes.
        let p = OperatingPoint::at_false_reject_rate(0.05, &good, &defective).unwrap();
        assert_eq!((p.threshold, p.false_rejects, p.escapes), (0.94, 5, 44));
        // 0 %: the largest good.
        let p = OperatingPoint::at_false_reject_rate(0.0, &good, &defective).unwrap();
        assert_eq!((p.threshold, p.false_rejects), (0.99, 0));
        // 34 goods at 1 %: ⌊0.34⌋ = 0 allowed → the largest good, as at 0 %.
        let p = OperatingPoint::at_false_reject_rate(0.01, &good[..34], &[]).unwrap();
        assert_eq!((p.threshold, p.false_rejects), (0.33, 0));
        // A NaN score is NG on both sides: a NaN good is a false reject, a NaN defect is caught.
        let p = OperatingPoint::at(0.5, &[0.1, f64::NAN], &[f64::NAN, 0.2]);
        assert_eq!((p.false_rejects, p.escapes), (1, 1));
        let p = OperatingPoint::at_false_reject_rate(0.5, &[0.1, f64::NAN, 0.3, 0.2], &[]).unwrap();
        assert_eq!((p.threshold, p.false_rejects), (0.2, 2));
        assert!(OperatingPoint::at_false_reject_rate(0.01, &[], &[1.0]).is_none());
        assert!(OperatingPoint::at_false_reject_rate(1.0, &good, &[]).is_none());
    }
}
