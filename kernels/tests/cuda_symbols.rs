//! The missing-symbol guard (issue item 6, "`--device auto` never panics"), without a GPU: stub
//! `libcuda`/`libcublas` libraries built here with `cc` stand in for an old driver. The dynamic
//! loader keeps a library for the life of a process, so each case runs in a child process (this
//! test binary again, running only [`stub_child`]) with the stub folder first on
//! `LD_LIBRARY_PATH`; the parent checks its exit status and output.
#![cfg(feature = "cuda")]

use edge_ad_kernels::cuda::{self, CudaError, CudaLib, Gpu};
use edge_ad_kernels::{BankDtype, FeatureNorm, LevelBank, NormForm, Projector};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Selects the child's case; unset in a normal test run.
const CHILD: &str = "EDGE_AD_STUB_CHILD";
/// The driver entry point the stub leaves out (case `missing`).
const OMIT: &str = "EDGE_AD_STUB_OMIT";
/// `1`: the stub device has memory pools (cudarc allocates with `cuMemAllocAsync`).
const POOLS: &str = "EDGE_AD_STUB_POOLS";

/// The stub's answers, asserted by the child.
const STUB_NAME: &str = "edge-ad stub GPU";
const STUB_FREE: usize = 123_456_789;
const STUB_REGISTERS: i32 = 40;
const STUB_EVENT_MS: f64 = 0.25;

/// Driver entry points that need more than `return 0` (outputs, or memory backed by the host so
/// copies round-trip); the rest of the table is exported as `int name(void) { return 0; }`.
const DRIVER_BODIES: &[(&str, &str)] = &[
    ("cuInit", "(unsigned f) { (void)f; return 0; }"),
    ("cuDeviceGet", "(int *d, int o) { *d = o; return 0; }"),
    (
        "cuDevicePrimaryCtxRetain",
        "(void **c, int d) { (void)d; *c = &ctx_token; return 0; }",
    ),
    (
        "cuDeviceGetAttribute",
        // 75/76: compute capability major/minor (sm_72, Xavier); 115: memory pools supported.
        "(int *v, int a, int d) { const char *p = getenv(\"EDGE_AD_STUB_POOLS\"); (void)d; \
         *v = a == 75 ? 7 : a == 76 ? 2 : a == 115 ? (p && *p == '1') : 0; return 0; }",
    ),
    ("cuCtxGetCurrent", "(void **c) { *c = current; return 0; }"),
    ("cuCtxSetCurrent", "(void *c) { current = c; return 0; }"),
    (
        "cuDeviceGetName",
        "(char *n, int len, int d) { (void)d; strncpy(n, \"edge-ad stub GPU\", len); \
         n[len - 1] = 0; return 0; }",
    ),
    (
        "cuMemGetInfo_v2",
        "(size_t *f, size_t *t) { *f = 123456789; *t = 1u << 30; return 0; }",
    ),
    (
        "cuModuleLoadData",
        "(void **m, const void *i) { (void)i; *m = &module_token; return 0; }",
    ),
    (
        "cuModuleGetFunction",
        "(void **f, void *m, const char *n) { (void)m; (void)n; *f = &function_token; return 0; }",
    ),
    (
        "cuFuncGetAttribute",
        "(int *v, int a, void *f) { (void)a; (void)f; *v = 40; return 0; }",
    ),
    (
        "cuMemAllocAsync",
        "(dptr *p, size_t n, void *s) { (void)s; *p = (dptr)(uintptr_t)calloc(n ? n : 1, 1); \
         return 0; }",
    ),
    (
        "cuMemAlloc_v2",
        "(dptr *p, size_t n) { *p = (dptr)(uintptr_t)calloc(n ? n : 1, 1); return 0; }",
    ),
    (
        "cuMemFreeAsync",
        "(dptr p, void *s) { (void)s; free((void *)(uintptr_t)p); return 0; }",
    ),
    (
        "cuMemFree_v2",
        "(dptr p) { free((void *)(uintptr_t)p); return 0; }",
    ),
    (
        "cuMemsetD8Async",
        "(dptr p, unsigned char v, size_t n, void *s) { (void)s; \
         memset((void *)(uintptr_t)p, v, n); return 0; }",
    ),
    (
        "cuMemcpyHtoDAsync_v2",
        "(dptr d, const void *h, size_t n, void *s) { (void)s; \
         memcpy((void *)(uintptr_t)d, h, n); return 0; }",
    ),
    (
        "cuMemcpyDtoHAsync_v2",
        "(void *h, dptr d, size_t n, void *s) { (void)s; \
         memcpy(h, (const void *)(uintptr_t)d, n); return 0; }",
    ),
    (
        "cuEventCreate",
        "(void **e, unsigned f) { (void)f; *e = malloc(1); return 0; }",
    ),
    ("cuEventDestroy_v2", "(void *e) { free(e); return 0; }"),
    (
        "cuEventElapsedTime",
        "(float *ms, void *a, void *b) { (void)a; (void)b; *ms = 0.25f; return 0; }",
    ),
    (
        "cuGetErrorString",
        "(int e, const char **s) { (void)e; *s = \"stub error\"; return 0; }",
    ),
];

