//! The one inspection pipeline (architecture: "one library API"): prepare → backbone taps →
//! residual search per level (§3.3) → optional projector (§4) → FeatureNorm map and score (§5).
//!
//! A [`Pipeline`] owns the loaded stages, one thread pool shared by tract and the kernels, and the
//! per-frame workspaces; a [`Bank`] holds the reference features. Every command is a thin user of
//! [`Pipeline::features`], [`Pipeline::build_bank`] and [`Pipeline::inspect`].

use crate::backbone::{tract_executor, Backbone};
use crate::error::{Error, Result};
use crate::model::{Fit, LoadedDescription, ModelDescription};
use crate::preprocess::{prepare, prepare_frame, Placement, PreparedFrame, Rgb8};
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
    /// GPU only: the projector's fused LKV attention (inside `projector_ms`).
    pub attention_ms: f64,
    /// GPU only: the frame's two host↔device copies (features in, results out).
    pub transfer_ms: f64,
    /// Choosing the frame's references and building its bank (semantic-aligned banks only).
    pub align_ms: f64,
    /// All of the above.
    pub total_ms: f64,
    /// Backbone passes (tiles) the frame took; the backbone and kernel times cover all of them.
    pub tiles: usize,
}

/// The result of inspecting one frame.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Image score: the maximum of the smoothed map (spec §5.2 step 4; for tiles the maximum
    /// over all tiles).
    pub score: f32,
    /// Anomaly map `H × W` over the network input window, or for tiles over the whole resized
    /// frame (tile maps stitched, maximum where they overlap).
    pub map: Vec<f32>,
    /// Map size `(H, W)`.
    pub map_size: (usize, usize),
    /// Where the window lies in the frame.
    pub placement: Placement,
    /// Stage timings.
    pub timings: Timings,
}

/// Backbone features of one network input: per level, `positions × channels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// Level features in level order.
    pub levels: Vec<Vec<f32>>,
}

/// Backbone features of every window of one frame (one for crop/stretch/pad, the tiles for tile),
/// with the geometry to stitch their maps: what banks are built from and what `eval` caches.
#[derive(Debug, Clone)]
pub struct FrameFeatures {
    /// Features per window.
    pub tiles: Vec<Features>,
    /// Each window's top-left corner in the stitched map.
    pub offsets: Vec<(usize, usize)>,
    /// Where the stitched map lies in the frame.
    pub placement: Placement,
    /// Stitched map size `(height, width)`.
    pub map_size: (usize, usize),
}

impl Inspection {
    /// For every frame column and row, the map column / row it shows (nearest sample through
    /// ROI → resized image → window), or `None` outside the inspected window. The mapping is
    /// separable, so two short tables serve the whole frame; heatmaps and `eval` both use it.
    pub fn frame_axes(
        &self,
        frame_w: usize,
        frame_h: usize,
    ) -> (Vec<Option<usize>>, Vec<Option<usize>>) {
        let (mh, mw) = self.map_size;
        let pl = self.placement;
        let axis =
            |n: usize, origin: usize, region: usize, resized: usize, offset: i64, map: usize| {
                (0..n)
                    .map(|i| {
                        let r = i as i64 - origin as i64;
                        if !(0..region as i64).contains(&r) {
                            return None;
                        }
                        let m = ((r as f64 + 0.5) * resized as f64 / region as f64).floor() as i64
                            - offset;
                        (0..map as i64).contains(&m).then_some(m as usize)
                    })
                    .collect()
            };
        (
            axis(
                frame_w,
                pl.origin.0,
                pl.frame.0,
                pl.resized.0,
                pl.offset.0,
                mw,
            ),
            axis(
                frame_h,
                pl.origin.1,
                pl.frame.1,
                pl.resized.1,
                pl.offset.1,
                mh,
            ),
        )
    }

    /// The map resampled onto the frame's pixel grid (`frame_w × frame_h`, [`Self::frame_axes`]);
    /// pixels outside the inspected window get the map's minimum.
    pub fn frame_map(&self, frame_w: usize, frame_h: usize) -> Vec<f32> {
        let mw = self.map_size.1;
        let (cols, rows) = self.frame_axes(frame_w, frame_h);
        let floor = self.map.iter().copied().fold(f32::INFINITY, f32::min);
        let mut out = vec![floor; frame_w * frame_h];
        for (y, row) in rows.iter().enumerate() {
            let Some(my) = row else { continue };
            for (x, col) in cols.iter().enumerate() {
                if let Some(mx) = col {
                    out[y * frame_w + x] = self.map[my * mw + mx];
                }
            }
        }
        out
    }
}

