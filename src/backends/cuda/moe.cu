// MoE routed experts on the GPU: see moe_cuda.h.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <utility>

#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/launch.cuh"
#include "backends/cuda/mma.cuh"
#include "backends/cuda/moe_cuda.h"
#include "backends/cuda/tma.cuh"
#include "backends/cuda/wgmma.cuh"
#include "core/error.h"

namespace hla::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct RouteArgs {
  int E, k;
  bool sigmoid;
  int n_group, topk_group;
  bool norm_topk;
  float scale;
};

// The ranking of moe_route: a higher score first, the lower index on ties.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// One warp per token: pick_e / pick_w [T, k] in pick order, counts[e] += the picks of e (when
// counts is given). Shared memory: per warp prob [E] and select [E].
constexpr int kRouteWarps = 4;
__global__ void __launch_bounds__(kRouteWarps * 32)
    moe_route_kernel(const float* logits, const float* bias, RouteArgs r, int T, int32_t* pick_e, float* pick_w,
                     int32_t* counts) {
  pdl_begin();
  extern __shared__ float route_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.x * kRouteWarps + warp;
  if (t >= T) return;
  const int E = r.E;
  float* prob = route_smem + 2 * E * warp;
  float* select = prob + E;
  const float* l = logits + int64_t(t) * E;
  if (!r.sigmoid) {  // softmax over all experts
    float mx = -INFINITY, sum = 0;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    for (int e = lane; e < E; e += 32) sum += prob[e] = expf(l[e] - mx);
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) select[e] = prob[e] = prob[e] / sum;
  } else {
    for (int e = lane; e < E; e += 32) {
      prob[e] = sigmoidf(l[e]);
      select[e] = prob[e] + (bias ? bias[e] : 0.0f);
    }
    if (r.n_group > 1) {  // lane g scores group g by its two best; the topk_group best groups stay
      __syncwarp();
      const int G = r.n_group, per = E / G;
      float score = -INFINITY;
      if (lane < G) {
        float a = -INFINITY, b = -INFINITY;
        for (int e = lane * per; e < (lane + 1) * per; ++e) {
          const float v = select[e];
          if (v > a)
            b = a, a = v;
          else if (v > b)
            b = v;
        }
        score = a + (per > 1 ? b : 0.0f);
      }
      int rank = 0;
      for (int g = 0; g < G; ++g) rank += ranks_before(__shfl_sync(~0u, score, g), g, score, lane);
      if (lane < G && rank >= r.topk_group)
        for (int e = lane * per; e < (lane + 1) * per; ++e) select[e] = -INFINITY;
    }
  }
  __syncwarp();
  // k rounds of a warp arg-max; lane owns experts lane + 32·j, `taken` bit j once picked.
  uint32_t taken = 0;
  float sum = 0;
  int32_t* picks = pick_e + int64_t(t) * r.k;
  for (int i = 0; i < r.k; ++i) {
    float best = -INFINITY;
    int bi = INT_MAX;
    for (int j = 0, e = lane; e < E; ++j, e += 32)
      if (!(taken >> j & 1u) && ranks_before(select[e], e, best, bi)) best = select[e], bi = e;
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(~0u, best, o);
      const int oi = __shfl_xor_sync(~0u, bi, o);
      if (ranks_before(ob, oi, best, bi)) best = ob, bi = oi;
    }
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == 0) picks[i] = bi;
    sum += prob[bi];
  }
  if (lane != 0) return;
  const float norm = r.sigmoid ? sum + 1e-20f : sum;
  for (int i = 0; i < r.k; ++i) {
    const int e = picks[i];
    float w = prob[e];
    if (r.norm_topk) w /= norm;
    pick_w[int64_t(t) * r.k + i] = w * r.scale;
    if (counts) atomicAdd(counts + e, 1);
  }
}

