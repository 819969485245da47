// Tensor-core causal softmax attention of one sequence (FlashAttention-2 form, bf16 operands).
//
// A block owns a tile of "rows" of one kv head: row r = i·group + g is query i of the g-th query
// head sharing that kv head (GQA heads are packed together, so a decode step of a group fills the
// tile's rows with one K/V read). One warp per 16 rows. It loops over 64-key tiles; S = Q·Kᵀ and
// O += P·V run on m16n8k16 bf16 tensor cores (operands through ldmatrix) with fp32 accumulators;
// the online softmax (running max and sum, rescaled accumulator) is fp32 in registers, in the
// log2 domain (exp2 of s·scale·log2 e). P is rounded to bf16 for the second product and the
// running sum adds the rounded values, so the normalisation matches the weights that were applied.
// Only tiles that cross the causal diagonal (or the end of the key range) are masked.
//
// Prefill (n·group ≥ 256 rows per kv head) with head dims 256/256, 128/128 or 192/128 runs
// flash_attn_wgmma (Hopper's warpgroup tensor cores fed by TMA copies; described at the kernel).
// Every other case runs one of two configurations of the mma.sync kernel:
//   prefill (n·group ≥ 256 rows per kv head): 128-row tiles (8 warps; two blocks per SM where
//     dv ≤ 128) so each K/V tile feeds twice the rows; K and V are first rounded to bf16 into a stream-ordered scratch buffer
//     (one cheap elementwise pass; every K/V row is then read by many row tiles at half the
//     bytes), and the kernel streams them with cp.async into double-buffered shared tiles, so the
//     next tile's copy overlaps the current tile's math;
//   decode (fewer rows): 64-row tiles (4 warps) reading the fp32 K/V directly and rounding them
//     on the way to shared memory: each key is read about once, so a conversion pass would only
//     add traffic.
// Q is always rounded to bf16 as it is loaded (once per block). Both head dims are template
// parameters (every supported pair is instantiated) so the loops unroll and the index math folds.
//
// Flash-decoding: where (row tiles × kv heads) leave the GPU short of blocks (decode, short
// chunks), the keys are split over blockIdx.z into ranges of whole tiles; each split writes its
// unnormalised accumulator and its (max, sum), and a combine kernel merges the splits in a fixed
// order. In the decode configuration the partials live in one per-device workspace sized for the
// worst case the split rule can produce (allocated at the first call that splits, never again:
// graph-capture safe after that); the workspace is one per device, used in stream order: two
// splitting calls running concurrently on different streams of one device would share it
// (callers keep attention on one stream per device). The prefill configuration's partials share
// its stream-ordered scratch (cudaMallocAsync/cudaFreeAsync on the caller's stream, which stream
// capture records as graph memory nodes). No atomics anywhere: results are bitwise reproducible.
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
#include "backends/cuda/tma.cuh"
#include "backends/cuda/wgmma.cuh"

