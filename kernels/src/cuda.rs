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
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Kernel parameters as an array of pointers to locals (`cuLaunchKernel`'s form), on the stack.
macro_rules! params {
    ($($v:ident),* $(,)?) => {
        &mut [$(std::ptr::addr_of!($v) as *mut std::ffi::c_void),*]
    };
}

mod frame;
pub mod symbols;
pub use frame::{GpuFrame, GpuProjector, GpuTimings};
pub use symbols::{CudaLib, ENTRY_POINTS};

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("cuda/kernels.cu");
/// Architectures edge-ad ships cubins for: Xavier, Orin, H100 (testing).
pub const TARGETS: [&str; 3] = ["sm_72", "sm_87", "sm_90"];
/// Threads per block of `nn_search` (4 warps).
pub const NN_THREADS: u32 = 128;
/// Queries per `nn_search` block.
pub const NN_BM: usize = 16;
/// Most bank splits `nn_finish` merges (one per lane).
pub const NN_MAX_SPLITS: usize = 32;

/// Most levels one residual launch searches.
pub const NN_MAX_LEVELS: usize = 8;

/// Every level's bank for one `nn_search`/`nn_finish` launch, passed by value as a kernel
/// parameter (the layout of `struct NnLevels` in kernels.cu).
#[repr(C)]
#[derive(Default)]
struct NnLevels {
    unit: [u64; NN_MAX_LEVELS],
    raw: [u64; NN_MAX_LEVELS],
    rows: [i32; NN_MAX_LEVELS],
    chunk: [i32; NN_MAX_LEVELS],
    splits: [i32; NN_MAX_LEVELS],
}

/// Bank splits and rows per split for `m` bank rows: chunks of at least 64 rows (two sweeps of
/// the block's four warps), at most [`NN_MAX_SPLITS`] of them.
pub fn nn_splits(m: usize) -> (usize, usize) {
    let chunk = m.div_ceil(NN_MAX_SPLITS).div_ceil(32).max(2) * 32;
    (m.div_ceil(chunk).max(1), chunk)
}
/// Threads per `lkv_attention` block: one warp per query row.
pub const ATT_THREADS: u32 = 256;
/// Threads per `lkv_attention_mma` block: 8 warps sharing 16 query rows, splitting the references.
pub const ATT_MMA_THREADS: u32 = 256;
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
    /// No `libcublas` could be loaded: the projector's products need it.
    #[error("cuBLAS (libcublas.so) not found: the projector's linear layers need it on the GPU")]
    NoCublas,
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Cublas(String),
    /// Inputs of mismatched or unsupported shapes.
    #[error("{0}")]
    Shape(String),
    /// A loaded CUDA library lacks an entry point edge-ad calls (an older CUDA than the 12.2 API
    /// cudarc is built for, e.g. JetPack 5's 11.4): cudarc would panic at the call, so the path
    /// that needs it is refused before any call.
    #[error("{library} lacks `{symbol}`, which edge-ad's GPU path calls (older CUDA than 12.2?)")]
    MissingSymbol {
        /// The library as loaded, e.g. `/usr/lib/aarch64-linux-gnu/tegra/libcuda.so.1.1`.
        library: String,
        /// The entry point it lacks, e.g. `cuMemAllocAsync`.
        symbol: String,
    },
    /// A cudarc call panicked anyway (caught while opening the GPU, so `auto` still falls back).
    #[error("a CUDA library call panicked: {0}")]
    Panicked(String),
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
/// (CUDA 13's NVRTC no longer targets Xavier's sm_72; CUDA 12's does); none where NVRTC is
/// absent or lacks an entry point edge-ad calls.
pub fn nvrtc_supported_archs() -> Vec<String> {
    use cudarc::nvrtc::sys as n;
    if !nvrtc_available() {
        return Vec::new();
    }
    if let Err(e) = symbols::check(CudaLib::Nvrtc) {
        log::warn!("{e}");
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
    symbols::check(CudaLib::Nvrtc)?;
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

/// The kernels of [`SOURCE`], each named once: the loaded functions and [`KERNELS`] follow.
macro_rules! kernels {
    ($($field:ident = $name:literal),* $(,)?) => {
        /// Entry points in [`SOURCE`].
        pub const KERNELS: [&str; [$($name),*].len()] = [$($name),*];

        struct Funcs {
            $($field: CudaFunction,)*
        }

        impl Funcs {
            fn load(module: &Arc<cudarc::driver::CudaModule>) -> Result<Self, CudaError> {
                Ok(Self {
                    $($field: module.load_function($name).map_err(drv)?,)*
                })
            }

            fn by_name(&self, name: &str) -> Option<&CudaFunction> {
                match name {
                    $($name => Some(&self.$field),)*
                    _ => None,
                }
            }
        }
    };
}

kernels! {
    unit_rows = "unit_rows_f16",
    nn_search = "nn_search",
    nn_search_wmma = "nn_search_wmma",
    nn_finish = "nn_finish",
    lkv_attention = "lkv_attention",
    lkv_attention_mma = "lkv_attention_mma",
    level_norms = "level_norms",
    assemble = "assemble",
    gauss = "gauss",
    max_reduce = "max_reduce",
    fill_rows = "fill_rows",
    scale_or_rsub = "scale_or_rsub",
    col_mean = "col_mean",
    matvec_act = "matvec_act",
    gelu_gated = "gelu_gated",
}

/// cuBLAS workspace handed to the handle at load (NVIDIA's recommendation for Hopper), so no
/// product allocates device memory per frame.
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// cuBLAS with its own workspace; absent where `libcublas` cannot be loaded or lacks an entry
/// point edge-ad calls.
struct Blas {
    handle: cudarc::cublas::CudaBlas,
    _workspace: CudaSlice<u8>,
}

/// A CUDA device with the edge-ad kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: Funcs,
    arch: String,
    /// sm_80 or newer: `mma.sync m16n8k16` exists (the attention's tensor-core kernel).
    tensor_cores: bool,
    /// The residual search runs the WMMA kernel (before sm_80, or forced for tests).
    wmma_search: bool,
    blas: Option<Blas>,
    /// Why `blas` is absent although `libcublas` loads: (library, missing entry point).
    blas_missing: Option<(String, String)>,
    /// Device allocations made through this handle (the zero-allocation test reads it).
    allocations: AtomicUsize,
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
    /// Per head `V_hᵀ`, `d × refs_padded` (zero-padded): the tensor-core kernel's B operand.
    vt: CudaSlice<u16>,
    heads: usize,
    refs: usize,
    refs_padded: usize,
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
    ///
    /// Every driver entry point the GPU path calls is checked first ([`symbols::check`]), so an
    /// old driver is an error, not cudarc's panic; a panic that escapes anyway is caught here and
    /// returned as an error too, so `--device auto` always gets to fall back.
    pub fn with_cache(dir: &Path) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError::NoDriver);
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::open(dir))).unwrap_or_else(
            |payload| {
                let e = symbols::from_panic(payload);
                log::warn!("opening the GPU panicked, caught: {e}");
                Err(e)
            },
        )
    }

    fn open(dir: &Path) -> Result<Self, CudaError> {
        symbols::check(CudaLib::Driver)?;
        let ctx = CudaContext::new(0).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = format!("sm_{major}{minor}");
        let cubin = load_or_compile(&arch, dir)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(drv)?;
        let f = Funcs::load(&module)?;
        let stream = ctx.default_stream();
        let mut gpu = Self {
            ctx,
            stream,
            f,
            arch,
            tensor_cores: major >= 8,
            wmma_search: major < 8,
            blas: None,
            blas_missing: None,
            allocations: AtomicUsize::new(0),
        };
        if !CudaLib::Cublas.present() {
            log::info!("cuBLAS not found: a projector, if any, stays on the CPU");
        } else if let Err(e) = symbols::check(CudaLib::Cublas) {
            // The kernels need no cuBLAS; only the projector's products do, and they say why.
            log::warn!("{e}: a projector, if any, stays on the CPU");
            if let CudaError::MissingSymbol { library, symbol } = e {
                gpu.blas_missing = Some((library, symbol));
            }
        } else {
            gpu.blas = Some(gpu.open_blas()?);
        }
        Ok(gpu)
    }

    /// cuBLAS, or why the projector's products cannot run on this GPU.
    fn blas(&self) -> Result<&Blas, CudaError> {
        match (&self.blas, &self.blas_missing) {
            (Some(b), _) => Ok(b),
            (None, Some((library, symbol))) => Err(CudaError::MissingSymbol {
                library: library.clone(),
                symbol: symbol.clone(),
            }),
            (None, None) => Err(CudaError::NoCublas),
        }
    }

    fn open_blas(&self) -> Result<Blas, CudaError> {
        let err = |e: cudarc::cublas::result::CublasError| CudaError::Cublas(format!("{e:?}"));
        let handle = cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(err)?;
        let workspace = self.alloc::<u8>(CUBLAS_WORKSPACE)?;
        let ptr = self.raw(&workspace);
        // SAFETY: the workspace lives as long as the handle (both in `Blas`); the math mode keeps
        // f32 products in f32 (no TF32), as the CPU twin.
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *handle.handle(),
                ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
            .result()
            .map_err(err)?;
            cudarc::cublas::sys::cublasSetMathMode(
                *handle.handle(),
                cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
            .result()
            .map_err(err)?;
        }
        Ok(Blas {
            handle,
            _workspace: workspace,
        })
    }

    /// Run the residual search with the WMMA kernel (Xavier's path) on this GPU too: lets a newer
    /// GPU test the kernel that sm_72 runs.
    pub fn force_wmma_search(&mut self) {
        self.wmma_search = true;
    }

    /// True when the residual search runs the WMMA kernel.
    pub fn wmma_search(&self) -> bool {
        self.wmma_search
    }

    /// True when cuBLAS was loaded (the projector can run on the GPU).
    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Device allocations made through this handle so far.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Free device memory in bytes (the driver's count).
    pub fn free_memory(&self) -> Result<usize, CudaError> {
        self.ctx.mem_get_info().map(|(free, _)| free).map_err(drv)
    }

    /// A zeroed device buffer, counted.
    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(drv)
    }

    /// A device copy of `v`, counted.
    fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>, CudaError> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.stream.clone_htod(v).map_err(drv)
    }

    /// The raw device address of a buffer (single stream: no events are recorded).
    fn raw<T>(&self, s: &CudaSlice<T>) -> u64 {
        use cudarc::driver::DevicePtr;
        s.device_ptr(&self.stream).0
    }

    /// Make this handle's context current on the calling thread (raw launches need it).
    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(drv)
    }

    /// True when the attention runs on tensor cores for `kv` (sm_80+, even head dimension).
    pub fn attention_on_tensor_cores(&self, kv: &GpuKv) -> bool {
        self.tensor_cores && kv.d.is_multiple_of(2)
    }

    /// spec §4.2 step 3 for `p` query rows at device address `q` (P × C, pre-scaled) into `out`:
    /// the tensor-core kernel where it runs, else the FFMA kernel (Xavier, odd head dimensions).
    fn launch_attention(&self, kv: &GpuKv, p: usize, q: u64, out: u64) -> Result<(), CudaError> {
        let (k, v, vt) = (self.raw(&kv.k), self.raw(&kv.v), self.raw(&kv.vt));
        let (p_i, n_i, c_i, d_i) = (
            p as i32,
            kv.refs as i32,
            (kv.heads * kv.d) as i32,
            kv.d as i32,
        );
        let np_i = kv.refs_padded as i32;
        // SAFETY: lkv_attention_mma(const float*, const half*, const half*, float*, int, int, int,
        // int, int) and lkv_attention(const float*, const half*, const half*, float*, int, int,
        // int, int); q and out hold P·C floats, K/V heads·N_r·d halves, V_hᵀ heads·d·N_pad; d ≤ 32
        // (checked at upload) and even for the tensor-core kernel.
        unsafe {
            if self.attention_on_tensor_cores(kv) {
                self.launch_raw(
                    &self.f.lkv_attention_mma,
                    (grid_1d(p, 16), kv.heads as u32, 1),
                    ATT_MMA_THREADS,
                    0,
                    params!(q, k, vt, out, p_i, n_i, np_i, c_i, d_i),
                )
            } else {
                self.launch_raw(
                    &self.f.lkv_attention,
                    (grid_1d(p, (ATT_THREADS / 32) as usize), kv.heads as u32, 1),
                    ATT_THREADS,
                    0,
                    params!(q, k, v, out, p_i, n_i, c_i, d_i),
                )
            }
        }
    }

    /// spec §3.3's normalisation: `rows` rows of `c` f32 at `x` → unit fp16 rows at `out`.
    fn launch_unit_rows(&self, x: u64, out: u64, rows: usize, c: usize) -> Result<(), CudaError> {
        let (rows_i, c_i) = (rows as i32, c as i32);
        // SAFETY: unit_rows_f16(const float*, half*, int, int); x and out hold rows·c values.
        unsafe {
            self.launch_raw(
                &self.f.unit_rows,
                (grid_1d(rows * 32, 256), 1, 1),
                256,
                0,
                params!(x, out, rows_i, c_i),
            )
        }
    }

    /// spec §3.3 for `banks.len()` levels of `n` queries each, level-major: unit fp16 queries
    /// `qu`, raw f32 queries `q` (rows of the banks' padded width); the split search of every
    /// level in one launch, then the merge with the residual in another. `part_best`/`part_idx`
    /// hold `levels · NN_MAX_SPLITS · n` values, `argmax` `levels · n`.
    #[allow(clippy::too_many_arguments)]
    fn launch_residual(
        &self,
        banks: &[GpuBank],
        n: usize,
        qu: u64,
        q: u64,
        part_best: u64,
        part_idx: u64,
        argmax: u64,
        residual: u64,
    ) -> Result<(), CudaError> {
        let levels = banks.len();
        if levels == 0 || levels > NN_MAX_LEVELS {
            return Err(CudaError::Shape(format!(
                "{levels} bank levels: one residual launch takes 1 to {NN_MAX_LEVELS}"
            )));
        }
        let padded = banks[0].padded;
        if banks.iter().any(|b| b.padded != padded) {
            return Err(CudaError::Shape("bank levels of different widths".into()));
        }
        let mut lv = NnLevels::default();
        let mut max_splits = 1;
        for (l, bank) in banks.iter().enumerate() {
            let (splits, chunk) = nn_splits(bank.rows);
            lv.unit[l] = self.raw(&bank.unit);
            lv.raw[l] = self.raw(&bank.raw);
            lv.rows[l] = bank.rows as i32;
            lv.chunk[l] = chunk as i32;
            lv.splits[l] = splits as i32;
            max_splits = max_splits.max(splits);
        }
        let (n_i, c_i, levels_i) = (n as i32, padded as i32, levels as i32);
        // SAFETY: nn_search(const half*, NnLevels, int, int, float*, int*) and nn_finish(const
        // float*, const int*, NnLevels, int, const float*, int, int, int*, float*), NnLevels
        // passed by value with kernels.cu's layout; queries and residual hold levels·n rows of
        // `padded` (a multiple of 16), the partial buffers levels·NN_MAX_SPLITS·n values.
        unsafe {
            let search = if self.wmma_search {
                &self.f.nn_search_wmma
            } else {
                &self.f.nn_search
            };
            self.launch_raw(
                search,
                (grid_1d(n, NN_BM), max_splits as u32, levels as u32),
                NN_THREADS,
                (NN_BM * padded * 2) as u32,
                params!(qu, lv, n_i, c_i, part_best, part_idx),
            )?;
            self.launch_raw(
                &self.f.nn_finish,
                (grid_1d(levels * n * 32, 256), 1, 1),
                256,
                0,
                params!(part_best, part_idx, lv, levels_i, q, n_i, c_i, argmax, residual),
            )
        }
    }

    /// Launch with a parameter array on the stack: the builder's per-launch vectors would be
    /// host allocations, and the frame path makes none.
    ///
    /// # Safety
    /// `params` must point at values whose types and order match the kernel's parameters, and
    /// every device address in them must be valid for the kernel's accesses.
    unsafe fn launch_raw(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<(), CudaError> {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            grid,
            (block, 1, 1),
            shared,
            self.stream.cu_stream(),
            params,
        )
        .map_err(drv)
    }

    /// `C (rows × n) += A (rows × k) · Wᵀ` with `W` `n × k`, all row-major f32 (PyTorch's
    /// `Linear` layout), by cuBLAS SGEMM: column-major it is `Cᵀ = W · Aᵀ`, i.e. `op(W) = T`.
    ///
    /// # Safety
    /// The addresses must hold `rows·k`, `n·k` and `rows·n` floats.
    unsafe fn sgemm_nt(
        &self,
        rows: usize,
        n: usize,
        k: usize,
        a: u64,
        w: u64,
        c: u64,
    ) -> Result<(), CudaError> {
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let blas = self.blas()?;
        let one = 1.0f32;
        cudarc::cublas::result::sgemm(
            *blas.handle.handle(),
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            n as i32,
            rows as i32,
            k as i32,
            &one,
            w as *const f32,
            k as i32,
            a as *const f32,
            k as i32,
            &one,
            c as *mut f32,
            n as i32,
        )
        .map_err(|e| CudaError::Cublas(format!("{e:?}")))
    }

    /// cuBLAS fp16 GEMM rate (TFLOP/s, f32 accumulation) of an `m×n×k` product, median of `reps`
    /// timed by CUDA events: the yardstick the kernels' rates are read against (issue: bench).
    pub fn gemm_f16_tflops(
        &self,
        m: usize,
        n: usize,
        k: usize,
        reps: usize,
    ) -> Result<f64, CudaError> {
        use cudarc::cublas::sys::{
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T},
            cudaDataType_t::CUDA_R_16F,
        };
        let blas = self.blas()?;
        let fill = |len: usize, step: usize| -> Vec<u16> {
            (0..len)
                .map(|i| half::f16::from_f32(((i * step) % 17) as f32 * 0.01).to_bits())
                .collect()
        };
        let a = self.upload(&fill(m * k, 7))?;
        let b = self.upload(&fill(n * k, 5))?;
        let c = self.alloc::<u16>(m * n)?;
        let (pa, pb, pc) = (self.raw(&a), self.raw(&b), self.raw(&c));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let run = || {
            // SAFETY: a, b, c hold m·k, n·k and m·n halves; scalars are f32 (compute 32F).
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle.handle(),
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    pb as *const _,
                    CUDA_R_16F,
                    k as i32,
                    pa as *const _,
                    CUDA_R_16F,
                    k as i32,
                    &beta as *const f32 as *const _,
                    pc as *mut _,
                    CUDA_R_16F,
                    n as i32,
                    CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DFALT,
                )
            }
            .map_err(|e| CudaError::Cublas(format!("{e:?}")))
        };
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (
            self.ctx.new_event(timed).map_err(drv)?,
            self.ctx.new_event(timed).map_err(drv)?,
        );
        for _ in 0..3 {
            run()?;
        }
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            start.record(&self.stream).map_err(drv)?;
            run()?;
            end.record(&self.stream).map_err(drv)?;
            ms.push(start.elapsed_ms(&end).map_err(drv)? as f64);
        }
        ms.sort_by(f64::total_cmp);
        Ok(2.0 * (m * n * k) as f64 / (ms[ms.len() / 2] * 1e-3) / 1e12)
    }

    /// The device's architecture, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Registers per thread of a loaded kernel, as the driver reports it.
    pub fn registers(&self, kernel: &str) -> Option<i32> {
        let f = self.f.by_name(kernel)?;
        f.num_regs().ok()
    }

    /// Upload one level's bank (its unit rows and raw rows in fp16).
    pub fn upload_bank(&self, bank: &LevelBank) -> Result<GpuBank, CudaError> {
        let (c, padded) = (bank.channels(), bank.channels().div_ceil(16) * 16);
        // Rows padded to a multiple of 16 with zeros: the WMMA search reads whole 16-row tiles.
        let rows_padded = bank.rows().div_ceil(16) * 16;
        let pad = |v: Vec<u16>| {
            let mut v = pad_rows(&v, c, padded);
            v.resize(rows_padded * padded, 0);
            v
        };
        let unit = pad(to_f16_bits(bank.unit()));
        let raw = pad(to_f16_bits(bank.raw()));
        let unit = self.upload(&unit)?;
        let raw = self.upload(&raw)?;
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
        let q = self.upload(&pad_rows(queries, c, cp))?;
        let qu = self.alloc::<u16>(n * cp)?;
        let am = self.alloc::<i32>(n)?;
        let res = self.alloc::<f32>(n * cp)?;
        self.bind()?;
        self.launch_unit_rows(self.raw(&q), self.raw(&qu), n, cp)?;
        let part_best = self.alloc::<f32>(NN_MAX_SPLITS * n)?;
        let part_idx = self.alloc::<i32>(NN_MAX_SPLITS * n)?;
        self.launch_residual(
            std::slice::from_ref(bank),
            n,
            self.raw(&qu),
            self.raw(&q),
            self.raw(&part_best),
            self.raw(&part_idx),
            self.raw(&am),
            self.raw(&res),
        )?;
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
        let k = self.upload(&to_f16_bits(k_heads))?;
        let v = self.upload(&to_f16_bits(v_heads))?;
        let refs_padded = refs.div_ceil(16) * 16;
        let mut vt = vec![0.0f32; heads * d * refs_padded];
        for h in 0..heads {
            for j in 0..refs {
                for i in 0..d {
                    vt[(h * d + i) * refs_padded + j] = v_heads[(h * refs + j) * d + i];
                }
            }
        }
        let vt = self.upload(&to_f16_bits(&vt))?;
        Ok(GpuKv {
            k,
            v,
            vt,
            heads,
            refs,
            refs_padded,
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
        let q_dev = self.upload(q)?;
        let o = self.alloc::<f32>(q.len())?;
        self.bind()?;
        self.launch_attention(kv, p, self.raw(&q_dev), self.raw(&o))?;
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
        let feats: Vec<f32> = levels.iter().flat_map(|v| v.iter().copied()).collect();
        let feats = self.upload(&feats)?;
        let taps: Vec<f32> = fnorm.taps().iter().map(|&t| t as f32).collect();
        let taps = self.upload(&taps)?;
        let grids = self.alloc::<f32>(l * p)?;
        let (a, b) = (self.alloc::<f32>(h * w)?, self.alloc::<f32>(h * w)?);
        let score = self.alloc::<f32>(1)?;
        self.bind()?;
        // The horizontal pass writes the map back into `a` (not read after the vertical pass).
        self.launch_featurenorm(
            &frame::ScoreShape::of(fnorm),
            l,
            c,
            self.raw(&feats),
            self.raw(&taps),
            self.raw(&grids),
            self.raw(&a),
            self.raw(&b),
            self.raw(&a),
            self.raw(&score),
        )?;
        self.stream.memcpy_dtoh(&a, map).map_err(drv)?;
        let bits: Vec<f32> = self.stream.clone_dtoh(&score).map_err(drv)?;
        self.stream.synchronize().map_err(drv)?;
        Ok(bits[0])
    }
}
