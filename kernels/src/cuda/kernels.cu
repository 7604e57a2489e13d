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
#define NN_MAX_SPLITS 32  // bank splits nn_finish merges (one per lane)
#define NN_MAX_LEVELS 8   // levels one launch searches (blockIdx.z)

// Every level's bank, passed by value (no upload per frame): unit and raw fp16 rows, row count,
// rows per split and split count. Must match `NnLevels` in cuda.rs.
struct NnLevels {
    const half_t* unit[NN_MAX_LEVELS];
    const half_t* raw[NN_MAX_LEVELS];
    int m[NN_MAX_LEVELS];
    int chunk[NN_MAX_LEVELS];
    int splits[NN_MAX_LEVELS];
};

// One nn_search / nn_search_wmma block's share: its level's bank, its rows [r0, r1), its first
// query, and where its partial results go.
struct NnBlock {
    const half_t* bank_unit;
    int m, r0, r1, q0;
    float* part_best;
    int* part_idx;
};

// Set up the block (blockIdx.z = level, y = bank split, x = query tile) and load its NN_BM unit
// queries into shared memory `sq`. False (for the whole block) when the level has fewer splits.
__device__ __forceinline__ bool nn_block(const half_t* q_unit, const NnLevels& lv, int n, int c,
                                         float* part_best, int* part_idx, u32* sq, NnBlock& b) {
    const int level = blockIdx.z;
    if ((int)blockIdx.y >= lv.splits[level]) return false;
    const int chunk = lv.chunk[level];
    b.bank_unit = lv.unit[level];
    b.m = lv.m[level];
    b.r0 = blockIdx.y * chunk;
    b.r1 = min(b.m, b.r0 + chunk);
    b.q0 = blockIdx.x * NN_BM;
    b.part_best = part_best + (size_t)level * NN_MAX_SPLITS * n + (size_t)blockIdx.y * n;
    b.part_idx = part_idx + (size_t)level * NN_MAX_SPLITS * n + (size_t)blockIdx.y * n;
    const u32* q = (const u32*)(q_unit + (size_t)level * n * c);
    const int c2 = c >> 1;
    for (int i = threadIdx.x; i < NN_BM * c2; i += blockDim.x) {
        const int row = i / c2;
        sq[i] = (b.q0 + row < n) ? q[(size_t)(b.q0 + row) * c2 + (i - row * c2)] : 0u;
    }
    __syncthreads();
    return true;
}

// Merge the warps' best (similarity, row) per query, written to s_best/s_idx, into the block's
// partial result.
__device__ __forceinline__ void nn_block_write(const NnBlock& b, int n, const float (*s_best)[NN_BM],
                                               const int (*s_idx)[NN_BM]) {
    __syncthreads();
    const int tid = threadIdx.x;
    if (tid < NN_BM && b.q0 + tid < n) {
        float best = NEG_INF;
        int bi = 0x7fffffff;
        for (int w = 0; w < NN_WARPS; ++w) take(best, bi, s_best[w][tid], s_idx[w][tid]);
        b.part_best[b.q0 + tid] = best;
        b.part_idx[b.q0 + tid] = bi;
    }
}

