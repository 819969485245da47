// Chunked forward of the delta rule on CUDA: the three launches described in delta_rule_cuda.h.
//
// Chunk c of a sequence covers tokens [t0, t0+len), len ≤ 64; rows i, j below index tokens inside
// it. G_i is the chunk-local inclusive cumsum of the log gates (fp32), so every decay factor is
// written e^{G_later − G_earlier} ≤ 1, except inside KDA's 16-row sub-chunks (see prep_kernel).
// Workspace tensors (per value head j, token-major like the inputs):
//   Gc [T,HV(,K)] f32   W [T,HV,K]   U [T,HV,V]   P [T,HV,64]   (KDA: kg, qg [T,HV,K])
//   h [chunks,HV,V,K] (state entering each chunk, stored transposed so the output matmul reads
//   it k-contiguous)   vn [T,HV,V] (v_new, the deltas u_t)
// all in the input's element type CT except Gc.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/delta_rule_inputs.h"
#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/mma.cuh"
#include "core/error.h"

namespace hla::cuda {
namespace {

constexpr int C = 64;  // chunk length

struct ChunkArgs {
  const void *q, *k, *v;
  const float *g, *beta;
  float scale;
  float* state;
  void* o;
  const int2* chunk_tab;  // per chunk: {first token, sequence}, sequences in order
  const int* cu;          // [N+1] token offsets
  const int* chunk_off;   // [N+1] index of each sequence's first chunk
  int H, HV, V, group;
  float* Gc;
  void *W, *U, *P, *kg, *qg, *h, *vn;
  // Wide state pass (all of V per block) over segments of the sequences, see state_wide_kernel.
  const int4* seg;     // per segment: {first token, end token, first (global) chunk, sequence}
  const int* seg_off;  // [N+1] index of each sequence's first segment
  float* segbuf;       // [segments,HV,K,V+K] fp32: [E | M] of each segment (segmented runs only)
  float* segstart;     // [segments,HV,K,V] fp32: the state entering each segment
  // Recorded for the backward only (nullptr in a plain forward): T = (I+L)^{-1} and the decayed key
  // Gram matrix Mkk[i][j] = Σ_d k_i k_j e^{G_i−G_j} (j < i, without beta), fp32 [chunks,HV,64,64].
  float *Tm, *Mkk;
  // beta and g as raw inputs of this form's beta sigmoid and gate (prep is their only reader; its
  // q/k L2 norm runs before, in delta_inputs_forward).
  DeltaInputForm form;
};

struct StateCfg {
  bool wide = false, segmented = false;
  int cols = 16;     // column-tiled pass: V columns per block
  int64_t nseg = 0;  // wide pass: segments (one per sequence when not segmented)
};

// Row pitch in elements: the row plus 16 bytes, so the 8 rows a fragment load touches fall in
// different banks.
template <class CT> __host__ __device__ constexpr int pitch(int cols) { return cols + 16 / int(sizeof(CT)); }
constexpr int kLdF = C + 4;  // fp32 64x64 tiles (L, T)

// ---------------------------------------------------------------------------------------------
// prep: one block (8 warps) per (chunk, value head). Shared memory allows 3 blocks per SM at
// K = V = 128 in 16 bits (73 KB; KDA 97 KB: 2); 8 warps rather than 4 give the serial parts
// (solve, operand builds) twice the threads.
constexpr int kPrepWarps = 8;
template <class CT, bool KDA, int K>
struct PrepSmem {
  static constexpr int kRows = KDA ? 96 : 128;  // GDN: Q and K tiles; KDA: 16 left-q, 16 left-k, 64 right rows
  int ld;
  __host__ __device__ explicit PrepSmem(int V) : ld(pitch<CT>(K > V ? K : V)) {}
  __host__ __device__ size_t buf_bytes() const { return size_t(kRows) * ld * sizeof(CT); }
  __host__ __device__ size_t bytes() const {
    return buf_bytes() + sizeof(float) * (2 * C * kLdF + 3 * 256 + C + (KDA ? C * K : C));
  }
};

template <class CT, class Mma, bool KDA, int K>
__global__ void __launch_bounds__(kPrepWarps * 32) prep_kernel(ChunkArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int chunk = blockIdx.x, j = blockIdx.y, h = j / a.group, HV = a.HV, V = a.V;
  const int2 ct = a.chunk_tab[chunk];
  const int t0 = ct.x, len = min(C, a.cu[ct.y + 1] - t0);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const PrepSmem<CT, KDA, K> lay(V);
  const int LD = lay.ld;
  CT* buf = reinterpret_cast<CT*>(smem);
  float* sL = reinterpret_cast<float*>(smem + lay.buf_bytes());  // 64x64 strictly lower L
  float* sT = sL + C * kLdF;                                      // 64x64 T = (I+L)^{-1}
  float* sY = sT + C * kLdF;                                      // 3 16x16 blocks, scratch of the solve
  float* sBeta = sY + 3 * 256;
  float* sG = sBeta + C;  // GDN [64]; KDA [64][K]
  const CT* q = static_cast<const CT*>(a.q);
  const CT* k = static_cast<const CT*>(a.k);
  const CT* v = static_cast<const CT*>(a.v);
  auto qrow = [&](int i) { return q + (size_t(t0 + i) * a.H + h) * K; };
  auto krow = [&](int i) { return k + (size_t(t0 + i) * a.H + h) * K; };
  auto tok = [&](int i) { return size_t(t0 + i) * HV + j; };  // (token, value head) index

  // GDN's Q and K tiles are requested first, so their loads overlap step 1's.
  [[maybe_unused]] CT* sQ = buf;
  [[maybe_unused]] CT* sK = buf + C * LD;
  if constexpr (!KDA) {
    const TileCopy<CT, C, K, kPrepWarps * 32> copy(int64_t(a.H) * K, LD);
    copy.load_async(qrow(0), sQ, len);
    copy.load_async(krow(0), sK, len);
    cp_async_commit();
  }

  // 1. beta, gate cumsum (rows past len add 0, so their G stays G_last: finite, and they are zero
  //    in every operand anyway).
  // T's blocks above the diagonal stay zero; the solve writes the others, and L is written where
  // it is read.
  for (int e = tid; e < C * C; e += blockDim.x)
    if ((e % C) >> 4 > (e / C) >> 4) sT[(e / C) * kLdF + e % C] = 0.f;
  if (tid < C) sBeta[tid] = tid < len ? form_beta(a.form, a.beta[tok(tid)]) : 0.f;
  if constexpr (!KDA) {
    if (warp == 0) {
      auto gate = [&](int i) { return i < len ? form_gate(a.form, a.g[tok(i)], j, 1) : 0.f; };
      float x0 = gate(lane), x1 = gate(lane + 32);
      for (int o = 1; o < 32; o <<= 1) {
        const float y0 = __shfl_up_sync(~0u, x0, o), y1 = __shfl_up_sync(~0u, x1, o);
        if (lane >= o) x0 += y0, x1 += y1;
      }
      x1 += __shfl_sync(~0u, x0, 31);
      sG[lane] = x0;
      sG[lane + 32] = x1;
      if (lane < len) a.Gc[tok(lane)] = x0;
      if (lane + 32 < len) a.Gc[tok(lane + 32)] = x1;
    }
  } else {
    // Per-key gates: the [64 x K] tile is copied in asynchronously, then one thread per key scans
    // its column in shared memory (scanning straight from global memory waited on each row's load
    // in turn: the largest stall of this kernel, H200 ncu).
    TileCopy<float, C, K, kPrepWarps * 32>(int64_t(HV) * K, K).load_async(a.g + tok(0) * K, sG, len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (a.form.gate != DeltaGateForm::LogDecay) {  // raw pre-activations: the gate, by all threads
      for (int e = tid; e < len * K; e += blockDim.x) sG[e] = form_gate(a.form, sG[e], j * K + e % K, K);
      __syncthreads();
    }
    for (int d = tid; d < K; d += blockDim.x) {
      float acc = 0.f;
      for (int i = 0; i < C; ++i) {
        acc += sG[i * K + d];
        sG[i * K + d] = acc;
        if (i < len) a.Gc[tok(i) * K + d] = acc;
      }
    }
  }

  __syncthreads();

  // 2. L[i][j] = beta_i Σ_d k_i k_j e^{G_i−G_j} (j < i) into sL; P[i][j] = s Σ_d q_i k_j e^{G_i−G_j}
  //    (j ≤ i) straight to global. Work is split in 16x16 blocks (I, J ≤ I).
  CT* Pg = static_cast<CT*>(a.P);
  auto store_block = [&](float(&acc)[2][4], int I, int J, bool isP, bool exact_decay) {
    auto decay = [&](int i, int jj) { return exact_decay ? fast_exp<CT>(sG[i] - sG[jj < i ? jj : i]) : 1.f; };
    if (isP) {
      store_acc_rows<CT>(
          acc,
          [&](int r, int c, float x) {
            const int i = 16 * I + r, jj = 16 * J + c;
            return jj <= i ? x * a.scale * decay(i, jj) : 0.f;
          },
          [&](int r, int c) { return 16 * I + r < len ? Pg + tok(16 * I + r) * C + 16 * J + c : nullptr; });
      return;
    }
    for_each_acc(acc, [&](int r, int c, float& x) {
      const int i = 16 * I + r, jj = 16 * J + c;
      const float dec = decay(i, jj);
      sL[i * kLdF + jj] = jj < i ? x * sBeta[i] * dec : 0.f;
      if (a.Mkk) a.Mkk[(size_t(chunk) * HV + j) * C * C + i * C + jj] = jj < i ? x * dec : 0.f;
    });
  };
  if constexpr (!KDA) {
    // Scalar decay: plain Q K^T and K K^T, the decay applied exactly per element afterwards.
    cp_async_wait<0>();
    __syncthreads();
    for (int task = warp; task < 20; task += kPrepWarps) {
      const int pair = task >> 1, I = pair >= 6 ? 3 : pair >= 3 ? 2 : pair >= 1 ? 1 : 0, J = pair - I * (I + 1) / 2;
      const bool isP = task & 1;
      float acc[2][4] = {};
      warp_mma<Mma, 2>(acc, View<CT, true>{(isP ? sQ : sK) + 16 * I * LD, LD}, View<CT, true>{sK + 16 * J * LD, LD}, K);
      store_block(acc, I, J, isP, true);
    }
    __syncthreads();
    load_rows_async(buf, LD, C, V, len, [&](int i) { return v + tok(i) * V; });  // over sQ, overlaps the solve
    cp_async_commit();
  } else {
    // Per-key decay: e^{G_i−G_j} = e^{G_i−G_r} · e^{G_r−G_j} with r the middle row of the row block
    // I; the factors go into the operands (|exponent| ≤ 8·|g| for rows inside block I, ≤ 0 for
    // earlier blocks), so the tensor cores see ordinary products.
    CT* sLq = buf;
    CT* sLk = buf + 16 * LD;
    CT* sR = buf + 32 * LD;
    for (int I = 0; I < 4; ++I) {
      const float* Gr = sG + (16 * I + 8) * K;
      constexpr int VN = Pack<CT>::n, KV = K / VN;  // 16-byte loads: VN elements per thread and step
      for (int idx = tid; idx < 16 * KV; idx += blockDim.x) {
        const int r = idx / KV, d0 = (idx % KV) * VN, i = 16 * I + r;
        const Pack<CT> qv = i < len ? ld16(qrow(i) + d0) : Pack<CT>::zero();
        const Pack<CT> kv = i < len ? ld16(krow(i) + d0) : Pack<CT>::zero();
        Pack<CT> lq, lk;
#pragma unroll
        for (int e = 0; e < VN; ++e) {
          const float x = fast_exp<CT>(sG[i * K + d0 + e] - Gr[d0 + e]);
          lq.v[e] = from_f32<CT>(to_f32(qv.v[e]) * x);
          lk.v[e] = from_f32<CT>(to_f32(kv.v[e]) * x);
        }
        st16(sLq + r * LD + d0, lq);
        st16(sLk + r * LD + d0, lk);
      }
      for (int idx = tid; idx < 16 * (I + 1) * KV; idx += blockDim.x) {
        const int i = idx / KV, d0 = (idx % KV) * VN;
        const Pack<CT> kv = i < len ? ld16(krow(i) + d0) : Pack<CT>::zero();
        Pack<CT> rk;
#pragma unroll
        for (int e = 0; e < VN; ++e)
          rk.v[e] = from_f32<CT>(to_f32(kv.v[e]) * fast_exp<CT>(Gr[d0 + e] - sG[i * K + d0 + e]));
        st16(sR + i * LD + d0, rk);
      }
      __syncthreads();
      for (int task = warp; task < 2 * (I + 1); task += kPrepWarps) {
        const int J = task >> 1;
        const bool isP = task & 1;
        float acc[2][4] = {};
        warp_mma<Mma, 2>(acc, View<CT, true>{isP ? sLq : sLk, LD}, View<CT, true>{sR + 16 * J * LD, LD}, K);
        store_block(acc, I, J, isP, false);
      }
      __syncthreads();
    }
  }
  __syncthreads();

  // 3. T = (I+L)^{-1} in fp32, by 16x16 blocks. Warp w < 4 inverts diagonal block w by
  //    right-looking forward substitution: lane (par, c) keeps column c of rows par, par+2, ..., in
  //    registers; once row i is final a shuffle hands it to every lane, which subtracts
  //    L[r][i]·T[i][c] from its rows r > i — 15 steps of one shuffle and 8 independent FMAs (a
  //    row-by-row dot product was 16 dependent steps of up to 15 and left the other warps waiting
  //    at the next barrier: a third of the GDN prep's stall samples, H200 ncu).
  //    Then block row I gets T_IJ = −T_II Σ_{J≤M<I} L_IM T_MJ.
  if (warp < 4) {
    const int b = 16 * warp, c = lane & 15, par = lane >> 4;
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = par + 2 * e == c ? 1.f : 0.f;
#pragma unroll
    for (int i = 0; i < 15; ++i) {
      const float ti = __shfl_sync(~0u, x[i >> 1], (i & 1) * 16 + c);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (par + 2 * e > i) x[e] -= sL[(b + par + 2 * e) * kLdF + b + i] * ti;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sT[(b + par + 2 * e) * kLdF + b + c] = x[e];
  }
  __syncthreads();
  //    A thread computes 4 adjacent columns of one row (float4 loads of the right operand): one
  //    element per thread made these loops shared-memory bound (2 loads per FMA, ~a fifth of the
  //    GDN prep's stall samples, H200 ncu).
  auto fma4 = [](float4& acc, float s, const float4& v) {
    acc.x += s * v.x, acc.y += s * v.y, acc.z += s * v.z, acc.w += s * v.w;
  };
  for (int I = 1; I < 4; ++I) {
    for (int e = tid; e < I * 64; e += blockDim.x) {
      const int J = e >> 6, r = (e >> 2) & 15, c = (e & 3) * 4;
      const float* Lr = sL + (16 * I + r) * kLdF;
      float4 y = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int m = 16 * J; m < 16 * I; ++m)
        fma4(y, Lr[m], *reinterpret_cast<const float4*>(sT + m * kLdF + 16 * J + c));
      *reinterpret_cast<float4*>(sY + (J << 8) + r * 16 + c) = y;
    }
    __syncthreads();
    for (int e = tid; e < I * 64; e += blockDim.x) {
      const int J = e >> 6, r = (e >> 2) & 15, c = (e & 3) * 4;
      const float* Tr = sT + (16 * I + r) * kLdF + 16 * I;
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int m = 0; m < 16; ++m) fma4(x, -Tr[m], *reinterpret_cast<const float4*>(sY + (J << 8) + m * 16 + c));
      *reinterpret_cast<float4*>(sT + (16 * I + r) * kLdF + 16 * J + c) = x;
    }
    __syncthreads();
  }
  // The backward's copy of T (same element-to-thread map as step 4, which scales sT in place).
  if (a.Tm)
    for (int e = tid; e < C * C; e += blockDim.x) a.Tm[(size_t(chunk) * HV + j) * C * C + e] = sT[(e / C) * kLdF + e % C];

  // 4. W = T diag(beta) (K ⊙ e^G), U = T diag(beta) V. beta (and GDN's row decay e^{G_j}) scale
  //    T's columns, so the right operands are the raw K and V tiles; only KDA, whose decay is per
  //    key, stages K ⊙ e^G (in buf rows 0..63) — and also writes the decayed keys
  //    kg = K ⊙ e^{G_last−G} and queries qg = s Q ⊙ e^G for the later passes.
  //    For fp16 inputs T also enters as its rounding residual (a second MMA): with T rounded to fp16
  //    once, the final state reached 2.18x the plain recurrence's error on one test shape (bar 2x);
  //    bench/delta_rule_rounding.cpp, which models these rounding points on the CPU and reproduces
  //    the GPU's errors to 3 digits, puts that case at 1.52x with T kept whole. bf16 needs no residual.
  // out = A[64x64] · B[64 x cols]: warp w takes rows 16·(w%4) and every other 32-column slab.
  const int trow = 16 * (warp & 3);
  auto tmul = [&](CT* out, int cols, const float* A, const CT* B) {
    constexpr bool kResidual = std::is_same_v<CT, __half>;
    for (int c0 = 32 * (warp >> 2); c0 < cols; c0 += 64) {
      auto emit = [&](auto& acc) {
        store_acc_rows<CT>(acc, AsIs{}, [&](int r, int c) {
          const int i = trow + r;
          return i < len ? out + tok(i) * cols + c0 + c : nullptr;
        });
      };
      auto product = [&](auto& acc) {
        constexpr int NT = sizeof(acc) / sizeof(acc[0]);
        warp_mma<Mma, NT>(acc, F32View<CT>{A + trow * kLdF, kLdF}, View<CT, false>{B + c0, LD}, C);
        if constexpr (kResidual)
          warp_mma<Mma, NT>(acc, F32LowView<CT>{A + trow * kLdF, kLdF}, View<CT, false>{B + c0, LD}, C);
        emit(acc);
      };
      if (cols - c0 >= 32) {
        float acc[4][4] = {};
        product(acc);
      } else {
        float acc[2][4] = {};
        product(acc);
      }
    }
  };
  auto vrow = [&](int i) { return v + tok(i) * V; };
  if constexpr (!KDA) {
    // sL ← T diag(beta e^G) for W, sT ← T diag(beta) for U; the V tile arrives in buf rows 0..63.
    // A thread keeps one column (blockDim is a multiple of 64).
    const int jj = tid % C;
    const float bu = sBeta[jj], bw = bu * fast_exp<CT>(sG[jj]);
    for (int i = tid / C; i < C; i += blockDim.x / C) {
      const float t = sT[i * kLdF + jj];
      sL[i * kLdF + jj] = t * bw;
      sT[i * kLdF + jj] = t * bu;
    }
    cp_async_wait<0>();
    __syncthreads();
    tmul(static_cast<CT*>(a.W), K, sL, buf + C * LD);
    tmul(static_cast<CT*>(a.U), V, sT, buf);
  } else {
    constexpr int VN = Pack<CT>::n, KV = K / VN;
    for (int e = tid; e < C * C; e += blockDim.x) sT[(e / C) * kLdF + e % C] *= sBeta[e % C];
    for (int idx = tid; idx < C * KV; idx += blockDim.x) {
      const int i = idx / KV, d0 = (idx % KV) * VN;
      const Pack<CT> kv = i < len ? ld16(krow(i) + d0) : Pack<CT>::zero();
      const Pack<CT> qv = i < len ? ld16(qrow(i) + d0) : Pack<CT>::zero();
      Pack<CT> b, kg, qg;
#pragma unroll
      for (int e = 0; e < VN; ++e) {
        const float Gi = sG[i * K + d0 + e], Gl = sG[(len - 1) * K + d0 + e], kf = to_f32(kv.v[e]);
        b.v[e] = from_f32<CT>(kf * fast_exp<CT>(Gi));
        kg.v[e] = from_f32<CT>(kf * fast_exp<CT>(Gl - Gi));
        qg.v[e] = from_f32<CT>(a.scale * to_f32(qv.v[e]) * fast_exp<CT>(Gi));
      }
      st16(buf + i * LD + d0, b);
      if (i < len) {
        st16(static_cast<CT*>(a.kg) + tok(i) * K + d0, kg);
        st16(static_cast<CT*>(a.qg) + tok(i) * K + d0, qg);
      }
    }
    __syncthreads();
    tmul(static_cast<CT*>(a.W), K, sT, buf);
    __syncthreads();
    load_rows_async(buf, LD, C, V, len, vrow);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    tmul(static_cast<CT*>(a.U), V, sT, buf);
  }
}

// ---------------------------------------------------------------------------------------------
// The gates a state step needs, copied asynchronously with the chunk's tiles (a plain load here
// stalled every step on global memory latency, H200 ncu): GDN the chunk's lc cumulative gates,
// KDA the K cumulative gates of its last token.
template <bool KDA, int K>
__device__ __forceinline__ void load_chunk_gates(float* dst, const float* Gc, int tc, int lc, int HV, int j) {
  if constexpr (KDA) {
    for (int d = 4 * threadIdx.x; d < K; d += 4 * blockDim.x)
      cp_async16(dst + d, Gc + (size_t(tc + lc - 1) * HV + j) * K + d, true);
  } else {
    for (int i = threadIdx.x; i < lc; i += blockDim.x) cp_async4(dst + i, Gc + size_t(tc + i) * HV + j);
  }
}

// v_new = U − W S for 16 chunk rows i0.. of a state step, from the accumulators holding W S: turns
// them into v_new (0 past the chunk's lc rows) and writes the copy the update multiplies,
// e^{G_last−G_i}·v_new (GDN; KDA's decay is in its keys), transposed: vnT[col·ldvn + i].
// u(i, col) reads U. Gs: the chunk's cumulative gates (GDN).
template <class CT, bool KDA, int NT, class UAt>
__device__ __forceinline__ void finish_v_new(float (&acc)[NT][4], int i0, int lc, const float* Gs, UAt u, CT* vnT,
                                             int ldvn) {
  const float Gl = KDA ? 0.f : Gs[lc - 1];
  auto decay = [&](int i) { return KDA ? 1.f : i < lc ? fast_exp<CT>(Gl - Gs[i]) : 0.f; };
  const int rq = (threadIdx.x & 31) >> 2;  // the lane's first accumulator row
  const float fac[2] = {decay(i0 + rq), decay(i0 + rq + 8)};
  for_each_acc(acc, [&](int r, int col, float& x) {
    const int i = i0 + r;
    x = i < lc ? to_f32(u(i, col)) - x : 0.f;
    vnT[col * ldvn + i] = from_f32<CT>(x * (r < 8 ? fac[0] : fac[1]));
  });
}

// state: one block per (sequence, value head, BV columns of V), walking the chunks in order with
// the state S [K x BV] in fp32 mma accumulators; the next chunk's W, K and U tiles are copied in
// (cp.async) while the current one is processed, where shared memory allows two stages.
// Warps: one per 16 rows of K (8 at most). A step is a chain of small dependent products, so more
// warps per block mean more of them in flight (4 -> 8 warps at K = 128: H200, GDN (1,16384,32)).
template <class CT, bool KDA, int K, int BV>
struct StateSmem {
  static constexpr int kWarps = K >= 128 ? 8 : K / 16;
  static constexpr int kLdK = pitch<CT>(K), kLdU = pitch<CT>(BV), kLdVn = pitch<CT>(C);
  static constexpr size_t kStage = sizeof(CT) * (2 * C * kLdK + C * kLdU) + sizeof(float) * (KDA ? K : C);
  static constexpr size_t kFixed = sizeof(CT) * (BV * kLdK + BV * kLdVn);
  static constexpr int kStages = 2 * kStage + kFixed <= 200 * 1024 ? 2 : 1;
  static constexpr size_t kBytes = kStages * kStage + kFixed;
};

template <class CT, class Mma, bool KDA, int K, int BV>
__global__ void __launch_bounds__(StateSmem<CT, KDA, K, BV>::kWarps * 32) state_kernel(ChunkArgs a) {
  using L = StateSmem<CT, KDA, K, BV>;
  // Each warp updates MT row tiles of S (all BV columns) and computes v_new for VMT row tiles of the
  // chunk and NTW of its NTS column tiles (with 8 warps, two warps share a row tile).
  constexpr int NW = L::kWarps, MT = K / 16 / NW, NTS = BV / 8;
  constexpr int VMT = NW >= 4 ? 1 : 4 / NW, NTW = NW > 4 ? NTS / (NW / 4) : NTS;
  constexpr int LDK = L::kLdK, LDU = L::kLdU, LDVN = L::kLdVn;
  extern __shared__ __align__(16) unsigned char smem[];
  const int n = blockIdx.x, j = blockIdx.y, v0 = blockIdx.z * BV, h = j / a.group, HV = a.HV, V = a.V;
  const int bos = a.cu[n], eos = a.cu[n + 1], nchunks = (eos - bos + C - 1) / C, coff = a.chunk_off[n];
  const int warp = threadIdx.x >> 5;
  auto stage_ptr = [&](int s) { return smem + s * L::kStage; };
  auto sW = [&](int s) { return reinterpret_cast<CT*>(stage_ptr(s)); };
  auto sKg = [&](int s) { return sW(s) + C * LDK; };
  auto sU = [&](int s) { return sKg(s) + C * LDK; };
  auto sGs = [&](int s) { return reinterpret_cast<float*>(sU(s) + C * LDU); };  // GDN: G rows; KDA: G_last
  CT* sS = reinterpret_cast<CT*>(smem + L::kStages * L::kStage);  // S^T [BV][K] in CT
  CT* sVn = sS + BV * LDK;                                        // decayed v_new^T [BV][64]

  const CT* Wg = static_cast<const CT*>(a.W);
  const CT* Ug = static_cast<const CT*>(a.U);
  const CT* Kg = static_cast<const CT*>(KDA ? a.kg : a.k);
  CT* hg = static_cast<CT*>(a.h);
  CT* vng = static_cast<CT*>(a.vn);
  const int kheads = KDA ? HV : a.H, khead = KDA ? j : h;  // Kg's heads: kg per value head, k per key head
  const TileCopy<CT, C, K, NW * 32> w_copy(int64_t(HV) * K, LDK), k_copy(int64_t(kheads) * K, LDK);
  const TileCopy<CT, C, BV, NW * 32> u_copy(int64_t(HV) * V, LDU);
  const TileCopy<CT, BV, K, NW * 32> h_copy(K, LDK);  // S^T's rows are h's (K contiguous)
  auto load_chunk = [&](int c, int s) {
    const int tc = bos + c * C, lc = min(C, eos - tc);
    w_copy.load_async(Wg + (size_t(tc) * HV + j) * K, sW(s), lc);
    k_copy.load_async(Kg + (size_t(tc) * kheads + khead) * K, sKg(s), lc);
    u_copy.load_async(Ug + (size_t(tc) * HV + j) * V + v0, sU(s), lc);
    load_chunk_gates<KDA, K>(sGs(s), a.Gc, tc, lc, HV, j);
  };

  float S[MT][NTS][4];
  float* state = a.state + size_t(n * HV + j) * K * V;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    for_each_acc(S[mt], [&](int r, int c, float& x) { x = state[size_t(16 * (warp * MT + mt) + r) * V + v0 + c]; });

  if (L::kStages == 2 && nchunks > 0) load_chunk(0, 0);
  cp_async_commit();
  for (int c = 0; c < nchunks; ++c) {
    const int tc = bos + c * C, lc = min(C, eos - tc);
    int s = 0;
    if constexpr (L::kStages == 2) {
      s = c & 1;
      if (c + 1 < nchunks) load_chunk(c + 1, s ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_chunk(c, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      for_each_acc(S[mt], [&](int r, int col, float& x) { sS[col * LDK + 16 * (warp * MT + mt) + r] = from_f32<CT>(x); });
    __syncthreads();
    // Record the state entering this chunk for the output pass: S^T's BV rows are rows v0.. of h's
    // [V, K] block.
    h_copy.store(sS, hg + ((size_t(coff + c) * HV + j) * V + v0) * K);
    const float* Gs = sGs(s);
    const float Gl = KDA ? 0.f : Gs[lc - 1];
    // v_new = U − W S for this warp's rows and columns; the decayed copy e^{G_last−G_i}·v_new (GDN)
    // feeds the update.
    const int n0 = NW > 4 ? 8 * NTW * (warp >> 2) : 0;  // this warp's first column of v_new
#pragma unroll
    for (int vm = 0; vm < VMT; ++vm) {
      const int i0 = 16 * (NW > 4 ? warp & 3 : warp * VMT + vm);
      float acc[NTW][4] = {};
      warp_mma<Mma, NTW>(acc, View<CT, true>{sW(s) + i0 * LDK, LDK}, View<CT, true>{sS + n0 * LDK, LDK}, K);
      const CT* u = sU(s) + n0;
      finish_v_new<CT, KDA>(
          acc, i0, lc, Gs, [&](int i, int col) { return u[i * LDU + col]; }, sVn + n0 * LDVN, LDVN);
      store_acc_rows<CT>(acc, AsIs{}, [&](int r, int col) {
        return i0 + r < lc ? vng + (size_t(tc + i0 + r) * HV + j) * V + v0 + n0 + col : nullptr;
      });
    }
    __syncthreads();
    // S ← e^{G_last} S + Kg^T v_new  (Kg = K ⊙ e^{G_last−G}: precomputed for KDA, folded into v_new for GDN)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int d0 = 16 * (warp * MT + mt);
      for_each_acc(S[mt], [&](int r, int, float& x) { x *= fast_exp<CT>(KDA ? Gs[d0 + r] : Gl); });
      warp_mma<Mma, NTS>(S[mt], View<CT, false>{sKg(s) + d0, LDK}, View<CT, true>{sVn, LDVN}, C);
    }
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    for_each_acc(S[mt], [&](int r, int c, float& x) { state[size_t(16 * (warp * MT + mt) + r) * V + v0 + c] = x; });
}

// ---------------------------------------------------------------------------------------------
// Wide state pass: one block per (segment, value head, 16·NW columns), NW warps, each warp owning
// 16 columns of S (all K rows, in fp32 mma accumulators). The columns of S never interact, so a
// warp's S^T copy and v_new^T are private to it (no block barrier around them); the block shares
// the W, K and U tiles, which are read once per chunk for all of V instead of once per 16 columns.
// A segment is a run of whole chunks of one sequence (the whole sequence when not segmented).
//   LOCAL = false: S starts from the state entering the segment (a.state[n] unsegmented, else
//     a.segstart[segment]); records h and v_new; unsegmented, writes the final state to a.state.
//   LOCAL = true: runs the segment from the virtual state [0 | I] (V + K columns; the identity
//     columns see U = 0), so its final value is [E | M]: the segment maps an entering state S0 to
//     M S0 + E. Written to a.segbuf; nothing else.
template <class CT, bool KDA, int K, int NW>
struct WideSmem {
  static constexpr int kCols = 16 * NW;
  static constexpr int kLdK = pitch<CT>(K), kLdVn = pitch<CT>(C);
  __host__ __device__ static int ld_u(int V) { return pitch<CT>(V); }
  __host__ __device__ static size_t stage(int V) {
    return sizeof(CT) * (2 * C * kLdK + C * ld_u(V)) + sizeof(float) * (KDA ? K : C);
  }
  static constexpr size_t kFixed = sizeof(CT) * (kCols * kLdK + kCols * kLdVn);
  __host__ __device__ static int stages(int V) { return 2 * stage(V) + kFixed <= 220 * 1024 ? 2 : 1; }
  __host__ __device__ static size_t bytes(int V) { return stages(V) * stage(V) + kFixed; }
};

template <class CT, class Mma, bool KDA, int K, int NW, bool LOCAL>
__global__ void __launch_bounds__(NW * 32) state_wide_kernel(ChunkArgs a, int segmented) {
  using L = WideSmem<CT, KDA, K, NW>;
  constexpr int MT = K / 16, LDK = L::kLdK, LDVN = L::kLdVn;
  extern __shared__ __align__(16) unsigned char smem[];
  const int sg = blockIdx.x, j = blockIdx.y, h = j / a.group, HV = a.HV, V = a.V;
  const int4 seg = a.seg[sg];
  const int bos = seg.x, eos = seg.y, cbeg = seg.z, n = seg.w, nchunks = (eos - bos + C - 1) / C;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ncols = LOCAL ? V + K : V, wc = blockIdx.z * L::kCols + 16 * warp;  // this warp's first column
  const bool active = wc < ncols, need_u = int(blockIdx.z) * L::kCols < V;
  const int LDU = L::ld_u(V), nst = L::stages(V);
  const size_t stage_bytes = L::stage(V);
  auto sW = [&](int s) { return reinterpret_cast<CT*>(smem + s * stage_bytes); };
  auto sKg = [&](int s) { return sW(s) + C * LDK; };
  auto sU = [&](int s) { return sKg(s) + C * LDK; };
  auto sGs = [&](int s) { return reinterpret_cast<float*>(sU(s) + C * LDU); };
  CT* sS = reinterpret_cast<CT*>(smem + nst * stage_bytes) + 16 * warp * LDK;  // this warp's S^T [16][K]
  CT* sVn = reinterpret_cast<CT*>(smem + nst * stage_bytes) + L::kCols * LDK + 16 * warp * LDVN;  // [16][64]

  const CT* Wg = static_cast<const CT*>(a.W);
  const CT* Ug = static_cast<const CT*>(a.U);
  const CT* Kg = static_cast<const CT*>(KDA ? a.kg : a.k);
  CT* hg = static_cast<CT*>(a.h);
  CT* vng = static_cast<CT*>(a.vn);
  auto load_chunk = [&](int c, int s) {
    const int tc = bos + c * C, lc = min(C, eos - tc);
    load_rows_async(sW(s), LDK, C, K, lc, [&](int i) { return Wg + (size_t(tc + i) * HV + j) * K; });
    load_rows_async(sKg(s), LDK, C, K, lc, [&](int i) {
      return Kg + (KDA ? (size_t(tc + i) * HV + j) * K : (size_t(tc + i) * a.H + h) * K);
    });
    if (need_u) load_rows_async(sU(s), LDU, C, V, lc, [&](int i) { return Ug + (size_t(tc + i) * HV + j) * V; });
    load_chunk_gates<KDA, K>(sGs(s), a.Gc, tc, lc, HV, j);
  };

  float S[MT][2][4];
  {
    const float* init = LOCAL ? nullptr : segmented ? a.segstart + size_t(sg * HV + j) * K * V
                                                    : a.state + size_t(n * HV + j) * K * V;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      for_each_acc(S[mt], [&](int r, int c, float& x) {
        const int row = 16 * mt + r, col = wc + c;
        if constexpr (LOCAL) x = col >= V && col - V == row ? 1.f : 0.f;
        else x = active ? init[size_t(row) * V + col] : 0.f;
      });
  }

  if (nst == 2 && nchunks > 0) load_chunk(0, 0);
  cp_async_commit();
  for (int c = 0; c < nchunks; ++c) {
    const int tc = bos + c * C, lc = min(C, eos - tc);
    int s = 0;
    if (nst == 2) {
      s = c & 1;
      if (c + 1 < nchunks) load_chunk(c + 1, s ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_chunk(c, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    if (active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        for_each_acc(S[mt], [&](int r, int col, float& x) { sS[col * LDK + 16 * mt + r] = from_f32<CT>(x); });
      __syncwarp();
      if constexpr (!LOCAL) {
        // The state entering this chunk, for the output pass: this warp's 16 rows of h^T.
        constexpr int vec = 16 / sizeof(CT), per_row = K / vec;
        CT* dst = hg + (size_t(cbeg + c) * HV + j) * V * K + size_t(wc) * K;
        for (int idx = lane; idx < 16 * per_row; idx += 32) {
          const int r = idx / per_row, e = (idx % per_row) * vec;
          *reinterpret_cast<uint4*>(dst + r * K + e) = *reinterpret_cast<const uint4*>(sS + r * LDK + e);
        }
      }
      const float* Gs = sGs(s);
      const float Gl = KDA ? 0.f : Gs[lc - 1];
      const CT* u = sU(s);
      // v_new = U − W S (64 rows x this warp's 16 columns).
#pragma unroll
      for (int vm = 0; vm < 4; ++vm) {
        float acc[2][4] = {};
        warp_mma<Mma, 2>(acc, View<CT, true>{sW(s) + 16 * vm * LDK, LDK}, View<CT, true>{sS, LDK}, K);
        // Columns past V (the identity columns of a LOCAL run) see U = 0.
        finish_v_new<CT, KDA>(
            acc, 16 * vm, lc, Gs,
            [&](int i, int col) { return wc + col < V ? u[i * LDU + wc + col] : from_f32<CT>(0.f); }, sVn, LDVN);
        if constexpr (!LOCAL)
          store_acc_rows<CT>(acc, AsIs{}, [&](int r, int col) {
            return 16 * vm + r < lc ? vng + (size_t(tc + 16 * vm + r) * HV + j) * V + wc + col : nullptr;
          });
      }
      __syncwarp();
      // S ← e^{G_last} S + Kg^T v_new
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int d0 = 16 * mt;
        for_each_acc(S[mt], [&](int r, int, float& x) { x *= fast_exp<CT>(KDA ? Gs[d0 + r] : Gl); });
        warp_mma<Mma, 2>(S[mt], View<CT, false>{sKg(s) + d0, LDK}, View<CT, true>{sVn, LDVN}, C);
      }
    }
    __syncthreads();
  }
  if (!active) return;
  if constexpr (LOCAL) {
    float* out = a.segbuf + size_t(sg * HV + j) * K * (V + K);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      for_each_acc(S[mt], [&](int r, int c, float& x) { out[size_t(16 * mt + r) * (V + K) + wc + c] = x; });
  } else if (!segmented) {
    float* out = a.state + size_t(n * HV + j) * K * V;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      for_each_acc(S[mt], [&](int r, int c, float& x) { out[size_t(16 * mt + r) * V + wc + c] = x; });
  }
}

// Combine of a segmented state pass: one block (128 threads) per (sequence, value head, 16 columns
// of V), walking the sequence's segments in order: records the state entering each segment, then
// S ← M S + E in fp32; the last value is the final state. M (K x K) is staged in shared memory.
template <int K>
__global__ void __launch_bounds__(128) state_combine_kernel(ChunkArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* sM = reinterpret_cast<float*>(smem);  // [K][K+4]
  float* sS = sM + K * (K + 4);                // [K][16]
  constexpr int LDM = K + 4, RPT = K / 8;      // rows per thread
  const int n = blockIdx.x, j = blockIdx.y, v0 = blockIdx.z * 16, HV = a.HV, V = a.V;
  const int t = threadIdx.x, c = t & 15, r0 = t >> 4;  // thread: column c, rows r0 + 8i
  float* state = a.state + size_t(n * HV + j) * K * V;
  float x[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) x[i] = state[size_t(r0 + 8 * i) * V + v0 + c];
  for (int sg = a.seg_off[n]; sg < a.seg_off[n + 1]; ++sg) {
    float* start = a.segstart + size_t(sg * HV + j) * K * V;
    const float* buf = a.segbuf + size_t(sg * HV + j) * K * (V + K);
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      start[size_t(r0 + 8 * i) * V + v0 + c] = x[i];
      sS[(r0 + 8 * i) * 16 + c] = x[i];
    }
    for (int idx = t; idx < K * K / 4; idx += 128) {
      const int r = idx / (K / 4), m = (idx % (K / 4)) * 4;
      *reinterpret_cast<float4*>(sM + r * LDM + m) = *reinterpret_cast<const float4*>(buf + size_t(r) * (V + K) + V + m);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RPT; ++i) x[i] = buf[size_t(r0 + 8 * i) * (V + K) + v0 + c];
    for (int m = 0; m < K; m += 4) {
      const float s0 = sS[m * 16 + c], s1 = sS[(m + 1) * 16 + c], s2 = sS[(m + 2) * 16 + c], s3 = sS[(m + 3) * 16 + c];
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const float4 mm = *reinterpret_cast<const float4*>(sM + (r0 + 8 * i) * LDM + m);
        x[i] += mm.x * s0 + mm.y * s1 + mm.z * s2 + mm.w * s3;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < RPT; ++i) state[size_t(r0 + 8 * i) * V + v0 + c] = x[i];
}

// ---------------------------------------------------------------------------------------------
// output: one block per (chunk, value head, BV columns of V); warp w computes rows 16·(w%4) and,
// with 8 warps (BV ≥ 64: 2 -> 4 blocks' worth of warps per SM at 80 KB of shared memory), half
// the columns.
template <class CT, int K, int BV>
struct OutSmem {
  static constexpr int kWarps = BV >= 64 ? 8 : 4;
  static constexpr int kLdK = pitch<CT>(K), kLdP = pitch<CT>(C), kLdV = pitch<CT>(BV);
  static constexpr size_t kBytes = sizeof(CT) * (C * kLdK + BV * kLdK + C * kLdP + C * kLdV) + sizeof(float) * C;
};

template <class CT, bool KDA, int K, int BV>
__global__ void __launch_bounds__(OutSmem<CT, K, BV>::kWarps * 32) output_kernel(ChunkArgs a) {
  using L = OutSmem<CT, K, BV>;
  constexpr int LDK = L::kLdK, LDP = L::kLdP, LDV = L::kLdV, NTS = BV / 8 / (L::kWarps / 4);
  extern __shared__ __align__(16) unsigned char smem[];
  const int chunk = blockIdx.x, j = blockIdx.y, v0 = blockIdx.z * BV, h = j / a.group, HV = a.HV, V = a.V;
  const int2 ct = a.chunk_tab[chunk];
  const int t0 = ct.x, len = min(C, a.cu[ct.y + 1] - t0);
  const int warp = threadIdx.x >> 5;
  CT* sQ = reinterpret_cast<CT*>(smem);
  CT* sH = sQ + C * LDK;
  CT* sP = sH + BV * LDK;
  CT* sVn = sP + C * LDP;
  float* sG = reinterpret_cast<float*>(sVn + C * LDV);
  auto tok = [&](int i) { return size_t(t0 + i) * HV + j; };

  constexpr int kThreads = L::kWarps * 32;
  const int qheads = KDA ? HV : a.H, qhead = KDA ? j : h;  // qg per value head, q per key head
  TileCopy<CT, C, K, kThreads>(int64_t(qheads) * K, LDK)
      .load_async(static_cast<const CT*>(KDA ? a.qg : a.q) + (size_t(t0) * qheads + qhead) * K, sQ, len);
  TileCopy<CT, BV, K, kThreads>(K, LDK)
      .load_async(static_cast<const CT*>(a.h) + ((size_t(chunk) * HV + j) * V + v0) * K, sH, BV);
  TileCopy<CT, C, C, kThreads>(int64_t(HV) * C, LDP).load_async(static_cast<const CT*>(a.P) + tok(0) * C, sP, len);
  TileCopy<CT, C, BV, kThreads>(int64_t(HV) * V, LDV)
      .load_async(static_cast<const CT*>(a.vn) + tok(0) * V + v0, sVn, len);
  if (!KDA && threadIdx.x < C) sG[threadIdx.x] = threadIdx.x < len ? a.Gc[tok(threadIdx.x)] : 0.f;
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // P rows hold their causal part only where prep wrote them (j ≤ i); zero the rest.
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int i = idx / C, jj = idx % C;
    if (jj > i) sP[i * LDP + jj] = from_f32<CT>(0.f);
  }
  __syncthreads();
  const int i0 = 16 * (warp & 3), n0 = 8 * NTS * (warp >> 2);  // this warp's rows and columns
  float acc[NTS][4] = {};
  warp_mma<CT, NTS>(acc, View<CT, true>{sQ + i0 * LDK, LDK}, View<CT, true>{sH + n0 * LDK, LDK}, K);
  if constexpr (!KDA) for_each_acc(acc, [&](int r, int, float& x) { x *= a.scale * fast_exp<CT>(sG[i0 + r]); });
  warp_mma<CT, NTS>(acc, View<CT, true>{sP + i0 * LDP, LDP}, View<CT, false>{sVn + n0, LDV}, C);
  CT* o = static_cast<CT*>(a.o);
  store_acc_rows<CT>(acc, AsIs{}, [&](int r, int c) {
    const int i = i0 + r;
    return i < len ? o + tok(i) * V + v0 + n0 + c : nullptr;
  });
}

// ---------------------------------------------------------------------------------------------
template <class CT, class Mma, bool KDA, int K>
void launch_prep(const ChunkArgs& a, int64_t chunks, cudaStream_t stream) {
  const size_t bytes = PrepSmem<CT, KDA, K>(a.V).bytes();
  auto kern = prep_kernel<CT, Mma, KDA, K>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), "prep smem");
  kern<<<dim3(unsigned(chunks), unsigned(a.HV)), kPrepWarps * 32, bytes, stream>>>(a);
  check_cuda(cudaGetLastError(), "delta rule prep kernel");
}

template <class CT, class Mma, bool KDA, int K, int BV>
void launch_state(const ChunkArgs& a, int64_t n_seqs, cudaStream_t stream) {
  using SL = StateSmem<CT, KDA, K, BV>;
  auto kern = state_kernel<CT, Mma, KDA, K, BV>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(SL::kBytes)), "state smem");
  kern<<<dim3(unsigned(n_seqs), unsigned(a.HV), unsigned(a.V / BV)), SL::kWarps * 32, SL::kBytes, stream>>>(a);
  check_cuda(cudaGetLastError(), "delta rule state kernel");
}

template <class CT, bool KDA, int K, int BV>
void launch_output(const ChunkArgs& a, int64_t chunks, cudaStream_t stream) {
  using OL = OutSmem<CT, K, BV>;
  auto kern = output_kernel<CT, KDA, K, BV>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(OL::kBytes)), "output smem");
  kern<<<dim3(unsigned(chunks), unsigned(a.HV), unsigned(a.V / BV)), OL::kWarps * 32, OL::kBytes, stream>>>(a);
  check_cuda(cudaGetLastError(), "delta rule output kernel");
}

