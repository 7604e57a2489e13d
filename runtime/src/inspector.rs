//! Calibration (reference bank + threshold) and inspection against a bank file: the product loop
//! on top of [`Pipeline`]. `calibrate`, `inspect` and the line daemon all go through here.

use crate::aligned::{self, cell_features, AlignedBank};
use crate::error::{Error, Result};
use crate::images::list_images;
use crate::model::check_levels;
use crate::model::Fit;
use crate::pipeline::{Bank, FrameFeatures, Inspection, Pipeline, PipelineOptions};
use crate::preprocess::Rgb8;
use crate::synthetic::draw_defect;
use edge_ad_calibration::aligned::{AlignmentIndex, CellFeatures};
use edge_ad_calibration::bankfile::AlignedPool;
use edge_ad_calibration::bankfile::{BankHeader, LevelInfo};
use edge_ad_calibration::metrics;
use edge_ad_calibration::select::{kmeans_references, random_indices, Selection};
use edge_ad_calibration::threshold::{conformal_min_scores, fmt_rate};
use edge_ad_calibration::{BankFile, LevelData, Threshold, ThresholdRule};
use edge_ad_kernels::{BankDtype, LevelBank};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Which levels the bank scores.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LevelChoice {
    /// The model description's `score.levels` (all levels when it has none).
    #[default]
    Model,
    /// Every tapped level.
    All,
    /// These levels, 1-based.
    Given(Vec<usize>),
    /// Chosen from data: with `--defects` the set that separates normal from defective best,
    /// without it the set that separates normal images from synthetic defects best
    /// ([`crate::synthetic`]).
    Auto,
}

impl std::str::FromStr for LevelChoice {
    type Err = String;
    /// `model`, `all`, `auto` or a list such as `2,3`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "model" => Ok(LevelChoice::Model),
            "all" => Ok(LevelChoice::All),
            "auto" => Ok(LevelChoice::Auto),
            list => list
                .split(',')
                .map(|x| {
                    x.trim().parse::<usize>().map_err(|_| {
                        format!(
                            "levels `{s}`: `{x}` is not a level number (expected all, auto, model or a list like 2,3)"
                        )
                    })
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(LevelChoice::Given),
        }
    }
}

/// Calibration settings.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Folder of normal images (walked recursively): the pool references are chosen from.
    pub images: PathBuf,
    /// Reference images in the bank.
    pub refs: usize,
    /// Exact reference images, one path per line (relative paths: to the list's folder).
    pub refs_list: Option<PathBuf>,
    /// How references are chosen from the pool; `None`: aligned where the pool's features fit
    /// [`ALIGNED_POOL_BUDGET_BYTES`], else k-means ([`default_selection`]).
    pub select: Option<Selection>,
    /// Seed of random and k-means selection and of synthetic defects.
    pub seed: u64,
    /// Levels scored.
    pub levels: LevelChoice,
    /// Folder of known-bad parts: places the threshold between the classes.
    pub defects: Option<PathBuf>,
    /// Bank precision.
    pub bank_dtype: BankDtype,
    /// Threshold rule; `None`: the default, a 2 % false-reject budget with a guarantee, or the
    /// largest held-out score when the pool is too small for it ([`ThresholdRule::default_for`]).
    pub rule: Option<ThresholdRule>,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            images: PathBuf::new(),
            refs: 8,
            refs_list: None,
            select: None,
            seed: 0,
            levels: LevelChoice::default(),
            defects: None,
            bank_dtype: BankDtype::F16,
            rule: None,
        }
    }
}

/// A scored image of the calibration.
#[derive(Debug, Clone)]
pub struct ScoredImage {
    /// The image.
    pub path: PathBuf,
    /// Its score.
    pub score: f64,
    /// True for a reference of a `--refs-list` scored against the other references
    /// (leave-one-out: biased high, not held out; the conformal rule leaves it out).
    pub left_out: bool,
}

/// One candidate level set of `--levels auto`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelCandidate {
    /// Levels, 1-based.
    pub levels: Vec<usize>,
    /// AUROC of normal against (synthetic or real) defect scores.
    pub auroc: f64,
    /// `(mean defect − mean normal) / (normal std + defect std)`: the tie-breaker.
    pub separation: f64,
}

/// What calibration did, for the report a person reads.
#[derive(Debug, Clone)]
pub struct CalibrationReport {
    /// Reference images, bank order.
    pub references: Vec<PathBuf>,
    /// Normal images of the pool and their scores (held out, or references left out).
    pub normal_scores: Vec<ScoredImage>,
    /// Known-bad parts and their scores (with `--defects`).
    pub defect_scores: Vec<ScoredImage>,
    /// The threshold set from them.
    pub threshold: Threshold,
    /// Levels scored (1-based) and how they were chosen.
    pub levels: Vec<usize>,
    /// The level choice in words (stored in the bank too).
    pub level_choice: String,
    /// The candidates of `--levels auto`, best first.
    pub candidates: Vec<LevelCandidate>,
    /// Where a default could not be applied as it stands, in words: the selection (a pool too
    /// large for aligned references), the rule (a pool too small for its budget).
    pub notes: Vec<String>,
    /// The highest-scoring normal images with their inspections (for heatmaps), highest first.
    pub top_normal: Vec<(PathBuf, Inspection)>,
    /// Backbone windows per frame (tiles), summed over the references.
    pub windows: usize,
}

/// Verdict of one part against the bank's threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Verdict {
    /// Score at or below the threshold.
    #[serde(rename = "OK")]
    Ok,
    /// Score above the threshold (or not a number: never pass a part in doubt).
    #[serde(rename = "NG")]
    Ng,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "OK",
            Verdict::Ng => "NG",
        })
    }
}

