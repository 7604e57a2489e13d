//! CUDA twins of the residual search (spec §3.3), the LKV attention (§4.2 step 3) and FeatureNorm
//! (§5), driven through `cudarc`
//! with dynamic loading: one binary starts on machines without CUDA, and [`Gpu::new`] then says
//! why the GPU path is unavailable so callers fall back to the CPU kernels with one log line.
//!
//! The kernels (`cuda/kernels.cu`) are compiled by NVRTC to a cubin per architecture (sm_72 Xavier,
//! sm_87 Orin, sm_90 H100) and cached on disk keyed by a hash of the source and the architecture,
//! so a box compiles once, and a cubin made elsewhere (CI, a build machine) can be shipped beside
//! the binary. The CPU kernels stay the reference: tests compare every kernel against its twin.

use crate::featurenorm::FeatureNorm;
use crate::residual::LevelBank;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("cuda/kernels.cu");
/// Entry points in [`SOURCE`].
pub const KERNELS: [&str; 7] = [
    "unit_rows_f16",
    "nn_residual",
    "lkv_attention",
    "level_norms",
    "assemble",
    "gauss",
    "max_reduce",
];
/// Architectures edge-ad ships cubins for: Xavier, Orin, H100 (testing).
pub const TARGETS: [&str; 3] = ["sm_72", "sm_87", "sm_90"];
/// Threads per block of `nn_residual` (4 warps).
pub const NN_THREADS: u32 = 128;
/// Queries per `nn_residual` block.
pub const NN_BM: usize = 16;
/// Threads per `lkv_attention` block: one warp per query row.
pub const ATT_THREADS: u32 = 256;
/// Largest head dimension `lkv_attention` takes (DINOv2-S: 384 / 16 = 24).
pub const ATT_MAX_HEAD_DIM: usize = 32;

/// Why the GPU path is unavailable or failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No `libcuda` could be loaded.
    #[error("no CUDA driver (libcuda.so) on this machine")]
    NoDriver,
    /// No `libnvrtc` could be loaded and no cached cubin exists for this GPU.
    #[error("NVRTC (libnvrtc.so) not found and no cached cubin for {arch} in {}", dir.display())]
    NoNvrtc {
        /// The GPU's architecture.
        arch: String,
        /// Where a cubin was looked for.
        dir: PathBuf,
    },
    /// NVRTC refused the source (the log says why).
    #[error("NVRTC compile for {arch} failed:\n{log}")]
    Compile {
        /// Target architecture.
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// Inputs of mismatched or unsupported shapes.
    #[error("{0}")]
    Shape(String),
}

fn drv(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// True when `libnvrtc` can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// True when `libcuda` can be loaded (a driver is installed; a GPU may still be absent).
pub fn driver_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Real architectures the loaded NVRTC can compile for, e.g. `["sm_75", …, "sm_90"]`
/// (CUDA 13's NVRTC no longer targets Xavier's sm_72; CUDA 12's does).
pub fn nvrtc_supported_archs() -> Vec<String> {
    use cudarc::nvrtc::sys as n;
    if !nvrtc_available() {
        return Vec::new();
    }
    // SAFETY: NVRTC C API; the buffer is sized by nvrtcGetNumSupportedArchs.
    unsafe {
        let mut count = 0i32;
        if n::nvrtcGetNumSupportedArchs(&mut count) != n::nvrtcResult::NVRTC_SUCCESS || count <= 0 {
            return Vec::new();
        }
        let mut archs = vec![0i32; count as usize];
        if n::nvrtcGetSupportedArchs(archs.as_mut_ptr()) != n::nvrtcResult::NVRTC_SUCCESS {
            return Vec::new();
        }
        archs.iter().map(|a| format!("sm_{a}")).collect()
    }
}

/// A cubin and the compiler's log (with ptxas' resource report).
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Target architecture, e.g. `sm_87`.
    pub arch: String,
    /// The cubin.
    pub cubin: Vec<u8>,
    /// NVRTC's log.
    pub log: String,
}

/// Resources of one kernel as ptxas reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// Entry point.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Spill stores, bytes (0 is the goal).
    pub spill_bytes: u32,
}

