//! The one inspection pipeline (architecture: "one library API"): prepare → backbone taps →
//! residual search per level (§3.3) → optional projector (§4) → FeatureNorm map and score (§5).
//!
//! A [`Pipeline`] owns the loaded stages, one thread pool shared by tract and the kernels, and the
//! per-frame workspaces; a [`Bank`] holds the reference features. Every command is a thin user of
//! [`Pipeline::features`], [`Pipeline::build_bank`] and [`Pipeline::inspect`].

use crate::backbone::{tract_executor, Backbone};
use crate::error::{Error, Result};
use crate::model::{Fit, LoadedDescription, ModelDescription};
use crate::preprocess::{prepare, Placement, Rgb8};
use edge_ad_kernels::{
    nearest_residual, BankDtype, FeatureNorm, LevelBank, Par, Projector, ProjectorWorkspace,
    ResidualWorkspace, ScoreWorkspace,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Model description (TOML).
    pub model: PathBuf,
    /// ONNX file overriding the description's.
    pub onnx: Option<PathBuf>,
    /// ADPretrain projector weights (safetensors); none = FeatureNorm on raw residuals.
    pub projector: Option<PathBuf>,
    /// Threads shared by backbone and kernels; 0 = all cores.
    pub threads: usize,
    /// Overrides the description's `input.fit`.
    pub fit: Option<Fit>,
    /// Where the kernels after the backbone run.
    pub device: Device,
}

/// Where the residual search and FeatureNorm run (the backbone stays on tract's CPU path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU kernels.
    Cpu,
    /// The CUDA kernels; an error when no usable GPU is present.
    Cuda,
    /// CUDA when a GPU is usable, else the CPU with one log line saying why.
    #[default]
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            other => Err(format!(
                "unknown device `{other}`: expected cpu, cuda or auto"
            )),
        }
    }
}

/// Per-stage wall time of one frame, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Resize, fit and normalisation.
    pub preprocess_ms: f64,
    /// The backbone forward pass.
    pub backbone_ms: f64,
    /// Nearest-neighbour residuals, all levels.
    pub residual_ms: f64,
    /// The projector, all levels (0 without one).
    pub projector_ms: f64,
    /// FeatureNorm map and score.
    pub score_ms: f64,
    /// All of the above.
    pub total_ms: f64,
}

/// The result of inspecting one frame.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Image score: the maximum of the smoothed map (spec §5.2 step 4).
    pub score: f32,
    /// Anomaly map `H × W` over the network input window.
    pub map: Vec<f32>,
    /// Map size `(H, W)`.
    pub map_size: (usize, usize),
    /// Where the window lies in the frame.
    pub placement: Placement,
    /// Stage timings.
    pub timings: Timings,
}

/// Backbone features of one frame: per level, `positions × channels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// Level features in level order.
    pub levels: Vec<Vec<f32>>,
}

/// Reference features of K normal images, one [`LevelBank`] per level (spec §3.1 layout:
/// image-major, then positions row-major). A GPU copy is made on the first GPU inspection and kept.
pub struct Bank {
    /// Banks in level order.
    pub levels: Vec<LevelBank>,
    gpu: std::sync::OnceLock<Vec<edge_ad_kernels::cuda::GpuBank>>,
}

impl Clone for Bank {
    fn clone(&self) -> Self {
        Self::new(self.levels.clone())
    }
}

impl std::fmt::Debug for Bank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bank")
            .field("levels", &self.levels)
            .field("on_gpu", &self.gpu.get().is_some())
            .finish()
    }
}

impl Bank {
    /// A bank of these levels.
    pub fn new(levels: Vec<LevelBank>) -> Self {
        Self {
            levels,
            gpu: std::sync::OnceLock::new(),
        }
    }

    /// Concatenate the features of the reference images (each `levels × positions × channels`),
    /// rounded to `dtype`.
    pub fn from_features(refs: &[Features], channels: usize, dtype: BankDtype) -> Result<Self> {
        let first = refs
            .first()
            .ok_or_else(|| Error::Invalid("a bank needs at least one reference image".into()))?;
        let mut levels = Vec::with_capacity(first.levels.len());
        for l in 0..first.levels.len() {
            let rows = first.levels[l].len();
            let mut all = Vec::with_capacity(rows * refs.len());
            for (k, f) in refs.iter().enumerate() {
                if f.levels.len() != first.levels.len() || f.levels[l].len() != rows {
                    return Err(Error::Invalid(format!(
                        "reference {k}: features of another shape than reference 0"
                    )));
                }
                all.extend_from_slice(&f.levels[l]);
            }
            levels.push(LevelBank::new(
                all.len() / channels.max(1),
                channels,
                &all,
                dtype,
            )?);
        }
        Ok(Self::new(levels))
    }
}