fn read_refs_list(list: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
    let base = list.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let p = base.join(line);
        if !p.is_file() {
            return Err(Error::Invalid(format!(
                "{}:{}: reference {} does not exist",
                list.display(),
                n + 1,
                p.display()
            )));
        }
        out.push(p);
    }
    Ok(out)
}

/// Backbone features of every image of a folder (the calibration pool, a test set): computed once,
/// then scored against as many banks as needed.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// The images, in file-name order.
    pub paths: Vec<PathBuf>,
    /// Their features.
    pub frames: Vec<FrameFeatures>,
}

impl FeatureSet {
    /// Features of `paths`; `progress(done, total)` after each.
    pub fn extract(
        pipeline: &mut Pipeline,
        paths: Vec<PathBuf>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let mut frames = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            progress(i, paths.len());
            frames.push(pipeline.frame_features(&Rgb8::open(p)?, p)?);
        }
        progress(paths.len(), paths.len());
        Ok(Self { paths, frames })
    }

    /// One global descriptor per image for clustering: per level the mean feature over every
    /// position of every window, L2-normalised, levels concatenated.
    pub fn descriptors(&self, channels: usize) -> Vec<Vec<f32>> {
        self.frames
            .iter()
            .map(|f| {
                let mut out = Vec::new();
                for l in 0..f.tiles[0].levels.len() {
                    let mut mean = vec![0.0f64; channels];
                    for t in &f.tiles {
                        for row in t.levels[l].chunks_exact(channels) {
                            for (m, &x) in mean.iter_mut().zip(row) {
                                *m += x as f64;
                            }
                        }
                    }
                    let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
                    out.extend(mean.iter().map(|m| (m / norm) as f32));
                }
                out
            })
            .collect()
    }

    /// Indices of `k` references chosen by `select` (sorted).
    pub fn select(&self, k: usize, select: Selection, seed: u64, channels: usize) -> Vec<usize> {
        choose_references(self.paths.len(), k, select, seed, || {
            self.descriptors(channels)
        })
    }

    /// The references `select` would choose from the pool without image `skip` (pool indices,
    /// never `skip`): the bank `skip` is scored against to give it a held-out score.
    pub fn select_without(
        &self,
        skip: usize,
        k: usize,
        select: Selection,
        seed: u64,
        descriptors: &[Vec<f32>],
    ) -> Vec<usize> {
        let n = self.paths.len();
        let chosen = choose_references(n - 1, k, select, seed, || {
            descriptors
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != skip)
                .map(|(_, d)| d.clone())
                .collect()
        });
        chosen
            .into_iter()
            .map(|j| if j >= skip { j + 1 } else { j })
            .collect()
    }
}

/// `k` of `n` images chosen by `select` (sorted); `descriptors` only when clustering needs them.
fn choose_references(
    n: usize,
    k: usize,
    select: Selection,
    seed: u64,
    descriptors: impl FnOnce() -> Vec<Vec<f32>>,
) -> Vec<usize> {
    let k = k.min(n);
    match select {
        Selection::First => (0..k).collect(),
        Selection::Random => random_indices(n, k, seed),
        // Aligned banks choose per frame; where one fixed set is needed (choosing levels, the
        // bank of eval's fixed reference list), the k-means references stand in.
        Selection::Kmeans | Selection::Aligned => kmeans_references(&descriptors(), k, seed),
    }
}

/// How calibration (and eval, which does what calibration would) scores a frame: one bank, or
/// a bank per frame from the pool (aligned).
pub(crate) enum Scorer<'a> {
    Fixed(Bank),
    Aligned {
        index: AlignmentIndex,
        pool: &'a FeatureSet,
        k: usize,
        taps: Vec<usize>,
    },
}

impl Scorer<'_> {
    /// Score `frame`; `pool_image`: its index when it belongs to the pool (left out of its own
    /// references). Returns the inspection and the pool references used (aligned only).
    pub(crate) fn score(
        &self,
        pipeline: &mut Pipeline,
        desc: &crate::model::ModelDescription,
        frame: &FrameFeatures,
        pool_image: Option<usize>,
    ) -> Result<(Inspection, Vec<usize>)> {
        match self {
            Scorer::Fixed(bank) => Ok((pipeline.score_frame(frame, bank)?, Vec::new())),
            Scorer::Aligned {
                index,
                pool,
                k,
                taps,
            } => {
                let chosen = aligned::choose_references(index, desc, frame, 0, *k, pool_image);
                let refs: Vec<&FrameFeatures> = chosen.iter().map(|&i| &pool.frames[i]).collect();
                let bank = pipeline.bank_from_frames(&refs, BankDtype::F16, taps)?;
                Ok((pipeline.score_frame(frame, &bank)?, chosen))
            }
        }
    }
}

/// Inspections of every frame against `bank`.
fn score_all(
    pipeline: &mut Pipeline,
    frames: &[&FrameFeatures],
    bank: &Bank,
) -> Result<Vec<Inspection>> {
    frames
        .iter()
        .map(|f| pipeline.score_frame(f, bank))
        .collect()
}

