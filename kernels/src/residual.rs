//! Nearest-neighbour residual features (spec §3.3).
//!
//! For every query feature of a level: find the bank row of largest **cosine** similarity (the
//! authors' code, not the paper's L2 wording), lowest row index on ties, and emit
//! `residual = raw query − raw bank row`.
//!
//! The similarity is one blocked matrix product of the unit-normalised queries against the
//! unit-normalised bank, taken [`BANK_BLOCK`] bank rows at a time with a running argmax, so the
//! full `queries × rows` similarity matrix never exists (the CUDA twin fuses the same way).

use crate::gemm::{flops, matmul, Par, Rhs};
use crate::KernelError;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Bank rows per similarity block: 256 queries × 512 rows × 4 B = 512 KiB, an L2's worth.
pub const BANK_BLOCK: usize = 512;

/// PyTorch `F.normalize` epsilon: a zero vector stays zero (similarity 0 with everything).
const NORM_EPS: f64 = 1e-12;

/// Element type of a stored bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankDtype {
    /// Half precision (edge-ad default): half the memory, maps within 2.6e-3 of f32 (spec §3.3).
    F16,
    /// Single precision: exact conformance with the reference.
    F32,
}

impl BankDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            BankDtype::F16 => 2,
            BankDtype::F32 => 4,
        }
    }
    /// Lower-case name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BankDtype::F16 => "f16",
            BankDtype::F32 => "f32",
        }
    }
}

/// The reference features of one level: `rows × channels`, raw (not normalised), spec §3.1 layout.
///
/// In memory the rows are kept widened to f32 (the values *are* the fp16-rounded ones for an f16
/// bank, so search and subtraction see exactly the stored bank) together with their unit-normalised
/// copy, computed once here and never per frame.
#[derive(Debug, Clone)]
pub struct LevelBank {
    rows: usize,
    channels: usize,
    dtype: BankDtype,
    raw: Vec<f32>,
    unit: Vec<f32>,
    /// `unit` repacked for the AVX-512 kernel, when the CPU has it.
    #[cfg(target_arch = "x86_64")]
    panels: Option<Vec<f32>>,
}

fn check_shape(rows: usize, channels: usize, values: usize) -> Result<(), KernelError> {
    if rows == 0 || channels == 0 || values != rows * channels {
        return Err(KernelError::Shape(format!(
            "bank of {rows} rows × {channels} channels needs {} values, got {values}",
            rows * channels
        )));
    }
    Ok(())
}

impl LevelBank {
    /// A bank from f32 features, rounded to `dtype`.
    pub fn new(
        rows: usize,
        channels: usize,
        features: &[f32],
        dtype: BankDtype,
    ) -> Result<Self, KernelError> {
        check_shape(rows, channels, features.len())?;
        let raw: Vec<f32> = match dtype {
            BankDtype::F32 => features.to_vec(),
            BankDtype::F16 => {
                // Slice conversions use F16C / NEON when the CPU has them (per-element ones
                // do not): rounding a bank is otherwise the slowest step of building it.
                let mut half = vec![f16::ZERO; features.len()];
                half.convert_from_f32_slice(features);
                let mut back = vec![0.0f32; features.len()];
                half.convert_to_f32_slice(&mut back);
                back
            }
        };
        Self::from_rounded(rows, channels, raw, dtype)
    }

    /// A half-precision bank from values already widened from f16 (e.g. rows of stored banks
    /// concatenated with `convert_to_f32_slice`): skips the rounding pass of [`LevelBank::new`].
    /// Values not representable in f16 are kept as they are.
    pub fn from_f16_widened(
        rows: usize,
        channels: usize,
        raw: Vec<f32>,
    ) -> Result<Self, KernelError> {
        check_shape(rows, channels, raw.len())?;
        Self::from_rounded(rows, channels, raw, BankDtype::F16)
    }

    /// A bank from features already rounded to `dtype`.
    fn from_rounded(
        rows: usize,
        channels: usize,
        raw: Vec<f32>,
        dtype: BankDtype,
    ) -> Result<Self, KernelError> {
        let mut unit = vec![0.0f32; raw.len()];
        normalise_rows(&raw, channels, &mut unit);
        #[cfg(target_arch = "x86_64")]
        let panels = crate::residual_avx512::available()
            .then(|| crate::residual_avx512::pack_panels(&unit, rows, channels));
        Ok(Self {
            rows,
            channels,
            dtype,
            raw,
            unit,
            #[cfg(target_arch = "x86_64")]
            panels,
        })
    }

