//! Every entry point edge-ad calls in the CUDA libraries, checked before the first call.
//!
//! cudarc with dynamic loading resolves each function at its first call and panics when the
//! loaded library lacks it ("Missing symbol …"). An older driver than the CUDA 12.2 headers
//! cudarc is built against (JetPack 5 ships CUDA 11.4) may lack some, and a panic is no fallback:
//! `--device auto` must drop to the CPU with one log line and `--device cuda` must say which
//! symbol is missing. So [`check`] looks every entry point of [`ENTRY_POINTS`] up in the very
//! library handle cudarc will call through (its `culib()`: same candidate names, same order, same
//! `dlopen`) before any cudarc call, and [`from_panic`] turns a panic that still escapes (the last
//! line of defence in [`super::Gpu::new`]) into the same error.

use super::CudaError;
use std::any::Any;

/// A CUDA library cudarc loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLib {
    /// The driver API, `libcuda.so*`.
    Driver,
    /// The run-time compiler, `libnvrtc.so*`.
    Nvrtc,
    /// cuBLAS, `libcublas.so*`.
    Cublas,
}

impl CudaLib {
    /// The library's file name stem as cudarc's candidates start (`libcuda`, …).
    pub fn stem(self) -> &'static str {
        match self {
            CudaLib::Driver => "libcuda",
            CudaLib::Nvrtc => "libnvrtc",
            CudaLib::Cublas => "libcublas",
        }
    }

    /// The entry points edge-ad needs from this library (its row of [`ENTRY_POINTS`]).
    pub fn symbols(self) -> &'static [&'static str] {
        ENTRY_POINTS
            .iter()
            .find(|(lib, _)| *lib == self)
            .map_or(&[], |&(_, s)| s)
    }

    /// True when cudarc can load the library.
    pub fn present(self) -> bool {
        // SAFETY: only probes whether the shared library can be opened.
        unsafe {
            match self {
                CudaLib::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                CudaLib::Cublas => cudarc::cublas::sys::is_culib_present(),
            }
        }
    }

    /// The library that owns an entry point, by its prefix (for a panic's "Missing symbol").
    fn of_symbol(symbol: &str) -> Option<Self> {
        if symbol.starts_with("nvrtc") {
            Some(CudaLib::Nvrtc)
        } else if symbol.starts_with("cublas") {
            Some(CudaLib::Cublas)
        } else if symbol.starts_with("cu") {
            Some(CudaLib::Driver)
        } else {
            None
        }
    }
}

/// Every symbol cudarc `dlsym`s on edge-ad's GPU path (cudarc 0.19, feature `cuda-12020`), per
/// library: the `sys` functions [`super`] calls itself, and those behind the safe API it uses,
/// traced through cudarc's `safe`/`result` code to the exact names its `sys` bindings load
/// (`_v2` where the header maps the plain name to it). Both allocation paths are listed, because
/// which one runs depends on the device (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`). When
/// `cuda.rs`/`frame.rs` start calling another cudarc function, add what it loads here; the stub
/// driver test (`tests/cuda_symbols.rs`) runs the GPU path on exactly these driver and cuBLAS
/// symbols, so a missing row makes it fail with cudarc's panic.
pub const ENTRY_POINTS: [(CudaLib, &[&str]); 3] = [
    (
        CudaLib::Driver,
        &[
            // CudaContext::new: result::init, device::get, primary_ctx::retain, the memory-pool
            // attribute, bind_to_thread; compute_capability; CudaContext's drop.
            "cuInit",
            "cuDeviceGet",
            "cuDevicePrimaryCtxRetain",
            "cuDeviceGetAttribute",
            "cuCtxGetCurrent",
            "cuCtxSetCurrent",
            "cuDevicePrimaryCtxRelease_v2",
            // Gpu::name, Gpu::free_memory.
            "cuDeviceGetName",
            "cuMemGetInfo_v2",
            // load_module (a cubin image), load_function, num_regs, CudaModule's drop.
            "cuModuleLoadData",
            "cuModuleGetFunction",
            "cuFuncGetAttribute",
            "cuModuleUnload",
            // alloc_zeros/clone_htod: stream-ordered allocation where the device has memory
            // pools, else the synchronous pair (CudaSlice's drop frees with the matching one);
            // memset, copies, stream synchronisation.
            "cuMemAllocAsync",
            "cuMemFreeAsync",
            "cuMemAlloc_v2",
            "cuMemFree_v2",
            "cuMemsetD8Async",
            "cuMemcpyHtoDAsync_v2",
            "cuMemcpyDtoHAsync_v2",
            "cuStreamSynchronize",
            // Each CudaSlice's read/write events, the frame's timing events.
            "cuEventCreate",
            "cuEventRecord",
            "cuEventSynchronize",
            "cuEventElapsedTime",
            "cuEventDestroy_v2",
            // Gpu::launch_raw.
            "cuLaunchKernel",
            // DriverError's Debug, which every error message of ours formats.
            "cuGetErrorString",
        ],
    ),
    (
        CudaLib::Nvrtc,
        &[
            // compile and nvrtc_supported_archs.
            "nvrtcCreateProgram",
            "nvrtcCompileProgram",
            "nvrtcGetProgramLogSize",
            "nvrtcGetProgramLog",
            "nvrtcGetCUBINSize",
            "nvrtcGetCUBIN",
            "nvrtcDestroyProgram",
            "nvrtcGetNumSupportedArchs",
            "nvrtcGetSupportedArchs",
        ],
    ),
    (
        CudaLib::Cublas,
        &[
            // CudaBlas::new and its drop; open_blas; sgemm_nt; gemm_f16_tflops.
            "cublasCreate_v2",
            "cublasSetStream_v2",
            "cublasDestroy_v2",
            "cublasSetWorkspace_v2",
            "cublasSetMathMode",
            "cublasSgemm_v2",
            "cublasGemmEx",
        ],
    ),
];

