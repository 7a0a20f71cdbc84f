// Grouped expert GEMMs for ditmoe's MoE layer: one launch per projection over all experts.
//
// Compiled at run time with NVRTC (src/kernels/cuda.rs) after kernels/common.cuh; header-free
// (bf16 as raw u16).
//
//   C[r, :] = A[src(r), :] . W_e^T      for the rows r of expert e, offsets[e] <= r < offsets[e+1]
//   A [*, K] row-major, W [E, N, K] row-major (nn.Linear layout [out, in] per expert),
//   src(r) = gather ? gather[r] / gk : r   (optional fused row gather from the token matrix).
//
// SWIGLU variant: two weight tensors Wg, Wu [E, I, K]; the B tile interleaves gate and up rows
// in groups of 8 (n8 tiles alternate gate/up), so each thread holds gate and up accumulators
// for the same output column and the epilogue writes H = silu(gate) * up, [R, I], directly.
//
// Scheduling without host synchronisation: offsets stay on the device. Every block turns the
// per-expert row counts into a prefix sum of M-tiles (ceil(count/BM)); the grid is sized for
// the worst case (R/BM + E M-tiles) times the N-tiles, and blocks past the real tile count exit
// at once. Experts with zero rows own zero tiles. M-tiles are visited in groups of 8 per N sweep
// so that neighbouring blocks share weight tiles in L2.
//
// bf16 kernels: BM = 128, BK = 64, BN = 128 or 256, 256 threads (2 warpgroups), cp.async
// multi-stage pipeline into 128-byte-swizzled shared memory, then either
//   * wgmma (sm_90a): each warpgroup issues m64nBNk16 on its 64 rows, f32 accumulators, or
//   * mma.sync m16n8k16 + ldmatrix (sm_80+): 2x4 warps of 64 x BN/4.
// The multicast kernels (sm_90a, N tile 256 or 192, see "Multicast variant" below) run in
// clusters of two blocks sharing each weight tile through a TMA multicast, warp-specialised;
// A rows that are not gathered come by TMA as well.
// f32 kernels: SIMT tiles (64 x 64 x 16 or 128 x 128), exact f32 FMA accumulation, and the
// tensor-core ones (sm_80+, below): 3xTF32 (f32-level accuracy) or plain TF32 (training).

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GG_HAS_WGMMA 1
#else
#define GG_HAS_WGMMA 0
#endif

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + expf(-g)); }
// Fast SiLU for the bf16 epilogues (the result is rounded to bf16 anyway) with one SFU op per
// value: e^-g on the SFU, 1 / (1 + e^-g) by Newton's method on the FMA pipe. __fdividef's
// reciprocal was a second SFU op, and the SFU (16 results per clock per SM) bounded the SwiGLU
// epilogue: in Nsight Compute's samples the MUFUs and the FMULs waiting on them were half of it.
__device__ __forceinline__ float silu_fast(float g) {
    float e;
    // clamped so that 1 + e stays finite: silu(g) is g e^g ~ 0 there, and so is g / (1 + 2^126)
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(e) : "f"(fminf(-1.44269504f * g, 126.f)));
    const float d = 1.f + e;                                    // [1, 2^126]
    float r = __int_as_float(0x7EF311C3 - __float_as_int(d));  // 1 / d within 12.5%
#pragma unroll
    for (int i = 0; i < 3; ++i) r = r * fmaf(-d, r, 2.f);       // error squared each step: 2e-8
    return g * r;
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    const u32 n = ok ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#if GG_HAS_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// Shared-memory matrix descriptor: K-major tile, rows of 128 bytes, 128-byte swizzle,
// 8-row groups 1024 bytes apart (SBO); LBO unused for swizzled K-major layouts.
__device__ __forceinline__ u64 make_desc_sw128(u32 addr) {
    u64 d = 0;
    d |= (u64)((addr & 0x3FFFFu) >> 4);
    d |= (u64)1 << 16;
    d |= (u64)(1024u >> 4) << 32;
    d |= (u64)1 << 62;
    return d;
}

// m64nNk16 with f32 accumulators d[0 .. N/2): A and B from shared memory (descriptors), d
// scaled by scale_d (0 = overwrite) before the product is added.
#define WG_D8(i) \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_D64 WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56)
#define WG_D96 WG_D64, WG_D8(64), WG_D8(72), WG_D8(80), WG_D8(88)
#define WG_D128 WG_D96, WG_D8(96), WG_D8(104), WG_D8(112), WG_D8(120)
#define WG_R64 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_R96 \
    WG_R64 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define WG_R128 \
    WG_R96 ", %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// wgmma_m64n<N>k16: the PTX names every accumulator register (%0 .. %(N/2 - 1)), so each N
// spells its own lists; the descriptors and scale_d are the operands after them (DA, DB, SC).
#define WGMMA_BF16(N, REGS, DA, DB, SC, ...)                                                    \
    __device__ __forceinline__ void wgmma_m64n##N##k16(float* d, u64 da, u64 db, u32 scale_d) { \
        asm volatile("{\n.reg .pred p;\n"                                                        \
                     "setp.ne.b32 p, %" #SC ", 0;\n"                                             \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 "                   \
                     "{" REGS "}, %" #DA ", %" #DB ", p, 1, 1, 0, 0;\n}\n"                         \
                     : __VA_ARGS__                                                              \
                     : "l"(da), "l"(db), "r"(scale_d));                                         \
    }
WGMMA_BF16(128, WG_R64, 64, 65, 66, WG_D64)
WGMMA_BF16(192, WG_R96, 96, 97, 98, WG_D96)
WGMMA_BF16(256, WG_R128, 128, 129, 130, WG_D128)
#undef WGMMA_BF16
#undef WG_R128
#undef WG_R96
#undef WG_R64
#undef WG_D128
#undef WG_D96
#undef WG_D64
#undef WG_D8

template <int BN>
__device__ __forceinline__ void wgmma_m64k16(float* d, u64 da, u64 db, u32 scale_d) {
    static_assert(BN == 128 || BN == 192 || BN == 256, "wgmma N tile");
    if (BN == 256) wgmma_m64n256k16(d, da, db, scale_d);
    else if (BN == 192) wgmma_m64n192k16(d, da, db, scale_d);
    else wgmma_m64n128k16(d, da, db, scale_d);
}
#endif  // GG_HAS_WGMMA

#define GG_BM 128
#define GG_BK 64
#define GG_THREADS 256
#define GG_MAXE 1024
#define GG_GROUP_M 8

struct GgTile {
    u32 e, seg, m0, rows, n_tile;
};

// Per-expert M-tile prefix sums into s_ts[0..E]; returns the total number of M-tiles.
template <int BM>
__device__ __forceinline__ u32 gg_prefix(const u32* __restrict__ offsets, u32 E, u32* s_ts) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (warp == 0) {
        const u32 per = (E + 31u) >> 5;
        const u32 e0 = lane * per;
        u32 local = 0;
        for (u32 i = 0; i < per; ++i) {
            const u32 e = e0 + i;
            if (e < E) local += (offsets[e + 1] - offsets[e] + BM - 1) / BM;
        }
        u32 incl = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= (u32)o) incl += v;
        }
        u32 run = incl - local;
        for (u32 i = 0; i < per; ++i) {
            const u32 e = e0 + i;
            if (e < E) {
                s_ts[e] = run;
                run += (offsets[e + 1] - offsets[e] + BM - 1) / BM;
            }
        }
        if (lane == 31) s_ts[E] = incl;
    }
    __syncthreads();
    return s_ts[E];
}