// The wide state pass (K ≤ 128, V ≤ 128): 8 warps, 128 columns per block. Segmented, it runs
// three launches: the segments' [E | M] from [0 | I] (V + K columns), the combine along each
// sequence, then the segments again from their entering states, recording h and v_new.
constexpr int kWideWarps = 8;
template <class CT, class Mma, bool KDA, int K>
void launch_wide(const ChunkArgs& a, const StateCfg& st, int64_t n_seqs, cudaStream_t s) {
  using WL = WideSmem<CT, KDA, K, kWideWarps>;
  const size_t bytes = WL::bytes(a.V);
  const unsigned cols = WL::kCols;
  if (st.segmented) {
    auto k1 = state_wide_kernel<CT, Mma, KDA, K, kWideWarps, true>;
    check_cuda(cudaFuncSetAttribute(k1, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), "state smem");
    k1<<<dim3(unsigned(st.nseg), unsigned(a.HV), (unsigned(a.V + K) + cols - 1) / cols), cols * 2, bytes, s>>>(a, 1);
    check_cuda(cudaGetLastError(), "delta rule segment state kernel");
    const size_t cb = sizeof(float) * (K * (K + 4) + K * 16);
    auto kc = state_combine_kernel<K>;
    check_cuda(cudaFuncSetAttribute(kc, cudaFuncAttributeMaxDynamicSharedMemorySize, int(cb)), "combine smem");
    kc<<<dim3(unsigned(n_seqs), unsigned(a.HV), unsigned(a.V / 16)), 128, cb, s>>>(a);
    check_cuda(cudaGetLastError(), "delta rule state combine kernel");
  }
  auto k3 = state_wide_kernel<CT, Mma, KDA, K, kWideWarps, false>;
  check_cuda(cudaFuncSetAttribute(k3, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), "state smem");
  k3<<<dim3(unsigned(st.nseg), unsigned(a.HV), (unsigned(a.V) + cols - 1) / cols), cols * 2, bytes, s>>>(
      a, st.segmented ? 1 : 0);
  check_cuda(cudaGetLastError(), "delta rule wide state kernel");
}

