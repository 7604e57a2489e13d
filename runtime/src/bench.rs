//! `edge-ad bench`: per-stage medians over real frames, and this machine's SGEMM rate measured in
//! the same run on the same threads, so kernel efficiency reads as a fraction of it.

use crate::error::{Error, Result};
use crate::images::list_images;
use crate::pipeline::Pipeline;
use crate::preprocess::Rgb8;
use edge_ad_kernels::gemm::{flops, matmul, Rhs};
use edge_ad_kernels::{residual::residual_flops, BankDtype, Par};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Folder of images: the first `refs` (sorted) build the bank, the rest are frames.
    pub images: PathBuf,
    /// Reference images in the bank.
    pub refs: usize,
    /// Timed frames (at least 20).
    pub frames: usize,
    /// Untimed frames first.
    pub warmup: usize,
    /// Bank precision.
    pub bank_dtype: BankDtype,
}

/// Medians of a benchmark run (milliseconds, GFLOP/s).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Threads of the shared pool.
    pub threads: usize,
    /// Timed frames.
    pub frames: usize,
    /// Reference images in the bank.
    pub refs: usize,
    /// Bank rows per level.
    pub bank_rows: usize,
    /// Preprocessing (resize, fit, normalise).
    pub preprocess_ms: f64,
    /// Backbone forward pass.
    pub backbone_ms: f64,
    /// True when the backbone ran through tract-cuda.
    pub backbone_on_gpu: bool,
    /// Residual search, all levels.
    pub residual_ms: f64,
    /// Projector, all levels (only with a projector).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projector_ms: Option<f64>,
    /// FeatureNorm scoring.
    pub score_ms: f64,
    /// Backbone passes (tiles) per frame, median; the stage times cover all of them.
    pub tiles: f64,
    /// Whole frame, preprocessing included.
    pub total_ms: f64,
    /// Residual similarity product rate.
    pub residual_gflops: f64,
    /// Projector rate (only with a projector).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projector_gflops: Option<f64>,
    /// This machine's SGEMM rate at the residual product's size, same threads.
    pub sgemm_gflops: f64,
    /// `total_ms / backbone_ms`.
    pub total_over_backbone: f64,
    /// GPU figures (`--device cuda`, or `auto` on a machine with a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuBench>,
}

/// The GPU side of a benchmark: device times from CUDA events, rates beside cuBLAS.
#[derive(Debug, Clone, Serialize)]
pub struct GpuBench {
    /// The device, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Its architecture, e.g. `sm_90`.
    pub arch: String,
    /// Residual search rate (similarity product, all levels), TFLOP/s.
    pub residual_tflops: f64,
    /// The projector's fused attention, median ms (only with a projector).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_ms: Option<f64>,
    /// Its rate (QKᵀ and PV products), TFLOP/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_tflops: Option<f64>,
    /// Host↔device copies per frame, median ms.
    pub transfer_ms: f64,
    /// Residual + projector + FeatureNorm on the device, median ms.
    pub kernels_ms: f64,
    /// cuBLAS fp16 GEMM (f32 accumulation) at the residual product's shape, same run, TFLOP/s.
    pub gemm_tflops: f64,
}

/// Per-column medians of per-frame rows of stage times.
fn medians<const N: usize>(rows: &[[f64; N]]) -> [f64; N] {
    std::array::from_fn(|c| median(&mut rows.iter().map(|r| r[c]).collect::<Vec<_>>()))
}

/// The frames to time, decoded once before timing.
fn load_frames(files: &[PathBuf]) -> Result<Vec<(PathBuf, Rgb8)>> {
    files
        .iter()
        .map(|p| Ok((p.clone(), Rgb8::open(p)?)))
        .collect()
}

/// This process's peak resident memory in bytes (`VmHWM` of `/proc/self/status`); `None` where
/// the kernel does not say.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// SGEMM rate (GFLOP/s) of an `m×n×k` product on the pipeline's pool, median of `reps`.
pub fn sgemm_gflops(pipeline: &Pipeline, m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; m * n];
    let mut times: Vec<f64> = pipeline.pool().install(|| {
        matmul(m, n, k, &a, &b, Rhs::NxK, &mut c, false, Par::Pool);
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                matmul(m, n, k, &a, &b, Rhs::NxK, &mut c, false, Par::Pool);
                t.elapsed().as_secs_f64()
            })
            .collect()
    });
    flops(m, n, k) / median(&mut times) / 1e9
}

