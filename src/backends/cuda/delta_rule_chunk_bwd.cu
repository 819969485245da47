// Chunked backward of the delta rule on CUDA (DeltaChunkBackward, see delta_rule_cuda.h), the
// staging of the CPU backward (backends/cpu/delta_rule_chunk.cpp) on the GPU.
//
// Per chunk (rows i, j < 64 of one value head) with S the state entering it, G the chunk-local
// gate cumsum, s the scale, the forward computed (fp32 recompute, DeltaChunkPlan::record):
//   Mkk = K K^T ⊙ decay (strict),  T = (I + diag(β) Mkk)^{-1},  W = T diag(β) (K ⊙ e^G),
//   U = T diag(β) V,  Vn = U − W S,  P = s Q K^T ⊙ decay (causal),
//   O = s (Q ⊙ e^G) S + P Vn,      S' = diag(e^{G_last}) S + (K ⊙ e^{G_last−G})^T Vn.
// The backward, given dO and dS' (the gradient of the state leaving the chunk):
//   dstate (reverse over chunks, per V-tile):  dVn = P^T dO + Kr dS';
//                                              dS = e^{G_last} dS' + s (Q⊙e^G)^T dO − W^T dVn
//   state terms (per chunk):  dq  = s (dO S^T) ⊙ e^G;  dW = −dVn S^T;  dk = (Vn dS'^T) ⊙ e^{G_last−G};
//                             dG_last += e^{G_last} Σ_v dS' ⊙ S
//   intra-chunk (per chunk):  dBk = T^T dW, dBv = T^T dVn (dv = β dBv, dk += β dBk ⊙ e^G);
//                             dT = dW (K⊙e^G)^T diag(β) + dVn V^T diag(β);  dL = −T^T dT T^T (strict);
//                             dMkk = β dL;  dMq = s dO Vn^T (causal); then the Gram matrices' terms
//                             and dg = reverse cumsum of the per-row gate terms + the Kr terms.
// Every matmul runs on tensor cores over fp32 shared-memory tiles, in 3xTF32 (mma.cuh's float
// path) for fp32 and fp16 inputs and in single tf32 products for bf16 ones (Mma), 16x16 output
// tiles spread over the warps. Row reductions (dbeta, GDN's dg) go through
// fixed shuffle trees and fixed-order sums; per-element accumulators (dq, dk and the gate terms,
// fp32 [T,HV,K] in global memory) are read-modify-written by exactly one thread per phase. No
// atomics: two runs are bitwise equal.
#include <algorithm>
#include <string>

#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/delta_rule_inputs.h"
#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/mma.cuh"
#include "core/error.h"