// state_cols: V columns per state block (16 or 32) of the column-tiled pass, or the wide pass.
// The output pass takes as many V columns per block as fit (all of V up to 128 for 16-bit
// inputs), so Q and P are read once per chunk rather than once per column tile: it is the
// memory-bound pass.
template <class CT, class Mma, bool KDA, int K>
void launch(const ChunkArgs& a, int64_t chunks, int64_t n_seqs, const StateCfg& st, cudaStream_t s) {
  launch_prep<CT, Mma, KDA, K>(a, chunks, s);
  if constexpr (K <= 128) {
    if (st.wide) launch_wide<CT, Mma, KDA, K>(a, st, n_seqs, s);
  }
  if (!st.wide) {
    if (st.cols == 32)
      launch_state<CT, Mma, KDA, K, 32>(a, n_seqs, s);
    else
      launch_state<CT, Mma, KDA, K, 16>(a, n_seqs, s);
  }
  if (!a.o) return;  // recording for the backward: no output pass
  if (a.V % 128 == 0 && sizeof(CT) == 2) launch_output<CT, KDA, K, 128>(a, chunks, s);
  else if (a.V % 64 == 0) launch_output<CT, KDA, K, 64>(a, chunks, s);
  else launch_output<CT, KDA, K, 16>(a, chunks, s);
}