/// Run the benchmark.
pub fn run(
    pipeline: &mut Pipeline,
    opts: &BenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport> {
    let files = list_images(&opts.images)?;
    if files.len() < opts.refs + 1 {
        return Err(Error::Invalid(format!(
            "{}: {} images; bench needs {} references plus at least one frame",
            opts.images.display(),
            files.len(),
            opts.refs
        )));
    }
    let load = |p: &Path| Rgb8::open(p);
    progress(&format!("building a bank from {} references", opts.refs));
    let mut refs = Vec::with_capacity(opts.refs);
    for p in &files[..opts.refs] {
        refs.push(pipeline.frame_features(&load(p)?, p)?);
    }
    // Every level: the worst case of any level choice.
    let all: Vec<usize> = (0..pipeline.description().desc.taps.len()).collect();
    let bank =
        pipeline.bank_from_frames(&refs.iter().collect::<Vec<_>>(), opts.bank_dtype, &all)?;
    let frames = load_frames(&files[opts.refs..])?;
    let frames_n = opts.frames.max(20);
    progress(&format!(
        "{} warm-up + {} timed frames on {} threads",
        opts.warmup,
        frames_n,
        pipeline.threads()
    ));
    let mut rows = Vec::with_capacity(frames_n);
    let (mut windows, mut res_sum, mut proj_sum, mut att_sum) = (0usize, 0.0f64, 0.0f64, 0.0f64);
    for i in 0..opts.warmup + frames_n {
        let (p, img) = &frames[i % frames.len()];
        let r = pipeline.inspect(img, p, &bank)?;
        if i >= opts.warmup {
            let tm = r.timings;
            rows.push([
                tm.preprocess_ms,
                tm.backbone_ms,
                tm.residual_ms,
                tm.projector_ms,
                tm.score_ms,
                tm.total_ms,
                tm.tiles as f64,
                tm.attention_ms,
                tm.transfer_ms,
                tm.residual_ms + tm.projector_ms + tm.score_ms,
            ]);
            windows += tm.tiles;
            res_sum += tm.residual_ms;
            proj_sum += tm.projector_ms;
            att_sum += tm.attention_ms;
        }
    }
    let [pre, bb, res, proj, score, total, tiles, att, transfer, kernels] = medians(&rows);
    let d = &pipeline.description().desc;
    let (p, c) = (d.positions(), d.features.channels);
    let rows = bank.levels[0].rows();
    let res_flops: f64 = bank
        .levels
        .iter()
        .map(|l| residual_flops(p, l.rows(), c))
        .sum();
    let proj_flops = pipeline
        .projector()
        .map(|pr| pr.levels().iter().map(|l| l.flops(p)).sum::<f64>());
    progress("measuring SGEMM at the residual product's size");
    let sgemm = sgemm_gflops(pipeline, p, rows, c, 30);
    let gpu = match pipeline.gpu() {
        None => None,
        Some(g) => {
            progress("measuring the cuBLAS fp16 GEMM at the residual product's size");
            let gemm = g
                .gemm_f16_tflops(p, rows, c, 50)
                .map_err(|e| Error::Gpu(e.to_string()))?;
            let att_flops = pipeline.projector().map(|pr| {
                pr.levels()
                    .iter()
                    .map(|l| 4.0 * (p * l.refs() * c) as f64)
                    .sum::<f64>()
            });
            Some(GpuBench {
                name: g.name(),
                arch: g.arch().to_string(),
                residual_tflops: res_flops * windows as f64 / (res_sum * 1e-3) / 1e12,
                attention_ms: att_flops.map(|_| att),
                attention_tflops: att_flops
                    .map(|f| f * windows as f64 / (att_sum.max(1e-12) * 1e-3) / 1e12),
                transfer_ms: transfer,
                kernels_ms: kernels,
                gemm_tflops: gemm,
            })
        }
    };
    Ok(BenchReport {
        threads: pipeline.threads(),
        frames: frames_n,
        refs: opts.refs,
        bank_rows: rows,
        preprocess_ms: pre,
        backbone_ms: bb,
        backbone_on_gpu: pipeline.backbone().on_gpu(),
        residual_ms: res,
        projector_ms: proj_flops.map(|_| proj),
        score_ms: score,
        total_ms: total,
        tiles,
        residual_gflops: res_flops * windows as f64 / (res_sum * 1e-3) / 1e9,
        projector_gflops: proj_flops.map(|f| f * windows as f64 / (proj_sum * 1e-3) / 1e9),
        sgemm_gflops: sgemm,
        total_over_backbone: total / bb,
        gpu,
    })
}

/// Medians of a calibrated bank inspecting frames the way the line does ([`run_bank`]).
#[derive(Debug, Clone, Serialize)]
pub struct BankBenchReport {
    /// Threads of the shared pool.
    pub threads: usize,
    /// Timed frames.
    pub frames: usize,
    /// The bank's reference selection (`aligned (seed 0): 8 of 60 per frame`, `kmeans …`).
    pub selection: String,
    /// Levels scored, 1-based.
    pub levels: Vec<usize>,
    /// The bank file's size in bytes (its features stay in memory while inspecting).
    pub bank_bytes: u64,
    /// Backbone passes (tiles) per frame, median.
    pub tiles: f64,
    /// Preprocessing (timed with the backbone on the aligned path: 0 there).
    pub preprocess_ms: f64,
    /// Backbone forward passes.
    pub backbone_ms: f64,
    /// Choosing the frame's references and building its bank (aligned banks; 0 otherwise).
    pub align_ms: f64,
    /// Residual search, scored levels.
    pub residual_ms: f64,
    /// Projector (only with a projector; 0 otherwise).
    pub projector_ms: f64,
    /// FeatureNorm scoring.
    pub score_ms: f64,
    /// Whole frame.
    pub total_ms: f64,
    /// This process's peak resident memory after the run, MB (`None` where the kernel does not
    /// say): model, bank and frames together.
    pub peak_rss_mb: Option<f64>,
}

/// Time `inspector` (a calibrated bank: any selection, the scored levels only) on the images of
/// `images`, cycled: the per-frame cost of a bank as calibrate made it, which the fixed-bank
/// [`run`] (first `refs` images, every level) does not show for aligned references.
pub fn run_bank(
    inspector: &mut crate::inspector::Inspector,
    bank_path: &Path,
    images: &Path,
    frames: usize,
    warmup: usize,
    mut progress: impl FnMut(&str),
) -> Result<BankBenchReport> {
    let files = list_images(images)?;
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no image files to time",
            images.display()
        )));
    }
    let imgs = load_frames(&files)?;
    let frames_n = frames.max(20);
    progress(&format!(
        "{warmup} warm-up + {frames_n} timed frames on {} threads",
        inspector.pipeline().threads()
    ));
    let mut rows = Vec::with_capacity(frames_n);
    for i in 0..warmup + frames_n {
        let (p, img) = &imgs[i % imgs.len()];
        let (insp, _) = inspector.inspect(img, p)?;
        if i >= warmup {
            let tm = insp.timings;
            rows.push([
                tm.tiles as f64,
                tm.preprocess_ms,
                tm.backbone_ms,
                tm.align_ms,
                tm.residual_ms,
                tm.projector_ms,
                tm.score_ms,
                tm.total_ms,
            ]);
        }
    }
    let [tiles, pre, bb, align, res, proj, score, total] = medians(&rows);
    let h = inspector.header();
    Ok(BankBenchReport {
        threads: inspector.pipeline().threads(),
        frames: frames_n,
        selection: h.selection.clone(),
        levels: h.scored_levels(),
        bank_bytes: std::fs::metadata(bank_path)
            .map_err(|e| Error::io(bank_path, e))?
            .len(),
        tiles,
        preprocess_ms: pre,
        backbone_ms: bb,
        align_ms: align,
        residual_ms: res,
        projector_ms: proj,
        score_ms: score,
        total_ms: total,
        peak_rss_mb: peak_rss_bytes().map(|b| b as f64 / 1e6),
    })
}
