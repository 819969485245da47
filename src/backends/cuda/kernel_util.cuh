// Small device helpers shared by the CUDA kernels: asynchronous tile copies, warp reductions,
// the sigmoid, the bf16 GEMV step, exponentials.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backends/cuda/delta_rule_cuda.h"
#include "core/dtype.h"
#include "ops/delta_rule.h"

namespace hla::cuda {

// Workspace pieces start on 256-byte boundaries (every vector access and cp.async stays aligned).
inline size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

// Validates what every delta-rule kernel supports (element type, K, V); throws hla::Error.
void check_delta_dims(const DeltaRuleDims& d, DType dt, const char* what);

// 16-byte global->shared copy that bypasses registers; with valid == false it writes zeros and
// reads nothing (rows past a sequence's end).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
// 4-byte global->shared copy (the .ca form: .cg copies 16 bytes only).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}
// The "memory" clobbers keep the compiler from moving shared-memory reads and writes across the
// copies and the wait (a thread reading back its own copies after cp_async_wait has no barrier).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Block-wide copy of a rows x cols tile (cols·sizeof(CT) a multiple of 16) into shared memory with
// row pitch ld; rows >= valid are zero-filled. row(i) gives the global address of row i.
template <class CT, class RowPtr>
__device__ __forceinline__ void load_rows_async(CT* s, int ld, int rows, int cols, int valid, RowPtr row) {
  constexpr int vec = 16 / sizeof(CT);
  const int per_row = cols / vec;
  for (int idx = threadIdx.x; idx < rows * per_row; idx += blockDim.x) {
    const int r = idx / per_row, c = (idx % per_row) * vec;
    const bool ok = r < valid;
    cp_async16(s + r * ld + c, (ok ? row(r) : row(0)) + c, ok);
  }
}

// The copies of a ROWS x COLS tile that a block of THREADS threads (blockDim.x) makes again and
// again, one chunk after the other: each thread's rows and 16-byte column are fixed at
// construction, so a copy costs an address add and the copy itself. (load_rows_async recomputes a
// row address per copy: the state pass issued 729 instructions per warp and chunk step with it,
// 570 with this; H200 ncu, GDN (1,16384,32).) Global rows are `stride` elements apart, shared
// rows `ld`.
template <class CT, int ROWS, int COLS, int THREADS>
class TileCopy {
  static constexpr int kVec = 16 / sizeof(CT), kPerRow = COLS / kVec, kRowStep = THREADS / kPerRow;
  static constexpr int kCopies = (ROWS + kRowStep - 1) / kRowStep;
  static_assert(COLS % kVec == 0 && THREADS % kPerRow == 0, "whole 16-byte copies, whole rows per pass");
  int row_;              // this thread's first row
  int64_t g_, gstep_;    // global element offsets: of (row_, column), between the thread's rows
  int s_, sstep_;        // the same in shared memory