namespace hla::cuda {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kBN = 64, kPad = 8;  // keys per tile; row padding (16 B) keeps ldmatrix conflict-free
constexpr float kLog2e = 1.4426950408889634f;

// The two configurations (see the top of the file). kPrefill: 8 warps, bf16 K/V via cp.async,
// two K/V stages; otherwise 4 warps, fp32 K/V rounded on load, one stage.
template <bool kPrefill>
struct Cfg {
  static constexpr int warps = kPrefill ? 8 : 4, threads = 32 * warps, bm = 16 * warps, stages = kPrefill ? 2 : 1;
  static size_t smem(int64_t dq, int64_t dv) {
    return (size_t(bm) * size_t(dq + kPad) + size_t(stages) * kBN * size_t(dq + dv + 2 * kPad)) * sizeof(bf16);
  }
};
constexpr int kPrefillMinRows = 2 * Cfg<true>::bm;  // rows per kv head from which prefill pays off

struct FlashParams {
  const float* q;
  const float* k;   // fp32 K/V (decode configuration)
  const float* v;
  const bf16* kb;   // bf16 copies of K/V (prefill configuration)
  const bf16* vb;
  float* o;    // final output (nsplit == 1)
  float* op;   // partial accumulators [nsplit][n][nh][dv] (nsplit > 1)
  float* ml;   // partial (max, sum) [nsplit][n][nh][2]
  int n, S, nh, nkv, group, R;  // R = n·group rows per kv head
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
template <int kThreads, class RowPtr>
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

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// kBN rows x kCols bf16 (global row pitch gld elements) -> shared tile at byte address s with
// pitch kCols + kPad, asynchronously; rows >= valid are zero-filled (src-size 0 reads nothing), so
// padded keys contribute exact zeros to P·V.
template <int kThreads, int kCols>
__device__ __forceinline__ void cp_tile_async(uint32_t s, int valid, const bf16* g, int64_t gld) {
  constexpr int per_row = kCols / 8, total = kBN * per_row;
#pragma unroll
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int r = idx / per_row, c = (idx - r * per_row) * 8;
    const bool ok = r < valid;
    cp_async16(s + uint32_t(r * (kCols + kPad) + c) * 2u, ok ? g + r * gld + c : g, ok ? 16 : 0);
  }
}

// 2^x on the SFU alone (exp2f adds a denormal-range fix-up): results below 2^-126 flush to 0,
// far under what a bf16-rounded weight or the fp32 running sum can register.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The online-softmax step of one BN-key tile for a thread's two rows h = 0, 1 (rows rq and
// rq + 8 of its warp's 16; pos[h] their positions, -1 past the tile's rows), in two halves so that
// a caller can run the first while the tensor cores still read pa and write acc (flash_attn_wgmma).
// softmax_scores: raw scores s (the mma C layout: s[t][e] is key ks + 8t + 2·qq + (e & 1) of row
// e >> 1) become 2^(s·scale_log2 − new max) in place; the running max m moves on and alpha[h] is
// the factor for what was accumulated before. `masked`: some key of the tile may lie past a row's
// position or the key range end ke.
template <int BN>
__device__ __forceinline__ void softmax_scores(float (&s)[BN / 8][4], float (&m)[2], float (&alpha)[2],
                                               const int (&pos)[2], int ks, int ke, bool masked, float scale_log2,
                                               int qq) {
  float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int t = 0; t < BN / 8; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = ks + 8 * t + 2 * qq + (e & 1), h = e >> 1;
      const float x = (!masked || (j <= pos[h] && j < ke)) ? s[t][e] * scale_log2 : -INFINITY;
      s[t][e] = x;
      tmax[h] = fmaxf(tmax[h], x);
    }
  float mu[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
    tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
    const float mn = fmaxf(m[h], tmax[h]);
    mu[h] = mn == -INFINITY ? 0.f : mn;  // a row with nothing visible yet: keep everything at 0
    alpha[h] = exp2_ftz(m[h] - mu[h]);
    m[h] = mn;
  }
#pragma unroll
  for (int t = 0; t < BN / 8; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[t][e] = exp2_ftz(s[t][e] - mu[e >> 1]);
}
// softmax_weights: the weights rounded to bf16 into pa (the A fragments of P·V), the running sum l
// moved on by their rounded values (so the normalisation matches the weights applied), and acc
// rescaled by alpha. Once a row's max has settled, alpha is exactly 1 and the 4·DV/8 products are
// skipped (multiplying by 1 changes nothing).
template <int BN, int DV>
__device__ __forceinline__ void softmax_weights(const float (&s)[BN / 8][4], uint32_t (&pa)[BN / 8][2],
                                                float (&acc)[DV / 8][4], float (&l)[2], const float (&alpha)[2]) {
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int t = 0; t < BN / 8; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      __nv_bfloat162 pv = __floats2bfloat162_rn(s[t][2 * h], s[t][2 * h + 1]);
      pa[t][h] = reinterpret_cast<uint32_t&>(pv);
      rs[h] += __low2float(pv) + __high2float(pv);
    }
#pragma unroll
  for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + rs[h];
  if (alpha[0] != 1.f || alpha[1] != 1.f)
#pragma unroll
    for (int t = 0; t < DV / 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] *= alpha[e >> 1];
}
// Both halves in one step.
template <int BN, int DV>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 8][4], uint32_t (&pa)[BN / 8][2], float (&acc)[DV / 8][4],
                                             float (&m)[2], float (&l)[2], const int (&pos)[2], int ks, int ke,
                                             bool masked, float scale_log2, int qq) {
  float alpha[2];
  softmax_scores<BN>(s, m, alpha, pos, ks, ke, masked, scale_log2, qq);
  softmax_weights<BN, DV>(s, pa, acc, l, alpha);
}

// Block (x, kv head y, key split z) of the row-tile grid, bm rows a tile: tile rows [r0, r0 + rows)
// (row r = query·group + head in the group; the heaviest, latest tiles first) and the key range
// [ks0, ke) (the split's keys, up to its last row's position). Positions grow with the row.
struct RowBlock {
  int kvh, z, r0, rows, ks0, ke;
  int base_pos, group, nh;
  __device__ RowBlock(const FlashParams& p, int bm)
      : kvh(blockIdx.y), z(blockIdx.z), base_pos(p.S - p.n), group(p.group), nh(p.nh) {
    r0 = (p.row_tiles - 1 - int(blockIdx.x)) * bm;
    rows = min(bm, p.R - r0);
    ks0 = z * p.tiles_per_split * kBN;
    ke = min(min(ks0 + p.tiles_per_split * kBN, p.S), pos(rows - 1) + 1);
  }
  __device__ int pos(int lr) const { return base_pos + (r0 + lr) / group; }  // of tile row lr
  // The q / o row (query·nh + head) of tile row lr.
  __device__ int64_t head_row(int lr) const {
    const int gr = r0 + lr, i = gr / group;
    return int64_t(i) * nh + int64_t(kvh) * group + (gr - i * group);
  }
  // A thread's rows lr0 and lr0 + 8: their positions, -1 past the tile's rows.
  __device__ void thread_pos(int lr0, int (&out)[2]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) out[h] = lr0 + 8 * h < rows ? pos(lr0 + 8 * h) : -1;
  }
  // The last position of the n tile rows from lr0 (a warp's 16, a warpgroup's 64), -1 if none is valid.
  __device__ int last_pos(int lr0, int n) const {
    const int k = min(n, rows - lr0);
    return k > 0 ? pos(lr0 + k - 1) : -1;
  }
};

