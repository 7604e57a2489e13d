//! One frame on the device: residual search (spec §3.3), the projector (§4.2) and FeatureNorm (§5)
//! back to back with no host round trip between them — one host-to-device copy of the frame's
//! features, one device-to-host copy of the map, the level grids, the score and the matched bank
//! rows. Every buffer is allocated when the [`GpuFrame`] is made; a frame allocates nothing, on
//! the device or the host (kernels are launched with stack parameter arrays, and cuBLAS works in a
//! workspace given at load), which `kernels/tests/cuda.rs` counts.

use super::{drv, grid_1d, CudaError, Gpu, GpuBank, GpuKv, NN_MAX_SPLITS};
use crate::featurenorm::FeatureNorm;
use crate::projector::LevelProjector;
use cudarc::driver::{CudaEvent, CudaSlice};

/// One projector level on the device (spec §4.4): f32 weights for cuBLAS SGEMM (f32 as the CPU
/// twin, so the projector adds no fp16 error of its own), K and V of the learnable references in
/// fp16 for the fused attention.
pub struct GpuProjector {
    c: usize,
    hidden: usize,
    se: usize,
    w_q: CudaSlice<f32>,
    b_q: CudaSlice<f32>,
    kv: GpuKv,
    w_o: CudaSlice<f32>,
    b_o: CudaSlice<f32>,
    w_1: CudaSlice<f32>,
    b_1: CudaSlice<f32>,
    w_s1: CudaSlice<f32>,
    b_s1: CudaSlice<f32>,
    w_s2: CudaSlice<f32>,
    b_s2: CudaSlice<f32>,
    w_2: CudaSlice<f32>,
    b_2: CudaSlice<f32>,
}

impl std::fmt::Debug for GpuProjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuProjector")
            .field("channels", &self.c)
            .field("kv", &self.kv)
            .finish()
    }
}

/// Device times of one frame's steps in milliseconds, from CUDA events around each step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuTimings {
    /// Host-to-device copy of the features.
    pub upload_ms: f64,
    /// Residual search, all levels.
    pub residual_ms: f64,
    /// Projector, all levels (0 without one), its attention included.
    pub projector_ms: f64,
    /// The projector's fused LKV attention alone, all levels.
    pub attention_ms: f64,
    /// FeatureNorm: norms, upsampling, smoothing, max.
    pub score_ms: f64,
    /// Device-to-host copy of the results.
    pub download_ms: f64,
}

/// `matvec_act`'s activations.
const RELU: i32 = 1;
const SIGMOID: i32 = 2;

/// What FeatureNorm's launches need to know of a [`FeatureNorm`] (spec §5).
pub(super) struct ScoreShape {
    grid: (usize, usize),
    size: (usize, usize),
    paper: i32,
    radius: i32,
}

impl ScoreShape {
    pub(super) fn of(fnorm: &FeatureNorm) -> Self {
        Self {
            grid: fnorm.grid(),
            size: fnorm.out_size(),
            paper: i32::from(fnorm.form() == crate::NormForm::Paper),
            radius: (fnorm.taps().len() / 2) as i32,
        }
    }
}

/// The projector's per-frame buffers: Q and the attention output per level (the attention of all
/// levels runs as one phase, timed on its own), the rest shared by the levels in turn.
struct ProjectorSpace {
    q: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    x1: CudaSlice<f32>,
    hidden: CudaSlice<f32>,
    mean: CudaSlice<f32>,
    squeeze: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    /// Outputs of every level, `levels × P × C`: FeatureNorm's input.
    out: CudaSlice<f32>,
    hidden_width: usize,
    se: usize,
}

/// Everything one frame needs on the device and the host, sized once (issue: memory).
pub struct GpuFrame {
    levels: usize,
    positions: usize,
    channels: usize,
    padded: usize,
    score: ScoreShape,
    /// Host staging of the queries, `levels × P × padded`, zero padding kept.
    staging: Vec<f32>,
    /// Host copy of `out`.
    results: Vec<f32>,
    queries: CudaSlice<f32>,
    unit: CudaSlice<u16>,
    residual: CudaSlice<f32>,
    /// The split search's partial results, every level.
    part_best: CudaSlice<f32>,
    part_idx: CudaSlice<i32>,
    projector: Option<ProjectorSpace>,
    taps: CudaSlice<f32>,
    blur_a: CudaSlice<f32>,
    blur_b: CudaSlice<f32>,
    /// `map (h·w) | level grids (levels·P) | score (1) | argmax bits (levels·P)`.
    out: CudaSlice<f32>,
    /// Start, uploaded, residuals, Q, attention, projector, FeatureNorm, downloaded.
    events: [CudaEvent; 8],
    timings: GpuTimings,
}

