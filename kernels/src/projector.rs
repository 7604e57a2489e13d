//! The ADPretrain feature projector, one Learnable Key/Value attention layer per level (spec §4).
//!
//! Per level, with `T` the level's `P × C` residual tokens:
//! `A = MHA(Q = T, K = V = ref_proj(x_ref))`, `X1 = T − A` (subtractive residual, §4.2 step 4),
//! `Y = fc2(gelu(fc1(X1) ⊙ se_gate)) + X1` with the squeeze-excitation gate taken over the mean of
//! `fc1(X1)` across the image's positions, and the exact (erf) GELU. No LayerNorm, no dropout.
//!
//! `K` and `V` do not depend on the frame and are computed once at load (§4.4); a frame costs the
//! `Q` projection, the attention, the output projection and the MLP.

use crate::gemm::{flops, matmul, Par, Rhs};
use crate::KernelError;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::cell::RefCell;

/// Attention heads of every level (spec §4.1: `nn.MultiheadAttention(C, 16)`).
pub const HEADS: usize = 16;

/// Query rows per attention task: 64 × N_r(2048) × 4 B = 512 KiB of scores, one L2.
const QUERY_BLOCK: usize = 64;

/// One level's weights, widened to f32, laid out for the per-frame products.
#[derive(Debug, Clone)]
pub struct LevelProjector {
    channels: usize,
    refs: usize,
    se_hidden: usize,
    pub(crate) w_q: Vec<f32>,
    pub(crate) b_q: Vec<f32>,
    /// Per head, `refs × d` contiguous: `K_h`.
    pub(crate) k_heads: Vec<f32>,
    /// Per head, `refs × d` contiguous: `V_h`.
    pub(crate) v_heads: Vec<f32>,
    pub(crate) w_o: Vec<f32>,
    pub(crate) b_o: Vec<f32>,
    pub(crate) w_1: Vec<f32>,
    pub(crate) b_1: Vec<f32>,
    pub(crate) w_s1: Vec<f32>,
    pub(crate) b_s1: Vec<f32>,
    pub(crate) w_s2: Vec<f32>,
    pub(crate) b_s2: Vec<f32>,
    pub(crate) w_2: Vec<f32>,
    pub(crate) b_2: Vec<f32>,
    /// Per head, `K_h` packed in 16-reference panels for the AVX-512 attention (when available).
    #[cfg(target_arch = "x86_64")]
    k_panels: Option<Vec<f32>>,
    /// Debug copies of the precomputed `ref_proj`, `K`, `V` (`refs × C`), kept for tests.
    precomputed: [Vec<f32>; 3],
}

/// The projector of all levels, in level order.
#[derive(Debug, Clone)]
pub struct Projector {
    levels: Vec<LevelProjector>,
}

/// Per-frame scratch of one level's forward pass; allocated on first use, then reused.
#[derive(Debug, Default)]
pub struct ProjectorWorkspace {
    q: Vec<f32>,
    attn: Vec<f32>,
    x1: Vec<f32>,
    hidden: Vec<f32>,
    sums: Vec<f64>,
    mean: Vec<f32>,
    squeeze: Vec<f32>,
    gate: Vec<f32>,
}

