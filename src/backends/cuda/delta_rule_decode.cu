// Recurrent decode / verify of the delta rule on CUDA, states in a slot pool.
//
// Work item: (sequence, value head, COLS = 32 or 16 columns of V), handled by a block of 128
// threads. The item's slice of the state, K x COLS fp32, stays in registers across the step's
// tokens: thread (row group rr, column group cg) holds rows rr, rr + RG, ... of columns
// 4cg..4cg+3 as float4, so each warp reads whole 64- or 128-byte row pieces per load. Decode is a
// state read + write: 2·K·V·4 bytes per (sequence, head), and the two reductions over K per token
// (S'^T k and S^T q) go through warp shuffles and one small shared-memory exchange in a fixed order
// (deterministic).
// Large batches take 32 columns, one block per item, every load issued at the block's start:
// batch 256 at H = 32, K = V = 128 in 283 µs on an H200 (GDN, 3.8 TB/s; KDA 293 µs). The 16-column
// kernel before it spent issue slots on per-item work (ncu: 0.52 warp instructions per scheduler
// cycle at 3.37 TB/s); 32 columns halve that per byte. Small batches (and K = 256, or V not a
// multiple of 32) take 16 columns on a persistent grid whose blocks copy the next item's slice in
// while they work on the current one.
#include <algorithm>

#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/delta_rule_inputs.h"
#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/launch.cuh"
#include "backends/cuda/mma.cuh"
#include "core/error.h"