impl std::fmt::Debug for GpuFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuFrame")
            .field("levels", &self.levels)
            .field("positions", &self.positions)
            .field("channels", &self.channels)
            .field("projector", &self.projector.is_some())
            .finish()
    }
}

impl GpuFrame {
    /// Levels, positions per level and channels this frame was sized for.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.levels, self.positions, self.channels)
    }

    /// True when the frame has the projector's buffers.
    pub fn has_projector(&self) -> bool {
        self.projector.is_some()
    }

    /// Copy one level's features (`P × C`, row-major) into the host staging buffer.
    pub fn stage(&mut self, level: usize, features: &[f32]) -> Result<(), CudaError> {
        let (p, c, cp) = (self.positions, self.channels, self.padded);
        if level >= self.levels || features.len() != p * c {
            return Err(CudaError::Shape(format!(
                "frame of {} levels × {p} positions × {c} channels: level {level} given {} values",
                self.levels,
                features.len()
            )));
        }
        let dst = &mut self.staging[level * p * cp..(level + 1) * p * cp];
        for (d, s) in dst.chunks_exact_mut(cp).zip(features.chunks_exact(c)) {
            d[..c].copy_from_slice(s);
        }
        Ok(())
    }

    fn hw(&self) -> usize {
        self.score.size.0 * self.score.size.1
    }

    /// The last frame's score map (`h × w`).
    pub fn map(&self) -> &[f32] {
        &self.results[..self.hw()]
    }

    /// The last frame's per-level FeatureNorm grids, `levels × P`.
    pub fn level_maps(&self) -> &[f32] {
        let hw = self.hw();
        &self.results[hw..hw + self.levels * self.positions]
    }

    /// The last frame's image score (max of the map).
    pub fn score(&self) -> f32 {
        self.results[self.hw() + self.levels * self.positions]
    }

    /// The bank row matched at every position of `level` in the last frame.
    pub fn argmax(&self, level: usize) -> impl Iterator<Item = u32> + '_ {
        let start = self.hw() + self.levels * self.positions + 1 + level * self.positions;
        self.results[start..start + self.positions]
            .iter()
            .map(|v| v.to_bits())
    }

    /// Device times of the last frame's steps.
    pub fn timings(&self) -> GpuTimings {
        self.timings
    }
}

impl Gpu {
    /// Upload one projector level (spec §4.4: K and V were precomputed at load by the CPU twin).
    pub fn upload_projector(&self, lp: &LevelProjector) -> Result<GpuProjector, CudaError> {
        self.blas()?;
        let heads = crate::projector::HEADS;
        let kv = self.upload_kv(&lp.k_heads, &lp.v_heads, heads, lp.refs())?;
        Ok(GpuProjector {
            c: lp.channels(),
            hidden: 4 * lp.channels(),
            se: lp.se_hidden(),
            w_q: self.upload(&lp.w_q)?,
            b_q: self.upload(&lp.b_q)?,
            kv,
            w_o: self.upload(&lp.w_o)?,
            b_o: self.upload(&lp.b_o)?,
            w_1: self.upload(&lp.w_1)?,
            b_1: self.upload(&lp.b_1)?,
            w_s1: self.upload(&lp.w_s1)?,
            b_s1: self.upload(&lp.b_s1)?,
            w_s2: self.upload(&lp.w_s2)?,
            b_s2: self.upload(&lp.b_s2)?,
            w_2: self.upload(&lp.w_2)?,
            b_2: self.upload(&lp.b_2)?,
        })
    }

