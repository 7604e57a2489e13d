//! Conformance cases a1, a2, a3 (residual search, bank layout), b (projector) and c
//! (FeatureNorm) of `shared/conformance/adpretrain/`, against the CPU kernels.

use edge_ad::pipeline::{Bank, Features};
use edge_ad_kernels::{
    nearest_residual, BankDtype, FeatureNorm, LevelBank, NormForm, Par, Projector,
};
use edge_ad_tests::*;

const DIR: &str = "conformance/adpretrain";

fn case(test: &str, file: &str) -> Option<St> {
    shared_path(test, &format!("{DIR}/{file}")).map(|p| St::open(&p))
}

/// Residual case: returns (argmax, residual tokens) for the case's query and bank.
fn run_residual(st: &St) -> (Vec<usize>, Vec<u32>, Vec<f32>, Vec<f32>) {
    let (qs, q) = st.f32("query");
    let (bs, b) = st.f32("bank");
    let tokens = chw_to_tokens(&q, &qs, 0);
    let bank = LevelBank::new(bs[0], bs[1], &b, BankDtype::F32).unwrap();
    let n = qs[2] * qs[3];
    let mut idx = vec![0u32; n];
    let mut res = vec![0.0f32; n * bs[1]];
    nearest_residual(
        &tokens,
        &bank,
        &mut Default::default(),
        &mut idx,
        &mut res,
        Par::Single,
    )
    .unwrap();
    let (es, e) = st.f32("expected.residual");
    (qs, idx, res, chw_to_tokens(&e, &es, 0))
}

#[test]
fn a1_residual_exact_ties() {
    let Some(st) = case("a1_residual_ties", "a1_residual_ties.safetensors") else {
        return;
    };
    let (_, idx, res, want) = run_residual(&st);
    let (_, expected) = st.i64("expected.argmax");
    assert_eq!(idx.iter().map(|&i| i as i64).collect::<Vec<_>>(), expected);
    assert_eq!(idx, [0, 2, 0, 6, 8, 0, 9, 8]);
    assert_eq!(res, want, "a1 residuals must be exact");
    println!("conformance a1: argmax exact, residual max abs err 0");
}

#[test]
fn a2_residual_random() {
    let Some(st) = case("a2_residual_random", "a2_residual_random.safetensors") else {
        return;
    };
    let (_, idx, res, want) = run_residual(&st);
    let (_, expected) = st.i64("expected.argmax");
    assert_eq!(idx.iter().map(|&i| i as i64).collect::<Vec<_>>(), expected);
    let err = max_rel_err(&res, &want);
    println!("conformance a2: argmax exact (256/256), residual max rel err {err:.3e}");
    assert!(err <= 1e-4, "a2 residual rel err {err}");
}

#[test]
fn a3_bank_layout_is_image_major_then_row_major() {
    let Some(st) = case("a3_bank_layout", "a3_bank_layout.safetensors") else {
        return;
    };
    let (rs, r) = st.f32("ref_maps");
    let refs: Vec<Features> = (0..rs[0])
        .map(|k| Features {
            levels: vec![chw_to_tokens(&r, &rs, k)],
        })
        .collect();
    let bank = Bank::from_features(&refs, rs[1], BankDtype::F32).unwrap();
    let (es, e) = st.f32("expected.bank");
    assert_eq!(bank.levels[0].rows(), es[0]);
    assert_eq!(bank.levels[0].raw(), &e[..]);
    println!("conformance a3: bank layout exact ({}×{})", es[0], es[1]);
}