// One warp: offsets[e] = the first sorted row of expert e (offsets[E] = all rows), tiles[e] = its
// first row tile of `bm` rows (tiles[E] = all tiles), cursor[e] = offsets[e].
__global__ void moe_plan_kernel(const int32_t* counts, int E, int bm, int32_t* offsets, int32_t* tiles,
                                int32_t* cursor) {
  pdl_begin();
  const int lane = threadIdx.x, per = (E + 31) / 32, e0 = min(E, lane * per), e1 = min(E, e0 + per);
  int rows = 0, nt = 0;
  for (int e = e0; e < e1; ++e) rows += counts[e], nt += (counts[e] + bm - 1) / bm;
  int rows_in = rows, nt_in = nt;  // inclusive scans over the lanes
  for (int o = 1; o < 32; o <<= 1) {
    const int r = __shfl_up_sync(~0u, rows_in, o), n = __shfl_up_sync(~0u, nt_in, o);
    if (lane >= o) rows_in += r, nt_in += n;
  }
  int r = rows_in - rows, n = nt_in - nt;
  for (int e = e0; e < e1; ++e) {
    offsets[e] = cursor[e] = r, tiles[e] = n;
    r += counts[e], n += (counts[e] + bm - 1) / bm;
  }
  if (lane == 31) offsets[E] = rows_in, tiles[E] = nt_in;
}

// One block per (token, pick) row: takes the next free row of its expert and copies x's row there
// as bf16. pos_of [T·k] = the row taken. (A warp per row took 9 µs for the 8 rows of a batch-1
// step: 16 dependent load/store rounds per lane.)
constexpr int kGatherThreads = 128;
__global__ void __launch_bounds__(kGatherThreads)
    moe_gather_kernel(const float* x, int D, const int32_t* pick_e, int k, int32_t* cursor, int32_t* pos_of, bf16* xs) {
  pdl_begin();
  __shared__ int pos;
  const int i = blockIdx.x;
  if (threadIdx.x == 0) pos_of[i] = pos = atomicAdd(cursor + pick_e[i], 1);
  __syncthreads();
  const float4* src = reinterpret_cast<const float4*>(x + int64_t(i / k) * D);
  uint2* dst = reinterpret_cast<uint2*>(xs + int64_t(pos) * D);
#pragma unroll 4
  for (int c = threadIdx.x; c < D / 4; c += kGatherThreads) {
    const float4 v = src[c];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    dst[c] = make_uint2(reinterpret_cast<const uint32_t&>(lo), reinterpret_cast<const uint32_t&>(hi));
  }
}