    /// One projector level on `tokens` (`P × C`) into `out`, allocating its buffers per call: the
    /// kernel-level twin of [`LevelProjector::forward`] for tests and tools (frames use
    /// [`Gpu::run_frame`], which allocates nothing).
    pub fn projector_forward(
        &self,
        pr: &GpuProjector,
        tokens: &[f32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let c = pr.c;
        if tokens.is_empty() || !tokens.len().is_multiple_of(c) || out.len() != tokens.len() {
            return Err(CudaError::Shape(format!(
                "projector of {c} channels: tokens {} / output {} values",
                tokens.len(),
                out.len()
            )));
        }
        let p = tokens.len() / c;
        let ws = self.projector_space(1, p, pr)?;
        let t = self.upload(tokens)?;
        let y = self.alloc::<f32>(p * c)?;
        self.project_q(pr, &ws, 0, p, self.raw(&t))?;
        self.project_attention(pr, &ws, 0, p)?;
        self.project_rest(pr, &ws, 0, p, self.raw(&t), self.raw(&y))?;
        self.stream.memcpy_dtoh(&y, out).map_err(drv)?;
        self.stream.synchronize().map_err(drv)
    }

    fn projector_space(
        &self,
        levels: usize,
        p: usize,
        pr: &GpuProjector,
    ) -> Result<ProjectorSpace, CudaError> {
        let c = pr.c;
        Ok(ProjectorSpace {
            q: self.alloc(levels * p * c)?,
            attn: self.alloc(levels * p * c)?,
            x1: self.alloc(p * c)?,
            hidden: self.alloc(p * pr.hidden)?,
            mean: self.alloc(pr.hidden)?,
            squeeze: self.alloc(pr.se)?,
            gate: self.alloc(pr.hidden)?,
            out: self.alloc(levels * p * c)?,
            hidden_width: pr.hidden,
            se: pr.se,
        })
    }

    /// Allocate a frame of `levels × positions × channels` features scored by `fnorm`, with the
    /// projector's buffers when `projector` gives one of its levels (all levels share a shape).
    pub fn frame(
        &self,
        levels: usize,
        channels: usize,
        fnorm: &FeatureNorm,
        projector: Option<&GpuProjector>,
    ) -> Result<GpuFrame, CudaError> {
        let grid = fnorm.grid();
        let size = fnorm.out_size();
        let p = grid.0 * grid.1;
        if levels == 0 || levels > super::NN_MAX_LEVELS || channels == 0 {
            return Err(CudaError::Shape(format!(
                "frame of {levels} levels × {channels} channels (1 to {} levels)",
                super::NN_MAX_LEVELS
            )));
        }
        let padded = channels.div_ceil(16) * 16;
        if let Some(pr) = projector {
            if pr.c != channels {
                return Err(CudaError::Shape(format!(
                    "projector of {} channels for features of {channels}",
                    pr.c
                )));
            }
        }
        let lpc = levels * p * padded;
        let projector = match projector {
            Some(pr) => Some(self.projector_space(levels, p, pr)?),
            None => None,
        };
        let taps: Vec<f32> = fnorm.taps().iter().map(|&t| t as f32).collect();
        let hw = size.0 * size.1;
        let out_len = hw + 2 * levels * p + 1;
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || self.ctx.new_event(timed).map_err(drv);
        Ok(GpuFrame {
            levels,
            positions: p,
            channels,
            padded,
            score: ScoreShape::of(fnorm),
            staging: vec![0.0; lpc],
            results: vec![0.0; out_len],
            queries: self.alloc(lpc)?,
            unit: self.alloc(lpc)?,
            residual: self.alloc(lpc)?,
            part_best: self.alloc(levels * NN_MAX_SPLITS * p)?,
            part_idx: self.alloc(levels * NN_MAX_SPLITS * p)?,
            projector,
            taps: self.upload(&taps)?,
            blur_a: self.alloc(hw)?,
            blur_b: self.alloc(hw)?,
            out: self.alloc(out_len)?,
            events: [
                event()?,
                event()?,
                event()?,
                event()?,
                event()?,
                event()?,
                event()?,
                event()?,
            ],
            timings: GpuTimings::default(),
        })
    }

    /// Score the staged frame: for every level `l` the residual against `banks[l]`, the projector
    /// `projectors.0[projectors.1[l]]` when given, then FeatureNorm; read the results with
    /// [`GpuFrame::map`], [`GpuFrame::score`], [`GpuFrame::level_maps`], [`GpuFrame::argmax`].
    pub fn run_frame(
        &self,
        fr: &mut GpuFrame,
        banks: &[GpuBank],
        projectors: Option<(&[GpuProjector], &[usize])>,
    ) -> Result<f32, CudaError> {
        let (levels, p, c, cp) = (fr.levels, fr.positions, fr.channels, fr.padded);
        if banks.len() != levels || banks.iter().any(|b| b.channels != c) {
            return Err(CudaError::Shape(format!(
                "frame of {levels} levels × {c} channels given {} banks",
                banks.len()
            )));
        }
        if let Some((levs, map)) = projectors {
            if fr.projector.is_none()
                || map.len() != levels
                || map.iter().any(|&i| i >= levs.len() || levs[i].c != c)
            {
                return Err(CudaError::Shape(
                    "projector levels do not match the frame's buffers".into(),
                ));
            }
        }
        self.ctx.bind_to_thread().map_err(drv)?;
        let s = &self.stream;
        let ev = &fr.events;
        ev[0].record(s).map_err(drv)?;
        s.memcpy_htod(&fr.staging, &mut fr.queries).map_err(drv)?;
        ev[1].record(s).map_err(drv)?;

        // spec §3.3: unit fp16 queries of every level at once, then one search per level.
        let (q, qu, res, out) = (
            self.raw(&fr.queries),
            self.raw(&fr.unit),
            self.raw(&fr.residual),
            self.raw(&fr.out),
        );
        let hw = fr.hw();
        self.launch_unit_rows(q, qu, levels * p, cp)?;
        let argmax_base = out + 4 * (hw + levels * p + 1) as u64;
        self.launch_residual(
            banks,
            p,
            qu,
            q,
            self.raw(&fr.part_best),
            self.raw(&fr.part_idx),
            argmax_base,
            res,
        )?;
        ev[2].record(s).map_err(drv)?;

        // spec §4.2, in three phases over the levels (Q; attention; the rest), so that the
        // attention can be timed on its own; outputs into the projector's buffer.
        let feats = match (projectors, &fr.projector) {
            (Some((levs, map)), Some(ws)) => {
                let level = |l: usize| (&levs[map[l]], res + 4 * (l * p * cp) as u64);
                for l in 0..levels {
                    let (pr, t) = level(l);
                    self.project_q(pr, ws, l, p, t)?;
                }
                ev[3].record(s).map_err(drv)?;
                for l in 0..levels {
                    self.project_attention(level(l).0, ws, l, p)?;
                }
                ev[4].record(s).map_err(drv)?;
                for l in 0..levels {
                    let (pr, t) = level(l);
                    let y = self.raw(&ws.out) + 4 * (l * p * c) as u64;
                    self.project_rest(pr, ws, l, p, t, y)?;
                }
                self.raw(&ws.out)
            }
            _ => {
                ev[3].record(s).map_err(drv)?;
                ev[4].record(s).map_err(drv)?;
                res
            }
        };
        ev[5].record(s).map_err(drv)?;

        // spec §5: grids into `out`, assembled, blurred (vertical, then horizontal into `out`), max.
        let grids = out + 4 * hw as u64;
        let score = out + 4 * (hw + levels * p) as u64;
        let (a, b, taps) = (
            self.raw(&fr.blur_a),
            self.raw(&fr.blur_b),
            self.raw(&fr.taps),
        );
        self.launch_featurenorm(&fr.score, levels, cp, feats, taps, grids, a, b, out, score)?;
        ev[6].record(s).map_err(drv)?;
        s.memcpy_dtoh(&fr.out, &mut fr.results).map_err(drv)?;
        ev[7].record(s).map_err(drv)?;
        s.synchronize().map_err(drv)?;
        let span = |i: usize, j: usize| ev[i].elapsed_ms(&ev[j]).map(f64::from).map_err(drv);
        fr.timings = GpuTimings {
            upload_ms: span(0, 1)?,
            residual_ms: span(1, 2)?,
            projector_ms: span(2, 5)?,
            attention_ms: span(3, 4)?,
            score_ms: span(5, 6)?,
            download_ms: span(6, 7)?,
        };
        Ok(fr.score())
    }

    /// spec §5 on the device for `levels` feature sets at `feats` (`levels × P` rows of `c`): level
    /// grids into `grids`, assembled into `a`, blurred vertically into `b` and horizontally into
    /// `map` (which may be `a`), its maximum into `score` (zeroed first; f32 bits).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_featurenorm(
        &self,
        sh: &ScoreShape,
        levels: usize,
        c: usize,
        feats: u64,
        taps: u64,
        grids: u64,
        a: u64,
        b: u64,
        map: u64,
        score: u64,
    ) -> Result<(), CudaError> {
        let p = sh.grid.0 * sh.grid.1;
        let hw = sh.size.0 * sh.size.1;
        let (rows_i, c_i, paper, radius) = ((levels * p) as i32, c as i32, sh.paper, sh.radius);
        let (l_i, gh, gw) = (levels as i32, sh.grid.0 as i32, sh.grid.1 as i32);
        let (h_i, w_i, px) = (sh.size.0 as i32, sh.size.1 as i32, hw as i32);
        let img = (grid_1d(sh.size.1, 128), sh.size.0 as u32, 1);
        let (vertical, horizontal) = (1i32, 0i32);
        // SAFETY: each launch's parameters match its kernel (see kernels.cu); callers size the
        // buffers for `levels`, the grid and the map.
        unsafe {
            self.launch_raw(
                &self.f.level_norms,
                (grid_1d(levels * p * 32, 256), 1, 1),
                256,
                0,
                params!(feats, grids, rows_i, c_i, paper),
            )?;
            self.launch_raw(
                &self.f.assemble,
                img,
                128,
                0,
                params!(grids, a, l_i, gh, gw, h_i, w_i),
            )?;
            self.launch_raw(
                &self.f.gauss,
                img,
                128,
                0,
                params!(a, b, taps, radius, h_i, w_i, vertical),
            )?;
            self.launch_raw(
                &self.f.gauss,
                img,
                128,
                0,
                params!(b, map, taps, radius, h_i, w_i, horizontal),
            )?;
            cudarc::driver::result::memset_d8_async(score, 0, 4, self.stream.cu_stream())
                .map_err(drv)?;
            self.launch_raw(
                &self.f.max_reduce,
                (grid_1d(hw, 1024).min(64), 1, 1),
                256,
                0,
                params!(map, px, score),
            )
        }
    }