namespace hla::cuda {
namespace {

struct DecodeArgs {
  const void *q, *k, *v;
  const float *g, *beta;
  float scale;
  float* pool;
  const int32_t* slot_in;
  const int32_t* slot_out;
  void* o;
  int tokens, H, HV, V, group;
  int64_t ld_qk, ld_v;  // token strides of q/k and of v
  int seqs;
  int items;  // seqs x value heads x V / COLS (set at launch)
  DeltaInputForm form;
};

// Sum over the block's row groups of a per-thread float4 (TPR threads per row: lanes l and l ^ m
// for m ≥ TPR hold the same columns); every thread gets the total of its column group.
// red: [4 warps][TPR] float4.
template <int TPR>
__device__ __forceinline__ float4 reduce_rows(float4 x, float4* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = TPR; m < 32; m <<= 1) {
    x.x += __shfl_xor_sync(~0u, x.x, m);
    x.y += __shfl_xor_sync(~0u, x.y, m);
    x.z += __shfl_xor_sync(~0u, x.z, m);
    x.w += __shfl_xor_sync(~0u, x.w, m);
  }
  if (lane < TPR) red[warp * TPR + lane] = x;
  __syncthreads();
  const int cg = lane % TPR;
  float4 s = red[cg];
#pragma unroll
  for (int w = 1; w < 4; ++w) {
    const float4 t = red[w * TPR + cg];
    s.x += t.x, s.y += t.y, s.z += t.z, s.w += t.w;
  }
  return s;
}

// Items of 16 columns are small (8 KB of state at K = 128), so a block works through several and
// copies the next one's slice in while it works; items of 32 columns are one per block, all loads
// issued at the start, and the block scheduler overlaps them (FLA's layout for KDA).
template <int COLS>
constexpr bool kPersistent = COLS == 16;

// kForm: a.form is not plain (its transforms run per token: the q/k norms through one more block
// reduction, beta and the gate on the raw values each thread reads).
template <class CT, bool KDA, int K, int COLS, bool kForm>
__global__ void __launch_bounds__(128) decode_kernel(DecodeArgs a) {
  constexpr int TPR = COLS / 4, RG = 128 / TPR, RPT = K / RG;  // threads per row, row groups, rows per thread
  __shared__ float4 red[kForm ? 3 : 2][4 * TPR];
  pdl_begin();
  const int HV = a.HV, V = a.V, nvb = V / COLS, cg = threadIdx.x % TPR, rr = threadIdx.x / TPR;
  const CT* q = static_cast<const CT*>(a.q);
  const CT* k = static_cast<const CT*>(a.k);
  const CT* v = static_cast<const CT*>(a.v);
  CT* o = static_cast<CT*>(a.o);
  auto slice = [&](int slot, int j) { return a.pool + (size_t(slot) * HV + j) * K * V; };
  auto slice_row = [&](int item, int p) {  // this thread's row p of the item's slice
    const int n = item / (HV * nvb), j = item / nvb % HV, c0 = item % nvb * COLS + 4 * cg;
    return slice(a.slot_in[n], j) + size_t(rr + RG * p) * V + c0;
  };
  // 16 columns: the next item's slice is copied into shared memory (cp.async) while this one is
  // processed, in flight without holding registers, so as many blocks fit as without the prefetch.
  // Each thread copies the float4s it reads back itself, so its own wait suffices (no barrier).
  __shared__ float4 next[RPT][128];

  float4 S[RPT];
#pragma unroll
  for (int p = 0; p < RPT; ++p) S[p] = *reinterpret_cast<const float4*>(slice_row(blockIdx.x, p));
  for (int item = blockIdx.x; item < a.items; item += gridDim.x) {
    const bool more = kPersistent<COLS> && item + int(gridDim.x) < a.items;
    if (more) {
#pragma unroll
      for (int p = 0; p < RPT; ++p) cp_async16(&next[p][threadIdx.x], slice_row(item + gridDim.x, p), true);
      cp_async_commit();
    }
    const int n = item / (HV * nvb), j = item / nvb % HV, h = j / a.group, c0 = item % nvb * COLS + 4 * cg;
    for (int t = 0; t < a.tokens; ++t) {
      const size_t tk = size_t(n) * a.tokens + t, th = tk * HV + j;
      float kr[RPT], qr[RPT];
#pragma unroll
      for (int p = 0; p < RPT; ++p) {
        const int d = rr + RG * p;
        kr[p] = to_f32(k[tk * a.ld_qk + h * K + d]);
        qr[p] = to_f32(q[tk * a.ld_qk + h * K + d]);
      }
      float q_scale = a.scale;
      if constexpr (kForm) {
        if (a.form.qk_l2norm) {  // the threads of a column group hold all K rows between them
          float4 sq = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int p = 0; p < RPT; ++p) sq.x += kr[p] * kr[p], sq.y += qr[p] * qr[p];
          sq = reduce_rows<TPR>(sq, red[2]);
          const float ik = l2_inverse(sq.x);
#pragma unroll
          for (int p = 0; p < RPT; ++p) kr[p] *= ik;
          q_scale *= l2_inverse(sq.y);
        }
      }
#pragma unroll
      for (int p = 0; p < RPT; ++p) {
        const int d = rr + RG * p;
        qr[p] *= q_scale;
        float g = KDA ? a.g[th * K + d] : a.g[th];
        if constexpr (kForm) g = KDA ? form_gate(a.form, g, int64_t(j) * K + d, K) : form_gate(a.form, g, j, 1);
        const float dec = expf(g);
        S[p].x *= dec, S[p].y *= dec, S[p].z *= dec, S[p].w *= dec;
      }
      float4 kv = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int p = 0; p < RPT; ++p) {
        kv.x += S[p].x * kr[p], kv.y += S[p].y * kr[p], kv.z += S[p].z * kr[p], kv.w += S[p].w * kr[p];
      }
      kv = reduce_rows<TPR>(kv, red[0]);
      const float b = kForm ? form_beta(a.form, a.beta[th]) : a.beta[th];
      const CT* vt = v + tk * a.ld_v + j * V + c0;
      const float4 u = {b * (to_f32(vt[0]) - kv.x), b * (to_f32(vt[1]) - kv.y), b * (to_f32(vt[2]) - kv.z),
                        b * (to_f32(vt[3]) - kv.w)};
      float4 ov = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int p = 0; p < RPT; ++p) {
        S[p].x += kr[p] * u.x, S[p].y += kr[p] * u.y, S[p].z += kr[p] * u.z, S[p].w += kr[p] * u.w;
        ov.x += S[p].x * qr[p], ov.y += S[p].y * qr[p], ov.z += S[p].z * qr[p], ov.w += S[p].w * qr[p];
      }
      ov = reduce_rows<TPR>(ov, red[1]);
      if (threadIdx.x < TPR) {
        CT* ot = o + th * V + c0;
        ot[0] = from_f32<CT>(ov.x), ot[1] = from_f32<CT>(ov.y), ot[2] = from_f32<CT>(ov.z), ot[3] = from_f32<CT>(ov.w);
      }
      if (a.slot_out) {
        float* dst = slice(a.slot_out[tk], j);
#pragma unroll
        for (int p = 0; p < RPT; ++p) *reinterpret_cast<float4*>(dst + size_t(rr + RG * p) * V + c0) = S[p];
      }
      // red[0] is rewritten next token (or item): every thread has read it before reaching red[1]'s
      // barrier.
    }
    if (!a.slot_out) {
      float* dst = slice(a.slot_in[n], j);
#pragma unroll
      for (int p = 0; p < RPT; ++p) *reinterpret_cast<float4*>(dst + size_t(rr + RG * p) * V + c0) = S[p];
    }
    if (more) {
      cp_async_wait<0>();
#pragma unroll
      for (int p = 0; p < RPT; ++p) S[p] = next[p][threadIdx.x];
    }
  }
}