// Tile t -> expert, rows and N-tile; M-tiles in groups of GG_GROUP_M per N sweep.
template <int BM>
__device__ __forceinline__ GgTile gg_decode(u32 t, u32 n_tiles, u32 total_m, const u32* s_ts,
                                            const u32* __restrict__ offsets, u32 E) {
    const u32 per_group = GG_GROUP_M * n_tiles;
    const u32 group = t / per_group;
    const u32 first_m = group * GG_GROUP_M;
    const u32 gsz = min(total_m - first_m, (u32)GG_GROUP_M);
    const u32 in_g = t - group * per_group;
    const u32 m_tile = first_m + in_g % gsz;
    GgTile T;
    T.n_tile = in_g / gsz;
    u32 lo = 0, hi = E - 1;
    while (lo < hi) {
        const u32 mid = (lo + hi + 1) >> 1;
        if (s_ts[mid] <= m_tile) lo = mid; else hi = mid - 1;
    }
    T.e = lo;
    T.seg = offsets[lo];
    const u32 cnt = offsets[lo + 1] - T.seg;
    T.m0 = (m_tile - s_ts[lo]) * BM;
    T.rows = min(cnt - T.m0, (u32)BM);
    return T;
}

// Tile scheduler of the one-shot kernels (see the header): block blockIdx.x takes tile
// blockIdx.x. All threads call it; returns false for idle blocks.
template <int BM>
__device__ __forceinline__ bool gg_schedule(const u32* __restrict__ offsets, u32 E, u32 n_tiles, u32* s_ts,
                                            GgTile& T) {
    const u32 total_m = gg_prefix<BM>(offsets, E, s_ts);
    if (blockIdx.x >= total_m * n_tiles) return false;
    T = gg_decode<BM>(blockIdx.x, n_tiles, total_m, s_ts, offsets, E);
    return true;
}

// The loader's source rows of one tile: thread (lrow, lch) loads A rows lrow + 32 i (row r of
// the tile is row row0 + r of the expert-sorted order, read through `gather` when given) and
// B rows lrow + 32 i (SWIGLU: gate and up interleaved in groups of 8, see the header), each at
// its 16-byte chunk lch; rows past the tile's `rows` or past N are flagged off (zero-filled).
template <typename T, int BM, int BN, bool SWIGLU>
struct GgSources {
    const T* a[BM / 32];
    bool a_ok[BM / 32];
    const T* b[BN / 32];
    bool b_ok[BN / 32];
    static constexpr u32 CHUNK = 16 / sizeof(T);  // elements per 16-byte chunk
    __device__ __forceinline__ void set(const T* __restrict__ A, const u32* __restrict__ gather, u32 gk, u32 row0,
                                        u32 rows, const T* __restrict__ B0, const T* __restrict__ B1, u32 e,
                                        u32 n_tile, u32 N, u32 K, u32 lrow, u32 lch) {
#pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const u32 r = lrow + 32u * i;
            const bool ok = r < rows;
            const u32 gr = row0 + r;
            size_t srow = 0;
            if (ok) srow = gather ? (size_t)(gather[gr] / gk) : (size_t)gr;
            a[i] = A + srow * K + lch * CHUNK;
            a_ok[i] = ok;
        }
#pragma unroll
        for (int i = 0; i < BN / 32; ++i) {
            const u32 j = lrow + 32u * i;
            u32 n;
            const T* base;
            if (SWIGLU) { n = n_tile * (BN / 2) + (j >> 4) * 8u + (j & 7u); base = (j & 8u) ? B1 : B0; }
            else { n = n_tile * BN + j; base = B0; }
            const bool ok = n < N;
            b[i] = base + ((size_t)e * N + (ok ? n : 0u)) * K + lch * CHUNK;
            b_ok[i] = ok;
        }
    }
    // K-slice k0 .. k0 + 128 bytes of every row into a stage: A rows to sa, B rows to sb (each
    // the thread's first row's swizzled address; rows 32 apart are 32 x 128 bytes apart); rows
    // flagged off and chunks past K are zero-filled (A, B0: any valid address for those)
    __device__ __forceinline__ void load(u32 sa, u32 sb, u32 k0, u32 K, u32 lch, const T* A, const T* B0) const {
        const bool kok = (k0 + lch * CHUNK) < K;
#pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const bool ok = a_ok[i] && kok;
            cp_async16(sa + i * 32u * 128u, ok ? (const void*)(a[i] + k0) : (const void*)A, ok);
        }
#pragma unroll
        for (int i = 0; i < BN / 32; ++i) {
            const bool ok = b_ok[i] && kok;
            cp_async16(sb + i * 32u * 128u, ok ? (const void*)(b[i] + k0) : (const void*)B0, ok);
        }
    }
};

#if GG_HAS_WGMMA
// One K slice (BK) of the wgmma path: each of the two warpgroups multiplies its 64 rows of the
// stage at sA by the BN columns at sB, adding to acc (or, without `accumulate`, overwriting it
// on the slice's first k16 step, so a new tile needs no zeroing), one wgmma group in flight.
template <int BN, int BK>
__device__ __forceinline__ void gg_wgmma_step(float* acc, u32 sA, u32 sB, u32 warp, bool accumulate) {
    const u32 wg = warp >> 2;
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        const u64 da = make_desc_sw128(sA + wg * 64u * 128u + kk * 32u);
        const u64 db = make_desc_sw128(sB + kk * 32u);
        wgmma_m64k16<BN>(acc, da, db, (accumulate || kk > 0) ? 1u : 0u);
    }
    wgmma_commit();
    wgmma_wait<1>();
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
}
#endif

// One K slice (BK) of the mma.sync path: 8 warps as 2 x 4 over the 128 x BN tile, A and B
// fragments by ldmatrix from the 128-byte-swizzled stage at sA / sB. Shared by the one-tile and
// the persistent kernels.
template <int BN, int BK>
__device__ __forceinline__ void gg_mma_step(float* acc, u32 sA, u32 sB, u32 warp, u32 lane) {
        constexpr int WN = BN / 4, NT = WN / 8;
        const u32 wm = warp >> 2, wn = warp & 3u;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            u32 af[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const u32 row = wm * 64u + mi * 16u + (lane & 15u);
                const u32 ch = kk * 2u + (lane >> 4);
                ldmatrix_x4(af[mi][0], af[mi][1], af[mi][2], af[mi][3], sA + row * 128u + ((ch ^ (row & 7u)) << 4));
            }
            u32 bfr[NT][2];
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                const u32 row = wn * WN + np * 16u + (lane & 7u) + ((lane >> 4) << 3);
                const u32 ch = kk * 2u + ((lane >> 3) & 1u);
                ldmatrix_x4(bfr[2 * np][0], bfr[2 * np][1], bfr[2 * np + 1][0], bfr[2 * np + 1][1],
                            sB + row * 128u + ((ch ^ (row & 7u)) << 4));
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < NT; ++ni) mma_bf16_16816(&acc[(mi * NT + ni) * 4], af[mi], bfr[ni]);
        }
}

// The mma.sync path's epilogue: pairs (row, col), (row, col + 1) of the m16n8 accumulator
// layout to `put`, SwiGLU tiles as act(gate) * up (gate and up interleaved by 8 columns).
template <int BN, bool SWIGLU, typename Put, typename Act>
__device__ __forceinline__ void gg_mma_store(const float* acc, u32 n_tile, u32 warp, u32 lane, Put put, Act act) {
    constexpr int WN = BN / 4, NT = WN / 8;
    const u32 wm = warp >> 2, wn = warp & 3u;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 rl = wm * 64u + mi * 16u + (lane >> 2) + 8u * h;
            if (SWIGLU) {
#pragma unroll
                for (int ni = 0; ni < NT; ni += 2) {
                    const u32 oc = n_tile * (BN / 2) + ((wn * WN) / 16u + ni / 2) * 8u + (lane & 3u) * 2u;
                    const float* g = &acc[(mi * NT + ni) * 4];
                    const float* u = &acc[(mi * NT + ni + 1) * 4];
                    put(rl, oc, act(g[2 * h]) * u[2 * h], act(g[2 * h + 1]) * u[2 * h + 1]);
                }
            } else {
#pragma unroll
                for (int ni = 0; ni < NT; ++ni) {
                    const u32 oc = n_tile * BN + wn * WN + ni * 8u + (lane & 3u) * 2u;
                    const float* c = &acc[(mi * NT + ni) * 4];
                    put(rl, oc, c[2 * h], c[2 * h + 1]);
                }
            }
        }
}