/// The normal scores of a pool that a threshold may rest on (docs/calibration.md §4), as
/// `(pool image, inspection, left_out)`:
/// - fixed bank: every image that is not a reference against the bank; every reference against
///   a bank drawn by the same selection from the pool without it (`redraw`: a held-out score,
///   exchangeable with a new part's), or, for references given by a list (nothing to redraw
///   from), against the other references — leave-one-out, `left_out`, biased high;
/// - aligned: every image against references chosen without it, as at inspection.
pub(crate) fn pool_scores(
    pipeline: &mut Pipeline,
    pool: &FeatureSet,
    scorer: &Scorer,
    refs: &[usize],
    redraw: Option<(Selection, u64)>,
    dtype: BankDtype,
) -> Result<Vec<(usize, Inspection, bool)>> {
    let desc = pipeline.description().desc.clone();
    let bank = match scorer {
        Scorer::Aligned { .. } => {
            return (0..pool.frames.len())
                .map(|i| {
                    let (insp, _) = scorer.score(pipeline, &desc, &pool.frames[i], Some(i))?;
                    Ok((i, insp, false))
                })
                .collect();
        }
        Scorer::Fixed(bank) => bank,
    };
    let mut out = Vec::with_capacity(pool.frames.len());
    for (i, f) in pool.frames.iter().enumerate() {
        if refs.contains(&i) {
            continue;
        }
        out.push((i, pipeline.score_frame(f, bank)?, false));
    }
    let descriptors = match redraw {
        Some((Selection::Kmeans | Selection::Aligned, _)) => {
            pool.descriptors(desc.features.channels)
        }
        _ => Vec::new(),
    };
    for &r in refs {
        let (others, left_out) = match redraw {
            Some((select, seed)) => (
                pool.select_without(r, refs.len(), select, seed, &descriptors),
                false,
            ),
            None if refs.len() > 1 => (refs.iter().copied().filter(|&o| o != r).collect(), true),
            None => continue,
        };
        let frames: Vec<&FrameFeatures> = others.iter().map(|&o| &pool.frames[o]).collect();
        let b = pipeline.bank_from_frames(&frames, dtype, bank.taps())?;
        out.push((r, pipeline.score_frame(&pool.frames[r], &b)?, left_out));
    }
    Ok(out)
}