// The row tile of block y of a grouped GEMM: its expert e (the last one whose first tile is at or
// before it: a non-empty one), first sorted row m0 and valid rows (≤ bm); e = -1 past the plan's
// tiles (the grid is sized for the worst case).
struct RowTile {
  int e, m0, rows;
};
__device__ __forceinline__ RowTile find_row_tile(const int32_t* offsets, const int32_t* tiles, int E, int bm) {
  const int tile = blockIdx.y;
  if (tile >= tiles[E]) return {-1, 0, 0};
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tiles[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int m0 = offsets[lo] + (tile - tiles[lo]) * bm;
  return {lo, m0, min(bm, offsets[lo + 1] - m0)};
}

// Output columns (col, col + 1) of sorted row `row`. kSwiglu: they are an expert's (gate_i, up_i)
// rows and out (bf16 [R, N/2]) gets swiglu_bf16(gate, up); else out (fp32 [R, N]) gets both.
template <bool kSwiglu>
__device__ __forceinline__ void store_products(void* out, int N, int row, int col, float v0, float v1) {
  if constexpr (kSwiglu) {
    static_cast<bf16*>(out)[int64_t(row) * (N / 2) + col / 2] = __float2bfloat16_rn(swiglu_bf16(v0, v1));
  } else {
    *reinterpret_cast<float2*>(static_cast<float*>(out) + int64_t(row) * N + col) = make_float2(v0, v1);
  }
}

// A grouped GEMM's tiling: BM x BN output tiles, WM x WN warps, K in steps of 64 through a
// STAGES-deep cp.async ring. Shared-memory rows are 64 + 8 elements (144 bytes) apart, so the 8
// rows an ldmatrix reads fall in distinct banks.
template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct Tiling {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int BK = 64, LD = BK + 8, kThreads = 32 * WM * WN;
  static constexpr int MI = BM / WM / 16, NI = BN / WN / 8;  // 16 x 8 mma tiles per warp
  static constexpr size_t kSmem = size_t(STAGES) * (BM + BN) * LD * sizeof(bf16);
  static_assert(MI >= 1 && NI % 2 == 0, "a warp covers whole 16-row tiles and pairs of 8-column tiles");
};
// Decode-sized batches (a few rows per expert): 16-row tiles, so an expert's weights are streamed
// once per 16 of its rows, through 4 warps side by side along N. (2 warps over 32 columns with 8
// stages in flight measured the same at batch 1 and 7% slower at batch 16 and 64.)
using SmallTiles = Tiling<16, 64, 1, 4, 4>;

// Block (n-block x, tile y): rows [m0, m0 + BM) of the sorted rows A [R, K] (bf16) times the rows
// [n0, n0 + BN) of its expert's W_e [N, K] (bf16, expert e at W + e·N·K), the expert found from
// the plan. kSwiglu: columns (2i, 2i+1) are expert row pairs (gate_i, up_i) and
// out (bf16 [R, N/2]) = swiglu_bf16(gate, up); else out (fp32 [R, N]) = the products.
template <class Cfg, bool kSwiglu>
__global__ void __launch_bounds__(Cfg::kThreads)
    moe_gemm_kernel(const bf16* A, const bf16* W, int N, int K, const int32_t* offsets, const int32_t* tiles, int E,
                    void* out) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LD = Cfg::LD, STAGES = Cfg::STAGES;
  constexpr int MI = Cfg::MI, NI = Cfg::NI, kThreads = Cfg::kThreads;
  pdl_begin();
  const RowTile rt = find_row_tile(offsets, tiles, E, BM);
  if (rt.e < 0) return;
  const int e = rt.e, m0 = rt.m0, rows = rt.rows, n0 = blockIdx.x * BN;
  const bf16* a_rows = A + int64_t(m0) * K;
  const bf16* w_rows = W + (int64_t(e) * N + n0) * K;
  extern __shared__ __align__(16) unsigned char gemm_smem[];
  bf16* sa = reinterpret_cast<bf16*>(gemm_smem);  // [STAGES][BM][LD]
  bf16* sb = sa + STAGES * BM * LD;               // [STAGES][BN][LD]
  const int KT = (K + BK - 1) / BK;
  auto load = [&](int stage, int kt) {  // rows past the expert's, N or K read as zeros
    const int k0 = kt * BK;
    bf16* a = sa + stage * BM * LD;
    bf16* b = sb + stage * BN * LD;
    for (int idx = threadIdx.x; idx < BM * (BK / 8); idx += kThreads) {
      const int r = idx / (BK / 8), c = idx % (BK / 8) * 8;
      const bool ok = r < rows && k0 + c < K;
      cp_async16(a + r * LD + c, ok ? a_rows + int64_t(r) * K + k0 + c : A, ok);
    }
    for (int idx = threadIdx.x; idx < BN * (BK / 8); idx += kThreads) {
      const int r = idx / (BK / 8), c = idx % (BK / 8) * 8;
      const bool ok = n0 + r < N && k0 + c < K;
      cp_async16(b + r * LD + c, ok ? w_rows + int64_t(r) * K + k0 + c : W, ok);
    }
  };
  const int warp = threadIdx.x >> 5, wm = warp / Cfg::WN, wn = warp % Cfg::WN;
  float acc[MI][NI][4] = {};
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt has landed for all; stage kt−1, refilled next, is consumed by all
    if (kt + STAGES - 1 < KT) load((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const bf16* a = sa + (kt % STAGES) * BM * LD + wm * MI * 16 * LD;
    const bf16* b = sb + (kt % STAGES) * BN * LD + wn * NI * 8 * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) frag_a(af[mi], View<bf16, true>{a + mi * 16 * LD, LD}, kk);
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        uint32_t f[4];
        frag_b2(f, View<bf16, true>{b, LD}, ni * 8, kk);
        bfr[ni][0] = f[0], bfr[ni][1] = f[1], bfr[ni + 1][0] = f[2], bfr[ni + 1][1] = f[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bfr[ni]);
    }
  }
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * MI * 16 + mi * 16 + (lane >> 2) + 8 * h;
        const int col = n0 + wn * NI * 8 + ni * 8 + 2 * (lane & 3);
        if (row < rows && col < N)
          store_products<kSwiglu>(out, N, m0 + row, col, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
}