const CUBLAS_BODIES: &[(&str, &str)] = &[(
    "cublasCreate_v2",
    "(void **h) { *h = &handle_token; return 0; }",
)];

/// C source of a stub library exporting `symbols` (bodies from `bodies`, else `return 0`).
fn stub_source(symbols: &[&str], bodies: &[(&str, &str)], extra: &str) -> String {
    let mut c = String::from(
        "#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n\
         typedef unsigned long long dptr;\n\
         static int ctx_token, module_token, function_token, handle_token;\n\
         static void *current;\n",
    );
    c.push_str(extra);
    for s in symbols {
        match bodies.iter().find(|(n, _)| n == s) {
            Some((_, body)) => c.push_str(&format!("int {s}{body}\n")),
            None => c.push_str(&format!("int {s}(void) {{ return 0; }}\n")),
        }
    }
    c
}

/// A fresh folder for one case's stubs and cubin cache.
fn case_dir(case: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edge-ad-stub-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A C compiler that builds libraries this test binary can load: under emulation (the arm64
/// suites run under qemu on an x86-64 host, tools/dist-check.sh) `cc` builds for the host, so
/// the stubs could not be loaded and the tests are skipped there.
fn have_cc() -> bool {
    Command::new("cc")
        .arg("-dumpmachine")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).starts_with(std::env::consts::ARCH)
        })
}

/// Compile `source` into `dir/{stem}.so` and `dir/{stem}.so.1` (the names cudarc tries first
/// and last).
fn build_stub(dir: &Path, stem: &str, source: &str) {
    let c = dir.join(format!("{stem}.c"));
    std::fs::write(&c, source).unwrap();
    let so = dir.join(format!("{stem}.so"));
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc {stem}: {}\n{source}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(&so, dir.join(format!("{stem}.so.1"))).unwrap();
}

/// A stub driver of an old CUDA (`cuDriverGetVersion` 11040): every table entry but `omit`.
fn build_driver(dir: &Path, omit: Option<&str>) {
    let symbols: Vec<&str> = CudaLib::Driver
        .symbols()
        .iter()
        .copied()
        .filter(|s| Some(*s) != omit)
        .collect();
    let extra = "int cuDriverGetVersion(int *v) { *v = 11040; return 0; }\n\
                 int cuDeviceGetCount(int *n) { *n = 1; return 0; }\n";
    build_stub(dir, "libcuda", &stub_source(&symbols, DRIVER_BODIES, extra));
}

fn build_cublas(dir: &Path, omit: Option<&str>) {
    let symbols: Vec<&str> = CudaLib::Cublas
        .symbols()
        .iter()
        .copied()
        .filter(|s| Some(*s) != omit)
        .collect();
    build_stub(dir, "libcublas", &stub_source(&symbols, CUBLAS_BODIES, ""));
}