// spec §3.3 on tensor cores, split over the bank: block (x, y) takes NN_BM unit fp16 queries and
// the bank rows [y·chunk, (y+1)·chunk), computes their cosine similarities with mma.sync m16n8k16
// (f32 accumulate) and keeps a running argmax in registers (the similarity matrix never reaches
// memory); it writes its best (similarity, row) per query to part_best/part_idx[y·n + query].
// nn_finish merges the splits. Splitting the bank is what fills the GPU: 256 queries are only 16
// blocks. All levels in one launch (blockIdx.z; queries and partials level-major), so that the
// GPU sees every level's blocks at once. c must be a multiple of 16. Dynamic shared memory:
// NN_BM·c halves. sm_80+ (an empty body before: those GPUs run nn_search_wmma).
extern "C" __global__ void __launch_bounds__(NN_WARPS * 32) nn_search(
    const half_t* __restrict__ q_unit, const NnLevels lv, int n, int c,
    float* __restrict__ part_best, int* __restrict__ part_idx) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ u32 sq[];
    __shared__ float s_best[NN_WARPS][NN_BM];
    __shared__ int s_idx[NN_WARPS][NN_BM];
    NnBlock blk;
    if (!nn_block(q_unit, lv, n, c, part_best, part_idx, sq, blk)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int c2 = c >> 1;
    float best0 = NEG_INF, best1 = NEG_INF;
    int bi0 = 0x7fffffff, bi1 = 0x7fffffff;
    for (int n0 = blk.r0 + warp * 8; n0 < blk.r1; n0 += NN_WARPS * 8) {
        float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
        const u32* bp = (const u32*)blk.bank_unit + (size_t)min(n0 + g, blk.m - 1) * c2;
        for (int k2 = 0; k2 < c2; k2 += 8) {
            u32 a0 = sq[g * c2 + k2 + t], a1 = sq[(g + 8) * c2 + k2 + t];
            u32 a2 = sq[g * c2 + k2 + 4 + t], a3 = sq[(g + 8) * c2 + k2 + 4 + t];
            u32 b0 = __ldg(bp + k2 + t), b1 = __ldg(bp + k2 + 4 + t);
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(acc0), "+f"(acc1), "+f"(acc2), "+f"(acc3)
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
        int j0 = n0 + 2 * t, j1 = j0 + 1;
        if (j0 < blk.r1) { take(best0, bi0, acc0, j0); take(best1, bi1, acc2, j0); }
        if (j1 < blk.r1) { take(best0, bi0, acc1, j1); take(best1, bi1, acc3, j1); }
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
    nn_block_write(blk, n, s_best, s_idx);
#endif
}

// spec §3.3 on Volta-class tensor cores (Xavier, sm_72: no mma.sync m16n8k16 there): the same
// split search as nn_search with WMMA m16n16k16 (fp16 in, f32 accumulate, in PTX: NVRTC then needs
// no CUDA header). WMMA's accumulator layout is opaque, so each warp stores its 16 × 16 tile of
// similarities to shared memory and reads it back for the argmax. Bank buffers are padded to a
// multiple of 16 rows (zeros) so that a tile never reads past them; rows past m are not taken.
// Runs on every architecture from sm_70 (tests run it on newer GPUs too); nn_search is sm_80+.
extern "C" __global__ void __launch_bounds__(NN_WARPS * 32) nn_search_wmma(
    const half_t* __restrict__ q_unit, const NnLevels lv, int n, int c,
    float* __restrict__ part_best, int* __restrict__ part_idx) {
    extern __shared__ __align__(32) u32 sq[];
    __shared__ __align__(32) float s_tile[NN_WARPS][16 * 16];
    __shared__ float s_best[NN_WARPS][NN_BM];
    __shared__ int s_idx[NN_WARPS][NN_BM];
    NnBlock blk;
    if (!nn_block(q_unit, lv, n, c, part_best, part_idx, sq, blk)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const half_t* __restrict__ bank_unit = blk.bank_unit;
    const int r0 = blk.r0, r1 = blk.r1;
    // Lane l scans query row l & 15, tile columns 8·(l >> 4) … +7.
    const int my_row = lane & 15, col0 = (lane >> 4) * 8;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    const half_t* sqh = (const half_t*)sq;
    float* tile = s_tile[warp];
    for (int n0 = r0 + warp * 16; n0 < r1; n0 += NN_WARPS * 16) {
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f, d4 = 0.f, d5 = 0.f, d6 = 0.f, d7 = 0.f;
        for (int k0 = 0; k0 < c; k0 += 16) {
            u32 a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7;
            asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                         : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3), "=r"(a4), "=r"(a5), "=r"(a6), "=r"(a7)
                         : "l"(sqh + k0), "r"(c));
            asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                         : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3), "=r"(b4), "=r"(b5), "=r"(b6), "=r"(b7)
                         : "l"(bank_unit + (size_t)n0 * c + k0), "r"(c));
            asm volatile(
                "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
                "{%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19,%20,%21,%22,%23}, "
                "{%0,%1,%2,%3,%4,%5,%6,%7};"
                : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3), "+f"(d4), "+f"(d5), "+f"(d6), "+f"(d7)
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(a4), "r"(a5), "r"(a6), "r"(a7),
                  "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(b4), "r"(b5), "r"(b6), "r"(b7));
        }
        asm volatile("wmma.store.d.sync.aligned.row.m16n16k16.f32 [%0], {%1,%2,%3,%4,%5,%6,%7,%8}, %9;"
                     :: "l"(tile), "f"(d0), "f"(d1), "f"(d2), "f"(d3), "f"(d4), "f"(d5), "f"(d6), "f"(d7), "r"(16)
                     : "memory");
        __syncwarp();
        for (int j = 0; j < 8; ++j) {
            const int col = n0 + col0 + j;
            if (col < r1) take(best, bi, tile[my_row * 16 + col0 + j], col);
        }
        __syncwarp();
    }
    {
        const float ob = __shfl_xor_sync(0xffffffffu, best, 16);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, 16);
        take(best, bi, ob, oi);
    }
    if (lane < 16) { s_best[warp][lane] = best; s_idx[warp][lane] = bi; }
    nn_block_write(blk, n, s_best, s_idx);
}