template <int BN, int STAGES, bool WG, bool SWIGLU>
__device__ __forceinline__ void gg_bf16_body(const u16* __restrict__ A, const u32* __restrict__ gather, u32 gk,
                                             const u32* __restrict__ offsets, u32 E,
                                             const u16* __restrict__ B0, const u16* __restrict__ B1,
                                             u16* __restrict__ C, u32 N, u32 K) {
    constexpr int BM = GG_BM, BK = GG_BK;
    static_assert(STAGES >= 3, "the pipeline keeps one wgmma group in flight: >= 3 stages");
    constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
    constexpr u32 OUT_PER_TILE = SWIGLU ? BN / 2 : BN;
    extern __shared__ unsigned char gg_smem[];
    __shared__ u32 s_ts[GG_MAXE + 1];

    const u32 n_tiles = (N + OUT_PER_TILE - 1) / OUT_PER_TILE;
    GgTile T;
    if (!gg_schedule<BM>(offsets, E, n_tiles, s_ts, T)) return;
    const u32 e = T.e, seg = T.seg, m0 = T.m0, rows = T.rows, n_tile = T.n_tile;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 smem0 = (smem_u32(gg_smem) + 1023u) & ~1023u;

    // ---- loader: thread -> (row lrow + 32 i, 16-byte chunk lch), 128-byte swizzle
    const u32 lrow = tid >> 3, lch = tid & 7u;
    const u32 sw = (lch ^ (lrow & 7u)) << 4;
    GgSources<u16, BM, BN, SWIGLU> src;
    src.set(A, gather, gk, seg + m0, rows, B0, B1, e, n_tile, N, K, lrow, lch);
    auto load_stage = [&](u32 s, u32 kt) {
        const u32 sa = smem0 + s * STAGE_BYTES + lrow * 128u + sw;
        src.load(sa, sa + A_BYTES, kt * BK, K, lch, A, B0);
    };

    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

    const u32 KT = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if ((u32)s < KT) load_stage(s, s);
        cp_async_commit();
    }
    // K >= 1 is guaranteed by the host, so the loop body runs at least once (a zero-trip path
    // that defines the accumulators outside the wgmma pipeline makes ptxas serialise wgmma).
    u32 kt = 0;
    do {
        cp_async_wait<STAGES - 3>();
#if GG_HAS_WGMMA
        if (WG) fence_proxy_async();
#endif
        __syncthreads();
        {
            const u32 nk = kt + STAGES - 2;
            if (nk < KT) load_stage(nk % STAGES, nk);
            cp_async_commit();
        }
        const u32 sA = smem0 + (kt % STAGES) * STAGE_BYTES;
        const u32 sB = sA + A_BYTES;
        if (WG) {
#if GG_HAS_WGMMA
            gg_wgmma_step<BN, BK>(acc, sA, sB, warp, true);
#else
            __trap();
#endif
        } else {
            gg_mma_step<BN, BK>(acc, sA, sB, warp, lane);
        }
    } while (++kt < KT);
    cp_async_wait<0>();
#if GG_HAS_WGMMA
    if (WG) {
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
    }
#endif

    // ---- epilogue: pairs (row, col), (row, col + 1) in m16n8 accumulator layout
    auto put = [&](u32 rl, u32 oc, float v0, float v1) {
        if (rl < rows && oc < N) {
            const size_t grow = (size_t)seg + m0 + rl;
            const u32 v = pack_bf16(v0, v1);
            *(u32*)(C + grow * N + oc) = v;
        }
    };
    if (WG) {
        const u32 wg = warp >> 2, wq = warp & 3u;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 rl = wg * 64u + wq * 16u + (lane >> 2) + 8u * h;
            if (SWIGLU) {
#pragma unroll
                for (int i = 0; i < BN / 8; i += 2) {
                    const u32 oc = n_tile * (BN / 2) + (i / 2) * 8u + (lane & 3u) * 2u;
                    put(rl, oc, silu_f(acc[i * 4 + 2 * h]) * acc[(i + 1) * 4 + 2 * h],
                        silu_f(acc[i * 4 + 2 * h + 1]) * acc[(i + 1) * 4 + 2 * h + 1]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < BN / 8; ++i) {
                    const u32 oc = n_tile * BN + i * 8u + (lane & 3u) * 2u;
                    put(rl, oc, acc[i * 4 + 2 * h], acc[i * 4 + 2 * h + 1]);
                }
            }
        }
    } else {
        gg_mma_store<BN, SWIGLU>(acc, n_tile, warp, lane, put, [](float g) { return silu_f(g); });
    }
}

// ---------------------------------------------------------------------------------------
// Persistent variant (suffix "p"): a grid of (SMs x blocks per SM) CTAs walks the tiles
// blockIdx.x, blockIdx.x + gridDim.x, ...; one cp.async pipeline runs across tile boundaries, so
// the next tile's first K-slices are in flight while the current tile's epilogue runs, and the
// expert prefix sum is computed once per CTA.
// ---------------------------------------------------------------------------------------
// One bf16 pair (row rl of the tile, output columns oc, oc + 1) to C, if inside the tile.
__device__ __forceinline__ void gg_put2(u16* __restrict__ C, const GgTile& T, u32 N, u32 rl, u32 oc, float v0,
                                        float v1) {
    if (rl < T.rows && oc < N) {
        const size_t grow = (size_t)T.seg + T.m0 + rl;
        const u32 v = pack_bf16(v0, v1);
        *(u32*)(C + grow * N + oc) = v;
    }
}

// Epilogue of a wgmma warpgroup (rows wg * 64 .. + 63 of the tile, warp wq of it) from the
// m64nBN accumulator layout (n8 tile i: lane holds columns 8 i + 2 (lane % 4) + {0, 1} of rows
// lane / 4 and lane / 4 + 8). SWIGLU: H = silu(gate) * up, with gate and up in alternate n8
// tiles (the cp.async loaders interleave the rows) or, SPLIT, in the two halves of the tile
// (the TMA loads of the multicast kernel: gate rows, then up rows).
// The four lanes of a row transpose their bf16 pairs of 4 consecutive n8 tiles with 4
// shuffles, so each lane stores 8 consecutive outputs (16 bytes) and a warp's store covers 64
// contiguous bytes of each of 8 rows; storing the pairs straight from the layout (4 bytes per
// lane, 16 per row) took four times as many store instructions and memory requests, all while
// the tensor cores wait for the epilogue.
template <int BN, bool SWIGLU, bool SPLIT = false>
__device__ __forceinline__ void gg_wg_store(const float* acc, const GgTile& T, u16* __restrict__ C, u32 N, u32 wg,
                                            u32 wq, u32 lane) {
    constexpr int OUT8 = SWIGLU ? BN / 16 : BN / 8;  // output n8 tiles per row
    const u32 q = lane & 3u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 rl = wg * 64u + wq * 16u + (lane >> 2) + 8u * h;
#pragma unroll
        for (int g = 0; g < OUT8 / 4; ++g) {
            u32 v[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const int j = 4 * g + t;
                if (SWIGLU) {
                    const int gi = SPLIT ? j : 2 * j, ui = SPLIT ? j + BN / 16 : 2 * j + 1;
                    v[t] = pack_bf16(silu_fast(acc[gi * 4 + 2 * h]) * acc[ui * 4 + 2 * h],
                                       silu_fast(acc[gi * 4 + 2 * h + 1]) * acc[ui * 4 + 2 * h + 1]);
                } else {
                    v[t] = pack_bf16(acc[j * 4 + 2 * h], acc[j * 4 + 2 * h + 1]);
                }
            }
            // 4x4 transpose in the quad: lane q ends with tile 4 g + q's pairs from lanes 0..3
            {
                const bool o = q & 1u;
                u32 a = o ? v[0] : v[1], b = o ? v[2] : v[3];
                a = __shfl_xor_sync(0xffffffffu, a, 1);
                b = __shfl_xor_sync(0xffffffffu, b, 1);
                if (o) { v[0] = a; v[2] = b; } else { v[1] = a; v[3] = b; }
                const bool p = q & 2u;
                u32 c = p ? v[0] : v[2], d = p ? v[1] : v[3];
                c = __shfl_xor_sync(0xffffffffu, c, 2);
                d = __shfl_xor_sync(0xffffffffu, d, 2);
                if (p) { v[0] = c; v[1] = d; } else { v[2] = c; v[3] = d; }
            }
            const u32 oc = T.n_tile * (u32)(OUT8 * 8) + (4u * g + q) * 8u;
            if (rl < T.rows && oc < N) {  // N % 8 == 0 (host check): the 8 columns are all in
                const size_t grow = (size_t)T.seg + T.m0 + rl;
                asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(C + grow * N + oc), "r"(v[0]),
                             "r"(v[1]), "r"(v[2]), "r"(v[3])
                             : "memory");
            }
        }
    }
}

