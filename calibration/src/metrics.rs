//! Detection metrics.

/// Image-level AUROC: the probability that a random defective image scores above a random normal
/// one (ties count one half). `None` when either class is empty.
pub fn auroc(normal: &[f64], defective: &[f64]) -> Option<f64> {
    if normal.is_empty() || defective.is_empty() {
        return None;
    }
    // Rank-sum (Mann–Whitney U) with average ranks for ties: O(n log n).
    let mut all: Vec<(f64, bool)> = normal
        .iter()
        .map(|&s| (s, false))
        .chain(defective.iter().map(|&s| (s, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_def = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_def += all[i..=j].iter().filter(|x| x.1).count() as f64 * avg_rank;
        i = j + 1;
    }
    let (n0, n1) = (normal.len() as f64, defective.len() as f64);
    Some((rank_sum_def - n1 * (n1 + 1.0) / 2.0) / (n0 * n1))
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
}
