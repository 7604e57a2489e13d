//! Single-precision matrix products on the CPU.
//!
//! Every hot loop of the kernels (cosine similarity, attention, projector MLP) is a call to this one
//! wrapper over the `gemm` crate (blocked, packed, AVX2/AVX-512/NEON micro-kernels; within a few
//! percent of OpenBLAS on this class of machine), so a faster backend changes one file.
//!
//! Threads: with [`Par::Pool`] the product is split over the threads of the *current* rayon pool.
//! The runtime installs one pool shared with tract's backbone (two pools fighting over two cores
//! cost 60 % in measurements), so kernels never create threads of their own.

/// How a kernel may use threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// Run on the calling thread only.
    Single,
    /// Split work over the current rayon pool (the one `ThreadPool::install` put us in).
    Pool,
}

impl Par {
    fn to_gemm(self) -> gemm::Parallelism {
        match self {
            Par::Single => gemm::Parallelism::None,
            Par::Pool if rayon::current_num_threads() > 1 => gemm::Parallelism::Rayon(0),
            Par::Pool => gemm::Parallelism::None,
        }
    }
}

/// Layout of the right-hand operand of [`matmul`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rhs {
    /// `b` is `k × n`, row-major.
    KxN,
    /// `b` is `n × k`, row-major: the product is `A · Bᵀ` (a weight matrix in PyTorch's `[out, in]`).
    NxK,
}

/// `c[m×n] (=|+=) a[m×k] · op(b)`, all row-major and contiguous.
///
/// With `accumulate` the product is added to what `c` holds (used to start from a bias row).
///
/// # Panics
/// If a slice is shorter than its shape says: shapes are programmer invariants, checked by the
/// callers against user data before any kernel runs.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    rhs: Rhs,
    c: &mut [f32],
    accumulate: bool,
    par: Par,
) {
    assert!(a.len() >= m * k, "lhs {} < {m}×{k}", a.len());
    assert!(b.len() >= k * n, "rhs {} < {k}×{n}", b.len());
    assert!(c.len() >= m * n, "dst {} < {m}×{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (rhs_cs, rhs_rs) = match rhs {
        Rhs::KxN => (1isize, n as isize),
        Rhs::NxK => (k as isize, 1isize),
    };
    // SAFETY: the asserts above guarantee every index the strides can reach is in bounds;
    // `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par.to_gemm(),
        )
    }
}

/// Floating-point operations of one `m×n×k` product (multiply and add counted apart).
pub fn flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], rhs: Rhs) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for t in 0..k {
                    let bv = match rhs {
                        Rhs::KxN => b[t * n + j],
                        Rhs::NxK => b[j * k + t],
                    };
                    s += a[i * k + t] as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_product_both_layouts_and_accumulates() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        for rhs in [Rhs::KxN, Rhs::NxK] {
            let want = naive(m, n, k, &a, &b, rhs);
            let mut c = vec![1.0f32; m * n];
            matmul(m, n, k, &a, &b, rhs, &mut c, false, Par::Single);
            assert_eq!(c, want, "{rhs:?}");
            let mut c = vec![1.0f32; m * n];
            matmul(m, n, k, &a, &b, rhs, &mut c, true, Par::Single);
            for (x, w) in c.iter().zip(&want) {
                assert_eq!(*x, w + 1.0);
            }
        }
    }
}