template <int BN, int STAGES, bool WG, bool SWIGLU>
__device__ __forceinline__ void gg_bf16_persist(const u16* __restrict__ A, const u32* __restrict__ gather, u32 gk,
                                                const u32* __restrict__ offsets, u32 E,
                                                const u16* __restrict__ B0, const u16* __restrict__ B1,
                                                u16* __restrict__ C, u32 N, u32 K, u32 max_m) {
    constexpr int BM = GG_BM, BK = GG_BK;
    static_assert(STAGES >= 3, "the pipeline keeps one wgmma group in flight: >= 3 stages");
    constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
    constexpr u32 OUT_PER_TILE = SWIGLU ? BN / 2 : BN;
    extern __shared__ unsigned char gg_smem[];
    __shared__ u32 s_ts[GG_MAXE + 1];

    const u32 n_tiles = (N + OUT_PER_TILE - 1) / OUT_PER_TILE;
    // max_m = ceil(R / BM) + E from the host: bounds the tile loop even if offsets were corrupt
    const u32 total_m = min(gg_prefix<BM>(offsets, E, s_ts), max_m);
    const u32 total = total_m * n_tiles;
    if (blockIdx.x >= total) return;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 smem0 = (smem_u32(gg_smem) + 1023u) & ~1023u;
    const u32 KT = (K + BK - 1) / BK;

    // ---- load side: runs STAGES-2 K-slices ahead of the compute side, across tiles
    const u32 lrow = tid >> 3, lch = tid & 7u;
    const u32 sw = (lch ^ (lrow & 7u)) << 4;
    GgSources<u16, BM, BN, SWIGLU> src;
    auto setup = [&](u32 t) {
        const GgTile L = gg_decode<BM>(t, n_tiles, total_m, s_ts, offsets, E);
        src.set(A, gather, gk, L.seg + L.m0, L.rows, B0, B1, L.e, L.n_tile, N, K, lrow, lch);
    };
    u32 ld_tile = blockIdx.x, ld_k = 0, ld_count = 0;
    bool ld_more = true;
    setup(ld_tile);
    auto issue = [&]() {
        if (ld_more) {
            const u32 sa = smem0 + (ld_count % STAGES) * STAGE_BYTES + lrow * 128u + sw;
            src.load(sa, sa + A_BYTES, ld_k * BK, K, lch, A, B0);
            if (++ld_k == KT) {
                ld_k = 0;
                ld_tile += gridDim.x;
                if (ld_tile < total) setup(ld_tile);
                else ld_more = false;
            }
        }
        ++ld_count;
        cp_async_commit();
    };

    // ---- compute side
    u32 c_tile = blockIdx.x;
    GgTile T = gg_decode<BM>(c_tile, n_tiles, total_m, s_ts, offsets, E);
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

    auto put = [&](u32 rl, u32 oc, float v0, float v1) { gg_put2(C, T, N, rl, oc, v0, v1); };
    auto epilogue = [&]() {
        if (WG) {
            gg_wg_store<BN, SWIGLU>(acc, T, C, N, warp >> 2, warp & 3u, lane);
        } else {
            gg_mma_store<BN, SWIGLU>(acc, T.n_tile, warp, lane, put, [](float g) { return silu_fast(g); });
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) issue();
    u32 g = 0, c_k = 0;
    while (true) {
        cp_async_wait<STAGES - 3>();
#if GG_HAS_WGMMA
        if (WG) fence_proxy_async();
#endif
        __syncthreads();
        issue();
        const u32 sA = smem0 + (g % STAGES) * STAGE_BYTES;
        const u32 sB = sA + A_BYTES;
        if (WG) {
#if GG_HAS_WGMMA
            gg_wgmma_step<BN, BK>(acc, sA, sB, warp, c_k > 0u);  // a new tile starts from zero
#else
            __trap();
#endif
        } else {
            gg_mma_step<BN, BK>(acc, sA, sB, warp, lane);
        }
        ++g;
        if (++c_k == KT) {
#if GG_HAS_WGMMA
            if (WG) {
                wgmma_wait<0>();
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
            }
#endif
            epilogue();
            c_k = 0;
            c_tile += gridDim.x;
            if (c_tile >= total) break;
            T = gg_decode<BM>(c_tile, n_tiles, total_m, s_ts, offsets, E);
            if (!WG) {
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
            }
        }
    }
    cp_async_wait<0>();
}

#define GG_BF16_PKERNEL(NAME, BN, ST, WG, SW)                                                          \
    extern "C" __global__ void __launch_bounds__(GG_THREADS, (ST) == 3 ? 2 : 1)                       \
        NAME(const u16* A, const u32* gather, u32 gk, const u32* offsets, u32 E, const u16* B0,       \
             const u16* B1, u16* C, u32 N, u32 K, u32 max_m) {                                        \
        gg_bf16_persist<BN, ST, WG, SW>(A, gather, gk, offsets, E, B0, B1, C, N, K, max_m);           \
    }

// persistent: gg_{mma|wgmma}_{plain|swiglu}_n{BN}s{STAGES}p
GG_BF16_PKERNEL(gg_mma_plain_n256s4p, 256, 4, false, false)
GG_BF16_PKERNEL(gg_mma_swiglu_n256s4p, 256, 4, false, true)
#if GG_HAS_WGMMA
GG_BF16_PKERNEL(gg_wgmma_plain_n128s5p, 128, 5, true, false)
GG_BF16_PKERNEL(gg_wgmma_plain_n128s3p, 128, 3, true, false)
GG_BF16_PKERNEL(gg_wgmma_plain_n256s4p, 256, 4, true, false)
GG_BF16_PKERNEL(gg_wgmma_swiglu_n128s5p, 128, 5, true, true)
GG_BF16_PKERNEL(gg_wgmma_swiglu_n128s3p, 128, 3, true, true)
GG_BF16_PKERNEL(gg_wgmma_swiglu_n256s4p, 256, 4, true, true)
#endif

// ---------------------------------------------------------------------------------------
// Multicast variant (sm_90a), warp-specialised: the N-tile-256 (or 192) wgmma kernel in clusters of
// two blocks that share the weight tile. Each block of the pair owns one 128-row M-tile of
// the same expert (rows 256 p + 128 rank) and loads half of the BN x 64 weight tile per
// K-slice with one TMA copy multicast into both blocks' shared memory, so the L2 -> SM
// traffic per block and K-slice drops from 48 KB (16 KB of tokens + 32 KB of weights) to
// 32 KB, as in cuBLAS's 2x1-cluster Hopper kernels. One producer warpgroup gathers the token
// rows with cp.async (they go through the permutation, which TMA cannot) and issues the TMA
// copy; two consumer warpgroups run the wgmmas on 64 rows each. Producer and consumers meet
// only at mbarriers, so the producer runs up to 4 K-slices ahead, across tile boundaries and
// through the consumers' epilogue (the cp.async kernels stop at a block-wide barrier per
// K-slice and load 2 slices ahead).
//
// Per ring stage s:
//   full[s]:  128 producer arrivals (cp.async.mbarrier.arrive.noinc, once each thread's rows
//             have landed) + 1 expect_tx of the weight tile's BN x 128 bytes, completed by the two
//             blocks' TMA copies; with A by TMA (a_tma) only the expect_tx, of the A and weight
//             tiles' bytes;
//   empty[s]: 4 arrivals, one per consumer warpgroup of either block once its wgmmas on the
//             stage are done, so neither block's multicast overwrites a stage its partner
//             still reads.
// A pair walks the same tile sequence with the same K-slices, so both blocks issue and wait
// the same barrier phases; M-tiles past the expert's rows are computed on zeros and not
// stored. SWIGLU: block 0 loads the gate rows, block 1 the up rows (SPLIT epilogue).
// Waits use mbarrier.try_wait's default (CTA-scope) semantics and remote arrives the default
// release.cta, as CUTLASS does: with .acquire.cluster on the consumers' poll the kernel ran
// 35% slower (docs/benchmarks.md, MoE run 5).
// ---------------------------------------------------------------------------------------
#define GG_PRODUCERS 128
struct __align__(64) GgTmaMap {
    u64 v[16];  // CUtensorMap, encoded on the host (cuTensorMapEncodeTiled)
};

#if GG_HAS_WGMMA
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 cluster_id() {
    u32 r;
    asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 cluster_count() {
    u32 r;
    asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// arrive on the barrier at the same offset in block `cta` of the cluster (this block included)
__device__ __forceinline__ void mbar_arrive_cluster(u32 bar, u32 cta) {
    asm volatile(
        "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
        "r"(cta)
        : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nGG_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra GG_WAIT_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// a 64 (K) x rows box of a 2-D bf16 tensor map (the map's box) into both blocks of the pair
__device__ __forceinline__ void tma_load_multicast(u32 dst, const GgTmaMap* map, u32 k0, u32 row, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
        "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"((u64)map), "r"(k0), "r"(row), "r"(bar), "h"((unsigned short)3)
        : "memory");
}
// a 64 (K) x rows box of a 2-D bf16 tensor map (the map's box) into this block only
__device__ __forceinline__ void tma_load(u32 dst, const GgTmaMap* map, u32 k0, u32 row, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"((u64)map), "r"(k0), "r"(row), "r"(bar)
        : "memory");
}

// BN = 192 (plain only) is for output widths that 256 does not divide but 192 does (XL's
// 1152, S's 384): 256-wide tiles there compute up to a third more columns than are stored.
// SPLIT_N (plain, A by TMA; suffix "mca"): the pair shares one 128-row A tile instead of a
// weight tile. Each block loads half of the A rows, multicast into both, and its own whole
// weight tile, and the two compute neighbouring N tiles (rank r the tile 2 j + r). Pair tiles
// are then 128 rows of one expert instead of 256, so an expert's rows leave at most one
// 128-row partial tile instead of one 256-row one, and the worst-case number of pair tiles
// can drop by a wave (S's 384-wide down projection at 16384 tokens: 272 pair tiles on 66
// clusters, five waves, against 264, four; docs/benchmarks.md).
template <int BN, bool SWIGLU, bool SPLIT_N = false>
__device__ __forceinline__ void gg_bf16_multicast(const u16* __restrict__ A, const u32* __restrict__ gather, u32 gk,
                                                  const u32* __restrict__ offsets, u32 E, const GgTmaMap* map0,
                                                  const GgTmaMap* map1, const GgTmaMap* map_a, u32 a_tma,
                                                  u16* __restrict__ C, u32 N, u32 K, u32 max_pairs) {
    static_assert(BN == 256 || (BN == 192 && !SWIGLU), "multicast N tile");
    static_assert(!(SPLIT_N && SWIGLU), "SPLIT_N is for plain projections");
    constexpr int BM = GG_BM, BK = GG_BK, STAGES = 4;
    constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
    constexpr u32 OUT_PER_TILE = SWIGLU ? BN / 2 : BN;
    extern __shared__ unsigned char gg_smem[];
    __shared__ u32 s_ts[GG_MAXE + 1];
    __shared__ __align__(8) u64 s_bar[2 * STAGES];  // full[0..S), empty[S..2S)

    const u32 rank = cluster_rank(), cid = cluster_id(), ncl = cluster_count();
    const u32 n_tiles = (N + OUT_PER_TILE - 1) / OUT_PER_TILE;
    // pair tiles: 256 rows of one expert (SPLIT_N: 128 rows x two N tiles); max_pairs =
    // ceil(R / pair rows) + E from the host
    constexpr int PAIR_ROWS = SPLIT_N ? BM : 2 * BM;
    const u32 n_units = SPLIT_N ? n_tiles / 2u : n_tiles;
    const u32 total_p = min(gg_prefix<PAIR_ROWS>(offsets, E, s_ts), max_pairs);
    const u32 total = total_p * n_units;
    if (cid >= total) return;  // both blocks of the cluster leave together
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    // the offsets in shared memory: decoding a tile then takes no global load, which would
    // stall the producer at every tile switch
    __shared__ u32 s_off[GG_MAXE + 1];
    for (u32 i = tid; i <= E; i += blockDim.x) s_off[i] = offsets[i];
    __syncthreads();
    const u32 smem0 = (smem_u32(gg_smem) + 1023u) & ~1023u;
    const u32 full0 = smem_u32(&s_bar[0]), empty0 = smem_u32(&s_bar[STAGES]);
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            // the producers' cp.async (unless A comes by TMA too) + the expect_tx
            mbar_init(full0 + 8u * s, a_tma ? 1u : GG_PRODUCERS + 1u);
            mbar_init(empty0 + 8u * s, 4u);                // two consumer warpgroups in each block
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    cluster_sync();  // s_off is written and the partner's barriers exist before any multicast or arrive
    const u32 KT = (K + BK - 1) / BK;

    // this block's half of a pair tile
    auto tile = [&](u32 t) {
        GgTile T = gg_decode<PAIR_ROWS>(t, n_units, total_p, s_ts, s_off, E);
        if (SPLIT_N) {
            T.n_tile = 2u * T.n_tile + rank;
        } else {
            const u32 skip = rank * (u32)BM;
            T.m0 += skip;
            T.rows = T.rows > skip ? min(T.rows - skip, (u32)BM) : 0u;
        }
        return T;
    };

    // the weight rows of this block's half of a tile's B (SWIGLU: the gate or up rows)
    auto b_row = [&](const GgTile& L) {
        return L.e * N + L.n_tile * OUT_PER_TILE + (SWIGLU || SPLIT_N ? 0u : rank * (u32)(BN / 2));
    };
    if (warp < GG_PRODUCERS / 32 && (a_tma || SPLIT_N)) {
        // ---- producer, A not gathered: one thread issues each stage as two TMA copies, the
        // 128 A rows into this block (rows past the expert's are read but not stored, rows past
        // A are zero-filled) and its half of the weight tile into both blocks
        if (tid == 0) {
            const GgTmaMap* bmap = (SWIGLU && rank == 1u) ? map1 : map0;
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)bmap) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)map_a) : "memory");
            u32 it = 0;
            for (u32 t = cid; t < total; t += ncl) {
                const GgTile L = tile(t);
                const u32 brow = b_row(L), arow = L.seg + L.m0;
                for (u32 k = 0; k < KT; ++k, ++it) {
                    const u32 s = it % STAGES, full = full0 + 8u * s, sa = smem0 + s * STAGE_BYTES;
                    if (it >= (u32)STAGES) mbar_wait(empty0 + 8u * s, (it / STAGES - 1u) & 1u);
                    mbar_expect_tx(full, A_BYTES + B_BYTES);
                    if (SPLIT_N) {
                        tma_load_multicast(sa + rank * (A_BYTES / 2), map_a, k * BK, arow + rank * (u32)(BM / 2), full);
                        tma_load(sa + A_BYTES, bmap, k * BK, brow, full);
                    } else {
                        tma_load(sa, map_a, k * BK, arow, full);
                        tma_load_multicast(sa + A_BYTES + rank * (B_BYTES / 2), bmap, k * BK, brow, full);
                    }
                }
            }
        }
    } else if (warp < GG_PRODUCERS / 32) {
        // ---- producer warpgroup: thread (lrow, lch) gathers A rows lrow + 16 i, chunk lch
        const u32 lrow = tid >> 3, lch = tid & 7u;
        const u32 sw = (lch ^ (lrow & 7u)) << 4;
        const GgTmaMap* bmap = (SWIGLU && rank == 1u) ? map1 : map0;
        if (tid == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)bmap) : "memory");
        // A tile's source rows are fetched one tile ahead: the gather indices of the next tile
        // are loaded before this tile's slices go out and used after them, so their latency
        // does not stall the pipeline at the tile switch.
        struct Rows {
            u32 idx[BM / 16];
            bool ok[BM / 16];
            u32 b_row;
        };
        auto fetch = [&](u32 t, Rows& R) {
            const GgTile L = tile(t);
            R.b_row = b_row(L);
#pragma unroll
            for (int i = 0; i < BM / 16; ++i) {
                const u32 r = lrow + 16u * i;
                R.ok[i] = r < L.rows;
                const u32 gr = L.seg + L.m0 + r;
                R.idx[i] = R.ok[i] ? (gather ? gather[gr] : gr) : 0u;
            }
        };
        Rows cur, nxt;
        fetch(cid, cur);
        u32 it = 0;
        for (u32 t = cid; t < total; t += ncl) {
            if (t + ncl < total) fetch(t + ncl, nxt);
            const u16* a[BM / 16];
#pragma unroll
            for (int i = 0; i < BM / 16; ++i) a[i] = A + (size_t)(gather ? cur.idx[i] / gk : cur.idx[i]) * K + lch * 8u;
            for (u32 k = 0; k < KT; ++k, ++it) {
                const u32 s = it % STAGES;
                if (it >= (u32)STAGES) mbar_wait(empty0 + 8u * s, (it / STAGES - 1u) & 1u);
                const u32 k0 = k * BK;
                const bool kok = (k0 + lch * 8u) < K;
                const u32 sa = smem0 + s * STAGE_BYTES + lrow * 128u + sw;
#pragma unroll
                for (int i = 0; i < BM / 16; ++i) {
                    const bool ok = cur.ok[i] && kok;
                    cp_async16(sa + i * 16u * 128u, ok ? (const void*)(a[i] + k0) : (const void*)A, ok);
                }
                asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full0 + 8u * s) : "memory");
                if (tid == 0) {
                    mbar_expect_tx(full0 + 8u * s, B_BYTES);
                    tma_load_multicast(smem0 + s * STAGE_BYTES + A_BYTES + rank * (B_BYTES / 2), bmap, k0, cur.b_row,
                                       full0 + 8u * s);
                }
            }
            cur = nxt;
        }
        cp_async_wait<0>();
    } else {
        // ---- consumer warpgroups: wg 0 / 1 computes rows 64 wg .. + 63 of the tile
        const u32 wg = (warp - GG_PRODUCERS / 32) >> 2;
        float acc[BN / 2];
        u32 it = 0;
        auto release = [&](u32 j) {  // slice j's stage is read: tell both blocks' producers
            if ((tid & 127u) == 0) {
                const u32 e = empty0 + 8u * (j % STAGES);
                mbar_arrive_cluster(e, 0u);
                mbar_arrive_cluster(e, 1u);
            }
        };
        for (u32 t = cid; t < total; t += ncl) {
            const GgTile T = tile(t);
            // zeroed here rather than through wgmma's scale-d predicate, which makes ptxas
            // serialise the wgmmas
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
            for (u32 k = 0; k < KT; ++k, ++it) {
                const u32 s = it % STAGES;
                mbar_wait(full0 + 8u * s, (it / STAGES) & 1u);
                fence_proxy_async();  // the producers' cp.async rows, seen by the async proxy
                const u32 sA = smem0 + s * STAGE_BYTES;
                const u32 sB = sA + A_BYTES;
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk)
                    wgmma_m64k16<BN>(acc, make_desc_sw128(sA + wg * 64u * 128u + kk * 32u),
                                     make_desc_sw128(sB + kk * 32u), 1u);
                wgmma_commit();
                wgmma_wait<1>();
#pragma unroll
                for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
                if (k > 0) release(it - 1);
            }
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) fence_operand(acc[i]);
            release(it - 1);
            gg_wg_store<BN, SWIGLU, true>(acc, T, C, N, wg, warp & 3u, lane);
        }
    }
    cluster_sync();  // no block leaves while its partner may still multicast into it or arrive on it
}

