// Tensor-core causal softmax attention of one sequence (FlashAttention-2 form, mma.sync bf16).
//
// A block owns 64 "rows" of one kv head: row r = i·group + g is query i of the g-th query head
// sharing that kv head (GQA heads are packed together, so a decode step of a group fills the
// tile's rows with one K/V read). 4 warps × 16 rows. It loops over 64-key tiles, converting the
// fp32 K/V (and, once, Q) to bf16 as they go to shared memory; S = Q·Kᵀ and O += P·V run on
// m16n8k16 bf16 tensor cores with fp32 accumulators; the online softmax (running max and sum,
// rescaled accumulator) is fp32 in registers, in the log2 domain (exp2 of s·scale·log2 e).
// P is rounded to bf16 for the second product and the running sum adds the rounded values, so
// the normalisation matches the weights that were applied.
//
// Flash-decoding: where (row tiles × kv heads) leave the GPU short of blocks (decode, short
// chunks), the keys are split over blockIdx.z into ranges of whole tiles; each split writes its
// unnormalised accumulator and its (max, sum), and a combine kernel merges the splits in a fixed
// order. The partials live in one per-device workspace sized for the worst case the split rule
// can produce (allocated at the first call that splits, never again: graph-capture safe after
// that). No atomics anywhere: results are bitwise reproducible. The workspace is one per device,
// used in stream order: two splitting calls running concurrently on different streams of one
// device would share it (callers keep attention on one stream per device).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "backends/cuda/attention_cuda.h"
#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/mma.cuh"

namespace hla::cuda {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kWarps = 4, kThreads = 32 * kWarps, kBM = 16 * kWarps, kBN = 64, kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;

struct FlashParams {
  const float* q;
  const float* k;
  const float* v;
  float* o;    // final output (nsplit == 1)
  float* op;   // partial accumulators [nsplit][n][nh][dv] (nsplit > 1)
  float* ml;   // partial (max, sum) [nsplit][n][nh][2]
  int n, S, nh, nkv, group, dq, R;  // R = n·group rows per kv head
  int row_tiles, tiles_per_split, nsplit;
  float scale_log2;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return reinterpret_cast<uint32_t&>(v);
}

// rows x cols fp32 (cols a multiple of 4, rows 16-byte aligned) -> bf16 shared tile with pitch ld;
// rows >= valid are zero-filled. Loads are batched per thread before the stores for memory-level
// parallelism.
template <class RowPtr>
__device__ __forceinline__ void load_tile_bf16(bf16* s, int ld, int rows, int cols, int valid, RowPtr row) {
  constexpr int U = 8;
  const int per_row = cols >> 2, total = rows * per_row;
  for (int base = threadIdx.x; base < total; base += kThreads * U) {
    float4 buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = base + u * kThreads;
      const int r = idx / per_row, c = (idx - r * per_row) << 2;
      buf[u] = (idx < total && r < valid) ? __ldg(reinterpret_cast<const float4*>(row(r) + c))
                                          : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int idx = base + u * kThreads;
      if (idx < total) {
        const int r = idx / per_row, c = (idx - r * per_row) << 2;
        uint2 w;
        w.x = pack_bf16(buf[u].x, buf[u].y);
        w.y = pack_bf16(buf[u].z, buf[u].w);
        *reinterpret_cast<uint2*>(s + r * ld + c) = w;
      }
    }
  }
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  const unsigned a = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <int DV>
__global__ void __launch_bounds__(kThreads) flash_attn_fwd(FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldq = p.dq + kPad;
  constexpr int ldv = DV + kPad;
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* Ks = Qs + kBM * ldq;
  bf16* Vs = Ks + kBN * ldq;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rq = lane >> 2, qq = lane & 3;
  const int kvh = blockIdx.y, z = blockIdx.z;
  const int r0 = (p.row_tiles - 1 - int(blockIdx.x)) * kBM;  // heaviest (latest) row tiles first
  const int base_pos = p.S - p.n;
  const int rows_valid = min(kBM, p.R - r0);
  const int block_maxpos = base_pos + (r0 + rows_valid - 1) / p.group;
  const int ks0 = z * p.tiles_per_split * kBN;
  const int ke = min(min(ks0 + p.tiles_per_split * kBN, p.S), block_maxpos + 1);

  // Q tile (rows packed as query·group + head-in-group).
  load_tile_bf16(Qs, ldq, kBM, p.dq, rows_valid, [&](int r) {
    const int gr = r0 + r, i = gr / p.group, g = gr - i * p.group;
    return p.q + (int64_t(i) * p.nh + int64_t(kvh) * p.group + g) * p.dq;
  });

  const int wr0 = warp * 16;
  int pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = wr0 + rq + 8 * h;
    pos[h] = lr < rows_valid ? base_pos + (r0 + lr) / p.group : -1;
  }
  const int warp_rows = min(16, rows_valid - wr0);
  const int warp_maxpos = warp_rows > 0 ? base_pos + (r0 + wr0 + warp_rows - 1) / p.group : -1;