/// The threshold a pool's scores give under `rule` (`None`: the default for their count), with
/// the default's note when the pool is too small for its budget. Left-out references are not
/// held out: the conformal rule (the default) leaves them out; the older rules keep them.
pub(crate) fn pool_threshold(
    scored: &[(usize, Inspection, bool)],
    defects: &[f64],
    rule: Option<ThresholdRule>,
) -> std::result::Result<(Threshold, Option<String>, Vec<f64>), String> {
    let held_out_only = matches!(rule, None | Some(ThresholdRule::Conformal { .. }));
    let normal: Vec<f64> = scored
        .iter()
        .filter(|s| !(held_out_only && s.2))
        .map(|s| s.1.score as f64)
        .collect();
    let (rule, mut note) = match rule {
        Some(r) => (r, None),
        None => ThresholdRule::default_for(normal.len()),
    };
    if let (false, ThresholdRule::Conformal { reject_rate }) = (defects.is_empty(), rule) {
        note = Some(format!(
            "with known-bad parts the threshold is placed between the classes, not by the {} budget; the false-reject rate stated is the conformal bound at the placed threshold over the {} held-out good scores",
            fmt_rate(reject_rate),
            normal.len()
        ));
    }
    let t = if defects.is_empty() {
        Threshold::from_scores(&normal, rule)
    } else {
        Threshold::between(&normal, defects, rule)
    }?;
    Ok((t, note, normal))
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

/// Candidate level sets: every non-empty subset for up to 4 levels, else every contiguous run.
fn level_candidates(n: usize) -> Vec<Vec<usize>> {
    if n <= 4 {
        (1u32..(1 << n))
            .map(|m| (0..n).filter(|&l| m & (1 << l) != 0).collect())
            .collect()
    } else {
        let mut v = Vec::new();
        for a in 0..n {
            for b in a..n {
                v.push((a..=b).collect());
            }
        }
        v
    }
}

/// `--levels auto`: every candidate level set is scored on the held-out normal images of the pool
/// and on defects — the known-bad parts when given, else synthetic defects drawn on up to 24
/// held-out normal images ([`crate::synthetic`], two each) — and the set whose scores separate the
/// two best wins (AUROC, then the separation in units of spread). Returns the 0-based levels, the
/// choice in words and every candidate, best first.
pub fn choose_levels(
    pipeline: &mut Pipeline,
    pool: &FeatureSet,
    ref_idx: &[usize],
    defects: Option<&FeatureSet>,
    seed: u64,
    dtype: BankDtype,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(Vec<usize>, String, Vec<LevelCandidate>)> {
    let ntaps = pipeline.description().desc.taps.len();
    let ref_frames: Vec<&FrameFeatures> = ref_idx.iter().map(|&i| &pool.frames[i]).collect();
    let synthetic;
    let bad: &FeatureSet = match defects {
        Some(d) => d,
        None => {
            let held: Vec<usize> = (0..pool.paths.len())
                .filter(|i| !ref_idx.contains(i))
                .take(24)
                .collect();
            let input = pipeline.description().desc.input.clone();
            let mut frames = Vec::with_capacity(held.len() * 2);
            let mut names = Vec::new();
            for (n, &i) in held.iter().enumerate() {
                progress("synthetic defects", n, held.len());
                let p = &pool.paths[i];
                let img = Rgb8::open(p)?;
                let region = input.roi.unwrap_or([0, 0, img.width, img.height]);
                for kind in 0..2 {
                    let (bad, _) = draw_defect(&img, region, seed, 2 * n + kind);
                    frames.push(pipeline.frame_features(&bad, p)?);
                    names.push(p.clone());
                }
            }
            progress("synthetic defects", held.len(), held.len());
            synthetic = FeatureSet {
                paths: names,
                frames,
            };
            &synthetic
        }
    };
    let all: Vec<usize> = (0..ntaps).collect();
    let full = pipeline.bank_from_frames(&ref_frames, dtype, &all)?;
    let sets = level_candidates(ntaps);
    let bad_frames: Vec<&FrameFeatures> = bad.frames.iter().collect();
    let held_frames: Vec<&FrameFeatures> = pool
        .frames
        .iter()
        .enumerate()
        .filter(|(i, _)| !ref_idx.contains(i))
        .map(|(_, f)| f)
        .collect();
    let mut candidates = Vec::with_capacity(sets.len());
    for (n, set) in sets.iter().enumerate() {
        progress("choosing levels", n, sets.len());
        let bank = full.select(set)?;
        let score = |v: Vec<Inspection>| v.iter().map(|s| s.score as f64).collect::<Vec<_>>();
        let normal = score(score_all(pipeline, &held_frames, &bank)?);
        let defect = score(score_all(pipeline, &bad_frames, &bank)?);
        let (mn, sn) = mean_std(&normal);
        let (md, sd) = mean_std(&defect);
        candidates.push(LevelCandidate {
            levels: set.iter().map(|l| l + 1).collect(),
            auroc: metrics::auroc(&normal, &defect).unwrap_or(0.5),
            separation: (md - mn) / (sn + sd).max(1e-12),
        });
    }
    progress("choosing levels", sets.len(), sets.len());
    candidates.sort_by(|a, b| {
        b.auroc
            .total_cmp(&a.auroc)
            .then(b.separation.total_cmp(&a.separation))
    });
    let best = &candidates[0];
    let why = format!(
        "auto: best of {} level sets at separating held-out normal images from {} ({} images): AUROC {:.3}, separation {:.2}",
        candidates.len(),
        if defects.is_some() {
            "the known defects"
        } else {
            "synthetic defects"
        },
        bad.frames.len(),
        best.auroc,
        best.separation
    );
    Ok((best.levels.iter().map(|l| l - 1).collect(), why, candidates))
}

/// Aligned references keep the whole pool, in f16 (the bank file's aligned section and the
/// per-frame banks): an f32 bank cannot be aligned. One refusal for calibrate and eval.
pub(crate) fn check_aligned_dtype(dtype: BankDtype) -> Result<()> {
    if dtype == BankDtype::F16 {
        return Ok(());
    }
    Err(Error::Invalid(
        "--select aligned keeps the whole pool in the bank file in f16: drop --bank-dtype f32, or choose kmeans, first or random references".into(),
    ))
}

/// The memory aligned references may take by default: the whole pool's scored features stay in
/// the bank (f16) and in memory at inspection. 256 MiB is a small share of a Jetson's 8–64 GB
/// and holds ≈ 300 magnetic-tile images (2.15 DINOv2-S tiles each, 2 levels: 0.9 MB an image).
pub const ALIGNED_POOL_BUDGET_BYTES: usize = 256 << 20;

/// The default reference selection (issue 14 §2): semantic-aligned references — each frame gets
/// the pool images nearest it in appearance, so a part is compared with parts like it (visible
/// magnetic tile: image AUROC 0.921 against 0.871 for k-means, docs/results.md) — where the
/// pool's features fit [`ALIGNED_POOL_BUDGET_BYTES`] in f16; else k-means, with the reason.
pub fn default_selection(
    pool: &FeatureSet,
    taps: &[usize],
    dtype: BankDtype,
) -> (Selection, Option<String>) {
    if dtype != BankDtype::F16 {
        return (
            Selection::Kmeans,
            Some("--bank-dtype f32: k-means references (aligned pools are kept in f16)".into()),
        );
    }
    let bytes: usize = pool
        .frames
        .iter()
        .flat_map(|f| &f.tiles)
        .map(|t| taps.iter().map(|&l| 2 * t.levels[l].len()).sum::<usize>())
        .sum();
    if bytes <= ALIGNED_POOL_BUDGET_BYTES {
        (Selection::Aligned, None)
    } else {
        (
            Selection::Kmeans,
            Some(format!(
                "the pool's features take {:.0} MB in f16, over the {} MB that aligned references may take: k-means references instead (--select aligned forces them)",
                bytes as f64 / 1e6,
                ALIGNED_POOL_BUDGET_BYTES >> 20
            )),
        )
    }
}

/// Choose references, build the bank, score the other normal images, set the threshold.
/// `progress(stage, done, total)` reports long stages.
pub fn calibrate(
    pipeline: &mut Pipeline,
    opts: &CalibrateOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(BankFile, CalibrationReport)> {
    let listed = list_images(&opts.images)?;
    if listed.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no image files (png, jpg, bmp, tif)",
            opts.images.display()
        )));
    }
    // Explicit references join the pool when they live elsewhere.
    let explicit = match &opts.refs_list {
        Some(list) => Some(read_refs_list(list)?),
        None => None,
    };
    let mut paths = listed.clone();
    let mut canon: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).map_err(|e| Error::io(p, e)))
        .collect::<Result<_>>()?;
    let mut ref_idx = Vec::new();
    if let Some(list) = &explicit {
        let mut seen = HashSet::new();
        for r in list {
            let key = std::fs::canonicalize(r).map_err(|e| Error::io(r, e))?;
            if !seen.insert(key.clone()) {
                return Err(Error::Invalid(format!(
                    "duplicate reference image {}",
                    r.display()
                )));
            }
            match canon.iter().position(|c| *c == key) {
                Some(i) => ref_idx.push(i),
                None => {
                    paths.push(r.clone());
                    canon.push(key);
                    ref_idx.push(paths.len() - 1);
                }
            }
        }
        if ref_idx.is_empty() {
            return Err(Error::Invalid(
                "no reference images (an empty --refs-list)".into(),
            ));
        }
    } else if opts.refs == 0 {
        return Err(Error::Invalid("--refs 0: a bank needs references".into()));
    }
    let k = if explicit.is_some() {
        ref_idx.len()
    } else {
        opts.refs
    };
    if paths.len() <= k {
        return Err(Error::Invalid(format!(
            "{}: {} normal images; calibration needs {} references (--refs) plus at least one more normal image to set the threshold",
            opts.images.display(),
            listed.len(),
            k
        )));
    }
    // An asked-for budget's pool check, before the long work. Held out: the whole pool (chosen
    // references are redrawn, aligned ones are chosen without the image), or the pool minus the
    // references of a --refs-list.
    if let Some(rule) = opts.rule {
        rule.validate().map_err(Error::Invalid)?;
    }
    if let Some(ThresholdRule::Conformal { reject_rate }) = opts.rule {
        let p = fmt_rate(reject_rate);
        let listed_refs = if explicit.is_some() { k } else { 0 };
        let held_out = paths.len() - listed_refs;
        let need = conformal_min_scores(reject_rate);
        if need == usize::MAX {
            return Err(Error::Invalid(format!(
                "false-reject budget {p}: no pool of good images is large enough to guarantee it (it needs ⌈1/P⌉ − 1 held-out images); use a larger rate, e.g. 0.02"
            )));
        }
        if held_out < need {
            return Err(Error::Invalid(format!(
                "{}: false-reject budget {p} needs at least {need} held-out good images to guarantee it; this pool of {} gives {held_out} — use a pool of at least {} images, or a larger rate",
                opts.images.display(),
                paths.len(),
                need + listed_refs
            )));
        }
    }
    if opts.select == Some(Selection::Aligned) {
        check_aligned_dtype(opts.bank_dtype)?;
    }
    let pool = FeatureSet::extract(pipeline, paths, |i, n| progress("features", i, n))?;
    if explicit.is_none() {
        // Aligned banks choose per frame; the k-means references stand in where one fixed set
        // is needed (choosing levels), so the default's choice can wait for the levels.
        let channels = pipeline.description().desc.features.channels;
        let fixed = opts.select.unwrap_or(Selection::Kmeans);
        ref_idx = pool.select(k, fixed, opts.seed, channels);
    }
    let ntaps = pipeline.description().desc.taps.len();
    let defects = match &opts.defects {
        None => None,
        Some(dir) => {
            let list = list_images(dir)?;
            if list.is_empty() {
                return Err(Error::Invalid(format!(
                    "--defects {}: no image files (png, jpg, bmp, tif)",
                    dir.display()
                )));
            }
            Some(FeatureSet::extract(pipeline, list, |i, n| {
                progress("defect features", i, n)
            })?)
        }
    };

    let ref_frames: Vec<&FrameFeatures> = ref_idx.iter().map(|&i| &pool.frames[i]).collect();
    let mut candidates = Vec::new();
    let (taps, level_choice) = match &opts.levels {
        LevelChoice::Model => {
            let d = &pipeline.description().desc;
            let t = d.default_levels();
            let why = if d.score.levels.is_some() {
                "model description (score.levels)"
            } else {
                "all (model description)"
            };
            (t, why.to_string())
        }
        LevelChoice::All => ((0..ntaps).collect(), "all".to_string()),
        LevelChoice::Given(l) => {
            check_levels(l, ntaps).map_err(|e| Error::Invalid(format!("--levels: {e}")))?;
            (l.iter().map(|l| l - 1).collect(), "given".to_string())
        }
        LevelChoice::Auto => {
            let (t, why, c) = choose_levels(
                pipeline,
                &pool,
                &ref_idx,
                defects.as_ref(),
                opts.seed,
                opts.bank_dtype,
                &mut progress,
            )?;
            candidates = c;
            (t, why)
        }
    };

    let mut notes = Vec::new();
    let select = match opts.select {
        Some(s) => s,
        None => {
            let (s, note) = default_selection(&pool, &taps, opts.bank_dtype);
            if let Some(note) = note {
                log::warn!("{}: {note}", opts.images.display());
                notes.push(note);
            }
            s
        }
    };
    let selection = match select {
        _ if explicit.is_some() => "list".to_string(),
        Selection::First => format!("first {k} of {}", pool.paths.len()),
        Selection::Aligned => format!(
            "aligned (seed {}): {k} of {} per frame",
            opts.seed,
            pool.paths.len()
        ),
        s => format!("{s} (seed {}) {k} of {}", opts.seed, pool.paths.len()),
    };
    let aligned = select == Selection::Aligned && explicit.is_none();
    let windows: usize = ref_idx.iter().map(|&i| pool.frames[i].tiles.len()).sum();
    let desc = pipeline.description().desc.clone();
    let scorer = if aligned {
        let cells: Vec<CellFeatures> = pool
            .frames
            .iter()
            .map(|f| cell_features(&desc, f, 0, aligned::GRID))
            .collect();
        let index = AlignmentIndex::build(
            &cells,
            aligned::GRID,
            aligned::CLUSTERS,
            desc.features.channels,
            opts.seed,
        );
        Scorer::Aligned {
            index,
            pool: &pool,
            k,
            taps: taps.clone(),
        }
    } else {
        Scorer::Fixed(pipeline.bank_from_frames(&ref_frames, opts.bank_dtype, &taps)?)
    };
    progress("scoring normal images", 0, 1);
    // Chosen references are redrawn (scored against a bank chosen without them): a reference
    // scored against the other references is biased high — a k-means reference is alone in its
    // cluster (issue 14). Listed references have nothing to be redrawn from.
    let redraw = explicit.is_none().then_some((select, opts.seed));
    let scored = pool_scores(pipeline, &pool, &scorer, &ref_idx, redraw, opts.bank_dtype)?;
    progress("scoring normal images", 1, 1);
    let defect_scores: Vec<ScoredImage> = match &defects {
        None => Vec::new(),
        Some(d) => d
            .frames
            .iter()
            .zip(&d.paths)
            .map(|(f, p)| {
                Ok(ScoredImage {
                    path: p.clone(),
                    score: scorer.score(pipeline, &desc, f, None)?.0.score as f64,
                    left_out: false,
                })
            })
            .collect::<Result<_>>()?,
    };
    let d: Vec<f64> = defect_scores.iter().map(|s| s.score).collect();
    let (threshold, rule_note, _) = pool_threshold(&scored, &d, opts.rule)
        .map_err(|e| Error::Invalid(format!("{}: {e}", opts.images.display())))?;
    if let Some(note) = rule_note {
        log::warn!("{}: {note}", opts.images.display());
        notes.push(note);
    }

    let mut order: Vec<usize> = (0..scored.len()).collect();
    order.sort_by(|&a, &b| scored[b].1.score.total_cmp(&scored[a].1.score));
    let normal_scores: Vec<ScoredImage> = scored
        .iter()
        .map(|(i, s, loo)| ScoredImage {
            path: pool.paths[*i].clone(),
            score: s.score as f64,
            left_out: *loo,
        })
        .collect();
    let top_normal: Vec<(PathBuf, Inspection)> = order
        .iter()
        .take(3)
        .map(|&o| (pool.paths[scored[o].0].clone(), scored[o].1.clone()))
        .collect();

    let d = &desc;
    // Aligned: the report shows the references the highest-scoring normal image was given.
    let refs: Vec<PathBuf> = match &scorer {
        Scorer::Fixed(_) => ref_idx.iter().map(|&i| pool.paths[i].clone()).collect(),
        Scorer::Aligned { index, .. } => {
            let top = scored[order[0]].0;
            index
                .nearest_to(&index.histograms[top], k, Some(top))
                .iter()
                .map(|&i| pool.paths[i].clone())
                .collect()
        }
    };
    let bank = match &scorer {
        Scorer::Fixed(b) => b.clone(),
        Scorer::Aligned { .. } => {
            let all: Vec<&FrameFeatures> = pool.frames.iter().collect();
            pipeline.bank_from_frames(&all, BankDtype::F16, &taps)?
        }
    };
    let (windows, aligned_pool) = match &scorer {
        Scorer::Fixed(_) => (windows, None),
        Scorer::Aligned { index, .. } => (
            pool.frames.iter().map(|f| f.tiles.len()).sum(),
            Some(AlignedPool {
                k,
                level: 1,
                images: pool
                    .paths
                    .iter()
                    .map(|p| display_name(p, &opts.images))
                    .collect(),
                windows: pool.frames.iter().map(|f| f.tiles.len()).collect(),
                index: index.clone(),
            }),
        ),
    };
    let header = BankHeader {
        identity: pipeline.identity(),
        model_name: d.name.clone(),
        fit: d.input.fit.to_string(),
        windows,
        references: refs.iter().map(|p| display_name(p, &opts.images)).collect(),
        selection,
        level_choice: level_choice.clone(),
        levels: bank
            .levels
            .iter()
            .zip(bank.taps())
            .map(|(l, &t)| LevelInfo {
                level: t + 1,
                rows: l.rows(),
                channels: l.channels(),
                dtype: l.dtype().name().into(),
            })
            .collect(),
        threshold: threshold.clone(),
        aligned: aligned_pool,
        written_by: format!("edge-ad {}", env!("CARGO_PKG_VERSION")),
    };
    let levels = bank
        .levels
        .iter()
        .map(|l| match l.dtype() {
            BankDtype::F16 => LevelData::F16(l.to_f16()),
            BankDtype::F32 => LevelData::F32(l.raw().to_vec()),
        })
        .collect();
    Ok((
        BankFile { header, levels },
        CalibrationReport {
            references: refs,
            normal_scores,
            defect_scores,
            threshold,
            levels: taps.iter().map(|t| t + 1).collect(),
            level_choice,
            candidates,
            top_normal,
            windows,
            notes,
        },
    ))
}