// name: gg_wgmma_{plain|swiglu}_n{BN}mc; clusters of 2, grid even, GG_PRODUCERS + 256 threads;
// dynamic smem as n{BN}s4; weight tensor maps with boxes of BN / 2 rows (SWIGLU: 128), the A
// map (read when a_tma = 1, gather null) with boxes of 128 rows. gg_wgmma_plain_n{BN}mca
// (SPLIT_N): weight boxes of BN rows, A boxes of 64 rows, always read (a_tma ignored), an
// even number of N tiles.
#define GG_BF16_MCKERNEL(NAME, BN, SW, SPLIT)                                                           \
    extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(GG_PRODUCERS + 256, 1)       \
        NAME(const u16* A, const u32* gather, u32 gk, const u32* offsets, u32 E,                        \
             const __grid_constant__ GgTmaMap map0, const __grid_constant__ GgTmaMap map1,              \
             const __grid_constant__ GgTmaMap map_a, u32 a_tma, u16* C, u32 N, u32 K, u32 max_pairs) {  \
        gg_bf16_multicast<BN, SW, SPLIT>(A, gather, gk, offsets, E, &map0, &map1, &map_a, a_tma, C, N,  \
                                         K, max_pairs);                                                 \
    }
GG_BF16_MCKERNEL(gg_wgmma_plain_n256mc, 256, false, false)
GG_BF16_MCKERNEL(gg_wgmma_plain_n192mc, 192, false, false)
GG_BF16_MCKERNEL(gg_wgmma_plain_n192mca, 192, false, true)
GG_BF16_MCKERNEL(gg_wgmma_swiglu_n256mc, 256, true, false)
#endif  // GG_HAS_WGMMA

