//! The exported demo backbone (EfficientNet-Lite0) gives the same features in tract as in
//! onnxruntime (the `.venv` of tools/setup.sh), on a bundled demo image.

use edge_ad::pipeline::{Pipeline, PipelineOptions};
use edge_ad::preprocess::Rgb8;
use edge_ad_tests::*;
use std::process::Command;

#[test]
fn tract_equals_onnxruntime_on_the_demo_backbone() {
    let python = repo_root().join(".venv/bin/python");
    if !python.is_file() {
        assert!(!in_ci(), ".venv missing in CI (tools/setup.sh creates it)");
        eprintln!("SKIPPED: .venv not set up (run tools/setup.sh)");
        return;
    }
    let demo = repo_root().join("demo");
    let mut p = Pipeline::load(&PipelineOptions {
        model: demo.join("efficientnet-lite0.toml"),
        threads: 2,
        ..Default::default()
    })
    .unwrap();
    let img_path = demo.join("images/test/spot/plate_00.png");
    let img = Rgb8::open(&img_path).unwrap();
    let prepared = p.prepare(&img, &img_path).unwrap();
    let feats = p.features(&img, &img_path).unwrap();

    let t = tempfile::tempdir().unwrap();
    let (inp, out) = (t.path().join("in.f32"), t.path().join("out.f32"));
    std::fs::write(
        &inp,
        prepared
            .chw
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let script = r#"
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.fromfile(sys.argv[2], dtype="<f4").reshape(1, 3, 224, 224)
y = s.run(["features"], {"input": x})[0]          # [1, C, 14, 14]
y[0].reshape(y.shape[1], -1).T.astype("<f4").tofile(sys.argv[3])   # positions × channels
"#;
    let st = Command::new(&python)
        .args(["-c", script])
        .arg(demo.join("efficientnet-lite0-ad.onnx"))
        .arg(&inp)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let want: Vec<f32> = std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(feats.levels.len(), 1);
    assert_eq!(feats.levels[0].len(), want.len());
    let err = max_rel_err(&feats.levels[0], &want);
    println!("demo backbone: tract vs onnxruntime max rel err {err:.3e}");
    assert!(err < 1e-4, "{err}");
}