/// Compile [`SOURCE`] to a cubin for `arch` with NVRTC, asking ptxas for its resource report.
pub fn compile(arch: &str) -> Result<Compiled, CudaError> {
    use cudarc::nvrtc::sys as n;
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc {
            arch: arch.into(),
            dir: cache_dir(),
        });
    }
    let src = CString::new(SOURCE).expect("no NUL in the source");
    let name = CString::new("edge_ad_kernels.cu").expect("static name");
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "--ptxas-options=-v".into(),
        "--std=c++14".into(),
    ]
    .into_iter()
    .map(|o| CString::new(o).expect("no NUL"))
    .collect();
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let fail = |what: &str, r: n::nvrtcResult| CudaError::Compile {
        arch: arch.into(),
        log: format!("{what}: {r:?}"),
    };
    // SAFETY: NVRTC C API used as documented; every buffer is sized from the matching *Size call
    // and the program is destroyed on every path after creation.
    unsafe {
        let mut prog: n::nvrtcProgram = std::ptr::null_mut();
        let r = n::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != n::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail("nvrtcCreateProgram", r));
        }
        let compiled = n::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr());
        let mut size = 0usize;
        n::nvrtcGetProgramLogSize(prog, &mut size);
        let mut buf = vec![0u8; size.max(1)];
        n::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char);
        let log = String::from_utf8_lossy(&buf)
            .trim_end_matches('\0')
            .to_string();
        if compiled != n::nvrtcResult::NVRTC_SUCCESS {
            n::nvrtcDestroyProgram(&mut prog);
            return Err(CudaError::Compile {
                arch: arch.into(),
                log,
            });
        }
        let mut cubin_size = 0usize;
        let r = n::nvrtcGetCUBINSize(prog, &mut cubin_size);
        if r != n::nvrtcResult::NVRTC_SUCCESS {
            n::nvrtcDestroyProgram(&mut prog);
            return Err(fail("nvrtcGetCUBINSize", r));
        }
        let mut cubin = vec![0u8; cubin_size];
        n::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char);
        n::nvrtcDestroyProgram(&mut prog);
        Ok(Compiled {
            arch: arch.into(),
            cubin,
            log,
        })
    }
}

/// Per-kernel registers, shared memory and spills from a ptxas `-v` log.
pub fn parse_resources(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let mut current: Option<String> = None;
    let num_before = |line: &str, unit: &str| -> u32 {
        line.split(',')
            .find(|p| p.contains(unit))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(i) = line.find("Function properties for ") {
            current = Some(
                line[i + "Function properties for ".len()..]
                    .trim()
                    .to_string(),
            );
        } else if line.contains("spill stores") {
            if let Some(k) = &current {
                let spill = num_before(line, "spill stores");
                out.push(Resources {
                    kernel: k.clone(),
                    registers: 0,
                    shared_bytes: 0,
                    spill_bytes: spill,
                });
            }
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(r) = out.last_mut() {
                r.registers = line
                    .split("Used")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                r.shared_bytes = num_before(line, "smem");
            }
        }
    }
    out
}

/// Where cubins are cached: `$EDGE_AD_CUBIN_DIR`, else `$XDG_CACHE_HOME/edge-ad`, else
/// `~/.cache/edge-ad`, else the system temporary folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGE_AD_CUBIN_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("edge-ad");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/edge-ad");
    }
    std::env::temp_dir().join("edge-ad")
}

/// File name of the cached cubin for `arch`: FNV-1a of the source, so an edited kernel never
/// loads a stale binary.
pub fn cubin_name(arch: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SOURCE.bytes().chain(arch.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("edge-ad-kernels-{h:016x}-{arch}.cubin")
}

fn load_or_compile(arch: &str, dir: &Path) -> Result<Vec<u8>, CudaError> {
    let path = dir.join(cubin_name(arch));
    if let Ok(b) = std::fs::read(&path) {
        return Ok(b);
    }
    let c = compile(arch).map_err(|e| match e {
        CudaError::NoNvrtc { arch, .. } => CudaError::NoNvrtc {
            arch,
            dir: dir.to_path_buf(),
        },
        other => other,
    })?;
    if std::fs::create_dir_all(dir).is_ok() {
        let tmp = dir.join(format!(".{}.{}", cubin_name(arch), std::process::id()));
        if std::fs::write(&tmp, &c.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(c.cubin)
}

struct Funcs {
    unit_rows: CudaFunction,
    nn_residual: CudaFunction,
    lkv_attention: CudaFunction,
    level_norms: CudaFunction,
    assemble: CudaFunction,
    gauss: CudaFunction,
    max_reduce: CudaFunction,
}

/// A CUDA device with the edge-ad kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: Funcs,
    arch: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("arch", &self.arch).finish()
    }
}

/// One level's bank on the device: unit rows (search) and raw rows (subtraction), both fp16,
/// channels zero-padded to a multiple of 16 (the tensor-core K step; zeros change no dot product).
pub struct GpuBank {
    unit: CudaSlice<u16>,
    raw: CudaSlice<u16>,
    rows: usize,
    channels: usize,
    padded: usize,
}

impl std::fmt::Debug for GpuBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBank")
            .field("rows", &self.rows)
            .field("channels", &self.channels)
            .finish()
    }
}