// spec §3.3, the merge: per query (one warp; queries of all levels, level-major) the best of its
// level's partial results (the lower row on ties, as the CPU twin; row 0 when every similarity
// was NaN), then residual = raw query − raw (fp16) bank row.
extern "C" __global__ void nn_finish(const float* __restrict__ part_best, const int* __restrict__ part_idx,
                                     const NnLevels lv, int levels, const float* __restrict__ q_raw,
                                     int n, int c, int* __restrict__ argmax, float* __restrict__ residual) {
    int gq = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (gq >= levels * n) return;
    const int level = gq / n, q = gq - level * n, splits = lv.splits[level];
    const half_t* __restrict__ bank_raw = lv.raw[level];
    part_best += (size_t)level * NN_MAX_SPLITS * n;
    part_idx += (size_t)level * NN_MAX_SPLITS * n;
    q_raw += (size_t)level * n * c;
    argmax += (size_t)level * n;
    residual += (size_t)level * n * c;
    float b = NEG_INF; int bi = 0x7fffffff;
    if (lane < splits) { b = part_best[(size_t)lane * n + q]; bi = part_idx[(size_t)lane * n + q]; }
    for (int o = 16; o; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, b, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        take(b, bi, ob, oi);
    }
    if (bi == 0x7fffffff) bi = 0;
    if (lane == 0) argmax[q] = bi;
    const float* qr = q_raw + (size_t)q * c;
    const half_t* br = bank_raw + (size_t)bi * c;
    for (int i = lane; i < c; i += 32) residual[(size_t)q * c + i] = qr[i] - h2f(br[i]);
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

// ---- The projector's element-wise steps around its cuBLAS products (spec §4.2 steps 3–5) ----

// y[i] = b[i mod n] (+ x[i] when x is given): the bias rows a product then accumulates onto.
extern "C" __global__ void fill_rows(float* __restrict__ y, const float* __restrict__ b, const float* __restrict__ x,
                                     int rows, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * n) return;
    y[i] = b[i % n] + (x ? x[i] : 0.f);
}

// mode 0: y[i] *= s (Q's 1/√d);  mode 1: y[i] = t[i] − y[i] (the subtractive residual, step 4).
extern "C" __global__ void scale_or_rsub(float* __restrict__ y, const float* __restrict__ t, float s, int n, int mode) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = mode ? t[i] - y[i] : y[i] * s;
}

// Step 5's squeeze input: the mean of H over positions, per channel, summed in f64 as the CPU twin.
extern "C" __global__ void col_mean(const float* __restrict__ h, float* __restrict__ mean, int rows, int cols) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    double s = 0.0;
    for (int i = 0; i < rows; ++i) s += (double)h[(size_t)i * cols + j];
    mean[j] = (float)(s / (double)rows);
}