template <class CT, class Mma, bool KDA>
void dispatch_k(const ChunkArgs& a, int K, int64_t chunks, int64_t n_seqs, const StateCfg& st, cudaStream_t s) {
  switch (K) {
    case 32:
      return launch<CT, Mma, KDA, 32>(a, chunks, n_seqs, st, s);
    case 64:
      return launch<CT, Mma, KDA, 64>(a, chunks, n_seqs, st, s);
    case 128:
      return launch<CT, Mma, KDA, 128>(a, chunks, n_seqs, st, s);
    case 256:
      return launch<CT, Mma, KDA, 256>(a, chunks, n_seqs, st, s);
  }
}

// Mma: the products' type (mma.cuh's warp_mma), CT itself but for the backward's recompute of
// bf16 inputs, which runs the fp32 kernels with single tf32 products.
template <class CT, class Mma = CT>
void dispatch(const ChunkArgs& a, const DeltaRuleDims& d, int64_t chunks, const StateCfg& st, cudaStream_t s) {
  if (d.gate == DeltaGate::PerKey)
    dispatch_k<CT, Mma, true>(a, int(d.K), chunks, d.num_seqs(), st, s);
  else
    dispatch_k<CT, Mma, false>(a, int(d.K), chunks, d.num_seqs(), st, s);
}

