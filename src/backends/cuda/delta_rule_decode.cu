// Recurrent decode / verify of the delta rule on CUDA, states in a slot pool.
//
// One block of 128 threads per (sequence, value head, 16 columns of V). The block's slice of the
// state, K x 16 fp32, stays in registers across the step's tokens: thread (row group rr, column
// group cg) holds rows rr, rr+32, ... of columns 4cg..4cg+3 as float4, so each warp reads 8 rows
// x 64 contiguous bytes per load. Decode is a state read + write: 2·K·V·4 bytes per (sequence,
// head), and the two reductions over K per token (S'^T k and S^T q) go through warp shuffles and
// one small shared-memory exchange in a fixed order (deterministic).
#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/launch.cuh"
#include "backends/cuda/mma.cuh"
#include "core/error.h"

namespace hla::cuda {
namespace {

constexpr int kCols = 16;  // V columns per block

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
};

// Sum over the block's 32 row groups of a per-thread float4; every thread gets the total of its
// column group. red: [4 warps][16] floats.
__device__ __forceinline__ float4 reduce_rows(float4 x, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 4; m < 32; m <<= 1) {
    x.x += __shfl_xor_sync(~0u, x.x, m);
    x.y += __shfl_xor_sync(~0u, x.y, m);
    x.z += __shfl_xor_sync(~0u, x.z, m);
    x.w += __shfl_xor_sync(~0u, x.w, m);
  }
  if (lane < 4) reinterpret_cast<float4*>(red)[warp * 4 + lane] = x;
  __syncthreads();
  const int cg = lane & 3;
  float4 s = reinterpret_cast<const float4*>(red)[cg];
#pragma unroll
  for (int w = 1; w < 4; ++w) {
    const float4 t = reinterpret_cast<const float4*>(red)[w * 4 + cg];
    s.x += t.x, s.y += t.y, s.z += t.z, s.w += t.w;
  }
  return s;
}

template <class CT, bool KDA, int K>
__global__ void __launch_bounds__(128) decode_kernel(DecodeArgs a) {
  constexpr int RPT = K / 32;  // rows per thread
  __shared__ float4 red[2][16];
  pdl_begin();
  const int n = blockIdx.x, j = blockIdx.y, v0 = blockIdx.z * kCols, h = j / a.group;
  const int HV = a.HV, V = a.V, cg = threadIdx.x & 3, rr = threadIdx.x >> 2;
  const int c0 = v0 + 4 * cg;
  const CT* q = static_cast<const CT*>(a.q);
  const CT* k = static_cast<const CT*>(a.k);
  const CT* v = static_cast<const CT*>(a.v);
  CT* o = static_cast<CT*>(a.o);
  auto slice = [&](int slot) { return a.pool + (size_t(slot) * HV + j) * K * V; };

  float4 S[RPT];
  {
    const float* src = slice(a.slot_in[n]);
#pragma unroll
    for (int p = 0; p < RPT; ++p) S[p] = *reinterpret_cast<const float4*>(src + size_t(rr + 32 * p) * V + c0);
  }
  for (int t = 0; t < a.tokens; ++t) {
    const size_t tk = size_t(n) * a.tokens + t, th = tk * HV + j;
    float kr[RPT], qr[RPT];
#pragma unroll
    for (int p = 0; p < RPT; ++p) {
      const int d = rr + 32 * p;
      kr[p] = to_f32(k[tk * a.ld_qk + h * K + d]);
      qr[p] = to_f32(q[tk * a.ld_qk + h * K + d]) * a.scale;
      const float dec = expf(KDA ? a.g[th * K + d] : a.g[th]);
      S[p].x *= dec, S[p].y *= dec, S[p].z *= dec, S[p].w *= dec;
    }
    float4 kv = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int p = 0; p < RPT; ++p) {
      kv.x += S[p].x * kr[p], kv.y += S[p].y * kr[p], kv.z += S[p].z * kr[p], kv.w += S[p].w * kr[p];
    }
    kv = reduce_rows(kv, reinterpret_cast<float*>(red[0]));
    const float b = a.beta[th];
    const CT* vt = v + tk * a.ld_v + j * V + c0;
    const float4 u = {b * (to_f32(vt[0]) - kv.x), b * (to_f32(vt[1]) - kv.y), b * (to_f32(vt[2]) - kv.z),
                      b * (to_f32(vt[3]) - kv.w)};
    float4 ov = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int p = 0; p < RPT; ++p) {
      S[p].x += kr[p] * u.x, S[p].y += kr[p] * u.y, S[p].z += kr[p] * u.z, S[p].w += kr[p] * u.w;
      ov.x += S[p].x * qr[p], ov.y += S[p].y * qr[p], ov.z += S[p].z * qr[p], ov.w += S[p].w * qr[p];
    }
    ov = reduce_rows(ov, reinterpret_cast<float*>(red[1]));
    if (threadIdx.x < 4) {
      CT* ot = o + th * V + c0;
      ot[0] = from_f32<CT>(ov.x), ot[1] = from_f32<CT>(ov.y), ot[2] = from_f32<CT>(ov.z), ot[3] = from_f32<CT>(ov.w);
    }
    if (a.slot_out) {
      float* dst = slice(a.slot_out[tk]);
#pragma unroll
      for (int p = 0; p < RPT; ++p) *reinterpret_cast<float4*>(dst + size_t(rr + 32 * p) * V + c0) = S[p];
    }
    // red[0] is rewritten next token: every thread has read it before reaching red[1]'s barrier.
  }
  if (!a.slot_out) {
    float* dst = slice(a.slot_in[n]);
#pragma unroll
    for (int p = 0; p < RPT; ++p) *reinterpret_cast<float4*>(dst + size_t(rr + 32 * p) * V + c0) = S[p];
  }
}