// Prefill-sized passes: 128 x 256 tiles on the warpgroup tensor cores (wgmma.cuh), fed by the
// copy engine (tma.cuh). mma.sync's 128 x 128 tiles ran the 16 GEMMs of an 8K-token forward of
// the 2.5B MoE model in 13.3 ms on an H200 (~250 TFLOP/s); wgmma fed by cp.async from the same
// warps, with a barrier of the whole block per K step, in 10.1 ms.
// Three warpgroups: the first (its registers cut to 40) has one thread issue the copies of A
// [128 x 64] and W [256 x 64] boxes into a STAGES-deep ring; the other two own rows [0, 64) and
// [64, 128) of the tile and all 256 columns (two m64n128 products per 16-column step, 128 fp32
// accumulators a thread, registers raised to 232). full[s] completes when stage s's bytes have
// landed; empty[s] when both consumers' products that read it have completed (each arrives after
// wgmma_wait<1> of the next step), and only then is it refilled. A tile's rows past its expert's
// read the next expert's rows (their products are not stored); rows past the pass's end and
// columns past K read zeros.
struct WgmmaTiles {
  static constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, kThreads = 384;
  static constexpr int kABytes = BM * kSwizzleRowBytes, kStageBytes = (BM + BN) * kSwizzleRowBytes;
  static constexpr size_t kSmem = size_t(STAGES) * kStageBytes + kSwizzleGroupBytes;  // + slack to align the ring
  static_assert(BK * sizeof(bf16) == kSwizzleRowBytes, "a K step is one swizzled 128-byte row");
};

template <bool kSwiglu>
__global__ void __launch_bounds__(WgmmaTiles::kThreads, 1)
    moe_wgmma_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map, int N, int K,
                     const int32_t* offsets, const int32_t* tiles, int E, void* out) {
  using Cfg = WgmmaTiles;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  __shared__ uint64_t full[STAGES], empty[STAGES];
  extern __shared__ unsigned char wgmma_smem[];
  unsigned char* ring_p = swizzle_aligned(wgmma_smem);
  const uint32_t ring = smem_addr(ring_p);
  if (threadIdx.x == 0) ring_barriers_init(full, empty, 2);
  __syncthreads();
  pdl_begin();
  const RowTile rt = find_row_tile(offsets, tiles, E, BM);
  if (rt.e < 0) return;
  const int n0 = blockIdx.x * BN, KT = (K + BK - 1) / BK, wg = threadIdx.x >> 7;
  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x != 0) return;
    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % STAGES;
      if (kt >= STAGES) mbarrier_wait(&empty[s], (kt / STAGES - 1) & 1);
      unsigned char* a = ring_p + s * Cfg::kStageBytes;
      mbarrier_expect(&full[s], Cfg::kStageBytes);
      tma_load_2d(a, a_map, kt * BK, rt.m0, &full[s]);
      tma_load_2d(a + Cfg::kABytes, w_map, kt * BK, rt.e * N + n0, &full[s]);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int c = wg - 1;  // consumer: rows [64c, 64c + 64)
  float acc[2][64] = {};
  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % STAGES;
    mbarrier_wait(&full[s], (kt / STAGES) & 1);
    const uint32_t a = ring + s * Cfg::kStageBytes + c * 64 * kSwizzleRowBytes;
    const uint32_t b = ring + s * Cfg::kStageBytes + Cfg::kABytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {  // 16 columns = 32 bytes into each swizzled row
      const uint64_t da = wgmma_desc(a + 32 * kk);
      wgmma_m64n128k16_bf16(acc[0], da, wgmma_desc(b + 32 * kk));
      wgmma_m64n128k16_bf16(acc[1], da, wgmma_desc(b + 128 * kSwizzleRowBytes + 32 * kk));
    }
    wgmma_commit();
    wgmma_wait<1>();  // step kt−1's products are done: its stage may be refilled
    if (kt > 0 && threadIdx.x % 128 == 0) mbarrier_arrive(&empty[(kt - 1) % STAGES]);
  }
  wgmma_wait<0>();
  wgmma_hold(acc[0]);
  wgmma_hold(acc[1]);
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = c * 64 + warp * 16 + (lane >> 2) + 8 * h;
        const int col = n0 + half * 128 + 8 * j + 2 * (lane & 3);
        if (row < rt.rows && col < N)
          store_products<kSwiglu>(out, N, rt.m0 + row, col, acc[half][4 * j + 2 * h], acc[half][4 * j + 2 * h + 1]);
      }
}

