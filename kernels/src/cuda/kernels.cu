// edge-ad CUDA kernels: the GPU twins of kernels/src/{residual,featurenorm}.rs.
// No #include: fp16 conversions go through inline PTX so NVRTC needs no header path (JetPack and
// PyPI NVRTC alike). Compiled per architecture (sm_72 Xavier, sm_87 Orin, sm_90 H100).

typedef unsigned short half_t;  // raw IEEE fp16 bits
typedef unsigned int u32;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(half_t h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ half_t f2h(float f) { half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// Running best with the CPU twin's rule: larger similarity wins, the lower bank row on ties, NaN never.
__device__ __forceinline__ void take(float& best, int& bi, float v, int j) {
    if (v > best || (v == best && j < bi)) { best = v; bi = j; }
}

// spec §3.3: rows of x (f32) → x / max(‖x‖₂, 1e-12) in fp16. One warp per row.
extern "C" __global__ void unit_rows_f16(const float* __restrict__ x, half_t* __restrict__ out, int rows, int c) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* r = x + (size_t)row * c;
    float s = 0.f;
    for (int i = lane; i < c; i += 32) s += r[i] * r[i];
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float n = fmaxf(sqrtf(s), 1e-12f);
    for (int i = lane; i < c; i += 32) out[(size_t)row * c + i] = f2h(r[i] / n);
}

#define NN_BM 16     // queries per block (the mma M)
#define NN_WARPS 4   // warps per block, each sweeping bank rows 8 at a time (the mma N)

// spec §3.3 on tensor cores: cosine similarity of NN_BM unit fp16 queries against every unit fp16
// bank row with mma.sync m16n8k16 (f32 accumulate), a running argmax fused in registers (the
// similarity matrix never reaches memory), then residual = raw query − raw (fp16) bank row.
// c must be a multiple of 16. Dynamic shared memory: NN_BM·c halves.
extern "C" __global__ void __launch_bounds__(NN_WARPS * 32) nn_residual(
    const half_t* __restrict__ q_unit, const half_t* __restrict__ bank_unit,
    const float* __restrict__ q_raw, const half_t* __restrict__ bank_raw,
    int n, int m, int c, int* __restrict__ argmax, float* __restrict__ residual) {
    extern __shared__ u32 sq[];
    __shared__ float s_best[NN_WARPS][NN_BM];
    __shared__ int s_idx[NN_WARPS][NN_BM];
    __shared__ int s_final[NN_BM];
    const int q0 = blockIdx.x * NN_BM, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int c2 = c >> 1;
    for (int i = tid; i < NN_BM * c2; i += blockDim.x) {
        int row = i / c2;
        sq[i] = (q0 + row < n) ? ((const u32*)q_unit)[(size_t)(q0 + row) * c2 + (i - row * c2)] : 0u;
    }
    __syncthreads();
    const int g = lane >> 2, t = lane & 3;
    float best0 = NEG_INF, best1 = NEG_INF;
    int bi0 = 0x7fffffff, bi1 = 0x7fffffff;
    for (int n0 = warp * 8; n0 < m; n0 += NN_WARPS * 8) {
        float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
        const u32* bp = (const u32*)bank_unit + (size_t)min(n0 + g, m - 1) * c2;
#if __CUDA_ARCH__ >= 800
        for (int k2 = 0; k2 < c2; k2 += 8) {
            u32 a0 = sq[g * c2 + k2 + t], a1 = sq[(g + 8) * c2 + k2 + t];
            u32 a2 = sq[g * c2 + k2 + 4 + t], a3 = sq[(g + 8) * c2 + k2 + 4 + t];
            u32 b0 = __ldg(bp + k2 + t), b1 = __ldg(bp + k2 + 4 + t);
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(acc0), "+f"(acc1), "+f"(acc2), "+f"(acc3)
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
#else
        // Before sm_80 (Xavier, sm_72) m16n8k16 does not exist: the same four accumulators of the
        // same fragment positions by FFMA, so the epilogue below is shared.
        (void)bp;
        const u32* bq0 = (const u32*)bank_unit + (size_t)min(n0 + 2 * t, m - 1) * c2;
        const u32* bq1 = (const u32*)bank_unit + (size_t)min(n0 + 2 * t + 1, m - 1) * c2;
        for (int k2 = 0; k2 < c2; ++k2) {
            u32 x0 = sq[g * c2 + k2], x1 = sq[(g + 8) * c2 + k2], y0 = __ldg(bq0 + k2), y1 = __ldg(bq1 + k2);
            float x0l = h2f((half_t)(x0 & 0xffff)), x0h = h2f((half_t)(x0 >> 16));
            float x1l = h2f((half_t)(x1 & 0xffff)), x1h = h2f((half_t)(x1 >> 16));
            float y0l = h2f((half_t)(y0 & 0xffff)), y0h = h2f((half_t)(y0 >> 16));
            float y1l = h2f((half_t)(y1 & 0xffff)), y1h = h2f((half_t)(y1 >> 16));
            acc0 = fmaf(x0l, y0l, fmaf(x0h, y0h, acc0));
            acc1 = fmaf(x0l, y1l, fmaf(x0h, y1h, acc1));
            acc2 = fmaf(x1l, y0l, fmaf(x1h, y0h, acc2));
            acc3 = fmaf(x1l, y1l, fmaf(x1h, y1h, acc3));
        }
#endif
        int j0 = n0 + 2 * t, j1 = j0 + 1;
        if (j0 < m) { take(best0, bi0, acc0, j0); take(best1, bi1, acc2, j0); }
        if (j1 < m) { take(best0, bi0, acc1, j1); take(best1, bi1, acc3, j1); }
    }
    for (int o = 1; o < 4; o <<= 1) {
        float ob0 = __shfl_xor_sync(0xffffffffu, best0, o), ob1 = __shfl_xor_sync(0xffffffffu, best1, o);
        int oi0 = __shfl_xor_sync(0xffffffffu, bi0, o), oi1 = __shfl_xor_sync(0xffffffffu, bi1, o);
        take(best0, bi0, ob0, oi0);
        take(best1, bi1, ob1, oi1);
    }
    if (t == 0) {
        s_best[warp][g] = best0; s_idx[warp][g] = bi0;
        s_best[warp][g + 8] = best1; s_idx[warp][g + 8] = bi1;
    }
    __syncthreads();
    if (tid < NN_BM) {
        float b = NEG_INF; int bi = 0x7fffffff;
        for (int w = 0; w < NN_WARPS; ++w) take(b, bi, s_best[w][tid], s_idx[w][tid]);
        if (bi == 0x7fffffff) bi = 0;  // all-NaN similarities: row 0, as the CPU twin
        s_final[tid] = bi;
        if (q0 + tid < n) argmax[q0 + tid] = bi;
    }
    __syncthreads();
    for (int i = tid; i < NN_BM * c; i += blockDim.x) {
        int row = i / c, col = i - row * c;
        if (q0 + row < n) {
            size_t qi = (size_t)(q0 + row) * c + col;
            residual[qi] = q_raw[qi] - h2f(bank_raw[(size_t)s_final[row] * c + col]);
        }
    }
}

// spec §5.1: s[l][p] = sqrt(‖e‖₂ + 1) − 1 (paper = 0) or sqrt(‖e‖₂² + 1) − 1 (paper = 1).
// feats: levels × p × c contiguous. One warp per (level, position).
extern "C" __global__ void level_norms(const float* __restrict__ feats, float* __restrict__ s, int lp, int c, int paper) {
    int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (w >= lp) return;
    const float* e = feats + (size_t)w * c;
    float acc = 0.f;
    for (int i = lane; i < c; i += 32) acc += e[i] * e[i];
    for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) s[w] = sqrtf((paper ? acc : sqrtf(acc)) + 1.f) - 1.f;
}

// spec §5.2 steps 1–2: bilinear (align_corners) upsampling of every level's gh×gw grid to h×w,
// summed in level order, divided by the level count.
extern "C" __global__ void assemble(const float* __restrict__ s, float* __restrict__ map, int levels, int gh, int gw, int h, int w) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y;
    if (x >= w || y >= h) return;
    float sy = h > 1 ? (float)(gh - 1) / (float)(h - 1) : 0.f, sx = w > 1 ? (float)(gw - 1) / (float)(w - 1) : 0.f;
    float fy = sy * (float)y, fx = sx * (float)x;
    int y0 = min((int)fy, gh - 1), x0 = min((int)fx, gw - 1);
    int y1 = min(y0 + 1, gh - 1), x1 = min(x0 + 1, gw - 1);
    float ry = fy - (float)y0, rx = fx - (float)x0;
    float sum = 0.f;
    for (int l = 0; l < levels; ++l) {
        const float* gr = s + (size_t)l * gh * gw;
        float a = gr[y0 * gw + x0], b = gr[y0 * gw + x1], cc = gr[y1 * gw + x0], d = gr[y1 * gw + x1];
        float top = a + (b - a) * rx, bot = cc + (d - cc) * rx;
        sum += top + (bot - top) * ry;
    }
    map[(size_t)y * w + x] = sum / (float)levels;
}