template <class CT, bool KDA>
void launch(const DecodeArgs& a, int K, int64_t n_seqs, cudaStream_t s) {
  const dim3 grid(unsigned(n_seqs), unsigned(a.HV), unsigned(a.V / kCols));
  const char* what = "delta rule decode kernel";
  switch (K) {
    case 32:
      return launch_pdl(what, decode_kernel<CT, KDA, 32>, grid, 128, 0, s, a);
    case 64:
      return launch_pdl(what, decode_kernel<CT, KDA, 64>, grid, 128, 0, s, a);
    case 128:
      return launch_pdl(what, decode_kernel<CT, KDA, 128>, grid, 128, 0, s, a);
    case 256:
      return launch_pdl(what, decode_kernel<CT, KDA, 256>, grid, 128, 0, s, a);
  }
}

template <class CT>
void dispatch(const DecodeArgs& a, const DeltaRuleDims& d, int64_t n_seqs, cudaStream_t s) {
  if (d.gate == DeltaGate::PerKey) launch<CT, true>(a, int(d.K), n_seqs, s);
  else launch<CT, false>(a, int(d.K), n_seqs, s);
}

}  // namespace

void delta_rule_decode(const DeltaRuleDims& d, DType dt, int64_t n_seqs, int64_t tokens, const void* q, const void* k,
                       const void* v, const float* g, const float* beta, float scale, float* state_pool,
                       const int32_t* slot_in, const int32_t* slot_out, void* o, cudaStream_t stream, int64_t ld) {
  check_delta_dims(d, dt, "delta rule decode (cuda)");
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
               ld > 0 ? ld : d.HV * d.V};
  switch (dt) {
    case DType::F32: return dispatch<float>(a, d, n_seqs, stream);
    case DType::F16: return dispatch<__half>(a, d, n_seqs, stream);
    default: return dispatch<__nv_bfloat16>(a, d, n_seqs, stream);
  }
}

}  // namespace hla::cuda