/// Reusable per-frame buffers (no allocation per frame once warm).
#[derive(Debug, Default)]
pub struct FrameState {
    taps: Vec<Vec<f32>>,
    residual: Vec<Vec<f32>>,
    projected: Vec<Vec<f32>>,
    argmax: Vec<Vec<u32>>,
    level_maps: Vec<f32>,
    residual_ws: ResidualWorkspace,
    projector_ws: ProjectorWorkspace,
    score_ws: ScoreWorkspace,
}

impl FrameState {
    /// Backbone features of the last frame, per level `positions × channels`.
    pub fn taps(&self) -> &[Vec<f32>] {
        &self.taps
    }
    /// Bank row chosen for every position of the last frame, per level.
    pub fn argmax(&self) -> &[Vec<u32>] {
        &self.argmax
    }
    /// Residuals of the last frame, per level.
    pub fn residuals(&self) -> &[Vec<f32>] {
        &self.residual
    }
    /// Projector outputs of the last frame, per level (empty without a projector).
    pub fn projected(&self) -> &[Vec<f32>] {
        &self.projected
    }
    /// Per-level FeatureNorm grids of the last frame, `levels × positions`.
    pub fn level_maps(&self) -> &[f32] {
        &self.level_maps
    }
}

/// The loaded stages of the pipeline.
pub struct Pipeline {
    desc: LoadedDescription,
    backbone: Backbone,
    projector: Option<(Projector, PathBuf, String)>,
    scorer: FeatureNorm,
    pool: Arc<rayon::ThreadPool>,
    gpu: Option<edge_ad_kernels::cuda::Gpu>,
    state: FrameState,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("model", &self.desc.path)
            .field("backbone", &self.backbone)
            .field("projector", &self.projector.as_ref().map(|p| &p.1))
            .field("threads", &self.pool.current_num_threads())
            .finish()
    }
}