namespace hla::cuda {
namespace {

constexpr int C = 64;         // chunk length (the forward's)
constexpr int kLdM = C + 4;   // fp32 64x64 tiles
constexpr int kNP = 20;       // dbeta partial sums per row: K/16 + V/16 + 64/16 ≤ 8 + 8 + 4
constexpr int kThreads = 256; // per-chunk kernels: 8 warps

using VK = View<float, true>;   // M(x, k) = p[x·ld + k]
using VT = View<float, false>;  // M(x, k) = p[k·ld + x]

struct BwdArgs {
  // Recorded by the fp32 forward (DeltaChunkPlan::Saved) plus T and Mkk.
  const int2* chunk_tab;
  const int *cu, *chunk_off;
  const float *Gc, *W, *P, *kg, *qg, *h, *vn, *Tm, *Mkk;
  // Inputs, fp32: q, k [T,H,K]; v, dout [T,HV,V]; beta [T,HV]; dht [N,HV,K,V] or nullptr.
  const float *q, *k, *v, *dout, *beta, *dht;
  float scale;
  int H, HV, V, group;
  // Scratch: dh [chunks,HV,K,V] (gradient of the state leaving each chunk), dvn [T,HV,V],
  // dw, dge (per-element gate terms of G_i), pkr (per-element terms of Kr_i) [T,HV,K].
  float *dh, *dvn, *dw, *dge, *pkr;
  // Outputs: dqh, dkh [T,HV,K] per value head (the outputs themselves when HV == H), dv, dg, dbeta, dh0.
  float *dqh, *dkh, *dv, *dg, *dbeta, *dh0;
};

// A 16·M16 x 16·N16 output in 16x16 tiles over the block's warps: body(acc, m0, n0) accumulates
// the tile at (m0, n0) with warp_mma, epi(row, col, value) consumes its elements.
template <class Body, class Epi>
__device__ __forceinline__ void tiles(int M, int N, Body&& body, Epi&& epi) {
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, tn = N / 16;
  for (int t = warp; t < (M / 16) * tn; t += nw) {
    const int m0 = (t / tn) * 16, n0 = (t % tn) * 16;
    float acc[2][4] = {};
    body(acc, m0, n0);
    for_each_acc(acc, [&](int r, int c, float& x) { epi(m0 + r, n0 + c, x); });
  }
}

// Up to six values an epilogue reads from global memory for one element.
struct Loaded {
  float v[6];
};

// Same tiling, for epilogues that read-modify-write global memory (the per-element accumulators)
// or read gates from it: pre(row, col) returns what one element needs from global memory, then
// post(row, col, value, loaded) computes and stores. All loads of a lane's 8 elements are issued
// before any of its stores — a load after a store to a possibly aliasing address would wait for
// it, one L2 round trip per element instead of one per tile. post returns a term to sum along the
// row: with part != nullptr each tile's 16-column partial sums (a quad's lanes combined by a fixed
// shuffle tree) land in part[row·kNP + slot + n0/16]. With NA > 1 accumulators per tile (products
// that meet in one element's update), body gets acc[NA] and post the NA values x[NA].
template <int NA = 1, class Body, class Pre, class Post>
__device__ __forceinline__ void tiles_ld(int M, int N, float* part, int slot, Body&& body, Pre&& pre, Post&& post) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5, tn = N / 16;
  const int r = lane >> 2, q = lane & 3;  // for_each_acc's element map
  for (int t = warp; t < (M / 16) * tn; t += nw) {
    const int m0 = (t / tn) * 16, n0 = (t % tn) * 16;
    float acc[NA][2][4] = {};
    if constexpr (NA == 1)
      body(acc[0], m0, n0);
    else
      body(acc, m0, n0);
    Loaded ld[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ld[nt][e] = pre(m0 + r + (e >> 1) * 8, n0 + 8 * nt + 2 * q + (e & 1));
    float s0 = 0.f, s1 = 0.f;  // rows r and r + 8 of the tile
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = m0 + r + (e >> 1) * 8, col = n0 + 8 * nt + 2 * q + (e & 1);
        float x[NA];
#pragma unroll
        for (int k = 0; k < NA; ++k) x[k] = acc[k][nt][e];
        float y;
        if constexpr (NA == 1)
          y = post(row, col, x[0], ld[nt][e]);
        else
          y = post(row, col, x, ld[nt][e]);
        if (e < 2) s0 += y;
        else s1 += y;
      }
    if (part) {
      s0 += __shfl_xor_sync(~0u, s0, 1);
      s1 += __shfl_xor_sync(~0u, s1, 1);
      s0 += __shfl_xor_sync(~0u, s0, 2);
      s1 += __shfl_xor_sync(~0u, s1, 2);
      if (q == 0) {
        part[(m0 + r) * kNP + slot + n0 / 16] = s0;
        part[(m0 + r + 8) * kNP + slot + n0 / 16] = s1;
      }
    }
  }
}

// for (idx in [0, n) over the block's threads) use(idx, load(idx)), with kBatch of a thread's
// loads issued before any use: the element loops that read global rows (q, k and the gradient
// accumulators, mostly L2 hits) were one load latency per element (ncu: 38% of the intra kernel's
// stalls waited on L1TEX).
template <int kBatch, class Load, class Use>
__device__ __forceinline__ void batched_for(int n, Load&& load, Use&& use) {
  for (int base = threadIdx.x; base < n; base += kBatch * blockDim.x) {
    decltype(load(0)) x[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (base + u * int(blockDim.x) < n) x[u] = load(base + u * int(blockDim.x));
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (base + u * int(blockDim.x) < n) use(base + u * int(blockDim.x), x[u]);
  }
}

// Where a chunk is: its first token, length, and the (token, value head) row index.
struct ChunkPos {
  int t0, len, j, h;
  __device__ ChunkPos(const BwdArgs& a, int chunk, int jv) : j(jv), h(jv / a.group) {
    const int2 ct = a.chunk_tab[chunk];
    t0 = ct.x;
    len = min(C, a.cu[ct.y + 1] - t0);
  }
  __device__ size_t tok(const BwdArgs& a, int i) const { return size_t(t0 + i) * a.HV + j; }
  __device__ size_t qk(const BwdArgs& a, int i) const { return size_t(t0 + i) * a.H + h; }
};

// G_i[d] (GDN: G_i) for a row i < len.
template <bool KDA, int K>
__device__ __forceinline__ float gate(const BwdArgs& a, const ChunkPos& p, int i, int d) {
  return KDA ? a.Gc[p.tok(a, i) * K + d] : a.Gc[p.tok(a, i)];
}

// ---------------------------------------------------------------------------------------------
// dstate: one block per (sequence, value head, BV columns of V), walking the chunks last to first
// with dS [K x BV] in fp32 mma accumulators (warp w: rows 16·(w·MT + mt)). Per chunk it records dS
// (the gradient of the state leaving the chunk) and dVn, then steps dS back across the chunk.
// GDN's decays are per row, so they scale dO's rows and the rows of K dS' (64 x BV values a step)
// instead of Q's and K's rows (2 x 64 x K).
template <bool KDA, int K, int BV>
struct DStateSmem {
  static constexpr int kWarps = K / 16;  // one per 16 rows of dS: the chain of a step split K/16 ways
  static constexpr int kLdK = K + 4, kLdB = BV + 4;
  static constexpr size_t kBytes =
      sizeof(float) * (3 * C * kLdK + C * kLdM + 2 * C * kLdB + K * kLdB + (KDA ? K : 2 * C + C * kLdB));
};

template <bool KDA, int K, int BV, class Mma>
__global__ void __launch_bounds__(DStateSmem<KDA, K, BV>::kWarps * 32) dstate_kernel(BwdArgs a) {
  using L = DStateSmem<KDA, K, BV>;
  // dVn's 4 x NTS tiles: RT warps across its row tiles (VMT each), CG groups of NTV column tiles.
  constexpr int NW = L::kWarps, MT = K / 16 / NW, NTS = BV / 8, LDK = L::kLdK, LDB = L::kLdB;
  constexpr int RT = NW < 4 ? NW : 4, VMT = 4 / RT, CG = NW / RT, NTV = NTS / CG;
  static_assert(NTS % CG == 0, "dstate: dVn's column tiles must split evenly over the warps");
  extern __shared__ __align__(16) unsigned char smem[];
  float* sQ = reinterpret_cast<float*>(smem);  // [64][K] KDA: Qd = s Q ⊙ e^G; GDN: Q
  float* sKr = sQ + C * LDK;                   // [64][K] KDA: Kr = K ⊙ e^{G_last−G}; GDN: K
  float* sW = sKr + C * LDK;                   // [64][K]
  float* sP = sW + C * LDK;                    // [64][64] P, causal
  float* sdO = sP + C * kLdM;                  // [64][BV]
  float* sdVn = sdO + C * LDB;                 // [64][BV] −dVn
  float* sdS = sdVn + C * LDB;                 // [K][BV] dS'
  float* sG = sdS + K * LDB;                   // GDN: G rows [64]; KDA: G_last [K]
  float* sKf = sG + C;                         // GDN: [64] e^{G_last−G_i}, Kr's row factors
  float* sdOq = KDA ? sdO : sKf + C;           // the B operand of Qd^T dO (GDN: [64][BV] s e^{G_i} dO)
  const int n = blockIdx.x, j = blockIdx.y, v0 = blockIdx.z * BV, h = j / a.group, HV = a.HV, V = a.V;
  const int bos = a.cu[n], eos = a.cu[n + 1], nchunks = (eos - bos + C - 1) / C, coff = a.chunk_off[n];
  const int warp = threadIdx.x >> 5;

  float dS[MT][NTS][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    for_each_acc(dS[mt], [&](int r, int c, float& x) {
      const int d = 16 * (warp * MT + mt) + r;
      x = a.dht ? a.dht[(size_t(n * HV + j) * K + d) * V + v0 + c] : 0.f;
    });

  for (int c = nchunks - 1; c >= 0; --c) {
    const int tc = bos + c * C, lc = min(C, eos - tc), gc = coff + c;
    auto tok = [&](int i) { return size_t(tc + i) * HV + j; };
    load_rows_async(sQ, LDK, C, K, lc, [&](int i) { return KDA ? a.qg + tok(i) * K : a.q + (size_t(tc + i) * a.H + h) * K; });
    load_rows_async(sKr, LDK, C, K, lc, [&](int i) { return KDA ? a.kg + tok(i) * K : a.k + (size_t(tc + i) * a.H + h) * K; });
    load_rows_async(sW, LDK, C, K, lc, [&](int i) { return a.W + tok(i) * K; });
    load_rows_async(sP, kLdM, C, C, lc, [&](int i) { return a.P + tok(i) * C; });
    load_rows_async(sdO, LDB, C, BV, lc, [&](int i) { return a.dout + tok(i) * V + v0; });
    cp_async_commit();
    if constexpr (KDA) {
      for (int d = threadIdx.x; d < K; d += blockDim.x) sG[d] = a.Gc[tok(lc - 1) * K + d];
    } else {
      for (int i = threadIdx.x; i < C; i += blockDim.x) sG[i] = i < lc ? a.Gc[tok(i)] : 0.f;
    }
    // dS' → the B operand of Kr dS', and to dh for the per-chunk kernels.
    float* dh = a.dh + (size_t(gc) * HV + j) * K * V;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      for_each_acc(dS[mt], [&](int r, int col, float& x) {
        const int d = 16 * (warp * MT + mt) + r;
        sdS[d * LDB + col] = x;
        dh[size_t(d) * V + v0 + col] = x;
      });
    cp_async_wait<0>();
    __syncthreads();
    // P holds its causal part only (j ≤ i); GDN's row decays go into sdOq and sKf here (KDA's qg,
    // kg come decayed from the forward).
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x)
      if (idx % C > idx / C) sP[(idx / C) * kLdM + idx % C] = 0.f;
    if constexpr (!KDA) {
      const float Gl = sG[lc - 1];
      for (int idx = threadIdx.x; idx < C * BV; idx += blockDim.x) {
        const int i = idx / BV, col = idx % BV;
        sdOq[i * LDB + col] = i < lc ? a.scale * expf(sG[i]) * sdO[i * LDB + col] : 0.f;
      }
      for (int i = threadIdx.x; i < C; i += blockDim.x) sKf[i] = i < lc ? expf(Gl - sG[i]) : 0.f;
    }
    __syncthreads();
    // dVn = Kr dS' + P^T dO (this warp's tiles of 16 rows and 8·NTV columns).
#pragma unroll
    for (int vm = 0; vm < VMT; ++vm) {
      const int i0 = 16 * ((warp % RT) * VMT + vm), c0 = 8 * NTV * (warp / RT);
      float acc[NTV][4] = {};
      warp_mma<Mma, NTV>(acc, VK{sKr + i0 * LDK, LDK}, VT{sdS + c0, LDB}, K);
      if constexpr (!KDA) for_each_acc(acc, [&](int r, int, float& x) { x *= sKf[i0 + r]; });
      warp_mma<Mma, NTV>(acc, VT{sP + i0, kLdM}, VT{sdO + c0, LDB}, C);
      for_each_acc(acc, [&](int r, int col, float& x) {
        const int i = i0 + r;
        if (i < lc) a.dvn[tok(i) * V + v0 + c0 + col] = x;
        sdVn[i * LDB + c0 + col] = i < lc ? -x : 0.f;
      });
    }
    __syncthreads();
    // dS = e^{G_last} dS' + Qd^T dO − W^T dVn.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int d0 = 16 * (warp * MT + mt);
      for_each_acc(dS[mt], [&](int r, int, float& x) { x *= expf(KDA ? sG[d0 + r] : sG[lc - 1]); });
      warp_mma<Mma, NTS>(dS[mt], VT{sQ + d0, LDK}, VT{sdOq, LDB}, C);
      warp_mma<Mma, NTS>(dS[mt], VT{sW + d0, LDK}, VT{sdVn, LDB}, C);
    }
    __syncthreads();
  }
  if (a.dh0) {
    float* out = a.dh0 + size_t(n * HV + j) * K * V;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      for_each_acc(dS[mt], [&](int r, int c, float& x) { out[size_t(16 * (warp * MT + mt) + r) * V + v0 + c] = x; });
  }
}

// ---------------------------------------------------------------------------------------------
// State terms: one block (8 warps) per (chunk, value head). First writer of dqh, dkh, dge, pkr, dw.
// S and dS' are both staged (203 KB at K = V = 128), so all loads but Vn's go out at once and the
// dG_last sum reads S from shared memory (it was a chain of V dependent global loads per key row).
template <int K>
__host__ __device__ size_t state_terms_smem(int V) {
  return sizeof(float) * (size_t(V) * (K + 4) + size_t(K) * (V + 4) + 2 * C * (V + 4));
}

template <bool KDA, int K, class Mma>
__global__ void __launch_bounds__(kThreads) state_terms_kernel(BwdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int V = a.V, LDV = V + 4, LDS = K + 4;
  const ChunkPos p(a, blockIdx.x, blockIdx.y);
  const int len = p.len;
  float* sS = reinterpret_cast<float*>(smem);                         // S^T [V][K]
  float* sdS = sS + V * LDS;                                          // dS' [K][V]
  float* sA = sdS + K * LDV;                                          // [64][V]: dO, then Vn
  float* sB = sA + C * LDV;                                           // [64][V]: dVn
  const float* hc = a.h + (size_t(blockIdx.x) * a.HV + p.j) * V * K;  // S^T
  const float* dsn = a.dh + (size_t(blockIdx.x) * a.HV + p.j) * K * V;
  load_rows_async(sS, LDS, V, K, V, [&](int r) { return hc + size_t(r) * K; });
  load_rows_async(sA, LDV, C, V, len, [&](int i) { return a.dout + p.tok(a, i) * V; });
  load_rows_async(sB, LDV, C, V, len, [&](int i) { return a.dvn + p.tok(a, i) * V; });
  cp_async_commit();
  load_rows_async(sdS, LDV, K, V, K, [&](int r) { return dsn + size_t(r) * V; });
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  // dq = s (dO S^T) ⊙ e^G, its gate term q ⊙ dq; dW = −dVn S^T.
  tiles_ld(
      C, K, nullptr, 0,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VK{sA + m0 * LDV, LDV}, VT{sS + n0, LDS}, V);
      },
      [&](int i, int d) {
        if (i >= len) return Loaded{};
        return Loaded{{gate<KDA, K>(a, p, i, d), a.q[p.qk(a, i) * K + d]}};
      },
      [&](int i, int d, float x, const Loaded& l) {
        if (i >= len) return 0.f;
        const float y = a.scale * x * expf(l.v[0]);
        a.dqh[p.tok(a, i) * K + d] = y;
        a.dge[p.tok(a, i) * K + d] = l.v[1] * y;
        return 0.f;
      });
  tiles(
      C, K,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VK{sB + m0 * LDV, LDV}, VT{sS + n0, LDS}, V);
      },
      [&](int i, int d, float x) {
        if (i < len) a.dw[p.tok(a, i) * K + d] = -x;
      });
  __syncthreads();
  load_rows_async(sA, LDV, C, V, len, [&](int i) { return a.vn + p.tok(a, i) * V; });
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // dk = (Vn dS'^T) ⊙ e^{G_last−G}; pkr = k ⊙ that (Kr_i's dependence on the gates after row i).
  tiles_ld(
      C, K, nullptr, 0,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VK{sA + m0 * LDV, LDV}, VK{sdS + n0 * LDV, LDV}, V);
      },
      [&](int i, int d) {
        if (i >= len) return Loaded{};
        return Loaded{{gate<KDA, K>(a, p, len - 1, d), gate<KDA, K>(a, p, i, d), a.k[p.qk(a, i) * K + d]}};
      },
      [&](int i, int d, float x, const Loaded& l) {
        if (i >= len) return 0.f;
        const float y = x * expf(l.v[0] - l.v[1]);
        a.dkh[p.tok(a, i) * K + d] = y;
        a.pkr[p.tok(a, i) * K + d] = l.v[2] * y;
        return 0.f;
      });
  __syncthreads();
  // dG_last += e^{G_last} Σ_v dS' ⊙ S, per key row (GDN sums the rows later).
  for (int d = threadIdx.x; d < K; d += blockDim.x) {
    float s = 0.f;
    for (int v = 0; v < V; ++v) s += sdS[d * LDV + v] * sS[v * LDS + d];
    a.dge[p.tok(a, len - 1) * K + d] += s * expf(gate<KDA, K>(a, p, len - 1, d));
  }
}

