// CudaDevice: see cuda_device.h. Dense GEMMs go through cuBLASLt; the delta rule through the chunk
// and decode kernels (delta_rule_cuda.h) where their shapes fit, else an fp32 recurrence kernel;
// attention through attention_flash in bf16 mode, else the fp32 reference kernel; everything else
// is a small kernel per operation below. One stream; the host only waits in to_host().
#include <cooperative_groups.h>
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "backends/cuda/attention_cuda.h"
#include "backends/cuda/cuda_device.h"
#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/launch.cuh"
#include "backends/cuda/mma.cuh"
#include "backends/cuda/moe_cuda.h"
#include "core/error.h"

namespace hla::cuda {
namespace {

using Strides = Device::Strides;
constexpr int kThreads = 256;

int grid_for(int64_t n, int threads = kThreads) {
  return int(std::clamp<int64_t>((n + threads - 1) / threads, 1, 65535 * 16));
}
#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

void check_lt(cublasStatus_t s, const char* what) {
  check(s == CUBLAS_STATUS_SUCCESS, std::string("cublasLt: ") + what + " failed (status " + std::to_string(int(s)) + ")");
}

// Sum over the block in a fixed order (deterministic); every thread gets the total.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // part[] may still be read from the previous call
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0;
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) t += part[w];
  return t;
}

// ---- elementwise and row kernels ------------------------------------------------------------

// V consecutive floats (V a multiple of 4: 16-byte accesses; the caller checks alignment).
template <int V>
__device__ __forceinline__ void load_v(const float* p, float (&v)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      v[i] = a.x, v[i + 1] = a.y, v[i + 2] = a.z, v[i + 3] = a.w;
    }
  } else {
    for (int i = 0; i < V; ++i) v[i] = p[i];
  }
}
// V consecutive bf16 values as floats (one 16-byte load per 8, or one 8-byte load per 4).
template <int V>
__device__ __forceinline__ void load_v(const __nv_bfloat16* p, float (&v)[V]) {
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(p + i);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(w[j]));
        v[i + 2 * j] = f.x, v[i + 2 * j + 1] = f.y;
      }
    }
  } else if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const uint2 u = *reinterpret_cast<const uint2*>(p + i);
      const float2 lo = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(u.x));
      const float2 hi = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(u.y));
      v[i] = lo.x, v[i + 1] = lo.y, v[i + 2] = hi.x, v[i + 3] = hi.y;
    }
  } else {
    for (int i = 0; i < V; ++i) v[i] = __bfloat162float(p[i]);
  }
}

// V consecutive values of type In as loaded, converted to floats only where used: a load's
// register is waited for at its first use, so a bf16 load converted at once (load_v) stalls the
// thread right there, while one converted a token later stays in flight meanwhile.
template <int V, class In>
struct RawValues {
  static constexpr int kBytes = V * int(sizeof(In));
  static_assert(kBytes % 4 == 0, "whole 32-bit words");
  uint32_t w[kBytes / 4];
  __device__ __forceinline__ void load(const In* p) {
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
      for (int i = 0; i < kBytes / 16; ++i) {
        const uint4 u = reinterpret_cast<const uint4*>(p)[i];
        w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
      }
    } else if constexpr (kBytes % 8 == 0) {
#pragma unroll
      for (int i = 0; i < kBytes / 8; ++i) {
        const uint2 u = reinterpret_cast<const uint2*>(p)[i];
        w[2 * i] = u.x, w[2 * i + 1] = u.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kBytes / 4; ++i) w[i] = reinterpret_cast<const uint32_t*>(p)[i];
    }
  }
  __device__ __forceinline__ void to_float(float (&v)[V]) const {
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i)
      if constexpr (sizeof(In) == 2) {
        const float2 f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(w[i]));
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
      } else {
        v[i] = __uint_as_float(w[i]);
      }
  }
};

template <int V>
__device__ __forceinline__ void store_v(float* p, const float (&v)[V]) {
  if constexpr (V == 4)
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  else
    for (int i = 0; i < V; ++i) p[i] = v[i];
}
// The same, rounded to bf16 (V == 8: one 16-byte store; V == 4: one 8-byte store).
template <int V>
__device__ __forceinline__ void store_v(__nv_bfloat16* p, const float (&v)[V]) {
  if constexpr (V == 8) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
  } else if constexpr (V == 4) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<uint2*>(p) =
        make_uint2(reinterpret_cast<const uint32_t&>(lo), reinterpret_cast<const uint32_t&>(hi));
  } else {
    for (int i = 0; i < V; ++i) p[i] = __float2bfloat16_rn(v[i]);
  }
}
// The largest power of two (4 to 256) that p's address is a multiple of.
int ptr_alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 4 && a % uintptr_t(al) != 0) al /= 2;
  return al;
}
// 4 when rows of `width` floats at stride ld from p allow 16-byte accesses, else 1.
int vec_width(const void* p, int64_t width, int64_t ld) {
  return width % 4 == 0 && ld % 4 == 0 && ptr_alignment(p) >= 16 ? 4 : 1;
}

template <class W>
__global__ void embed_kernel(const W* table, const int32_t* ids, float* out, int64_t T, int64_t D) {
  pdl_begin();
  GRID_STRIDE(i, T * D) out[i] = float(table[int64_t(ids[i / D]) * D + i % D]);
}

__global__ void add_kernel(float* h, const float* y, int64_t n) {
  pdl_begin();
  GRID_STRIDE(i, n) h[i] += y[i];
}

__global__ void copy3_kernel(float* dst, Strides d, const float* src, Strides s, int64_t n0, int64_t n1, int64_t n2) {
  pdl_begin();
  GRID_STRIDE(i, n0 * n1 * n2) {
    const int64_t c = i % n2, b = (i / n2) % n1, a = i / (n1 * n2);
    dst[a * d.s0 + b * d.s1 + c * d.s2] = src[a * s.s0 + b * s.s1 + c * s.s2];
  }
}

// A row's values a thread keeps in registers between the sum of squares and the scaling (rows of
// up to 8 × 1024 with row_threads: no second read), all its loads in flight together: with 4, the
// residual norm of the 2.0B model's 32K-token prefill (fp32 rows in, bf16 operand out) moved 2.5
// TB/s (H200). The norm weights are read before pdl_begin() (constant), so that load overlaps the
// kernel before.
constexpr int kRowRegs = 8;
// RMSNorm's pieces, as cpu::rms_norm: the weight of channel i (Qwen3-Next/3.5 store w − 1) and
// 1 / rms from a row's sum of squares.
__device__ __forceinline__ float norm_weight(const float* w, int64_t i, bool zero_centered) {
  return zero_centered ? 1.0f + w[i] : w[i];
}
__device__ __forceinline__ float rms_inverse(float sum_sq, int64_t dim, float eps) {
  return 1.0f / sqrtf(sum_sq / float(dim) + eps);
}
__device__ __forceinline__ void load_norm_weights(const float* w, int64_t dim, bool zero_centered,
                                                  float (&wr)[kRowRegs]) {
#pragma unroll
  for (int j = 0; j < kRowRegs; ++j) {
    const int64_t i = threadIdx.x + j * int64_t(blockDim.x);
    wr[j] = i < dim ? norm_weight(w, i, zero_centered) : 0.0f;
  }
}

// Writes y = row · rsqrt(mean square + eps) · w for one block's row: v holds this thread's first
// kRowRegs values, wr their weights; the rest of a long row is read again from `row`.
// y (and yb, the same rows in bf16: a GEMM's operand) = the normalised row; either may be null.
__device__ __forceinline__ void rms_scale_row(const float (&v)[kRowRegs], const float (&wr)[kRowRegs], const float* row,
                                              const float* w, float* y, __nv_bfloat16* yb, int64_t dim, float eps,
                                              bool zero_centered) {
  const int64_t tail = threadIdx.x + kRowRegs * int64_t(blockDim.x);
  float ss = 0;
#pragma unroll
  for (int j = 0; j < kRowRegs; ++j) ss += v[j] * v[j];
  for (int64_t i = tail; i < dim; i += blockDim.x) ss += row[i] * row[i];
  const float s = rms_inverse(block_sum(ss), dim, eps);
  auto put = [&](int64_t i, float value) {
    if (y) y[i] = value;
    if (yb) yb[i] = __float2bfloat16_rn(value);
  };
#pragma unroll
  for (int j = 0; j < kRowRegs; ++j) {
    const int64_t i = threadIdx.x + j * int64_t(blockDim.x);
    if (i < dim) put(i, v[j] * s * wr[j]);
  }
  for (int64_t i = tail; i < dim; i += blockDim.x) put(i, row[i] * s * norm_weight(w, i, zero_centered));
}

__global__ void rms_norm_kernel(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t dim,
                                float eps, bool zero_centered) {
  float wr[kRowRegs], v[kRowRegs];
  load_norm_weights(w, dim, zero_centered, wr);
  pdl_begin();
  const float* xr = x + blockIdx.x * ldx;
#pragma unroll
  for (int j = 0; j < kRowRegs; ++j) {
    const int64_t i = threadIdx.x + j * int64_t(blockDim.x);
    v[j] = i < dim ? xr[i] : 0.0f;
  }
  rms_scale_row(v, wr, xr, w, y + blockIdx.x * ldy, nullptr, dim, eps, zero_centered);
}

// RMSNorm of the residual stream's row into x and/or xb (bf16: the next GEMM's operand, so no
// conversion pass reads x again); one block per row.
__global__ void residual_norm_kernel(const float* h, const float* w, float* x, __nv_bfloat16* xb, int64_t dim,
                                     float eps, bool zero_centered) {
  float wr[kRowRegs], v[kRowRegs];
  load_norm_weights(w, dim, zero_centered, wr);
  pdl_begin();
  const float* hr = h + blockIdx.x * dim;
#pragma unroll
  for (int j = 0; j < kRowRegs; ++j) {
    const int64_t i = threadIdx.x + j * int64_t(blockDim.x);
    v[j] = i < dim ? hr[i] : 0.0f;
  }
  rms_scale_row(v, wr, hr, w, x ? x + blockIdx.x * dim : nullptr, xb ? xb + blockIdx.x * dim : nullptr, dim, eps,
                zero_centered);
}

__global__ void layer_norm_kernel(const float* x, const float* w, const float* b, float* y, int64_t dim, float eps) {
  pdl_begin();
  const float* xr = x + blockIdx.x * dim;
  float* yr = y + blockIdx.x * dim;
  float sum = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i];
  const float mean = block_sum(sum) / float(dim);
  float var = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) var += (xr[i] - mean) * (xr[i] - mean);
  const float s = 1.0f / sqrtf(block_sum(var) / float(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = (xr[i] - mean) * s * w[i] + b[i];
}

// The output gate of the gated RMS norm: SiLU (Gated DeltaNet) or sigmoid (KDA).
__device__ __forceinline__ float norm_gate(float x, bool silu) { return silu ? x * sigmoidf(x) : sigmoidf(x); }

// One warp per (token, head) row of o (rows of 128: 262K rows at 8K tokens × 32 heads). A lane keeps
// up to 8 of the row's values (dims ≤ 256) in registers: o, gate and weight are loaded together.
// y = the normalised rows: o itself (fp32, in place), or the output projection's bf16 operand read
// from the delta-rule op's bf16 output (the same roundings as unpacking o and packing y).
template <class In, class Out, class G>
__global__ void gated_rms_norm_kernel(const In* o, Out* y, const G* gate, int64_t ld_gate, const float* w, int64_t rows,
                                      int64_t heads, int64_t dim, float eps, bool silu_gate) {
  constexpr int kRegs = 8;
  const int lane = threadIdx.x & 31;
  float wr[kRegs], v[kRegs], a[kRegs];
#pragma unroll
  for (int j = 0; j < kRegs; ++j) wr[j] = lane + 32 * j < dim ? w[lane + 32 * j] : 0.0f;
  pdl_begin();
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  if (row >= rows) return;
  const In* orow = o + row * dim;
  Out* yrow = y + row * dim;
  const G* g = gate + (row / heads) * ld_gate + (row % heads) * dim;
  float ss = 0;
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    const int64_t i = lane + 32 * j;
    v[j] = i < dim ? float(orow[i]) : 0.0f;
    a[j] = i < dim ? float(g[i]) : 0.0f;
    ss += v[j] * v[j];
  }
  for (int64_t i = lane + 32 * kRegs; i < dim; i += 32) ss += float(orow[i]) * float(orow[i]);
  const float s = rms_inverse(warp_sum(ss), dim, eps);
#pragma unroll
  for (int j = 0; j < kRegs; ++j)
    if (lane + 32 * j < dim) yrow[lane + 32 * j] = Out(v[j] * s * wr[j] * norm_gate(a[j], silu_gate));
  for (int64_t i = lane + 32 * kRegs; i < dim; i += 32)
    yrow[i] = Out(float(orow[i]) * s * w[i] * norm_gate(float(g[i]), silu_gate));
}

// gated_rms_norm_kernel for rows of 128 or 256 (R = dim / 128) with 16-byte-aligned gate rows: lane
// j takes 4 consecutive values of each 128-value piece, one vector access per array and piece
// (the scalar kernel moved the 2.0B model's 32K-token rows at 2.1 TB/s). G: the gate rows' type.
template <class In, class Out, class G, int R>
__global__ void gated_rms_norm_vec_kernel(const In* o, Out* y, const G* gate, int64_t ld_gate, const float* w,
                                          int64_t rows, int64_t heads, float eps, bool silu_gate) {
  constexpr int64_t dim = 128 * R;
  const int lane = threadIdx.x & 31;
  float wr[R][4], v[R][4], a[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) load_v(w + 128 * r + 4 * lane, wr[r]);
  pdl_begin();
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  if (row >= rows) return;
  const G* g = gate + (row / heads) * ld_gate + (row % heads) * dim;
  float ss = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    load_v(o + row * dim + 128 * r + 4 * lane, v[r]);
    load_v(g + 128 * r + 4 * lane, a[r]);
#pragma unroll
    for (int e = 0; e < 4; ++e) ss += v[r][e] * v[r][e];
  }
  const float s = rms_inverse(warp_sum(ss), dim, eps);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[r][e] = v[r][e] * s * wr[r][e] * norm_gate(a[r][e], silu_gate);
    store_v(y + row * dim + 128 * r + 4 * lane, v[r]);
  }
}

// The fused prep kernels keep one head's values in registers: head dims up to 32 × 8.
constexpr int kPrepHeadRegs = 8;

// One warp per (token, head) row.
__global__ void l2norm_kernel(float* x, int64_t ld, int64_t T, int64_t heads, int64_t dim) {
  pdl_begin();
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32, lane = threadIdx.x & 31;
  if (warp >= T * heads) return;
  float* r = x + (warp / heads) * ld + (warp % heads) * dim;
  float ss = 0;
  for (int64_t i = lane; i < dim; i += 32) ss += r[i] * r[i];
  const float inv = l2_inverse(warp_sum(ss));
  for (int64_t i = lane; i < dim; i += 32) r[i] *= inv;
}