    /// `matvec_act(w, x, b, y, rows, cols, act)`: `y = act(W·x + b)`, act [`RELU`] or [`SIGMOID`].
    #[allow(clippy::too_many_arguments)]
    fn matvec_act(
        &self,
        w: u64,
        x: u64,
        b: u64,
        y: u64,
        rows: usize,
        cols: usize,
        act: i32,
    ) -> Result<(), CudaError> {
        let (rows_i, cols_i) = (rows as i32, cols as i32);
        // SAFETY: matvec_act(const float*, const float*, const float*, float*, int, int, int);
        // callers pass W of rows·cols floats, x of cols, b and y of rows.
        unsafe {
            self.launch_raw(
                &self.f.matvec_act,
                (grid_1d(rows * 32, 256), 1, 1),
                256,
                0,
                params!(w, x, b, y, rows_i, cols_i, act),
            )
        }
    }

    /// `fill_rows(dst, bias, x, rows, n)`: `dst = bias (+ x)` row by row.
    fn fill_rows(
        &self,
        dst: u64,
        bias: u64,
        x: u64,
        rows: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let (rows_i, n_i) = (rows as i32, n as i32);
        // SAFETY: fill_rows(float*, const float*, const float*, int, int); callers pass dst and x
        // (x may be 0: none) of rows·n floats and bias of n.
        unsafe {
            self.launch_raw(
                &self.f.fill_rows,
                (grid_1d(rows * n, 256), 1, 1),
                256,
                0,
                params!(dst, bias, x, rows_i, n_i),
            )
        }
    }