template <class CT>
size_t wide_smem(const DeltaRuleDims& d) {
  auto b = [&](auto kda) {
    constexpr bool KDA = decltype(kda)::value;
    switch (d.K) {
      case 32: return WideSmem<CT, KDA, 32, kWideWarps>::bytes(int(d.V));
      case 64: return WideSmem<CT, KDA, 64, kWideWarps>::bytes(int(d.V));
      case 128: return WideSmem<CT, KDA, 128, kWideWarps>::bytes(int(d.V));
      default: return size_t(1) << 30;
    }
  };
  return d.gate == DeltaGate::PerKey ? b(std::true_type{}) : b(std::false_type{});
}

}  // namespace

void check_delta_dims(const DeltaRuleDims& d, DType dt, const char* what) {
  check(d.H > 0 && d.HV > 0 && d.HV % d.H == 0, std::string(what) + ": HV must be a positive multiple of H");
  check(dt == DType::F32 || dt == DType::F16 || dt == DType::BF16,
        std::string(what) + ": element type must be F32, F16 or BF16, got " + dtype_name(dt));
  check(d.K == 32 || d.K == 64 || d.K == 128 || d.K == 256,
        std::string(what) + ": K must be 32, 64, 128 or 256, got " + std::to_string(d.K));
  check(d.V % 16 == 0 && d.V >= 16 && d.V <= 256,
        std::string(what) + ": V must be a multiple of 16 in [16, 256], got " + std::to_string(d.V));
}