// ---------------------------------------------------------------------------------------------
// Intra-chunk terms: one block (8 warps) per (chunk, value head), after state_terms. Four fp32
// regions R1..R4 of 64 x max(K, V, 64) and two 64x64 tiles (T; dT, then dMkk) are reused across
// the phases (comments name what each holds); KDA keeps the chunk's gate tile G [64][K] for all of
// them (the per-element gates, read ~10 times each, were global loads).
__host__ __device__ inline int intra_ld(int K, int V) { return (K > V ? (K > C ? K : C) : (V > C ? V : C)) + 4; }
__host__ __device__ inline size_t intra_smem(int K, int V, bool kda) {
  return sizeof(float) * (size_t(kda ? 5 : 4) * C * intra_ld(K, V) + 2 * C * kLdM + 4 * C + C * kNP);
}

template <bool KDA, int K, class Mma>
__global__ void __launch_bounds__(kThreads) intra_kernel(BwdArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int V = a.V, LD = intra_ld(K, V);
  const ChunkPos p(a, blockIdx.x, blockIdx.y);
  const int len = p.len, tid = threadIdx.x;
  float* R1 = reinterpret_cast<float*>(smem);
  float* R2 = R1 + C * LD;
  float* R3 = R2 + C * LD;
  float* R4 = R3 + C * LD;
  float* sT = R4 + C * LD;      // T [64][64]
  float* sM = sT + C * kLdM;    // dT, then dMkk = β dL
  float* sBeta = sM + C * kLdM; // [64]
  float* sDiag = sBeta + C;     // [64] dMq[i][i] (no decay: straight to dq, dk)
  float* sRow = sDiag + C;      // [2][64] GDN: per-row sums of dge and pkr
  float* sPart = sRow + 2 * C;  // [64][kNP] dbeta partial sums
  float* sG = sPart + C * kNP;  // KDA: G [64][K]
  const size_t mat = (size_t(blockIdx.x) * a.HV + p.j) * C * C;
  auto G = [&](int i, int d) { return KDA ? sG[i * LD + d] : gate<KDA, K>(a, p, i, d); };
  auto qv = [&](int i, int d) { return a.q[p.qk(a, i) * K + d]; };
  auto kv = [&](int i, int d) { return a.k[p.qk(a, i) * K + d]; };
  auto dqh = [&](int i, int d) -> float& { return a.dqh[p.tok(a, i) * K + d]; };
  auto dkh = [&](int i, int d) -> float& { return a.dkh[p.tok(a, i) * K + d]; };
  auto dge = [&](int i, int d) -> float& { return a.dge[p.tok(a, i) * K + d]; };

  // R1 = dW, R2 = dVn, R3 = K, R4 = V.
  load_rows_async(sT, kLdM, C, C, C, [&](int i) { return a.Tm + mat + size_t(i) * C; });
  load_rows_async(R1, LD, C, K, len, [&](int i) { return a.dw + p.tok(a, i) * K; });
  load_rows_async(R2, LD, C, V, len, [&](int i) { return a.dvn + p.tok(a, i) * V; });
  load_rows_async(R3, LD, C, K, len, [&](int i) { return a.k + p.qk(a, i) * K; });
  load_rows_async(R4, LD, C, V, len, [&](int i) { return a.v + p.tok(a, i) * V; });
  if constexpr (KDA) load_rows_async(sG, LD, C, K, len, [&](int i) { return a.Gc + p.tok(a, i) * K; });
  cp_async_commit();
  if (tid < C) sBeta[tid] = tid < len ? a.beta[p.tok(a, tid)] : 0.f;
  for (int e = tid; e < C * kNP; e += blockDim.x) sPart[e] = 0.f;
  cp_async_wait<0>();
  __syncthreads();

  // dBk = T^T dW: dk += β dBk ⊙ e^G (and its gate term); dbeta += Σ dBk ⊙ K ⊙ e^G.
  tiles_ld(
      C, K, sPart, 0,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VT{sT + m0, kLdM}, VT{R1 + n0, LD}, C);
      },
      [&](int i, int d) {
        if (i >= len) return Loaded{};
        return Loaded{{G(i, d), dkh(i, d), dge(i, d)}};
      },
      [&](int i, int d, float x, const Loaded& l) {
        if (i >= len) return 0.f;
        const float e = expf(l.v[0]), kk = R3[i * LD + d], y = sBeta[i] * x * e;
        dkh(i, d) = l.v[1] + y;
        dge(i, d) = l.v[2] + kk * y;
        return x * kk * e;
      });
  // dBv = T^T dVn: dv = β dBv; dbeta += Σ dBv ⊙ V.
  tiles_ld(
      C, V, sPart, K / 16,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VT{sT + m0, kLdM}, VT{R2 + n0, LD}, C);
      },
      [&](int, int) { return Loaded{}; },
      [&](int i, int c, float x, const Loaded&) {
        if (i >= len) return 0.f;
        a.dv[p.tok(a, i) * V + c] = sBeta[i] * x;
        return x * R4[i * LD + c];
      });
  __syncthreads();
  // R3 = K ⊙ e^G. dT = (dW (K⊙e^G)^T + dVn V^T) diag(β), lower part (T is lower triangular).
  for (int idx = tid; idx < len * K; idx += blockDim.x) R3[(idx / K) * LD + idx % K] *= expf(G(idx / K, idx % K));
  __syncthreads();
  tiles(
      C, C,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VK{R1 + m0 * LD, LD}, VK{R3 + n0 * LD, LD}, K);
        warp_mma<Mma, 2>(acc, VK{R2 + m0 * LD, LD}, VK{R4 + n0 * LD, LD}, V);
      },
      [&](int i, int jj, float x) { sM[i * kLdM + jj] = jj <= i ? sBeta[jj] * x : 0.f; });
  __syncthreads();
  // R1 = Y = dT T^T; then dL = −T^T Y (strictly lower): sM = dMkk = β dL, dbeta += Σ dL ⊙ Mkk.
  tiles(
      C, C,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VK{sM + m0 * kLdM, kLdM}, VK{sT + n0 * kLdM, kLdM}, C);
      },
      [&](int i, int jj, float x) { R1[i * LD + jj] = x; });
  __syncthreads();
  tiles_ld(
      C, C, sPart, K / 16 + V / 16,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VT{sT + m0, kLdM}, VT{R1 + n0, LD}, C);
      },
      [&](int i, int jj) { return Loaded{{jj < i && i < len ? a.Mkk[mat + i * C + jj] : 0.f}}; },
      [&](int i, int jj, float x, const Loaded& l) {
        if (jj >= i || i >= len) {
          sM[i * kLdM + jj] = 0.f;
          return 0.f;
        }
        sM[i * kLdM + jj] = -sBeta[i] * x;
        return -x * l.v[0];
      });
  __syncthreads();
  // R2 = dO, R3 = Vn. R1 = dMq = s dO Vn^T strictly below the diagonal (GDN: times the decay
  // e^{G_i−G_j}, and so is dMkk), its diagonal to sDiag.
  load_rows_async(R2, LD, C, V, len, [&](int i) { return a.dout + p.tok(a, i) * V; });
  load_rows_async(R3, LD, C, V, len, [&](int i) { return a.vn + p.tok(a, i) * V; });
  cp_async_commit();
  if constexpr (!KDA) {
    if (tid < C) sRow[tid] = tid < len ? G(tid, 0) : 0.f;  // the row gates, for both decays
    __syncthreads();
    for (int idx = tid; idx < C * C; idx += blockDim.x) {
      const int i = idx / C, jj = idx % C;
      if (jj < i && i < len) sM[i * kLdM + jj] *= expf(sRow[i] - sRow[jj]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  tiles(
      C, C,
      [&](auto& acc, int m0, int n0) {
        warp_mma<Mma, 2>(acc, VK{R2 + m0 * LD, LD}, VK{R3 + n0 * LD, LD}, V);
      },
      [&](int i, int jj, float x) {
        const float y = a.scale * x;
        if (jj == i) sDiag[i] = y;
        float val = jj < i && i < len ? y : 0.f;
        if (!KDA && jj < i && i < len) val *= expf(sRow[i] - sRow[jj]);
        R1[i * LD + jj] = val;
      });
  __syncthreads();

  // The Gram matrices: dq += dMq·K (decayed), dk += dMkk·K + dMq^T·Q + dMkk^T·K (decayed), and
  // their gate terms q⊙dQrow + k⊙dKrow − k⊙dKcol; the row terms also add the undecayed diagonal of
  // dMq (dq += dMq_ii k_i, dk += dMq_ii q_i, no gate term). One pass with three accumulators per
  // element (x[0] = the dq row term, x[1] the dk row term, x[2] the dk column term), so dq, dk and
  // dge are read and written once, in the order of three separate passes.
  if constexpr (!KDA) {
    // Scalar decay, already inside dMq and dMkk: plain products with R2 = Q, R3 = K.
    load_rows_async(R2, LD, C, K, len, [&](int i) { return a.q + p.qk(a, i) * K; });
    load_rows_async(R3, LD, C, K, len, [&](int i) { return a.k + p.qk(a, i) * K; });
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    tiles_ld<3>(
        C, K, nullptr, 0,
        [&](auto& acc, int m0, int n0) {
          warp_mma<Mma, 2>(acc[0], VK{R1 + m0 * LD, LD}, VT{R3 + n0, LD}, C);
          warp_mma<Mma, 2>(acc[1], VK{sM + m0 * kLdM, kLdM}, VT{R3 + n0, LD}, C);
          warp_mma<Mma, 2>(acc[2], VT{R1 + m0, LD}, VT{R2 + n0, LD}, C);
          warp_mma<Mma, 2>(acc[2], VT{sM + m0, kLdM}, VT{R3 + n0, LD}, C);
        },
        [&](int i, int d) {
          return i < len ? Loaded{{dqh(i, d), dkh(i, d), dge(i, d)}} : Loaded{};
        },
        [&](int i, int d, const float(&x)[3], const Loaded& l) {
          if (i >= len) return 0.f;
          const float qq = R2[i * LD + d], kk = R3[i * LD + d];
          dqh(i, d) = l.v[0] + x[0] + sDiag[i] * kk;
          dkh(i, d) = l.v[1] + x[1] + sDiag[i] * qq + x[2];
          dge(i, d) = l.v[2] + qq * x[0] + kk * x[1] - kk * x[2];
          return 0.f;
        });
    __syncthreads();
  } else {
    // Per-key decay, factored per 16-row block B around its row m as in the forward's prep:
    // e^{G_i−G_j} = e^{G_i−G_m} e^{G_m−G_j}, each factor ≤ 1 outside block B and ≤ e^{8|g|} inside.
    // R2 = K ⊙ e^{G_m−G} (rows < 16B+16), R3 = Q ⊙ e^{G−G_m}, R4 = K ⊙ e^{G−G_m} (rows ≥ 16B).
    for (int B = 0; B < 4 && 16 * B < len; ++B) {
      const int b0 = 16 * B, m = min(b0 + 8, len - 1);
      batched_for<8>((b0 + 16) * K, [&](int idx) { return idx / K < len ? kv(idx / K, idx % K) : 0.f; },
                     [&](int idx, float k) {
                       const int i = idx / K, d = idx % K;
                       R2[i * LD + d] = i < len ? k * expf(G(m, d) - G(i, d)) : 0.f;
                     });
      batched_for<4>((C - b0) * K,
                     [&](int idx) {
                       const int i = b0 + idx / K, d = idx % K;
                       return i < len ? float2{qv(i, d), kv(i, d)} : float2{0.f, 0.f};
                     },
                     [&](int idx, float2 qk) {
                       const int i = b0 + idx / K, d = idx % K;
                       const float f = i < len ? expf(G(i, d) - G(m, d)) : 0.f;
                       R3[i * LD + d] = qk.x * f;
                       R4[i * LD + d] = qk.y * f;
                     });
      __syncthreads();
      // The rows of block B: the row terms against R2 (rows < 16B+16), the column term against
      // R3, R4 (rows ≥ 16B).
      tiles_ld<3>(
          16, K, nullptr, 0,
          [&](auto& acc, int, int n0) {
            warp_mma<Mma, 2>(acc[0], VK{R1 + b0 * LD, LD}, VT{R2 + n0, LD}, b0 + 16);
            warp_mma<Mma, 2>(acc[1], VK{sM + b0 * kLdM, kLdM}, VT{R2 + n0, LD}, b0 + 16);
            warp_mma<Mma, 2>(acc[2], VT{R1 + b0 * LD + b0, LD}, VT{R3 + b0 * LD + n0, LD}, C - b0);
            warp_mma<Mma, 2>(acc[2], VT{sM + b0 * kLdM + b0, kLdM}, VT{R4 + b0 * LD + n0, LD}, C - b0);
          },
          [&](int r, int d) {
            const int i = b0 + r;
            return i < len ? Loaded{{dqh(i, d), dkh(i, d), dge(i, d), qv(i, d), kv(i, d)}} : Loaded{};
          },
          [&](int r, int d, const float(&x)[3], const Loaded& l) {
            const int i = b0 + r;
            if (i >= len) return 0.f;
            const float gi = G(i, d), gm = G(m, d), up = expf(gi - gm), down = expf(gm - gi);
            const float y0 = x[0] * up, y1 = x[1] * up, y2 = x[2] * down, qq = l.v[3], kk = l.v[4];
            dqh(i, d) = l.v[0] + y0 + sDiag[i] * kk;
            dkh(i, d) = l.v[1] + y1 + sDiag[i] * qq + y2;
            dge(i, d) = l.v[2] + qq * y0 + kk * y1 - kk * y2;
            return 0.f;
          });
      __syncthreads();
    }
  }

  // dbeta; dg_t = Σ_{i≥t} dG_i + Σ_{i<t} pkr_i (GDN: summed over K first), scanned in shared
  // memory (R2 = dge, R3 = pkr) so the global traffic is plain loads, then plain stores.
  if (tid < len) {
    float s = 0.f;
    for (int e = 0; e < kNP; ++e) s += sPart[tid * kNP + e];
    a.dbeta[p.tok(a, tid)] = s;
  }
  batched_for<4>(
      len * K,
      [&](int idx) {
        return float2{dge(idx / K, idx % K), a.pkr[p.tok(a, idx / K) * K + idx % K]};
      },
      [&](int idx, float2 x) {
        R2[(idx / K) * LD + idx % K] = x.x;
        R3[(idx / K) * LD + idx % K] = x.y;
      });
  __syncthreads();
  if constexpr (KDA) {
    for (int d = tid; d < K; d += blockDim.x) {
      float run = 0.f;
      for (int i = len - 1; i >= 0; --i) R2[i * LD + d] = run += R2[i * LD + d];
      run = 0.f;
      for (int i = 0; i < len; ++i) {
        a.dg[p.tok(a, i) * K + d] = R2[i * LD + d] + run;
        run += R3[i * LD + d];
      }
    }
  } else {
    if (tid < len) {
      float s = 0.f, r = 0.f;
      for (int d = 0; d < K; ++d) s += R2[tid * LD + d], r += R3[tid * LD + d];
      sRow[tid] = s;
      sRow[C + tid] = r;
    }
    __syncthreads();
    if (tid == 0) {
      float run = 0.f;
      for (int i = len - 1; i >= 0; --i) sRow[i] = run += sRow[i];
      run = 0.f;
      for (int i = 0; i < len; ++i) {
        const float pk = sRow[C + i];
        sRow[C + i] = run;
        run += pk;
      }
    }
    __syncthreads();
    if (tid < len) a.dg[p.tok(a, tid)] = sRow[tid] + sRow[C + tid];
  }
}

// dq, dk [T,H,K] = Σ over the value heads of each group of dqh, dkh [T,HV,K], in head order.
__global__ void group_sum_kernel(const float* dqh, const float* dkh, float* dq, float* dk, size_t n, int H, int K,
                                 int group) {
  for (size_t e = blockIdx.x * size_t(blockDim.x) + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
    const size_t row = e / K, t = row / H;
    const int hh = int(row % H), d = int(e % K);
    float sq = 0.f, sk = 0.f;
    for (int r = 0; r < group; ++r) {
      const size_t src = (t * H * group + size_t(hh) * group + r) * K + d;
      sq += dqh[src];
      sk += dkh[src];
    }
    dq[e] = sq;
    dk[e] = sk;
  }
}

template <class CT>
__global__ void widen_kernel(const CT* x, float* y, size_t n) {
  for (size_t e = blockIdx.x * size_t(blockDim.x) + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x)
    y[e] = to_f32(x[e]);
}

void widen(DType dt, const void* x, float* y, size_t n, cudaStream_t s) {
  const unsigned blocks = unsigned(std::min<size_t>((n + 255) / 256, 4096));
  if (n == 0) return;
  if (dt == DType::BF16) widen_kernel<<<blocks, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(x), y, n);
  else widen_kernel<<<blocks, 256, 0, s>>>(static_cast<const __half*>(x), y, n);
  check_cuda(cudaGetLastError(), "delta rule backward widen kernel");
}

template <class F>
void set_smem(F* kern, size_t bytes, const char* what) {
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), what);
}