#define GG_BF16_KERNEL(NAME, BN, ST, WG, SW)                                                           \
    extern "C" __global__ void __launch_bounds__(GG_THREADS, 1)                                       \
        NAME(const u16* A, const u32* gather, u32 gk, const u32* offsets, u32 E, const u16* B0,       \
             const u16* B1, u16* C, u32 N, u32 K) {                                                   \
        gg_bf16_body<BN, ST, WG, SW>(A, gather, gk, offsets, E, B0, B1, C, N, K);                     \
    }

// name: gg_{mma|wgmma}_{plain|swiglu}_n{BN}s{STAGES}; dynamic smem = STAGES * (BM + BN) * 128 + 1024
GG_BF16_KERNEL(gg_mma_plain_n128s5, 128, 5, false, false)
GG_BF16_KERNEL(gg_mma_plain_n256s4, 256, 4, false, false)
GG_BF16_KERNEL(gg_mma_swiglu_n128s5, 128, 5, false, true)
GG_BF16_KERNEL(gg_mma_swiglu_n256s4, 256, 4, false, true)
#if GG_HAS_WGMMA
GG_BF16_KERNEL(gg_wgmma_plain_n128s5, 128, 5, true, false)
GG_BF16_KERNEL(gg_wgmma_plain_n128s3, 128, 3, true, false)
GG_BF16_KERNEL(gg_wgmma_plain_n256s4, 256, 4, true, false)
GG_BF16_KERNEL(gg_wgmma_swiglu_n128s5, 128, 5, true, true)
GG_BF16_KERNEL(gg_wgmma_swiglu_n128s3, 128, 3, true, true)
GG_BF16_KERNEL(gg_wgmma_swiglu_n256s4, 256, 4, true, true)
#endif