/// Reference features of K normal images, one [`LevelBank`] per level (spec §3.1 layout:
/// image-major, then positions row-major). A GPU copy is made on the first GPU inspection and kept.
pub struct Bank {
    /// Banks of the scored levels, in level order.
    pub levels: Vec<LevelBank>,
    /// The tap (0-based level index of the model) each bank level belongs to, increasing.
    taps: Vec<usize>,
    gpu: std::sync::OnceLock<Vec<edge_ad_kernels::cuda::GpuBank>>,
}

impl Clone for Bank {
    fn clone(&self) -> Self {
        Self {
            levels: self.levels.clone(),
            taps: self.taps.clone(),
            gpu: std::sync::OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Bank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bank")
            .field("levels", &self.levels)
            .field("taps", &self.taps)
            .field("on_gpu", &self.gpu.get().is_some())
            .finish()
    }
}

impl Bank {
    /// A bank scoring every level of the model, in order.
    pub fn new(levels: Vec<LevelBank>) -> Self {
        let taps = (0..levels.len()).collect();
        Self {
            levels,
            taps,
            gpu: std::sync::OnceLock::new(),
        }
    }

    /// A bank scoring only the model levels `taps` (0-based, strictly increasing, one per bank
    /// level).
    pub fn with_taps(levels: Vec<LevelBank>, taps: Vec<usize>) -> Result<Self> {
        if taps.len() != levels.len() || taps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Invalid(format!(
                "bank levels {taps:?} must be strictly increasing, one per bank level ({})",
                levels.len()
            )));
        }
        Ok(Self {
            levels,
            taps,
            gpu: std::sync::OnceLock::new(),
        })
    }

    /// The model levels (0-based) this bank scores.
    pub fn taps(&self) -> &[usize] {
        &self.taps
    }

    /// The same bank restricted to the model levels `taps` (a subset of [`Bank::taps`]).
    pub fn select(&self, taps: &[usize]) -> Result<Self> {
        let mut levels = Vec::with_capacity(taps.len());
        for t in taps {
            let i = self.taps.iter().position(|x| x == t).ok_or_else(|| {
                Error::Invalid(format!(
                    "level {} is not in this bank (levels {:?})",
                    t + 1,
                    self.taps.iter().map(|t| t + 1).collect::<Vec<_>>()
                ))
            })?;
            levels.push(self.levels[i].clone());
        }
        Self::with_taps(levels, taps.to_vec())
    }

    /// Concatenate the features of the reference images (each `levels × positions × channels`),
    /// rounded to `dtype`.
    pub fn from_features(refs: &[Features], channels: usize, dtype: BankDtype) -> Result<Self> {
        let all: Vec<&Features> = refs.iter().collect();
        let n = refs.first().map_or(0, |f| f.levels.len());
        Self::from_windows(&all, channels, dtype, &(0..n).collect::<Vec<_>>())
    }

    /// A bank of the model levels `taps` from the windows (images or tiles) of the references.
    pub fn from_windows(
        refs: &[&Features],
        channels: usize,
        dtype: BankDtype,
        taps: &[usize],
    ) -> Result<Self> {
        let first = refs
            .first()
            .ok_or_else(|| Error::Invalid("a bank needs at least one reference image".into()))?;
        if let Some(t) = taps.iter().find(|&&t| t >= first.levels.len()) {
            return Err(Error::Invalid(format!(
                "level {} asked for; the model has {} levels",
                t + 1,
                first.levels.len()
            )));
        }
        let mut levels = Vec::with_capacity(taps.len());
        for &l in taps {
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
        Self::with_taps(levels, taps.to_vec())
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
    /// Residuals of the last frame, per level (CPU path; on the GPU they stay on the device and
    /// this is empty).
    pub fn residuals(&self) -> &[Vec<f32>] {
        &self.residual
    }
    /// Projector outputs of the last frame, per level (empty without a projector, and on the GPU
    /// path, where they stay on the device).
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
    gpu: Option<GpuSide>,
    state: FrameState,
}

/// The GPU side of a pipeline: the device, the projector's levels on it, and one frame's buffers
/// (sized on the first frame, for the bank's level count; issue: memory).
struct GpuSide {
    gpu: edge_ad_kernels::cuda::Gpu,
    projector: Option<Vec<edge_ad_kernels::cuda::GpuProjector>>,
    frame: Option<edge_ad_kernels::cuda::GpuFrame>,
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
            desc.desc = desc
                .desc
                .with_fit(fit)
                .map_err(|message| Error::ModelDescription {
                    path: opts.model.clone(),
                    message,
                })?;
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
                load_backbone(&desc, opts.onnx.as_deref(), opts.device)
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
        let gpu = open_gpu(opts.device, projector.as_ref().map(|p| &p.0))?;
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

    /// The GPU the kernels run on, if any (`None`: CPU kernels).
    pub fn gpu(&self) -> Option<&edge_ad_kernels::cuda::Gpu> {
        self.gpu.as_ref().map(|g| &g.gpu)
    }

    /// The GPU architecture the kernels run on, if any (`None`: CPU kernels).
    pub fn gpu_arch(&self) -> Option<&str> {
        self.gpu.as_ref().map(|g| g.gpu.arch())
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

    /// Backbone features of one image with a single-window fit (crop, stretch, pad): what the
    /// conformance tests and [`Pipeline::build_bank`] use. Use [`Pipeline::frame_features`] for
    /// every fit.
    pub fn features(&mut self, img: &Rgb8, path: &Path) -> Result<Features> {
        let prepared = self.prepare(img, path)?;
        self.run_backbone(&prepared.chw)?;
        Ok(Features {
            levels: self.state.taps.clone(),
        })
    }

    /// Prepare every window of a frame (one, or the tiles), on the shared pool.
    pub fn prepare_frame(&self, img: &Rgb8, path: &Path) -> Result<PreparedFrame> {
        let input = &self.desc.desc.input;
        self.pool
            .install(|| prepare_frame(img, input))
            .map_err(|message| Error::Image {
                path: path.into(),
                message,
            })
    }

    /// Backbone features of every window of one frame (any fit), with the stitching geometry.
    pub fn frame_features(&mut self, img: &Rgb8, path: &Path) -> Result<FrameFeatures> {
        let prepared = self.prepare_frame(img, path)?;
        let mut tiles = Vec::with_capacity(prepared.tiles.len());
        for t in &prepared.tiles {
            self.run_backbone(&t.chw)?;
            tiles.push(Features {
                levels: self.state.taps.clone(),
            });
        }
        Ok(FrameFeatures {
            offsets: prepared.tiles.iter().map(|t| t.offset).collect(),
            tiles,
            placement: prepared.placement,
            map_size: prepared.map_size,
        })
    }

    /// A bank of all levels from reference features (spec §3.1).
    pub fn build_bank(&self, refs: &[Features], dtype: BankDtype) -> Result<Bank> {
        Bank::from_features(refs, self.desc.desc.features.channels, dtype)
    }

    /// A bank of the model levels `taps` (0-based) from every window of the reference frames.
    pub fn bank_from_frames(
        &self,
        refs: &[&FrameFeatures],
        dtype: BankDtype,
        taps: &[usize],
    ) -> Result<Bank> {
        let windows: Vec<&Features> = refs.iter().flat_map(|f| f.tiles.iter()).collect();
        Bank::from_windows(&windows, self.desc.desc.features.channels, dtype, taps)
    }

    fn check_bank(&self, bank: &Bank) -> Result<()> {
        let d = &self.desc.desc;
        if bank.taps.last().is_some_and(|&t| t >= d.taps.len())
            || bank
                .levels
                .iter()
                .any(|l| l.channels() != d.features.channels)
        {
            return Err(Error::Invalid(format!(
                "bank has levels {:?} of {:?} channels; the model {} has {} levels of {} channels",
                bank.taps.iter().map(|t| t + 1).collect::<Vec<_>>(),
                bank.levels.iter().map(|l| l.channels()).collect::<Vec<_>>(),
                self.desc.path.display(),
                d.taps.len(),
                d.features.channels
            )));
        }
        Ok(())
    }

    /// Inspect one frame against `bank`: the whole chain for every window, stitched and timed
    /// per stage (times summed over the windows).
    pub fn inspect(&mut self, img: &Rgb8, path: &Path, bank: &Bank) -> Result<Inspection> {
        self.check_bank(bank)?;
        let t0 = Instant::now();
        let prepared = self.prepare_frame(img, path)?;
        let mut timings = Timings {
            preprocess_ms: ms(t0.elapsed()),
            ..Default::default()
        };
        let mut stitch = Stitch::new(prepared.map_size, prepared.tiles.len());
        for tile in &prepared.tiles {
            let t = Instant::now();
            self.run_backbone(&tile.chw)?;
            timings.backbone_ms += ms(t.elapsed());
            let taps = std::mem::take(&mut self.state.taps);
            let scored = self.score_windows(&taps, bank);
            self.state.taps = taps;
            let (tt, score, map) = scored?;
            timings.add_kernels(&tt);
            stitch.add(score, map, tile.offset, self.scorer.out_size());
        }
        timings.tiles = prepared.tiles.len();
        timings.total_ms = ms(t0.elapsed());
        let (score, map) = stitch.finish();
        Ok(Inspection {
            score,
            map,
            map_size: prepared.map_size,
            placement: prepared.placement,
            timings,
        })
    }

    /// Score a frame whose backbone features are already known (calibration and `eval` compute
    /// them once and score them against several banks).
    pub fn score_frame(&mut self, frame: &FrameFeatures, bank: &Bank) -> Result<Inspection> {
        self.check_bank(bank)?;
        let t0 = Instant::now();
        let mut timings = Timings::default();
        let mut stitch = Stitch::new(frame.map_size, frame.tiles.len());
        for (tile, &offset) in frame.tiles.iter().zip(&frame.offsets) {
            let (tt, score, map) = self.score_windows(&tile.levels, bank)?;
            timings.add_kernels(&tt);
            stitch.add(score, map, offset, self.scorer.out_size());
        }
        timings.tiles = frame.tiles.len();
        timings.total_ms = ms(t0.elapsed());
        let (score, map) = stitch.finish();
        Ok(Inspection {
            score,
            map,
            map_size: frame.map_size,
            placement: frame.placement,
            timings,
        })
    }

    /// Everything after the backbone, on the taps held in the frame state: residuals, projector,
    /// score. Exposed so that benchmarks and conformance tests can feed their own features.
    pub fn score_taps(&mut self, bank: &Bank) -> Result<(Timings, f32, Vec<f32>)> {
        self.check_bank(bank)?;
        let taps = std::mem::take(&mut self.state.taps);
        let r = self.score_windows(&taps, bank);
        self.state.taps = taps;
        r
    }

    /// Residuals, projector and FeatureNorm of one window's taps against the bank's levels.
    fn score_windows(
        &mut self,
        taps: &[Vec<f32>],
        bank: &Bank,
    ) -> Result<(Timings, f32, Vec<f32>)> {
        if taps.len() != self.desc.desc.taps.len() {
            return Err(Error::Invalid(format!(
                "{} levels of features for a model of {} levels",
                taps.len(),
                self.desc.desc.taps.len()
            )));
        }
        let p = self.desc.desc.features.grid[0] * self.desc.desc.features.grid[1];
        if let Some(side) = self.gpu.as_mut() {
            return score_on_gpu(side, &mut self.state, &self.scorer, taps, bank, p);
        }
        let mut timings = Timings::default();
        let st = &mut self.state;
        let (projector, scorer) = (&self.projector, &self.scorer);
        let (h, w) = scorer.out_size();
        let mut map = vec![0.0f32; h * w];
        let n = bank.levels.len();
        st.argmax.resize(n, Vec::new());
        st.residual.resize(n, Vec::new());
        if projector.is_some() {
            st.projected.resize(n, Vec::new());
        }
        let score = self.pool.install(|| -> Result<f32> {
            let t = Instant::now();
            for (l, (lb, &tap)) in bank.levels.iter().zip(&bank.taps).enumerate() {
                let query = &taps[tap];
                st.argmax[l].resize(p, 0);
                st.residual[l].resize(query.len(), 0.0);
                nearest_residual(
                    query,
                    lb,
                    &mut st.residual_ws,
                    &mut st.argmax[l],
                    &mut st.residual[l],
                    Par::Pool,
                )?;
            }
            timings.residual_ms = ms(t.elapsed());
            let t = Instant::now();
            if let Some((proj, _, _)) = projector {
                for (l, &tap) in bank.taps.iter().enumerate() {
                    st.projected[l].resize(st.residual[l].len(), 0.0);
                    proj.levels()[tap].forward(
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
                &st.projected[..n]
            } else {
                &st.residual[..n]
            };
            let views: Vec<&[f32]> = feats.iter().map(Vec::as_slice).collect();
            st.level_maps.resize(views.len() * p, 0.0);
            let s = scorer.score(
                &views,
                &mut map,
                Some(&mut st.level_maps),
                &mut st.score_ws,
                Par::Pool,
            )?;
            timings.score_ms = ms(t.elapsed());
            Ok(s)
        })?;
        timings.total_ms = timings.residual_ms + timings.projector_ms + timings.score_ms;
        timings.tiles = 1;
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

impl Timings {
    fn add_kernels(&mut self, t: &Timings) {
        self.residual_ms += t.residual_ms;
        self.projector_ms += t.projector_ms;
        self.attention_ms += t.attention_ms;
        self.score_ms += t.score_ms;
        self.transfer_ms += t.transfer_ms;
    }
}

/// Window maps stitched into one frame map: the maximum where windows overlap (issue: tiles).
struct Stitch {
    size: (usize, usize),
    windows: usize,
    score: f32,
    map: Vec<f32>,
}

impl Stitch {
    fn new(size: (usize, usize), windows: usize) -> Self {
        Self {
            size,
            windows,
            score: f32::NEG_INFINITY,
            map: Vec::new(),
        }
    }

    fn add(&mut self, score: f32, map: Vec<f32>, offset: (usize, usize), win: (usize, usize)) {
        // A NaN score must survive stitching: a part in doubt is never passed.
        self.score = if score.is_nan() || self.score.is_nan() {
            f32::NAN
        } else {
            self.score.max(score)
        };
        if self.windows == 1 && win == self.size {
            self.map = map;
            return;
        }
        if self.map.is_empty() {
            self.map = vec![f32::NEG_INFINITY; self.size.0 * self.size.1];
        }
        let (wh, ww) = win;
        let (x0, y0) = offset;
        for y in 0..wh {
            let dst = &mut self.map[(y0 + y) * self.size.1 + x0..][..ww];
            for (d, &v) in dst.iter_mut().zip(&map[y * ww..(y + 1) * ww]) {
                *d = d.max(v);
            }
        }
    }

    fn finish(self) -> (f32, Vec<f32>) {
        (self.score, self.map)
    }
}

/// The backbone where `device` asks: through tract-cuda for `cuda`/`auto` when this build has it
/// and it can run here (spec §2 on the GPU), else tract's CPU path with one log line saying why.
fn load_backbone(
    desc: &LoadedDescription,
    onnx: Option<&Path>,
    device: Device,
) -> Result<Backbone> {
    if device == Device::Cpu
        || !cfg!(feature = "gpu-backbone")
        || !edge_ad_kernels::cuda::driver_available()
    {
        return Backbone::load(desc, onnx);
    }
    match Backbone::load_on(desc, onnx, true) {
        Ok(b) => {
            log::info!("backbone on the GPU (tract-cuda)");
            Ok(b)
        }
        Err(e) => {
            log::warn!("{e}; the backbone runs on the CPU");
            Backbone::load(desc, onnx)
        }
    }
}

/// The GPU for `device`, with the projector's levels uploaded: `Auto` falls back to the CPU with
/// one log line (info when no driver is installed, the normal case on a CPU box; warn when a
/// driver is there but the GPU or the projector cannot use it); `Cuda` makes either an error.
fn open_gpu(device: Device, projector: Option<&Projector>) -> Result<Option<GpuSide>> {
    use edge_ad_kernels::cuda::{CudaError, Gpu};
    let open = || -> std::result::Result<GpuSide, CudaError> {
        let gpu = Gpu::new()?;
        let projector = match projector {
            Some(p) => Some(
                p.levels()
                    .iter()
                    .map(|l| gpu.upload_projector(l))
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        Ok(GpuSide {
            gpu,
            projector,
            frame: None,
        })
    };
    let side = match device {
        Device::Cpu => return Ok(None),
        Device::Cuda => open().map_err(|e| Error::Gpu(format!("--device cuda: {e}")))?,
        Device::Auto => match open() {
            Ok(g) => g,
            Err(CudaError::NoDriver) => {
                log::info!("no CUDA driver: residual search, projector and scoring run on the CPU");
                return Ok(None);
            }
            Err(e) => {
                log::warn!(
                    "CUDA unavailable ({e}); residual search, projector and scoring run on the CPU"
                );
                return Ok(None);
            }
        },
    };
    log::info!(
        "CUDA kernels on {} ({}){}",
        side.gpu.name(),
        side.gpu.arch(),
        if side.projector.is_some() {
            ", projector included"
        } else {
            ""
        }
    );
    Ok(Some(side))
}

/// One window on the GPU (residual, projector, FeatureNorm without a host round trip); the map,
/// level grids and matched rows come back for the frame state, the residuals stay on the device.
fn score_on_gpu(
    side: &mut GpuSide,
    st: &mut FrameState,
    scorer: &FeatureNorm,
    taps: &[Vec<f32>],
    bank: &Bank,
    p: usize,
) -> Result<(Timings, f32, Vec<f32>)> {
    let gpu_err = |e: edge_ad_kernels::cuda::CudaError| Error::Gpu(e.to_string());
    let g = &side.gpu;
    if bank.gpu.get().is_none() {
        let up = bank
            .levels
            .iter()
            .map(|l| g.upload_bank(l))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(gpu_err)?;
        let _ = bank.gpu.set(up);
    }
    let banks = bank.gpu.get().expect("set above");
    let n = bank.levels.len();
    let c = bank.levels[0].channels();
    if side.frame.as_ref().map(|f| f.shape()) != Some((n, p, c)) {
        let first = side.projector.as_ref().map(|v| &v[0]);
        side.frame = Some(g.frame(n, c, scorer, first).map_err(gpu_err)?);
    }
    let frame = side.frame.as_mut().expect("sized above");
    for (l, &tap) in bank.taps.iter().enumerate() {
        frame.stage(l, &taps[tap]).map_err(gpu_err)?;
    }
    let projectors = side.projector.as_deref().map(|v| (v, &bank.taps[..]));
    let score = g.run_frame(frame, banks, projectors).map_err(gpu_err)?;
    st.argmax.resize(n, Vec::new());
    for (l, am) in st.argmax.iter_mut().enumerate() {
        am.clear();
        am.extend(frame.argmax(l));
    }
    st.level_maps.clear();
    st.level_maps.extend_from_slice(frame.level_maps());
    st.residual.iter_mut().for_each(Vec::clear);
    st.projected.iter_mut().for_each(Vec::clear);
    let t = frame.timings();
    let timings = Timings {
        residual_ms: t.residual_ms,
        projector_ms: t.projector_ms,
        attention_ms: t.attention_ms,
        score_ms: t.score_ms,
        transfer_ms: t.upload_ms + t.download_ms,
        total_ms: t.upload_ms + t.residual_ms + t.projector_ms + t.score_ms + t.download_ms,
        tiles: 1,
        ..Default::default()
    };
    Ok((timings, score, frame.map().to_vec()))
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stitching_takes_the_maximum_where_windows_overlap_and_keeps_nan() {
        // A 2×5 map from two 2×3 windows at x = 0 and x = 2 (column 2 overlaps).
        let mut s = Stitch::new((2, 5), 2);
        s.add(1.0, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0], (0, 0), (2, 3));
        s.add(9.0, vec![5.0, 0.5, 9.0, 0.0, 0.5, 0.5], (2, 0), (2, 3));
        let (score, map) = s.finish();
        assert_eq!(score, 9.0);
        assert_eq!(map, vec![1.0, 2.0, 5.0, 0.5, 9.0, 1.0, 2.0, 3.0, 0.5, 0.5]);
        let mut s = Stitch::new((2, 5), 2);
        s.add(f32::NAN, vec![0.0; 6], (0, 0), (2, 3));
        s.add(1.0, vec![0.0; 6], (2, 0), (2, 3));
        assert!(
            s.finish().0.is_nan(),
            "a NaN tile must make the frame NaN (rejected)"
        );
    }

    #[test]
    fn bank_selection_keeps_levels_and_refuses_missing_ones() {
        let lb = |v: f32| LevelBank::new(1, 2, &[v, 1.0], BankDtype::F32).unwrap();
        let b = Bank::with_taps(vec![lb(1.0), lb(2.0), lb(3.0)], vec![0, 2, 3]).unwrap();
        let s = b.select(&[2, 3]).unwrap();
        assert_eq!(s.taps(), &[2, 3]);
        assert_eq!(s.levels[0].raw(), b.levels[1].raw());
        assert!(b.select(&[1]).unwrap_err().to_string().contains("level 2"));
        assert!(Bank::with_taps(vec![lb(1.0), lb(2.0)], vec![1, 1]).is_err());
    }
}