// Mma: the products' type in the reverse state pass and the state terms; IntraMma in the
// intra-chunk kernel (see DeltaChunkBackward::backward for when they differ).
template <bool KDA, int K, class Mma, class IntraMma>
void launch_bwd(const BwdArgs& a, int64_t chunks, int64_t n_seqs, int cols, cudaStream_t s) {
  if (n_seqs == 0) return;
  if (cols == 32) {
    using L = DStateSmem<KDA, K, 32>;
    auto kern = dstate_kernel<KDA, K, 32, Mma>;
    set_smem(kern, L::kBytes, "dstate smem");
    kern<<<dim3(unsigned(n_seqs), unsigned(a.HV), unsigned(a.V / 32)), L::kWarps * 32, L::kBytes, s>>>(a);
  } else {
    using L = DStateSmem<KDA, K, 16>;
    auto kern = dstate_kernel<KDA, K, 16, Mma>;
    set_smem(kern, L::kBytes, "dstate smem");
    kern<<<dim3(unsigned(n_seqs), unsigned(a.HV), unsigned(a.V / 16)), L::kWarps * 32, L::kBytes, s>>>(a);
  }
  check_cuda(cudaGetLastError(), "delta rule dstate kernel");
  if (chunks == 0) return;
  const dim3 grid(unsigned(chunks), unsigned(a.HV));
  const size_t b1 = state_terms_smem<K>(a.V), b2 = intra_smem(K, a.V, KDA);
  set_smem(state_terms_kernel<KDA, K, Mma>, b1, "state terms smem");
  state_terms_kernel<KDA, K, Mma><<<grid, kThreads, b1, s>>>(a);
  check_cuda(cudaGetLastError(), "delta rule backward state terms kernel");
  set_smem(intra_kernel<KDA, K, IntraMma>, b2, "intra smem");
  intra_kernel<KDA, K, IntraMma><<<grid, kThreads, b2, s>>>(a);
  check_cuda(cudaGetLastError(), "delta rule backward intra kernel");
}