    /// `scale_or_rsub(y, t, s, n, mode)`: `y *= s` (mode 0, `t` unread) or `y = t − y` (mode 1).
    fn scale_or_rsub(
        &self,
        y: u64,
        t: u64,
        scale: f32,
        n: usize,
        mode: i32,
    ) -> Result<(), CudaError> {
        let n_i = n as i32;
        // SAFETY: scale_or_rsub(float*, const float*, float, int, int); callers pass y (and t in
        // mode 1) of n floats.
        unsafe {
            self.launch_raw(
                &self.f.scale_or_rsub,
                (grid_1d(n, 256), 1, 1),
                256,
                0,
                params!(y, t, scale, n_i, mode),
            )
        }
    }

    /// spec §4.2 step 3, first part: `Q_l = (T·W_qᵀ + b_q)/√d` into level `l`'s Q.
    fn project_q(
        &self,
        pr: &GpuProjector,
        ws: &ProjectorSpace,
        l: usize,
        p: usize,
        t: u64,
    ) -> Result<(), CudaError> {
        let c = pr.c;
        let q = self.raw(&ws.q) + 4 * (l * p * c) as u64;
        self.fill_rows(q, self.raw(&pr.b_q), 0, p, c)?;
        // SAFETY: Q holds P·C floats, W_q C·C, T P·C.
        unsafe { self.sgemm_nt(p, c, c, t, self.raw(&pr.w_q), q)? };
        self.scale_or_rsub(q, 0, 1.0 / (pr.kv.d as f32).sqrt(), p * c, 0)
    }