// out [T, I] = SiLU(g)·u of the (g, u) pairs of gu [T, 2I], V outputs per thread. In: fp32, or the
// bf16 products of a GEMM; Out: fp32, or bf16 when a GEMM reads them next. bf16 mode: swiglu_bf16.
template <int V, class In, class Out>
__global__ void swiglu_kernel(const In* gu, Out* out, int64_t T, int64_t I, bool bf16_mode) {
  pdl_begin();
  const int64_t IV = I / V;
  GRID_STRIDE(i, T * IV) {
    const int64_t t = i / IV, c = (i % IV) * V;
    float p[2 * V], o[V];  // (g, u) pairs
    load_v(gu + t * 2 * I + 2 * c, p);
    for (int j = 0; j < V; ++j)
      o[j] = bf16_mode ? swiglu_bf16(p[2 * j], p[2 * j + 1]) : p[2 * j] * sigmoidf(p[2 * j]) * p[2 * j + 1];
    store_v(out + t * I + c, o);
  }
}

// V values per thread (dim a multiple of V; V = 4 where the rows allow 16-byte accesses: one
// scalar value per thread ran the 8K-token gated attention output at a third of the bandwidth).
// Out: float (in place, y = o) or bf16 (y: the output GEMM's operand rows).
template <int V, class Out>
__global__ void sigmoid_mul_kernel(const float* o, const float* gate, int64_t ld_gate, int64_t ld_gate_head, int64_t T,
                                   int64_t heads, int64_t dim, Out* y) {
  pdl_begin();
  const int64_t dv = dim / V;
  GRID_STRIDE(i, T * heads * dv) {
    const int64_t c = (i % dv) * V, h = (i / dv) % heads, t = i / (dv * heads);
    float a[V], g[V];
    load_v(o + V * i, a);
    load_v(gate + t * ld_gate + h * ld_gate_head + c, g);
    for (int j = 0; j < V; ++j) a[j] *= sigmoidf(g[j]);
    store_v(y + V * i, a);
  }
}

template <class In>
__global__ void sigmoid_kernel(const In* x, int64_t ldx, float* y, int64_t T, int64_t n, float scale) {
  pdl_begin();
  GRID_STRIDE(i, T * n) y[i] = scale * sigmoidf(float(x[(i / n) * ldx + i % n]));
}

// Gate value j of a token (head j / width): −exp(A_log)·softplus(a + dt_bias), as gate_softplus_forward.
__device__ __forceinline__ float softplus_gate(float a, const float* A_log, const float* dt_bias, int64_t j,
                                               int64_t width) {
  DeltaInputForm f;  // the delta-rule op's own formula (its softplus gate form)
  f.gate = DeltaGateForm::Softplus, f.A_log = A_log, f.dt_bias = dt_bias;
  return gate_value(f, a, j, width).g;
}

template <class In>
__global__ void gate_softplus_kernel(const In* a, int64_t lda, const float* A_log, const float* dt_bias, float* g,
                                     int64_t T, int64_t H, int64_t width) {
  pdl_begin();
  GRID_STRIDE(i, T * H * width) {
    const int64_t j = i % (H * width), t = i / (H * width);
    g[i] = softplus_gate(float(a[t * lda + j]), A_log, dt_bias, j, width);
  }
}

// The sequence a packed token row belongs to (cu [N+1] ascending).
__device__ __forceinline__ int seq_of(const int32_t* cu, int N, int64_t t) {
  int lo = 0, hi = N - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// y[t, c] from the inputs t−P..t of its sequence (the slot's conv state before the first token).
// A thread takes V channels of `span` consecutive tokens and slides a window of the W−1 inputs
// before the current one along them in registers, so each input is read once (plus W−1 rows where
// its span or a sequence starts): kw ≤ W taps, tap j of kw at window place j + W − kw (places
// before it weigh 0; each sum adds the taps in the order cpu::causal_conv1d_silu does). Windows
// of 4 (the models' taps) or kConvWideTaps.
constexpr int kConvWideTaps = 16;

// Where conv_kernel's outputs go. A sink's at(c) is the writer of a thread's channels c.. for
// every token (where they go is fixed per thread: the conv is issue-bound, 74% of the SM's issue
// rate at the 2.0B model's 32K tokens, so nothing per token that need not be): fp32 rows y [T, C] ...
struct ConvRows {
  float* y;
  int64_t C;
  struct Writer {
    float* p;
    int64_t ld;
    template <int V>
    __device__ void operator()(int64_t t, float (&acc)[V]) const {
      store_v(p + t * ld, acc);
    }
  };
  __device__ Writer at(int64_t c) const { return {y + c, C}; }
};
// ... or the bf16 operands of the delta-rule op: channels [q (HK) | k (HK) | v] of token t into q, k
// [T, HK] and v [T, C − 2HK], the q and k heads L2-normalised first (as l2norm). The caller makes a
// warp's 32 lanes hold 32·V consecutive channels of one token, starting at a multiple of 32·V, and
// head_lanes = head_dim / V a power of two ≤ 32: a head is then the V channels of each of
// head_lanes consecutive lanes. A warp with any q or k channel runs the shuffles on every lane;
// one of v channels only skips them. at() is called by whole warps.
struct DeltaOperands {
  __nv_bfloat16 *q, *k, *v;
  int64_t HK, HVV;
  int head_lanes;
  struct Writer {
    __nv_bfloat16* p;
    int64_t ld;
    bool normalise, warp_normalises;
    int head_lanes;
    template <int V>
    __device__ void operator()(int64_t t, float (&acc)[V]) const {
      if (warp_normalises) {
        float ss = 0;
#pragma unroll
        for (int i = 0; i < V; ++i) ss += acc[i] * acc[i];
        for (int o = head_lanes / 2; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (normalise) {
          const float inv = l2_inverse(ss);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] *= inv;
        }
      }
      store_v(p + t * ld, acc);
    }
  };
  __device__ Writer at(int64_t c) const {
    const bool qk = c < 2 * HK;
    return {c < HK ? q + c
            : qk   ? k + (c - HK)
                   : v + (c - 2 * HK),
            qk ? HK : HVV, qk, __any_sync(0xffffffffu, qk) != 0, head_lanes};
  }
};

template <int V, int W, class In, class Sink>
__global__ void conv_kernel(const In* x, int64_t ldx, const float* w, Sink sink, int64_t T, int64_t C, int kw, int span,
                            const int32_t* cu, const int32_t* slots, int N, const float* pool) {
  const int P = kw - 1, skip = W - kw;
  const int64_t CV = C / V, i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t c = i % CV * V, t0 = i / CV * span;
  float wr[W][V];
#pragma unroll
  for (int j = 0; j < W; ++j)
#pragma unroll
    for (int v = 0; v < V; ++v) wr[j][v] = j >= skip && t0 < T ? w[(c + v) * kw + j - skip] : 0.0f;
  pdl_begin();
  if (t0 >= T) return;  // whole warps: a warp's channels are of one token span
  const int64_t t1 = min(T, t0 + span);
  const auto out = sink.at(c);
  int s = seq_of(cu, N, t0);
  int64_t seq_end = cu[s + 1];
  float win[W][V];               // win[W−1]: the current input; win[j]: the one W−1−j tokens before it
  auto start = [&](int64_t t) {  // the W−1 inputs before token t of sequence s
    const float* st = pool + (int64_t(slots[s]) * C + c) * P;
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      const int64_t back = W - 1 - j, rel = t - back - cu[s];  // rel ≥ −back: in the state when back ≤ P
      if (rel >= 0)
        load_v(x + (t - back) * ldx + c, win[j]);
      else
#pragma unroll
        for (int v = 0; v < V; ++v) win[j][v] = back <= P ? st[v * P + P + rel] : 0.0f;
    }
  };
  start(t0);
  // Tokens t+1 and t+2 are requested before token t is computed and stored (two buffers taking
  // turns, converted where used), so each thread keeps loads in flight while it works: one token
  // ahead, converted at the load, ran the 2.0B model's 32K-token bf16 rows at 1.7 TB/s.
  RawValues<V, In> ahead[2];
  ahead[0].load(x + t0 * ldx + c);
  if (t0 + 1 < t1) ahead[1].load(x + (t0 + 1) * ldx + c);
  auto step = [&](int64_t t, RawValues<V, In>& in) {
    if (t >= seq_end) {
      while (t >= cu[s + 1]) ++s;
      seq_end = cu[s + 1];
      start(t);
    }
    in.to_float(win[W - 1]);
    if (t + 2 < t1) in.load(x + (t + 2) * ldx + c);
    float acc[V] = {};
#pragma unroll
    for (int j = 0; j < W; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += wr[j][v] * win[j][v];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] *= sigmoidf(acc[v]);
    out(t, acc);
#pragma unroll
    for (int j = 0; j + 1 < W; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) win[j][v] = win[j + 1][v];
  };
  for (int64_t t = t0; t < t1; t += 2) {
    step(t, ahead[0]);
    if (t + 1 < t1) step(t + 1, ahead[1]);
  }
}

// Decode (one token per sequence): R channels of sequence s, channel c0 + 32·r for r < R while
// below `end`, from the slot's conv state and the new input, which then shifts into the state. All
// loads come before the first store (a store between them would serialise them: the pool might
// alias x and w), so a thread's channels are in flight together. kw ≤ kConvMaxTaps.
constexpr int kConvMaxTaps = 4;
template <int R>
__device__ __forceinline__ void conv_decode_channels(const float* x, int64_t ldx, const float* w, int64_t C, int kw,
                                                     const int32_t* slots, float* pool, int64_t s, int64_t c0,
                                                     int64_t end, float (&y)[R]) {
  const int P = kw - 1;
  float* st = pool + int64_t(slots[s]) * C * P;
  float xin[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t c = c0 + 32 * r;
    if (c >= end) continue;
    xin[r] = x[s * ldx + c];
    float acc = w[c * kw + P] * xin[r];
#pragma unroll
    for (int j = 0; j < kConvMaxTaps - 1; ++j)
      if (j < P) acc += w[c * kw + j] * st[c * P + j];
    y[r] = acc * sigmoidf(acc);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t c = c0 + 32 * r;
    if (c >= end || P == 0) continue;
#pragma unroll
    for (int j = 0; j < kConvMaxTaps - 2; ++j)
      if (j + 1 < P) st[c * P + j] = st[c * P + j + 1];
    st[c * P + P - 1] = xin[r];
  }
}
__global__ void conv_decode_kernel(const float* x, int64_t ldx, const float* w, float* y, int64_t C, int kw,
                                   const int32_t* slots, int64_t N, float* pool) {
  pdl_begin();
  GRID_STRIDE(i, N * C) {
    float out[1];
    conv_decode_channels(x, ldx, w, C, kw, slots, pool, i / C, i % C, C, out);
    y[i] = out[0];
  }
}

// Device::delta_prep for one token per sequence in one launch (a decode step's conv, l2norm, sigmoid
// and gate kernels were four chains of launch latency). Warp tasks per sequence: the l2_heads
// normalised heads (one each, head_dim ≤ 32·kPrepHeadRegs), then groups of 128 plain channels, of
// 128 betas and of 128 gate values; a lane keeps a head's conv outputs in registers for the norm.
struct DeltaPrepTasks {  // per sequence; the launch sizes its grid from the same counts
  int64_t heads, plain, beta, gate;
  __host__ __device__ explicit DeltaPrepTasks(const DeltaPrep& p)
      : heads(p.l2_heads),
        plain((p.C - p.l2_heads * p.head_dim + 127) / 128),
        beta((p.H + 127) / 128),
        gate((p.H * p.gate_width + 127) / 128) {}
  __host__ __device__ int64_t per_seq() const { return heads + plain + beta + gate; }
};
__global__ void delta_prep_decode_kernel(DeltaPrep p, const int32_t* slots, int64_t N) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const DeltaPrepTasks tasks(p);
  const int64_t normed = p.l2_heads * p.head_dim, plain_tasks = tasks.plain, beta_tasks = tasks.beta;
  const int64_t per_seq = tasks.per_seq();
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t task = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; task < N * per_seq; task += warps) {
    const int64_t s = task / per_seq;
    int64_t j = task % per_seq;
    auto conv = [&](int64_t c0, int64_t end, auto& y) {
      conv_decode_channels(p.x, p.ldx, p.conv_w, p.C, int(p.kw), slots, p.conv_pool, s, c0, end, y);
    };
    if (j < p.l2_heads) {
      const int64_t c0 = j * p.head_dim;
      float v[kPrepHeadRegs];
      conv(c0 + lane, c0 + p.head_dim, v);
      float ss = 0;
#pragma unroll
      for (int r = 0; r < kPrepHeadRegs; ++r)
        if (lane + 32 * r < p.head_dim) ss += v[r] * v[r];
      const float inv = l2_inverse(warp_sum(ss));
#pragma unroll
      for (int r = 0; r < kPrepHeadRegs; ++r)
        if (lane + 32 * r < p.head_dim) p.y[s * p.C + c0 + lane + 32 * r] = v[r] * inv;
      continue;
    }
    j -= p.l2_heads;
    if (j < plain_tasks) {
      const int64_t c0 = normed + j * 128 + lane;
      float v[4];
      conv(c0, p.C, v);
#pragma unroll
      for (int r = 0; r < 4; ++r)
        if (c0 + 32 * r < p.C) p.y[s * p.C + c0 + 32 * r] = v[r];
    } else if ((j -= plain_tasks) < beta_tasks) {
      for (int r = 0; r < 4; ++r) {
        const int64_t h = j * 128 + lane + 32 * r;
        if (h < p.H) p.beta[s * p.H + h] = p.beta_max * sigmoidf(p.b[s * p.ldb + h]);
      }
    } else {
      j -= beta_tasks;
      for (int r = 0; r < 4; ++r) {
        const int64_t e = j * 128 + lane + 32 * r;
        if (e < p.H * p.gate_width)
          p.g[s * p.H * p.gate_width + e] = softplus_gate(p.a[s * p.lda + e], p.A_log, p.dt_bias, e, p.gate_width);
      }
    }
  }
}

// After conv_kernel: each slot's state becomes the last P inputs of [state | x].
template <class In>
__global__ void conv_state_kernel(const In* x, int64_t ldx, int64_t C, int kw, const int32_t* cu, const int32_t* slots,
                                  int N, float* pool) {
  pdl_begin();
  const int P = kw - 1;
  GRID_STRIDE(i, int64_t(N) * C) {
    const int s = int(i / C);
    const int64_t c = i % C, n = cu[s + 1] - cu[s];
    float* st = pool + (int64_t(slots[s]) * C + c) * P;
    for (int j = 0; j < P; ++j) {
      const int64_t src = n - P + j;
      st[j] = src >= 0 ? float(x[(cu[s] + src) * ldx + c]) : st[j + n];
    }
  }
}