template <bool KDA, class Mma, class IntraMma = Mma>
void dispatch_bwd(const BwdArgs& a, int K, int64_t chunks, int64_t n_seqs, int cols, cudaStream_t s) {
  switch (K) {
    case 32:
      return launch_bwd<KDA, 32, Mma, IntraMma>(a, chunks, n_seqs, cols, s);
    case 64:
      return launch_bwd<KDA, 64, Mma, IntraMma>(a, chunks, n_seqs, cols, s);
    default:
      return launch_bwd<KDA, 128, Mma, IntraMma>(a, chunks, n_seqs, cols, s);
  }
}

}  // namespace

DeltaChunkBackward::DeltaChunkBackward(const DeltaRuleDims& d, DType dt, int state_cols)
    : d_(d), dt_(dt), fwd_(d, DType::F32) {
  check(d.K == 32 || d.K == 64 || d.K == 128,
        "delta rule chunk backward (cuda): K must be 32, 64 or 128, got " + std::to_string(d.K));
  check(d.V <= 128, "delta rule chunk backward (cuda): V must be at most 128, got " + std::to_string(d.V));
  check_delta_dims(d, dt, "delta rule chunk backward (cuda)");
  const int64_t N = d.num_seqs(), T = d.tokens(), H = d.H, HV = d.HV, K = d.K, V = d.V, chunks = fwd_.chunks();
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  const int sms = sm_count(dev);
  check(state_cols == 0 || state_cols == 16 || (state_cols == 32 && V % 32 == 0),
        "delta rule chunk backward (cuda): state_cols must be 0, 16 or 32 (32 only when 32 divides V)");
  // The reverse state pass is sequential over chunks and its fp32 tiles (139 KB at K=128, 16
  // columns; 156 KB at 32) allow one block per multiprocessor, so its time is about the number of
  // waves of blocks times one block's walk: 32 columns where that needs fewer waves (1x16384x32x128:
  // 256 blocks of 16 columns are two waves on 132 SMs, 128 of 32 one), else 16.
  auto waves = [&](int64_t cols) { return (N * HV * (V / cols) + sms - 1) / sms; };
  state_cols_ = state_cols ? state_cols : (V % 32 == 0 && waves(32) < waves(16)) ? 32 : 16;
  const bool wide = dt != DType::F32;
  const size_t f = 4;
  const size_t sizes[] = {
      wide ? size_t(T * H * K) * f : 0, wide ? size_t(T * H * K) * f : 0,     // q, k widened
      wide ? size_t(T * HV * V) * f : 0, wide ? size_t(T * HV * V) * f : 0,   // v, dout widened
      size_t(N * HV * K * V) * f,                                            // recompute state
      size_t(chunks * HV * C * C) * f, size_t(chunks * HV * C * C) * f,      // T, Mkk
      size_t(chunks * HV * K * V) * f,                                       // dh
      size_t(T * HV * V) * f,                                                // dvn
      size_t(T * HV * K) * f, size_t(T * HV * K) * f, size_t(T * HV * K) * f,  // dw, dge, pkr
      HV > H ? size_t(T * HV * K) * f : 0, HV > H ? size_t(T * HV * K) * f : 0};  // dqh, dkh
  for (size_t sz : sizes) ws_bytes_ += align_up(sz);
  check_cuda(cudaMalloc(&ws_, std::max<size_t>(ws_bytes_, 256)), "delta rule backward workspace");
}