    /// A bank from stored half-precision features.
    pub fn from_f16(rows: usize, channels: usize, features: &[f16]) -> Result<Self, KernelError> {
        check_shape(rows, channels, features.len())?;
        let mut wide = vec![0.0f32; features.len()];
        features.convert_to_f32_slice(&mut wide);
        Self::from_rounded(rows, channels, wide, BankDtype::F16)
    }

    /// The same bank searched by the portable GEMM path only (no AVX-512 kernel): the reference
    /// the SIMD twin is tested against.
    pub fn portable(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return Self {
            panels: None,
            ..self
        };
        #[cfg(not(target_arch = "x86_64"))]
        self
    }

    /// Number of reference features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Feature width.
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// Storage precision.
    pub fn dtype(&self) -> BankDtype {
        self.dtype
    }
    /// Raw features, `rows × channels` (fp16-rounded values for an f16 bank).
    pub fn raw(&self) -> &[f32] {
        &self.raw
    }
    /// Unit-normalised rows, `rows × channels` (what the similarity is computed on).
    pub fn unit(&self) -> &[f32] {
        &self.unit
    }
    /// Raw features in half precision, for writing an f16 bank.
    pub fn to_f16(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.raw.len()];
        out.convert_from_f32_slice(&self.raw);
        out
    }
}

/// Row-wise `v / max(‖v‖₂, 1e-12)` as PyTorch `F.normalize`: the norm is taken in f64 and rounded
/// once, then each element is divided in f32 (a division, not a reciprocal multiply, so rows that
/// differ by a power of two normalise to identical bits, which exact ties rely on).
pub fn normalise_rows(src: &[f32], channels: usize, dst: &mut [f32]) {
    for (s, d) in src
        .chunks_exact(channels)
        .zip(dst.chunks_exact_mut(channels))
    {
        let n = s
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            .sqrt()
            .max(NORM_EPS) as f32;
        for (o, &v) in d.iter_mut().zip(s) {
            *o = v / n;
        }
    }
}

/// Per-frame scratch space of [`nearest_residual`]; allocated once, reused.
#[derive(Debug, Default)]
pub struct ResidualWorkspace {
    unit_queries: Vec<f32>,
    block: Vec<f32>,
    best: Vec<(f32, u32)>,
}

/// Nearest bank row (cosine, first index on ties) for each of the `queries.len() / C` query rows,
/// and `residual = query − bank[idx]` (spec §3.3).
///
/// `queries` and `residual` are `n × C` row-major; `argmax` has `n` entries.
pub fn nearest_residual(
    queries: &[f32],
    bank: &LevelBank,
    ws: &mut ResidualWorkspace,
    argmax: &mut [u32],
    residual: &mut [f32],
    par: Par,
) -> Result<(), KernelError> {
    let c = bank.channels;
    if !queries.len().is_multiple_of(c) {
        return Err(KernelError::Shape(format!(
            "queries of {} values are not rows of the bank's {c} channels",
            queries.len()
        )));
    }
    let n = queries.len() / c;
    if argmax.len() != n || residual.len() != queries.len() {
        return Err(KernelError::Shape(format!(
            "outputs for {n} queries: argmax {} (want {n}), residual {} (want {})",
            argmax.len(),
            residual.len(),
            queries.len()
        )));
    }
    ws.unit_queries.resize(queries.len(), 0.0);
    ws.best.clear();
    ws.best.resize(n, (f32::NEG_INFINITY, 0));
    #[cfg(target_arch = "x86_64")]
    if let Some(panels) = &bank.panels {
        search_avx512(
            queries,
            &mut ws.unit_queries,
            panels,
            bank,
            &mut ws.best,
            argmax,
            residual,
            par,
        );
        return Ok(());
    }
    normalise_rows(queries, c, &mut ws.unit_queries);
    let block_rows = BANK_BLOCK.min(bank.rows);
    ws.block.resize(n * block_rows, 0.0);

    let mut start = 0;
    while start < bank.rows {
        let rows = block_rows.min(bank.rows - start);
        let sim = &mut ws.block[..n * rows];
        matmul(
            n,
            rows,
            c,
            &ws.unit_queries,
            &bank.unit[start * c..(start + rows) * c],
            Rhs::NxK,
            sim,
            false,
            par,
        );
        let update = |(best, row): (&mut (f32, u32), &[f32])| {
            for (j, &s) in row.iter().enumerate() {
                // Strictly greater: the earlier (lower) index keeps a tie. NaN never wins.
                if s > best.0 {
                    *best = (s, (start + j) as u32);
                }
            }
        };
        match par {
            Par::Pool => ws
                .best
                .par_iter_mut()
                .zip(sim.par_chunks(rows))
                .for_each(update),
            Par::Single => ws.best.iter_mut().zip(sim.chunks(rows)).for_each(update),
        }
        start += rows;
    }

    write_residuals(queries, bank, &ws.best, argmax, residual);
    Ok(())
}

