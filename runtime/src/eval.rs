//! `edge-ad eval`: the field's metrics on an MVTec-layout data set, for any number of framings,
//! reference selections and level sets in one run (backbone features are computed once per
//! framing and reused by every bank).
//!
//! Layout: `train/good/` (the reference pool), `test/<type>/` (`good` plus defect types),
//! `ground_truth/<type>/<stem>_mask.png` (non-zero = defect) for every defect image.
//! Metrics (see [`edge_ad_calibration::metrics`]): image AUROC, pixel AUROC, AUPRO up to FPR 0.3,
//! image F1-max; per defect type (that type against `test/good`) and overall. Deterministic.
//!
//! AUROC ranks; a line acts on the verdict. Every combination also gets its operating points
//! (issue 14 §4, docs/calibration.md §4): the false rejects and escapes on the test set at the
//! threshold calibrate would set with that combination (from `train/good` only, the same
//! held-out scores and rule), and — as an oracle of what the ranking allows — the escapes when
//! at most 1 % and 5 % of the test goods may be rejected.

use crate::aligned::{self, cell_features};
use crate::error::{Error, Result};
use crate::images::list_images;
use crate::inspector::{
    check_aligned_dtype, choose_levels, pool_scores, pool_threshold, CalibrateOptions, FeatureSet,
    Inspector, LevelChoice, Scorer,
};
use crate::model::{check_levels, Fit};
use crate::pipeline::{FrameFeatures, Pipeline, PipelineOptions};
use crate::preprocess::Rgb8;
use edge_ad_calibration::aligned::AlignmentIndex;
use edge_ad_calibration::metrics;
use edge_ad_calibration::metrics::{aupro, auroc_pairs, f1_max, OperatingPoint, PixelCase};
use edge_ad_calibration::{Selection, ThresholdRule};
use edge_ad_kernels::BankDtype;
use std::path::{Path, PathBuf};

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Data set root (MVTec layout).
    pub data: PathBuf,
    /// References per bank.
    pub refs: usize,
    /// Framings to compare.
    pub fits: Vec<Fit>,
    /// Reference selections to compare.
    pub selections: Vec<Selection>,
    /// Level sets to compare (`Model`, `All`, `Given`, `Auto`).
    pub levels: Vec<LevelChoice>,
    /// Seed of random / k-means selection and synthetic defects.
    pub seed: u64,
    /// Bank precision.
    pub bank_dtype: BankDtype,
    /// The threshold rule of the operating point (`None`: calibrate's default).
    pub rule: Option<ThresholdRule>,
}

/// The verdicts a line would give with one combination (issue 14 §4), on the whole test set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OperatingPoints {
    /// The threshold rule applied, as `--rule` writes it (`conformal:0.02`).
    pub rule: String,
    /// Held-out good scores of `train/good` the threshold rests on.
    pub held_out: usize,
    /// The false-reject rate the rule states for a new good part (conformal rules).
    pub expected_false_reject: Option<f64>,
    /// Why the default rule fell back to the largest held-out score (a pool too small).
    pub note: Option<String>,
    /// At the threshold calibrate would set; `None` when the rule cannot be applied (`error`).
    pub calibrated: Option<OperatingPoint>,
    /// Why the rule could not be applied (a pool too small for an asked-for budget).
    pub error: Option<String>,
    /// The oracle: at most 1 % of the test goods rejected (threshold read off the test goods).
    pub at_1pct_false_rejects: Option<OperatingPoint>,
    /// The oracle at 5 %.
    pub at_5pct_false_rejects: Option<OperatingPoint>,
}

/// Metrics of one subset of the test set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// Good test images.
    pub good: usize,
    /// Defective test images.
    pub defective: usize,
    /// Image-level AUROC.
    pub image_auroc: f64,
    /// Pixel-level AUROC.
    pub pixel_auroc: f64,
    /// Area under the PRO curve up to FPR 0.3, normalised.
    pub aupro: f64,
    /// Best image-level F1 over all thresholds.
    pub image_f1_max: f64,
}

/// One evaluated combination.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRow {
    /// Framing.
    pub fit: String,
    /// Reference selection.
    pub selection: String,
    /// Levels scored, 1-based.
    pub levels: Vec<usize>,
    /// How the levels were chosen (for `auto`, the criterion's result).
    pub level_choice: String,
    /// References used (relative to `train/good`); empty for aligned (chosen per frame).
    pub references: Vec<String>,
    /// Backbone passes per test frame, mean.
    pub tiles_per_frame: f64,
    /// All defect types together against the good images.
    pub overall: Metrics,
    /// Per defect type, sorted by name.
    pub per_type: Vec<(String, Metrics)>,
    /// False rejects and escapes at calibrate's threshold and at 1 % / 5 % false rejects.
    pub operating: OperatingPoints,
}