// Writes a thread's two rows (tile rows lr0 and lr0 + 8; acc[t][e] is column 8t + 2·qq + (e & 1)
// of row e >> 1): normalised into o, or (splits) the unnormalised accumulator and (m, l) into
// the partials of split z.
template <int DV>
__device__ __forceinline__ void store_rows(const FlashParams& p, const RowBlock& b, const float (&acc)[DV / 8][4],
                                           const float (&m)[2], float (&l)[2], int lr0, int qq) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = lr0 + 8 * h;
    if (lr >= b.rows) continue;
    const int64_t row = b.head_row(lr);
    if (p.nsplit == 1) {
      const float inv = 1.f / l[h];
      float* out = p.o + row * DV + 2 * qq;
#pragma unroll
      for (int t = 0; t < DV / 8; ++t)
        *reinterpret_cast<float2*>(out + 8 * t) = make_float2(acc[t][2 * h] * inv, acc[t][2 * h + 1] * inv);
    } else {
      const int64_t prow = int64_t(b.z) * p.n * p.nh + row;
      float* out = p.op + prow * DV + 2 * qq;
#pragma unroll
      for (int t = 0; t < DV / 8; ++t)
        *reinterpret_cast<float2*>(out + 8 * t) = make_float2(acc[t][2 * h], acc[t][2 * h + 1]);
      if (qq == 0) *reinterpret_cast<float2*>(p.ml + prow * 2) = make_float2(m[h], l[h]);
    }
  }
}