/// One thread's share of a search: queries, their unit copies, bests, argmax, residuals.
#[cfg(target_arch = "x86_64")]
type Share<'a> = (
    (
        ((&'a [f32], &'a mut [f32]), &'a mut [(f32, u32)]),
        &'a mut [u32],
    ),
    &'a mut [f32],
);

/// The AVX-512 path: queries split into one contiguous share per pool thread; each thread
/// normalises its queries, streams the bank once (reusing every 48-row panel group across its
/// queries from L2) and writes its residuals.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn search_avx512(
    queries: &[f32],
    unit: &mut [f32],
    panels: &[f32],
    bank: &LevelBank,
    best: &mut [(f32, u32)],
    argmax: &mut [u32],
    residual: &mut [f32],
    par: Par,
) {
    let c = bank.channels;
    let n = best.len();
    let threads = match par {
        Par::Pool => rayon::current_num_threads().max(1),
        Par::Single => 1,
    };
    let share = n.div_ceil(threads).div_ceil(8).max(1) * 8;
    let run = |((((q, u), b), a), r): Share<'_>| {
        normalise_rows(q, c, u);
        // SAFETY: `panels` exists only when the CPU has AVX-512F, and was packed from this bank.
        unsafe { crate::residual_avx512::search(u, panels, bank.rows, c, b) };
        write_residuals(q, bank, b, a, r);
    };
    if threads > 1 {
        queries
            .par_chunks(share * c)
            .zip(unit.par_chunks_mut(share * c))
            .zip(best.par_chunks_mut(share))
            .zip(argmax.par_chunks_mut(share))
            .zip(residual.par_chunks_mut(share * c))
            .for_each(run);
    } else {
        run(((((queries, unit), best), argmax), residual));
    }
}

/// `argmax[i] = best[i].1`, `residual_i = query_i − raw bank row` (raw, not normalised: §3.3).
fn write_residuals(
    queries: &[f32],
    bank: &LevelBank,
    best: &[(f32, u32)],
    argmax: &mut [u32],
    residual: &mut [f32],
) {
    let c = bank.channels;
    for (i, (q, r)) in queries
        .chunks_exact(c)
        .zip(residual.chunks_exact_mut(c))
        .enumerate()
    {
        let idx = best[i].1;
        argmax[i] = idx;
        let b = &bank.raw[idx as usize * c..(idx as usize + 1) * c];
        for ((o, &qv), &bv) in r.iter_mut().zip(q).zip(b) {
            *o = qv - bv;
        }
    }
}