  float acc[DV / 8][4];
#pragma unroll
  for (int t = 0; t < DV / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int ks = ks0; ks < ke; ks += kBN) {
    __syncthreads();  // previous tile consumed (first pass: nothing to wait for but Q's stores)
    const int kv_valid = min(kBN, ke - ks);
    load_tile_bf16(Ks, ldq, kBN, p.dq, kv_valid,
                   [&](int r) { return p.k + (int64_t(ks + r) * p.nkv + kvh) * p.dq; });
    load_tile_bf16(Vs, ldv, kBN, DV, kv_valid,
                   [&](int r) { return p.v + (int64_t(ks + r) * p.nkv + kvh) * DV; });
    __syncthreads();
    if (ks > warp_maxpos) continue;  // warp-uniform: every key of the tile is in this warp's future

    float s[kBN / 8][4];
#pragma unroll
    for (int t = 0; t < kBN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
    warp_mma<bf16, kBN / 8>(s, View<bf16, true>{Qs + wr0 * ldq, ldq}, View<bf16, true>{Ks, ldq}, p.dq);

    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < kBN / 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = ks + 8 * t + 2 * qq + (e & 1), h = e >> 1;
        const float x = (j <= pos[h] && j < ke) ? s[t][e] * p.scale_log2 : -INFINITY;
        s[t][e] = x;
        tmax[h] = fmaxf(tmax[h], x);
      }
    float mu[2], alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
      tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
      const float mn = fmaxf(m[h], tmax[h]);
      mu[h] = mn == -INFINITY ? 0.f : mn;  // a row with nothing visible yet: keep everything at 0
      alpha[h] = exp2f(m[h] - mu[h]);
      m[h] = mn;
    }
    uint32_t pa[kBN / 8][2];
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int t = 0; t < kBN / 8; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        __nv_bfloat162 pv = __floats2bfloat162_rn(exp2f(s[t][2 * h] - mu[h]), exp2f(s[t][2 * h + 1] - mu[h]));
        pa[t][h] = reinterpret_cast<uint32_t&>(pv);
        rs[h] += __low2float(pv) + __high2float(pv);
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + rs[h];
#pragma unroll
    for (int t = 0; t < DV / 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] *= alpha[e >> 1];

    // O += P·V: P's accumulator fragments are the A fragments; V's B fragments via ldmatrix.trans.
    const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8, vcol = (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
      const bf16* vb = Vs + (kk * 16 + vrow) * ldv + vcol;
#pragma unroll
      for (int n2 = 0; n2 < DV / 16; ++n2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vb + n2 * 16);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_bf16(acc[2 * n2], a, b0);
        mma_bf16(acc[2 * n2 + 1], a, b1);
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = wr0 + rq + 8 * h;
    if (lr >= rows_valid) continue;
    const int gr = r0 + lr, i = gr / p.group, g = gr - i * p.group;
    const int64_t row = int64_t(i) * p.nh + int64_t(kvh) * p.group + g;
    if (p.nsplit == 1) {
      const float inv = 1.f / l[h];
      float* out = p.o + row * DV + 2 * qq;
#pragma unroll
      for (int t = 0; t < DV / 8; ++t)
        *reinterpret_cast<float2*>(out + 8 * t) = make_float2(acc[t][2 * h] * inv, acc[t][2 * h + 1] * inv);
    } else {
      const int64_t prow = int64_t(z) * p.n * p.nh + row;
      float* out = p.op + prow * DV + 2 * qq;
#pragma unroll
      for (int t = 0; t < DV / 8; ++t)
        *reinterpret_cast<float2*>(out + 8 * t) = make_float2(acc[t][2 * h], acc[t][2 * h + 1]);
      if (qq == 0) *reinterpret_cast<float2*>(p.ml + prow * 2) = make_float2(m[h], l[h]);
    }
  }
}

// o[row][d] = Σ_z 2^(m_z − m*)·acc_z[row][d] / Σ_z 2^(m_z − m*)·l_z, splits in order.
__global__ void flash_attn_combine(const float* __restrict__ op, const float* __restrict__ ml, float* __restrict__ o,
                                   int64_t rows, int dv, int nsplit) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * dv) return;
  const int64_t row = idx / dv;
  const int d = int(idx - row * dv);
  float mx = -INFINITY;
  for (int z = 0; z < nsplit; ++z) mx = fmaxf(mx, ml[(int64_t(z) * rows + row) * 2]);
  float num = 0.f, den = 0.f;
  for (int z = 0; z < nsplit; ++z) {
    const int64_t pr = int64_t(z) * rows + row;
    const float mz = ml[pr * 2];
    if (mz == -INFINITY) continue;  // an empty split (all its keys in this row's future)
    const float w = exp2f(mz - mx);
    num += w * op[pr * dv + d];
    den += w * ml[pr * 2 + 1];
  }
  o[idx] = num / den;
}