DeltaChunkPlan::DeltaChunkPlan(const DeltaRuleDims& d, DType dt, int state_cols, int seg_chunks) : d_(d), dt_(dt) {
  d.validate();
  check_delta_dims(d, dt, "delta rule chunk (cuda)");
  check(!(dt == DType::F16 && d.gate == DeltaGate::PerKey),
        "delta rule chunk (cuda): KDA needs BF16 or F32 inputs (its sub-chunk decay factors, up to e^{8|g|}, "
        "overflow fp16)");
  check(d.tokens() * d.HV * std::max(d.K, d.V) < (int64_t(1) << 31), "delta rule chunk (cuda): too many tokens");
  const int64_t N = d.num_seqs(), T = d.tokens(), HV = d.HV, K = d.K, V = d.V;
  std::vector<int32_t> tab, cu(N + 1), off(N + 1);
  int64_t max_chunks = 0;
  for (int64_t n = 0; n < N; ++n) {
    off[n] = int32_t(tab.size() / 2);
    cu[n] = int32_t(d.cu_seqlens[n]);
    for (int64_t t = d.cu_seqlens[n]; t < d.cu_seqlens[n + 1]; t += C) {
      tab.push_back(int32_t(t));
      tab.push_back(int32_t(n));
    }
    max_chunks = std::max<int64_t>(max_chunks, tab.size() / 2 - off[n]);
  }
  cu[N] = int32_t(T);
  off[N] = int32_t(tab.size() / 2);
  chunks_ = int64_t(tab.size() / 2);
  check(state_cols == 0 || state_cols == -1 || state_cols == 16 || (state_cols == 32 && d.V % 32 == 0),
        "delta rule chunk (cuda): state_cols must be 0, -1, 16 or 32 (32 only when 32 divides V)");
  int dev = 0, optin = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  const int sms = sm_count(dev);
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "shared memory limit");
  const size_t wbytes = dt == DType::F32 ? wide_smem<float>(d) : wide_smem<__half>(d);
  const bool wide_ok = K <= 128 && V <= 128 && wbytes <= size_t(optin);
  check(state_cols != -1 || wide_ok, "delta rule chunk (cuda): the wide state pass needs K, V <= 128");
  // Measured (H200, bench_delta_rule, 2026-11-27 session 5): the wide pass beats the column-tiled
  // one by 5-7% where sequences x heads fill the multiprocessors and loses 1.6-2.4x below that;
  // segmented it still lost 10-15% to the 16-column pass at (1,65536,16). 32-column tiles beat 16
  // once they give about a block per two multiprocessors (7% at (1,16384,32): 128 blocks), 16
  // beat 32 below (11% at (1,65536,16): 64 blocks).
  const int64_t seqs_heads = std::max<int64_t>(1, N * HV);
  wide_ = state_cols == -1 || (state_cols == 0 && wide_ok && seqs_heads >= sms);
  state_cols_ = state_cols > 0 ? state_cols : (d.V % 32 == 0 && 2 * N * HV * (V / 32) >= sms) ? 32 : 16;
  // Segments of a forced wide pass: where sequences x heads fill under an eighth of the
  // multiprocessors, cut each sequence into runs of seg_len chunks so about one segment x head runs
  // per multiprocessor.
  int64_t seg_len = 0;
  if (wide_ && seg_chunks > 0) seg_len = seg_chunks;
  else if (wide_ && seg_chunks == 0) {
    const int64_t split = sms / std::max<int64_t>(1, N * HV);
    if (split >= 8 && max_chunks >= 16) seg_len = std::max<int64_t>(4, (max_chunks + split - 1) / split);
  }
  segmented_ = seg_len > 0;
  std::vector<int32_t> seg, seg_off(N + 1);
  for (int64_t n = 0; n < N; ++n) {
    seg_off[n] = int32_t(seg.size() / 4);
    const int64_t b0 = d.cu_seqlens[n], e0 = d.cu_seqlens[n + 1];
    if (!segmented_) {
      seg.insert(seg.end(), {int32_t(b0), int32_t(e0), off[n], int32_t(n)});
      continue;
    }
    for (int64_t t = b0, c = off[n]; t < e0; t += seg_len * C, c += seg_len)
      seg.insert(seg.end(), {int32_t(t), int32_t(std::min(e0, t + seg_len * C)), int32_t(c), int32_t(n)});
  }
  seg_off[N] = int32_t(seg.size() / 4);
  nseg_ = int64_t(seg.size() / 4);
  const size_t es = dtype_size(dt), kda = d.gate == DeltaGate::PerKey;
  const size_t sizes[] = {
      tab.size() * 4, cu.size() * 4, off.size() * 4,
      size_t(T * HV) * (kda ? K : 1) * 4,                 // Gc
      size_t(T * HV * K) * es, size_t(T * HV * V) * es,   // W, U
      size_t(T * HV * C) * es,                            // P
      kda ? size_t(T * HV * K) * es : 0, kda ? size_t(T * HV * K) * es : 0,  // kg, qg
      size_t(chunks_ * HV * K * V) * es,                  // h
      size_t(T * HV * V) * es,                            // vn
      seg.size() * 4, seg_off.size() * 4,                 // segment table
      segmented_ ? size_t(nseg_ * HV * K * (K + V)) * 4 : 0,  // segbuf
      segmented_ ? size_t(nseg_ * HV * K * V) * 4 : 0};       // segstart
  size_t offs[std::size(sizes)];
  for (size_t i = 0; i < std::size(sizes); ++i) offs[i] = ws_bytes_, ws_bytes_ += align_up(sizes[i]);
  check_cuda(cudaMalloc(&ws_, std::max<size_t>(ws_bytes_, 256)), "delta rule workspace");
  char* base = static_cast<char*>(ws_);
  check_cuda(cudaMemcpy(base + offs[0], tab.data(), tab.size() * 4, cudaMemcpyHostToDevice), "chunk table upload");
  check_cuda(cudaMemcpy(base + offs[1], cu.data(), cu.size() * 4, cudaMemcpyHostToDevice), "cu_seqlens upload");
  check_cuda(cudaMemcpy(base + offs[2], off.data(), off.size() * 4, cudaMemcpyHostToDevice), "chunk offsets upload");
  check_cuda(cudaMemcpy(base + offs[11], seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), "segments upload");
  check_cuda(cudaMemcpy(base + offs[12], seg_off.data(), seg_off.size() * 4, cudaMemcpyHostToDevice),
             "segment offsets upload");
}