// The 16-column kernel runs a persistent grid (as many blocks as fit on the card at once, at most
// one per item, counted once per kernel); the 32-column kernel one block per item.
template <class CT, bool KDA, int K, int COLS, bool kForm = false>
int resident_blocks() {
  static const int n = blocks_on_card(reinterpret_cast<const void*>(decode_kernel<CT, KDA, K, COLS, kForm>), 128);
  return n;
}

template <class CT, bool KDA, int K, int COLS>
void launch_k(DecodeArgs a, cudaStream_t s) {
  a.items = a.seqs * a.HV * (a.V / COLS);
  auto run = [&](auto form) {
    constexpr bool kForm = decltype(form)::value;
    const int grid = kPersistent<COLS> ? std::min(a.items, resident_blocks<CT, KDA, K, COLS, kForm>()) : a.items;
    launch_pdl("delta rule decode kernel", decode_kernel<CT, KDA, K, COLS, kForm>, dim3(unsigned(grid)), 128, 0, s, a);
  };
  if (a.form.plain())
    run(std::false_type{});
  else
    run(std::true_type{});
}

// Automatic choice: 32 columns where V allows, the slice fits in registers (K ≤ 128) and the items
// fill the card's resident blocks at least 8 times over: batch 64 and 256 (12 and 49 times) run
// 5–12% faster that way, while in the 2B model's batch-16 step (3 times) a persistent 32-column
// kernel made the step 2.5% slower.
template <class CT, bool KDA, int K>
void launch_cols(const DecodeArgs& a, int columns, cudaStream_t s) {
  constexpr bool kMay32 = K <= 128;  // a 32-column slice fits in registers
  const bool can32 = kMay32 && a.V % 32 == 0;
  if (columns == 0) {
    columns = 16;
    if constexpr (kMay32)
      if (can32 && a.seqs * a.HV * (a.V / 32) >= 8 * resident_blocks<CT, KDA, K, 32>()) columns = 32;
  }
  check(columns == 16 || (columns == 32 && can32),
        "delta rule decode (cuda): columns must be 16, or 32 with K <= 128 and V a multiple of 32");
  if constexpr (kMay32)
    if (columns == 32) return launch_k<CT, KDA, K, 32>(a, s);
  launch_k<CT, KDA, K, 16>(a, s);
}

template <class CT, bool KDA>
void launch(const DecodeArgs& a, int K, int columns, cudaStream_t s) {
  switch (K) {
    case 32:
      return launch_cols<CT, KDA, 32>(a, columns, s);
    case 64:
      return launch_cols<CT, KDA, 64>(a, columns, s);
    case 128:
      return launch_cols<CT, KDA, 128>(a, columns, s);
    case 256:
      return launch_cols<CT, KDA, 256>(a, columns, s);
  }
}

template <class CT>
void dispatch(const DecodeArgs& a, const DeltaRuleDims& d, int columns, cudaStream_t s) {
  if (d.gate == DeltaGate::PerKey)
    launch<CT, true>(a, int(d.K), columns, s);
  else
    launch<CT, false>(a, int(d.K), columns, s);
}

}  // namespace

void delta_rule_decode(const DeltaRuleDims& d, DType dt, int64_t n_seqs, int64_t tokens, const void* q, const void* k,
                       const void* v, const float* g, const float* beta, float scale, float* state_pool,
                       const int32_t* slot_in, const int32_t* slot_out, void* o, cudaStream_t stream, int64_t ld,
                       int columns, const DeltaInputForm& form) {
  check_delta_dims(d, dt, "delta rule decode (cuda)");
  check_delta_input_form(form, "delta rule decode (cuda)");
  check(n_seqs > 0 && tokens > 0, "delta rule decode (cuda): need at least one sequence and one token");
  DecodeArgs a{q,
               k,
               v,
               g,
               beta,
               scale,
               state_pool,
               slot_in,
               slot_out,
               o,
               int(tokens),
               int(d.H),
               int(d.HV),
               int(d.V),
               int(d.HV / d.H),
               ld > 0 ? ld : d.H * d.K,
               ld > 0 ? ld : d.HV * d.V,
               int(n_seqs),
               0,
               form};
  switch (dt) {
    case DType::F32:
      return dispatch<float>(a, d, columns, stream);
    case DType::F16:
      return dispatch<__half>(a, d, columns, stream);
    default:
      return dispatch<__nv_bfloat16>(a, d, columns, stream);
  }
}

}  // namespace hla::cuda