thread_local! {
    /// Score block of one attention task (`QUERY_BLOCK × refs`), one per pool thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `make_divisible(v, 8)` of the authors' SE block (timm rule): nearest multiple of 8, at least 8,
/// never below 90 % of `v`.
pub fn se_width(channels: usize) -> usize {
    let v = (4 * channels) as f64 / 16.0;
    let mut r = (((v + 4.0) as usize) / 8 * 8).max(8);
    if (r as f64) < 0.9 * v {
        r += 8;
    }
    r
}

/// The authors' state-dict entries of one level (spec §4.3), as key suffixes after `l{i}_proj.`
/// with their shapes, for width `c`, `refs` learnable references and SE width `se`.
pub fn state_dict_shapes(c: usize, refs: usize, se: usize) -> [(&'static str, Vec<usize>); 15] {
    let h = 4 * c;
    [
        ("x_ref", vec![1, refs, c]),
        ("ref_proj.project.weight", vec![c, c, 1]),
        ("ref_proj.project.bias", vec![c]),
        ("layers.0.cross_attn.in_proj_weight", vec![3 * c, c]),
        ("layers.0.cross_attn.in_proj_bias", vec![3 * c]),
        ("layers.0.cross_attn.out_proj.weight", vec![c, c]),
        ("layers.0.cross_attn.out_proj.bias", vec![c]),
        ("layers.0.mlp.fc1.weight", vec![h, c]),
        ("layers.0.mlp.fc1.bias", vec![h]),
        ("layers.0.mlp.se.fc1.weight", vec![se, h]),
        ("layers.0.mlp.se.fc1.bias", vec![se]),
        ("layers.0.mlp.se.fc2.weight", vec![h, se]),
        ("layers.0.mlp.se.fc2.bias", vec![h]),
        ("layers.0.mlp.fc2.weight", vec![c, h]),
        ("layers.0.mlp.fc2.bias", vec![c]),
    ]
}

struct Reader<'a> {
    st: SafeTensors<'a>,
}

impl Reader<'_> {
    fn get(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, KernelError> {
        let t = self.st.tensor(key).map_err(|_| KernelError::MissingKey {
            key: key.to_string(),
        })?;
        if t.shape() != shape {
            return Err(KernelError::WrongShape {
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            other => {
                return Err(KernelError::Dtype {
                    key: key.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    fn shape(&self, key: &str) -> Result<Vec<usize>, KernelError> {
        self.st
            .tensor(key)
            .map(|t| t.shape().to_vec())
            .map_err(|_| KernelError::MissingKey {
                key: key.to_string(),
            })
    }
}

impl Projector {
    /// Parse a safetensors file holding the authors' state-dict keys (spec §4.3), f32, bf16 or
    /// f16 tensors (widened exactly). Keys not of the form `l{i}_proj.*` are ignored; levels are
    /// `l1_proj`, `l2_proj`, … up to the first missing one.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, KernelError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| KernelError::Format(e.to_string()))?;
        let r = Reader { st };
        let mut levels = Vec::new();
        while r
            .st
            .names()
            .iter()
            .any(|n| n.starts_with(&format!("l{}_proj.", levels.len() + 1)))
        {
            levels.push(LevelProjector::load(
                &r,
                &format!("l{}_proj.", levels.len() + 1),
            )?);
        }
        if levels.is_empty() {
            return Err(KernelError::MissingKey {
                key: "l1_proj.x_ref".into(),
            });
        }
        Ok(Self { levels })
    }

    /// Levels in order.
    pub fn levels(&self) -> &[LevelProjector] {
        &self.levels
    }
}

impl LevelProjector {
    fn load(r: &Reader<'_>, p: &str) -> Result<Self, KernelError> {
        let x_ref_shape = r.shape(&format!("{p}x_ref"))?;
        let (refs, c) = match x_ref_shape[..] {
            [1, n, c] if n > 0 && c > 0 => (n, c),
            _ => {
                return Err(KernelError::WrongShape {
                    key: format!("{p}x_ref"),
                    expected: vec![1, 0, 0],
                    found: x_ref_shape,
                })
            }
        };
        if c % HEADS != 0 {
            return Err(KernelError::Shape(format!(
                "{p}x_ref: {c} channels do not split into {HEADS} heads"
            )));
        }
        let se = r
            .shape(&format!("{p}layers.0.mlp.se.fc1.weight"))?
            .first()
            .copied()
            .unwrap_or(0);
        let mut tensors = state_dict_shapes(c, refs, se)
            .into_iter()
            .map(|(key, shape)| r.get(&format!("{p}{key}"), &shape))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || tensors.next().expect("one tensor per table entry");
        // Same order as `state_dict_shapes`.
        let (x_ref, w_ref, b_ref, w_in, b_in, w_o, b_o) =
            (next(), next(), next(), next(), next(), next(), next());
        let (w_1, b_1, w_s1, b_s1, w_s2, b_s2, w_2, b_2) = (
            next(),
            next(),
            next(),
            next(),
            next(),
            next(),
            next(),
            next(),
        );

        // §4.4: R = x_ref·W_refᵀ + b_ref; K = R·W_kᵀ + b_k; V = R·W_vᵀ + b_v, once.
        let linear = |x: &[f32], w: &[f32], b: &[f32], rows: usize, out: usize, inp: usize| {
            let mut y: Vec<f32> = b.iter().copied().cycle().take(rows * out).collect();
            matmul(rows, out, inp, x, w, Rhs::NxK, &mut y, true, Par::Pool);
            y
        };
        let rp = linear(&x_ref, &w_ref, &b_ref, refs, c, c);
        let k = linear(&rp, &w_in[c * c..2 * c * c], &b_in[c..2 * c], refs, c, c);
        let v = linear(&rp, &w_in[2 * c * c..], &b_in[2 * c..], refs, c, c);
        let d = c / HEADS;
        let split = |m: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(m.len());
            for head in 0..HEADS {
                for row in m.chunks_exact(c) {
                    out.extend_from_slice(&row[head * d..(head + 1) * d]);
                }
            }
            out
        };
        let k_heads = split(&k);
        #[cfg(target_arch = "x86_64")]
        let k_panels = (crate::residual_avx512::available()
            && d <= crate::attention_avx512::MAX_HEAD_DIM)
            .then(|| {
                k_heads
                    .chunks_exact(refs * d)
                    .flat_map(|kh| crate::residual_avx512::pack_panels(kh, refs, d))
                    .collect()
            });
        Ok(Self {
            channels: c,
            refs,
            se_hidden: se,
            #[cfg(target_arch = "x86_64")]
            k_panels,
            w_q: w_in[..c * c].to_vec(),
            b_q: b_in[..c].to_vec(),
            k_heads,
            v_heads: split(&v),
            w_o,
            b_o,
            w_1,
            b_1,
            w_s1,
            b_s1,
            w_s2,
            b_s2,
            w_2,
            b_2,
            precomputed: [rp, k, v],
        })
    }

    /// Feature width `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// Learnable reference tokens `N_r`.
    pub fn refs(&self) -> usize {
        self.refs
    }
    /// SE hidden width.
    pub fn se_hidden(&self) -> usize {
        self.se_hidden
    }
    /// The load-time `ref_proj(x_ref)`, `K` and `V` (each `N_r × C`), spec §4.4.
    pub fn precomputed(&self) -> [&[f32]; 3] {
        [
            &self.precomputed[0],
            &self.precomputed[1],
            &self.precomputed[2],
        ]
    }

    /// Floating-point work of one forward pass over `positions` tokens.
    pub fn flops(&self, positions: usize) -> f64 {
        let (c, n) = (self.channels, self.refs);
        2.0 * flops(positions, c, c)
            + 2.0 * flops(positions, n, c)
            + 2.0 * flops(positions, 4 * c, c)
    }

    /// The same projector with the portable attention only (the AVX-512 twin's reference).
    pub fn portable(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return Self {
            k_panels: None,
            ..self
        };
        #[cfg(not(target_arch = "x86_64"))]
        self
    }

    /// Project one image's tokens: `tokens` and `out` are `P × C`, positions row-major.
    ///
    /// `out` may not alias `tokens`. The SE mean runs over all `P` positions (spec §4.2), so the
    /// result depends on the whole image grid.
    pub fn forward(
        &self,
        tokens: &[f32],
        out: &mut [f32],
        ws: &mut ProjectorWorkspace,
        par: Par,
    ) -> Result<(), KernelError> {
        let c = self.channels;
        if !tokens.len().is_multiple_of(c) || tokens.is_empty() || out.len() != tokens.len() {
            return Err(KernelError::Shape(format!(
                "projector of {c} channels: tokens {} / output {} values",
                tokens.len(),
                out.len()
            )));
        }
        let p = tokens.len() / c;
        let (h, d, n) = (4 * c, c / HEADS, self.refs);

        // Q = T·W_qᵀ + b_q, pre-scaled by 1/√d (as PyTorch's attention scales q).
        fill_rows(&mut ws.q, &self.b_q, p);
        matmul(p, c, c, tokens, &self.w_q, Rhs::NxK, &mut ws.q, true, par);
        let scale = 1.0 / (d as f32).sqrt();
        ws.q.iter_mut().for_each(|v| *v *= scale);

        // Attention, one task per (head, query block): scores stay in a per-thread L2 block.
        ws.attn.resize(p * c, 0.0);
        let blocks = p.div_ceil(QUERY_BLOCK);
        let q = &ws.q;
        let attn_ptr = SendPtr(ws.attn.as_mut_ptr());
        let task = |t: usize| {
            let (head, blk) = (t / blocks, t % blocks);
            let rows = QUERY_BLOCK.min(p - blk * QUERY_BLOCK);
            let r0 = blk * QUERY_BLOCK;
            let kh = &self.k_heads[head * n * d..(head + 1) * n * d];
            let vh = &self.v_heads[head * n * d..(head + 1) * n * d];
            #[cfg(target_arch = "x86_64")]
            if let Some(kp) = &self.k_panels {
                let per_head =
                    n.div_ceil(crate::residual_avx512::LANES) * crate::residual_avx512::LANES * d;
                SCORES.with_borrow_mut(|s| {
                    s.resize(crate::attention_avx512::scratch_len(n), 0.0);
                    // SAFETY: k_panels exists only with AVX-512F and d ≤ MAX_HEAD_DIM; q rows
                    // r0..r0+rows and the matching attn rows are in bounds; task (head, blk) alone
                    // writes attn rows r0..r0+rows, columns of `head`.
                    unsafe {
                        crate::attention_avx512::attend(
                            q.as_ptr().add(r0 * c + head * d),
                            c,
                            rows,
                            d,
                            &kp[head * per_head..(head + 1) * per_head],
                            vh,
                            n,
                            attn_ptr.get().add(r0 * c + head * d),
                            c,
                            s,
                        )
                    }
                });
                return;
            }
            SCORES.with_borrow_mut(|s| {
                s.resize(QUERY_BLOCK * n + rows * d + QUERY_BLOCK * d, 0.0);
                let (scores, rest) = s.split_at_mut(QUERY_BLOCK * n);
                let (qh, oh) = rest.split_at_mut(QUERY_BLOCK * d);
                for i in 0..rows {
                    let src = &q[(r0 + i) * c + head * d..(r0 + i) * c + (head + 1) * d];
                    qh[i * d..(i + 1) * d].copy_from_slice(src);
                }
                let scores = &mut scores[..rows * n];
                matmul(
                    rows,
                    n,
                    d,
                    &qh[..rows * d],
                    kh,
                    Rhs::NxK,
                    scores,
                    false,
                    Par::Single,
                );
                for row in scores.chunks_exact_mut(n) {
                    crate::vmath::softmax(row);
                }
                let oh = &mut oh[..rows * d];
                matmul(rows, d, n, scores, vh, Rhs::KxN, oh, false, Par::Single);
                for i in 0..rows {
                    // SAFETY: task (head, blk) alone writes rows r0..r0+rows, columns of `head`.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            attn_ptr.get().add((r0 + i) * c + head * d),
                            d,
                        )
                    };
                    dst.copy_from_slice(&oh[i * d..(i + 1) * d]);
                }
            });
        };
        match par {
            Par::Pool => (0..HEADS * blocks).into_par_iter().for_each(task),
            Par::Single => (0..HEADS * blocks).for_each(task),
        }

        // A = concat·W_oᵀ + b_o;  X1 = T − A.
        fill_rows(&mut ws.x1, &self.b_o, p);
        matmul(
            p,
            c,
            c,
            &ws.attn,
            &self.w_o,
            Rhs::NxK,
            &mut ws.x1,
            true,
            par,
        );
        for (x, &t) in ws.x1.iter_mut().zip(tokens) {
            *x = t - *x;
        }

        // H = X1·W_1ᵀ + b_1, then the SE gate from H's mean over positions.
        fill_rows(&mut ws.hidden, &self.b_1, p);
        matmul(
            p,
            h,
            c,
            &ws.x1,
            &self.w_1,
            Rhs::NxK,
            &mut ws.hidden,
            true,
            par,
        );
        ws.sums.clear();
        ws.sums.resize(h, 0.0);
        for row in ws.hidden.chunks_exact(h) {
            for (m, &v) in ws.sums.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        ws.mean.clear();
        ws.mean
            .extend(ws.sums.iter().map(|&s| (s / p as f64) as f32));
        ws.squeeze.clone_from(&self.b_s1);
        matmul(
            1,
            self.se_hidden,
            h,
            &ws.mean,
            &self.w_s1,
            Rhs::NxK,
            &mut ws.squeeze,
            true,
            Par::Single,
        );
        ws.squeeze.iter_mut().for_each(|v| *v = v.max(0.0));
        ws.gate.clone_from(&self.b_s2);
        matmul(
            1,
            h,
            self.se_hidden,
            &ws.squeeze,
            &self.w_s2,
            Rhs::NxK,
            &mut ws.gate,
            true,
            Par::Single,
        );
        ws.gate
            .iter_mut()
            .for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        let gate = &ws.gate;
        let act = |row: &mut [f32]| crate::vmath::gelu_gated(row, gate);
        match par {
            Par::Pool => ws.hidden.par_chunks_mut(h).for_each(act),
            Par::Single => ws.hidden.chunks_mut(h).for_each(act),
        }

        // Y = gelu(H')·W_2ᵀ + b_2 + X1.
        for (row, x1) in out.chunks_exact_mut(c).zip(ws.x1.chunks_exact(c)) {
            for ((o, &b), &x) in row.iter_mut().zip(&self.b_2).zip(x1) {
                *o = b + x;
            }
        }
        matmul(p, c, h, &ws.hidden, &self.w_2, Rhs::NxK, out, true, par);
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint regions (see the use site).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn fill_rows(dst: &mut Vec<f32>, row: &[f32], rows: usize) {
    dst.clear();
    for _ in 0..rows {
        dst.extend_from_slice(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn se_width_matches_spec_table() {
        assert_eq!(se_width(384), 96);
        assert_eq!(se_width(768), 192);
        assert_eq!(se_width(1024), 256);
        assert_eq!(se_width(32), 8);
    }

    #[test]
    fn gelu_is_the_erf_form() {
        let mut v = [1.0f32, -1.0, 0.0];
        crate::vmath::gelu_gated(&mut v, &[1.0; 3]);
        assert!((v[0] - 0.841_344_7).abs() < 1e-6);
        assert!((v[1] + 0.158_655_3).abs() < 1e-6);
        assert_eq!(v[2], 0.0);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_values() {
        let mut r = [1000.0f32, 1000.0, 998.0];
        crate::vmath::softmax(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((r[0] - r[1]).abs() < 1e-9 && r[2] < r[0]);
    }

    #[test]
    fn simd_attention_equals_portable_at_awkward_sizes() {
        // head dims 3, 24, 40 (1, 2 and 3 zmm per row); refs and positions not multiples of 16 / 8.
        for (c, n, positions) in [(48, 37, 19), (384, 70, 33), (640, 21, 9)] {
            let fast =
                Projector::from_safetensors(&crate::weights::generated_projector(1, c, n)).unwrap();
            let slow = fast.clone();
            let slow = Projector {
                levels: slow
                    .levels
                    .into_iter()
                    .map(LevelProjector::portable)
                    .collect(),
            };
            let tokens = crate::weights::generated_tensor(7, positions * c, 1.0);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            let (mut a, mut b) = (vec![0.0; tokens.len()], vec![0.0; tokens.len()]);
            pool.install(|| {
                fast.levels()[0]
                    .forward(&tokens, &mut a, &mut Default::default(), Par::Pool)
                    .unwrap();
                slow.levels()[0]
                    .forward(&tokens, &mut b, &mut Default::default(), Par::Single)
                    .unwrap();
            });
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(&b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
                / scale;
            assert!(err < 2e-6, "c {c} n {n} p {positions}: rel err {err}");
        }
    }

    #[test]
    fn missing_key_is_named() {
        let bytes = safetensors::serialize(
            [(
                "l1_proj.x_ref",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![1, 1, 16], &[0u8; 64])
                    .unwrap(),
            )],
            &None,
        )
        .unwrap();
        let e = Projector::from_safetensors(&bytes).unwrap_err().to_string();
        assert!(e.contains("l1_proj.layers.0.mlp.se.fc1.weight"), "{e}");
    }
}