// y = act(W·x + b) for the SE gate's two small layers (act 1: ReLU, 2: sigmoid). One warp per row.
extern "C" __global__ void matvec_act(const float* __restrict__ w, const float* __restrict__ x, const float* __restrict__ b,
                                      float* __restrict__ y, int rows, int cols, int act) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* wr = w + (size_t)row * cols;
    float s = 0.f;
    for (int i = lane; i < cols; i += 32) s = fmaf(wr[i], x[i], s);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
        float v = s + b[row];
        y[row] = act == 1 ? fmaxf(v, 0.f) : (act == 2 ? 1.f / (1.f + expf(-v)) : v);
    }
}

// h = gelu(h · gate[column]) with the exact (erf) GELU, in place.
extern "C" __global__ void gelu_gated(float* __restrict__ h, const float* __restrict__ gate, int rows, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    float u = h[i] * gate[i % cols];
    h[i] = 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
}

#define ATT_MMA_WARPS 8  // warps per block: each takes one eighth of the references

// spec §4.2 step 3 on tensor cores (sm_80+), flash-attention style: a block takes 16 query rows
// of one head (blockIdx.y); its ATT_MMA_WARPS warps split the references (flash-decoding: 16
// queries alone would leave the GPU nearly idle). Each warp computes S = Q·K_hᵀ by mma.sync
// m16n8k16 for 16 references at a time (Q in fp16, head dimension zero-padded to 32), keeps an
// online softmax per row in registers (row max and sum over the 4 lanes sharing a row), and
// accumulates O += P·V_h by mma with P rounded to fp16 — the accumulator layout of S is the
// A-fragment layout of P, so P never leaves registers. The warps' partial softmaxes are merged
// through shared memory at the end. vt is V_hᵀ (d × n_pad, zero-padded, fp16) so that V's B
// fragments are aligned pairs. d must be even and ≤ 32.
extern "C" __global__ void __launch_bounds__(ATT_MMA_WARPS * 32) lkv_attention_mma(
    const float* __restrict__ q, const half_t* __restrict__ k, const half_t* __restrict__ vt,
    float* __restrict__ out, int p, int n, int n_pad, int c, int d) {
    __shared__ float sm_m[ATT_MMA_WARPS][16], sm_l[ATT_MMA_WARPS][16];
    __shared__ float sm_o[ATT_MMA_WARPS][16][33];
#if __CUDA_ARCH__ >= 800
    const int head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * 16;
    // This warp's references: a multiple of 16, so steps never cross into the next warp's share.
    const int share = ((n + ATT_MMA_WARPS - 1) / ATT_MMA_WARPS + 15) / 16 * 16;
    const int j_begin = warp * share, j_end = min(n, j_begin + share);
    const half_t* kh = k + (size_t)head * n * d;
    const half_t* vh = vt + (size_t)head * d * n_pad;
    // Q's A fragments for k-steps 0 (dims 0–15) and 1 (dims 16–31).
    u32 qa[2][4];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = r0 + g + ((r & 1) ? 8 : 0);
            const int dim = 16 * ks + 2 * t + ((r & 2) ? 8 : 0);
            float x0 = 0.f, x1 = 0.f;
            if (row < p && dim < d) {
                const float* src = q + (size_t)row * c + head * d + dim;
                x0 = src[0];
                x1 = dim + 1 < d ? src[1] : 0.f;
            }
            qa[ks][r] = (u32)f2h(x0) | ((u32)f2h(x1) << 16);
        }
    }
    float o[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;  // rows g and g + 8
    for (int j0 = j_begin; j0 < j_end; j0 += 16) {
        float s[2][4];
#pragma unroll
        for (int ng = 0; ng < 2; ++ng) {
            s[ng][0] = s[ng][1] = s[ng][2] = s[ng][3] = 0.f;
            const int ref = j0 + 8 * ng + g;
            const half_t* kr = kh + (size_t)min(ref, n - 1) * d;
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                const int d0 = 16 * ks + 2 * t, d1 = d0 + 8;
                u32 b0 = (ref < n && d0 < d) ? *(const u32*)(kr + d0) : 0u;
                u32 b1 = (ref < n && d1 < d) ? *(const u32*)(kr + d1) : 0u;
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                    : "+f"(s[ng][0]), "+f"(s[ng][1]), "+f"(s[ng][2]), "+f"(s[ng][3])
                    : "r"(qa[ks][0]), "r"(qa[ks][1]), "r"(qa[ks][2]), "r"(qa[ks][3]), "r"(b0), "r"(b1));
            }
            // Columns 2t, 2t+1 of this group are references j0 + 8·ng + 2t (+1): mask those past n.
            const int col = j0 + 8 * ng + 2 * t;
            if (col >= n) { s[ng][0] = NEG_INF; s[ng][2] = NEG_INF; }
            if (col + 1 >= n) { s[ng][1] = NEG_INF; s[ng][3] = NEG_INF; }
        }
        float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);  // finite: reference j0 is valid
        const float c0 = __expf(m0 - n0), c1 = __expf(m1 - n1);  // 0 on the first step
        float e[2][4];