// SciPy `reflect`: … x1 x0 | x0 x1 …
__device__ __forceinline__ int reflect(int i, int n) {
    if (n == 1) return 0;
    int period = 2 * n;
    int m = i % period; if (m < 0) m += period;
    return m >= n ? period - 1 - m : m;
}

// spec §5.2 step 3, one axis: out = Σ_t taps[t] · in(reflect(i + t − r)); vertical = 1 for axis 0.
extern "C" __global__ void gauss(const float* __restrict__ in, float* __restrict__ out, const float* __restrict__ taps,
                                 int radius, int h, int w, int vertical) {
    int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y;
    if (x >= w || y >= h) return;
    float acc = 0.f;
    for (int t = -radius; t <= radius; ++t) {
        float v = vertical ? in[(size_t)reflect(y + t, h) * w + x] : in[(size_t)y * w + reflect(x + t, w)];
        acc = fmaf(taps[t + radius], v, acc);
    }
    out[(size_t)y * w + x] = acc;
}

// spec §5.2 step 4: image score = max of the map. Scores are ≥ 0, so their bit patterns order like
// unsigned integers and one atomicMax per block suffices.
extern "C" __global__ void max_reduce(const float* __restrict__ map, int n, u32* __restrict__ out) {
    float m = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) m = fmaxf(m, map[i]);
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) atomicMax(out, __float_as_uint(m));
}