impl Pipeline {
    /// Load model description, backbone and projector; build the shared thread pool.
    pub fn load(opts: &PipelineOptions) -> Result<Self> {
        let mut desc = ModelDescription::load(&opts.model)?;
        if let Some(fit) = opts.fit {
            desc.desc.input.fit = fit;
        }
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.threads
        };
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("edge-ad-{i}"))
                .build()
                .map_err(|e| Error::Invalid(format!("cannot start {threads} threads: {e}")))?,
        );
        let d = &desc.desc;
        let projector = match &opts.projector {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                let p = pool
                    .install(|| Projector::from_safetensors(&bytes))
                    .map_err(|source| Error::Projector {
                        path: path.clone(),
                        source,
                    })?;
                if p.levels().len() != d.taps.len()
                    || p.levels()
                        .iter()
                        .any(|l| l.channels() != d.features.channels)
                {
                    return Err(Error::Invalid(format!(
                        "{}: projector has {} levels of {:?} channels, but the model {} has {} levels of {} channels",
                        path.display(),
                        p.levels().len(),
                        p.levels().iter().map(|l| l.channels()).collect::<Vec<_>>(),
                        desc.path.display(),
                        d.taps.len(),
                        d.features.channels
                    )));
                }
                Some((
                    p,
                    path.clone(),
                    edge_ad_calibration::bankfile::sha256_hex(&bytes),
                ))
            }
        };
        let backbone = {
            let exec = tract_executor(pool.clone());
            tract_linalg::multithread::multithread_tract_scope(exec, || {
                Backbone::load(&desc, opts.onnx.as_deref())
            })?
        };
        let norm = d.norm_form().map_err(|message| Error::ModelDescription {
            path: desc.path.clone(),
            message,
        })?;
        let grid = (d.features.grid[0], d.features.grid[1]);
        let scorer = FeatureNorm::new(
            grid,
            (d.input.size[0], d.input.size[1]),
            d.score.sigma,
            norm,
        )?;
        let levels = d.taps.len();
        let state = FrameState {
            taps: vec![Vec::new(); levels],
            residual: vec![Vec::new(); levels],
            projected: vec![Vec::new(); if projector.is_some() { levels } else { 0 }],
            argmax: vec![Vec::new(); levels],
            ..Default::default()
        };
        let gpu = open_gpu(opts.device)?;
        Ok(Self {
            desc,
            backbone,
            projector,
            scorer,
            pool,
            gpu,
            state,
        })
    }

    /// The model description in use.
    pub fn description(&self) -> &LoadedDescription {
        &self.desc
    }
    /// The backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }
    /// The projector, if one is loaded.
    pub fn projector(&self) -> Option<&Projector> {
        self.projector.as_ref().map(|p| &p.0)
    }
    /// What a bank built by this pipeline depends on: ONNX bytes, description bytes, projector.
    pub fn identity(&self) -> edge_ad_calibration::Identity {
        edge_ad_calibration::Identity {
            onnx_sha256: self
                .backbone
                .onnx_sha256()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            model_sha256: edge_ad_calibration::bankfile::sha256_hex(&self.desc.bytes),
            projector_sha256: self.projector.as_ref().map(|p| p.2.clone()),
        }
    }

    /// The GPU architecture the kernels run on, if any (`None`: CPU kernels).
    pub fn gpu_arch(&self) -> Option<&str> {
        self.gpu.as_ref().map(|g| g.arch())
    }

    /// Threads of the shared pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
    /// The shared pool (for callers that want to time other work on the same threads).
    pub fn pool(&self) -> &Arc<rayon::ThreadPool> {
        &self.pool
    }
    /// Buffers of the last frame (taps, argmax, residuals, level maps).
    pub fn frame(&self) -> &FrameState {
        &self.state
    }

    /// Prepare an image for the network (spec §1 and the `fit` mode).
    /// Runs on the shared pool (the resampler splits rows over it).
    pub fn prepare(&self, img: &Rgb8, path: &Path) -> Result<crate::preprocess::Prepared> {
        let input = &self.desc.desc.input;
        self.pool
            .install(|| prepare(img, input))
            .map_err(|message| Error::Image {
                path: path.into(),
                message,
            })
    }

    fn run_backbone(&mut self, chw: &[f32]) -> Result<()> {
        let exec = tract_executor(self.pool.clone());
        let (backbone, taps) = (&mut self.backbone, &mut self.state.taps);
        self.pool.install(|| {
            tract_linalg::multithread::multithread_tract_scope(exec, || backbone.run(chw, taps))
        })
    }

    /// Backbone features of one image (for building banks).
    pub fn features(&mut self, img: &Rgb8, path: &Path) -> Result<Features> {
        let prepared = self.prepare(img, path)?;
        self.run_backbone(&prepared.chw)?;
        Ok(Features {
            levels: self.state.taps.clone(),
        })
    }

    /// A bank from reference features (spec §3.1).
    pub fn build_bank(&self, refs: &[Features], dtype: BankDtype) -> Result<Bank> {
        Bank::from_features(refs, self.desc.desc.features.channels, dtype)
    }

    fn check_bank(&self, bank: &Bank) -> Result<()> {
        let d = &self.desc.desc;
        if bank.levels.len() != d.taps.len()
            || bank
                .levels
                .iter()
                .any(|l| l.channels() != d.features.channels)
        {
            return Err(Error::Invalid(format!(
                "bank has {} levels of {:?} channels; the model {} has {} levels of {} channels",
                bank.levels.len(),
                bank.levels.iter().map(|l| l.channels()).collect::<Vec<_>>(),
                self.desc.path.display(),
                d.taps.len(),
                d.features.channels
            )));
        }
        Ok(())
    }

    /// Inspect one frame against `bank`: the whole chain, timed per stage.
    pub fn inspect(&mut self, img: &Rgb8, path: &Path, bank: &Bank) -> Result<Inspection> {
        self.check_bank(bank)?;
        let t0 = Instant::now();
        let prepared = self.prepare(img, path)?;
        let t1 = Instant::now();
        self.run_backbone(&prepared.chw)?;
        let t2 = Instant::now();
        let (mut timings, score, map) = self.score_taps(bank)?;
        timings.preprocess_ms = ms(t1 - t0);
        timings.backbone_ms = ms(t2 - t1);
        timings.total_ms = ms(t2.elapsed()) + timings.preprocess_ms + timings.backbone_ms;
        Ok(Inspection {
            score,
            map,
            map_size: self.scorer.out_size(),
            placement: prepared.placement,
            timings,
        })
    }

    /// Everything after the backbone, on the taps held in the frame state: residuals, projector,
    /// score. Exposed so that benchmarks and conformance tests can feed their own features.
    pub fn score_taps(&mut self, bank: &Bank) -> Result<(Timings, f32, Vec<f32>)> {
        self.check_bank(bank)?;
        let mut timings = Timings::default();
        let st = &mut self.state;
        let (projector, scorer, gpu) = (&self.projector, &self.scorer, &self.gpu);
        let p = self.desc.desc.features.grid[0] * self.desc.desc.features.grid[1];
        let (h, w) = scorer.out_size();
        let mut map = vec![0.0f32; h * w];
        let gpu_err = |e: edge_ad_kernels::cuda::CudaError| Error::Gpu(e.to_string());
        let gpu_banks = match gpu {
            Some(g) => {
                if bank.gpu.get().is_none() {
                    let up = bank
                        .levels
                        .iter()
                        .map(|l| g.upload_bank(l))
                        .collect::<Result<Vec<_>, _>>();
                    let _ = bank.gpu.set(up.map_err(gpu_err)?);
                }
                bank.gpu.get()
            }
            None => None,
        };
        let score = self.pool.install(|| -> Result<f32> {
            let t = Instant::now();
            for (l, lb) in bank.levels.iter().enumerate() {
                st.argmax[l].resize(p, 0);
                st.residual[l].resize(st.taps[l].len(), 0.0);
                match (gpu, gpu_banks) {
                    (Some(g), Some(gb)) => g
                        .nearest_residual(
                            &st.taps[l],
                            &gb[l],
                            &mut st.argmax[l],
                            &mut st.residual[l],
                        )
                        .map_err(gpu_err)?,
                    _ => nearest_residual(
                        &st.taps[l],
                        lb,
                        &mut st.residual_ws,
                        &mut st.argmax[l],
                        &mut st.residual[l],
                        Par::Pool,
                    )?,
                }
            }
            timings.residual_ms = ms(t.elapsed());
            let t = Instant::now();
            if let Some((proj, _, _)) = projector {
                for (l, lp) in proj.levels().iter().enumerate() {
                    st.projected[l].resize(st.residual[l].len(), 0.0);
                    lp.forward(
                        &st.residual[l],
                        &mut st.projected[l],
                        &mut st.projector_ws,
                        Par::Pool,
                    )?;
                }
            }
            timings.projector_ms = ms(t.elapsed());
            let t = Instant::now();
            let feats = if projector.is_some() {
                &st.projected
            } else {
                &st.residual
            };
            let views: Vec<&[f32]> = feats.iter().map(Vec::as_slice).collect();
            st.level_maps.resize(views.len() * p, 0.0);
            let s = match gpu {
                Some(g) => {
                    // Per-level grids for the frame state stay CPU-computed (cheap, 4 × 256 norms).
                    for (v, lm) in views.iter().zip(st.level_maps.chunks_exact_mut(p)) {
                        scorer.level_map(v, lm)?;
                    }
                    g.featurenorm(scorer, &views, &mut map).map_err(gpu_err)?
                }
                None => scorer.score(
                    &views,
                    &mut map,
                    Some(&mut st.level_maps),
                    &mut st.score_ws,
                    Par::Pool,
                )?,
            };
            timings.score_ms = ms(t.elapsed());
            Ok(s)
        })?;
        timings.total_ms = timings.residual_ms + timings.projector_ms + timings.score_ms;
        Ok((timings, score, map))
    }

    /// Replace the frame's taps with given features (benchmarks, conformance tests).
    pub fn set_taps(&mut self, features: &Features) -> Result<()> {
        if features.levels.len() != self.state.taps.len() {
            return Err(Error::Invalid(format!(
                "{} levels of features for a model of {} levels",
                features.levels.len(),
                self.state.taps.len()
            )));
        }
        self.state.taps.clone_from(&features.levels);
        Ok(())
    }
}

/// The GPU for `device`: `Auto` falls back to the CPU with one log line (info when no driver is
/// installed, the normal case on a CPU box; warn when a driver is there but the GPU failed).
fn open_gpu(device: Device) -> Result<Option<edge_ad_kernels::cuda::Gpu>> {
    use edge_ad_kernels::cuda::{CudaError, Gpu};
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda => {
            let g = Gpu::new().map_err(|e| Error::Gpu(format!("--device cuda: {e}")))?;
            log::info!("CUDA kernels on {}", g.arch());
            Ok(Some(g))
        }
        Device::Auto => match Gpu::new() {
            Ok(g) => {
                log::info!("CUDA kernels on {}", g.arch());
                Ok(Some(g))
            }
            Err(CudaError::NoDriver) => {
                log::info!("no CUDA driver: residual search and scoring run on the CPU");
                Ok(None)
            }
            Err(e) => {
                log::warn!("CUDA unavailable ({e}); residual search and scoring run on the CPU");
                Ok(None)
            }
        },
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