// ---------------------------------------------------------------------------------------
// f32: SIMT tiles, BM = BN = 64, BK = 16, 256 threads, 4x4 outputs per thread.
// SWIGLU interleave at pair granularity: B row j -> even: gate, odd: up, of column j/2.
// ---------------------------------------------------------------------------------------
template <bool SWIGLU>
__device__ __forceinline__ void gg_f32_body(const float* __restrict__ A, const u32* __restrict__ gather, u32 gk,
                                            const u32* __restrict__ offsets, u32 E,
                                            const float* __restrict__ B0, const float* __restrict__ B1,
                                            float* __restrict__ C, u32 N, u32 K) {
    constexpr int BM = 64, BN = 64, BK = 16;
    constexpr u32 OUT_PER_TILE = SWIGLU ? BN / 2 : BN;
    __shared__ u32 s_ts[GG_MAXE + 1];
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const u32 n_tiles = (N + OUT_PER_TILE - 1) / OUT_PER_TILE;
    GgTile T;
    if (!gg_schedule<BM>(offsets, E, n_tiles, s_ts, T)) return;
    const u32 e = T.e, seg = T.seg, m0 = T.m0, rows = T.rows, n_tile = T.n_tile;
    const u32 tid = threadIdx.x, tx = tid & 15u, ty = tid >> 4;
    const float* a_src[4];
    bool a_ok[4];
    const float* b_src[4];
    bool b_ok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = ty + 16u * i;
        const bool ok = r < rows;
        const u32 gr = seg + m0 + r;
        size_t srow = 0;
        if (ok) srow = gather ? (size_t)(gather[gr] / gk) : (size_t)gr;
        a_src[i] = A + srow * K;
        a_ok[i] = ok;
        const u32 j = ty + 16u * i;
        u32 n;
        const float* base;
        if (SWIGLU) { n = n_tile * (BN / 2) + (j >> 1); base = (j & 1u) ? B1 : B0; }
        else { n = n_tile * BN + j; base = B0; }
        const bool okb = n < N;
        b_src[i] = base + ((size_t)e * N + (okb ? n : 0u)) * K;
        b_ok[i] = okb;
    }
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (u32 k0 = 0; k0 < K; k0 += BK) {
        const u32 kk = tx;
        const bool kok = k0 + kk < K;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            As[kk][ty + 16 * i] = (a_ok[i] && kok) ? a_src[i][k0 + kk] : 0.f;
            Bs[kk][ty + 16 * i] = (b_ok[i] && kok) ? b_src[i][k0 + kk] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < BK; ++q) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) { a[i] = As[q][ty * 4 + i]; b[i] = Bs[q][tx * 4 + i]; }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 rl = ty * 4u + i;
        if (rl >= rows) continue;
        const size_t grow = (size_t)seg + m0 + rl;
        if (SWIGLU) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const u32 oc = n_tile * (BN / 2) + tx * 2u + p;
                if (oc < N) C[grow * N + oc] = silu_f(acc[i][2 * p]) * acc[i][2 * p + 1];
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 oc = n_tile * BN + tx * 4u + j;
                if (oc < N) C[grow * N + oc] = acc[i][j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gg_f32_plain(const float* A, const u32* gather, u32 gk,
        const u32* offsets, u32 E, const float* B0, const float* B1, float* C, u32 N, u32 K) {
    gg_f32_body<false>(A, gather, gk, offsets, E, B0, B1, C, N, K);
}
extern "C" __global__ void __launch_bounds__(256) gg_f32_swiglu(const float* A, const u32* gather, u32 gk,
        const u32* offsets, u32 E, const float* B0, const float* B1, float* C, u32 N, u32 K) {
    gg_f32_body<true>(A, gather, gk, offsets, E, B0, B1, C, N, K);
}

// ---------------------------------------------------------------------------------------
// f32, larger tiles: BM = BN = 128, BK = 8, 256 threads, 8x8 outputs per thread (two 4x4
// quadrants 64 apart, float4 shared-memory reads), register-staged double buffering.
// SWIGLU: B rows 0..63 are gate rows, 64..127 the up rows of the same 64 output columns.
// ---------------------------------------------------------------------------------------
struct alignas(16) F4 { float x, y, z, w; };

template <bool SWIGLU>
__device__ __forceinline__ void gg_f32b_body(const float* __restrict__ A, const u32* __restrict__ gather, u32 gk,
                                             const u32* __restrict__ offsets, u32 E,
                                             const float* __restrict__ B0, const float* __restrict__ B1,
                                             float* __restrict__ C, u32 N, u32 K) {
    constexpr int BM = 128, BN = 128, BK = 8;
    constexpr u32 OUT_PER_TILE = SWIGLU ? BN / 2 : BN;
    __shared__ u32 s_ts[GG_MAXE + 1];
    __shared__ alignas(16) float As[2][BK][BM];
    __shared__ alignas(16) float Bs[2][BK][BN];
    const u32 n_tiles = (N + OUT_PER_TILE - 1) / OUT_PER_TILE;
    GgTile T;
    if (!gg_schedule<BM>(offsets, E, n_tiles, s_ts, T)) return;
    const u32 e = T.e, seg = T.seg, m0 = T.m0, rows = T.rows, n_tile = T.n_tile;
    const u32 tid = threadIdx.x, tx = tid & 15u, ty = tid >> 4;
    // loader: row lr, K offset lk (4 consecutive k per thread)
    const u32 lr = tid >> 1, lk = (tid & 1u) * 4u;
    const bool a_ok = lr < rows;
    size_t srow = 0;
    if (a_ok) srow = gather ? (size_t)(gather[seg + m0 + lr] / gk) : (size_t)(seg + m0 + lr);
    const float* a_ptr = A + srow * K;
    u32 n;
    const float* bbase;
    if (SWIGLU) { n = n_tile * 64u + (lr & 63u); bbase = (lr < 64u) ? B0 : B1; }
    else { n = n_tile * 128u + lr; bbase = B0; }
    const bool b_ok = n < N;
    const float* b_ptr = bbase + ((size_t)e * N + (b_ok ? n : 0u)) * K;
    float ra[4], rb[4];
    auto load = [&](u32 k0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const u32 k = k0 + lk + q;
            ra[q] = (a_ok && k < K) ? a_ptr[k] : 0.f;
            rb[q] = (b_ok && k < K) ? b_ptr[k] : 0.f;
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            As[buf][lk + q][lr] = ra[q];
            Bs[buf][lk + q][lr] = rb[q];
        }
    };
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    load(0);
    store(0);
    __syncthreads();
    int buf = 0;
    for (u32 k0 = 0; k0 < K; k0 += BK) {
        const bool more = k0 + BK < K;
        if (more) load(k0 + BK);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const F4 a0 = *(const F4*)&As[buf][kk][ty * 4];
            const F4 a1 = *(const F4*)&As[buf][kk][ty * 4 + 64];
            const F4 b0 = *(const F4*)&Bs[buf][kk][tx * 4];
            const F4 b1 = *(const F4*)&Bs[buf][kk][tx * 4 + 64];
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (more) store(buf ^ 1);
        __syncthreads();
        buf ^= 1;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 rl = (i < 4) ? ty * 4u + i : 64u + ty * 4u + (i - 4);
        if (rl >= rows) continue;
        const size_t grow = (size_t)seg + m0 + rl;
        if (SWIGLU) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 oc = n_tile * 64u + tx * 4u + j;
                if (oc < N) C[grow * N + oc] = silu_f(acc[i][j]) * acc[i][j + 4];
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 oc = n_tile * 128u + ((j < 4) ? tx * 4u + j : 64u + tx * 4u + (j - 4));
                if (oc < N) C[grow * N + oc] = acc[i][j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) gg_f32b_plain(const float* A, const u32* gather, u32 gk,
        const u32* offsets, u32 E, const float* B0, const float* B1, float* C, u32 N, u32 K) {
    gg_f32b_body<false>(A, gather, gk, offsets, E, B0, B1, C, N, K);
}
extern "C" __global__ void __launch_bounds__(256, 2) gg_f32b_swiglu(const float* A, const u32* gather, u32 gk,
        const u32* offsets, u32 E, const float* B0, const float* B1, float* C, u32 N, u32 K) {
    gg_f32b_body<true>(A, gather, gk, offsets, E, B0, B1, C, N, K);
}

// ---------------------------------------------------------------------------------------
// f32 on tensor cores, 3xTF32 (sm_80+): each operand x is split into a TF32 "big" part and
// the TF32 rounding of the remainder, x = big + small, and a·b is taken as
// small_a·big_b + big_a·small_b + big_a·big_b (the small·small term is below f32's rounding),
// accumulated in f32: f32-level accuracy at tensor-core speed (CUTLASS's 3xTF32 "fast
// accurate" GEMM). BM = BN = 128, BK = 32 (128-byte rows of f32, 16-byte chunks swizzled by
// row & 7 as in the bf16 kernels), 3-stage cp.async pipeline, 8 warps as 2 (M) x 4 (N), warp
// tile 64 x 32 of mma.sync.m16n8k8. Needs K % 4 == 0 and 16-byte aligned rows.
// SWIGLU: B rows interleave gate and up in groups of 8 (as the bf16 kernels), so n8 tiles
// alternate gate/up and each thread holds both for the same output columns.
// ---------------------------------------------------------------------------------------
template <bool SPLIT>
__device__ __forceinline__ void split_tf32(float x, u32& big, u32& small) {
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(big) : "f"(x));
    if constexpr (SPLIT) {
        const float r = x - __uint_as_float(big);
        asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(small) : "f"(r));
    }
}
__device__ __forceinline__ void mma_tf32_1688(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#define TF_STAGES 3
// SPLIT = false: plain TF32 (one big·big product per pair, about 1e-3 relative), for callers
// that ask for reduced-precision f32 matmuls (training: candle's
// `set_gemm_reduced_precision_f32`, as cuBLAS does for every other matmul of the step).
template <bool SWIGLU, bool SPLIT>
__device__ __forceinline__ void gg_tf32x3_body(const float* __restrict__ A, const u32* __restrict__ gather, u32 gk,
                                               const u32* __restrict__ offsets, u32 E,
                                               const float* __restrict__ B0, const float* __restrict__ B1,
                                               float* __restrict__ C, u32 N, u32 K) {
    constexpr int BM = 128, BN = 128, BK = 32;
    constexpr u32 A_BYTES = BM * 128u, STAGE_BYTES = (BM + BN) * 128u;
    constexpr u32 OUT_PER_TILE = SWIGLU ? BN / 2 : BN;
    extern __shared__ unsigned char gg_smem[];
    __shared__ u32 s_ts[GG_MAXE + 1];
    const u32 n_tiles = (N + OUT_PER_TILE - 1) / OUT_PER_TILE;
    GgTile T;
    if (!gg_schedule<BM>(offsets, E, n_tiles, s_ts, T)) return;
    const u32 e = T.e, seg = T.seg, m0 = T.m0, rows = T.rows, n_tile = T.n_tile;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 g = lane >> 2, tg = lane & 3u;
    const u32 smem0 = (smem_u32(gg_smem) + 1023u) & ~1023u;
    const unsigned char* sbase = gg_smem + (smem0 - smem_u32(gg_smem));

    // ---- loader: thread -> rows lrow + 32 i, 16-byte chunk lch (4 floats)
    const u32 lrow = tid >> 3, lch = tid & 7u;
    const u32 sw = (lch ^ (lrow & 7u)) << 4;
    GgSources<float, BM, BN, SWIGLU> src;
    src.set(A, gather, gk, seg + m0, rows, B0, B1, e, n_tile, N, K, lrow, lch);
    const u32 KT = (K + BK - 1) / BK;
    auto issue = [&](u32 kt) {
        if (kt < KT) {
            const u32 sa = smem0 + (kt % TF_STAGES) * STAGE_BYTES + lrow * 128u + sw;
            src.load(sa, sa + A_BYTES, kt * BK, K, lch, A, B0);
        }
        cp_async_commit();
    };

    // ---- compute: warp (wm, wn) owns rows wm * 64 .. + 63, B rows wn * 32 .. + 31
    const u32 wm = warp >> 2, wn = warp & 3u;
    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;
    // element (r, k) of a stage's 128-byte-row tile
    auto at = [&](const unsigned char* tile, u32 r, u32 k) -> float {
        return *(const float*)(tile + r * 128u + ((((k >> 2) ^ (r & 7u))) << 4) + (k & 3u) * 4u);
    };
#pragma unroll
    for (int s = 0; s < TF_STAGES - 1; ++s) issue(s);
    for (u32 kt = 0; kt < KT; ++kt) {
        cp_async_wait<TF_STAGES - 2>();
        __syncthreads();
        issue(kt + TF_STAGES - 1);  // refills the stage read in iteration kt - 1
        const unsigned char* tA = sbase + (kt % TF_STAGES) * STAGE_BYTES;
        const unsigned char* tB = tA + A_BYTES;
        // Each K-slice is summed from zero on the tensor cores, then added to the running sum
        // with an f32 add (round to nearest): the tensor cores' accumulation truncates, which
        // over K = 4608 cost 3e-5 relative when it carried the running sum (measured).
        float part[4][4][4];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) part[mi][ni][0] = part[mi][ni][1] = part[mi][ni][2] = part[mi][ni][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BK / 8; ++kk) {
            // B fragments of the warp's 4 n8 tiles, then one m16 tile of A at a time (keeps the
            // split fragments to 24 registers next to the 64 accumulators)
            u32 bb[4][2], bs[4][2];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const u32 n = wn * 32u + ni * 8u + g, k = kk * 8u + tg;
                split_tf32<SPLIT>(at(tB, n, k), bb[ni][0], bs[ni][0]);
                split_tf32<SPLIT>(at(tB, n, k + 4u), bb[ni][1], bs[ni][1]);
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                u32 ab[4], as[4];
                const u32 r = wm * 64u + mi * 16u + g, k = kk * 8u + tg;
                split_tf32<SPLIT>(at(tA, r, k), ab[0], as[0]);
                split_tf32<SPLIT>(at(tA, r + 8u, k), ab[1], as[1]);
                split_tf32<SPLIT>(at(tA, r, k + 4u), ab[2], as[2]);
                split_tf32<SPLIT>(at(tA, r + 8u, k + 4u), ab[3], as[3]);
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    if constexpr (SPLIT) {
                        mma_tf32_1688(part[mi][ni], as, bb[ni]);
                        mma_tf32_1688(part[mi][ni], ab, bs[ni]);
                    }
                    mma_tf32_1688(part[mi][ni], ab, bb[ni]);
                }
            }
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[mi][ni][q] += part[mi][ni][q];
    }
    cp_async_wait<0>();

    // ---- epilogue: c0, c1 at (row g, cols 2tg, 2tg + 1), c2, c3 at row g + 8
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 rl = wm * 64u + mi * 16u + g + 8u * h;
            if (rl >= rows) continue;
            float* crow = C + ((size_t)seg + m0 + rl) * N;
            if (SWIGLU) {
#pragma unroll
                for (int ni = 0; ni < 4; ni += 2) {
                    const u32 oc = n_tile * (BN / 2) + (wn * 2u + ni / 2) * 8u + 2u * tg;
                    const float* gt = acc[mi][ni];
                    const float* up = acc[mi][ni + 1];
                    if (oc < N) crow[oc] = silu_f(gt[2 * h]) * up[2 * h];
                    if (oc + 1 < N) crow[oc + 1] = silu_f(gt[2 * h + 1]) * up[2 * h + 1];
                }
            } else {
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const u32 oc = n_tile * BN + wn * 32u + ni * 8u + 2u * tg;
                    if (oc < N) crow[oc] = acc[mi][ni][2 * h];
                    if (oc + 1 < N) crow[oc + 1] = acc[mi][ni][2 * h + 1];
                }
            }
        }
}

// name: gg_tf32x3_{plain|swiglu} (3xTF32), gg_tf32_{plain|swiglu} (plain TF32);
// dynamic smem = TF_STAGES * 256 * 128 + 1024
#define GG_TF32(NAME, SWIGLU, SPLIT) \
    extern "C" __global__ void __launch_bounds__(256, 1) NAME(const float* A, const u32* gather, u32 gk, const u32* offsets, \
                                                              u32 E, const float* B0, const float* B1, float* C, u32 N, u32 K) { \
        gg_tf32x3_body<SWIGLU, SPLIT>(A, gather, gk, offsets, E, B0, B1, C, N, K); \
    }
GG_TF32(gg_tf32x3_plain, false, true)
GG_TF32(gg_tf32x3_swiglu, true, true)
GG_TF32(gg_tf32_plain, false, false)
GG_TF32(gg_tf32_swiglu, true, false)