#define ATT_WARPS 8   // queries per block, one warp each
#define ATT_TILE 32   // references per shared-memory tile: one per lane
#define ATT_MAXD 32   // largest head dimension (DINOv2-S: C = 384, 16 heads → d = 24)

// spec §4.2 step 3, flash style: LKV cross-attention of one level for one head (blockIdx.y).
// One warp per query row; its 32 lanes split the references, each keeping an online softmax
// (running max, running sum, exp-weighted V); the warp merges the lanes at the end, so the P×N_r
// score matrix never exists. q is P×C f32 pre-scaled by 1/√d (as the CPU twin); k and v are the
// per-head K_h, V_h (N_r × d, fp16) precomputed at load (§4.4); out is P×C (heads concatenated).
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) lkv_attention(
    const float* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ v,
    float* __restrict__ out, int p, int n, int c, int d) {
    __shared__ half_t ks[ATT_TILE * ATT_MAXD];
    __shared__ half_t vs[ATT_TILE * ATT_MAXD];
    const int head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * ATT_WARPS + warp;
    const bool active = row < p;
    float qr[ATT_MAXD], acc[ATT_MAXD];
#pragma unroll
    for (int i = 0; i < ATT_MAXD; ++i) {
        qr[i] = (active && i < d) ? q[(size_t)row * c + head * d + i] : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const half_t* kh = k + (size_t)head * n * d;
    const half_t* vh = v + (size_t)head * n * d;
    for (int t0 = 0; t0 < n; t0 += ATT_TILE) {
        const int rows = min(ATT_TILE, n - t0);
        __syncthreads();
        for (int i = threadIdx.x; i < rows * d; i += blockDim.x) {
            ks[i] = kh[(size_t)t0 * d + i];
            vs[i] = vh[(size_t)t0 * d + i];
        }
        __syncthreads();
        if (active && lane < rows) {
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < ATT_MAXD; ++i)
                if (i < d) s += qr[i] * h2f(ks[lane * d + i]);
            const float m_new = fmaxf(m, s);
            const float corr = __expf(m - m_new);  // 0 on the lane's first reference
            const float e = __expf(s - m_new);
            l = l * corr + e;
#pragma unroll
            for (int i = 0; i < ATT_MAXD; ++i)
                if (i < d) acc[i] = acc[i] * corr + e * h2f(vs[lane * d + i]);
            m = m_new;
        }
    }
    // Merge the lanes' partial softmaxes (a lane that saw no reference has m = -inf, l = 0).
    for (int o = 16; o; o >>= 1) {
        const float m_o = __shfl_xor_sync(0xffffffffu, m, o);
        const float l_o = __shfl_xor_sync(0xffffffffu, l, o);
        const float m_new = fmaxf(m, m_o);
        const float a = m == NEG_INF ? 0.f : __expf(m - m_new);
        const float b = m_o == NEG_INF ? 0.f : __expf(m_o - m_new);
        l = l * a + l_o * b;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; ++i) acc[i] = acc[i] * a + __shfl_xor_sync(0xffffffffu, acc[i], o) * b;
        m = m_new;
    }
    if (active && lane == 0) {
        const float inv = 1.f / l;
        for (int i = 0; i < d; ++i) out[(size_t)row * c + head * d + i] = acc[i] * inv;
    }
}