// Prefill with dv ≤ 128 asks for two resident blocks per SM (≤ 128 registers a thread), so one
// block's barrier waits and softmax overlap the other's tensor-core work (H200, nh 32/8, d 128,
// 8K: 160 → 188 TFLOP/s; 32 rows a warp in 4-warp blocks, reusing each K/V fragment twice, measured
// slower than this). dv > 128 keeps 128 accumulators a thread and one block per SM.
template <int DQ, int DV, bool kPrefill>
__global__ void __launch_bounds__(Cfg<kPrefill>::threads, kPrefill && DV <= 128 ? 2 : 1) flash_attn_fwd(FlashParams p) {
  using C = Cfg<kPrefill>;
  constexpr int kThreads = C::threads, kBM = C::bm;
  constexpr int ldq = DQ + kPad, ldv = DV + kPad;
  constexpr int stage = kBN * (ldq + ldv);  // elements per K/V stage: K tile, then V tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* const kv_smem = Qs + kBM * ldq;
  const uint32_t kv_addr = smem_addr(kv_smem);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rq = lane >> 2, qq = lane & 3;
  const RowBlock blk(p, kBM);
  const int kvh = blk.kvh, rows_valid = blk.rows, ks0 = blk.ks0, ke = blk.ke;

  // Prefill: start the first K/V tile's copy before the (synchronous) Q conversion.
  auto issue_kv = [&](int b, int ks) {
    const uint32_t ks_addr = kv_addr + uint32_t(b * stage) * 2u;
    const int valid = min(kBN, ke - ks);
    const int64_t row = int64_t(ks) * p.nkv + kvh;
    cp_tile_async<kThreads, DQ>(ks_addr, valid, p.kb + row * DQ, int64_t(p.nkv) * DQ);
    cp_tile_async<kThreads, DV>(ks_addr + kBN * ldq * 2u, valid, p.vb + row * DV, int64_t(p.nkv) * DV);
  };
  if constexpr (kPrefill) {
    if (ks0 < ke) {
      issue_kv(0, ks0);
      cp_async_commit();
    }
  }

  // Q tile (rows packed as query·group + head-in-group).
  load_tile_bf16<kThreads>(Qs, ldq, kBM, DQ, rows_valid, [&](int r) { return p.q + blk.head_row(r) * DQ; });

  const int wr0 = warp * 16;
  int pos[2];
  blk.thread_pos(wr0 + rq, pos);
  // The warp's first row sees the fewest keys and its last the most.
  const int warp_minpos = blk.pos(wr0), warp_maxpos = blk.last_pos(wr0, 16);

  // ldmatrix row addresses (lane l names row l%8 of 8x8 matrix l/8). Q as A: matrices (rows 0-7 |
  // 8-15) x (k 0-7 | 8-15), row-block first. K as B (keys are B's columns, stored k-contiguous):
  // matrices (keys 0-7 | 8-15) x (k 0-7 | 8-15), k-block first, so regs {0,1} and {2,3} are the B
  // fragments of two adjacent 8-key n-tiles. V as B via .trans: (keys 0-7 | 8-15) x (cols 0-7 | 8-15).
  const uint32_t qa = smem_addr(Qs + (wr0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldq + (lane >> 4) * 8);
  const uint32_t k_off = uint32_t(((lane & 7) + (lane >> 4) * 8) * ldq + ((lane >> 3) & 1) * 8) * 2u;
  const uint32_t v_off = uint32_t(kBN * ldq + ((lane & 7) + ((lane >> 3) & 1) * 8) * ldv + (lane >> 4) * 8) * 2u;

  float acc[DV / 8][4];
#pragma unroll
  for (int t = 0; t < DV / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  int buf = 0;
  for (int ks = ks0; ks < ke; ks += kBN) {
    const uint32_t ks_addr = kv_addr + uint32_t(buf * stage) * 2u;  // this tile's K (V follows it)
    if constexpr (kPrefill) {
      // One barrier per tile: past it, every thread's copies of this tile (and, first time, Q's
      // stores) are visible, and every warp is done with the other stage (the previous tile), so
      // the next tile's copy can start there and overlap this tile's math.
      cp_async_wait<0>();
      __syncthreads();
      if (ks + kBN < ke) {
        issue_kv(buf ^ 1, ks + kBN);
        cp_async_commit();
      }
    } else {
      __syncthreads();  // previous tile consumed (first pass: nothing to wait for but Q's stores)
      const int kv_valid = min(kBN, ke - ks);
      load_tile_bf16<kThreads>(kv_smem, ldq, kBN, DQ, kv_valid,
                               [&](int r) { return p.k + (int64_t(ks + r) * p.nkv + kvh) * DQ; });
      load_tile_bf16<kThreads>(kv_smem + kBN * ldq, ldv, kBN, DV, kv_valid,
                               [&](int r) { return p.v + (int64_t(ks + r) * p.nkv + kvh) * DV; });
      __syncthreads();
    }

    if (ks <= warp_maxpos) {  // warp-uniform: otherwise every key of the tile is in this warp's future
      float s[kBN / 8][4];
#pragma unroll
      for (int t = 0; t < kBN / 8; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < DQ; k0 += 16) {
        uint32_t a[4];
        ldmatrix_x4(a, qa + k0 * 2);
#pragma unroll
        for (int j = 0; j < kBN / 16; ++j) {
          uint32_t b[4];
          ldmatrix_x4(b, ks_addr + k_off + uint32_t(j * 16 * ldq + k0) * 2u);
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_bf16(s[2 * j], a, b0);
          mma_bf16(s[2 * j + 1], a, b1);
        }
      }

      // Only a tile reaching past the warp's first row's position, or past the key range, needs
      // the causal/range mask; the others are fully visible to every row of the warp.
      uint32_t pa[kBN / 8][2];
      softmax_tile<kBN, DV>(s, pa, acc, m, l, pos, ks, ke, ks + kBN > min(ke, warp_minpos + 1), p.scale_log2, qq);

      // O += P·V: P's accumulator fragments are the A fragments; V's B fragments via ldmatrix.trans.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        const uint32_t a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
        const uint32_t vb = ks_addr + v_off + uint32_t(kk * 16 * ldv) * 2u;
#pragma unroll
        for (int n2 = 0; n2 < DV / 16; ++n2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vb + n2 * 32);
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_bf16(acc[2 * n2], a, b0);
          mma_bf16(acc[2 * n2 + 1], a, b1);
        }
      }
    }
    if constexpr (kPrefill) buf ^= 1;
  }

  store_rows<DV>(p, blk, acc, m, l, wr0 + rq, qq);
}

// Prefill on the warpgroup tensor cores (wgmma.cuh) fed by the copy engine (tma.cuh), for
// dq ∈ {128, 192, 256} and dv ∈ {128, 256} (the mma.sync kernel above ran the 6 attention layers of the 2B
// Qwen3.5-shaped model at 8K tokens in 14.1 ms on an H200). Three warpgroups per 128-row tile: the
// first (registers cut to 40) has one thread copy each BN-key tile's K [BN x DQ] and Vᵀ [DV x BN]
// boxes into a two-stage ring; the other two own rows [0, 64) and [64, 128), load their Q rows
// (rounded to bf16) into swizzled shared memory once, and per tile run S = Q·Kᵀ (m64nBN, Q and K
// from shared memory), the online softmax in registers (softmax_tile: the wgmma accumulator
// layout is mma.sync's, per warp), then O += P·V with P straight from registers as the A operand
// and Vᵀ from shared memory (m64nDV). K and V come from a bf16 copy made by k_heads_bf16 and
// v_transpose_bf16: K as [nkv][S][DQ] and V transposed, [nkv][DV][Sp] (Sp = S rounded up to 8,
// zeros past S), so both products read K-major tiles. Keys past S of one head read the next
// head's (masked, finite). Consumers in lockstep measured faster than ping-pong ones (named
// barriers taking turns at S = Q·Kᵀ: d = 256 at 8K 442 → 381 TFLOP/s). Within a warpgroup the
// products overlap the softmax (FlashAttention-3's intra-warpgroup pipelining): tile t's S = Q·Kᵀ
// and tile t−1's O += P·V are issued together, the softmax of tile t runs while P·V still does,
// and acc is rescaled only after it completes. K and Vᵀ therefore have rings of their own (a
// tile's K is released after its S, its Vᵀ one tile later, after its P·V), so each copy still
// has a tile's time in flight with two stages.
template <int DQ, int DV>
struct WgAttn {
  // Keys per tile: 128 where the ring fits (dq ≤ 192), so each tile's fixed costs (barrier waits,
  // product drains, the row max exchange) cover twice the tensor-core work; 64 at dq = 256.
  static constexpr int BM = 128, BN = DQ <= 192 ? 128 : 64, threads = 384, stages = 2;
  static constexpr int kQBytes = BM * DQ * 2, kKBytes = BN * DQ * 2, kStageBytes = kKBytes + DV * BN * 2;
  static constexpr int kQBox = BM * kSwizzleRowBytes, kKBox = BN * kSwizzleRowBytes;  // one 64-column box
  static constexpr int kVBox = DV * kSwizzleRowBytes;                                 // Vᵀ: 64 keys
  static constexpr size_t smem = size_t(kQBytes) + stages * size_t(kStageBytes) + kSwizzleGroupBytes;
  static_assert(BM == Cfg<true>::bm, "row tiles as the mma.sync prefill's");
};