/// A test image with its ground truth.
#[derive(Debug, Clone)]
struct TestImage {
    /// Defect type; `None` for good.
    kind: Option<String>,
    width: usize,
    height: usize,
    mask: Vec<bool>,
}

fn load_test_set(data: &Path) -> Result<(Vec<PathBuf>, Vec<TestImage>)> {
    let test = data.join("test");
    let mut types: Vec<PathBuf> = std::fs::read_dir(&test)
        .map_err(|e| Error::io(&test, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    types.sort();
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    if !types.iter().any(|t| name(t) == "good") {
        return Err(Error::Invalid(format!(
            "{}: no good/ folder (MVTec layout: test/good and test/<defect type>)",
            test.display()
        )));
    }
    if types.len() < 2 {
        return Err(Error::Invalid(format!(
            "{}: no defect type folder beside good/",
            test.display()
        )));
    }
    let mut paths = Vec::new();
    let mut out = Vec::new();
    for t in &types {
        let kind = name(t);
        for p in list_images(t)? {
            let (w, h) = image::image_dimensions(&p).map_err(|e| Error::Image {
                path: p.clone(),
                message: format!("cannot read the image size: {e}"),
            })?;
            let (w, h) = (w as usize, h as usize);
            let mask = if kind == "good" {
                vec![false; w * h]
            } else {
                let stem = p.file_stem().unwrap_or_default().to_string_lossy();
                let mp = data
                    .join("ground_truth")
                    .join(&kind)
                    .join(format!("{stem}_mask.png"));
                let m = image::open(&mp)
                    .map_err(|e| Error::Image {
                        path: mp.clone(),
                        message: format!("ground-truth mask of {}: {e}", p.display()),
                    })?
                    .to_luma8();
                if (m.width() as usize, m.height() as usize) != (w, h) {
                    return Err(Error::Image {
                        path: mp,
                        message: format!(
                            "mask is {}×{}, its image {} is {w}×{h}",
                            m.width(),
                            m.height(),
                            p.display()
                        ),
                    });
                }
                m.into_raw().into_iter().map(|v| v > 0).collect()
            };
            paths.push(p);
            out.push(TestImage {
                kind: (kind != "good").then(|| kind.clone()),
                width: w,
                height: h,
                mask,
            });
        }
    }
    if !out.iter().any(|t| t.kind.is_none()) {
        return Err(Error::Invalid(format!(
            "{}: no good test images (the false rejects and every AUROC need some)",
            test.join("good").display()
        )));
    }
    Ok((paths, out))
}

fn metrics_of(images: &[&TestImage], scores: &[f32], maps: &[&Vec<f32>]) -> Metrics {
    let mut img_pairs: Vec<(f32, bool)> = images
        .iter()
        .zip(scores)
        .map(|(t, &s)| (s, t.kind.is_some()))
        .collect();
    let image_auroc = auroc_pairs(&mut img_pairs).unwrap_or(f64::NAN);
    let image_f1_max = f1_max(&mut img_pairs).map_or(f64::NAN, |f| f.0);
    let mut px: Vec<(f32, bool)> = Vec::new();
    for (t, m) in images.iter().zip(maps) {
        px.extend(m.iter().copied().zip(t.mask.iter().copied()));
    }
    let pixel_auroc = auroc_pairs(&mut px).unwrap_or(f64::NAN);
    drop(px);
    let cases: Vec<PixelCase> = images
        .iter()
        .zip(maps)
        .map(|(t, m)| PixelCase {
            map: m,
            mask: &t.mask,
            width: t.width,
            height: t.height,
        })
        .collect();
    Metrics {
        good: images.iter().filter(|t| t.kind.is_none()).count(),
        defective: images.iter().filter(|t| t.kind.is_some()).count(),
        image_auroc,
        pixel_auroc,
        aupro: aupro(&cases, 0.3).unwrap_or(f64::NAN),
        image_f1_max,
    }
}

/// Run every combination of `eo`; `progress(stage, done, total)` for the long stages and
/// `row(&EvalRow)` as each combination finishes.
pub fn evaluate(
    base: &PipelineOptions,
    eo: &EvalOptions,
    mut progress: impl FnMut(&str, usize, usize),
    mut row: impl FnMut(&EvalRow),
) -> Result<Vec<EvalRow>> {
    let train = eo.data.join("train").join("good");
    let pool_paths = list_images(&train)?;
    if pool_paths.len() < eo.refs + 1 {
        return Err(Error::Invalid(format!(
            "{}: {} images, --refs {} needs at least {}",
            train.display(),
            pool_paths.len(),
            eo.refs,
            eo.refs + 1
        )));
    }
    if eo.refs == 0 {
        return Err(Error::Invalid("--refs 0: a bank needs references".into()));
    }
    if eo.selections.contains(&Selection::Aligned) {
        check_aligned_dtype(eo.bank_dtype)?;
    }
    let (test_paths, test) = load_test_set(&eo.data)?;
    let mut rows = Vec::new();
    for &fit in &eo.fits {
        let mut pipeline = Pipeline::load(&PipelineOptions {
            fit: Some(fit),
            ..base.clone()
        })?;
        let ntaps = pipeline.description().desc.taps.len();
        for l in &eo.levels {
            if let LevelChoice::Given(g) = l {
                check_levels(g, ntaps).map_err(|e| Error::Invalid(format!("--levels: {e}")))?;
            }
        }
        let channels = pipeline.description().desc.features.channels;
        let pool = FeatureSet::extract(&mut pipeline, pool_paths.clone(), |i, n| {
            progress(&format!("{fit}: train features"), i, n)
        })?;
        let tests = FeatureSet::extract(&mut pipeline, test_paths.clone(), |i, n| {
            progress(&format!("{fit}: test features"), i, n)
        })?;
        let tiles_per_frame = tests.frames.iter().map(|f| f.tiles.len()).sum::<usize>() as f64
            / tests.frames.len().max(1) as f64;
        for &sel in &eo.selections {
            let refs = pool.select(eo.refs, sel, eo.seed, channels);
            let ref_frames: Vec<&FrameFeatures> = refs.iter().map(|&i| &pool.frames[i]).collect();
            let all: Vec<usize> = (0..ntaps).collect();
            let full = pipeline.bank_from_frames(&ref_frames, eo.bank_dtype, &all)?;
            // Aligned: a bank per test frame from the pool images nearest it (spec §7.1).
            let index = (sel == Selection::Aligned).then(|| {
                let desc = &pipeline.description().desc;
                let cells: Vec<_> = pool
                    .frames
                    .iter()
                    .map(|f| cell_features(desc, f, 0, aligned::GRID))
                    .collect();
                AlignmentIndex::build(&cells, aligned::GRID, aligned::CLUSTERS, channels, eo.seed)
            });
            for choice in &eo.levels {
                let (taps, why) = match choice {
                    LevelChoice::Model => (
                        pipeline.description().desc.default_levels(),
                        "model".to_string(),
                    ),
                    LevelChoice::All => (all.clone(), "all".to_string()),
                    LevelChoice::Given(g) => {
                        (g.iter().map(|l| l - 1).collect(), "given".to_string())
                    }
                    LevelChoice::Auto => {
                        let (t, why, _) = choose_levels(
                            &mut pipeline,
                            &pool,
                            &refs,
                            None,
                            eo.seed,
                            eo.bank_dtype,
                            &mut progress,
                        )?;
                        (t, why)
                    }
                };
                // Scored as calibrate and the line score (one code path).
                let scorer = match &index {
                    None => Scorer::Fixed(full.select(&taps)?),
                    Some(index) => Scorer::Aligned {
                        index: index.clone(),
                        pool: &pool,
                        k: eo.refs,
                        taps: taps.clone(),
                    },
                };
                let desc = pipeline.description().desc.clone();
                let mut scores = Vec::with_capacity(test.len());
                let mut maps = Vec::with_capacity(test.len());
                for (i, (f, t)) in tests.frames.iter().zip(&test).enumerate() {
                    progress("scoring test images", i, test.len());
                    let (insp, _) = scorer.score(&mut pipeline, &desc, f, None)?;
                    scores.push(insp.score);
                    maps.push(insp.frame_map(t.width, t.height));
                }
                progress("scoring test images", test.len(), test.len());
                progress("scoring the pool as calibrate", 0, 1);
                let held = pool_scores(
                    &mut pipeline,
                    &pool,
                    &scorer,
                    &refs,
                    Some((sel, eo.seed)),
                    eo.bank_dtype,
                )?;
                progress("scoring the pool as calibrate", 1, 1);
                let operating = operating_points(&held, eo.rule, &test, &scores);
                let pick = |keep: &dyn Fn(&TestImage) -> bool| {
                    let idx: Vec<usize> = (0..test.len()).filter(|&i| keep(&test[i])).collect();
                    let imgs: Vec<&TestImage> = idx.iter().map(|&i| &test[i]).collect();
                    let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
                    let m: Vec<&Vec<f32>> = idx.iter().map(|&i| &maps[i]).collect();
                    metrics_of(&imgs, &s, &m)
                };
                let overall = pick(&|_| true);
                let mut kinds: Vec<String> = test.iter().filter_map(|t| t.kind.clone()).collect();
                kinds.sort();
                kinds.dedup();
                let per_type = kinds
                    .iter()
                    .map(|k| {
                        (
                            k.clone(),
                            pick(&|t: &TestImage| t.kind.is_none() || t.kind.as_ref() == Some(k)),
                        )
                    })
                    .collect();
                let r = EvalRow {
                    fit: fit.to_string(),
                    selection: sel.to_string(),
                    levels: taps.iter().map(|t| t + 1).collect(),
                    level_choice: why,
                    // Aligned references are chosen per frame: no one list to show.
                    references: refs
                        .iter()
                        .filter(|_| sel != Selection::Aligned)
                        .map(|&i| {
                            pool.paths[i]
                                .strip_prefix(&train)
                                .unwrap_or(&pool.paths[i])
                                .to_string_lossy()
                                .into_owned()
                        })
                        .collect(),
                    tiles_per_frame,
                    overall,
                    per_type,
                    operating,
                };
                row(&r);
                rows.push(r);
            }
        }
    }
    Ok(rows)
}

/// The operating points of one combination: the threshold from the pool's held-out scores by
/// `rule`, applied to the test scores; and the oracle points at 1 % and 5 % false rejects.
fn operating_points(
    held: &[(usize, crate::pipeline::Inspection, bool)],
    rule: Option<ThresholdRule>,
    test: &[TestImage],
    scores: &[f32],
) -> OperatingPoints {
    let split = |defective: bool| -> Vec<f64> {
        test.iter()
            .zip(scores)
            .filter(|(t, _)| t.kind.is_some() == defective)
            .map(|(_, &s)| s as f64)
            .collect()
    };
    let (good, bad) = (split(false), split(true));
    let mut op = OperatingPoints {
        rule: rule.map_or_else(|| ThresholdRule::default().to_string(), |r| r.to_string()),
        held_out: held.iter().filter(|h| !h.2).count(),
        expected_false_reject: None,
        note: None,
        calibrated: None,
        error: None,
        at_1pct_false_rejects: OperatingPoint::at_false_reject_rate(0.01, &good, &bad),
        at_5pct_false_rejects: OperatingPoint::at_false_reject_rate(0.05, &good, &bad),
    };
    match pool_threshold(held, &[], rule) {
        Ok((t, note, normal)) => {
            op.rule = t.rule.to_string();
            op.held_out = normal.len();
            op.expected_false_reject = t.expected_false_reject;
            op.note = note;
            op.calibrated = Some(OperatingPoint::at(t.value, &good, &bad));
        }
        Err(e) => op.error = Some(e),
    }
    op
}

/// One product's row of [`products`]: the separate bank (the product known, as a line with a
/// PLC-selected product) against the bank set (the product recognised from the frame).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProductRow {
    /// The product's name.
    pub product: String,
    /// Test images: good, defective.
    pub good: usize,
    /// Defective test images.
    pub defective: usize,
    /// Test images recognised as this product.
    pub recognised: usize,
    /// Test images recognised as another product (their scores come from its bank).
    pub confused: usize,
    /// Test images recognised as no product (rejected on the line).
    pub unrecognised: usize,
    /// Image AUROC with the product's own bank.
    pub auroc_separate: Option<f64>,
    /// Image AUROC through recognition (score ÷ threshold of the bank used; unrecognised =
    /// rejected).
    pub auroc_unified: Option<f64>,
    /// (false rejects, escapes) at calibrate's threshold, own bank.
    pub verdicts_separate: (usize, usize),
    /// (false rejects, escapes) through recognition.
    pub verdicts_unified: (usize, usize),
}

/// `edge-ad eval --product NAME=DATA …`: calibrate each product from its good parts (DATA's
/// `train/good`, or `good/`), as `calibrate --product` does, then inspect every test image of
/// every product (DATA's `test/<type>`, `good` = normal) twice: with its own bank, and through
/// recognition among all of them. `opts.images` is ignored.
pub fn products(
    mut pipeline: Pipeline,
    data: &[(String, PathBuf)],
    opts: &CalibrateOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Vec<ProductRow>> {
    let mut banks = Vec::with_capacity(data.len());
    let mut tests = Vec::with_capacity(data.len());
    for (name, root) in data {
        let pool = [root.join("train/good"), root.join("good")]
            .into_iter()
            .find(|p| p.is_dir())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "product {name}: {} has neither train/good nor good/",
                    root.display()
                ))
            })?;
        let test_dir = root.join("test");
        let listed = list_images(&test_dir)?;
        if listed.is_empty() {
            return Err(Error::Invalid(format!(
                "product {name}: no test images under {}",
                test_dir.display()
            )));
        }
        let o = CalibrateOptions {
            images: pool,
            ..opts.clone()
        };
        let (file, _) = crate::inspector::calibrate(&mut pipeline, &o, &mut progress)
            .map_err(|e| Error::Invalid(format!("product {name}: {e}")))?;
        banks.push(file);
        let labelled: Vec<(PathBuf, bool)> = listed
            .into_iter()
            .map(|p| {
                let defective = p
                    .strip_prefix(&test_dir)
                    .ok()
                    .and_then(|r| r.components().next())
                    .is_some_and(|c| c.as_os_str() != "good");
                (p, defective)
            })
            .collect();
        tests.push(labelled);
    }
    let mut banks = banks.into_iter();
    let first = banks
        .next()
        .ok_or_else(|| Error::Invalid("no product".into()))?;
    let mut insp = Inspector::with_pipeline(pipeline, first, Path::new(&data[0].0))?;
    for (b, (name, _)) in banks.zip(&data[1..]) {
        insp.add_bank_file(b, Path::new(name))?;
    }
    insp.enable_recognition()
        .map_err(|(i, e)| Error::Invalid(format!("product {}: {e}", data[i].0)))?;
    let total: usize = tests.iter().map(Vec::len).sum();
    let mut done = 0;
    let mut rows = Vec::with_capacity(data.len());
    for (p, images) in tests.iter().enumerate() {
        let th = |i: &Inspector, b: usize| i.header_of(b).map_or(1.0, |h| h.threshold.value);
        let own_th = th(&insp, p);
        let (mut sep, mut uni) = (Vec::new(), Vec::new());
        let mut row = ProductRow {
            product: data[p].0.clone(),
            good: images.iter().filter(|i| !i.1).count(),
            defective: images.iter().filter(|i| i.1).count(),
            recognised: 0,
            confused: 0,
            unrecognised: 0,
            auroc_separate: None,
            auroc_unified: None,
            verdicts_separate: (0, 0),
            verdicts_unified: (0, 0),
        };
        for (path, defective) in images {
            let img = Rgb8::open(path)?;
            let (own, _) = insp.inspect_with(p, &img, path)?;
            let s = own.score as f64 / own_th;
            let (rec, routed) = insp.inspect_auto(&img, path)?;
            let u = match (rec.bank, routed) {
                (Some(b), Some((i, _))) => {
                    if b == p {
                        row.recognised += 1;
                    } else {
                        row.confused += 1;
                    }
                    i.score as f64 / th(&insp, b)
                }
                _ => {
                    row.unrecognised += 1;
                    f64::INFINITY
                }
            };
            for (score, v) in [
                (s, &mut row.verdicts_separate),
                (u, &mut row.verdicts_unified),
            ] {
                let rejected = score.is_nan() || score > 1.0;
                match (defective, rejected) {
                    (false, true) => v.0 += 1,
                    (true, false) => v.1 += 1,
                    _ => {}
                }
            }
            sep.push((s, *defective));
            uni.push((u, *defective));
            done += 1;
            progress("inspect", done, total);
        }
        let auroc = |v: &[(f64, bool)]| {
            let good: Vec<f64> = v.iter().filter(|x| !x.1).map(|x| x.0.min(1e30)).collect();
            let bad: Vec<f64> = v.iter().filter(|x| x.1).map(|x| x.0.min(1e30)).collect();
            metrics::auroc(&good, &bad)
        };
        row.auroc_separate = auroc(&sep);
        row.auroc_unified = auroc(&uni);
        rows.push(row);
    }
    Ok(rows)
}