// Decode-sized passes (a few picks): out[r] = W_{pick_e[r]} · in[r / k_div] for pick r =
// blockIdx.y. A warp owns kRows consecutive output rows, 16 bytes of each per lane per load, all
// kRows loads of a step in flight together, and reads its input slice once for them: one row per
// warp left the down projection (K = 512: 1 KB a warp) bound by each warp's fixed cost. Only the
// picked experts' rows are read and nothing is sorted or gathered; the input row is rounded to
// bf16 as the tile path's operands are. kSwiglu: rows (2i, 2i+1) are (gate_i, up_i), in one warp
// (kRows even), and out (bf16, [R, N/2]) = swiglu_bf16(gate, up), rounded; else out (fp32,
// [R, N]). K a multiple of 8.
constexpr int kGemvWarps = 4;
template <bool kSwiglu, class In, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    moe_gemv_kernel(const bf16* W, int N, int K, const int32_t* pick_e, const In* in, int k_div, void* out) {
  static_assert(!kSwiglu || kRows % 2 == 0, "a gate/up pair in one warp");
  pdl_begin();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = blockIdx.y;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * kRows;
  const bf16* w[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) w[j] = W + (int64_t(pick_e[r]) * N + min(n0 + j, N - 1)) * K;
  const In* x = in + int64_t(r / k_div) * K;
  float acc[kRows] = {};
#pragma unroll 4
  for (int k = lane * 8; k < K; k += 256) {
    uint4 raw[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) raw[j] = __ldg(reinterpret_cast<const uint4*>(w[j] + k));
    float a[8];
    if constexpr (sizeof(In) == 4) {
      const float4 lo = *reinterpret_cast<const float4*>(x + k), hi = *reinterpret_cast<const float4*>(x + k + 4);
      const float f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) a[j] = __bfloat162float(__float2bfloat16_rn(f[j]));
    } else {
      const uint4 xr = *reinterpret_cast<const uint4*>(x + k);
      const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xr);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(xp[j]);
        a[2 * j] = f.x, a[2 * j + 1] = f.y;
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) acc[j] = dot_bf16x8(acc[j], raw[j], a);
  }
#pragma unroll
  for (int j = 0; j < kRows; ++j) acc[j] = warp_sum(acc[j]);
  if (lane != 0) return;
#pragma unroll
  for (int j = 0; j < kRows; j += kSwiglu ? 2 : 1) {
    const int n = n0 + j;
    if (n >= N) break;
    if constexpr (kSwiglu)
      static_cast<bf16*>(out)[int64_t(r) * (N / 2) + n / 2] = __float2bfloat16_rn(swiglu_bf16(acc[j], acc[j + 1]));
    else
      static_cast<float*>(out)[int64_t(r) * N + n] = acc[j];
  }
}

// out [T, D] += Σ_j pick_w[t, j] · y[pos_of[t, j]] (+ gate[t] · shared[t]), the sum first (the
// CPU forward's order); one thread per 4 columns.
// pos_of null: pick (t, j) is row t·k + j of y.
__global__ void moe_combine_kernel(const float* y, const int32_t* pos_of, const float* pick_w, int k, int D,
                                   const float* shared, const float* shared_gate, float* out, int64_t T) {
  pdl_begin();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, per_row = D / 4;
  if (i >= T * per_row) return;
  const int64_t t = i / per_row, c = i % per_row;
  float4 acc = make_float4(0, 0, 0, 0);
  for (int j = 0; j < k; ++j) {
    const float w = pick_w[t * k + j];
    const int64_t row = pos_of ? pos_of[t * k + j] : t * k + j;
    const float4 v = reinterpret_cast<const float4*>(y + row * D)[c];
    acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
  }
  if (shared) {
    const float g = shared_gate ? shared_gate[t] : 1.0f;
    const float4 v = reinterpret_cast<const float4*>(shared + t * D)[c];
    acc.x += g * v.x, acc.y += g * v.y, acc.z += g * v.z, acc.w += g * v.w;
  }
  float4& o = reinterpret_cast<float4*>(out + t * D)[c];
  o.x += acc.x, o.y += acc.y, o.z += acc.z, o.w += acc.w;
}