constexpr int kMaxDevices = 64;

int sm_count(int dev) {
  static int cache[kMaxDevices] = {};
  if (dev < kMaxDevices && cache[dev]) return cache[dev];
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "attention_flash: SM count");
  if (dev < kMaxDevices) cache[dev] = n;
  return n;
}

// Split-K workspace: the split rule below (splits only while row_tiles·nkv < target, at most
// ceil(target / (row_tiles·nkv)) splits, n·nh ≤ 64·row_tiles·nkv) bounds nsplit·n·nh by
// 64·(2·target − 1) rows, each of dv + 2 ≤ 258 floats. Allocated once per device at the first
// call that splits.
float* split_workspace(int dev, size_t bound_floats) {
  static std::mutex mu;
  static float* ws[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= kMaxDevices) return nullptr;
  if (!ws[dev]) check_cuda(cudaMalloc(&ws[dev], bound_floats * sizeof(float)), "attention_flash: workspace");
  return ws[dev];
}

template <int DV>
void launch(const FlashParams& p, size_t smem, cudaStream_t stream) {
  check_cuda(cudaFuncSetAttribute(flash_attn_fwd<DV>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "attention_flash: smem attribute");
  const dim3 grid(unsigned(p.row_tiles), unsigned(p.nkv), unsigned(p.nsplit));
  flash_attn_fwd<DV><<<grid, kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "attention_flash");
}

bool supported_dim(int64_t d) { return d == 64 || d == 128 || d == 192 || d == 256; }

}  // namespace

bool attention_flash(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                     int64_t nkv, int64_t dq, int64_t dv, float scale, cudaStream_t stream) {
  if (!supported_dim(dq) || !supported_dim(dv)) return false;
  if (n <= 0 || S <= 0 || n > S || nh <= 0 || nkv <= 0 || nh % nkv != 0) return false;
  if (S > INT_MAX / 2 || n * nh > INT_MAX / 2 || nkv > 65535) return false;
  auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  if (!aligned(q) || !aligned(k) || !aligned(v) || !aligned(o)) return false;

  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "attention_flash: device");
  const int64_t group = nh / nkv, R = n * group;
  const int64_t row_tiles = (R + kBM - 1) / kBM, ntiles = (S + kBN - 1) / kBN;
  const int64_t base = row_tiles * nkv, target = 2 * int64_t(sm_count(dev));
  int64_t nsplit = 1, tps = ntiles;
  if (base < target && ntiles > 1) {
    nsplit = std::min<int64_t>((target + base - 1) / base, ntiles);
    tps = (ntiles + nsplit - 1) / nsplit;
    nsplit = (ntiles + tps - 1) / tps;
  }

  FlashParams p{};
  p.q = q, p.k = k, p.v = v, p.o = o;
  p.n = int(n), p.S = int(S), p.nh = int(nh), p.nkv = int(nkv), p.group = int(group), p.dq = int(dq);
  p.R = int(R), p.row_tiles = int(row_tiles), p.tiles_per_split = int(tps), p.nsplit = int(nsplit);
  p.scale_log2 = scale * kLog2e;
  if (nsplit > 1) {
    const size_t bound = size_t(64) * size_t(2 * target) * (256 + 2);
    const size_t need = size_t(nsplit) * size_t(n * nh) * size_t(dv + 2);
    if (need > bound) return false;  // cannot happen under the split rule; kept as a guard
    float* ws = split_workspace(dev, bound);
    if (!ws) return false;
    p.op = ws;
    p.ml = ws + size_t(nsplit) * size_t(n * nh) * size_t(dv);
  }

  const size_t smem = size_t(kBM + kBN) * size_t(dq + kPad) * 2 + size_t(kBN) * size_t(dv + kPad) * 2;
  switch (dv) {
    case 64: launch<64>(p, smem, stream); break;
    case 128: launch<128>(p, smem, stream); break;
    case 192: launch<192>(p, smem, stream); break;
    default: launch<256>(p, smem, stream); break;
  }
  if (nsplit > 1) {
    const int64_t rows = n * nh, total = rows * dv;
    const int threads = 256;
    flash_attn_combine<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(p.op, p.ml, o, rows,
                                                                                         int(dv), int(nsplit));
    check_cuda(cudaGetLastError(), "attention_flash");
  }
  return true;
}

}  // namespace hla::cuda