fn projector_case(file: &str, test: &str) {
    let Some(st) = case(test, file) else { return };
    let proj = Projector::from_safetensors(st.bytes()).unwrap();
    assert_eq!(proj.levels().len(), 4);

    // Load-time precomputation of level 1 (§4.4).
    let l1 = &proj.levels()[0];
    let mut worst_pre = 0.0f64;
    for (got, name) in l1.precomputed().iter().zip(["ref_proj", "K", "V"]) {
        let (_, want) = st.f32(&format!("case.debug.l1.{name}"));
        let e = max_rel_err(got, &want);
        worst_pre = worst_pre.max(e);
        assert!(e <= 1e-4, "{file} l1 {name}: {e}");
    }

    let mut worst = 0.0f64;
    for l in 1..=4 {
        let (is, input) = st.f32(&format!("case.input.l{l}"));
        let (es, expected) = st.f32(&format!("case.expected.l{l}"));
        for b in 0..is[0] {
            let tokens = chw_to_tokens(&input, &is, b);
            let mut out = vec![0.0; tokens.len()];
            proj.levels()[l - 1]
                .forward(&tokens, &mut out, &mut Default::default(), Par::Single)
                .unwrap();
            let e = max_rel_err(&out, &chw_to_tokens(&expected, &es, b));
            worst = worst.max(e);
            assert!(e <= 1e-4, "{file} level {l} image {b}: rel err {e}");
        }
    }
    println!(
        "conformance {file}: worst projector rel err {worst:.3e} (K/V/ref_proj {worst_pre:.3e})"
    );
}

#[test]
fn b_projector_f32_weights() {
    projector_case("b_projector_f32.safetensors", "b_projector_f32");
}

#[test]
fn b_projector_bf16_weights() {
    projector_case("b_projector_bf16.safetensors", "b_projector_bf16");
}

#[test]
fn b_weight_generator_reproduces_stored_weights() {
    let Some(st) = case("b_weight_generator", "b_projector_f32.safetensors") else {
        return;
    };
    let manifest = shared_path("b_weight_generator", &format!("{DIR}/manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    let b = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == "b_projector_f32.safetensors")
        .unwrap();
    let gens = b["weight_generator"].as_array().unwrap();
    assert!(gens.len() >= 60);
    for g in gens {
        let key = g["key"].as_str().unwrap();
        let len: usize = g["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .product();
        let v = edge_ad_kernels::weights::generated_tensor(
            g["seed"].as_u64().unwrap(),
            len,
            g["scale"].as_f64().unwrap() as f32,
        );
        assert_eq!(v, st.f32(key).1, "{key}");
    }
}

#[test]
fn c_featurenorm() {
    let Some(st) = case("c_featurenorm", "c_featurenorm.safetensors") else {
        return;
    };
    let fnorm = FeatureNorm::new((16, 16), (224, 224), 4.0, NormForm::Code).unwrap();
    let (_, lm_want) = st.f32("expected.level_maps");
    let (_, map_want) = st.f32("expected.final_map");
    let (_, score_want) = st.f32("expected.image_score");
    let levels: Vec<(Vec<usize>, Vec<f32>)> =
        (1..=4).map(|l| st.f32(&format!("features.l{l}"))).collect();
    let (mut w_lm, mut w_map, mut w_score) = (0.0f64, 0.0f64, 0.0f64);
    for b in 0..2 {
        let toks: Vec<Vec<f32>> = levels.iter().map(|(s, v)| chw_to_tokens(v, s, b)).collect();
        let views: Vec<&[f32]> = toks.iter().map(Vec::as_slice).collect();
        let mut map = vec![0.0; 224 * 224];
        let mut lm = vec![0.0; 4 * 256];
        let score = fnorm
            .score(
                &views,
                &mut map,
                Some(&mut lm),
                &mut Default::default(),
                Par::Single,
            )
            .unwrap();
        for l in 0..4 {
            let want = &lm_want[(b * 4 + l) * 256..(b * 4 + l + 1) * 256];
            w_lm = w_lm.max(max_rel_err(&lm[l * 256..(l + 1) * 256], want));
        }
        w_map = w_map.max(max_rel_err(&map, &map_want[b * 50176..(b + 1) * 50176]));
        w_score = w_score.max(((score - score_want[b]) / score_want[b]).abs() as f64);
    }
    println!("conformance c: worst rel err level maps {w_lm:.3e}, final map {w_map:.3e}, score {w_score:.3e}");
    assert!(w_lm <= 1e-4 && w_map <= 1e-4 && w_score <= 1e-4);
}