// The scratch of one pass of R = tokens·k rows, carved in order from one 256-byte-aligned block.
struct MoeBuffers {
  int32_t *pick_e, *pos_of, *counts, *cursor, *offsets, *tiles;
  float *pick_w, *y;
  bf16 *xs, *h;
  size_t bytes;
  MoeBuffers(void* base, const MoeExperts& m, int64_t tokens) {
    const int64_t R = tokens * m.router.top_k, E = m.router.experts;
    char* p = static_cast<char*>(base);
    size_t at = 0;
    auto take = [&](size_t n) {
      char* q = p ? p + at : nullptr;
      at += (n + 255) & ~size_t(255);
      return q;
    };
    pick_e = reinterpret_cast<int32_t*>(take(size_t(R) * 4));
    pos_of = reinterpret_cast<int32_t*>(take(size_t(R) * 4));
    pick_w = reinterpret_cast<float*>(take(size_t(R) * 4));
    counts = reinterpret_cast<int32_t*>(take(size_t(E) * 4));
    cursor = reinterpret_cast<int32_t*>(take(size_t(E) * 4));
    offsets = reinterpret_cast<int32_t*>(take(size_t(E + 1) * 4));
    tiles = reinterpret_cast<int32_t*>(take(size_t(E + 1) * 4));
    xs = reinterpret_cast<bf16*>(take(size_t(R * m.D) * 2));
    h = reinterpret_cast<bf16*>(take(size_t(R * m.I) * 2));
    y = reinterpret_cast<float*>(take(size_t(R * m.D) * 4));
    bytes = at;
  }
};

// The two GEMMs of a pass with the tiling Cfg (BM, BN, kThreads, kSmem) and its kernels, whose
// first two arguments, the row operand A [rows, K] and the stacked experts W [E·N, K], are what
// operands(A, rows, W, w_rows, K) returns (pointers, or tensor maps).
template <class Cfg, class GateUpKernel, class DownKernel, class Operands>
void grouped_gemms(const MoeExperts& m, const MoeBuffers& b, int64_t R, cudaStream_t stream,
                   GateUpKernel gate_up_kernel, DownKernel down_kernel, Operands operands) {
  static const bool ready = [&] {  // more than the default 48 KB of dynamic shared memory
    for (const void* k : {reinterpret_cast<const void*>(gate_up_kernel), reinterpret_cast<const void*>(down_kernel)})
      check_cuda(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::kSmem)),
                 "moe gemm shared memory");
    return true;
  }();
  (void)ready;
  const int E = int(m.router.experts);
  // Every expert's partial tile adds at most one to the R / BM full ones; blocks past the plan's
  // count return at once. The n-blocks of a row tile are adjacent in the grid, so they run
  // together and its rows come from DRAM once (with the tiles along x, the 8K-token gate/up GEMM
  // drew 2.3 TB/s from DRAM; the 16 GEMMs of an 8K forward went 13.7 -> 13.3 ms).
  const int64_t tiles = (R + Cfg::BM - 1) / Cfg::BM + std::min<int64_t>(E, R);
  check(tiles <= 65535, "internal: moe_forward pass of too many row tiles");
  const int N1 = int(2 * m.I), N2 = int(m.D);
  const auto up = operands(b.xs, R, static_cast<const bf16*>(m.gate_up.p), E * int64_t(N1), int(m.D));
  launch_pdl("moe gate/up gemm", gate_up_kernel, dim3(unsigned((N1 + Cfg::BN - 1) / Cfg::BN), unsigned(tiles)),
             Cfg::kThreads, Cfg::kSmem, stream, up.first, up.second, N1, int(m.D), b.offsets, b.tiles, E,
             static_cast<void*>(b.h));
  const auto down = operands(b.h, R, static_cast<const bf16*>(m.down.p), E * int64_t(N2), int(m.I));
  launch_pdl("moe down gemm", down_kernel, dim3(unsigned((N2 + Cfg::BN - 1) / Cfg::BN), unsigned(tiles)), Cfg::kThreads,
             Cfg::kSmem, stream, down.first, down.second, N2, int(m.I), b.offsets, b.tiles, E, static_cast<void*>(b.y));
}

}  // namespace

bool moe_fits(const MoeExperts& m) {
  const cpu::MoeRouter& r = m.router;
  return m.D % 8 == 0 && m.I % 8 == 0 && r.experts >= 1 && r.experts <= 1024 && r.top_k >= 1 && r.top_k <= r.experts &&
         r.n_group >= 1 && r.n_group <= 32 && r.experts % r.n_group == 0 && m.gate_up.elem_bytes == 2 &&
         m.down.elem_bytes == 2;
}

size_t moe_scratch_bytes(const MoeExperts& m, int64_t tokens) { return MoeBuffers(nullptr, m, tokens).bytes; }

