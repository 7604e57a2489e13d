//! The CUDA kernels on the conformance cases a1, a2 (residual search), b (projector) and c
//! (FeatureNorm) of `shared/conformance/adpretrain/`: each against its CPU twin and against the
//! case's expected values. Runs where a CUDA driver and a GPU are present; prints SKIPPED
//! elsewhere (CI has no GPU: there `kernels/tests/cuda.rs` compiles every kernel with NVRTC).

use edge_ad_kernels::cuda::{self, Gpu};
use edge_ad_kernels::{
    nearest_residual, BankDtype, FeatureNorm, LevelBank, NormForm, Par, Projector,
};
use edge_ad_tests::*;

const DIR: &str = "conformance/adpretrain";

fn gpu(test: &str) -> Option<Gpu> {
    if !cuda::driver_available() {
        eprintln!("SKIPPED {test}: no CUDA driver");
        return None;
    }
    match Gpu::new() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
    }
}

fn case(test: &str, file: &str) -> Option<St> {
    shared_path(test, &format!("{DIR}/{file}")).map(|p| St::open(&p))
}

/// Residual cases with an fp16 bank: the GPU against the CPU twin on the same bank (argmax equal,
/// residuals bit-identical) and against the case's f32 expectation (fp16 tolerance).
fn residual_case(test: &str, file: &str) {
    let Some(g) = gpu(test) else { return };
    let Some(st) = case(test, file) else { return };
    let (qs, q) = st.f32("query");
    let (bs, b) = st.f32("bank");
    let tokens = chw_to_tokens(&q, &qs, 0);
    let bank = LevelBank::new(bs[0], bs[1], &b, BankDtype::F16).unwrap();
    let n = qs[2] * qs[3];
    let (mut ic, mut rc) = (vec![0u32; n], vec![0.0f32; n * bs[1]]);
    nearest_residual(
        &tokens,
        &bank,
        &mut Default::default(),
        &mut ic,
        &mut rc,
        Par::Single,
    )
    .unwrap();
    let gb = g.upload_bank(&bank).unwrap();
    let (mut ig, mut rg) = (vec![0u32; n], vec![0.0f32; n * bs[1]]);
    g.nearest_residual(&tokens, &gb, &mut ig, &mut rg).unwrap();
    let (_, expected) = st.i64("expected.argmax");
    let (es, e) = st.f32("expected.residual");
    let want = chw_to_tokens(&e, &es, 0);
    let vs_expected = max_rel_err(&rg, &want);
    // Where the GPU (fp16 unit queries on tensor cores) picks another row than the CPU twin, the
    // two rows must be an fp16 near-tie; elsewhere the residuals are bit-identical.
    let c = bs[1];
    let mut qn = vec![0.0f32; tokens.len()];
    edge_ad_kernels::residual::normalise_rows(&tokens, c, &mut qn);
    let cos = |i: usize, j: u32| -> f64 {
        let row = &bank.unit()[j as usize * c..(j as usize + 1) * c];
        qn[i * c..(i + 1) * c]
            .iter()
            .zip(row)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum()
    };
    let (mut flips, mut worst_gap, mut diff) = (0, 0.0f64, 0.0f32);
    for i in 0..n {
        if ig[i] == ic[i] {
            for (a, b) in rg[i * c..(i + 1) * c].iter().zip(&rc[i * c..(i + 1) * c]) {
                diff = diff.max((a - b).abs());
            }
        } else {
            flips += 1;
            worst_gap = worst_gap.max(cos(i, ic[i]) - cos(i, ig[i]));
        }
    }
    let argmax_expected = ig
        .iter()
        .zip(&expected)
        .filter(|(a, b)| **a as i64 == **b)
        .count();
    println!(
        "conformance {test} on {}: argmax GPU = CPU twin {}/{n} (flips at near-ties, largest cosine gap {worst_gap:.1e}), = expected {argmax_expected}/{n}; residual vs CPU twin max abs diff {diff:.1e} where rows agree, vs expected (f32) rel err {vs_expected:.2e}",
        g.arch(),
        n - flips,
    );
    assert!(worst_gap < 2e-3, "{test}: a flip is no fp16 near-tie");
    assert_eq!(
        diff, 0.0,
        "{test}: residuals identical to the CPU twin where rows agree"
    );
    assert!(vs_expected <= 2e-2, "{test}: {vs_expected}");
}

