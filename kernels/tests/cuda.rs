//! CUDA kernels: NVRTC compilation for every target (runs wherever NVRTC loads, CI included), the
//! clean no-driver path, and — on a machine with a GPU — each kernel against its CPU twin.
#![cfg(feature = "cuda")]

use edge_ad_kernels::cuda::{self, CudaError, Gpu};
use edge_ad_kernels::{
    nearest_residual, BankDtype, FeatureNorm, LevelBank, NormForm, Par, Projector,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts the host allocations of threads that ask for it (the zero-allocation frame test).
struct CountingAlloc;

static HOST_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}

fn note_allocation() {
    if COUNT_HERE.try_with(Cell::get).unwrap_or(false) {
        HOST_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// (max threads per SM, registers per SM, shared memory per SM in bytes), CUDA occupancy tables.
fn sm_limits(arch: &str) -> (u32, u32, u32) {
    match arch {
        "sm_72" => (2048, 65536, 96 * 1024),
        "sm_87" => (1536, 65536, 164 * 1024),
        _ => (2048, 65536, 228 * 1024),
    }
}

/// Threads per block and dynamic shared memory each kernel is launched with (DINOv2-S: C = 384).
fn launch_shape(kernel: &str) -> (u32, u32) {
    match kernel {
        "nn_search" | "nn_search_wmma" => (cuda::NN_THREADS, (cuda::NN_BM * 384 * 2) as u32),
        "lkv_attention" => (cuda::ATT_THREADS, 0),
        "lkv_attention_mma" => (cuda::ATT_MMA_THREADS, 0),
        "assemble" | "gauss" | "col_mean" => (128, 0),
        _ => (256, 0),
    }
}

#[test]
fn nvrtc_compiles_every_kernel_for_xavier_orin_and_h100() {
    if !cuda::nvrtc_available() {
        assert!(!in_ci(), "NVRTC not loadable in CI: tools/setup.sh installs it and tools/test.sh puts it on LD_LIBRARY_PATH");
        eprintln!(
            "SKIPPED: libnvrtc not found (run tools/setup.sh; tools/test.sh sets LD_LIBRARY_PATH)"
        );
        return;
    }
    let out = std::env::var_os("EDGE_AD_CUBIN_OUT").map(PathBuf::from);
    let supported = cuda::nvrtc_supported_archs();
    for arch in cuda::TARGETS {
        if !supported.iter().any(|a| a == arch) {
            // CI installs CUDA 12's NVRTC, which targets all three; a CUDA 13 NVRTC dropped sm_72.
            assert!(
                !in_ci(),
                "NVRTC in CI cannot target {arch} (supports {supported:?})"
            );
            println!("cuda {arch}: SKIPPED, this NVRTC supports {supported:?}");
            continue;
        }
        let c = cuda::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.cubin.len() > 1000,
            "{arch}: cubin of {} bytes",
            c.cubin.len()
        );
        let res = cuda::parse_resources(&c.log);
        if res.is_empty() && !in_ci() {
            // CUDA 13's NVRTC gave no ptxas report for sm_90 on a lent GPU machine; CI's CUDA 12
            // NVRTC gives one for every target, and there the check below is strict.
            println!("cuda {arch}: compiled ({} bytes); this NVRTC gave no ptxas report, resources not checked", c.cubin.len());
            continue;
        }
        let (max_threads, regs_sm, smem_sm) = sm_limits(arch);
        for k in cuda::KERNELS {
            let r = res
                .iter()
                .find(|r| r.kernel == k)
                .unwrap_or_else(|| panic!("{arch}: no ptxas report for {k}:\n{}", c.log));
            assert!(
                r.registers > 0 && r.registers <= 255,
                "{arch} {k}: {} registers",
                r.registers
            );
            assert_eq!(r.spill_bytes, 0, "{arch} {k} spills:\n{}", c.log);
            let (threads, dyn_smem) = launch_shape(k);
            let regs_per_block = r.registers.div_ceil(8) * 8 * threads;
            let smem = r.shared_bytes + dyn_smem;
            let by_smem = smem_sm.checked_div(smem).unwrap_or(32);
            let blocks = (max_threads / threads)
                .min(regs_sm / regs_per_block)
                .min(by_smem)
                .min(32);
            let occupancy = (blocks * threads) as f64 / max_threads as f64;
            println!(
                "cuda {arch} {k:<14} registers {:>3}  shared {:>6} B (static {}, dynamic {dyn_smem})  block {threads:>3}  occupancy ≈ {:.0}%",
                r.registers,
                smem,
                r.shared_bytes,
                occupancy * 100.0
            );
        }
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(cuda::cubin_name(arch)), &c.cubin).unwrap();
        }
    }
}