 public:
  __device__ TileCopy(int64_t stride, int ld)
      : row_(int(threadIdx.x) / kPerRow),
        g_(row_ * stride + int(threadIdx.x) % kPerRow * kVec),
        gstep_(kRowStep * stride),
        s_(row_ * ld + int(threadIdx.x) % kPerRow * kVec),
        sstep_(kRowStep * ld) {}
  // Global tile at g -> shared tile at s, asynchronously (cp.async); rows >= valid are zero-filled.
  __device__ __forceinline__ void load_async(const CT* g, CT* s, int valid) const {
#pragma unroll
    for (int k = 0; k < kCopies; ++k) {
      const int r = row_ + k * kRowStep;
      if constexpr (ROWS % kRowStep != 0)
        if (r >= ROWS) break;
      const bool ok = r < valid;
      cp_async16(s + s_ + k * sstep_, ok ? g + g_ + k * gstep_ : g, ok);
    }
  }
  // Shared tile at s -> global tile at g, every row.
  __device__ __forceinline__ void store(const CT* s, CT* g) const {
#pragma unroll
    for (int k = 0; k < kCopies; ++k) {
      if constexpr (ROWS % kRowStep != 0)
        if (row_ + k * kRowStep >= ROWS) break;
      *reinterpret_cast<uint4*>(g + g_ + k * gstep_) = *reinterpret_cast<const uint4*>(s + s_ + k * sstep_);
    }
  }
};

// 16 bytes of CT elements in registers, for vectorised global/shared loads and stores.
template <class CT>
struct alignas(16) Pack {
  static constexpr int n = 16 / sizeof(CT);
  CT v[n];
  __device__ static Pack zero() {
    Pack p;
    *reinterpret_cast<uint4*>(p.v) = make_uint4(0, 0, 0, 0);
    return p;
  }
};
template <class CT>
__device__ __forceinline__ Pack<CT> ld16(const CT* p) {
  Pack<CT> r;
  *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <class CT>
__device__ __forceinline__ void st16(CT* p, const Pack<CT>& x) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(x.v);
}

// Warp-wide reductions: every lane gets the result (butterfly order, the same on every lane).
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
// SiLU(gate)·up of a SwiGLU pair in bf16 mode: both rounded to bf16 first, as a bf16 GEMM stores
// them (and as transformers' bf16 Linear returns them), so that every path that rounds the GEMM's
// operands rounds its gate/up products too, and the prefill GEMM can write them in bf16.
__device__ __forceinline__ float swiglu_bf16(float gate, float up) {
  const float g = __bfloat162float(__float2bfloat16_rn(gate));
  return g * sigmoidf(g) * __bfloat162float(__float2bfloat16_rn(up));
}
// 1 / ||x|| from its sum of squares, as the CPU's l2norm_forward (eps 1e-6 inside the root).
__device__ __forceinline__ float l2_inverse(float sum_sq) { return 1.0f / sqrtf(sum_sq + 1e-6f); }
// softplus as torch computes it: linear above 20.
__device__ __forceinline__ float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// The transforms of a DeltaInputForm (delta_rule_cuda.h) on one value.
// g and its derivatives for pre-activation value a of gate column c (head c / width):
// dgdx = ∂g/∂a (= ∂g/∂dt_bias), dgdA = ∂g/∂A_log (as gate_softplus_backward / gate_lowerbound_backward).
struct GateValue {
  float g, dgdx, dgdA;
};
__device__ __forceinline__ GateValue gate_value(const DeltaInputForm& f, float a, int64_t c, int64_t width) {
  const float A = expf(f.A_log[c / width]), x = a + (f.dt_bias ? f.dt_bias[c] : 0.0f);
  if (f.gate == DeltaGateForm::Softplus) {
    const float g = -A * softplusf(x);
    return {g, -A * (x > 20.0f ? 1.0f : sigmoidf(x)), g};
  }
  const float z = A * x, s = sigmoidf(z), ds = f.lower_bound * s * (1.0f - s);
  return {f.lower_bound * s, ds * A, ds * z};
}

// The op's beta and gate value from a raw input, as the form says (the raw value itself when the
// form leaves it as given).
__device__ __forceinline__ float form_beta(const DeltaInputForm& f, float b) {
  return f.beta_max > 0 ? f.beta_max * sigmoidf(b) : b;
}
__device__ __forceinline__ float form_gate(const DeltaInputForm& f, float a, int64_t c, int64_t width) {
  return f.gate == DeltaGateForm::LogDecay ? a : gate_value(f, a, c, width).g;
}

// acc + the dot product of 8 bf16 weights (one 16-byte load) with a[0..7], pair by pair (the
// decode GEMVs' inner step).
__device__ __forceinline__ float dot_bf16x8(float acc, const uint4& w, const float (&a)[8]) {
  const __nv_bfloat162* pair = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __bfloat1622float2(pair[j]);
    acc += f.x * a[2 * j] + f.y * a[2 * j + 1];
  }
  return acc;
}

// e^x: full precision for fp32 inputs (they must stay within 1e-4 of fp64), the fast hardware
// form where operands are rounded to 16 bits anyway.
template <class CT>
__device__ __forceinline__ float fast_exp(float x) {
  if constexpr (sizeof(CT) == 4) return expf(x);
  else return __expf(x);
}

}  // namespace hla::cuda
