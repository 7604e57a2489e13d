//! The product loop through the `edge-ad` binary: demo, calibrate → inspect (JSON, heatmaps,
//! dumps), every bad input of the bank and calibration, and the magnetic-tile run with DINOv2-S.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Calibrate the demo model on `images` into `out`.
fn calibrate_demo(images: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = demo_model();
    let mut args = vec![
        "calibrate",
        "--model",
        s(&model),
        "--refs",
        "4",
        "--images",
        s(images),
        "--out",
        s(out),
    ];
    if extra.contains(&"--refs-list") {
        // The list says how many; --refs beside it is refused.
        args.drain(3..5);
    }
    args.extend_from_slice(extra);
    run(&args)
}

/// `inspect --json` over an MVTec-layout test folder: scores of `good/` and of the defect folders.
fn inspect_scores(model: &Path, bank: &Path, test: &Path) -> (Vec<f64>, Vec<f64>) {
    let out = ok(&[
        "inspect",
        "--model",
        s(model),
        "--bank",
        s(bank),
        "--threads",
        "2",
        "--json",
        s(test),
    ]);
    let (mut normal, mut defect) = (Vec::new(), Vec::new());
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let score = v["score"].as_f64().unwrap();
        if v["path"].as_str().unwrap().contains("/test/good/") {
            normal.push(score)
        } else {
            defect.push(score)
        }
    }
    (normal, defect)
}

#[test]
fn demo_runs_offline_and_every_verdict_matches_its_folder() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("d");
    let stdout = ok(&["demo", "--out", s(&out), "--threads", "2"]);
    assert!(stdout.contains("11 parts: 3 OK, 8 NG"), "{stdout}");
    assert!(stdout.contains("11/11 verdicts match"), "{stdout}");
    assert_eq!(std::fs::read_dir(out.join("heatmaps")).unwrap().count(), 11);
    assert!(out.join("demo-bank.eab").is_file());
}

#[test]
fn calibrate_then_inspect_json_heatmaps_and_dumps() {
    let t = tempfile::tempdir().unwrap();
    let bank = t.path().join("bank.eab");
    let o = calibrate_demo(&demo().join("images/good"), &bank, &[]);
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        summary.contains("references (4, aligned (seed 0): 4 of 8 per frame")
            && summary.contains("normal scores: 8 held out")
            && summary.contains("the threshold rests on 8")
            && summary.contains("threshold"),
        "{summary}"
    );

    let (heat, dump) = (t.path().join("heat"), t.path().join("dump"));
    let test = demo().join("images/test/scratch");
    let stdout = ok(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&bank),
        "--json",
        "--heatmap",
        s(&heat),
        "--dump",
        s(&dump),
        s(&test),
    ]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one JSON object per image");
    for l in &lines {
        assert_eq!(l["verdict"], "NG", "{l}");
        assert!(
            l["ms"].as_f64().unwrap() > 0.0
                && l["score"].as_f64().unwrap() > l["threshold"].as_f64().unwrap()
        );
        let stem = Path::new(l["path"].as_str().unwrap())
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // Heatmap in frame coordinates: the demo frames are 256×192.
        let png = image::open(heat.join(format!("{stem}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (256, 192));
        // Dump: map H×W f32 and the same score.
        let bytes = std::fs::read(dump.join(format!("{stem}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("map").unwrap().shape(), [224, 224]);
        let sc = f32::from_le_bytes(st.tensor("score").unwrap().data().try_into().unwrap());
        assert!((sc as f64 - l["score"].as_f64().unwrap()).abs() < 1e-6);
    }
    // Plain output: path, score, verdict, timings.
    let plain = ok(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&bank),
        s(&demo().join("images/test/good")),
    ]);
    assert_eq!(plain.lines().count(), 3);
    assert!(
        plain
            .lines()
            .all(|l| l.contains("  OK  ") && l.contains("backbone")),
        "{plain}"
    );
}

#[test]
fn empty_folder_and_too_few_images_are_refused_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), b"no images here").unwrap();
    let bank = t.path().join("bank.eab");
    let o = calibrate_demo(&empty, &bank, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("empty") && err.contains("no image files"),
        "{err}"
    );
    let few = t.path().join("few");
    std::fs::create_dir(&few).unwrap();
    for i in 0..4 {
        std::fs::copy(
            demo().join(format!("images/good/plate_0{i}.png")),
            few.join(format!("{i}.png")),
        )
        .unwrap();
    }
    let o = calibrate_demo(&few, &bank, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("4 normal images") && err.contains("4 references (--refs) plus at least one"),
        "{err}"
    );
    assert!(!bank.exists());
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        2,
        "nothing half-written"
    );
}