template <int DQ, int DV>
__global__ void __launch_bounds__(WgAttn<DQ, DV>::threads, 1)
    flash_attn_wgmma(const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map,
                     FlashParams p) {
  using C = WgAttn<DQ, DV>;
  constexpr int BN = C::BN;
  __shared__ uint64_t k_full[C::stages], k_empty[C::stages], v_full[C::stages], v_empty[C::stages];
  extern __shared__ unsigned char smem_raw[];
  unsigned char* qs_p = swizzle_aligned(smem_raw);  // Q, then the K/V ring
  const uint32_t qs = smem_addr(qs_p), ring = qs + C::kQBytes;
  if (threadIdx.x == 0) ring_barriers_init(k_full, k_empty, 2), ring_barriers_init(v_full, v_empty, 2);
  __syncthreads();

  const RowBlock blk(p, C::BM);
  const int kvh = blk.kvh, ks0 = blk.ks0, ke = blk.ke;
  const int ntiles = ks0 < ke ? (ke - ks0 + BN - 1) / BN : 0;
  const int wg = threadIdx.x >> 7;
  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x != 0) return;
    for (int t = 0; t < ntiles; ++t) {
      const int s = t % C::stages, ks = ks0 + t * BN, phase = (t / C::stages - 1) & 1;
      unsigned char* k = qs_p + C::kQBytes + s * C::kStageBytes;
      if (t >= C::stages) mbarrier_wait(&k_empty[s], phase);
      mbarrier_expect(&k_full[s], C::kKBytes);
#pragma unroll
      for (int j = 0; j < DQ / 64; ++j) tma_load_2d(k + j * C::kKBox, k_map, 64 * j, kvh * p.S + ks, &k_full[s]);
      if (t >= C::stages) mbarrier_wait(&v_empty[s], phase);
      mbarrier_expect(&v_full[s], C::kStageBytes - C::kKBytes);
#pragma unroll
      for (int j = 0; j < BN / 64; ++j)
        tma_load_2d(k + C::kKBytes + j * C::kVBox, v_map, ks + 64 * j, kvh * DV, &v_full[s]);
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int c = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, rq = lane >> 2, qq = lane & 3;

  // This warpgroup's 64 Q rows (packed as query·group + head-in-group), bf16, swizzled: 64-column
  // box j holds columns [64j, 64j + 64) of all 128 rows.
  for (int idx = threadIdx.x & 127; idx < 64 * (DQ / 8); idx += 128) {
    const int r = c * 64 + idx / (DQ / 8), ch = idx % (DQ / 8);
    uint4 w = make_uint4(0, 0, 0, 0);
    if (r < blk.rows) {
      const float* src = p.q + blk.head_row(r) * DQ + 8 * ch;
      const float4 a = __ldg(reinterpret_cast<const float4*>(src)), b = __ldg(reinterpret_cast<const float4*>(src + 4));
      w = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
    }
    *reinterpret_cast<uint4*>(qs_p + (ch / 8) * C::kQBox + swizzled_chunk(r, ch % 8)) = w;
  }
  fence_async_shared();
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + c));  // this warpgroup's Q rows are in

  const int wr0 = c * 64 + warp * 16;
  int pos[2];
  blk.thread_pos(wr0 + rq, pos);
  const int wg_minpos = blk.pos(c * 64), wg_maxpos = blk.last_pos(c * 64, 64);
  // Tiles from `active` on lie wholly in this warpgroup's future: only released.
  const int active = ks0 <= wg_maxpos ? min(ntiles, (wg_maxpos - ks0) / BN + 1) : 0;
  auto release = [&](uint64_t* bar) {
    if ((threadIdx.x & 127) == 0) mbarrier_arrive(bar);
  };

  float acc[DV / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2];
  uint32_t pa[BN / 8][2];
  // O += P·V of tile t (its Vᵀ stage has arrived): P straight from registers as the A operand.
  auto issue_pv = [&](int t) {
    const uint32_t vt = ring + (t % C::stages) * C::kStageBytes + C::kKBytes;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {  // 16 keys: box kk / 4, 32 bytes in per step
      const uint32_t a[4] = {pa[2 * kk][0], pa[2 * kk][1], pa[2 * kk + 1][0], pa[2 * kk + 1][1]};
      const uint64_t db = wgmma_desc(vt + (kk / 4) * C::kVBox + (kk % 4) * 32);
      if constexpr (DV == 256)
        wgmma_m64n256k16_bf16_rs(reinterpret_cast<float(&)[DV / 2]>(acc), a, db);
      else
        wgmma_m64n128k16_bf16_rs(reinterpret_cast<float(&)[DV / 2]>(acc), a, db);
    }
    wgmma_commit();
  };
  // S = Q·Kᵀ of tile t into sc, issued and committed.
  auto issue_s = [&](float(&sc)[BN / 8][4], int t) {
    const uint32_t k = ring + (t % C::stages) * C::kStageBytes;
#pragma unroll
    for (int kk = 0; kk < DQ / 16; ++kk) {
      const uint32_t col = (kk % 4) * 32;  // 16 columns = 32 bytes into a swizzled row
      const uint64_t da = wgmma_desc(qs + (kk / 4) * C::kQBox + c * 64 * kSwizzleRowBytes + col);
      const uint64_t db = wgmma_desc(k + (kk / 4) * C::kKBox + col);
      if constexpr (BN == 128)
        wgmma_m64n128k16_bf16(reinterpret_cast<float(&)[BN / 2]>(sc), da, db);
      else
        wgmma_m64n64k16_bf16(reinterpret_cast<float(&)[BN / 2]>(sc), da, db);
    }
    wgmma_commit();
  };
  auto wait_k = [&](int t) { mbarrier_wait(&k_full[t % C::stages], (t / C::stages) & 1); };
  auto wait_v = [&](int t) { mbarrier_wait(&v_full[t % C::stages], (t / C::stages) & 1); };
  auto masked = [&](int ks) { return ks + BN > min(ke, wg_minpos + 1); };
  if (active > 0) {
    wait_k(0);
    float sc[BN / 8][4] = {};
    wgmma_fence();
    issue_s(sc, 0);
    wgmma_wait<0>();
    wgmma_hold(reinterpret_cast<float(&)[BN / 2]>(sc));
    release(&k_empty[0]);
    softmax_scores<BN>(sc, m, alpha, pos, ks0, ke, masked(ks0), p.scale_log2, qq);
    softmax_weights<BN, DV>(sc, pa, acc, l, alpha);
  }
  // Waits, copy releases and divergent code stay outside the spans where products are in flight
  // (ptxas would serialise the products otherwise).
  for (int t = 1; t < active; ++t) {
    const int ks = ks0 + t * BN;
    wait_k(t);
    wait_v(t - 1);
    float sc[BN / 8][4] = {};
    wgmma_fence();  // acc was rescaled and pa rewritten by the previous step
    issue_s(sc, t);
    issue_pv(t - 1);
    wgmma_wait<1>();  // S of tile t is in; P·V of tile t − 1 may still run
    wgmma_hold(reinterpret_cast<float(&)[BN / 2]>(sc));
    softmax_scores<BN>(sc, m, alpha, pos, ks, ke, masked(ks), p.scale_log2, qq);
    wgmma_wait<0>();
    wgmma_hold(reinterpret_cast<float(&)[DV / 2]>(acc));
    release(&k_empty[t % C::stages]);
    release(&v_empty[(t - 1) % C::stages]);
    softmax_weights<BN, DV>(sc, pa, acc, l, alpha);
  }
  if (active > 0) {
    wait_v(active - 1);
    wgmma_fence();
    issue_pv(active - 1);
    wgmma_wait<0>();
    wgmma_hold(reinterpret_cast<float(&)[DV / 2]>(acc));
    release(&v_empty[(active - 1) % C::stages]);
  }
  for (int t = active; t < ntiles; ++t) {  // keep the rings' phases: wait for each copy, then release it
    const int s = t % C::stages;
    mbarrier_wait(&k_full[s], (t / C::stages) & 1);
    release(&k_empty[s]);
    mbarrier_wait(&v_full[s], (t / C::stages) & 1);
    release(&v_empty[s]);
  }
  store_rows<DV>(p, blk, acc, m, l, wr0 + rq, qq);
}

