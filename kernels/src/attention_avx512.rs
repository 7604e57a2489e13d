//! AVX-512 twin of one attention head over a block of queries (spec §4.2 step 3):
//! `softmax(Q_h K_hᵀ) V_h` with `Q` already scaled by `1/√d`.
//!
//! Why: the head products are skinny (`k = d = 24` for the scores, `n = d` for the output); the
//! `gemm` crate's AVX2 path ran them at ~100 GFLOP/s, and they are most of the projector's work.
//! Here the scores of 8 queries × 48 references come from one register tile over `d`, the softmax
//! runs vectorised on an L2-resident row block, and `P·V` accumulates 8 output rows of up to
//! 48 channels in registers while streaming `V` once.
//!
//! `K_h` is packed as in the residual search ([`crate::residual_avx512::pack_panels`]): panels of
//! 16 references, channel-major; padding references score 0 and are excluded from the softmax.

use crate::residual_avx512::{accumulate, lane_mask, LANES};
use std::arch::x86_64::*;

const MR: usize = 8;

/// Largest head dimension the kernel handles (3 zmm per output row).
pub const MAX_HEAD_DIM: usize = 48;

/// Scratch floats [`attend`] needs for `n` references.
pub fn scratch_len(n: usize) -> usize {
    MR * n.div_ceil(LANES) * LANES
}

/// `out[i, 0..d] = softmax_j(q_i · k_j) · v_j` for the `rows` query rows at `q` (row stride `qs`,
/// the head's `d` channels at the start of each row); `out` has row stride `os`.
///
/// # Safety
/// AVX-512F must be available; `k_panels` packed from `n × d` keys; `v` is `n × d` row-major;
/// `d ≤ MAX_HEAD_DIM`; `q`/`out` valid for `rows` rows at their strides; `scratch` at least
/// [`scratch_len`]`(n)` floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn attend(
    q: *const f32,
    qs: usize,
    rows: usize,
    d: usize,
    k_panels: &[f32],
    v: &[f32],
    n: usize,
    out: *mut f32,
    os: usize,
    scratch: &mut [f32],
) {
    let npanels = n.div_ceil(LANES);
    let stride = npanels * LANES;
    debug_assert!(scratch.len() >= MR * stride && d <= MAX_HEAD_DIM);
    let mut i = 0;
    while i < rows {
        let r = MR.min(rows - i);
        let qi = q.add(i * qs);
        // Phase 1: scores, 8 (or 1) queries × 48/32/16 references per register tile.
        let mut p = 0;
        while p < npanels {
            let np = 3.min(npanels - p);
            let kp = k_panels.as_ptr().add(p * LANES * d);
            let sp = scratch.as_mut_ptr().add(p * LANES);
            match (r, np) {
                (MR, 3) => scores::<MR, 3>(qi, qs, kp, d, sp, stride),
                (MR, 2) => scores::<MR, 2>(qi, qs, kp, d, sp, stride),
                (MR, _) => scores::<MR, 1>(qi, qs, kp, d, sp, stride),
                _ => {
                    for j in 0..r {
                        let (qj, sj) = (qi.add(j * qs), sp.add(j * stride));
                        match np {
                            3 => scores::<1, 3>(qj, qs, kp, d, sj, stride),
                            2 => scores::<1, 2>(qj, qs, kp, d, sj, stride),
                            _ => scores::<1, 1>(qj, qs, kp, d, sj, stride),
                        }
                    }
                }
            }
            p += np;
        }
        // Phase 2: exp(s − max) in place; 1/sum per row.
        let mut inv = [0.0f32; MR];
        for (j, inv) in inv.iter_mut().enumerate().take(r) {
            let row = &mut scratch[j * stride..j * stride + n];
            *inv = 1.0 / exp_row(row);
        }
        // Phase 3: out = P · V, then scale rows by 1/sum.
        let dc = d.div_ceil(LANES);
        let oi = out.add(i * os);
        match (r, dc) {
            (MR, 1) => pv::<MR, 1>(scratch, stride, v, n, d, oi, os, &inv),
            (MR, 2) => pv::<MR, 2>(scratch, stride, v, n, d, oi, os, &inv),
            (MR, _) => pv::<MR, 3>(scratch, stride, v, n, d, oi, os, &inv),
            _ => {
                for j in 0..r {
                    let s = &scratch[j * stride..];
                    let o = oi.add(j * os);
                    match dc {
                        1 => pv::<1, 1>(s, stride, v, n, d, o, os, &inv[j..]),
                        2 => pv::<1, 2>(s, stride, v, n, d, o, os, &inv[j..]),
                        _ => pv::<1, 3>(s, stride, v, n, d, o, os, &inv[j..]),
                    }
                }
            }
        }
        i += r;
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores<const R: usize, const P: usize>(
    q: *const f32,
    qs: usize,
    kp: *const f32,
    d: usize,
    s: *mut f32,
    ss: usize,
) {
    let acc = accumulate::<R, P>(q, qs, kp, d);
    for (i, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            _mm512_storeu_ps(s.add(i * ss + j * LANES), v);
        }
    }
}

/// `row[j] = exp(row[j] − max)`; returns the sum. Same polynomial as [`crate::vmath::exp`].
#[target_feature(enable = "avx512f")]
unsafe fn exp_row(row: &mut [f32]) -> f32 {
    let n = row.len();
    let full = n / LANES * LANES;
    let tail = lane_mask(n - full);
    let p = row.as_mut_ptr();
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j < full {
        m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(j)));
        j += LANES;
    }
    if tail != 0 {
        m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, p.add(full)));
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let mut sum = _mm512_setzero_ps();
    j = 0;
    while j < full {
        let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(j)), max));
        _mm512_storeu_ps(p.add(j), e);
        sum = _mm512_add_ps(sum, e);
        j += LANES;
    }
    if tail != 0 {
        let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), max));
        _mm512_mask_storeu_ps(p.add(full), tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    _mm512_reduce_add_ps(sum)
}

/// 16-lane `e^x`, the same reduction and polynomial as [`crate::vmath::exp`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp512(x: __m512) -> __m512 {
    use crate::vmath::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)),
        _mm512_set1_ps(EXP_MAX),
    );
    let t = _mm512_fmadd_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut y = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_fmadd_ps(
        _mm512_mul_ps(y, r),
        r,
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(y, _mm512_castsi512_ps(e))
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pv<const R: usize, const DC: usize>(
    s: &[f32],
    ss: usize,
    v: &[f32],
    n: usize,
    d: usize,
    out: *mut f32,
    os: usize,
    inv: &[f32],
) {
    let masks: [__mmask16; DC] = std::array::from_fn(|t| lane_mask(d.saturating_sub(t * LANES)));
    let mut acc = [[_mm512_setzero_ps(); DC]; R];
    let (sp, vp) = (s.as_ptr(), v.as_ptr());
    for j in 0..n {
        let mut vr = [_mm512_setzero_ps(); DC];
        for (t, x) in vr.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(masks[t], vp.add(j * d + t * LANES));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*sp.add(i * ss + j));
            for (t, x) in row.iter_mut().enumerate() {
                *x = _mm512_fmadd_ps(a, vr[t], *x);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let sc = _mm512_set1_ps(inv[i]);
        for (t, &x) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * os + t * LANES), masks[t], _mm512_mul_ps(x, sc));
        }
    }
}
