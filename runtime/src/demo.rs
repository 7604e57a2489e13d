//! `edge-ad demo`: the product loop on bundled data, offline. Calibrates on the bundled good
//! parts, inspects the bundled test parts through the same [`Inspector`] the line uses, writes
//! heatmaps, and checks each verdict against the part's folder (`good` → OK, anything else → NG).

use crate::error::{Error, Result};
use crate::heatmap::{self, Scale};
use crate::images::list_images;
use crate::inspector::{calibrate, CalibrateOptions, Inspector, Verdict};
use crate::pipeline::{Device, Pipeline, PipelineOptions};
use crate::preprocess::Rgb8;
use edge_ad_calibration::BankFile;
use std::path::{Path, PathBuf};

/// References the demo calibrates with (the bundled `good/` folder has 8 parts).
pub const DEMO_REFS: usize = 4;

/// Where the bundled demo lives: `$EDGE_AD_DEMO_DIR`, `<exe>/../share/edge-ad/demo` (installed),
/// or the repository's `demo/` (built from source).
pub fn find_demo_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("EDGE_AD_DEMO_DIR").map(PathBuf::from),
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|p| p.join("../share/edge-ad/demo"))),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("efficientnet-lite0.toml").is_file())
}

/// One inspected demo part.
#[derive(Debug, Clone)]
pub struct DemoPart {
    /// Image file.
    pub path: PathBuf,
    /// Image score.
    pub score: f32,
    /// Verdict against the threshold.
    pub verdict: Verdict,
    /// Verdict the part's folder implies.
    pub expected: Verdict,
    /// Whole-frame time in ms.
    pub ms: f64,
}

/// Outcome of a demo run.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// Parts in inspection order.
    pub parts: Vec<DemoPart>,
    /// The threshold the calibration set.
    pub threshold: f64,
    /// Bank file written.
    pub bank: PathBuf,
    /// Heatmap folder.
    pub heatmaps: PathBuf,
}

impl DemoSummary {
    /// Parts whose verdict matches their folder.
    pub fn correct(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| p.verdict == p.expected)
            .count()
    }
}

/// Run the demo from `demo` into `out` (created), reporting each part through `on_part`.
pub fn run_demo(
    demo: &Path,
    out: &Path,
    threads: usize,
    device: Device,
    mut on_part: impl FnMut(&DemoPart),
) -> Result<DemoSummary> {
    let model = demo.join("efficientnet-lite0.toml");
    let opts = PipelineOptions {
        model,
        threads,
        device,
        ..Default::default()
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let bank = out.join("demo-bank.eab");
    let mut pipeline = Pipeline::load(&opts)?;
    let cal = CalibrateOptions {
        images: demo.join("images/good"),
        refs: DEMO_REFS,
        ..Default::default()
    };
    let (file, _) = calibrate(&mut pipeline, &cal, |_, _, _| {})?;
    file.save(&bank)?;
    // Inspect from the bank as written, as the line does; the loaded pipeline is reused.
    let mut inspector = Inspector::with_pipeline(pipeline, BankFile::load(&bank)?, &bank)?;
    let th = inspector.header().threshold.clone();
    let scale = Scale::for_threshold(th.normal_min, th.value);
    let heatmaps = out.join("heatmaps");
    std::fs::create_dir_all(&heatmaps).map_err(|e| Error::io(&heatmaps, e))?;
    let test_root = demo.join("images/test");
    let mut parts = Vec::new();
    for path in list_images(&test_root)? {
        let img = Rgb8::open(&path)?;
        let (insp, verdict) = inspector.inspect(&img, &path)?;
        let rel = path.strip_prefix(&test_root).unwrap_or(&path);
        let class = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        let expected = if class == "good" {
            Verdict::Ok
        } else {
            Verdict::Ng
        };
        let png = heatmap::render(&img, &insp, scale, &format!("{:.2} {verdict}", insp.score));
        let name = rel.to_string_lossy().replace(['/', '\\'], "_");
        let dst = heatmaps.join(name);
        image::RgbImage::from_raw(png.width as u32, png.height as u32, png.data)
            .ok_or_else(|| Error::Invalid("heatmap buffer size".into()))?
            .save(&dst)
            .map_err(|e| Error::Image {
                path: dst.clone(),
                message: format!("cannot write heatmap: {e}"),
            })?;
        let part = DemoPart {
            path,
            score: insp.score,
            verdict,
            expected,
            ms: insp.timings.total_ms,
        };
        on_part(&part);
        parts.push(part);
    }
    Ok(DemoSummary {
        parts,
        threshold: th.value,
        bank,
        heatmaps,
    })
}