void moe_forward(const MoeExperts& m, const float* x, const float* logits, const float* shared,
                 const float* shared_gate, float* out, int64_t T, void* scratch, cudaStream_t stream) {
  check(moe_fits(m), "internal: moe_forward on shapes it does not take");
  const cpu::MoeRouter& r = m.router;
  const int E = int(r.experts), k = int(r.top_k), D = int(m.D);
  const RouteArgs args{E, k, r.sigmoid, int(r.n_group), int(r.topk_group), r.norm_topk, r.routed_scale};
  const MoeBuffers b(scratch, m, std::min(T, kMoeTokensPerPass));
  for (int64_t t0 = 0; t0 < T; t0 += kMoeTokensPerPass) {
    const int64_t n = std::min(T - t0, kMoeTokensPerPass), R = n * k;
    const unsigned route_blocks = unsigned((n + kRouteWarps - 1) / kRouteWarps);
    const size_t route_smem = size_t(2 * E * kRouteWarps) * 4;
    const int64_t threads = n * D / 4;
    const unsigned combine_blocks = unsigned((threads + 255) / 256);
    const bool gemv = R <= kMoeGemvPicks;  // decode: a GEMV per pick, no counts, sorting or gather
    if (!gemv) check_cuda(cudaMemsetAsync(b.counts, 0, size_t(E) * 4, stream), "moe counts");
    launch_pdl("moe route", moe_route_kernel, route_blocks, kRouteWarps * 32, route_smem, stream, logits + t0 * E,
               m.bias, args, int(n), b.pick_e, b.pick_w, gemv ? nullptr : b.counts);
    if (gemv) {
      const int N1 = int(2 * m.I), I = int(m.I);
      // 2 rows a warp (a gate/up pair) for the gate/up rows, 4 for the down rows' shorter K.
      constexpr int kUpRows = 2, kDownRows = 4;
      auto blocks = [](int rows, int per_warp) {
        return unsigned((rows + kGemvWarps * per_warp - 1) / (kGemvWarps * per_warp));
      };
      launch_pdl("moe gate/up gemv", moe_gemv_kernel<true, float, kUpRows>, dim3(blocks(N1, kUpRows), unsigned(R)),
                 kGemvWarps * 32, 0, stream, static_cast<const bf16*>(m.gate_up.p), N1, D,
                 static_cast<const int32_t*>(b.pick_e), x + t0 * D, k, static_cast<void*>(b.h));
      launch_pdl("moe down gemv", moe_gemv_kernel<false, bf16, kDownRows>, dim3(blocks(D, kDownRows), unsigned(R)),
                 kGemvWarps * 32, 0, stream, static_cast<const bf16*>(m.down.p), D, I,
                 static_cast<const int32_t*>(b.pick_e), static_cast<const bf16*>(b.h), 1, static_cast<void*>(b.y));
    } else {
      // Prefill-sized passes (≥ 64 rows per expert on average) take the wgmma tiles.
      const bool large = R >= 64 * int64_t(E);
      launch_pdl("moe plan", moe_plan_kernel, 1, 32, 0, stream, static_cast<const int32_t*>(b.counts), E,
                 large ? WgmmaTiles::BM : SmallTiles::BM, b.offsets, b.tiles, b.cursor);
      launch_pdl("moe gather", moe_gather_kernel, unsigned(R), kGatherThreads, 0, stream, x + t0 * D, D,
                 static_cast<const int32_t*>(b.pick_e), k, b.cursor, b.pos_of, b.xs);
      if (large)
        grouped_gemms<WgmmaTiles>(m, b, R, stream, moe_wgmma_kernel<true>, moe_wgmma_kernel<false>,
                                  [](const bf16* A, int64_t rows, const bf16* W, int64_t w_rows, int K) {
                                    return std::make_pair(tensor_map_bf16(A, rows, K, WgmmaTiles::BM),
                                                          tensor_map_bf16(W, w_rows, K, WgmmaTiles::BN));
                                  });
      else
        grouped_gemms<SmallTiles>(
            m, b, R, stream, moe_gemm_kernel<SmallTiles, true>, moe_gemm_kernel<SmallTiles, false>,
            [](const bf16* A, int64_t, const bf16* W, int64_t, int) { return std::make_pair(A, W); });
    }
    launch_pdl("moe combine", moe_combine_kernel, combine_blocks, 256, 0, stream, static_cast<const float*>(b.y),
               gemv ? nullptr : b.pos_of, static_cast<const float*>(b.pick_w), k, D, shared ? shared + t0 * D : nullptr,
               shared_gate ? shared_gate + t0 : nullptr, out + t0 * D, n);
  }
}

}  // namespace hla::cuda