#[test]
fn duplicate_references_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let list = t.path().join("refs.txt");
    let g = demo().join("images/good");
    std::fs::write(
        &list,
        format!(
            "{}\n{}\n{}\n",
            g.join("plate_00.png").display(),
            g.join("plate_01.png").display(),
            g.join("plate_00.png").display()
        ),
    )
    .unwrap();
    let bank = t.path().join("bank.eab");
    let o = calibrate_demo(&g, &bank, &["--refs-list", s(&list)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("duplicate reference") && err.contains("plate_00.png"),
        "{err}"
    );
    assert!(!bank.exists());
}

#[test]
fn output_in_a_missing_folder_is_refused_before_work() {
    let t = tempfile::tempdir().unwrap();
    let bank = t.path().join("missing/bank.eab");
    let o = calibrate_demo(&demo().join("images/good"), &bank, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("missing") && err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
}

#[test]
fn mixed_image_sizes_are_fine() {
    let t = tempfile::tempdir().unwrap();
    let imgs = t.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..6 {
        let img = image::open(demo().join(format!("images/good/plate_0{i}.png"))).unwrap();
        let img = if i % 2 == 0 {
            img.resize_exact(300 + 10 * i, 170, image::imageops::FilterType::Triangle)
        } else {
            img
        };
        img.save(imgs.join(format!("{i}.png"))).unwrap();
    }
    let o = calibrate_demo(&imgs, &t.path().join("bank.eab"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn demo_bank(dir: &Path) -> PathBuf {
    let bank = dir.join("bank.eab");
    let o = calibrate_demo(&demo().join("images/good"), &bank, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    bank
}

#[test]
fn bank_from_another_backbone_or_description_is_refused_naming_which() {
    let t = tempfile::tempdir().unwrap();
    let bank = demo_bank(t.path());
    let img = demo().join("images/test/good/plate_00.png");
    // Another backbone: the same graph with one weight byte changed.
    let mut onnx = std::fs::read(demo().join("efficientnet-lite0-ad.onnx")).unwrap();
    let mid = onnx.len() / 2;
    onnx[mid] ^= 1;
    let other = t.path().join("other.onnx");
    std::fs::write(&other, &onnx).unwrap();
    let err = fails(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--onnx",
        s(&other),
        "--bank",
        s(&bank),
        s(&img),
    ]);
    assert!(
        err.contains("bank.eab") && err.contains("another backbone"),
        "{err}"
    );
    // Another model description (same backbone, other scoring).
    let text = std::fs::read_to_string(demo_model())
        .unwrap()
        .replace("sigma = 4.0", "sigma = 2.0");
    let desc = t.path().join("m.toml");
    std::fs::write(
        &desc,
        text.replace(
            "onnx = \"efficientnet-lite0-ad.onnx\"",
            &format!("onnx = {:?}", s(&demo().join("efficientnet-lite0-ad.onnx"))),
        ),
    )
    .unwrap();
    let err = fails(&["inspect", "--model", s(&desc), "--bank", s(&bank), s(&img)]);
    assert!(err.contains("another model description"), "{err}");
    // Another fit than calibration used.
    let err = fails(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--fit",
        "pad",
        "--bank",
        s(&bank),
        s(&img),
    ]);
    assert!(
        err.contains("--fit pad") && err.contains("stretch"),
        "{err}"
    );
}

#[test]
fn truncated_or_corrupted_bank_is_detected() {
    let t = tempfile::tempdir().unwrap();
    let bank = demo_bank(t.path());
    let img = demo().join("images/test/good/plate_00.png");
    let bytes = std::fs::read(&bank).unwrap();
    let cut = t.path().join("cut.eab");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = fails(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&cut),
        s(&img),
    ]);
    assert!(
        err.contains("cut.eab") && err.contains("truncated"),
        "{err}"
    );
    let mut bad = bytes.clone();
    let at = bytes.len() - 1000;
    bad[at] ^= 0x40;
    let flipped = t.path().join("flipped.eab");
    std::fs::write(&flipped, &bad).unwrap();
    let err = fails(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&flipped),
        s(&img),
    ]);
    assert!(
        err.contains("flipped.eab") && err.contains("checksum mismatch"),
        "{err}"
    );
    let err = fails(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&demo_model()),
        s(&img),
    ]);
    assert!(err.contains("not an edge-ad bank"), "{err}");
}