DeltaChunkBackward::~DeltaChunkBackward() {
  cudaFree(ws_);
  cudaFree(in_ws_);
}

void DeltaChunkBackward::backward(const void* q, const void* k, const void* v, const float* g, const float* beta,
                                  float scale, const float* h0, const void* dout, const float* dht, float* dq,
                                  float* dk, float* dv, float* dg, float* dbeta, float* dh0, cudaStream_t stream,
                                  const DeltaInputForm& form, float* dA_log, float* ddt_bias) const {
  const int64_t N = d_.num_seqs(), T = d_.tokens(), H = d_.H, HV = d_.HV, K = d_.K, V = d_.V, chunks = fwd_.chunks();
  const bool wide = dt_ != DType::F32;
  char* p = static_cast<char*>(ws_);
  auto take = [&](size_t bytes) {
    float* r = reinterpret_cast<float*>(p);
    p += align_up(bytes);
    return r;
  };
  float* qf = take(wide ? size_t(T * H * K) * 4 : 0);
  float* kf = take(wide ? size_t(T * H * K) * 4 : 0);
  float* vf = take(wide ? size_t(T * HV * V) * 4 : 0);
  float* dof = take(wide ? size_t(T * HV * V) * 4 : 0);
  float* state = take(size_t(N * HV * K * V) * 4);
  float* Tm = take(size_t(chunks * HV * C * C) * 4);
  float* Mkk = take(size_t(chunks * HV * C * C) * 4);
  BwdArgs a{};
  a.dh = take(size_t(chunks * HV * K * V) * 4);
  a.dvn = take(size_t(T * HV * V) * 4);
  a.dw = take(size_t(T * HV * K) * 4);
  a.dge = take(size_t(T * HV * K) * 4);
  a.pkr = take(size_t(T * HV * K) * 4);
  float* dqh = take(HV > H ? size_t(T * HV * K) * 4 : 0);
  float* dkh = take(HV > H ? size_t(T * HV * K) * 4 : 0);
  // A form's transformed inputs (fp32 q, k) and the scratch of its gate-parameter sums.
  DeltaInputs in;
  float* gate_scratch = nullptr;
  if (!form.plain()) {
    const size_t bytes = delta_inputs_bytes(d_, 4, true), scratch = delta_inputs_grad_scratch(d_) * 4;
    if (!in_ws_) check_cuda(cudaMalloc(&in_ws_, bytes + scratch + 256), "delta rule backward input workspace");
    in = delta_inputs_at(in_ws_, d_, 4);
    gate_scratch = reinterpret_cast<float*>(static_cast<char*>(in_ws_) + align_up(bytes));
    delta_inputs_forward(d_, form, dt_, DType::F32, q, k, beta, g, in, stream);
  }
  const float* gx = form.gate != DeltaGateForm::LogDecay ? in.g : g;  // what the kernels read
  const float* bx = form.beta_max > 0 ? in.beta : beta;
  if (form.qk_l2norm) {
    qf = static_cast<float*>(in.q);
    kf = static_cast<float*>(in.k);
  } else if (wide) {
    widen(dt_, q, qf, size_t(T * H * K), stream);
    widen(dt_, k, kf, size_t(T * H * K), stream);
  } else {
    qf = static_cast<float*>(const_cast<void*>(q));
    kf = static_cast<float*>(const_cast<void*>(k));
  }
  if (wide) {
    widen(dt_, v, vf, size_t(T * HV * V), stream);
    widen(dt_, dout, dof, size_t(T * HV * V), stream);
  } else {
    vf = static_cast<float*>(const_cast<void*>(v));
    dof = static_cast<float*>(const_cast<void*>(dout));
  }
  const size_t state_bytes = size_t(N * HV * K * V) * 4;
  if (h0) check_cuda(cudaMemcpyAsync(state, h0, state_bytes, cudaMemcpyDeviceToDevice, stream), "backward h0 copy");
  else check_cuda(cudaMemsetAsync(state, 0, state_bytes, stream), "backward h0 zero");
  // Single tf32 products for bf16 inputs, in the recompute and in the kernels below (numerics:
  // delta_rule_cuda.h), except in the intra-chunk kernel for KDA with a gate form: every per-token
  // gradient stays within 1.1x the plain recurrence's error with them, but KDA's dg is a reverse
  // cumsum over the chunk of per-token terms from that kernel, so their rounding errors are shared
  // along a chunk and add up in the token sums dA_log and ddt_bias (3.3x the plain error on the
  // kimi-linear test shape; 1.0x with that kernel in 3xTF32, which costs 11% of the KDA backward;
  // with all kernels in 3xTF32, 37%: H200, session 13).
  const bool per_key = d_.gate == DeltaGate::PerKey;
  const bool single_tf32 = dt_ == DType::BF16, exact_intra = per_key && form.gate != DeltaGateForm::LogDecay;
  const DeltaChunkPlan::Saved sv = fwd_.record(qf, kf, vf, gx, bx, scale, state, Tm, Mkk, single_tf32, stream);
  a.chunk_tab = sv.chunk_tab, a.cu = sv.cu, a.chunk_off = sv.chunk_off, a.Gc = sv.Gc;
  a.W = static_cast<const float*>(sv.W), a.P = static_cast<const float*>(sv.P);
  a.kg = static_cast<const float*>(sv.kg), a.qg = static_cast<const float*>(sv.qg);
  a.h = static_cast<const float*>(sv.h), a.vn = static_cast<const float*>(sv.vn);
  a.Tm = Tm, a.Mkk = Mkk;
  a.q = qf, a.k = kf, a.v = vf, a.dout = dof, a.beta = bx, a.dht = dht, a.scale = scale;
  a.H = int(H), a.HV = int(HV), a.V = int(V), a.group = int(HV / H);
  a.dqh = HV > H ? dqh : dq, a.dkh = HV > H ? dkh : dk;
  a.dv = dv, a.dg = dg, a.dbeta = dbeta, a.dh0 = dh0;
  if (single_tf32) {
    if (exact_intra)
      dispatch_bwd<true, tf32, float>(a, int(K), chunks, N, state_cols_, stream);
    else if (per_key)
      dispatch_bwd<true, tf32>(a, int(K), chunks, N, state_cols_, stream);
    else
      dispatch_bwd<false, tf32>(a, int(K), chunks, N, state_cols_, stream);
  } else {
    if (per_key)
      dispatch_bwd<true, float>(a, int(K), chunks, N, state_cols_, stream);
    else
      dispatch_bwd<false, float>(a, int(K), chunks, N, state_cols_, stream);
  }
  if (HV > H && T > 0) {
    const size_t n = size_t(T * H * K);
    group_sum_kernel<<<unsigned(std::min<size_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(dqh, dkh, dq, dk, n, int(H),
                                                                                            int(K), int(HV / H));
    check_cuda(cudaGetLastError(), "delta rule backward group sum kernel");
  }
  if (!form.plain())
    delta_inputs_backward(d_, form, dt_, q, k, beta, g, dq, dk, dbeta, dg, dA_log, ddt_bias, gate_scratch, stream);
}

}  // namespace hla::cuda