#[test]
fn without_a_driver_the_gpu_path_says_so() {
    if cuda::driver_available() {
        eprintln!(
            "SKIPPED: a CUDA driver is present (the fallback is tested on machines without one)"
        );
        return;
    }
    let e = Gpu::new().unwrap_err();
    assert!(matches!(e, CudaError::NoDriver));
    assert!(e.to_string().contains("no CUDA driver"), "{e}");
}

fn gpu() -> Option<Gpu> {
    if !cuda::driver_available() {
        eprintln!("SKIPPED: no CUDA driver");
        return None;
    }
    match Gpu::new() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

/// Largest |want − got| relative to the largest |want|.
fn max_rel_err(want: &[f32], got: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    want.iter()
        .zip(got)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn rnd(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// The GPU search in fp16 may pick another row only where the CPU's top two are within fp16
/// rounding of each other; there the residual differs, elsewhere it is identical.
fn compare_residual(g: &Gpu, queries: &[f32], bank: &LevelBank, name: &str) {
    let c = bank.channels();
    let n = queries.len() / c;
    let (mut ai, mut ri) = (vec![0u32; n], vec![0.0f32; n * c]);
    nearest_residual(
        queries,
        bank,
        &mut Default::default(),
        &mut ai,
        &mut ri,
        Par::Single,
    )
    .unwrap();
    let gb = g.upload_bank(bank).unwrap();
    let (mut ag, mut rg) = (vec![0u32; n], vec![0.0f32; n * c]);
    g.nearest_residual(queries, &gb, &mut ag, &mut rg).unwrap();
    let unit = bank.unit();
    let mut qn = vec![0.0f32; queries.len()];
    edge_ad_kernels::residual::normalise_rows(queries, c, &mut qn);
    let sim = |i: usize, j: u32| -> f64 {
        let (a, b) = (
            &qn[i * c..(i + 1) * c],
            &unit[j as usize * c..(j as usize + 1) * c],
        );
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    };
    let (mut flips, mut worst_gap) = (0, 0.0f64);
    for i in 0..n {
        if ag[i] != ai[i] {
            let gap = sim(i, ai[i]) - sim(i, ag[i]);
            assert!(
                gap < 2e-3,
                "{name}: query {i}: GPU row {} vs CPU row {}: cosine gap {gap} is no fp16 near-tie",
                ag[i],
                ai[i]
            );
            flips += 1;
            worst_gap = worst_gap.max(gap);
        } else {
            assert_eq!(
                &rg[i * c..(i + 1) * c],
                &ri[i * c..(i + 1) * c],
                "{name}: residual of query {i}"
            );
        }
    }
    println!(
        "cuda residual [{name}]: {n} queries × {} rows × {c}: argmax equal on {}/{n}; flips only at fp16 near-ties (largest cosine gap {worst_gap:.2e}); residuals identical where argmax equal",
        bank.rows(),
        n - flips
    );
}

/// [`compare_residual`] at the DINOv2-S shape (256 queries, K = 8 → 2048 bank rows, C = 384) and
/// ragged ones, random data from `seed`, the first query zero (similarity 0 everywhere → row 0).
fn compare_random_shapes(g: &Gpu, mut seed: u64, label: &str) {
    for (n, m, c) in [
        (256, 2048, 384),
        (37, 1000, 64),
        (1, 3, 16),
        (196, 784, 152),
        (5, 40, 3),
    ] {
        let bank: Vec<f32> = (0..m * c).map(|_| rnd(&mut seed)).collect();
        let mut q: Vec<f32> = (0..n * c).map(|_| rnd(&mut seed)).collect();
        q[..c].fill(0.0);
        let b = LevelBank::new(m, c, &bank, BankDtype::F16).unwrap();
        compare_residual(g, &q, &b, &format!("{label} {n}×{m}×{c}"));
    }
}

#[test]
fn gpu_residual_search_matches_the_cpu_twin() {
    let Some(g) = gpu() else { return };
    compare_random_shapes(&g, 5, "random");
    // Conformance case a2 (C = 64), when its file travelled with the test.
    if let Some(dir) = std::env::var_os("EDGE_AD_CONFORMANCE").map(PathBuf::from) {
        let bytes = std::fs::read(dir.join("a2_residual_random.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f = |k: &str| -> Vec<f32> {
            st.tensor(k)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let (q, bank) = (f("query"), f("bank"));
        let mut tokens = vec![0.0f32; 256 * 64];
        for ch in 0..64 {
            for p in 0..256 {
                tokens[p * 64 + ch] = q[ch * 256 + p];
            }
        }
        let b = LevelBank::new(256, 64, &bank, BankDtype::F16).unwrap();
        compare_residual(&g, &tokens, &b, "conformance a2");
    }
}

/// Xavier's residual search (WMMA m16n16k16; sm_72 has no m16n8k16) forced on this GPU, against
/// the CPU twin at the same shapes.
#[test]
fn gpu_wmma_residual_search_matches_the_cpu_twin() {
    let Some(mut g) = gpu() else { return };
    g.force_wmma_search();
    compare_random_shapes(&g, 6, "WMMA");
}

#[test]
fn gpu_featurenorm_matches_the_cpu_twin() {
    let Some(g) = gpu() else { return };
    let mut seed = 9u64;
    for form in [NormForm::Code, NormForm::Paper] {
        let fnorm = FeatureNorm::new((16, 16), (224, 224), 4.0, form).unwrap();
        let levels: Vec<Vec<f32>> = (0..4)
            .map(|_| (0..256 * 384).map(|_| rnd(&mut seed)).collect())
            .collect();
        let views: Vec<&[f32]> = levels.iter().map(Vec::as_slice).collect();
        let mut cpu = vec![0.0; 224 * 224];
        let sc = fnorm
            .score(&views, &mut cpu, None, &mut Default::default(), Par::Single)
            .unwrap();
        let mut gpu = vec![0.0; 224 * 224];
        let sg = g.featurenorm(&fnorm, &views, &mut gpu).unwrap();
        let err = max_rel_err(&cpu, &gpu);
        let serr = ((sg - sc) / sc).abs();
        println!(
            "cuda featurenorm [{form:?}]: map max rel err {err:.2e}, score rel err {serr:.2e}"
        );
        assert!(err < 1e-5 && serr < 1e-5, "{err} {serr}");
    }
}

/// `concat_h softmax(Q_h K_hᵀ) V_h` in f64: the reference of the attention step (spec §4.2 step 3),
/// K and V per head `n × d` as the CPU projector keeps them.
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], heads: usize, n: usize) -> Vec<f32> {
    let d = k.len() / (heads * n);
    let c = heads * d;
    let p = q.len() / c;
    let mut out = vec![0.0f32; p * c];
    for r in 0..p {
        for h in 0..heads {
            let qh = &q[r * c + h * d..r * c + (h + 1) * d];
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    let kj = &k[(h * n + j) * d..(h * n + j + 1) * d];
                    qh.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..d {
                let acc: f64 = (0..n).map(|j| e[j] * v[(h * n + j) * d + i] as f64).sum();
                out[r * c + h * d + i] = (acc / z) as f32;
            }
        }
    }
    out
}

/// The fused attention against the f64 reference on fp16-rounded K/V (isolates the kernel: online
/// softmax, lane merge, tiling), at the DINOv2-S shape and awkward ones (partial tiles, fewer
/// references than lanes, partial blocks of query rows).
#[test]
fn gpu_lkv_attention_matches_the_reference() {
    let Some(g) = gpu() else { return };
    let mut seed = 21u64;
    for (p, heads, d, n) in [
        (256, 16, 24, 2048),
        (37, 16, 4, 1000),
        (5, 16, 32, 3),
        (9, 2, 24, 33),
    ] {
        let c = heads * d;
        // Scores of a few units (Q pre-scaled by 1/√d), as trained projectors give.
        let q: Vec<f32> = (0..p * c).map(|_| 4.0 * rnd(&mut seed)).collect();
        let round = |x: f32| half::f16::from_f32(x).to_f32();
        let k: Vec<f32> = (0..heads * n * d)
            .map(|_| round(2.0 * rnd(&mut seed)))
            .collect();
        let v: Vec<f32> = (0..heads * n * d).map(|_| round(rnd(&mut seed))).collect();
        let kv = g.upload_kv(&k, &v, heads, n).unwrap();
        // The tensor-core kernel takes Q in fp16 (its reference too) and rounds the softmax
        // weights P to fp16 for the P·V product: that rounding is its tolerance.
        let mma = g.attention_on_tensor_cores(&kv);
        let q_ref: Vec<f32> = if mma {
            q.iter().map(|&x| round(x)).collect()
        } else {
            q.clone()
        };
        let want = attention_reference(&q_ref, &k, &v, heads, n);
        let mut got = vec![0.0f32; p * c];
        g.lkv_attention(&q, &kv, &mut got).unwrap();
        let err = max_rel_err(&want, &got);
        let (kernel, tol) = if mma {
            ("tensor cores", 5e-3)
        } else {
            ("FFMA", 1e-4)
        };
        println!("cuda lkv_attention ({kernel}) p={p} heads={heads} d={d} refs={n}: max rel err {err:.2e}");
        assert!(err < tol, "p={p} d={d} n={n}: {err}");
    }
    // A head dimension past the kernel's registers is refused, not run.
    let e = g
        .upload_kv(&[0.0; 2 * 40], &[0.0; 2 * 40], 1, 2)
        .unwrap_err();
    assert!(e.to_string().contains("head dimension 40"), "{e}");
}

/// One frame the CPU way (the reference of [`Gpu::run_frame`]): residual per level, the projector
/// when given, FeatureNorm. Returns (argmax per level, map, level grids, score).
fn cpu_frame(
    queries: &[Vec<f32>],
    banks: &[LevelBank],
    projector: Option<&Projector>,
    fnorm: &FeatureNorm,
) -> (Vec<Vec<u32>>, Vec<f32>, Vec<f32>, f32) {
    let c = banks[0].channels();
    let p = queries[0].len() / c;
    let (mut argmax, mut feats) = (Vec::new(), Vec::new());
    for (l, (q, b)) in queries.iter().zip(banks).enumerate() {
        let (mut a, mut r) = (vec![0u32; p], vec![0.0f32; q.len()]);
        nearest_residual(q, b, &mut Default::default(), &mut a, &mut r, Par::Single).unwrap();
        if let Some(pr) = projector {
            let mut y = vec![0.0f32; r.len()];
            pr.levels()[l]
                .forward(&r, &mut y, &mut Default::default(), Par::Single)
                .unwrap();
            r = y;
        }
        argmax.push(a);
        feats.push(r);
    }
    let views: Vec<&[f32]> = feats.iter().map(Vec::as_slice).collect();
    let (h, w) = fnorm.out_size();
    let (mut map, mut grids) = (vec![0.0; h * w], vec![0.0; views.len() * p]);
    let score = fnorm
        .score(
            &views,
            &mut map,
            Some(&mut grids),
            &mut Default::default(),
            Par::Single,
        )
        .unwrap();
    (argmax, map, grids, score)
}

struct FrameCase {
    levels: usize,
    grid: (usize, usize),
    c: usize,
    rows: usize,
    projector: Option<Projector>,
    queries: Vec<Vec<f32>>,
    banks: Vec<LevelBank>,
    fnorm: FeatureNorm,
}

fn frame_case(
    levels: usize,
    grid: (usize, usize),
    c: usize,
    rows: usize,
    refs: Option<usize>,
) -> FrameCase {
    let mut seed = (levels * 1000 + c) as u64;
    let p = grid.0 * grid.1;
    let banks = (0..levels)
        .map(|_| {
            let v: Vec<f32> = (0..rows * c).map(|_| rnd(&mut seed)).collect();
            LevelBank::new(rows, c, &v, BankDtype::F16).unwrap()
        })
        .collect();
    let queries = (0..levels)
        .map(|_| (0..p * c).map(|_| rnd(&mut seed)).collect())
        .collect();
    let projector = refs.map(|n| {
        Projector::from_safetensors(&edge_ad_kernels::weights::generated_projector(levels, c, n))
            .unwrap()
    });
    FrameCase {
        levels,
        grid,
        c,
        rows,
        projector,
        queries,
        banks,
        fnorm: FeatureNorm::new(grid, (224, 224), 4.0, NormForm::Code).unwrap(),
    }
}

/// The GPU frame's pieces, uploaded once.
fn gpu_frame(
    g: &Gpu,
    case: &FrameCase,
) -> (
    Vec<cuda::GpuBank>,
    Option<Vec<cuda::GpuProjector>>,
    cuda::GpuFrame,
) {
    let banks: Vec<_> = case
        .banks
        .iter()
        .map(|b| g.upload_bank(b).unwrap())
        .collect();
    let projectors = case.projector.as_ref().map(|p| {
        p.levels()
            .iter()
            .map(|l| g.upload_projector(l).unwrap())
            .collect::<Vec<_>>()
    });
    let frame = g
        .frame(
            case.levels,
            case.c,
            &case.fnorm,
            projectors.as_ref().map(|v| &v[0]),
        )
        .unwrap();
    (banks, projectors, frame)
}

/// The whole frame on the GPU against the CPU frame: at the DINOv2-S shape with the generated
/// full-size projector (4 levels, C = 384, N_r = 2048, 2048 bank rows), without it, and at the
/// demo's shape (one 14×14 level of 152 channels: padded to 160 on the device).
#[test]
fn gpu_frame_matches_the_cpu_frame() {
    let Some(g) = gpu() else { return };
    let identity: Vec<usize> = (0..4).collect();
    for (name, case) in [
        (
            "DINOv2-S + projector",
            frame_case(4, (16, 16), 384, 2048, Some(2048)),
        ),
        ("DINOv2-S", frame_case(4, (16, 16), 384, 2048, None)),
        ("demo", frame_case(1, (14, 14), 152, 784, None)),
    ] {
        let (argmax, map, grids, score) = cpu_frame(
            &case.queries,
            &case.banks,
            case.projector.as_ref(),
            &case.fnorm,
        );
        let (banks, projectors, mut frame) = gpu_frame(&g, &case);
        for (l, q) in case.queries.iter().enumerate() {
            frame.stage(l, q).unwrap();
        }
        let proj = projectors.as_deref().map(|v| (v, &identity[..case.levels]));
        let gscore = g.run_frame(&mut frame, &banks, proj).unwrap();
        let p = case.grid.0 * case.grid.1;
        let flips: usize = (0..case.levels)
            .map(|l| {
                frame
                    .argmax(l)
                    .zip(&argmax[l])
                    .filter(|(a, b)| a != *b)
                    .count()
            })
            .sum();
        let (map_err, grid_err) = (
            max_rel_err(&map, frame.map()),
            max_rel_err(&grids, frame.level_maps()),
        );
        let score_err = ((gscore - score) / score).abs();
        println!(
            "cuda frame [{name}]: {} levels × {p} × {} vs {} rows: map max rel err {map_err:.2e}, level grids {grid_err:.2e}, score {score:.5} vs {gscore:.5} (rel {score_err:.2e}), argmax flips {flips}/{}",
            case.levels, case.c, case.rows, case.levels * p
        );
        assert!(
            map_err <= 2e-2 && grid_err <= 2e-2 && score_err <= 2e-2,
            "{name}"
        );
        assert!(flips * 100 <= case.levels * p, "{name}: {flips} flips");
        assert_eq!(frame.score(), gscore);
    }
}

/// Steady state allocates nothing: no device allocation through the handle, no change in the
/// driver's free memory, no host allocation by edge-ad's code (the counting allocator; CUDA's own
/// libraries allocate with C's malloc, which it does not see).
#[test]
fn gpu_frame_allocates_nothing_per_frame() {
    let Some(g) = gpu() else { return };
    let case = frame_case(4, (16, 16), 384, 2048, Some(2048));
    let (banks, projectors, mut frame) = gpu_frame(&g, &case);
    let identity: Vec<usize> = (0..4).collect();
    let proj = projectors.as_deref().map(|v| (v, &identity[..]));
    let run = |frame: &mut cuda::GpuFrame| -> f32 {
        for (l, q) in case.queries.iter().enumerate() {
            frame.stage(l, q).unwrap();
        }
        g.run_frame(frame, &banks, proj).unwrap()
    };
    for _ in 0..3 {
        run(&mut frame);
    }
    let (device_before, free_before) = (g.allocations(), g.free_memory().unwrap());
    COUNT_HERE.with(|c| c.set(true));
    let host_before = HOST_ALLOCATIONS.load(Ordering::Relaxed);
    let mut scores = 0.0;
    for _ in 0..20 {
        scores += run(&mut frame);
    }
    let host = HOST_ALLOCATIONS.load(Ordering::Relaxed) - host_before;
    COUNT_HERE.with(|c| c.set(false));
    let (device, free) = (g.allocations() - device_before, g.free_memory().unwrap());
    println!(
        "cuda frame allocations over 20 frames: host {host}, device {device}, free memory {free_before} → {free} bytes (scores summed {scores})"
    );
    assert_eq!((host, device, free), (0, 0, free_before));
}

/// Timings on a GPU (run explicitly: `--ignored`): each call includes its host↔device copies.
#[test]
#[ignore]
fn gpu_timings() {
    let Some(g) = gpu() else { return };
    let mut seed = 3u64;
    let (n, m, c) = (256usize, 2048usize, 384usize);
    let banks: Vec<LevelBank> = (0..4)
        .map(|_| {
            LevelBank::new(
                m,
                c,
                &(0..m * c).map(|_| rnd(&mut seed)).collect::<Vec<_>>(),
                BankDtype::F16,
            )
            .unwrap()
        })
        .collect();
    let gbanks: Vec<_> = banks.iter().map(|b| g.upload_bank(b).unwrap()).collect();
    let q: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..n * c).map(|_| rnd(&mut seed)).collect())
        .collect();
    let (mut a, mut r) = (vec![0u32; n], vec![vec![0.0f32; n * c]; 4]);
    let fnorm = FeatureNorm::new((16, 16), (224, 224), 4.0, NormForm::Code).unwrap();
    let mut map = vec![0.0f32; 224 * 224];
    let mut times = (Vec::new(), Vec::new());
    for it in 0..60 {
        let t = std::time::Instant::now();
        for l in 0..4 {
            g.nearest_residual(&q[l], &gbanks[l], &mut a, &mut r[l])
                .unwrap();
        }
        let t1 = t.elapsed();
        let views: Vec<&[f32]> = r.iter().map(Vec::as_slice).collect();
        let t = std::time::Instant::now();
        g.featurenorm(&fnorm, &views, &mut map).unwrap();
        if it >= 10 {
            times.0.push(t1.as_secs_f64() * 1e3);
            times.1.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (rm, fm) = (med(&mut times.0), med(&mut times.1));
    let flops = 4.0 * 2.0 * (n * m * c) as f64;
    println!(
        "cuda timings on {}: residual 4 levels {rm:.3} ms ({:.2} TFLOP/s incl. copies), featurenorm {fm:.3} ms, registers nn_search {:?}",
        g.arch(),
        flops / (rm * 1e-3) / 1e12,
        g.registers("nn_search")
    );

    // LKV attention of one level at the DINOv2-S shape (16 heads of 24, N_r = 2048).
    let (heads, d, refs) = (16usize, 24usize, 2048usize);
    let k: Vec<f32> = (0..heads * refs * d).map(|_| rnd(&mut seed)).collect();
    let v: Vec<f32> = (0..heads * refs * d).map(|_| rnd(&mut seed)).collect();
    let kv = g.upload_kv(&k, &v, heads, refs).unwrap();
    let mut out = vec![0.0f32; n * c];
    let mut at = Vec::new();
    for it in 0..60 {
        let t = std::time::Instant::now();
        g.lkv_attention(&q[0], &kv, &mut out).unwrap();
        if it >= 10 {
            at.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let am = med(&mut at);
    let flops = 2.0 * 2.0 * (n * refs * c) as f64;
    println!(
        "cuda timings on {}: lkv_attention one level {am:.3} ms ({:.2} TFLOP/s incl. copies), registers {:?}",
        g.arch(),
        flops / (am * 1e-3) / 1e12,
        g.registers(if g.attention_on_tensor_cores(&kv) {
            "lkv_attention_mma"
        } else {
            "lkv_attention"
        })
    );

    // The whole frame at the DINOv2-S shape, device times from CUDA events (issue: bench).
    let gemm_res = g.gemm_f16_tflops(n, m, c, 50).unwrap();
    let gemm_att = g.gemm_f16_tflops(n, refs, 24, 50).unwrap();
    let identity: Vec<usize> = (0..4).collect();
    for refs in [None, Some(2048)] {
        let case = frame_case(4, (16, 16), 384, 2048, refs);
        let (banks, projectors, mut frame) = gpu_frame(&g, &case);
        let proj = projectors.as_deref().map(|v| (v, &identity[..]));
        let mut t: Vec<Vec<f64>> = vec![Vec::new(); 7];
        for it in 0..110 {
            let wall = std::time::Instant::now();
            for (l, q) in case.queries.iter().enumerate() {
                frame.stage(l, q).unwrap();
            }
            g.run_frame(&mut frame, &banks, proj).unwrap();
            let w = wall.elapsed().as_secs_f64() * 1e3;
            let ft = frame.timings();
            if it >= 10 {
                for (v, x) in t.iter_mut().zip([
                    ft.upload_ms,
                    ft.residual_ms,
                    ft.projector_ms,
                    ft.attention_ms,
                    ft.score_ms,
                    ft.download_ms,
                    w,
                ]) {
                    v.push(x);
                }
            }
        }
        let [up, res, proj_ms, att, score, down, wall] =
            [0, 1, 2, 3, 4, 5, 6].map(|i| med(&mut t[i]));
        let res_tf = 4.0 * 2.0 * (n * m * c) as f64 / (res * 1e-3) / 1e12;
        let att_tf =
            4.0 * 2.0 * 2.0 * (n * refs.unwrap_or(0) * c) as f64 / (att.max(1e-9) * 1e-3) / 1e12;
        println!(
            "cuda frame on {} ({}), DINOv2-S shape, 4 levels{}: median ms upload {up:.4}, residual {res:.4} ({res_tf:.1} TFLOP/s), projector {proj_ms:.4} (attention {att:.4}, {att_tf:.1} TFLOP/s), featurenorm {score:.4}, download {down:.4}; three steps {:.4} ms; wall per frame {wall:.4} ms; cuBLAS fp16 GEMM {gemm_res:.1} TFLOP/s at {n}×{m}×{c}, {gemm_att:.1} at {n}×{refs}×24 (attention head)",
            g.name(),
            g.arch(),
            if refs.is_some() { " + projector" } else { "" },
            res + proj_ms + score,
            refs = 2048,
        );
    }
}