/// Run [`stub_child`] in a child process against the stubs in `dir`; its output, after asserting
/// that it passed.
fn run_child(dir: &Path, case: &str, env: &[(&str, &str)]) -> String {
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(p) if !p.is_empty() => format!("{}:{}", dir.display(), p.to_string_lossy()),
        _ => dir.display().to_string(),
    };
    let cubins = dir.join("cubins");
    std::fs::create_dir_all(&cubins).unwrap();
    // The stub loads any image: a placeholder cubin keeps NVRTC out of the child.
    std::fs::write(cubins.join(cuda::cubin_name("sm_72")), b"stub cubin").unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "stub_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, case)
        .env("LD_LIBRARY_PATH", path)
        .env("EDGE_AD_CUBIN_DIR", &cubins)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {case} {env:?} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {case} ran no test:\n{text}"
    );
    // libtest prints a test's first line after its "test stub_child ... " header.
    for line in text
        .lines()
        .filter_map(|l| l.find("child: ").map(|i| &l[i..]))
    {
        println!("{case} {env:?} {line}");
    }
    text
}

/// An old driver lacking an entry point edge-ad calls: `Gpu::new` says which one, no panic. The
/// first is called by cudarc's context creation (the old code panicked inside `Gpu::new`), the
/// second first by an allocation (the old code opened the GPU and panicked at the first upload).
#[test]
fn an_old_driver_is_a_missing_symbol_error_not_a_panic() {
    if !have_cc() {
        println!("SKIPPED: no C compiler (cc) for this architecture to build a stub libcuda");
        return;
    }
    for omit in ["cuDevicePrimaryCtxRetain", "cuMemAllocAsync"] {
        let dir = case_dir(omit);
        build_driver(&dir, Some(omit));
        let out = run_child(&dir, "missing", &[(OMIT, omit), (POOLS, "1")]);
        assert!(out.contains(&format!("lacks `{omit}`")), "{out}");
        assert!(!out.contains("panicked"), "{out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The GPU path (open, uploads, every kernel family, a frame, the projector, cuBLAS) against stubs
/// exporting exactly the table: cudarc panics "Missing symbol" if it loads anything the table
/// lacks. Both allocation paths (with and without memory pools).
#[test]
fn the_gpu_path_calls_only_the_tabled_entry_points() {
    if !have_cc() {
        println!("SKIPPED: no C compiler (cc) for this architecture to build a stub libcuda");
        return;
    }
    let dir = case_dir("complete");
    build_driver(&dir, None);
    build_cublas(&dir, None);
    for pools in ["1", "0"] {
        let out = run_child(&dir, "complete", &[(POOLS, pools)]);
        assert!(out.contains("stub GPU path ran"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cuBLAS lacking an entry point: the kernels stay on the GPU, the projector is refused with
/// the symbol named.
#[test]
fn an_old_cublas_keeps_the_kernels_and_refuses_the_projector() {
    if !have_cc() {
        println!("SKIPPED: no C compiler (cc) for this architecture to build a stub libcublas");
        return;
    }
    let dir = case_dir("cublas");
    build_driver(&dir, None);
    build_cublas(&dir, Some("cublasSetWorkspace_v2"));
    let out = run_child(&dir, "missing_cublas", &[(POOLS, "1")]);
    assert!(out.contains("lacks `cublasSetWorkspace_v2`"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The child side of the tests above; does nothing unless [`CHILD`] names a case.
#[test]
#[ignore = "runs in a child process of the stub tests, against a stub libcuda"]
fn stub_child() {
    let Ok(case) = std::env::var(CHILD) else {
        println!("SKIPPED: run by the stub tests in a child process");
        return;
    };
    assert!(cuda::driver_available(), "the stub libcuda did not load");
    match case.as_str() {
        "missing" => {
            let omit = std::env::var(OMIT).unwrap();
            let e = Gpu::new().unwrap_err();
            println!("child: Gpu::new: {e}");
            match &e {
                CudaError::MissingSymbol { library, symbol } => {
                    assert_eq!(symbol, &omit);
                    assert!(library.contains("libcuda.so"), "{library}");
                }
                e => panic!("expected MissingSymbol, got {e:?}"),
            }
            assert!(e.to_string().contains(&format!("lacks `{omit}`")), "{e}");
        }
        "complete" => run_gpu_path(true),
        "missing_cublas" => run_gpu_path(false),
        other => panic!("unknown case {other}"),
    }
}

/// Everything the runtime does with a [`Gpu`], on the stub; values are the stub's answers (its
/// kernels do nothing, so device results stay as allocated: zero).
fn run_gpu_path(cublas: bool) {
    let mut g = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g.arch(), "sm_72");
    assert_eq!(g.name(), STUB_NAME);
    assert_eq!(g.free_memory().unwrap(), STUB_FREE);
    assert_eq!(g.registers("nn_search"), Some(STUB_REGISTERS));
    assert_eq!(g.has_cublas(), cublas);
    assert!(g.wmma_search(), "sm_72 searches with WMMA");
    g.force_wmma_search();

    let (c, rows, n) = (64, 48, 5);
    let bank: Vec<f32> = (0..rows * c).map(|i| (i % 7) as f32 - 3.0).collect();
    let bank = LevelBank::new(rows, c, &bank, BankDtype::F16).unwrap();
    let gbank = g.upload_bank(&bank).unwrap();
    let q: Vec<f32> = (0..n * c).map(|i| (i % 5) as f32).collect();
    let (mut argmax, mut residual) = (vec![9u32; n], vec![9.0f32; n * c]);
    g.nearest_residual(&q, &gbank, &mut argmax, &mut residual)
        .unwrap();
    assert_eq!(argmax, vec![0; n]);
    assert!(residual.iter().all(|&r| r == 0.0));

    let heads = 16;
    let (refs, d) = (8, c / heads);
    let kv: Vec<f32> = (0..heads * refs * d).map(|i| i as f32 * 0.01).collect();
    let gkv = g.upload_kv(&kv, &kv, heads, refs).unwrap();
    let mut att = vec![1.0f32; n * c];
    g.lkv_attention(&q, &gkv, &mut att).unwrap();
    assert!(att.iter().all(|&v| v == 0.0));

    let fnorm = FeatureNorm::new((4, 4), (32, 32), 4.0, NormForm::Code).unwrap();
    let levels: Vec<Vec<f32>> = (0..2).map(|l| vec![l as f32 + 1.0; 16 * c]).collect();
    let views: Vec<&[f32]> = levels.iter().map(Vec::as_slice).collect();
    let mut map = vec![1.0f32; 32 * 32];
    assert_eq!(g.featurenorm(&fnorm, &views, &mut map).unwrap(), 0.0);
    assert!(map.iter().all(|&v| v == 0.0));

    let projector =
        Projector::from_safetensors(&edge_ad_kernels::weights::generated_projector(1, c, refs))
            .unwrap();
    let level = &projector.levels()[0];
    let gpr = match g.upload_projector(level) {
        Ok(p) => {
            assert!(cublas);
            let mut y = vec![1.0f32; 16 * c];
            g.projector_forward(&p, &levels[0], &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0));
            let tflops = g.gemm_f16_tflops(256, 256, 256, 3).unwrap();
            assert_eq!(tflops, 2.0 * 256f64.powi(3) / (STUB_EVENT_MS * 1e-3) / 1e12);
            Some(p)
        }
        Err(e) => {
            println!("child: upload_projector: {e}");
            assert!(!cublas);
            assert!(
                matches!(&e, CudaError::MissingSymbol { symbol, .. } if symbol == "cublasSetWorkspace_v2"),
                "{e:?}"
            );
            None
        }
    };

    let banks = vec![g.upload_bank(&bank).unwrap(), gbank];
    let mut frame = g.frame(2, c, &fnorm, gpr.as_ref()).unwrap();
    for (l, v) in levels.iter().enumerate() {
        frame.stage(l, v).unwrap();
    }
    let projectors = gpr
        .as_ref()
        .map(|p| (std::slice::from_ref(p), &[0usize, 0][..]));
    assert_eq!(g.run_frame(&mut frame, &banks, projectors).unwrap(), 0.0);
    let t = frame.timings();
    let spans = [
        t.upload_ms,
        t.residual_ms,
        t.projector_ms,
        t.attention_ms,
        t.score_ms,
        t.download_ms,
    ];
    assert!(spans.iter().all(|&ms| ms == STUB_EVENT_MS), "{t:?}");
    assert!(frame.map().iter().all(|&v| v == 0.0));
    drop((frame, banks, gpr, gkv, g));
    println!("child: stub GPU path ran (cuBLAS: {cublas})");
}