// Rotates pair i (of `half`) of one head's channels xh at position pos, as cpu rope.
__device__ __forceinline__ void rope_pair(float* xh, int64_t i, int64_t half, int32_t pos, const float* inv_freq,
                                          bool half_split, float attn_factor) {
  const float ang = float(pos) * inv_freq[i];
  const float c = cosf(ang) * attn_factor, s = sinf(ang) * attn_factor;
  const int64_t ia = half_split ? i : 2 * i, ib = half_split ? i + half : 2 * i + 1;
  const float a = xh[ia], b = xh[ib];
  xh[ia] = a * c - b * s;
  xh[ib] = b * c + a * s;
}

__global__ void rope_kernel(float* x, int64_t T, int64_t heads, int64_t ld_token, int64_t ld_head, const float* inv_freq,
                            int64_t half, const int32_t* pos, bool half_split, float attn_factor) {
  pdl_begin();
  GRID_STRIDE(idx, T * heads * half) {
    const int64_t i = idx % half, h = (idx / half) % heads, t = idx / (half * heads);
    rope_pair(x + t * ld_token + h * ld_head, i, half, pos[t], inv_freq, half_split, attn_factor);
  }
}

// Device::attention_prep in one launch (a decode step spent 7 launches on it). Warp tasks per
// token: its nh + nkv q and k heads (RMSNorm from registers, head dim ≤ 32·kPrepHeadRegs, then RoPE
// on the written row), then groups of 128 v channels to copy.
__host__ __device__ inline int64_t attention_prep_tasks(const AttentionPrep& p) {  // per token
  return p.nh + p.nkv + (p.nkv * p.hd + 127) / 128;
}
__global__ void attention_prep_kernel(AttentionPrep p, const int32_t* pos, int64_t T) {
  pdl_begin();
  const int lane = threadIdx.x & 31;
  const int64_t KV = p.nkv * p.hd, heads = p.nh + p.nkv, per_token = attention_prep_tasks(p);
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t task = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; task < T * per_token; task += warps) {
    const int64_t t = task / per_token, j = task % per_token;
    if (j >= heads) {
      for (int r = 0; r < 4; ++r) {
        const int64_t c = (j - heads) * 128 + lane + 32 * r;
        if (c < KV) p.v[t * KV + c] = p.v_in[t * p.ld_kv + c];
      }
      continue;
    }
    const bool is_q = j < p.nh;
    const int64_t h = is_q ? j : j - p.nh;
    const float* src = is_q ? p.q_in + t * p.ld_q + h * p.q_head : p.k_in + t * p.ld_kv + h * p.hd;
    float* dst = is_q ? p.q + (t * p.nh + h) * p.hd : p.k + (t * p.nkv + h) * p.hd;
    const float* w = is_q ? p.q_norm : p.k_norm;
    float v[kPrepHeadRegs];
    float ss = 0;
#pragma unroll
    for (int r = 0; r < kPrepHeadRegs; ++r)
      if (lane + 32 * r < p.hd) v[r] = src[lane + 32 * r], ss += v[r] * v[r];
    const float scale = rms_inverse(warp_sum(ss), p.hd, p.eps);
#pragma unroll
    for (int r = 0; r < kPrepHeadRegs; ++r) {
      const int64_t i = lane + 32 * r;
      if (i < p.hd) dst[i] = v[r] * scale * norm_weight(w, i, p.zero_centered);
    }
    __syncwarp();  // the row is written before the rotation reads other lanes' values
    const int64_t half = p.rot / 2;
    for (int64_t i = lane; i < half; i += 32)
      rope_pair(dst, i, half, pos[t], p.inv_freq, p.pairs == cpu::RopePairs::HalfSplit, p.attn_factor);
  }
}

// The delta rule token by token in fp32, for shapes the chunk/decode kernels do not take: one
// block per (sequence, value head), thread v owns column v of the state.
constexpr int kMaxRecurrentK = 256;
__global__ void delta_recurrent_kernel(const float* q, const float* k, const float* v, int64_t ld, const float* g,
                                       const float* beta, float scale, const int32_t* cu, const int32_t* slots, float* pool,
                                       float* o, int H, int HV, int K, int V, bool per_key) {
  pdl_begin();
  extern __shared__ float sh[];  // q, k, decay: K each
  float *sq = sh, *sk = sh + K, *sg = sh + 2 * K;
  const int seq = blockIdx.x / HV, hv = blockIdx.x % HV, h = hv / (HV / H), col = threadIdx.x;
  float* S = pool + (int64_t(slots[seq]) * HV + hv) * K * V;
  float s[kMaxRecurrentK];
  if (col < V)
    for (int j = 0; j < K; ++j) s[j] = S[int64_t(j) * V + col];
  for (int64_t t = cu[seq]; t < cu[seq + 1]; ++t) {
    __syncthreads();
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      sq[j] = q[t * ld + h * K + j];
      sk[j] = k[t * ld + h * K + j];
      sg[j] = expf(per_key ? g[(t * HV + hv) * K + j] : g[t * HV + hv]);
    }
    __syncthreads();
    if (col >= V) continue;
    float kv = 0;
    for (int j = 0; j < K; ++j) kv += (s[j] *= sg[j]) * sk[j];
    const float u = beta[t * HV + hv] * (v[t * ld + hv * V + col] - kv);
    float out = 0;
    for (int j = 0; j < K; ++j) out += (s[j] += sk[j] * u) * sq[j];
    o[(t * HV + hv) * V + col] = out * scale;
  }
  if (col < V)
    for (int j = 0; j < K; ++j) S[int64_t(j) * V + col] = s[j];
}

// dst [rows, width] (contiguous) = the rows of src (stride ld) as T; V columns per thread.
template <class T, int V>
__global__ void pack_rows(const float* src, int64_t ld, int64_t width, T* dst, int64_t rows) {
  pdl_begin();
  const int64_t WV = width / V;
  GRID_STRIDE(i, rows * WV) {
    const int64_t r = i / WV, c = (i % WV) * V;
    float v[V];
    load_v(src + r * ld + c, v);
    for (int j = 0; j < V; ++j) dst[r * width + c + j] = T(v[j]);
  }
}
// dst [n] = bf16 src [n] as floats: 8 values (one 16-byte load) per thread where both pointers
// allow it, the tail (or everything, unaligned) one value per thread.
__global__ void unpack_bf16(const __nv_bfloat16* src, float* dst, int64_t n) {
  pdl_begin();
  const bool vec = (reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16 == 0;
  const int64_t n8 = vec ? n / 8 : 0;
  GRID_STRIDE(i, n8) {
    const uint4 raw = reinterpret_cast<const uint4*>(src)[i];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]), c = __bfloat1622float2(h[2]),
                 d = __bfloat1622float2(h[3]);
    reinterpret_cast<float4*>(dst)[2 * i] = make_float4(a.x, a.y, b.x, b.y);
    reinterpret_cast<float4*>(dst)[2 * i + 1] = make_float4(c.x, c.y, d.x, d.y);
  }
  GRID_STRIDE(i, n - 8 * n8) dst[8 * n8 + i] = __bfloat162float(src[8 * n8 + i]);
}

// Attention, fp32, one warp per query row: lane l holds dims l, l+32, .. of q and of the output.
constexpr int kMaxHeadDimPerLane = 8;  // head dims up to 256
// Folds key u (row ku of dq, vu of dv) into the warp's online softmax (running max m, sum l, acc).
__device__ __forceinline__ void softmax_fold(const float (&qr)[kMaxHeadDimPerLane], const float* ku, const float* vu,
                                             int64_t dq, int64_t dv, float scale, int lane, float& m, float& l,
                                             float (&acc)[kMaxHeadDimPerLane]) {
  float dot = 0;
  for (int c = 0; c < kMaxHeadDimPerLane; ++c)
    if (lane + 32 * c < dq) dot += qr[c] * ku[lane + 32 * c];
  const float sc = warp_sum(dot) * scale, mn = fmaxf(m, sc);
  const float corr = expf(m - mn), p = expf(sc - mn);
  l = l * corr + p;
  for (int c = 0; c < kMaxHeadDimPerLane; ++c)
    if (lane + 32 * c < dv) acc[c] = acc[c] * corr + p * vu[lane + 32 * c];
  m = mn;
}

__device__ __forceinline__ void load_query(const float* qrow, int64_t dq, int lane, float (&qr)[kMaxHeadDimPerLane],
                                           float (&acc)[kMaxHeadDimPerLane]) {
  for (int c = 0; c < kMaxHeadDimPerLane; ++c) {
    qr[c] = lane + 32 * c < dq ? qrow[lane + 32 * c] : 0.0f;
    acc[c] = 0;
  }
}

// One warp per (query, head) over the keys it may see (causal, windowed or selected).
__global__ void attention_reference_kernel(const float* q, const float* k, const float* v, float* o, int64_t n,
                                           int64_t S, int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
                                           int64_t window, const int32_t* selected, int64_t topk) {
  pdl_begin();
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= n * nh) return;
  const int64_t i = warp / nh, h = warp % nh, kvh = h / (nh / nkv), pos = S - n + i;
  float qr[kMaxHeadDimPerLane], acc[kMaxHeadDimPerLane];
  load_query(q + (i * nh + h) * dq, dq, lane, qr, acc);
  float m = -INFINITY, l = 0;
  const int64_t first = window > 0 ? max(int64_t(0), pos - window + 1) : 0;
  const int64_t count = selected ? topk : pos + 1 - first;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t u = selected ? selected[i * topk + j] : first + j;
    if (u < 0 || u > pos) continue;
    softmax_fold(qr, k + (u * nkv + kvh) * dq, v + (u * nkv + kvh) * dv, dq, dv, scale, lane, m, l, acc);
  }
  for (int c = 0; c < kMaxHeadDimPerLane; ++c)
    if (lane + 32 * c < dv) o[(i * nh + h) * dv + lane + 32 * c] = l > 0 ? acc[c] / l : 0.0f;
}

// Decode: row i of k and v goes to sequence i's rows at its position.
__global__ void kv_append_kernel(const float* k, const float* v, float* const* kp, float* const* vp,
                                 const int32_t* pos, int64_t N, int64_t wk, int64_t wv) {
  pdl_begin();
  GRID_STRIDE(idx, N * (wk + wv)) {
    const int64_t i = idx / (wk + wv), j = idx % (wk + wv);
    if (j < wk) kp[i][int64_t(pos[i]) * wk + j] = k[i * wk + j];
    else vp[i][int64_t(pos[i]) * wv + j - wk] = v[i * wv + j - wk];
  }
}

// Decode attention, split over keys (flash-decoding with a fixed grid, so a recorded step replays at
// any length): kDecodeSplits blocks of kDecodeWarps warps per (sequence, head); warp g of the
// kDecodeSplits·kDecodeWarps folds keys g, g+G, .. into a partial softmax (m, l, acc[dv]) in `part`;
// decode_combine_kernel merges the G partials in a fixed order (deterministic). Each warp holds few
// keys, so the dependent loads of one key overlap those of the other warps'.
constexpr int kDecodeWarps = 4, kDecodeSplits = 16, kDecodeParts = kDecodeWarps * kDecodeSplits;
__global__ void decode_attention_kernel(const float* q, const float* const* kp, const float* const* vp,
                                        const int32_t* pos, float* part, int64_t nh, int64_t nkv, int64_t dq,
                                        int64_t dv, float scale, int64_t window) {
  pdl_begin();
  const int64_t row = blockIdx.x / kDecodeSplits, i = row / nh, h = row % nh, kvh = h / (nh / nkv);
  const int lane = threadIdx.x & 31, g = int(blockIdx.x % kDecodeSplits) * kDecodeWarps + int(threadIdx.x / 32);
  const int64_t S = int64_t(pos[i]) + 1, first = window > 0 ? max(int64_t(0), S - window) : 0;
  float qr[kMaxHeadDimPerLane], acc[kMaxHeadDimPerLane];
  load_query(q + (i * nh + h) * dq, dq, lane, qr, acc);
  float m = -INFINITY, l = 0;
  for (int64_t u = first + g; u < S; u += kDecodeParts)
    softmax_fold(qr, kp[i] + (u * nkv + kvh) * dq, vp[i] + (u * nkv + kvh) * dv, dq, dv, scale, lane, m, l, acc);
  float* out = part + (row * kDecodeParts + g) * (dv + 2);
  for (int c = 0; c < kMaxHeadDimPerLane; ++c)
    if (lane + 32 * c < dv) out[2 + lane + 32 * c] = acc[c];
  if (lane == 0) out[0] = m, out[1] = l;
}

// One block per (sequence, head): o[d] = Σ_g acc_g[d]·e^{m_g−M} / Σ_g l_g·e^{m_g−M}. Warp 0 turns the
// kDecodeParts (m, l) pairs into weights in shared memory once; then each thread sums its columns.
static_assert(kDecodeParts == 64, "decode_combine_kernel: two partials per lane of warp 0");
__global__ void decode_combine_kernel(const float* part, float* o, int64_t dv) {
  pdl_begin();
  __shared__ float weight[kDecodeParts];
  __shared__ float inv_sum;
  const float* p = part + blockIdx.x * kDecodeParts * (dv + 2);
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const float m0 = p[lane * (dv + 2)], l0 = p[lane * (dv + 2) + 1];
    const float m1 = p[(lane + 32) * (dv + 2)], l1 = p[(lane + 32) * (dv + 2) + 1];
    float M = fmaxf(l0 > 0 ? m0 : -INFINITY, l1 > 0 ? m1 : -INFINITY);  // a warp that saw no key has l = 0
    for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    const float w0 = l0 > 0 ? expf(m0 - M) : 0.0f, w1 = l1 > 0 ? expf(m1 - M) : 0.0f;
    weight[lane] = w0, weight[lane + 32] = w1;
    const float L = warp_sum(l0 * w0 + l1 * w1);
    if (lane == 0) inv_sum = L > 0 ? 1.0f / L : 0.0f;
  }
  __syncthreads();
  // All 64 loads of a column in flight at once: with 8 (the unroll before), a step's 6 calls at
  // batch 1 (16 blocks each) took 11 µs apiece, 8 dependent round trips.
  for (int64_t d = threadIdx.x; d < dv; d += blockDim.x) {
    float x[kDecodeParts];
#pragma unroll
    for (int g = 0; g < kDecodeParts; ++g) x[g] = p[g * (dv + 2) + 2 + d];
    float sum = 0;
#pragma unroll
    for (int g = 0; g < kDecodeParts; ++g) sum += x[g] * weight[g];
    o[blockIdx.x * dv + d] = sum * inv_sum;
  }
}