#pragma unroll
        for (int ng = 0; ng < 2; ++ng) {
            e[ng][0] = __expf(s[ng][0] - n0);
            e[ng][1] = __expf(s[ng][1] - n0);
            e[ng][2] = __expf(s[ng][2] - n1);
            e[ng][3] = __expf(s[ng][3] - n1);
        }
        l0 = l0 * c0 + e[0][0] + e[0][1] + e[1][0] + e[1][1];
        l1 = l1 * c1 + e[0][2] + e[0][3] + e[1][2] + e[1][3];
        m0 = n0;
        m1 = n1;
#pragma unroll
        for (int nd = 0; nd < 4; ++nd) {
            o[nd][0] *= c0; o[nd][1] *= c0; o[nd][2] *= c1; o[nd][3] *= c1;
        }
        // P's A fragment: (row g, refs 2t..), (row g+8, refs 2t..), (row g, refs 2t+8..), (row g+8, refs 2t+8..).
        const u32 pa0 = (u32)f2h(e[0][0]) | ((u32)f2h(e[0][1]) << 16);
        const u32 pa1 = (u32)f2h(e[0][2]) | ((u32)f2h(e[0][3]) << 16);
        const u32 pa2 = (u32)f2h(e[1][0]) | ((u32)f2h(e[1][1]) << 16);
        const u32 pa3 = (u32)f2h(e[1][2]) | ((u32)f2h(e[1][3]) << 16);
#pragma unroll
        for (int nd = 0; nd < 4; ++nd) {
            const int dim = 8 * nd + g;
            u32 b0 = 0u, b1 = 0u;
            if (dim < d) {
                const half_t* vr = vh + (size_t)dim * n_pad + j0 + 2 * t;
                b0 = *(const u32*)vr;
                b1 = *(const u32*)(vr + 8);
            }
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(o[nd][0]), "+f"(o[nd][1]), "+f"(o[nd][2]), "+f"(o[nd][3])
                : "r"(pa0), "r"(pa1), "r"(pa2), "r"(pa3), "r"(b0), "r"(b1));
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // Merge the warps: row r's result is Σ_w e^(m_w − M)·o_w / Σ_w e^(m_w − M)·l_w with M the
    // largest m_w (a warp with no references has m = -inf and contributes nothing).
    if (t == 0) {
        sm_m[warp][g] = m0; sm_l[warp][g] = l0;
        sm_m[warp][g + 8] = m1; sm_l[warp][g + 8] = l1;
    }
#pragma unroll
    for (int nd = 0; nd < 4; ++nd) {
        const int dim = 8 * nd + 2 * t;
        sm_o[warp][g][dim] = o[nd][0];
        sm_o[warp][g][dim + 1] = o[nd][1];
        sm_o[warp][g + 8][dim] = o[nd][2];
        sm_o[warp][g + 8][dim + 1] = o[nd][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * 32; i += ATT_MMA_WARPS * 32) {
        const int r = i >> 5, dim = i & 31, row = r0 + r;
        if (row >= p || dim >= d) continue;
        float mx = NEG_INF;
        for (int w = 0; w < ATT_MMA_WARPS; ++w) mx = fmaxf(mx, sm_m[w][r]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < ATT_MMA_WARPS; ++w) {
            if (sm_m[w][r] == NEG_INF) continue;
            const float f = __expf(sm_m[w][r] - mx);
            num += f * sm_o[w][r][dim];
            den += f * sm_l[w][r];
        }
        out[(size_t)row * c + head * d + dim] = num / den;
    }
#endif
}