    /// spec §4.2 step 3, the fused attention of level `l`: `concat_h softmax(Q_h K_hᵀ) V_h`.
    fn project_attention(
        &self,
        pr: &GpuProjector,
        ws: &ProjectorSpace,
        l: usize,
        p: usize,
    ) -> Result<(), CudaError> {
        let off = 4 * (l * p * pr.c) as u64;
        self.launch_attention(&pr.kv, p, self.raw(&ws.q) + off, self.raw(&ws.attn) + off)
    }

    /// spec §4.2 steps 3 (output projection) to 5 for level `l`: `y = MLP(T − A)`, `t` and `y`
    /// `P × C` on the device.
    fn project_rest(
        &self,
        pr: &GpuProjector,
        ws: &ProjectorSpace,
        l: usize,
        p: usize,
        t: u64,
        y: u64,
    ) -> Result<(), CudaError> {
        let (c, h, se) = (pr.c, ws.hidden_width, ws.se);
        let attn = self.raw(&ws.attn) + 4 * (l * p * c) as u64;
        let (x1, hid) = (self.raw(&ws.x1), self.raw(&ws.hidden));
        let (mean, squeeze, gate) = (
            self.raw(&ws.mean),
            self.raw(&ws.squeeze),
            self.raw(&ws.gate),
        );
        let r = |s: &CudaSlice<f32>| self.raw(s);
        let (p_i, h_i) = (p as i32, h as i32);
        let (w_s1, b_s1, w_s2, b_s2) = (r(&pr.w_s1), r(&pr.b_s1), r(&pr.w_s2), r(&pr.b_s2));
        // A = concat·W_oᵀ + b_o.
        self.fill_rows(x1, r(&pr.b_o), 0, p, c)?;
        // SAFETY: every launch's parameters match its kernel in kernels.cu and every product's
        // operands have the sizes of spec §4.3 (the buffers were sized from this projector).
        unsafe { self.sgemm_nt(p, c, c, attn, r(&pr.w_o), x1)? };
        // Step 4: X1 = T − A.
        self.scale_or_rsub(x1, t, 1.0, p * c, 1)?;
        // Step 5: H = X1·W_1ᵀ + b_1; SE gate from H's mean; gelu(H ⊙ g); Y = ·W_2ᵀ + b_2 + X1.
        self.fill_rows(hid, r(&pr.b_1), 0, p, h)?;
        // SAFETY: as above.
        unsafe {
            self.sgemm_nt(p, h, c, x1, r(&pr.w_1), hid)?;
            self.launch_raw(
                &self.f.col_mean,
                (grid_1d(h, 128), 1, 1),
                128,
                0,
                params!(hid, mean, p_i, h_i),
            )?;
        }
        self.matvec_act(w_s1, mean, b_s1, squeeze, se, h, RELU)?;
        self.matvec_act(w_s2, squeeze, b_s2, gate, h, se, SIGMOID)?;
        // SAFETY: gelu_gated(float*, const float*, int, int); H holds P·4C floats, the gate 4C.
        unsafe {
            self.launch_raw(
                &self.f.gelu_gated,
                (grid_1d(p * h, 256), 1, 1),
                256,
                0,
                params!(hid, gate, p_i, h_i),
            )?;
        }
        self.fill_rows(y, r(&pr.b_2), x1, p, c)?;
        // SAFETY: as above.
        unsafe { self.sgemm_nt(p, c, h, hid, r(&pr.w_2), y) }
    }
}