// y [N] = W · x for bf16 W and one row of x (decode at batch 1): bandwidth-bound on W, where a
// GEMM library's tiles idle. Warp (row n, split s) reads its share of W row n, K/S columns, 16
// bytes per lane per load (a warp's load covers 512 contiguous bytes), and dots it with x, which
// stays fp32. The first kGemvPrefetch loads are issued before pdl_begin(): W is constant, so they
// stream while the kernels before still run. The S splits of a row sit in one block of kGemvWarps
// warps and are summed in a fixed order (deterministic). Blocks of 4 warps rather than 8: the
// last blocks of a call finish sooner (the 2B model's chain of 97 GEMVs: 1278 → 1249 µs on an
// H200). kSwiglu: rows 2i and 2i+1 are a SwiGLU block's gate and up rows i (one block holds both:
// S ≤ kGemvWarps / 2) and y [N/2] gets SiLU(gate)·up, so the elementwise pass is not a kernel of
// its own; like x, the gate/up products stay fp32 here (every other bf16 path rounds both).
// Otherwise add: y += W · x (the residual stream, Device::linear_add). K a multiple of 8·S, x
// 16-byte aligned.
constexpr int kGemvPrefetch = 4, kGemvWarps = 4;
template <bool kSwiglu>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(const __nv_bfloat16* W, const float* x, float* y, int64_t N, int64_t K, int S, bool add) {
  __shared__ float part[kGemvWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = (blockIdx.x * int64_t(kGemvWarps) + warp) / S, seg = K / S;
  const int64_t k0 = (warp % S) * seg + lane * 8;  // this lane's first column; then every 256th
  const __nv_bfloat16* w = W + min(n, N - 1) * K + k0;
  uint4 pre[kGemvPrefetch];
#pragma unroll
  for (int i = 0; i < kGemvPrefetch; ++i)
    if (lane * 8 + i * 256 < seg) pre[i] = __ldg(reinterpret_cast<const uint4*>(w + i * 256));
  pdl_begin();
  // The row's value to add to, requested before the products: read after them, its latency was
  // the last thing every warp of the call waited for.
  const bool writer = lane == 0 && warp % S == 0 && n < N;
  const float base = add && writer ? y[n] : 0.0f;
  float acc = 0;
  auto dot = [&](const uint4& raw, int64_t k) {  // 8 weights at column k0 + k
    float a[8];
    load_v(x + k0 + k, a);
    acc = dot_bf16x8(acc, raw, a);
  };
#pragma unroll
  for (int i = 0; i < kGemvPrefetch; ++i)
    if (lane * 8 + i * 256 < seg) dot(pre[i], i * 256);
#pragma unroll 4
  for (int64_t k = kGemvPrefetch * 256; lane * 8 + k < seg; k += 256)
    dot(__ldg(reinterpret_cast<const uint4*>(w + k)), k);
  acc = warp_sum(acc);
  if (S > 1 || kSwiglu) {
    if (lane == 0) part[warp] = acc;
    __syncthreads();
  }
  if (!writer) return;
  auto row_sum = [&](int wp) {  // the row of warp wp: its splits in order
    float v = part[wp];
    for (int s = 1; s < S; ++s) v += part[wp + s];
    return v;
  };
  if constexpr (kSwiglu) {
    if (n % 2 == 0) {
      const float g = row_sum(warp);
      y[n / 2] = g * sigmoidf(g) * row_sum(warp + S);
    }
  } else {
    y[n] = base + (S > 1 ? row_sum(warp) : acc);
  }
}

// y [M, N] = x [M, K] · W^T for 2 to 8 rows of x (decode batches) on the tensor cores. It is bound
// by W's bytes and by each warp's chain of dependent instructions, so:
// - A block of 8 warps owns 128 rows of W (16 per warp, the mma's A operand) and one of S slices
//   of K. It stages its slice of x in shared memory as bf16 (the GEMM path's rounding), kCols
//   columns at a time, 8 rows (zeros past M); every warp reads its B operands (x^T) from there.
// - Inside each 32-column step the reduction index is permuted so that a lane loads 16
//   contiguous bytes of one W row: lane (g, t) holds columns 8t..8t+7 of rows g and g+8 (values
//   0–3 feed the first mma of the step, 4–7 the second) and reads the same columns of x row g
//   from shared memory in one 16-byte load (row pitch ≡ 64 mod 128 bytes: conflict-free).
// - W loads run one batch of kGemvTcUnroll steps ahead of the products (two register sets), the
//   first batch issued before pdl_begin() (W is constant). Steps past the slice's end load zero
//   weights, so a batch has no branch and its shared loads go out together (a `break` there kept
//   ncu's top stall on them: 1.5 → 1.8 TB/s at 16 rows).
// - S > 1 (too few row groups to fill the card): the S blocks of a row group form a thread-block
//   cluster; each parks its partial sums in shared memory and sums a 1/S share of the group's rows
//   over the S blocks' partials through distributed shared memory, in slice order
//   (deterministic). Summing through global memory in the last block to finish was a serial tail.
// Against the former kernel (each warp loading its fp32 x rows itself, S splits inside a block):
// decode on the 2B model at batch 4 1,656 → 1,735 tokens/s, batch 8 2,848 → 3,009 (H200). With
// 2–8 n-tiles (9–64 rows) this layout stayed below cuBLASLt with its bf16 pack (batch 16:
// 4,957 → 4,717; batch 64 10,148 → 7,131; ncu: 10 cycles per issued instruction at 4 warps per
// scheduler, 128 registers), so those sizes keep the GEMM path (docs/RESULTS_MODEL_GPU.md,
// session 12).
// kSwiglu: rows 2i, 2i+1 are a gate/up pair (neighbouring g) and y [M, N/2] gets swiglu_bf16(gate, up).
// Otherwise add: y += the products (the residual stream, Device::linear_add). K/S a multiple of
// 32, S ≤ 8 (a portable cluster), x rows 16-byte aligned with ldx % 4 == 0.
constexpr int kGemvTcWarps = 8, kGemvTcRows = 16 * kGemvTcWarps, kGemvTcUnroll = 4, kGemvTcMaxSlices = 8;
template <bool kSwiglu>
__global__ void __launch_bounds__(kGemvTcWarps * 32, 2)
    gemv_tc_kernel(const __nv_bfloat16* W, const float* x, int64_t ldx, float* y, int64_t N, int64_t K, int S, int M,
                   bool add) {
  constexpr int kCols = 512, kPitch = kCols + 32, U = kGemvTcUnroll, kThreads = kGemvTcWarps * 32;
  // The partials [8][128] reuse the staging buffer.
  constexpr int kStageBytes = 8 * kPitch * 2, kPartBytes = 8 * kGemvTcRows * 4;
  __shared__ __align__(16) unsigned char smem[kStageBytes > kPartBytes ? kStageBytes : kPartBytes];
  auto xs = reinterpret_cast<__nv_bfloat16(*)[kPitch]>(smem);
  auto red = reinterpret_cast<float(*)[kGemvTcRows]>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t group = blockIdx.x / S, kb = K / S, k0 = (blockIdx.x % S) * kb;
  const int64_t row0 = group * kGemvTcRows + warp * 16;
  const __nv_bfloat16* wa = W + min(row0 + g, N - 1) * K + k0 + 8 * t;
  const __nv_bfloat16* wb = W + min(row0 + g + 8, N - 1) * K + k0 + 8 * t;
  const int64_t batches = (kb + 32 * U - 1) / (32 * U);
  auto load = [&](int64_t b, uint4(&la)[U], uint4(&lb)[U]) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int64_t k = (b * U + i) * 32;
      la[i] = lb[i] = make_uint4(0, 0, 0, 0);
      if (k < kb) {
        la[i] = __ldg(reinterpret_cast<const uint4*>(wa + k));
        lb[i] = __ldg(reinterpret_cast<const uint4*>(wb + k));
      }
    }
  };
  // x[:, k0 + c0 .. + kCols) → xs in bf16 (rows past M and columns past the slice zero, so that a
  // zero-weight step multiplies finite values). All of a thread's float4 loads go out before any
  // store: a loop of dependent load-convert-store steps was a chain of L2 round trips per tile.
  constexpr int kQuads = 8 * (kCols / 4) / kThreads;
  auto stage = [&](int64_t c0) {
    float4 v[kQuads];
#pragma unroll
    for (int u = 0; u < kQuads; ++u) {
      const int i = threadIdx.x + u * kThreads, m = i / (kCols / 4), c = (i % (kCols / 4)) * 4;
      v[u] =
          m < M && c0 + c < kb ? *reinterpret_cast<const float4*>(x + m * ldx + k0 + c0 + c) : make_float4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kQuads; ++u) {
      const int i = threadIdx.x + u * kThreads, m = i / (kCols / 4), c = (i % (kCols / 4)) * 4;
      *reinterpret_cast<uint2*>(&xs[m][c]) = {pack_pair(__float2bfloat16_rn(v[u].x), __float2bfloat16_rn(v[u].y)),
                                              pack_pair(__float2bfloat16_rn(v[u].z), __float2bfloat16_rn(v[u].w))};
    }
  };
  float acc[4] = {};
  auto compute = [&](int64_t b, const uint4(&la)[U], const uint4(&lb)[U]) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const uint32_t* a = reinterpret_cast<const uint32_t*>(&la[i]);
      const uint32_t* c = reinterpret_cast<const uint32_t*>(&lb[i]);
      const uint32_t f1[4] = {a[0], c[0], a[1], c[1]}, f2[4] = {a[2], c[2], a[3], c[3]};
      const uint4 xb = *reinterpret_cast<const uint4*>(&xs[g][int((b * U + i) * 32 % kCols) + 8 * t]);
      const uint32_t b1[2] = {xb.x, xb.y}, b2[2] = {xb.z, xb.w};
      mma_bf16(acc, f1, b1);
      mma_bf16(acc, f2, b2);
    }
  };
  uint4 la0[U], lb0[U], la1[U], lb1[U];
  load(0, la0, lb0);
  pdl_begin();
  // One batch: the x tile it starts (if any), the next batch's loads, then its products.
  auto batch = [&](int64_t b, const uint4(&la)[U], const uint4(&lb)[U], uint4(&na)[U], uint4(&nb)[U]) {
    if (b * 32 * U % kCols == 0) {
      __syncthreads();  // the last tile's reads are done
      stage(b * 32 * U);
      __syncthreads();
    }
    if (b + 1 < batches) load(b + 1, na, nb);
    compute(b, la, lb);
  };
  for (int64_t b = 0; b < batches; b += 2) {
    batch(b, la0, lb0, la1, lb1);
    if (b + 1 < batches) batch(b + 1, la1, lb1, la0, lb0);
  }
  auto put = [&](int64_t n, int m, float v, float up) {  // up: row n + 1's value (kSwiglu)
    if constexpr (kSwiglu) {
      if (n % 2 == 0) y[m * (N / 2) + n / 2] = swiglu_bf16(v, up);
    } else {
      y[m * N + n] = add ? y[m * N + n] + v : v;
    }
  };
  // acc[e]: row row0 + g (+8 for e ≥ 2) of W, row 2t + (e & 1) of x.
  if (S == 1) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t n = row0 + g + (e >= 2 ? 8 : 0);
      const int m = 2 * t + (e & 1);
      const float up = kSwiglu ? __shfl_xor_sync(0xffffffffu, acc[e], 4) : 0.0f;  // row n + 1 sits at g + 1
      if (n < N && m < M) put(n, m, acc[e], up);
    }
    return;
  }
  __syncthreads();  // the products' reads of xs are done: red reuses it
#pragma unroll
  for (int e = 0; e < 4; ++e) red[2 * t + (e & 1)][warp * 16 + g + (e >= 2 ? 8 : 0)] = acc[e];
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every slice's partials are parked
  // This block's share: rows [r·128/S, (r+1)·128/S) of the group (pairs stay together: 128/S is even).
  const int share = kGemvTcRows / S, r0 = int(cluster.block_rank()) * share;
  constexpr int kPer = kSwiglu ? 2 : 1;
  for (int i = threadIdx.x; i < M * share / kPer; i += blockDim.x) {
    const int m = i / (share / kPer), rr = r0 + (i % (share / kPer)) * kPer;
    const int64_t n = group * kGemvTcRows + rr;
    float v = 0, up = 0;
#pragma unroll
    for (int s = 0; s < kGemvTcMaxSlices; ++s)
      if (s < S) {
        const float* peer = cluster.map_shared_rank(&red[m][rr], s);
        v += peer[0];
        if (kSwiglu) up += peer[1];
      }
    if (n < N) put(n, m, v, up);
  }
  cluster.sync();  // the peers' partials stay in place until every block has read them
}

// out[r] = the index of the largest of x[r, :n], the lowest one among ties (as the host's greedy
// pick and torch.argmax); one block per row.
__global__ void argmax_rows_kernel(const float* x, int64_t n, int32_t* out) {
  pdl_begin();
  __shared__ float best_v[32];
  __shared__ int32_t best_i[32];
  const float* r = x + blockIdx.x * n;
  float v = -INFINITY;
  int32_t idx = 0x7fffffff;
  // Ascending i per thread keeps the first of its maxima; 4 values per load where rows allow.
  const bool vec = n % 4 == 0 && reinterpret_cast<uintptr_t>(r) % 16 == 0;
  const int64_t n4 = vec ? n / 4 : 0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
    const float4 a = *reinterpret_cast<const float4*>(r + 4 * i);
    if (a.x > v) v = a.x, idx = int32_t(4 * i);
    if (a.y > v) v = a.y, idx = int32_t(4 * i + 1);
    if (a.z > v) v = a.z, idx = int32_t(4 * i + 2);
    if (a.w > v) v = a.w, idx = int32_t(4 * i + 3);
  }
  for (int64_t i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x)
    if (r[i] > v) v = r[i], idx = int32_t(i);
  auto better = [](float v1, int32_t i1, float v2, int32_t i2) { return v2 > v1 || (v2 == v1 && i2 < i1); };
  for (int off = 16; off > 0; off >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, off);
    const int32_t i2 = __shfl_xor_sync(0xffffffffu, idx, off);
    if (better(v, idx, v2, i2)) v = v2, idx = i2;
  }
  if ((threadIdx.x & 31) == 0) best_v[threadIdx.x >> 5] = v, best_i[threadIdx.x >> 5] = idx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / 32); ++w)
      if (better(v, idx, best_v[w], best_i[w])) v = best_v[w], idx = best_i[w];
    out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;  // a row of NaN / −inf only: id 0, as the host
  }
}

