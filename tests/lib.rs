//! Helpers for edge-ad's end-to-end and conformance tests: where the shared data and the model
//! are, safetensors readers, and the conformance error measure.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `../shared` beside the checkout (or `$EDGE_AD_SHARED`), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = std::env::var_os("EDGE_AD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"));
    p.is_dir().then_some(p)
}

/// True when running under CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// A path under `shared/`, or `None` after printing that the test is skipped (panics in CI).
pub fn shared_path(test: &str, rel: &str) -> Option<PathBuf> {
    match shared_dir() {
        Some(d) => Some(d.join(rel)),
        None if in_ci() => panic!("{test}: ../shared is missing in CI"),
        None => {
            eprintln!("SKIPPED {test}: ../shared is not beside the checkout");
            None
        }
    }
}

/// The DINOv2-S description, if its ONNX file has been fetched (panics in CI when absent).
pub fn dinov2_model(test: &str) -> Option<PathBuf> {
    let toml = repo_root().join("models/dinov2-s.toml");
    let onnx = repo_root().join("models/vit_s_focus.onnx");
    if onnx.is_file() {
        return Some(toml);
    }
    if in_ci() {
        panic!("{test}: models/vit_s_focus.onnx missing in CI (the setup script fetches it)");
    }
    eprintln!("SKIPPED {test}: models/vit_s_focus.onnx not fetched (run tools/fetch-dinov2-s.sh)");
    None
}

/// A safetensors file read into memory.
pub struct St {
    bytes: Vec<u8>,
    /// The file, for messages.
    pub path: PathBuf,
}

impl St {
    /// Read a file.
    pub fn open(path: &Path) -> St {
        St {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            path: path.into(),
        }
    }
    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn view(&self, name: &str) -> (safetensors::Dtype, Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.path.display()));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }
    /// Tensor as f32 (F32, F64 or BF16 widened) with its shape.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (dt, shape, d) = self.view(name);
        let v = match dt {
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            safetensors::Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            other => panic!("{name}: dtype {other:?} is not a float"),
        };
        (shape, v)
    }
    /// Tensor as f64 (F64 or F32).
    pub fn f64(&self, name: &str) -> (Vec<usize>, Vec<f64>) {
        let (dt, shape, d) = self.view(name);
        let v = match dt {
            safetensors::Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: dtype {other:?} is not a float"),
        };
        (shape, v)
    }
    /// Tensor as i64.
    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (dt, shape, d) = self.view(name);
        assert_eq!(dt, safetensors::Dtype::I64, "{name}");
        (
            shape,
            d.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }
    /// Tensor as u8.
    pub fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let (dt, shape, d) = self.view(name);
        assert_eq!(dt, safetensors::Dtype::U8, "{name}");
        (shape, d)
    }
}

/// The conformance error measure: `max|got − want| / max|want|` (conformance README).
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// `[B, C, H, W]` image `b` → `H·W × C` tokens (the kernels' layout).
pub fn chw_to_tokens(v: &[f32], shape: &[usize], b: usize) -> Vec<f32> {
    let (c, p) = (shape[1], shape[2] * shape[3]);
    let img = &v[b * c * p..(b + 1) * c * p];
    let mut out = vec![0.0; c * p];
    for ch in 0..c {
        for pos in 0..p {
            out[pos * c + ch] = img[ch * p + pos];
        }
    }
    out
}

/// The conformance case of `file` in `manifest.json`.
pub fn manifest_case(manifest: &Path, file: &str) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display())),
    )
    .expect("manifest.json is JSON");
    m["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["file"] == file)
        .cloned()
        .expect("case in manifest")
}

/// Serialise the projector described by a manifest `weight_generator` list (conformance README,
/// "Generated weights") as safetensors bytes with the authors' keys.
pub fn generated_projector(weight_generator: &serde_json::Value) -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for g in weight_generator.as_array().expect("weight_generator list") {
        let shape: Vec<usize> = g["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let v = edge_ad_kernels::weights::generated_tensor(
            g["seed"].as_u64().unwrap(),
            shape.iter().product(),
            g["scale"].as_f64().unwrap() as f32,
        );
        tensors.push((
            g["key"].as_str().unwrap().to_string(),
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, &None).expect("serialise")
}