// The bf16 K/V copies flash_attn_wgmma reads: kh [nkv][S][D] = K [S][nkv][D] regrouped by head
// (one thread per 4 values), and vt [nkv][D][Sp] = V transposed per head, zeros for keys S..Sp−1
// (32 x 32 tiles through shared memory, so reads run along D and writes along the keys).
__global__ void k_heads_bf16(const float4* __restrict__ k, uint2* __restrict__ kh, int64_t S, int nkv, int d4) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= S * nkv * d4) return;
  const int64_t s = i / (int64_t(nkv) * d4), rem = i - s * nkv * d4, h = rem / d4, c = rem - h * d4;
  const float4 f = k[i];
  kh[(h * S + s) * d4 + c] = make_uint2(pack_bf16(f.x, f.y), pack_bf16(f.z, f.w));
}
__global__ void v_transpose_bf16(const float* __restrict__ v, bf16* __restrict__ vt, int S, int Sp, int nkv, int D) {
  __shared__ float tile[32][33];
  const int s0 = blockIdx.x * 32, d0 = blockIdx.y * 32, h = blockIdx.z;
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {  // r: key, threadIdx.x: column
    const int s = s0 + r;
    tile[r][threadIdx.x] = s < S ? v[(int64_t(s) * nkv + h) * D + d0 + threadIdx.x] : 0.f;
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += blockDim.y) {  // r: column, threadIdx.x: key
    const int s = s0 + threadIdx.x;
    if (s < Sp) vt[(int64_t(h) * D + d0 + r) * Sp + s] = __float2bfloat16_rn(tile[threadIdx.x][r]);
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

// x (n4 float4s) -> bf16 with round-to-nearest-even, the rounding the decode configuration applies
// on load.
__global__ void round_to_bf16(const float4* __restrict__ x, uint2* __restrict__ y, int64_t n4) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 f = x[i];
    y[i] = make_uint2(pack_bf16(f.x, f.y), pack_bf16(f.z, f.w));
  }
}