/// Check that `lib` exports every entry point edge-ad calls in it, in the handle cudarc calls
/// through. Call only when [`CudaLib::present`]: cudarc's loader panics when nothing loads.
pub fn check(lib: CudaLib) -> Result<(), CudaError> {
    // SAFETY: cudarc's own loaders (a `OnceLock` around `dlopen` of its candidate names); loading
    // runs the library's initialisers, as cudarc's first call would, and calls nothing in it.
    let handle = unsafe {
        match lib {
            CudaLib::Driver => cudarc::driver::sys::culib(),
            CudaLib::Nvrtc => cudarc::nvrtc::sys::culib(),
            CudaLib::Cublas => cudarc::cublas::sys::culib(),
        }
    };
    for &symbol in lib.symbols() {
        // SAFETY: the symbol is only looked up (`dlsym`), never called through this pointer.
        let found = unsafe { handle.get::<unsafe extern "C" fn()>(symbol.as_bytes()) }.is_ok();
        if !found {
            return Err(CudaError::MissingSymbol {
                library: loaded_path(lib),
                symbol: symbol.into(),
            });
        }
    }
    Ok(())
}

/// The file `lib` was loaded from, as the process maps it (e.g.
/// `/usr/lib/aarch64-linux-gnu/tegra/libcuda.so.1.1`), else its stem plus `.so`: the message
/// should name the library the user has to replace.
fn loaded_path(lib: CudaLib) -> String {
    let prefix = format!("{}.so", lib.stem());
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| {
                    p.rsplit('/')
                        .next()
                        .is_some_and(|name| name.starts_with(&prefix))
                })
                .map(str::to_string)
        })
        .unwrap_or(prefix)
}

/// The error for a panic caught around a cudarc call: cudarc's "Missing symbol NAME: …" becomes
/// [`CudaError::MissingSymbol`], anything else [`CudaError::Panicked`].
pub fn from_panic(payload: Box<dyn Any + Send>) -> CudaError {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into());
    let missing = msg
        .strip_prefix("Missing symbol ")
        .and_then(|rest| rest.split(':').next())
        .map(str::trim)
        .and_then(|symbol| CudaLib::of_symbol(symbol).map(|lib| (lib, symbol)));
    match missing {
        Some((lib, symbol)) => CudaError::MissingSymbol {
            library: loaded_path(lib),
            symbol: symbol.into(),
        },
        None => CudaError::Panicked(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_library_has_its_row_and_no_symbol_twice() {
        for lib in [CudaLib::Driver, CudaLib::Nvrtc, CudaLib::Cublas] {
            let s = lib.symbols();
            assert!(!s.is_empty(), "{lib:?}");
            for (i, a) in s.iter().enumerate() {
                assert_eq!(CudaLib::of_symbol(a), Some(lib), "{a} filed under {lib:?}");
                assert!(!s[i + 1..].contains(a), "{a} listed twice");
            }
        }
        assert_eq!(CudaLib::Driver.symbols().len(), 28);
        assert_eq!(CudaLib::Nvrtc.symbols().len(), 9);
        assert_eq!(CudaLib::Cublas.symbols().len(), 7);
    }

    #[test]
    fn a_missing_symbol_panic_becomes_the_typed_error() {
        let payload: Box<dyn Any + Send> = Box::new(String::from(
            "Missing symbol cuMemAllocAsync: /stub/libcuda.so: undefined symbol: cuMemAllocAsync",
        ));
        match from_panic(payload) {
            CudaError::MissingSymbol { library, symbol } => {
                assert_eq!(symbol, "cuMemAllocAsync");
                assert!(library.contains("libcuda.so"), "{library}");
            }
            e => panic!("{e:?}"),
        }
        let payload: Box<dyn Any + Send> = Box::new("Missing symbol cublasGemmEx: gone");
        match from_panic(payload) {
            CudaError::MissingSymbol { library, symbol } => {
                assert_eq!(symbol, "cublasGemmEx");
                assert!(library.contains("libcublas.so"), "{library}");
            }
            e => panic!("{e:?}"),
        }
        let e = from_panic(Box::new("index out of bounds"));
        assert!(
            matches!(&e, CudaError::Panicked(m) if m == "index out of bounds"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "a CUDA library call panicked: index out of bounds"
        );
    }
}