fn display_name(p: &Path, root: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// The in-memory bank of a bank file.
pub fn bank_from_file(file: &BankFile) -> Result<Bank> {
    let levels = file
        .levels
        .iter()
        .zip(&file.header.levels)
        .map(|(d, info)| match d {
            LevelData::F16(v) => LevelBank::from_f16(info.rows, info.channels, v),
            LevelData::F32(v) => LevelBank::new(info.rows, info.channels, v, BankDtype::F32),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Bank::with_taps(levels, scored_taps(&file.header))
}

/// The bank's scored levels as 0-based tap indices.
fn scored_taps(h: &BankHeader) -> Vec<usize> {
    h.scored_levels().iter().map(|l| l - 1).collect()
}

/// The references of an inspector: one bank, or the aligned pool.
#[derive(Debug)]
enum References {
    Fixed(Bank),
    Aligned(AlignedBank),
}

/// One loaded bank: its references (fixed or aligned) and its file (header, threshold).
#[derive(Debug)]
struct LoadedBank {
    refs: References,
    file: BankFile,
}

/// A pipeline with its banks and thresholds: inspects parts and gives verdicts. Usually one bank;
/// a line with several products loads one bank per product over the same pipeline
/// ([`Inspector::add_bank`]), so a change-over is an index, not a model load (docs/line.md,
/// "Products").
#[derive(Debug)]
pub struct Inspector {
    pipeline: Pipeline,
    banks: Vec<LoadedBank>,
    /// Per bank, for recognising the product (`select = "auto"`).
    signatures: Option<Vec<crate::recognise::Signature>>,
    /// Product names, when the banks came from a bank set.
    names: Option<Vec<String>>,
}

/// Bank `i`, or an error (never a panic) past the banks loaded.
fn bank_at(banks: &[LoadedBank], i: usize) -> Result<&LoadedBank> {
    banks
        .get(i)
        .ok_or_else(|| Error::Invalid(format!("bank {i} asked for, {} loaded", banks.len())))
}

fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Inspector {
    /// Load a bank file, then the pipeline it was made with; refuse a bank made for another
    /// backbone, description or projector. Without `opts.fit` the bank's fit is used.
    ///
    /// A bank set (several products in one file, `calibrate --product`) loads every product's
    /// bank over the one pipeline, names them ([`Inspector::product_names`]) and prepares
    /// recognition: [`Inspector::inspect_auto`] then picks the product per frame.
    pub fn load(opts: &PipelineOptions, bank_path: &Path) -> Result<Self> {
        let bytes = std::fs::read(bank_path).map_err(|e| Error::io(bank_path, e))?;
        if edge_ad_calibration::bankset::is_bank_set(&bytes) {
            let set = edge_ad_calibration::BankSet::from_bytes(&bytes, bank_path)?;
            return Self::load_set(opts, set, bank_path);
        }
        let file = BankFile::from_bytes(&bytes, bank_path)?;
        Self::load_file(opts, file, bank_path)
    }

    /// [`Inspector::load`] of a bank set already read.
    pub fn load_set(
        opts: &PipelineOptions,
        set: edge_ad_calibration::BankSet,
        bank_path: &Path,
    ) -> Result<Self> {
        let mut products = set.products.into_iter();
        let (first_name, first) = products
            .next()
            .ok_or_else(|| Error::Invalid(format!("{}: no product", bank_path.display())))?;
        let mut names = vec![first_name];
        let mut insp = Self::load_file(opts, first, &bank_path.join(&names[0]))?;
        for (name, file) in products {
            insp.add_bank_file(file, &bank_path.join(&name))?;
            names.push(name);
        }
        insp.names = Some(names);
        Ok(insp)
    }

    fn load_file(opts: &PipelineOptions, file: BankFile, bank_path: &Path) -> Result<Self> {
        let bank_fit: Fit = file
            .header
            .fit
            .parse()
            .map_err(|e: String| Error::Invalid(format!("{}: {e}", bank_path.display())))?;
        if let Some(f) = opts.fit {
            if f != bank_fit {
                return Err(Error::Invalid(format!(
                    "--fit {} differs from the bank's fit {} ({}): recalibrate with --fit {}",
                    f,
                    bank_fit,
                    bank_path.display(),
                    f
                )));
            }
        }
        let mut o = opts.clone();
        o.fit = Some(bank_fit);
        Self::with_pipeline(Pipeline::load(&o)?, file, bank_path)
    }

    /// An inspector over an already loaded pipeline (no second load and optimisation of the
    /// model): the bank must match its identity and fit.
    pub fn with_pipeline(pipeline: Pipeline, file: BankFile, bank_path: &Path) -> Result<Self> {
        let bank = Self::prepare(&pipeline, file, bank_path)?;
        Ok(Self {
            pipeline,
            banks: vec![bank],
            signatures: None,
            names: None,
        })
    }

    /// Check a bank file against the pipeline (fit, backbone, description, projector) and build
    /// its references.
    fn prepare(pipeline: &Pipeline, file: BankFile, bank_path: &Path) -> Result<LoadedBank> {
        let fit = pipeline.description().desc.input.fit;
        if fit.name() != file.header.fit {
            return Err(Error::Invalid(format!(
                "{}: bank made with fit {}, pipeline uses {fit}",
                bank_path.display(),
                file.header.fit
            )));
        }
        file.check_identity(&pipeline.identity(), bank_path)?;
        let refs = match &file.header.aligned {
            None => References::Fixed(bank_from_file(&file)?),
            Some(pool) => References::Aligned(
                AlignedBank::new(
                    pool.clone(),
                    &file.levels,
                    scored_taps(&file.header),
                    &pipeline.description().desc,
                )
                .map_err(|e| Error::Invalid(format!("{}: {e}", bank_path.display())))?,
            ),
        };
        Ok(LoadedBank { refs, file })
    }

    /// Load one more bank over the same pipeline (another product): it must have been made with
    /// this model (backbone, description, projector) and fit, else the error names the file and
    /// what differs. Returns its index for [`Inspector::inspect_with`].
    pub fn add_bank(&mut self, bank_path: &Path) -> Result<usize> {
        let file = BankFile::load(bank_path)?;
        self.add_bank_file(file, bank_path)
    }

    /// [`Inspector::add_bank`] of a bank already in memory (`bank_path` names it in errors).
    pub fn add_bank_file(&mut self, file: BankFile, bank_path: &Path) -> Result<usize> {
        let bank = Self::prepare(&self.pipeline, file, bank_path)?;
        self.banks.push(bank);
        self.signatures = None;
        Ok(self.banks.len() - 1)
    }

    /// The product names of a bank set, in bank order; `None` for a single bank.
    pub fn product_names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// Banks loaded (at least one).
    pub fn bank_count(&self) -> usize {
        self.banks.len()
    }

    /// The first bank's header (references, threshold, identities).
    pub fn header(&self) -> &BankHeader {
        &self.banks[0].file.header
    }

    /// Bank `i`'s header; `None` past the banks loaded.
    pub fn header_of(&self, i: usize) -> Option<&BankHeader> {
        self.banks.get(i).map(|b| &b.file.header)
    }

    /// Bytes the references of bank `i` hold in memory (bank levels or the aligned pool).
    pub fn bank_bytes(&self, i: usize) -> usize {
        self.banks.get(i).map_or(0, |b| {
            b.file
                .levels
                .iter()
                .map(|l| match l {
                    LevelData::F16(v) => v.len() * 2,
                    LevelData::F32(v) => v.len() * 4,
                })
                .sum()
        })
    }
    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Inspect one image: map, score, timings and the verdict against the bank's threshold.
    pub fn inspect(&mut self, img: &Rgb8, path: &Path) -> Result<(Inspection, Verdict)> {
        self.inspect_with(0, img, path)
    }

    /// [`Inspector::inspect`] against bank `bank` (a product's); an index past the banks loaded
    /// is an error, not a panic.
    pub fn inspect_with(
        &mut self,
        bank: usize,
        img: &Rgb8,
        path: &Path,
    ) -> Result<(Inspection, Verdict)> {
        let loaded = bank_at(&self.banks, bank)?;
        let insp = match &loaded.refs {
            References::Fixed(bank) => self.pipeline.inspect(img, path, bank)?,
            References::Aligned(_) => {
                let t0 = std::time::Instant::now();
                let frame = self.pipeline.frame_features(img, path)?;
                let mut insp = self.score_features(bank, &frame)?;
                // Preparation and backbone are timed together on this path.
                insp.timings.backbone_ms = ms_since(t0) - insp.timings.total_ms;
                insp.timings.total_ms = ms_since(t0);
                insp
            }
        };
        Ok(self.verdict(bank, insp))
    }

    fn verdict(&self, bank: usize, insp: Inspection) -> (Inspection, Verdict) {
        let v = if self.banks[bank]
            .file
            .header
            .threshold
            .rejects(insp.score as f64)
        {
            Verdict::Ng
        } else {
            Verdict::Ok
        };
        (insp, v)
    }

    /// Score a frame's features against bank `bank` (aligned banks first choose the frame's
    /// references); timings cover the align stage and the kernels.
    fn score_features(&mut self, bank: usize, frame: &FrameFeatures) -> Result<Inspection> {
        let loaded = bank_at(&self.banks, bank)?;
        match &loaded.refs {
            References::Fixed(b) => self.pipeline.score_frame(frame, b),
            References::Aligned(pool) => {
                let t1 = std::time::Instant::now();
                let desc = &self.pipeline.description().desc;
                let (b, _) = self
                    .pipeline
                    .pool()
                    .install(|| pool.bank_for(desc, frame))?;
                let align = ms_since(t1);
                let mut insp = self.pipeline.score_frame(frame, &b)?;
                insp.timings.align_ms = align;
                insp.timings.total_ms += align;
                Ok(insp)
            }
        }
    }

    /// Compute the recognition signature of every bank (`select = "auto"`); an error gives the
    /// index of the bank that cannot be recognised (fewer than two reference images).
    pub fn enable_recognition(
        &mut self,
    ) -> std::result::Result<(), (usize, crate::recognise::SignatureError)> {
        let files: Vec<&BankFile> = self.banks.iter().map(|b| &b.file).collect();
        let level = crate::recognise::common_level(&files)
            .ok_or((0, crate::recognise::SignatureError::NoLevel))?;
        let mut sigs = Vec::with_capacity(self.banks.len());
        for (i, b) in self.banks.iter().enumerate() {
            sigs.push(crate::recognise::Signature::of(&b.file, level).map_err(|e| (i, e))?);
        }
        crate::recognise::set_gaps(&mut sigs);
        self.signatures = Some(sigs);
        Ok(())
    }

    /// The recognition signatures, once [`Inspector::enable_recognition`] ran.
    pub fn signatures(&self) -> Option<&[crate::recognise::Signature]> {
        self.signatures.as_deref()
    }

    /// Recognise which bank (product) the frame shows, then inspect it against that bank, from
    /// one backbone pass: `None` for the inspection when no product is close enough.
    pub fn inspect_auto(
        &mut self,
        img: &Rgb8,
        path: &Path,
    ) -> Result<(crate::recognise::Recognition, Option<(Inspection, Verdict)>)> {
        if self.signatures.is_none() {
            self.enable_recognition().map_err(|(i, e)| {
                let name = self
                    .names
                    .as_ref()
                    .and_then(|n| n.get(i))
                    .map_or(format!("bank {}", i + 1), |n| format!("product {n}"));
                Error::Invalid(format!("{name}: {e}"))
            })?;
        }
        let t0 = std::time::Instant::now();
        let frame = self.pipeline.frame_features(img, path)?;
        let backbone = ms_since(t0);
        let rec = crate::recognise::recognise(self.signatures.as_deref().unwrap_or(&[]), &frame);
        let Some(bank) = rec.bank else {
            return Ok((rec, None));
        };
        let mut insp = self.score_features(bank, &frame)?;
        insp.timings.backbone_ms = backbone;
        insp.timings.total_ms = ms_since(t0);
        Ok((rec, Some(self.verdict(bank, insp))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference's held-out score comes from the bank the same selection draws from the pool
    /// without it: never itself, indices mapped back to the pool.
    #[test]
    fn references_are_redrawn_without_themselves() {
        let pool = FeatureSet {
            paths: (0..6).map(|i| PathBuf::from(format!("{i}.png"))).collect(),
            frames: Vec::new(),
        };
        // Two tight groups (0, 1, 2) and (3, 4, 5) in a 2-d descriptor space.
        let d: Vec<Vec<f32>> = [
            [1.0, 0.0],
            [0.99, 0.1],
            [0.98, 0.2],
            [0.0, 1.0],
            [0.1, 0.99],
            [0.2, 0.98],
        ]
        .iter()
        .map(|v| v.to_vec())
        .collect();
        for skip in 0..6 {
            for sel in [Selection::First, Selection::Random, Selection::Kmeans] {
                let r = pool.select_without(skip, 2, sel, 7, &d);
                assert_eq!(r.len(), 2, "{sel:?} without {skip}");
                assert!(!r.contains(&skip) && r.iter().all(|&i| i < 6), "{r:?}");
            }
        }
        // First without 0 is images 1 and 2; without 3 it is 0 and 1.
        assert_eq!(
            pool.select_without(0, 2, Selection::First, 0, &d),
            vec![1, 2]
        );
        assert_eq!(
            pool.select_without(3, 2, Selection::First, 0, &d),
            vec![0, 1]
        );
        // K-means without an image still takes one reference from each group.
        for skip in 0..6 {
            let r = pool.select_without(skip, 2, Selection::Kmeans, 0, &d);
            assert!(
                r.iter().any(|&i| i < 3) && r.iter().any(|&i| i >= 3),
                "{skip}: {r:?}"
            );
        }
    }
}