// DSA indexer: scores [n, S] (−inf past each query's position), then per query the topk best.
__global__ void dsa_scores_kernel(const float* iq, const float* w, const float* keys, int64_t n, int64_t S,
                                  int64_t IH, int64_t ID, float* score) {
  pdl_begin();
  const float wscale = rsqrtf(float(IH)), sscale = rsqrtf(float(ID));
  GRID_STRIDE(idx, n * S) {
    const int64_t t = idx / S, u = idx % S;
    if (u > S - n + t) {
      score[idx] = -INFINITY;
      continue;
    }
    float acc = 0;
    for (int64_t h = 0; h < IH; ++h) {
      float dot = 0;
      for (int64_t d = 0; d < ID; ++d) dot += iq[(t * IH + h) * ID + d] * keys[u * ID + d];
      acc += w[t * IH + h] * wscale * fmaxf(dot * sscale, 0.0f);
    }
    score[idx] = acc;
  }
}

__device__ __forceinline__ uint32_t order_key(float f) {  // monotone float -> uint32
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

// One block per query: the topk-th largest key by a bitwise search of counts, then the keys above
// it and the lowest-index ties, in index order.
__global__ void dsa_topk_kernel(const float* score, int64_t n, int64_t S, int64_t topk, int32_t* selected) {
  pdl_begin();
  const int64_t t = blockIdx.x, causal = S - n + t + 1;
  const float* sc = score + t * S;
  int32_t* out = selected + t * topk;
  if (causal <= topk) {
    for (int64_t j = threadIdx.x; j < topk; j += blockDim.x) out[j] = j < causal ? int32_t(j) : -1;
    return;
  }
  uint32_t prefix = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = prefix | (1u << bit);
    float cnt = 0;
    for (int64_t u = threadIdx.x; u < causal; u += blockDim.x) cnt += order_key(sc[u]) >= cand ? 1.0f : 0.0f;
    if (block_sum(cnt) >= float(topk)) prefix = cand;
  }
  if (threadIdx.x != 0) return;
  float above = 0;
  for (int64_t u = 0; u < causal; ++u) above += order_key(sc[u]) > prefix ? 1.0f : 0.0f;
  int64_t ties = topk - int64_t(above), m = 0;
  for (int64_t u = 0; u < causal && m < topk; ++u) {
    const uint32_t key = order_key(sc[u]);
    if (key > prefix || (key == prefix && ties-- > 0)) out[m++] = int32_t(u);
  }
}

__global__ void gather_rows_kernel(const float* src, const int32_t* idx, float* dst, int64_t n, int64_t D) {
  pdl_begin();
  GRID_STRIDE(i, n * D) dst[i] = src[int64_t(idx[i / D]) * D + i % D];
}

__global__ void scatter_add_rows_kernel(float* dst, const int32_t* idx, const float* w, const float* src, int64_t n,
                                        int64_t D) {
  pdl_begin();
  GRID_STRIDE(i, n * D) dst[int64_t(idx[i / D]) * D + i % D] += w[i / D] * src[i];
}

// ---- the device ---------------------------------------------------------------------------------

// The chunk and decode kernels' head sizes.
bool fast_delta_shape(const DeltaRuleDims& d) {
  return (d.K == 32 || d.K == 64 || d.K == 128 || d.K == 256) && d.V % 16 == 0 && d.V >= 16 && d.V <= 256;
}