DeltaChunkPlan::~DeltaChunkPlan() {
  cudaFree(ws_);
  cudaFree(in_ws_);
}

void DeltaChunkPlan::forward(const void* q, const void* k, const void* v, const float* g, const float* beta,
                             float scale, float* state, void* o, cudaStream_t stream,
                             const DeltaInputForm& form) const {
  check_delta_input_form(form, "delta rule chunk (cuda)");
  if (form.qk_l2norm) {  // beta and the gate are applied in prep, where they are read
    const size_t es = dtype_size(dt_);
    if (!in_ws_)
      check_cuda(cudaMalloc(&in_ws_, std::max<size_t>(delta_inputs_bytes(d_, es, false), 256)),
                 "delta rule input workspace");
    const DeltaInputs in = delta_inputs_at(in_ws_, d_, es);
    DeltaInputForm rows;
    rows.qk_l2norm = true;
    delta_inputs_forward(d_, rows, dt_, dt_, q, k, nullptr, nullptr, in, stream);
    q = in.q, k = in.k;
  }
  run(q, k, v, g, beta, scale, state, o, nullptr, nullptr, nullptr, false, stream, form);
}

DeltaChunkPlan::Saved DeltaChunkPlan::record(const void* q, const void* k, const void* v, const float* g,
                                             const float* beta, float scale, float* state, float* Tm, float* Mkk,
                                             bool single_tf32, cudaStream_t stream) const {
  check(!single_tf32 || dt_ == DType::F32, "delta rule chunk (cuda): single tf32 products need an F32 plan");
  Saved s{};
  run(q, k, v, g, beta, scale, state, nullptr, Tm, Mkk, &s, single_tf32, stream, {});
  return s;
}