#[test]
fn unreadable_image_in_inspect_is_err_and_the_rest_still_run() {
    let t = tempfile::tempdir().unwrap();
    let bank = demo_bank(t.path());
    let d = t.path().join("imgs");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(
        demo().join("images/test/good/plate_00.png"),
        d.join("a.png"),
    )
    .unwrap();
    std::fs::write(d.join("b.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let out = run(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&bank),
        "--json",
        s(&d),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["verdict"], "OK");
    assert_eq!(lines[1]["verdict"], "ERR");
    assert!(lines[1]["error"].as_str().unwrap().contains("b.png"));
}

/// Issue "first product loop", done-when: calibrate + inspect on the magnetic-tile set with
/// The calibration defaults (DINOv2-S description: tiles, levels 2,3; aligned references; the 2 %
/// conformal threshold) on the whole magnetic-tile test set: issue 14's goals are image AUROC
/// ≥ 0.90 (measured 0.921) and at most 1 of the 34 test goods rejected at the threshold calibrate
/// sets (measured 0); its escape goal (≤ 12 of 36) is not reached yet and is printed, not
/// asserted. Also checks the calibration report next to the bank.
#[test]
fn magnetic_tile_defaults_reach_the_auroc_goal_with_dinov2() {
    let Some(shared) = magnetic_tile() else {
        return;
    };
    if !dinov2_present() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bank = t.path().join("mt.eab");
    let model = root().join("models/dinov2-s.toml");
    ok(&[
        "calibrate",
        "--model",
        s(&model),
        "--refs",
        "8",
        "--threads",
        "2",
        "--images",
        s(&shared.join("train/good")),
        "--out",
        s(&bank),
    ]);
    let report = t.path().join("mt.eab.report");
    for f in [
        "summary.txt",
        "histogram.png",
        "references.png",
        "normal-1.png",
    ] {
        assert!(report.join(f).is_file(), "report file {f} missing");
    }
    let summary = std::fs::read_to_string(report.join("summary.txt")).unwrap();
    assert!(
        summary.contains("fit tile")
            && summary.contains("levels [2, 3]")
            && summary.contains("aligned (seed 0): 8 of 60 per frame"),
        "{summary}"
    );
    let header = edge_ad_calibration::BankFile::load(&bank).unwrap().header;
    assert_eq!(header.scored_levels(), vec![2, 3]);
    // 60 pool images, all held out (the references redrawn); the default 2 % budget with its
    // guarantee: the ⌈61 × 0.98⌉ = 60th smallest, stated rate 1/61.
    assert_eq!(header.threshold.normal_count, 60);
    assert_eq!(
        header.threshold.rule,
        edge_ad_calibration::ThresholdRule::Conformal { reject_rate: 0.02 }
    );
    assert!((header.threshold.expected_false_reject.unwrap() - 1.0 / 61.0).abs() < 1e-12);
    let (normal, defect) = inspect_scores(&model, &bank, &shared.join("test"));
    assert_eq!((normal.len(), defect.len()), (34, 36));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let auroc = edge_ad_calibration::metrics::auroc(&normal, &defect).unwrap();
    let th = &header.threshold;
    let false_rejects = normal.iter().filter(|&&x| th.rejects(x)).count();
    let escapes = defect.iter().filter(|&&x| !th.rejects(x)).count();
    println!(
        "magnetic tile, DINOv2-S, defaults (8 aligned refs, tiles, levels 2,3, conformal 2 %): mean normal {:.4}, mean defective {:.4}, image AUROC {auroc:.4}, threshold {:.4}: {false_rejects}/34 false rejects, {escapes}/36 escapes",
        mean(&normal),
        mean(&defect),
        th.value
    );
    assert!(mean(&defect) > mean(&normal));
    assert!(auroc >= 0.90, "image AUROC {auroc} below the 0.90 goal");
    assert!(
        false_rejects <= 1,
        "{false_rejects} of 34 good parts rejected"
    );
}

#[test]
fn region_of_interest_limits_inspection_and_heatmap_to_it() {
    let t = tempfile::tempdir().unwrap();
    let onnx = demo().join("efficientnet-lite0-ad.onnx");
    let text = std::fs::read_to_string(demo_model())
        .unwrap()
        .replace(
            "onnx = \"efficientnet-lite0-ad.onnx\"",
            &format!("onnx = {:?}", s(&onnx)),
        )
        .replace(
            "fit = \"stretch\"",
            "fit = \"stretch\"\nroi = [0, 0, 128, 192]",
        );
    let model = t.path().join("roi.toml");
    std::fs::write(&model, text).unwrap();
    let bank = t.path().join("roi.eab");
    ok(&[
        "calibrate",
        "--model",
        s(&model),
        "--refs",
        "4",
        "--images",
        s(&demo().join("images/good")),
        "--out",
        s(&bank),
    ]);
    let heat = t.path().join("heat");
    let img = demo().join("images/test/good/plate_00.png");
    ok(&[
        "inspect",
        "--model",
        s(&model),
        "--bank",
        s(&bank),
        "--heatmap",
        s(&heat),
        s(&img),
    ]);
    let frame = image::open(&img).unwrap().to_rgb8();
    let hm = image::open(heat.join("plate_00.png")).unwrap().to_rgb8();
    assert_eq!(hm.dimensions(), (256, 192));
    // Right of the ROI: the frame darkened to a third; inside: blended with the colour map.
    let (f, h) = (frame.get_pixel(200, 100), hm.get_pixel(200, 100));
    assert_eq!(h[0], f[0] / 3);
    let (f, h) = (frame.get_pixel(60, 150), hm.get_pixel(60, 150));
    assert_ne!(h[0], f[0] / 3);
    // An ROI outside the frame is a clear error naming the field.
    let bad = std::fs::read_to_string(&model)
        .unwrap()
        .replace("roi = [0, 0, 128, 192]", "roi = [200, 0, 128, 192]");
    std::fs::write(&model, bad).unwrap();
    let err = fails(&[
        "calibrate",
        "--model",
        s(&model),
        "--refs",
        "4",
        "--images",
        s(&demo().join("images/good")),
        "--out",
        s(&t.path().join("b2.eab")),
    ]);
    assert!(
        err.contains("input.roi") && err.contains("256×192"),
        "{err}"
    );
}

/// Bad calibration options: each named, exit 2, nothing written.
#[test]
fn bad_levels_selection_rule_and_defects_are_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let good = root().join("demo/images/good");
    let out = t.path().join("b.eab");
    for (extra, needle) in [
        (vec!["--levels", "2"], "level 2 does not exist"),
        (vec!["--levels", "1,x"], "`x`"),
        (vec!["--select", "best"], "best"),
        (vec!["--rule", "max*x"], "`x`"),
        (vec!["--rule", "quantile:1.5"], "1.5"),
    ] {
        let o = calibrate_demo(&good, &out, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote a bank");
    }
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = calibrate_demo(&good, &out, &["--defects", s(&empty)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--defects") && err.contains("empty"), "{err}");
    assert!(!out.exists());
}

/// Known-bad parts place the threshold between the classes; the bank records it and the report
/// shows both classes. Reference selection modes are recorded and reproducible.
#[test]
fn defects_threshold_selection_modes_and_report() {
    let t = tempfile::tempdir().unwrap();
    let good = root().join("demo/images/good");
    let defects = root().join("demo/images/test/scratch");
    let out = t.path().join("d.eab");
    let o = calibrate_demo(&good, &out, &["--defects", s(&defects)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let h = edge_ad_calibration::BankFile::load(&out).unwrap().header;
    let th = &h.threshold;
    let d = th.defects.as_ref().expect("defect statistics in the bank");
    assert_eq!(d.count, 2);
    // Separated classes: the threshold lies midway between the highest normal and lowest defect.
    assert!(d.gap > 0.0, "demo scratches overlap the normals: {d:?}");
    assert!((th.value - 0.5 * (th.normal_max + d.min)).abs() < 1e-9);
    assert_eq!((d.false_rejects, d.misses), (0, 0));
    // The default selection: aligned (the demo pool's features are far below the budget).
    assert!(
        h.selection.starts_with("aligned (seed 0): 4 of 8"),
        "{}",
        h.selection
    );
    let summary = std::fs::read_to_string(t.path().join("d.eab.report/summary.txt")).unwrap();
    assert!(summary.contains("defect scores (2 images)"), "{summary}");
    let png = image::open(t.path().join("d.eab.report/histogram.png")).unwrap();
    assert_eq!((png.width(), png.height()), (640, 320));
    let sheet = image::open(t.path().join("d.eab.report/references.png")).unwrap();
    assert!(
        sheet.width() > 4 * 160,
        "contact sheet of 4 references: {}",
        sheet.width()
    );

    // first / random: recorded; random with the same seed gives the same references.
    let refs_of = |sel: &str, seed: &str, name: &str| {
        let p = t.path().join(name);
        let o = calibrate_demo(&good, &p, &["--select", sel, "--seed", seed]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        edge_ad_calibration::BankFile::load(&p).unwrap().header
    };
    let first = refs_of("first", "0", "f.eab");
    assert_eq!(first.selection, "first 4 of 8");
    assert_eq!(first.references[0], "plate_00.png");
    let (r1, r2) = (
        refs_of("random", "5", "r1.eab"),
        refs_of("random", "5", "r2.eab"),
    );
    assert_eq!(r1.references, r2.references);
    assert!(r1.selection.starts_with("random (seed 5)"));
    // All 8 pool images are held-out scores (4 references redrawn: scored against the first 4
    // of the other 7).
    assert_eq!(first.threshold.normal_count, 8);
}

/// `eval` scores exactly what calibrate + inspect score: its image AUROC for (stretch, first, all
/// levels) equals the AUROC of `inspect`'s scores with a bank calibrated the same way.
#[test]
fn eval_agrees_with_calibrate_and_inspect_on_magnetic_tile() {
    let Some(shared) = magnetic_tile() else {
        return;
    };
    let model = demo_model();
    let stdout = ok(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&shared),
        "--refs",
        "8",
        "--fit",
        "stretch,tile",
        "--select",
        "first,kmeans",
        "--levels",
        "all",
        "--threads",
        "2",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let o = &r["overall"];
        println!(
            "eval demo backbone {} {}: image AUROC {:.4} pixel AUROC {:.4} AUPRO {:.4} F1 {:.4}",
            r["fit"],
            r["selection"],
            o["image_auroc"],
            o["pixel_auroc"],
            o["aupro"],
            o["image_f1_max"]
        );
        for k in ["image_auroc", "pixel_auroc", "aupro", "image_f1_max"] {
            let v = o[k].as_f64().unwrap();
            assert!(v > 0.3 && v <= 1.0, "{k} = {v}");
        }
        assert_eq!(
            (o["good"].as_u64(), o["defective"].as_u64()),
            (Some(34), Some(36))
        );
        assert_eq!(r["per_type"].as_array().unwrap().len(), 5);
    }
    let t = tempfile::tempdir().unwrap();
    let bank = t.path().join("mt.eab");
    ok(&[
        "calibrate",
        "--model",
        s(&model),
        "--fit",
        "stretch",
        "--select",
        "first",
        "--levels",
        "all",
        "--refs",
        "8",
        "--threads",
        "2",
        "--images",
        s(&shared.join("train/good")),
        "--out",
        s(&bank),
    ]);
    let (normal, defect) = inspect_scores(&model, &bank, &shared.join("test"));
    let auroc = edge_ad_calibration::metrics::auroc(&normal, &defect).unwrap();
    let row = rows
        .iter()
        .find(|r| r["fit"] == "stretch" && r["selection"] == "first")
        .unwrap();
    let e = row["overall"]["image_auroc"].as_f64().unwrap();
    assert!((auroc - e).abs() < 1e-12, "inspect {auroc} vs eval {e}");
    // The operating point: eval's threshold is calibrate's (same held-out scores, same default
    // rule), and its false rejects and escapes are what inspect's verdicts give at it.
    let header = edge_ad_calibration::BankFile::load(&bank).unwrap().header;
    let op = &row["operating"];
    assert_eq!(op["rule"], "conformal:0.02");
    assert_eq!(op["held_out"].as_u64(), Some(60));
    let cal = &op["calibrated"];
    let th = cal["threshold"].as_f64().unwrap();
    assert!(
        (th - header.threshold.value).abs() < 1e-9,
        "eval threshold {th} vs calibrate {}",
        header.threshold.value
    );
    let fr = normal
        .iter()
        .filter(|&&x| header.threshold.rejects(x))
        .count();
    let esc = defect
        .iter()
        .filter(|&&x| !header.threshold.rejects(x))
        .count();
    assert_eq!(
        (cal["false_rejects"].as_u64(), cal["escapes"].as_u64()),
        (Some(fr as u64), Some(esc as u64))
    );
    assert_eq!(
        (cal["good"].as_u64(), cal["defective"].as_u64()),
        (Some(34), Some(36))
    );
    // The oracle points: at most ⌊0.34⌋ = 0 and ⌊1.7⌋ = 1 of the 34 goods rejected.
    for (key, allowed) in [("at_1pct_false_rejects", 0), ("at_5pct_false_rejects", 1)] {
        let p = &op[key];
        let t = p["threshold"].as_f64().unwrap();
        let fr = normal.iter().filter(|&&x| x > t).count();
        let esc = defect.iter().filter(|&&x| x <= t).count();
        assert!(fr <= allowed, "{key}: {fr} false rejects");
        assert_eq!(
            (p["false_rejects"].as_u64(), p["escapes"].as_u64()),
            (Some(fr as u64), Some(esc as u64)),
            "{key}"
        );
    }
}

/// `--select aligned`: the bank keeps the whole pool (f16) with the alignment index; every frame
/// gets its own references at inspection, timed as `align_ms`; every pool image is scored against
/// references that exclude it.
#[test]
fn aligned_references_are_chosen_per_frame() {
    let t = tempfile::tempdir().unwrap();
    let good = root().join("demo/images/good");
    let bank = t.path().join("a.eab");
    let o = calibrate_demo(&good, &bank, &["--select", "aligned"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = edge_ad_calibration::BankFile::load(&bank).unwrap();
    let h = &file.header;
    let pool = h.aligned.as_ref().expect("aligned pool in the header");
    assert_eq!((pool.k, pool.images.len(), pool.windows.len()), (4, 8, 8));
    assert_eq!(pool.index.histograms.len(), 8);
    assert_eq!(pool.index.bins(), 125);
    // The level data is the whole pool: 8 images × 1 window × 196 positions.
    assert_eq!(h.levels[0].rows, 8 * 196);
    assert_eq!(h.threshold.normal_count, 8);
    assert!(h.selection.starts_with("aligned"), "{}", h.selection);
    let out = ok(&[
        "inspect",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&bank),
        "--json",
        s(&root().join("demo/images/test")),
    ]);
    let mut right = 0;
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["timings"]["align_ms"].as_f64().unwrap() > 0.0);
        let good_part = v["path"].as_str().unwrap().contains("/good/");
        right += usize::from((v["verdict"] == "OK") == good_part);
    }
    println!("aligned demo: {right}/11 verdicts match their folders");
    assert!(right >= 10, "{right}/11");
    let o = calibrate_demo(
        &good,
        &t.path().join("b.eab"),
        &["--select", "aligned", "--bank-dtype", "f32"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("f16"));
    // Without --select, f32 asks for what aligned pools cannot hold: k-means, said so.
    let f32_bank = t.path().join("c.eab");
    let o = calibrate_demo(&good, &f32_bank, &["--bank-dtype", "f32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.contains("kmeans (seed 0) 4 of 8")
            && summary.contains("note: --bank-dtype f32: k-means references"),
        "{summary}"
    );
    let h = edge_ad_calibration::BankFile::load(&f32_bank)
        .unwrap()
        .header;
    assert!(h.aligned.is_none() && h.selection.starts_with("kmeans"));
}

/// `bench --bank`: a calibrated bank timed the way the line inspects — the default (aligned)
/// bank's per-frame reference choice is timed as `align`, the stages add up to the frame, and the
/// bank file's size and the peak memory are reported.
#[test]
fn bench_times_a_calibrated_bank_with_its_reference_choice() {
    let t = tempfile::tempdir().unwrap();
    let bank = demo_bank(t.path());
    let out = ok(&[
        "bench",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&bank),
        "--images",
        s(&demo().join("images/test")),
        "--frames",
        "20",
        "--warmup",
        "1",
        "--threads",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    println!("bench --bank (demo): {v}");
    assert!(v["selection"]
        .as_str()
        .unwrap()
        .starts_with("aligned (seed 0): 4 of 8"));
    assert_eq!(v["frames"].as_u64(), Some(20));
    assert_eq!(
        v["bank_bytes"].as_u64(),
        Some(std::fs::metadata(&bank).unwrap().len())
    );
    let ms = |k: &str| v[k].as_f64().unwrap();
    assert!(ms("align_ms") > 0.0 && ms("backbone_ms") > 0.0 && ms("residual_ms") > 0.0);
    // Medians of the stages need not add up exactly; each stays below the frame's.
    for k in ["backbone_ms", "align_ms", "residual_ms", "score_ms"] {
        assert!(
            ms(k) < ms("total_ms"),
            "{k} {} ≥ total {}",
            ms(k),
            ms("total_ms")
        );
    }
    assert!(ms("peak_rss_mb") > 1.0, "{v}");
    // --bank with --refs is a contradiction, refused by name.
    let err = fails(&[
        "bench",
        "--model",
        s(&demo_model()),
        "--bank",
        s(&bank),
        "--refs",
        "4",
        "--images",
        s(&demo().join("images/test")),
    ]);
    assert!(err.contains("--refs"), "{err}");
}