/// One projector level's keys and values on the device (spec §4.4): per head `K_h` and `V_h`,
/// `refs × d` contiguous, fp16, uploaded once at load.
pub struct GpuKv {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    heads: usize,
    refs: usize,
    d: usize,
}

impl std::fmt::Debug for GpuKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKv")
            .field("heads", &self.heads)
            .field("refs", &self.refs)
            .field("d", &self.d)
            .finish()
    }
}

/// `rows × c` → `rows × padded`, zero-filled.
fn pad_rows<T: Copy + Default>(v: &[T], c: usize, padded: usize) -> Vec<T> {
    if c == padded {
        return v.to_vec();
    }
    let mut out = vec![T::default(); v.len() / c * padded];
    for (src, dst) in v.chunks_exact(c).zip(out.chunks_exact_mut(padded)) {
        dst[..c].copy_from_slice(src);
    }
    out
}

fn to_f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

fn grid_1d(items: usize, per_block: usize) -> u32 {
    items.div_ceil(per_block).max(1) as u32
}

impl Gpu {
    /// Open device 0, load (or compile and cache) the kernels for its architecture.
    pub fn new() -> Result<Self, CudaError> {
        Self::with_cache(&cache_dir())
    }

    /// As [`Gpu::new`] with an explicit cubin folder.
    pub fn with_cache(dir: &Path) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(0).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = format!("sm_{major}{minor}");
        let cubin = load_or_compile(&arch, dir)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(drv)?;
        let get = |name: &str| module.load_function(name).map_err(drv);
        let f = Funcs {
            unit_rows: get("unit_rows_f16")?,
            nn_residual: get("nn_residual")?,
            lkv_attention: get("lkv_attention")?,
            level_norms: get("level_norms")?,
            assemble: get("assemble")?,
            gauss: get("gauss")?,
            max_reduce: get("max_reduce")?,
        };
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            f,
            arch,
        })
    }

    /// The device's architecture, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Registers per thread of a loaded kernel, as the driver reports it.
    pub fn registers(&self, kernel: &str) -> Option<i32> {
        let f = match kernel {
            "unit_rows_f16" => &self.f.unit_rows,
            "nn_residual" => &self.f.nn_residual,
            "lkv_attention" => &self.f.lkv_attention,
            "level_norms" => &self.f.level_norms,
            "assemble" => &self.f.assemble,
            "gauss" => &self.f.gauss,
            "max_reduce" => &self.f.max_reduce,
            _ => return None,
        };
        f.num_regs().ok()
    }

    /// Upload one level's bank (its unit rows and raw rows in fp16).
    pub fn upload_bank(&self, bank: &LevelBank) -> Result<GpuBank, CudaError> {
        let (c, padded) = (bank.channels(), bank.channels().div_ceil(16) * 16);
        let unit = pad_rows(&to_f16_bits(bank.unit()), c, padded);
        let raw = pad_rows(&to_f16_bits(bank.raw()), c, padded);
        let unit = self.stream.clone_htod(&unit).map_err(drv)?;
        let raw = self.stream.clone_htod(&raw).map_err(drv)?;
        Ok(GpuBank {
            unit,
            raw,
            rows: bank.rows(),
            channels: c,
            padded,
        })
    }

    /// The GPU twin of [`crate::nearest_residual`]: tensor-core fp16 cosine search with f32
    /// accumulation, fused argmax, residual against the fp16 bank row.
    pub fn nearest_residual(
        &self,
        queries: &[f32],
        bank: &GpuBank,
        argmax: &mut [u32],
        residual: &mut [f32],
    ) -> Result<(), CudaError> {
        let c = bank.channels;
        if queries.is_empty()
            || !queries.len().is_multiple_of(c)
            || residual.len() != queries.len()
            || argmax.len() != queries.len() / c
        {
            return Err(CudaError::Shape(format!(
                "{} query values, {} residual, {} argmax for {c} channels",
                queries.len(),
                residual.len(),
                argmax.len()
            )));
        }
        let n = queries.len() / c;
        let cp = bank.padded;
        let s = &self.stream;
        let q = s.clone_htod(&pad_rows(queries, c, cp)).map_err(drv)?;
        let mut qu = s.alloc_zeros::<u16>(n * cp).map_err(drv)?;
        let mut am = s.alloc_zeros::<i32>(n).map_err(drv)?;
        let mut res = s.alloc_zeros::<f32>(n * cp).map_err(drv)?;
        let (n_i, m_i, c_i) = (n as i32, bank.rows as i32, cp as i32);
        let cfg = LaunchConfig {
            grid_dim: (grid_1d(n * 32, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(&self.f.unit_rows);
        b.arg(&q).arg(&mut qu).arg(&n_i).arg(&c_i);
        // SAFETY: argument types and order match `unit_rows_f16`; buffers hold n·c elements.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_1d(n, NN_BM), 1, 1),
            block_dim: (NN_THREADS, 1, 1),
            shared_mem_bytes: (NN_BM * cp * 2) as u32,
        };
        let mut b = s.launch_builder(&self.f.nn_residual);
        b.arg(&qu)
            .arg(&bank.unit)
            .arg(&q)
            .arg(&bank.raw)
            .arg(&n_i)
            .arg(&m_i)
            .arg(&c_i)
            .arg(&mut am)
            .arg(&mut res);
        // SAFETY: argument types and order match `nn_residual`; c % 16 == 0 was checked.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        let am_host: Vec<i32> = s.clone_dtoh(&am).map_err(drv)?;
        if cp == c {
            s.memcpy_dtoh(&res, residual).map_err(drv)?;
        } else {
            let wide: Vec<f32> = s.clone_dtoh(&res).map_err(drv)?;
            for (dst, src) in residual.chunks_exact_mut(c).zip(wide.chunks_exact(cp)) {
                dst.copy_from_slice(&src[..c]);
            }
        }
        for (o, &i) in argmax.iter_mut().zip(&am_host) {
            *o = i as u32;
        }
        Ok(())
    }

    /// Upload one level's per-head keys and values (`heads × refs × d` each, as the CPU
    /// projector keeps them) in fp16.
    pub fn upload_kv(
        &self,
        k_heads: &[f32],
        v_heads: &[f32],
        heads: usize,
        refs: usize,
    ) -> Result<GpuKv, CudaError> {
        let per = heads * refs;
        if per == 0 || k_heads.len() != v_heads.len() || !k_heads.len().is_multiple_of(per) {
            return Err(CudaError::Shape(format!(
                "K/V of {} and {} values for {heads} heads × {refs} references",
                k_heads.len(),
                v_heads.len()
            )));
        }
        let d = k_heads.len() / per;
        if d > ATT_MAX_HEAD_DIM {
            return Err(CudaError::Shape(format!(
                "head dimension {d}: the GPU attention takes at most {ATT_MAX_HEAD_DIM} (the CPU path serves larger)"
            )));
        }
        let k = self.stream.clone_htod(&to_f16_bits(k_heads)).map_err(drv)?;
        let v = self.stream.clone_htod(&to_f16_bits(v_heads)).map_err(drv)?;
        Ok(GpuKv {
            k,
            v,
            heads,
            refs,
            d,
        })
    }

    /// The GPU twin of the projector's attention step (spec §4.2 step 3): `out = concat_h
    /// softmax(Q_h K_hᵀ) V_h` for `q` (`P × C`, already scaled by 1/√d), fused with an online
    /// softmax (the score matrix never exists).
    pub fn lkv_attention(&self, q: &[f32], kv: &GpuKv, out: &mut [f32]) -> Result<(), CudaError> {
        let c = kv.heads * kv.d;
        if q.is_empty() || !q.len().is_multiple_of(c) || out.len() != q.len() {
            return Err(CudaError::Shape(format!(
                "attention: {} query values, {} outputs for {c} channels",
                q.len(),
                out.len()
            )));
        }
        let p = q.len() / c;
        let s = &self.stream;
        let q_dev = s.clone_htod(q).map_err(drv)?;
        let mut o = s.alloc_zeros::<f32>(q.len()).map_err(drv)?;
        let rows_per_block = (ATT_THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (grid_1d(p, rows_per_block), kv.heads as u32, 1),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (p_i, n_i, c_i, d_i) = (p as i32, kv.refs as i32, c as i32, kv.d as i32);
        let mut b = s.launch_builder(&self.f.lkv_attention);
        b.arg(&q_dev)
            .arg(&kv.k)
            .arg(&kv.v)
            .arg(&mut o)
            .arg(&p_i)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&d_i);
        // SAFETY: argument types and order match `lkv_attention`; d ≤ ATT_MAXD was checked at
        // upload; q and out hold P·C values.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        s.memcpy_dtoh(&o, out).map_err(drv)?;
        s.synchronize().map_err(drv)?;
        Ok(())
    }

    /// The GPU twin of [`FeatureNorm::score`]: norms, upsampling, level mean, separable Gaussian and
    /// the max, all on the device; one copy back of map and score.
    pub fn featurenorm(
        &self,
        fnorm: &FeatureNorm,
        levels: &[&[f32]],
        map: &mut [f32],
    ) -> Result<f32, CudaError> {
        let (gh, gw) = fnorm.grid();
        let (h, w) = fnorm.out_size();
        let p = gh * gw;
        let l = levels.len();
        if l == 0
            || map.len() != h * w
            || levels
                .iter()
                .any(|v| v.is_empty() || v.len() != levels[0].len() || v.len() % p != 0)
        {
            return Err(CudaError::Shape(format!(
                "featurenorm: {l} levels for a {gh}×{gw} grid into {} pixels",
                map.len()
            )));
        }
        let c = levels[0].len() / p;
        let s = &self.stream;
        let feats: Vec<f32> = levels.iter().flat_map(|v| v.iter().copied()).collect();
        let feats = s.clone_htod(&feats).map_err(drv)?;
        let taps: Vec<f32> = fnorm.taps().iter().map(|&t| t as f32).collect();
        let radius = (taps.len() / 2) as i32;
        let taps = s.clone_htod(&taps).map_err(drv)?;
        let mut grid = s.alloc_zeros::<f32>(l * p).map_err(drv)?;
        let mut a = s.alloc_zeros::<f32>(h * w).map_err(drv)?;
        let mut b2 = s.alloc_zeros::<f32>(h * w).map_err(drv)?;
        let mut score = s.alloc_zeros::<u32>(1).map_err(drv)?;
        let (lp, c_i, paper) = (
            (l * p) as i32,
            c as i32,
            i32::from(fnorm.form() == crate::NormForm::Paper),
        );
        let cfg = LaunchConfig {
            grid_dim: (grid_1d(l * p * 32, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut k = s.launch_builder(&self.f.level_norms);
        k.arg(&feats).arg(&mut grid).arg(&lp).arg(&c_i).arg(&paper);
        // SAFETY: argument types and order match `level_norms`.
        unsafe { k.launch(cfg) }.map_err(drv)?;
        let (l_i, gh_i, gw_i, h_i, w_i) = (l as i32, gh as i32, gw as i32, h as i32, w as i32);
        let img = LaunchConfig {
            grid_dim: (grid_1d(w, 128), h as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut k = s.launch_builder(&self.f.assemble);
        k.arg(&grid)
            .arg(&mut a)
            .arg(&l_i)
            .arg(&gh_i)
            .arg(&gw_i)
            .arg(&h_i)
            .arg(&w_i);
        // SAFETY: argument types and order match `assemble`.
        unsafe { k.launch(img) }.map_err(drv)?;
        // Vertical pass a → b2, then horizontal b2 → a (SciPy's axis order).
        let gauss = |src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, vertical: i32| {
            let mut k = s.launch_builder(&self.f.gauss);
            k.arg(src)
                .arg(dst)
                .arg(&taps)
                .arg(&radius)
                .arg(&h_i)
                .arg(&w_i)
                .arg(&vertical);
            // SAFETY: argument types and order match `gauss`.
            unsafe { k.launch(img) }.map(|_| ()).map_err(drv)
        };
        gauss(&a, &mut b2, 1)?;
        gauss(&b2, &mut a, 0)?;
        let n_px = (h * w) as i32;
        let cfg = LaunchConfig {
            grid_dim: (grid_1d(h * w, 1024).min(64), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut k = s.launch_builder(&self.f.max_reduce);
        k.arg(&a).arg(&n_px).arg(&mut score);
        // SAFETY: argument types and order match `max_reduce`.
        unsafe { k.launch(cfg) }.map_err(drv)?;
        s.memcpy_dtoh(&a, map).map_err(drv)?;
        let bits: Vec<u32> = s.clone_dtoh(&score).map_err(drv)?;
        self.ctx.synchronize().map_err(drv)?;
        Ok(f32::from_bits(bits[0]))
    }
}
