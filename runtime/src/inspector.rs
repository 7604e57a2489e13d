//! Calibration (reference bank + threshold) and inspection against a bank file: the product loop
//! on top of [`Pipeline`]. `calibrate`, `inspect` and the line daemon all go through here.

use crate::error::{Error, Result};
use crate::images::list_images;
use crate::model::Fit;
use crate::pipeline::{Bank, Features, Inspection, Pipeline, PipelineOptions};
use crate::preprocess::Rgb8;
use edge_ad_calibration::bankfile::{BankHeader, LevelInfo};
use edge_ad_calibration::{BankFile, LevelData, Threshold, ThresholdRule};
use edge_ad_kernels::{BankDtype, LevelBank};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Calibration settings.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Folder of normal images (walked recursively).
    pub images: PathBuf,
    /// Reference images in the bank.
    pub refs: usize,
    /// Exact reference images, one path per line (relative paths: to the list's folder).
    pub refs_list: Option<PathBuf>,
    /// Bank precision.
    pub bank_dtype: BankDtype,
    /// Threshold rule.
    pub rule: ThresholdRule,
}

/// What calibration did, for the summary a person reads.
#[derive(Debug, Clone)]
pub struct CalibrationReport {
    /// Reference images, bank order.
    pub references: Vec<PathBuf>,
    /// Held-out normal images and their scores.
    pub normal_scores: Vec<(PathBuf, f64)>,
    /// The threshold set from them.
    pub threshold: Threshold,
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

/// Choose references, build the bank, score the other normal images, set the threshold.
pub fn calibrate(
    pipeline: &mut Pipeline,
    opts: &CalibrateOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(BankFile, CalibrationReport)> {
    let pool = list_images(&opts.images)?;
    if pool.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no image files (png, jpg, bmp, tif)",
            opts.images.display()
        )));
    }
    let (refs, selection): (Vec<PathBuf>, &str) = match &opts.refs_list {
        Some(list) => (read_refs_list(list)?, "list"),
        None => (pool.iter().take(opts.refs).cloned().collect(), "first"),
    };
    if refs.is_empty() {
        return Err(Error::Invalid(
            "no reference images (--refs 0 or an empty --refs-list)".into(),
        ));
    }
    let mut seen = HashSet::new();
    for r in &refs {
        let key = std::fs::canonicalize(r).map_err(|e| Error::io(r, e))?;
        if !seen.insert(key) {
            return Err(Error::Invalid(format!(
                "duplicate reference image {}",
                r.display()
            )));
        }
    }
    let canon_refs = seen;
    let held_out: Vec<PathBuf> = pool
        .iter()
        .filter(|p| {
            std::fs::canonicalize(p)
                .map(|c| !canon_refs.contains(&c))
                .unwrap_or(true)
        })
        .cloned()
        .collect();
    if held_out.is_empty() || (opts.refs_list.is_none() && pool.len() < opts.refs + 1) {
        return Err(Error::Invalid(format!(
            "{}: {} normal images; calibration needs {} references plus at least one more normal image to set the threshold",
            opts.images.display(),
            pool.len(),
            refs.len().max(opts.refs)
        )));
    }

    let mut feats: Vec<Features> = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        progress("references", i, refs.len());
        feats.push(pipeline.features(&Rgb8::open(r)?, r)?);
    }
    let bank = pipeline.build_bank(&feats, opts.bank_dtype)?;
    let mut normal_scores = Vec::with_capacity(held_out.len());
    for (i, p) in held_out.iter().enumerate() {
        progress("scoring normal images", i, held_out.len());
        let insp = pipeline.inspect(&Rgb8::open(p)?, p, &bank)?;
        normal_scores.push((p.clone(), insp.score as f64));
    }
    progress("scoring normal images", held_out.len(), held_out.len());
    let scores: Vec<f64> = normal_scores.iter().map(|s| s.1).collect();
    let threshold = Threshold::from_scores(&scores, opts.rule).map_err(Error::Invalid)?;
    let d = &pipeline.description().desc;
    let header = BankHeader {
        identity: pipeline.identity(),
        model_name: d.name.clone(),
        fit: d.input.fit.to_string(),
        references: refs.iter().map(|p| display_name(p, &opts.images)).collect(),
        selection: selection.into(),
        levels: bank
            .levels
            .iter()
            .map(|l| LevelInfo {
                rows: l.rows(),
                channels: l.channels(),
                dtype: l.dtype().name().into(),
            })
            .collect(),
        threshold: threshold.clone(),
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
            threshold,
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
    Ok(Bank::new(levels))
}

/// A pipeline with its bank and threshold: inspects parts and gives verdicts.
#[derive(Debug)]
pub struct Inspector {
    pipeline: Pipeline,
    bank: Bank,
    file: BankFile,
}

impl Inspector {
    /// Load a bank file, then the pipeline it was made with; refuse a bank made for another
    /// backbone, description or projector. Without `opts.fit` the bank's fit is used.
    pub fn load(opts: &PipelineOptions, bank_path: &Path) -> Result<Self> {
        let file = BankFile::load(bank_path)?;
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
        let fit = pipeline.description().desc.input.fit;
        if fit.name() != file.header.fit {
            return Err(Error::Invalid(format!(
                "{}: bank made with fit {}, pipeline uses {fit}",
                bank_path.display(),
                file.header.fit
            )));
        }
        file.check_identity(&pipeline.identity(), bank_path)?;
        let bank = bank_from_file(&file)?;
        Ok(Self {
            pipeline,
            bank,
            file,
        })
    }

    /// The bank's header (references, threshold, identities).
    pub fn header(&self) -> &BankHeader {
        &self.file.header
    }
    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Inspect one image: map, score, timings and the verdict against the bank's threshold.
    pub fn inspect(&mut self, img: &Rgb8, path: &Path) -> Result<(Inspection, Verdict)> {
        let insp = self.pipeline.inspect(img, path, &self.bank)?;
        let v = if self.file.header.threshold.rejects(insp.score as f64) {
            Verdict::Ng
        } else {
            Verdict::Ok
        };
        Ok((insp, v))
    }
}
