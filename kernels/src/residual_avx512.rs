//! AVX-512 twin of the residual search's similarity + argmax (spec §3.3), fused: a register tile
//! of 8 queries × 48 bank rows accumulates over all channels, then folds into each query's running
//! best; the similarity matrix is never stored.
//!
//! Why a hand-written kernel: the `gemm` crate uses AVX-512 only on nightly Rust, while tract runs
//! the backbone with AVX-512 kernels; on a CPU with full-width AVX-512 the AVX2 product was half
//! the speed it can be, and the residual search then costs more than the budget after the backbone.
//!
//! Bank layout ([`pack_panels`]): panels of 16 rows, channel-major inside a panel
//! (`panel[k·16 + lane] = unit_row[16·p + lane][k]`), so one aligned-width load gives one channel of
//! 16 rows. Rows past the bank's end are zero and masked out of the argmax.

use std::arch::x86_64::*;

/// Bank rows per panel (one zmm of f32).
pub const LANES: usize = 16;
const MR: usize = 8;
const NP: usize = 3;

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Repack unit-normalised bank rows (`rows × c`) into 16-row channel-major panels.
pub fn pack_panels(unit: &[f32], rows: usize, c: usize) -> Vec<f32> {
    let panels = rows.div_ceil(LANES);
    let mut out = vec![0.0f32; panels * LANES * c];
    for r in 0..rows {
        let (p, lane) = (r / LANES, r % LANES);
        for k in 0..c {
            out[(p * c + k) * LANES + lane] = unit[r * c + k];
        }
    }
    out
}

/// For each query row of `queries` (`n × c`, unit-normalised), update `best` with the largest
/// similarity over bank rows `0..rows` and its lowest index. `best` must start at `(−∞, 0)`.
///
/// # Safety
/// The CPU must support AVX-512F ([`available`]); `panels` must come from [`pack_panels`] with
/// the same `rows` and `c`; `queries.len() == best.len() * c`.
#[target_feature(enable = "avx512f")]
pub unsafe fn search(
    queries: &[f32],
    panels: &[f32],
    rows: usize,
    c: usize,
    best: &mut [(f32, u32)],
) {
    let n = best.len();
    debug_assert_eq!(queries.len(), n * c);
    let npanels = rows.div_ceil(LANES);
    debug_assert!(panels.len() >= npanels * LANES * c);
    let mut p = 0;
    while p < npanels {
        let np = NP.min(npanels - p);
        let mut i = 0;
        while i < n {
            let mr = MR.min(n - i);
            let q = queries.as_ptr().add(i * c);
            let b = panels.as_ptr().add(p * LANES * c);
            match (mr, np) {
                (MR, NP) => tile::<MR, NP>(q, b, c, p, rows, &mut best[i..i + MR]),
                (MR, 2) => tile::<MR, 2>(q, b, c, p, rows, &mut best[i..i + MR]),
                (MR, _) => tile::<MR, 1>(q, b, c, p, rows, &mut best[i..i + MR]),
                (_, NP) => {
                    for j in 0..mr {
                        tile::<1, NP>(q.add(j * c), b, c, p, rows, &mut best[i + j..i + j + 1]);
                    }
                }
                (_, 2) => {
                    for j in 0..mr {
                        tile::<1, 2>(q.add(j * c), b, c, p, rows, &mut best[i + j..i + j + 1]);
                    }
                }
                _ => {
                    for j in 0..mr {
                        tile::<1, 1>(q.add(j * c), b, c, p, rows, &mut best[i + j..i + j + 1]);
                    }
                }
            }
            i += mr;
        }
        p += np;
    }
}

/// The register tile both AVX-512 kernels stand on: `R` rows of `q` (row stride `qs`) against
/// `P` consecutive 16-row panels at `panels` (each channel-major over `k` channels), accumulated
/// over the `k` channels. Returns `acc[i][j]` = 16 dot products of row `i` with panel `j`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn accumulate<const R: usize, const P: usize>(
    q: *const f32,
    qs: usize,
    panels: *const f32,
    k: usize,
) -> [[__m512; P]; R] {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for kk in 0..k {
        let mut bv = [_mm512_setzero_ps(); P];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(panels.add((j * k + kk) * LANES));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*q.add(i * qs + kk));
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(a, bv[j], *v);
            }
        }
    }
    acc
}

/// Mask of the first `valid` lanes (all 16 when `valid ≥ 16`).
pub(crate) fn lane_mask(valid: usize) -> __mmask16 {
    if valid >= LANES {
        0xFFFF
    } else {
        ((1u32 << valid) - 1) as __mmask16
    }
}

/// One `R × (P·16)` register tile: queries `q[0..R]` against panels `p0..p0+P`, folded into each
/// query's running best.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const P: usize>(
    q: *const f32,
    b: *const f32,
    c: usize,
    p0: usize,
    rows: usize,
    best: &mut [(f32, u32)],
) {
    let acc = accumulate::<R, P>(q, c, b, c);
    for (i, row) in acc.iter().enumerate() {
        let cur = &mut best[i];
        for (j, &v) in row.iter().enumerate() {
            let base = (p0 + j) * LANES;
            let mask = lane_mask(rows.saturating_sub(base));
            let m = _mm512_mask_reduce_max_ps(mask, v);
            // Strictly greater: earlier panels (lower rows) keep ties; NaN never wins.
            if m > cur.0 {
                let eq = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(mask, v, _mm512_set1_ps(m));
                *cur = (m, (base + eq.trailing_zeros() as usize) as u32);
            }
        }
    }
}