constexpr int kMaxDevices = 64;

// Split-K workspace of the decode configuration: the split rule below (splits only while
// row_tiles·nkv < target, at most ceil(target / (row_tiles·nkv)) splits, n·nh ≤ 64·row_tiles·nkv)
// bounds nsplit·n·nh by 64·(2·target − 1) rows, each of dv + 2 ≤ 258 floats. Allocated once per
// device at the first call that splits.
float* split_workspace(int dev, size_t bound_floats) {
  static std::mutex mu;
  static float* ws[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= kMaxDevices) return nullptr;
  if (!ws[dev]) check_cuda(cudaMalloc(&ws[dev], bound_floats * sizeof(float)), "attention_flash: workspace");
  return ws[dev];
}

template <int DQ, int DV, bool kPrefill>
void launch(const FlashParams& p, cudaStream_t stream) {
  const auto kernel = flash_attn_fwd<DQ, DV, kPrefill>;
  const size_t smem = Cfg<kPrefill>::smem(DQ, DV);
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
             "attention_flash: smem attribute");
  const dim3 grid(unsigned(p.row_tiles), unsigned(p.nkv), unsigned(p.nsplit));
  kernel<<<grid, Cfg<kPrefill>::threads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "attention_flash");
}

// kh [nkv·S, DQ] and vt [nkv·DV, Sp] as flash_attn_wgmma reads them (k_heads_bf16, v_transpose_bf16).
template <int DQ, int DV>
void launch_wgmma(const bf16* kh, const bf16* vt, int64_t Sp, const FlashParams& p, cudaStream_t stream) {
  using C = WgAttn<DQ, DV>;
  const auto kernel = flash_attn_wgmma<DQ, DV>;
  static const bool ready = [&] {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem)),
               "attention_flash: smem attribute");
    return true;
  }();
  (void)ready;
  const CUtensorMap k_map = tensor_map_bf16(kh, int64_t(p.nkv) * p.S, DQ, C::BN);
  const CUtensorMap v_map = tensor_map_bf16(vt, int64_t(p.nkv) * DV, Sp, DV);
  const dim3 grid(unsigned(p.row_tiles), unsigned(p.nkv), unsigned(p.nsplit));
  kernel<<<grid, C::threads, C::smem, stream>>>(k_map, v_map, p);
  check_cuda(cudaGetLastError(), "attention_flash");
}

// Both head dims are compile-time: the Q·Kᵀ loop unrolls and the tile copies' index math folds.
template <int DQ, bool kPrefill>
void launch_dv(const FlashParams& p, int64_t dv, cudaStream_t stream) {
  switch (dv) {
    case 64: launch<DQ, 64, kPrefill>(p, stream); break;
    case 128: launch<DQ, 128, kPrefill>(p, stream); break;
    case 192: launch<DQ, 192, kPrefill>(p, stream); break;
    default: launch<DQ, 256, kPrefill>(p, stream); break;
  }
}

template <bool kPrefill>
void launch_dims(const FlashParams& p, int64_t dq, int64_t dv, cudaStream_t stream) {
  switch (dq) {
    case 64: launch_dv<64, kPrefill>(p, dv, stream); break;
    case 128: launch_dv<128, kPrefill>(p, dv, stream); break;
    case 192: launch_dv<192, kPrefill>(p, dv, stream); break;
    default: launch_dv<256, kPrefill>(p, dv, stream); break;
  }
}