class CudaDevice : public Device {
 public:
  CudaDevice(int64_t slots, DType weights) : slots_(slots), wt_(weights) {
    check(device_available(), "--device cuda: no CUDA device is available on this machine");
    check(weights == DType::F32 || weights == DType::BF16, "cuda device: weights must be F32 or BF16");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
    check_cuda(cudaStreamCreateWithFlags(&aux_, cudaStreamNonBlocking), "stream");
    check_cuda(cudaMallocHost(&staging_, kStaging), "pinned staging");
    check_lt(cublasLtCreate(&lt_), "create");
    check_cuda(cudaMalloc(&lt_ws_, kLtWorkspace), "cublasLt workspace");
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "current device");
    sms_ = sm_count(dev);
  }
  ~CudaDevice() override {
    if (mode_ == Mode::Capture) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
    }
    cudaStreamSynchronize(stream_);
    if (profile_) {
      collect_profile();
      print_profile();
    }
    drop_graphs();
    plans_.clear();
    for (void* p : retired_) cudaFree(p);
    cudaFreeHost(staging_);
    cudaFreeHost(pinned_);
    cudaStreamDestroy(aux_);
    for (void* p : owned_) cudaFree(p);
    for (auto& c : chunks_) cudaFree(c.first);
    for (auto& [k, p] : pools_) cudaFree(p);
    for (auto& [k, r] : rows_) cudaFree(r.p);
    for (auto& [k, g] : gemms_) {
      cublasLtMatmulDescDestroy(g.op);
      for (auto* l : {g.a, g.b, g.d}) cublasLtMatrixLayoutDestroy(l);
    }
    cudaFree(lt_ws_);
    cublasLtDestroy(lt_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  int64_t max_slots() const override { return slots_; }

  DevMatrix upload_matrix(const Tensor& w) override {
    check(w.dim() >= 2, "internal: upload_matrix of a " + shape_str(w.shape()) + " tensor");
    const int64_t rows = w.size(0), cols = w.numel() / rows;
    const float* src = w.f32();
    void* p = nullptr;
    if (wt_ == DType::BF16) {
      std::vector<uint16_t> h(size_t(w.numel()));
      for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(src[i]);
      p = upload_bytes(h.data(), h.size() * 2);
    } else {
      p = upload_bytes(src, size_t(w.numel()) * 4);
    }
    return {p, rows, cols, wt_ == DType::BF16 ? 2 : 4};
  }
  const float* upload_vector(const Tensor& v) override {
    return static_cast<const float*>(upload_bytes(v.f32(), size_t(v.numel()) * 4));
  }

  // Replay keys (Device::begin_forward): a key's first forward runs eagerly (sizing the scratch,
  // planning the GEMMs), its second is captured into a CUDA graph as it is issued, and later ones only
  // run the host side of each operation — uploads still fill the pinned staging buffer, whose
  // captured copies the graph repeats — and launch the graph in to_host().
  void begin_forward(int64_t replay_key) override {
    if (mode_ == Mode::Capture) {  // a forward that threw mid-capture: drop what it recorded
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
    }
    mode_ = Mode::Eager;
    check_cuda(cudaStreamSynchronize(stream_), "sync");
    if (profile_) {
      collect_profile();
      replay_key = -1;
    }
    for (void* p : retired_) cudaFree(p);
    retired_.clear();
    if (chunks_.size() > 1) {  // last forward outgrew the arena: one chunk of the peak for the next
      size_t total = 0;
      for (auto& c : chunks_) total += c.second;
      for (auto& c : chunks_) cudaFree(c.first);
      chunks_.clear();
      new_chunk(total);
      drop_graphs();  // they hold the old scratch addresses
    }
    used_ = 0, staged_ = 0;
    key_ = replay_key;
    if (replay_key < 0) return;
    if (graphs_.count(replay_key)) {
      mode_ = Mode::Replay;
    } else if (++seen_[replay_key] >= 2) {
      check_cuda(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "graph capture");
      mode_ = Mode::Capture;
    }
  }
  float* scratch(int64_t n) override {
    const size_t bytes = align_up(size_t(std::max<int64_t>(n, 1)) * 4);
    if (chunks_.empty() || used_ + bytes > chunks_.back().second) {
      new_chunk(std::max(bytes, chunks_.empty() ? size_t(64) << 20 : 2 * chunks_.back().second));
      used_ = 0;
    }
    float* p = reinterpret_cast<float*>(static_cast<char*>(chunks_.back().first) + used_);
    used_ += bytes;
    return p;
  }
  // n bf16 values of scratch (GEMM operands and products).
  __nv_bfloat16* scratch_bf16(int64_t n) { return reinterpret_cast<__nv_bfloat16*>(scratch((n + 1) / 2)); }

  Mark scratch_mark() const override { return {chunks_.size(), used_}; }
  // Allocations after the mark are all in its chunk past `used`, or in chunks added since (then
  // the newest chunk restarts; the ones between stay until begin_forward merges them).
  void scratch_release(Mark m) override { used_ = chunks_.size() == m.chunk ? m.used : 0; }
  const int32_t* upload_i32(const std::vector<int32_t>& v) override {
    return static_cast<const int32_t*>(upload(v.data(), v.size() * 4));
  }
  const float* upload_f32(const std::vector<float>& v) override {
    return static_cast<const float*>(upload(v.data(), v.size() * 4));
  }
  void zero(float* p, int64_t n) override {
    const OpScope op(*this, "zero");
    if (op.skip) return;
    check_cuda(cudaMemsetAsync(p, 0, size_t(n) * 4, stream_), "memset");
  }
  void to_host_bytes(const void* src, void* dst, size_t bytes) override {
    if (mode_ == Mode::Capture) {
      cudaGraph_t g = nullptr;
      check_cuda(cudaStreamEndCapture(stream_, &g), "graph capture");
      cudaGraphExec_t exec = nullptr;
      const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      check_cuda(e, "graph instantiate");
      graphs_[key_] = {exec, src};
      mode_ = Mode::Replay;
    }
    if (mode_ == Mode::Replay) {
      const Graph& g = graphs_[key_];
      check(g.result == src, "internal: a replayed forward reads its result elsewhere than it was recorded");
      check_cuda(cudaGraphLaunch(g.exec, stream_), "graph launch");
    }
    mode_ = Mode::Eager;
    // Through a pinned buffer: a copy into pageable memory runs at a fraction of the bus speed, and
    // the logits of a decode step (batch x vocab floats: 39 MB at 64 x 151936) are its largest copy.
    if (bytes > pinned_bytes_) {
      cudaFreeHost(pinned_);
      pinned_ = nullptr, pinned_bytes_ = 0;
      check_cuda(cudaMallocHost(&pinned_, bytes), "pinned result buffer");
      pinned_bytes_ = bytes;
    }
    check_cuda(cudaMemcpyAsync(pinned_, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    check_cuda(cudaStreamSynchronize(stream_), "forward");
    std::memcpy(dst, pinned_, bytes);
  }

  float* cache_pool(int64_t layer, CachePart part, int64_t n) override {
    auto [it, fresh] = pools_.try_emplace({layer, part}, nullptr);
    if (fresh) {
      check_cuda(cudaMalloc(&it->second, size_t(slots_ * n) * 4), "cache pool");
      check_cuda(cudaMemsetAsync(it->second, 0, size_t(slots_ * n) * 4, aux_), "cache pool");
      check_cuda(cudaStreamSynchronize(aux_), "cache pool");
      pool_size_[{layer, part}] = n;
    }
    check(pool_size_[{layer, part}] == n, "internal: cache part size changed");
    return static_cast<float*>(it->second);
  }
  float* cache_rows(int64_t layer, CachePart part, int64_t slot, int64_t rows, int64_t width) override {
    Rows& r = rows_[{layer, part, slot}];
    if (r.cap < rows) {  // grow by doubling, keeping the rows held
      // The copy runs on the side stream now, also while a step is being captured or replayed: the
      // rows hold only earlier forwards' (finished) writes. The old rows are freed at the next
      // begin_forward, when nothing can still read them.
      const int64_t cap = std::max({rows, 2 * r.cap, int64_t(256)});
      void* p = nullptr;
      check_cuda(cudaMalloc(&p, size_t(cap * width) * 4), "KV rows (out of GPU memory?)");
      if (r.p) {
        check_cuda(cudaMemcpyAsync(p, r.p, size_t(r.cap * width) * 4, cudaMemcpyDeviceToDevice, aux_), "KV rows");
        check_cuda(cudaStreamSynchronize(aux_), "KV rows");
        retired_.push_back(r.p);
      }
      r.p = static_cast<float*>(p), r.cap = cap, r.width = width;
    }
    return r.p;
  }
  void reset_slot(int64_t slot) override {  // between forwards (eager)
    for (auto& [key, p] : pools_) {
      const int64_t n = pool_size_[key];
      check_cuda(cudaMemsetAsync(static_cast<float*>(p) + slot * n, 0, size_t(n) * 4, stream_), "reset slot");
    }
  }
  // Prefix snapshots: a slot's cache parts copied into one block allocated, copied and freed in
  // stream order, so a save after a forward and a load before the next need no synchronisation.
  // One allocation per snapshot: the server takes one at every prefix block boundary of every
  // prompt, and a cudaMalloc and cudaFree per part (48 for the 2B model) synchronised the device.
  struct CudaSnapshot : SlotSnapshot {
    struct Part {
      int64_t layer;
      CachePart part;
      size_t offset;        // into block
      int64_t rows, width;  // fixed parts: 1 row of the part's size
    };
    cudaStream_t stream = nullptr;
    void* block = nullptr;
    std::vector<Part> fixed, grown;
    size_t total = 0;
    size_t bytes() const override { return total; }
    float* at(const Part& q) const { return reinterpret_cast<float*>(static_cast<char*>(block) + q.offset); }
    ~CudaSnapshot() override {
      if (block) cudaFreeAsync(block, stream);  // after any load_slot copy queued on the stream
    }
  };
  size_t snapshot_bytes(int64_t slot, int64_t rows) const override {
    size_t n = 0;
    for (auto& [key, p] : pools_) n += size_t(pool_size_.at(key));
    for (auto& [key, r] : rows_)
      if (std::get<2>(key) == slot && r.p) n += size_t(rows * r.width);
    return n * 4;
  }
  std::unique_ptr<SlotSnapshot> save_slot(int64_t slot, int64_t rows) override {
    check(mode_ == Mode::Eager, "internal: save_slot inside a recorded forward");
    auto snap = std::make_unique<CudaSnapshot>();
    snap->stream = stream_;
    std::vector<const float*> sources;
    size_t end = 0;  // of the parts in the block, each 256-byte aligned
    auto add = [&](std::vector<CudaSnapshot::Part>& to, int64_t layer, CachePart part, const float* src, int64_t n,
                   int64_t width) {
      to.push_back({layer, part, end, n, width});
      end += align_up(size_t(n * width) * 4);
      snap->total += size_t(n * width) * 4;
      sources.push_back(src);
    };
    for (auto& [key, p] : pools_) {
      const int64_t n = pool_size_.at(key);
      add(snap->fixed, key.first, key.second, static_cast<const float*>(p) + slot * n, 1, n);
    }
    for (auto& [key, r] : rows_) {
      if (std::get<2>(key) != slot || !r.p) continue;
      check(rows <= r.cap, "internal: a snapshot of more cache rows than the slot holds");
      add(snap->grown, std::get<0>(key), std::get<1>(key), r.p, rows, r.width);
    }
    check_cuda(cudaMallocAsync(&snap->block, std::max<size_t>(end, 256), stream_),
               "prefix snapshot (out of GPU memory?)");
    size_t i = 0;
    for (auto* parts : {&snap->fixed, &snap->grown})
      for (const auto& q : *parts)
        check_cuda(
            cudaMemcpyAsync(snap->at(q), sources[i++], size_t(q.rows * q.width) * 4, cudaMemcpyDeviceToDevice, stream_),
            "prefix snapshot");
    return snap;
  }
  void load_slot(const SlotSnapshot& snapshot, int64_t slot) override {
    check(mode_ == Mode::Eager, "internal: load_slot inside a recorded forward");
    const auto& snap = static_cast<const CudaSnapshot&>(snapshot);
    reset_slot(slot);
    for (const auto& q : snap.fixed)
      check_cuda(cudaMemcpyAsync(cache_pool(q.layer, q.part, q.width) + slot * q.width, snap.at(q), size_t(q.width) * 4,
                                 cudaMemcpyDeviceToDevice, stream_),
                 "prefix snapshot");
    for (const auto& q : snap.grown)
      check_cuda(cudaMemcpyAsync(cache_rows(q.layer, q.part, slot, q.rows, q.width), snap.at(q),
                                 size_t(q.rows * q.width) * 4, cudaMemcpyDeviceToDevice, stream_),
                 "prefix snapshot");
  }
  int64_t slot_bytes(int64_t slot) const override {
    int64_t n = 0;
    for (auto& [key, size] : pool_size_) n += size;
    for (auto& [key, r] : rows_)
      if (std::get<2>(key) == slot) n += r.cap * r.width;
    return n * 4;
  }
  int64_t memory_bytes() const override {
    size_t free = 0, total = 0;
    check_cuda(cudaMemGetInfo(&free, &total), "memory info");
    return int64_t(total - free);
  }

  void linear(const float* x, int64_t ldx, const DevMatrix& W, float* y, int64_t M) override {
    linear_to({x, ldx}, W, y, M, false);
  }
  void linear_rows(const DevRows& x, const DevMatrix& W, float* y, int64_t M) override { linear_to(x, W, y, M, false); }
  void linear_add(const DevRows& x, const DevMatrix& W, float* h, int64_t M) override { linear_to(x, W, h, M, true); }
  // y = (add: +=) x · W^T: from the operand rows where given (they exist only where a GEMM reads
  // them), else from the fp32 rows through a GEMV or the packed GEMM operand.
  void linear_to(const DevRows& rows, const DevMatrix& W, float* y, int64_t M, bool add) {
    const OpScope op(*this, add ? "linear_add" : "linear");
    if (M == 0) return;
    if (rows.op) {
      if (!op.skip) gemm(W, rows.op, W.cols, y, M, DType::F32, add);
      return;
    }
    check(rows.f32 != nullptr, "internal: linear on rows that are neither fp32 nor operand rows");
    const float* x = rows.f32;
    const int64_t ldx = rows.ld;
    const bool small = wt_ == DType::BF16 && gemv_fits(W, x, ldx, M);
    // The GEMM's bf16 operand rows.
    auto* xb = wt_ == DType::BF16 && !small ? scratch_bf16(M * W.cols) : nullptr;
    if (op.skip) return;
    if (small) return gemv<false>(W, x, ldx, y, M, add);
    if (!xb) return gemm(W, x, ldx, y, M, DType::F32, add);
    pack_to(x, ldx, W.cols, xb, M);
    gemm(W, xb, W.cols, y, M, DType::F32, add);
  }
  void embed(const DevMatrix& table, const int32_t* ids, float* out, int64_t T) override {
    const OpScope op(*this, "embed");
    if (op.skip) return;
    if (wt_ == DType::BF16)
      launch(embed_kernel<__nv_bfloat16>, grid_for(T * table.cols), kThreads,
             static_cast<const __nv_bfloat16*>(table.p), ids, out, T, table.cols);
    else
      launch(embed_kernel<float>, grid_for(T * table.cols), kThreads, static_cast<const float*>(table.p), ids, out, T,
             table.cols);
  }
  void add(float* h, const float* y, int64_t n) override {
    const OpScope op(*this, "add");
    if (op.skip) return;
    launch(add_kernel, grid_for(n), kThreads, h, y, n);
  }
  void residual_norm(const float* h, const float* w, float* x, void* x_op, int64_t rows, int64_t dim, float eps,
                     bool zero_centered) override {
    const OpScope op(*this, "residual_norm");
    if (op.skip || rows == 0) return;
    launch(residual_norm_kernel, unsigned(rows), row_threads(dim, rows), h, w, x, static_cast<__nv_bfloat16*>(x_op),
           dim, eps, zero_centered);
  }
  // bf16 operand rows past the GEMV sizes (decode batches read fp32 x through the GEMVs).
  void* operand_rows(int64_t rows, int64_t cols) override {
    if (wt_ != DType::BF16 || rows <= kGemvMaxRows) return nullptr;
    return scratch_bf16(rows * cols);
  }
  void copy(float* dst, Strides d, const float* src, Strides s, int64_t n0, int64_t n1, int64_t n2) override {
    const OpScope op(*this, "copy");
    if (op.skip) return;
    if (n0 * n1 * n2 == 0) return;
    // Both sides one dense row-major block (a prefill's K/V rows into the cache): a plain copy,
    // where copy3_kernel's one value a thread moved the 32K-token rows at 0.9 TB/s.
    auto dense = [&](Strides st) {
      return (n2 == 1 || st.s2 == 1) && (n1 == 1 || st.s1 == n2) && (n0 == 1 || st.s0 == n1 * n2);
    };
    if (dense(d) && dense(s)) {
      check_cuda(cudaMemcpyAsync(dst, src, size_t(n0 * n1 * n2) * 4, cudaMemcpyDeviceToDevice, stream_), "copy");
      return;
    }
    launch(copy3_kernel, grid_for(n0 * n1 * n2), kThreads, dst, d, src, s, n0, n1, n2);
  }
  void rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows, int64_t dim,
                float eps, bool zero_centered) override {
    const OpScope op(*this, "rms_norm");
    if (op.skip) return;
    if (rows == 0) return;
    launch(rms_norm_kernel, unsigned(rows), row_threads(dim, rows), x, ldx, w, y, ldy, dim, eps, zero_centered);
  }
  void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                  float eps) override {
    const OpScope op(*this, "layer_norm");
    if (op.skip) return;
    if (rows == 0) return;
    launch(layer_norm_kernel, unsigned(rows), row_threads(dim, rows), x, w, b, y, dim, eps);
  }
  void gated_rms_norm(float* o, const float* gate, int64_t ld_gate, const float* w, int64_t T, int64_t heads,
                      int64_t dim, float eps, cpu::GateAct act) override {
    const OpScope op(*this, "gated_rms_norm");
    if (op.skip) return;
    gated_norm(o, o, gate, ld_gate, w, T, heads, dim, eps, act);
  }
  // o [T, heads, dim] normalised and gated into y (y may be o): the vector kernel where rows of
  // 128 or 256 allow 16-byte accesses, else the scalar one.
  template <class In, class Out, class G>
  void gated_norm(const In* o, Out* y, const G* gate, int64_t ld_gate, const float* w, int64_t T, int64_t heads,
                  int64_t dim, float eps, cpu::GateAct act) {
    const int64_t rows = T * heads;
    const bool silu = act == cpu::GateAct::SiLU;
    if (rows == 0) return;
    if ((dim == 128 || dim == 256) && ld_gate % 4 == 0 && ptr_alignment(gate) >= 16 && ptr_alignment(w) >= 16 &&
        ptr_alignment(o) >= 16 && ptr_alignment(y) >= 16) {
      auto run = [&](auto R) {
        launch(gated_rms_norm_vec_kernel<In, Out, G, R.value>, grid_for(rows * 32), kThreads, o, y, gate, ld_gate, w,
               rows, heads, eps, silu);
      };
      if (dim == 128)
        run(std::integral_constant<int, 1>{});
      else
        run(std::integral_constant<int, 2>{});
      return;
    }
    launch(gated_rms_norm_kernel<In, Out, G>, grid_for(rows * 32), kThreads, o, y, gate, ld_gate, w, rows, heads, dim,
           eps, silu);
  }
  void l2norm(float* x, int64_t ld, int64_t T, int64_t heads, int64_t dim) override {
    const OpScope op(*this, "l2norm");
    if (op.skip) return;
    launch(l2norm_kernel, grid_for(T * heads * 32), kThreads, x, ld, T, heads, dim);
  }
  void swiglu(const float* gu, float* out, int64_t T, int64_t I) override {
    const OpScope op(*this, "swiglu");
    if (op.skip) return;
    swiglu_to(gu, out, T, I);
  }
  // SwiGLU MLP in bf16 at prefill: the gate/up GEMM stores its products in bf16 (swiglu_bf16's
  // rounding: the 2.0B model's 32K-token prefill writes and reads 0.8 GB less per layer), and the
  // SwiGLU pass writes the down projection's bf16 operand itself, so h skips an fp32 round trip and
  // a conversion pass (the same rounding as linear's conversion). Decode-sized batches keep the
  // SwiGLU GEMV epilogue.
  void swiglu_mlp(const DevRows& x, const DevMatrix& gate_up, const DevMatrix& down, float* out, int64_t M,
                  bool add) override {
    const int64_t I = gate_up.rows / 2;
    if (wt_ != DType::BF16 || (x.f32 && gemv_fits(gate_up, x.f32, x.ld, M)) || gate_up.rows % 2 != 0 || down.cols != I)
      return Device::swiglu_mlp(x, gate_up, down, out, M, add);
    const OpScope op(*this, "swiglu_mlp");
    auto* packed = x.op ? nullptr : scratch_bf16(M * gate_up.cols);
    auto *gu = scratch_bf16(M * gate_up.rows), *hb = scratch_bf16(M * I);
    if (op.skip || M == 0) return;
    if (packed) pack_to(x.f32, x.ld, gate_up.cols, packed, M);
    gemm(gate_up, x.op ? x.op : packed, gate_up.cols, gu, M, DType::BF16);
    swiglu_to(gu, hb, M, I);
    gemm(down, hb, I, out, M, DType::F32, add);
  }
  template <class In, class Out>
  void swiglu_to(const In* gu, Out* out, int64_t T, int64_t I) {
    auto run = [&](auto w) {
      launch(swiglu_kernel<w.value, In, Out>, grid_for(T * I / w.value), kThreads, gu, out, T, I, wt_ == DType::BF16);
    };
    // bf16 in and out (the prefill MLP): 8 outputs a thread, so every access is 16 bytes (4 a
    // thread read the 2.0B model's 32K-token products at 3.1 TB/s).
    if constexpr (sizeof(In) == 2 && sizeof(Out) == 2)
      if (I % 8 == 0 && ptr_alignment(gu) >= 16 && ptr_alignment(out) >= 16)
        return run(std::integral_constant<int, 8>{});
    with_vec_width(vec_width(gu, I, 2 * I), run);
  }
  void sigmoid_mul(float* o, const float* gate, int64_t ld_gate, int64_t ld_gate_head, int64_t T, int64_t heads,
                   int64_t dim, void* o_op) override {
    const OpScope op(*this, "sigmoid_mul");
    if (op.skip) return;
    const int w = vec_width(o, dim, dim) == 4 && vec_width(gate, dim, ld_gate) == 4 && ld_gate_head % 4 == 0 ? 4 : 1;
    with_vec_width(w, [&](auto v) {
      const unsigned grid = grid_for(T * heads * dim / v.value);
      if (o_op)
        launch(sigmoid_mul_kernel<v.value, __nv_bfloat16>, grid, kThreads, o, gate, ld_gate, ld_gate_head, T, heads,
               dim, static_cast<__nv_bfloat16*>(o_op));
      else
        launch(sigmoid_mul_kernel<v.value, float>, grid, kThreads, o, gate, ld_gate, ld_gate_head, T, heads, dim, o);
    });
  }
  void sigmoid(const float* x, int64_t ldx, float* y, int64_t T, int64_t n, float scale) override {
    const OpScope op(*this, "sigmoid");
    if (op.skip) return;
    sigmoid_rows(x, ldx, y, T, n, scale);
  }
  template <class In>
  void sigmoid_rows(const In* x, int64_t ldx, float* y, int64_t T, int64_t n, float scale) {
    launch(sigmoid_kernel<In>, grid_for(T * n), kThreads, x, ldx, y, T, n, scale);
  }
  void gate_softplus(const float* a, int64_t lda, const float* A_log, const float* dt_bias, float* g, int64_t T,
                     int64_t H, int64_t width) override {
    const OpScope op(*this, "gate_softplus");
    if (op.skip) return;
    softplus_gates(a, lda, A_log, dt_bias, g, T, H, width);
  }
  template <class In>
  void softplus_gates(const In* a, int64_t lda, const float* A_log, const float* dt_bias, float* g, int64_t T,
                      int64_t H, int64_t width) {
    launch(gate_softplus_kernel<In>, grid_for(T * H * width), kThreads, a, lda, A_log, dt_bias, g, T, H, width);
  }
  void causal_conv_silu(const float* x, int64_t ldx, const float* w, float* y, int64_t C, int64_t kw,
                        const DevBatch& b, float* conv_pool) override {
    const OpScope op(*this, "causal_conv_silu");
    if (op.skip) return;
    const int N = int(b.num_seqs());
    if (b.one_token_each() && kw <= kConvMaxTaps) {
      launch(conv_decode_kernel, grid_for(N * C), kThreads, x, ldx, w, y, C, int(kw), b.d_slots, N, conv_pool);
      return;
    }
    check(kw <= kConvWideTaps,
          "cuda: short convolutions of more than " + std::to_string(kConvWideTaps) + " taps are not supported");
    with_vec_width(vec_width(x, C, ldx), [&](auto V) {
      conv_prefill<V.value>(x, ldx, w, ConvRows{y, C}, C, kw, b, conv_pool);
    });
  }
  // conv_kernel over every sequence of b into `sink` (V channels per thread), then each slot's conv
  // state advanced. Spans of up to 32 tokens while the grid keeps ≥ 256K threads (8192 channels x
  // 8K tokens: 512K).
  template <int V, class In, class Sink>
  void conv_prefill(const In* x, int64_t ldx, const float* w, Sink sink, int64_t C, int64_t kw, const DevBatch& b,
                    float* conv_pool) {
    const int64_t T = b.tokens();
    const int N = int(b.num_seqs());
    const int span = int(std::clamp<int64_t>(T * (C / V) / (int64_t(1) << 18), 1, 32));
    const unsigned grid = unsigned(((T + span - 1) / span * (C / V) + kThreads - 1) / kThreads);
    if (kw <= kConvMaxTaps)
      launch(conv_kernel<V, kConvMaxTaps, In, Sink>, grid, kThreads, x, ldx, w, sink, T, C, int(kw), span, b.d_cu,
             b.d_slots, N, conv_pool);
    else
      launch(conv_kernel<V, kConvWideTaps, In, Sink>, grid, kThreads, x, ldx, w, sink, T, C, int(kw), span, b.d_cu,
             b.d_slots, N, conv_pool);
    launch(conv_state_kernel<In>, grid_for(N * C), kThreads, x, ldx, C, int(kw), b.d_cu, b.d_slots, N, conv_pool);
  }
  void delta_prep(const DeltaPrep& p, const DevBatch& b) override {
    if (!b.one_token_each() || p.head_dim > 32 * kPrepHeadRegs || p.kw > kConvMaxTaps) return Device::delta_prep(p, b);
    const OpScope op(*this, "delta_prep");
    if (op.skip) return;
    const int64_t N = b.num_seqs();
    launch(delta_prep_decode_kernel, grid_for(N * DeltaPrepTasks(p).per_seq() * 32), kThreads, p, b.d_slots, N);
  }
  // bf16 prefill: the input projection (when the mixer has one) stores its rows in bf16, the conv
  // reads them and writes the op's bf16 q, k (L2-normalised) and v, the op writes bf16 o, the gated
  // norm reads it and writes the output projection's bf16 operand. That drops per GDN layer an
  // L2-norm pass, four fp32 → bf16 packs and one unpack (the 2.0B model's 8K-token prefill: 0.27 ms
  // less per layer, H200), and halves the projection's rows (1.6 GB per layer at 32K tokens).
  void delta_mixer(const DeltaMixer& m, const DevBatch& b, float* out) override {
    if (!fused_mixer_fits(m, b)) return Device::delta_mixer(m, b, out);
    const OpScope op(*this, "delta_mixer");
    const int64_t T = b.tokens(), HK = m.dims.H * m.dims.K, HVV = m.dims.HV * m.dims.V;
    const MixerOperands ops{scratch_bf16(T * HK), scratch_bf16(T * HK), scratch_bf16(T * HVV), scratch_bf16(T * HVV)};
    if (!m.in_proj.p) {
      if (op.skip) return;
      return fused_mixer_steps(m, b, ops, m.prep.x, m.prep.ldx, m.prep.b, m.prep.ldb, m.prep.a, m.prep.lda, m.gate,
                               m.ld_gate, out);
    }
    const int64_t W = m.in_proj.rows;
    __nv_bfloat16 *packed = m.in.op ? nullptr : scratch_bf16(T * m.in_proj.cols), *rows = scratch_bf16(T * W);
    if (op.skip) return;
    if (packed) pack_to(m.in.f32, m.in.ld, m.in_proj.cols, packed, T);
    gemm(m.in_proj, m.in.op ? m.in.op : packed, m.in_proj.cols, rows, T, DType::BF16);
    fused_mixer_steps(m, b, ops, rows + m.x_col, W, rows + m.b_col, W, rows + m.a_col, W, rows + m.gate_col, W, out);
  }
  struct MixerOperands {
    __nv_bfloat16 *q, *k, *v, *o;
  };
  // The fused mixer after its input projection, on rows of type In (fp32 given, or bf16 projected).
  template <class In>
  void fused_mixer_steps(const DeltaMixer& m, const DevBatch& b, const MixerOperands& ops, const In* x, int64_t ldx,
                         const In* b_in, int64_t ldb, const In* a_in, int64_t lda, const In* gate, int64_t ld_gate,
                         float* out) {
    const DeltaPrep& p = m.prep;
    const DeltaRuleDims& d = m.dims;
    const int64_t T = b.tokens(), HK = d.H * d.K, HVV = d.HV * d.V;
    // 4 channels a thread for bf16 rows too: 8 (16-byte loads) took the 2.0B model's 32K-token
    // rows 0.86 ms a layer against 0.64 (H200 ncu): the conv is issue-bound, not bandwidth-bound.
    conv_prefill<4>(x, ldx, p.conv_w, DeltaOperands{ops.q, ops.k, ops.v, HK, HVV, int(d.K / 4)}, p.C, p.kw, b,
                    p.conv_pool);
    sigmoid_rows(b_in, ldb, p.beta, T, p.H, p.beta_max);
    softplus_gates(a_in, lda, p.A_log, p.dt_bias, p.g, T, p.H, p.gate_width);
    chunk_forward(d, DType::BF16, ops.q, ops.k, ops.v, p.g, p.beta, m.scale, b, m.state_pool, ops.o);
    gated_norm(ops.o, ops.o, gate, ld_gate, m.norm, T, d.HV, d.V, m.eps, m.act);
    gemm(m.out_proj, ops.o, HVV, out, T, DType::F32, true);
  }
  // The fused mixer's shapes: bf16 weights, more than one token per sequence (decode keeps its own
  // fused prep), the chunk kernels' head sizes, and conv rows a warp can normalise: rows of 4
  // channels a lane (16-byte aligned fp32 given, 8-byte aligned bf16 projected), C a multiple of
  // 128 channels (a warp's are of one token), q/k heads of 4·(a power of two ≤ 32).
  bool fused_mixer_fits(const DeltaMixer& m, const DevBatch& b) const {
    const DeltaPrep& p = m.prep;
    const int64_t K = m.dims.K, lanes = K / 4;
    const bool rows_fit = m.in_proj.p ? m.in_proj.rows % 4 == 0 && m.x_col % 4 == 0 : vec_width(p.x, p.C, p.ldx) == 4;
    return wt_ == DType::BF16 && !b.one_token_each() && fast_delta_shape(m.dims) && p.kw <= kConvWideTaps &&
           p.l2_heads == 2 * m.dims.H && p.head_dim == K && p.H == m.dims.HV &&
           p.C == 2 * m.dims.H * K + m.dims.HV * m.dims.V && p.C % 128 == 0 && rows_fit && K % 4 == 0 && lanes <= 32 &&
           (lanes & (lanes - 1)) == 0 && m.out_proj.cols == m.dims.HV * m.dims.V;
  }
  void attention_prep(const AttentionPrep& p, const DevBatch& b) override {
    if (p.hd > 32 * kPrepHeadRegs) return Device::attention_prep(p, b);
    const OpScope op(*this, "attention_prep");
    if (op.skip) return;
    const int64_t T = b.tokens();
    if (T > 0) launch(attention_prep_kernel, grid_for(T * attention_prep_tasks(p) * 32), kThreads, p, b.d_pos, T);
  }
  void linear_swiglu(const float* x, int64_t ldx, const DevMatrix& W, float* out, int64_t M) override {
    if (wt_ != DType::BF16 || !gemv_fits(W, x, ldx, M) || W.rows % 2 != 0)
      return Device::linear_swiglu(x, ldx, W, out, M);
    const OpScope op(*this, "linear_swiglu");
    if (op.skip || M == 0) return;
    gemv<true>(W, x, ldx, out, M, false);
  }

  void rope(float* x, int64_t T, int64_t heads, int64_t ld_token, int64_t ld_head, const float* inv_freq, int64_t rot,
            const DevBatch& b, cpu::RopePairs pairs, float attn_factor) override {
    const OpScope op(*this, "rope");
    if (op.skip) return;
    const int64_t half = rot / 2;
    if (T * heads * half == 0) return;
    launch(rope_kernel, grid_for(T * heads * half), kThreads, x, T, heads, ld_token, ld_head, inv_freq, half, b.d_pos,
           pairs == cpu::RopePairs::HalfSplit, attn_factor);
  }
  void delta_rule(const DeltaRuleDims& d, const float* q, const float* k, const float* v, int64_t ld, const float* g,
                  const float* beta, float scale, const DevBatch& b, float* state_pool, float* o) override;
  // The chunk forward over every sequence of b on contiguous q, k [T, H, K], v, o [T, HV, V] in dt,
  // from and back to the sequences' slots in state_pool.
  void chunk_forward(const DeltaRuleDims& dims, DType dt, const void* q, const void* k, const void* v, const float* g,
                     const float* beta, float scale, const DevBatch& b, float* state_pool, void* o);
  void attention(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                 int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window, const int32_t* selected,
                 int64_t topk) override {
    const OpScope op(*this, "attention");
    if (op.skip) return;
    // bf16 mode rounds the operands of the tensor-core kernel as the GEMMs do; fp32 stays exact.
    if (wt_ == DType::BF16 && window == 0 && !selected &&
        attention_flash(q, k, v, o, n, S, nh, nkv, dq, dv, scale, stream_))
      return;
    attention_reference(q, k, v, o, n, S, nh, nkv, dq, dv, scale, window, selected, topk, stream_);
  }
  void decode_attention(int64_t layer, const DevBatch& b, const float* q, const float* k, const float* v, float* o,
                        int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window) override {
    check(dq <= 32 * kMaxHeadDimPerLane && dv <= 32 * kMaxHeadDimPerLane, "cuda attention: head dims above 256");
    const int64_t N = b.num_seqs();
    std::vector<float*> kp, vp;  // each sequence's rows, grown to hold its new one
    for (int64_t i = 0; i < N; ++i) {
      const int64_t S = b.past[size_t(i)] + 1, slot = b.slots[size_t(i)];
      kp.push_back(cache_rows(layer, CachePart::K, slot, S, nkv * dq));
      vp.push_back(cache_rows(layer, CachePart::V, slot, S, nkv * dv));
    }
    auto* kd = static_cast<float* const*>(upload(kp.data(), kp.size() * sizeof(float*)));
    auto* vd = static_cast<float* const*>(upload(vp.data(), vp.size() * sizeof(float*)));
    const OpScope op(*this, "decode_attention");
    float* part = scratch(N * nh * kDecodeParts * (dv + 2));
    if (op.skip) return;
    launch(kv_append_kernel, grid_for(N * nkv * (dq + dv)), kThreads, k, v, kd, vd, b.d_pos, N, nkv * dq, nkv * dv);
    launch(decode_attention_kernel, unsigned(N * nh * kDecodeSplits), 32 * kDecodeWarps, q,
           const_cast<const float* const*>(kd), const_cast<const float* const*>(vd), b.d_pos, part, nh, nkv, dq, dv,
           scale, window);
    launch(decode_combine_kernel, unsigned(N * nh), 128, part, o, dv);
  }
  void dsa_select(const float* iq, const float* w, const float* keys, int64_t n, int64_t S, int64_t IH, int64_t ID,
                  int64_t topk, int32_t* selected) override {
    const OpScope op(*this, "dsa_select");
    if (op.skip) return;
    constexpr int64_t kQueries = 256;  // queries scored at once: bounds the [queries, S] scratch
    float* score = scratch(std::min(n, kQueries) * S);
    for (int64_t t0 = 0; t0 < n; t0 += kQueries) {
      const int64_t m = std::min(kQueries, n - t0);
      // these m queries are the newest of a sequence of S − (n − t0 − m) keys
      const int64_t Sm = S - (n - t0 - m);
      launch(dsa_scores_kernel, grid_for(m * Sm), kThreads, iq + t0 * IH * ID, w + t0 * IH, keys, m, Sm, IH, ID, score);
      launch(dsa_topk_kernel, unsigned(m), kThreads, score, m, Sm, topk, selected + t0 * topk);
    }
  }
  void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) override {
    const OpScope op(*this, "argmax_rows");
    if (op.skip || rows == 0) return;
    launch(argmax_rows_kernel, unsigned(rows), 1024, x, n, out);
  }
  bool moe_on_device(const MoeExperts& m) const override { return wt_ == DType::BF16 && moe_fits(m); }
  void moe(const MoeExperts& m, const float* x, const float* logits, const float* shared, const float* shared_gate,
           float* out, int64_t T) override {
    if (!moe_on_device(m)) return Device::moe(m, x, logits, shared, shared_gate, out, T);
    const OpScope op(*this, "moe");
    void* buf = scratch(int64_t(moe_scratch_bytes(m, std::min(T, kMoeTokensPerPass)) / 4));
    if (op.skip || T == 0) return;
    moe_forward(m, x, logits, shared, shared_gate, out, T, buf, stream_);
  }
  void gather_rows(const float* src, const int32_t* idx, float* dst, int64_t n, int64_t D) override {
    const OpScope op(*this, "gather_rows");
    if (op.skip) return;
    if (n == 0) return;
    launch(gather_rows_kernel, grid_for(n * D), kThreads, src, idx, dst, n, D);
  }
  void scatter_add_rows(float* dst, const int32_t* idx, const float* w, const float* src, int64_t n,
                        int64_t D) override {
    const OpScope op(*this, "scatter_add_rows");
    if (op.skip) return;
    if (n == 0) return;
    launch(scatter_add_rows_kernel, grid_for(n * D), kThreads, dst, idx, w, src, n, D);
  }

 private:
  static constexpr size_t kLtWorkspace = size_t(32) << 20;
  static constexpr size_t kStaging = size_t(16) << 20;  // pinned bytes for one forward's uploads
  enum class Mode { Eager, Capture, Replay };

  bool replaying() const { return mode_ == Mode::Replay; }

  // Each operation's GPU time when HLA_CUDA_PROFILE is set (forwards then run eagerly, no graphs),
  // summed per operation and printed to stderr when the device closes. skip: the operation is part
  // of a graph being replayed, nothing to launch — but an operation of a replayable step takes its
  // scratch before it returns on skip, so that a replayed forward hands out the addresses the
  // recorded one did (to_host checks the result's).
  struct OpScope {
    CudaDevice& d;
    const char* name;
    bool skip;
    cudaEvent_t start = nullptr;
    OpScope(CudaDevice& dev, const char* n) : d(dev), name(n), skip(dev.replaying()) {
      if (skip || !dev.profile_) return;
      cudaEventCreate(&start);
      cudaEventRecord(start, dev.stream_);
    }
    ~OpScope() {
      if (!start) return;
      cudaEvent_t end = nullptr;
      cudaEventCreate(&end);
      cudaEventRecord(end, d.stream_);
      d.timed_.push_back({name, start, end});
    }
  };
  struct Timed {
    const char* name;
    cudaEvent_t start, end;
  };
  void collect_profile() {  // after a stream sync
    for (auto& t : timed_) {
      float ms = 0;
      cudaEventElapsedTime(&ms, t.start, t.end);
      auto& [calls, total] = profile_ms_[t.name];
      ++calls, total += ms;
      cudaEventDestroy(t.start), cudaEventDestroy(t.end);
    }
    timed_.clear();
  }
  void print_profile() const {
    double all = 0;
    for (auto& [name, ct] : profile_ms_) all += ct.second;
    std::fprintf(stderr, "hla: cuda profile (GPU ms per operation, all forwards)\n%-18s %9s %11s %6s\n", "operation",
                 "calls", "ms", "%");
    for (auto& [name, ct] : profile_ms_)
      std::fprintf(stderr, "%-18s %9lld %11.3f %6.1f\n", name.c_str(), (long long)ct.first, ct.second,
                   100.0 * ct.second / std::max(all, 1e-9));
  }
  void drop_graphs() {
    for (auto& [k, g] : graphs_) cudaGraphExecDestroy(g.exec);
    graphs_.clear(), seen_.clear();
  }
  // Host bytes to a scratch copy on the device, through the pinned staging buffer (a recorded copy
  // reads it at replay time; pageable memory cannot be recorded). Uploads larger than the buffer
  // (never those of a decode step) copy from pageable memory, eagerly only.
  void* upload(const void* src, size_t bytes) {
    void* dst = scratch(int64_t((bytes + 3) / 4));
    if (bytes == 0) return dst;
    const size_t at = align_up(staged_);
    if (at + bytes > kStaging) {
      check(mode_ == Mode::Eager, "internal: a recorded forward uploads more than the staging buffer");
      check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
      return dst;
    }
    std::memcpy(static_cast<char*>(staging_) + at, src, bytes);
    staged_ = at + bytes;
    if (!replaying())
      check_cuda(cudaMemcpyAsync(dst, static_cast<char*>(staging_) + at, bytes, cudaMemcpyHostToDevice, stream_),
                 "upload");
    return dst;
  }
  struct Rows {
    float* p = nullptr;
    int64_t cap = 0, width = 0;
  };
  struct Gemm {  // one cached cuBLASLt plan per (shape, alignment)
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
  };

  // Chunk plans by shape and sequence lengths: building one allocates and uploads (host waits), so
  // the layers of a forward, and forwards of the same lengths, share one. Bounded: a server's
  // ever-changing lengths must not grow it without end.
  const DeltaChunkPlan& chunk_plan(const DeltaRuleDims& d, DType dt) {
    auto key = std::make_tuple(d.H, d.HV, d.K, d.V, int(d.gate), int(dt), d.cu_seqlens);
    auto it = plans_.find(key);
    if (it != plans_.end()) return *it->second;
    if (plans_.size() >= 16) {
      check_cuda(cudaStreamSynchronize(stream_), "delta rule plans");
      plans_.clear();
    }
    return *plans_.emplace(key, std::make_unique<DeltaChunkPlan>(d, dt)).first->second;
  }

  // Threads per row of the norm kernels: a few rows (decode) spread each row over up to 1024;
  // many rows (prefill) keep kRowRegs values per thread, so more rows are resident together.
  static unsigned row_threads(int64_t dim, int64_t rows) {
    if (rows >= 1024) return unsigned(std::clamp<int64_t>((dim + 32 * kRowRegs - 1) / (32 * kRowRegs) * 32, 64, 1024));
    return dim >= 1024 ? 1024 : dim >= 256 ? 256 : 64;
  }

  // dst [rows, width] = src rows (stride ld) as T.
  template <class T>
  void pack_to(const float* src, int64_t ld, int64_t width, T* dst, int64_t rows) {
    with_vec_width(vec_width(src, width, ld), [&](auto w) {
      launch(pack_rows<T, w.value>, grid_for(rows * width / w.value), kThreads, src, ld, width, dst, rows);
    });
  }
  // Calls f(std::integral_constant<int, w>) for w = vec_width's 4 or 1: the elementwise kernels
  // come in both widths, one thread per w elements.
  template <class F>
  static void with_vec_width(int w, F&& f) {
    if (w == 4)
      f(std::integral_constant<int, 4>{});
    else
      f(std::integral_constant<int, 1>{});
  }
  // The device's kernels go out through these (PDL, launch.cuh): each starts with pdl_begin().
  template <class... P, class... A>
  void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    launch_smem(kernel, grid, block, 0, args...);
  }
  template <class... P, class... A>
  void launch_smem(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
    launch_pdl("kernel launch", kernel, grid, block, smem, stream_, args...);
  }

  void* upload_bytes(const void* src, size_t bytes) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, std::max<size_t>(bytes, 4)), "weights (out of GPU memory?)");
    owned_.push_back(p);
    check_cuda(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice), "weights upload");
    return p;
  }
  void new_chunk(size_t bytes) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, bytes), "scratch (out of GPU memory?)");
    chunks_.emplace_back(p, bytes);
  }

  // Decode-sized products skip cuBLASLt: one row of x through gemv_kernel, 2 to 8 through
  // gemv_tc_kernel. gemv_kernel's S, the splits of K per row (at most a block's warps), grows while
  // the card would hold fewer than ~4096 warps and each split keeps ≥ 1024 columns: 2048 rows of
  // K = 4096 unsplit leave half the SMs' load slots empty. gemv_tc_kernel's S, the slices of K (a
  // cluster's blocks), doubles up to 8 while its blocks (128 rows x one slice) stay under two per
  // multiprocessor and a slice keeps ≥ 256 columns (the 2B model's 2048-row projections: 8
  // slices, 128 blocks).
  static constexpr int64_t kGemvMaxRows = 8;
  static int gemv_splits(const DevMatrix& W, int max_splits) {
    const int64_t K = W.cols;
    int S = 1;
    while (S < max_splits && K % (16 * S) == 0 && W.rows * S < 4096 && K / S >= 2048) S *= 2;
    return K % (8 * S) == 0 ? S : 0;
  }
  int gemv_tc_splits(const DevMatrix& W) const {
    const int64_t K = W.cols, groups = (W.rows + kGemvTcRows - 1) / kGemvTcRows;
    if (K % 32 != 0) return 0;
    int S = 1;
    while (S < kGemvTcMaxSlices && groups * S < 2 * sms_ && K % (64 * S) == 0 && K / (2 * S) >= 256) S *= 2;
    return S;
  }
  bool gemv_fits(const DevMatrix& W, const float* x, int64_t ldx, int64_t M) const {
    const int S = M == 1 ? gemv_splits(W, kGemvWarps) : gemv_tc_splits(W);
    return M <= kGemvMaxRows && S > 0 && ldx % 4 == 0 && ptr_alignment(x) >= 16;
  }
  template <bool kSwiglu>
  void gemv(const DevMatrix& W, const float* x, int64_t ldx, float* y, int64_t M, bool add) {
    const auto* w = static_cast<const __nv_bfloat16*>(W.p);
    if (M == 1) {
      const int S = gemv_splits(W, kSwiglu ? kGemvWarps / 2 : kGemvWarps);
      const unsigned grid = unsigned((W.rows * S + kGemvWarps - 1) / kGemvWarps);
      return launch(gemv_kernel<kSwiglu>, grid, kGemvWarps * 32, w, x, y, W.rows, W.cols, S, add);
    }
    const int S = gemv_tc_splits(W);
    const unsigned grid = unsigned((W.rows + kGemvTcRows - 1) / kGemvTcRows * S);
    launch_pdl_cluster("gemv", gemv_tc_kernel<kSwiglu>, grid, kGemvTcWarps * 32, 0, unsigned(S), stream_, w, x, ldx, y,
                       W.rows, W.cols, S, int(M), add);
  }

  // y [M, N] = (add: +=) x [M, K] · W^T, y in fp32 or (out = BF16, bf16 weights) rounded to bf16.
  // In cuBLASLt's column-major terms: D [N, M] = W^T (stored [K, N]) · x (stored [K, M], ld ldb)
  // + beta·C, C = D in place (beta 1 adds: one fp32 rounding of the product plus y, as an add pass).
  void gemm(const DevMatrix& W, const void* x, int64_t ldb, void* y, int64_t M, DType out = DType::F32,
            bool add = false) {
    const int64_t N = W.rows, K = W.cols;
    const cudaDataType_t t = wt_ == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
    const cudaDataType_t td = out == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
    const int al_b = ptr_alignment(x), al_d = ptr_alignment(y);
    auto key = std::make_tuple(M, N, K, ldb, al_b, al_d, out);
    auto it = gemms_.find(key);
    if (it == gemms_.end()) {
      Gemm g{};
      check_lt(cublasLtMatmulDescCreate(&g.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      check_lt(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "transa");
      check_lt(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "transb");
      check_lt(cublasLtMatrixLayoutCreate(&g.a, t, uint64_t(K), uint64_t(N), K), "layout A");
      check_lt(cublasLtMatrixLayoutCreate(&g.b, t, uint64_t(K), uint64_t(M), ldb), "layout B");
      check_lt(cublasLtMatrixLayoutCreate(&g.d, td, uint64_t(N), uint64_t(M), N), "layout D");
      cublasLtMatmulPreference_t pref;
      check_lt(cublasLtMatmulPreferenceCreate(&pref), "preference");
      const uint64_t ws = kLtWorkspace;
      const uint32_t a256 = 256, ab = uint32_t(al_b), ad = uint32_t(al_d);
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a256, sizeof(a256));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad, sizeof(ad));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad, sizeof(ad));
      cublasLtMatmulHeuristicResult_t res{};
      int found = 0;
      const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(lt_, g.op, g.a, g.b, g.d, g.d, pref, 1, &res, &found);
      cublasLtMatmulPreferenceDestroy(pref);
      check(s == CUBLAS_STATUS_SUCCESS && found > 0,
            "cublasLt: no GEMM algorithm for [" + std::to_string(M) + ", " + std::to_string(K) + "] x [" +
                std::to_string(K) + ", " + std::to_string(N) + "]");
      g.algo = res.algo;
      it = gemms_.emplace(key, g).first;
    }
    const Gemm& g = it->second;
    const float one = 1.0f, beta = add ? 1.0f : 0.0f;
    check_lt(cublasLtMatmul(lt_, g.op, &one, W.p, g.a, x, g.b, &beta, y, g.d, y, g.d, &g.algo, lt_ws_, kLtWorkspace,
                            stream_),
             "matmul");
  }

  int64_t slots_;
  DType wt_;
  cudaStream_t stream_ = nullptr, aux_ = nullptr;  // aux_: cache growth outside the recorded work
  void* staging_ = nullptr;
  size_t staged_ = 0;
  void* pinned_ = nullptr;  // to_host's bounce buffer, grown to the largest result
  size_t pinned_bytes_ = 0;
  Mode mode_ = Mode::Eager;
  int64_t key_ = -1;
  struct Graph {
    cudaGraphExec_t exec;
    const void* result;  // what to_host copies back
  };
  std::map<int64_t, Graph> graphs_;
  std::map<int64_t, int> seen_;
  std::vector<void*> retired_;  // KV rows outgrown, freed at the next begin_forward
  bool profile_ = std::getenv("HLA_CUDA_PROFILE") != nullptr;
  std::vector<Timed> timed_;
  std::map<std::string, std::pair<int64_t, double>> profile_ms_;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_ws_ = nullptr;
  int sms_ = 0;
  std::vector<void*> owned_;                   // weights
  std::vector<std::pair<void*, size_t>> chunks_;  // scratch arena
  size_t used_ = 0;
  std::map<std::pair<int64_t, CachePart>, void*> pools_;
  std::map<std::pair<int64_t, CachePart>, int64_t> pool_size_;
  std::map<std::tuple<int64_t, CachePart, int64_t>, Rows> rows_;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int, int, DType>, Gemm> gemms_;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int, int, std::vector<int64_t>>, std::unique_ptr<DeltaChunkPlan>>
      plans_;
};