#[test]
fn cuda_a1_residual_ties() {
    residual_case("cuda_a1_residual_ties", "a1_residual_ties.safetensors");
}

#[test]
fn cuda_a2_residual_random() {
    residual_case("cuda_a2_residual_random", "a2_residual_random.safetensors");
}

/// Projector cases: the GPU projector (cuBLAS SGEMM, fused attention on fp16 K/V) against the
/// case's expectation and against the CPU twin.
fn projector_case(test: &str, file: &str) {
    let Some(g) = gpu(test) else { return };
    let Some(st) = case(test, file) else { return };
    let proj = Projector::from_safetensors(st.bytes()).unwrap();
    let (mut worst, mut worst_twin) = (0.0f64, 0.0f64);
    for l in 1..=4 {
        let gp = g.upload_projector(&proj.levels()[l - 1]).unwrap();
        let (is, input) = st.f32(&format!("case.input.l{l}"));
        let (es, expected) = st.f32(&format!("case.expected.l{l}"));
        for b in 0..is[0] {
            let tokens = chw_to_tokens(&input, &is, b);
            let (mut out, mut twin) = (vec![0.0; tokens.len()], vec![0.0; tokens.len()]);
            g.projector_forward(&gp, &tokens, &mut out).unwrap();
            proj.levels()[l - 1]
                .forward(&tokens, &mut twin, &mut Default::default(), Par::Single)
                .unwrap();
            worst = worst.max(max_rel_err(&out, &chw_to_tokens(&expected, &es, b)));
            worst_twin = worst_twin.max(max_rel_err(&out, &twin));
        }
    }
    println!(
        "conformance {test} on {}: GPU projector worst rel err vs expected {worst:.2e}, vs CPU twin {worst_twin:.2e}",
        g.arch()
    );
    assert!(
        worst <= 2e-2 && worst_twin <= 2e-2,
        "{test}: {worst} {worst_twin}"
    );
}

#[test]
fn cuda_b_projector_f32() {
    projector_case("cuda_b_projector_f32", "b_projector_f32.safetensors");
}

#[test]
fn cuda_b_projector_bf16() {
    projector_case("cuda_b_projector_bf16", "b_projector_bf16.safetensors");
}

/// FeatureNorm case: f32 throughout on the GPU too, so the CPU tolerance (1e-4) holds.
#[test]
fn cuda_c_featurenorm() {
    let Some(g) = gpu("cuda_c_featurenorm") else {
        return;
    };
    let Some(st) = case("cuda_c_featurenorm", "c_featurenorm.safetensors") else {
        return;
    };
    let fnorm = FeatureNorm::new((16, 16), (224, 224), 4.0, NormForm::Code).unwrap();
    let (_, map_want) = st.f32("expected.final_map");
    let (_, score_want) = st.f32("expected.image_score");
    let levels: Vec<(Vec<usize>, Vec<f32>)> =
        (1..=4).map(|l| st.f32(&format!("features.l{l}"))).collect();
    let (mut w_map, mut w_score) = (0.0f64, 0.0f64);
    for b in 0..2 {
        let toks: Vec<Vec<f32>> = levels.iter().map(|(s, v)| chw_to_tokens(v, s, b)).collect();
        let views: Vec<&[f32]> = toks.iter().map(Vec::as_slice).collect();
        let mut map = vec![0.0; 224 * 224];
        let score = g.featurenorm(&fnorm, &views, &mut map).unwrap();
        w_map = w_map.max(max_rel_err(&map, &map_want[b * 50176..(b + 1) * 50176]));
        w_score = w_score.max(((score - score_want[b]) / score_want[b]).abs() as f64);
    }
    println!(
        "conformance cuda_c_featurenorm on {}: worst rel err final map {w_map:.3e}, score {w_score:.3e}",
        g.arch()
    );
    assert!(w_map <= 1e-4 && w_score <= 1e-4);
}
