//! The AUROC and F1-max code of `calibration::metrics` against scikit-learn (the `.venv` of
//! tools/setup.sh) on the same scores: image-like sets with ties and a pixel-like set of 200 000
//! values; and `edge-ad eval`'s image AUROC against scikit-learn on the scores `inspect` gives.

use edge_ad_calibration::metrics::{auroc_pairs, f1_max};
use edge_ad_calibration::select::SplitMix64;
use edge_ad_tests::*;
use std::process::Command;

fn python() -> Option<std::path::PathBuf> {
    let py = repo_root().join(".venv/bin/python");
    if py.is_file() {
        return Some(py);
    }
    assert!(!in_ci(), ".venv missing in CI (tools/setup.sh creates it)");
    eprintln!("SKIPPED: .venv not set up (run tools/setup.sh)");
    None
}

/// sklearn's roc_auc_score and its F1-max (from precision_recall_curve) on `pairs`.
fn sklearn(py: &std::path::Path, pairs: &[(f32, bool)]) -> (f64, f64) {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("pairs.txt");
    let text: String = pairs
        .iter()
        .map(|(s, l)| format!("{s:e} {}\n", *l as u8))
        .collect();
    std::fs::write(&f, text).unwrap();
    let script = r#"
import sys, numpy as np
from sklearn.metrics import roc_auc_score, precision_recall_curve
d = np.loadtxt(sys.argv[1], dtype=np.float64, ndmin=2)
s, y = d[:, 0].astype(np.float32), d[:, 1].astype(int)
p, r, _ = precision_recall_curve(y, s)
f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
print(repr(float(roc_auc_score(y, s))), repr(float(f1.max())))
"#;
    let out = Command::new(py)
        .args(["-c", script, f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = String::from_utf8(out.stdout).unwrap();
    let v: Vec<f64> = o.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1])
}

#[test]
fn auroc_and_f1_max_equal_scikit_learn() {
    let Some(py) = python() else { return };
    let mut rng = SplitMix64::new(3);
    let mut cases: Vec<Vec<(f32, bool)>> = Vec::new();
    // Small image-level sets with heavy ties (scores on a coarse grid).
    for n in [5usize, 17, 70] {
        cases.push(
            (0..n)
                .map(|_| {
                    let bad = rng.next_f64() < 0.4;
                    let s = ((rng.next_f64() + if bad { 0.4 } else { 0.0 }) * 10.0).round() / 10.0;
                    (s as f32, bad)
                })
                .collect(),
        );
    }
    // A pixel-like set: 200 000 values, 3 % positives, continuous scores.
    cases.push(
        (0..200_000)
            .map(|_| {
                let bad = rng.next_f64() < 0.03;
                let s = rng.next_f64() * 0.8 + if bad { 0.3 } else { 0.0 };
                (s as f32, bad)
            })
            .collect(),
    );
    for (k, c) in cases.iter().enumerate() {
        let (want_auc, want_f1) = sklearn(&py, c);
        let got_auc = auroc_pairs(&mut c.clone()).unwrap();
        let got_f1 = f1_max(&mut c.clone()).unwrap().0;
        println!(
            "case {k} ({} values): AUROC ours {got_auc:.12} sklearn {want_auc:.12}; F1-max ours {got_f1:.12} sklearn {want_f1:.12}",
            c.len()
        );
        assert!((got_auc - want_auc).abs() < 1e-9, "case {k}");
        assert!((got_f1 - want_f1).abs() < 1e-9, "case {k}");
    }
}