void CudaDevice::delta_rule(const DeltaRuleDims& dims, const float* q, const float* k, const float* v, int64_t ld,
                            const float* g, const float* beta, float scale, const DevBatch& b, float* state_pool,
                            float* o) {
  const OpScope op(*this, "delta_rule");
  if (op.skip) return;
  const int64_t N = b.num_seqs(), T = b.tokens(), H = dims.H, HV = dims.HV, K = dims.K, V = dims.V;
  if (!fast_delta_shape(dims)) {
    check(K <= kMaxRecurrentK && V <= 1024, "cuda delta rule: K above 256 or V above 1024");
    const unsigned threads = unsigned((V + 31) / 32 * 32);
    launch_smem(delta_recurrent_kernel, unsigned(N * HV), threads, size_t(3 * K) * 4, q, k, v, ld, g, beta, scale,
                b.d_cu, b.d_slots, state_pool, o, int(H), int(HV), int(K), int(V), dims.gate == DeltaGate::PerKey);
    return;
  }
  if (b.one_token_each()) {  // decode: fp32 rows read in place, the slot pool is the kernel's own state layout
    delta_rule_decode(dims, DType::F32, N, 1, q, k, v, g, beta, scale, state_pool, b.d_slots, nullptr, o, stream_, ld);
    return;
  }
  // The chunk kernels take contiguous q, k [T, H, K], v [T, HV, V] in the weight type.
  const bool bf16 = wt_ == DType::BF16;
  const DType dt = bf16 ? DType::BF16 : DType::F32;
  auto pack = [&](const float* src, int64_t width) -> void* {
    if (bf16) {
      auto* dst = scratch_bf16(T * width);
      pack_to(src, ld, width, dst, T);
      return dst;
    }
    float* dst = scratch(T * width);
    pack_to(src, ld, width, dst, T);
    return dst;
  };
  void* qc = pack(q, H * K);
  void* kc = pack(k, H * K);
  void* vc = pack(v, HV * V);
  void* oc = bf16 ? static_cast<void*>(scratch((T * HV * V + 1) / 2)) : o;
  chunk_forward(dims, dt, qc, kc, vc, g, beta, scale, b, state_pool, oc);
  if (bf16)
    launch(unpack_bf16, grid_for((T * HV * V + 7) / 8), kThreads, static_cast<const __nv_bfloat16*>(oc), o, T * HV * V);
}