/// Floating-point work of one [`nearest_residual`] call (the similarity product).
pub fn residual_flops(queries: usize, bank_rows: usize, channels: usize) -> f64 {
    flops(queries, bank_rows, channels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(queries: &[f32], bank: &[f32], c: usize) -> Vec<u32> {
        let unit = |v: &[f32]| -> Vec<f64> {
            let n = v
                .iter()
                .map(|&x| x as f64 * x as f64)
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            v.iter().map(|&x| x as f64 / n).collect()
        };
        queries
            .chunks(c)
            .map(|q| {
                let q = unit(q);
                let mut best = (f64::NEG_INFINITY, 0u32);
                for (j, b) in bank.chunks(c).enumerate() {
                    let s: f64 = unit(b).iter().zip(&q).map(|(a, b)| a * b).sum();
                    if s > best.0 {
                        best = (s, j as u32);
                    }
                }
                best.1
            })
            .collect()
    }

    #[test]
    fn ties_take_lowest_index_and_zero_query_takes_row_zero() {
        // rows 1 and 3 are the same direction as row 2 (scaled by 2 and 0.5): a three-way tie.
        let bank = [1.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.5, -1.0, 0.0];
        let queries = [0.0, 3.0, 0.0, 0.0, -2.0, 0.1, 5.0, 0.0];
        let b = LevelBank::new(5, 2, &bank, BankDtype::F32).unwrap();
        let mut idx = [9u32; 4];
        let mut res = [0.0f32; 8];
        nearest_residual(
            &queries,
            &b,
            &mut Default::default(),
            &mut idx,
            &mut res,
            Par::Single,
        )
        .unwrap();
        assert_eq!(idx, [1, 0, 4, 0]);
        assert_eq!(res, [0.0, 2.0, -1.0, 0.0, -1.0, 0.1, 4.0, 0.0]);
    }

    #[test]
    fn blocked_search_equals_brute_force_across_block_edges() {
        let c = 16;
        let rows = BANK_BLOCK * 2 + 37;
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let bank: Vec<f32> = (0..rows * c).map(|_| rnd()).collect();
        let queries: Vec<f32> = (0..50 * c).map(|_| rnd()).collect();
        let b = LevelBank::new(rows, c, &bank, BankDtype::F32).unwrap();
        let mut idx = vec![0u32; 50];
        let mut res = vec![0.0f32; 50 * c];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            nearest_residual(
                &queries,
                &b,
                &mut Default::default(),
                &mut idx,
                &mut res,
                Par::Pool,
            )
        })
        .unwrap();
        assert_eq!(idx, brute(&queries, &bank, c));
        let i0 = idx[0] as usize;
        assert_eq!(res[3], queries[3] - bank[i0 * c + 3]);
    }

    #[test]
    fn simd_and_portable_paths_agree_at_awkward_sizes() {
        let c = 40;
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (rows, n) in [(1, 1), (15, 3), (17, 9), (16 * 7 + 5, 37), (1000, 64)] {
            let mut bank: Vec<f32> = (0..rows * c).map(|_| rnd()).collect();
            if rows > 3 {
                // An exact duplicate of row 1 at row 3: a tie the lower index must win.
                let r1 = bank[c..2 * c].to_vec();
                bank[3 * c..4 * c].copy_from_slice(&r1);
            }
            let mut queries: Vec<f32> = (0..n * c).map(|_| rnd()).collect();
            if rows > 3 {
                queries[..c].copy_from_slice(&bank[3 * c..4 * c]);
            }
            let want = brute(&queries, &bank, c);
            let fast = LevelBank::new(rows, c, &bank, BankDtype::F32).unwrap();
            let slow = fast.clone().portable();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            for b in [&fast, &slow] {
                for par in [Par::Single, Par::Pool] {
                    let mut idx = vec![0u32; n];
                    let mut res = vec![0.0f32; n * c];
                    pool.install(|| {
                        nearest_residual(
                            &queries,
                            b,
                            &mut Default::default(),
                            &mut idx,
                            &mut res,
                            par,
                        )
                    })
                    .unwrap();
                    assert_eq!(idx, want, "rows {rows}, queries {n}, {par:?}");
                    if rows > 3 {
                        assert_eq!(idx[0], 1);
                    }
                }
            }
        }
    }

    #[test]
    fn f16_bank_subtracts_the_rounded_row() {
        let bank = [0.1f32, 0.2, 0.3, 0.4];
        let b = LevelBank::new(2, 2, &bank, BankDtype::F16).unwrap();
        let mut idx = [0u32; 1];
        let mut res = [0.0f32; 2];
        nearest_residual(
            &[0.3, 0.4],
            &b,
            &mut Default::default(),
            &mut idx,
            &mut res,
            Par::Single,
        )
        .unwrap();
        assert_eq!(idx, [1]);
        assert_eq!(res[0], 0.3 - f16::from_f32(0.3).to_f32());
        assert_ne!(res[0], 0.0);
    }

    #[test]
    fn shape_errors_are_reported_not_panicked() {
        assert!(LevelBank::new(2, 3, &[0.0; 5], BankDtype::F32).is_err());
        let b = LevelBank::new(1, 3, &[1.0; 3], BankDtype::F32).unwrap();
        let r = nearest_residual(
            &[1.0; 4],
            &b,
            &mut Default::default(),
            &mut [0],
            &mut [0.0; 4],
            Par::Single,
        );
        assert!(r.is_err());
    }
}