void DeltaChunkPlan::run(const void* q, const void* k, const void* v, const float* g, const float* beta, float scale,
                         float* state, void* o, float* Tm, float* Mkk, Saved* saved, bool single_tf32,
                         cudaStream_t stream, const DeltaInputForm& form) const {
  const size_t es = dtype_size(dt_), kda = d_.gate == DeltaGate::PerKey;
  const int64_t T = d_.tokens(), HV = d_.HV, K = d_.K, V = d_.V;
  char* p = static_cast<char*>(ws_);
  auto take = [&](size_t bytes) {
    char* r = p;
    p += align_up(bytes);
    return r;
  };
  ChunkArgs a{};
  a.q = q, a.k = k, a.v = v, a.g = g, a.beta = beta, a.scale = scale, a.state = state, a.o = o;
  a.chunk_tab = reinterpret_cast<const int2*>(take(size_t(chunks_) * 8));
  a.cu = reinterpret_cast<const int*>(take(size_t(d_.num_seqs() + 1) * 4));
  a.chunk_off = reinterpret_cast<const int*>(take(size_t(d_.num_seqs() + 1) * 4));
  a.H = int(d_.H), a.HV = int(HV), a.V = int(V), a.group = int(HV / d_.H);
  a.Gc = reinterpret_cast<float*>(take(size_t(T * HV) * (kda ? K : 1) * 4));
  a.W = take(size_t(T * HV * K) * es);
  a.U = take(size_t(T * HV * V) * es);
  a.P = take(size_t(T * HV * C) * es);
  a.kg = take(kda ? size_t(T * HV * K) * es : 0);
  a.qg = take(kda ? size_t(T * HV * K) * es : 0);
  a.h = take(size_t(chunks_ * HV * K * V) * es);
  a.vn = take(size_t(T * HV * V) * es);
  a.seg = reinterpret_cast<const int4*>(take(size_t(nseg_) * 16));
  a.seg_off = reinterpret_cast<const int*>(take(size_t(d_.num_seqs() + 1) * 4));
  a.segbuf = reinterpret_cast<float*>(take(segmented_ ? size_t(nseg_ * HV * K * (K + V)) * 4 : 0));
  a.segstart = reinterpret_cast<float*>(take(segmented_ ? size_t(nseg_ * HV * K * V) * 4 : 0));
  a.Tm = Tm, a.Mkk = Mkk;
  a.form = form;
  a.form.qk_l2norm = false;
  if (saved)
    *saved = Saved{a.chunk_tab, a.cu, a.chunk_off, a.Gc, a.W, a.P, a.kg, a.qg, a.h, a.vn};
  if (chunks_ == 0) return;
  check(d_.gate != DeltaGate::PerKey || reinterpret_cast<uintptr_t>(g) % 16 == 0,
        "delta rule chunk (cuda): KDA gates must be 16-byte aligned");
  StateCfg st;
  st.wide = wide_, st.segmented = segmented_, st.cols = state_cols_, st.nseg = nseg_;
  switch (dt_) {
    case DType::F32:
      return single_tf32 ? dispatch<float, tf32>(a, d_, chunks_, st, stream)
                         : dispatch<float>(a, d_, chunks_, st, stream);
    case DType::F16: return dispatch<__half>(a, d_, chunks_, st, stream);
    default: return dispatch<__nv_bfloat16>(a, d_, chunks_, st, stream);
  }
}

}  // namespace hla::cuda