void CudaDevice::chunk_forward(const DeltaRuleDims& dims, DType dt, const void* q, const void* k, const void* v,
                               const float* g, const float* beta, float scale, const DevBatch& b, float* state_pool,
                               void* o) {
  const int64_t N = b.num_seqs(), HV = dims.HV, K = dims.K, V = dims.V;
  // The states of the batch's slots gathered into [N, HV, K, V] and back.
  DeltaRuleDims d = dims;
  d.cu_seqlens = b.cu_seqlens;
  const size_t state_bytes = size_t(HV * K * V) * 4;
  float* states = scratch(N * HV * K * V);
  for (int64_t i = 0; i < N; ++i)
    check_cuda(cudaMemcpyAsync(states + i * HV * K * V, state_pool + b.slots[size_t(i)] * HV * K * V, state_bytes,
                               cudaMemcpyDeviceToDevice, stream_),
               "delta rule: gather states");
  chunk_plan(d, dt).forward(q, k, v, g, beta, scale, states, o, stream_);
  for (int64_t i = 0; i < N; ++i)
    check_cuda(cudaMemcpyAsync(state_pool + b.slots[size_t(i)] * HV * K * V, states + i * HV * K * V, state_bytes,
                               cudaMemcpyDeviceToDevice, stream_),
               "delta rule: scatter states");
}

}  // namespace

void attention_reference(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                         int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window, const int32_t* selected,
                         int64_t topk, cudaStream_t stream) {
  check(dq <= 32 * kMaxHeadDimPerLane && dv <= 32 * kMaxHeadDimPerLane, "cuda attention: head dims above 256");
  launch_pdl("attention", attention_reference_kernel, grid_for(n * nh * 32, 128), 128, 0, stream, q, k, v, o, n, S, nh,
             nkv, dq, dv, scale, window, selected, topk);
}

std::unique_ptr<Device> make_cuda_device(int64_t slots, DType weights) {
  return std::make_unique<CudaDevice>(slots, weights);
}

}  // namespace hla::cuda