void launch_round_to_bf16(const float* x, bf16* y, size_t count, cudaStream_t stream) {
  const int64_t n4 = int64_t(count / 4), threads = 256;
  const unsigned blocks = unsigned(std::min<int64_t>((n4 + threads - 1) / threads, 8192));
  round_to_bf16<<<blocks, threads, 0, stream>>>(reinterpret_cast<const float4*>(x), reinterpret_cast<uint2*>(y), n4);
  check_cuda(cudaGetLastError(), "attention_flash: round K/V");
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
  const bool prefill = R >= kPrefillMinRows;
  const int64_t bm = prefill ? Cfg<true>::bm : Cfg<false>::bm;
  const int64_t row_tiles = (R + bm - 1) / bm, ntiles = (S + kBN - 1) / kBN;
  const int64_t base = row_tiles * nkv, target = 2 * int64_t(sm_count(dev));
  int64_t nsplit = 1, tps = ntiles;
  if (base < target && ntiles > 1) {
    nsplit = std::min<int64_t>((target + base - 1) / base, ntiles);
    tps = (ntiles + nsplit - 1) / nsplit;
    nsplit = (ntiles + tps - 1) / tps;
  }

  FlashParams p{};
  p.q = q, p.k = k, p.v = v, p.o = o;
  p.n = int(n), p.S = int(S), p.nh = int(nh), p.nkv = int(nkv), p.group = int(group);
  p.R = int(R), p.row_tiles = int(row_tiles), p.tiles_per_split = int(tps), p.nsplit = int(nsplit);
  p.scale_log2 = scale * kLog2e;
  void* scratch = nullptr;
  // The wgmma kernel's head dims: Qwen3.5 / Qwen3-Next (256), MLA's prefill form (192 / 128), 128.
  const bool wgmma = prefill && ((dq == dv && (dq == 128 || dq == 256)) || (dq == 192 && dv == 128));
  if (prefill) {
    // bf16 K, then bf16 V, then (when splitting) the fp32 partials; every part starts 16-byte
    // aligned. The wgmma kernel reads K grouped by head and V transposed, its key rows padded to
    // Sp, a multiple of 8 keys (the copy engine's 16-byte row pitch); the mma.sync kernel reads
    // them in their own layout.
    const int64_t Sp = wgmma ? (S + 7) / 8 * 8 : S;
    const size_t nk = size_t(S * nkv * dq), nv = size_t(Sp * nkv * dv);
    const size_t parts = nsplit > 1 ? size_t(nsplit) * size_t(n * nh) * size_t(dv + 2) : 0;
    check_cuda(cudaMallocAsync(&scratch, (nk + nv) * sizeof(bf16) + parts * sizeof(float), stream),
               "attention_flash: scratch");
    bf16* kb = static_cast<bf16*>(scratch);
    bf16* vb = kb + nk;
    if (nsplit > 1) {
      p.op = reinterpret_cast<float*>(vb + nv);
      p.ml = p.op + size_t(nsplit) * size_t(n * nh) * size_t(dv);
    }
    if (wgmma) {
      const int64_t k4 = int64_t(nk / 4);
      k_heads_bf16<<<unsigned((k4 + 255) / 256), 256, 0, stream>>>(
          reinterpret_cast<const float4*>(k), reinterpret_cast<uint2*>(kb), S, int(nkv), int(dq / 4));
      v_transpose_bf16<<<dim3(unsigned((Sp + 31) / 32), unsigned(dv / 32), unsigned(nkv)), dim3(32, 8), 0, stream>>>(
          v, vb, int(S), int(Sp), int(nkv), int(dv));
      check_cuda(cudaGetLastError(), "attention_flash: K/V by head");
      if (dq == 256)
        launch_wgmma<256, 256>(kb, vb, Sp, p, stream);
      else if (dq == 192)
        launch_wgmma<192, 128>(kb, vb, Sp, p, stream);
      else
        launch_wgmma<128, 128>(kb, vb, Sp, p, stream);
    } else {
      launch_round_to_bf16(k, kb, nk, stream);
      launch_round_to_bf16(v, vb, nv, stream);
      p.kb = kb, p.vb = vb;
      launch_dims<true>(p, dq, dv, stream);
    }
  } else if (nsplit > 1) {
    const size_t bound = size_t(Cfg<false>::bm) * size_t(2 * target) * (256 + 2);
    const size_t need = size_t(nsplit) * size_t(n * nh) * size_t(dv + 2);
    if (need > bound) return false;  // cannot happen under the split rule; kept as a guard
    float* ws = split_workspace(dev, bound);
    if (!ws) return false;
    p.op = ws;
    p.ml = ws + size_t(nsplit) * size_t(n * nh) * size_t(dv);
  }

  if (!prefill) launch_dims<false>(p, dq, dv, stream);
  if (nsplit > 1) {
    const int64_t rows = n * nh, total = rows * dv;
    const int threads = 256;
    flash_attn_combine<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(p.op, p.ml, o, rows,
                                                                                         int(dv), int(nsplit));
    check_cuda(cudaGetLastError(), "attention_flash");
  }
  if (scratch) check_cuda(cudaFreeAsync(scratch, stream), "attention_flash: scratch");
  return true;
}

}  // namespace hla::cuda
