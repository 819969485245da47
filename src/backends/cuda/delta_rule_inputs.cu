// The input pass of a DeltaInputForm and its backward (delta_rule_inputs.h). Memory-bound
// elementwise work, so one launch each way does every transform the form names: a warp per q or k
// row (L2 norm; each lane loads its K/32 contiguous values in one or two vector accesses), 32
// values of beta or g per warp otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "backends/cuda/delta_rule_inputs.h"
#include "backends/cuda/kernel_util.cuh"
#include "backends/cuda/mma.cuh"
#include "core/error.h"

namespace hla::cuda {
namespace {

constexpr int kThreads = 256;

struct InputArgs {
  int64_t T, H, K, HV, width;  // width: gate values per value head (1 or K)
  DeltaInputForm form;
  const void *q, *k;
  const float *b, *a;
  DeltaInputs out;
  // backward only: gradients updated in place, the gate-parameter sums
  float *dq, *dk, *dbeta, *dg;
};

// E contiguous elements of a row (E·sizeof(T) bytes, aligned to that size) in one or two vector
// accesses: lane l of a K-wide row owns columns [E·l, E·l + E), E = K/32.
template <class T, int E>
struct RowPart {
  static constexpr int kBytes = E * int(sizeof(T)), kWords = kBytes < 16 ? 1 : kBytes / 16;
  using Word = std::conditional_t<kBytes >= 16, uint4, std::conditional_t<kBytes == 8, uint2,
                                  std::conditional_t<kBytes == 4, uint32_t, uint16_t>>>;
  union {
    Word w[kWords];
    T v[E];
  };
  __device__ void load(const T* p) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const Word*>(p)[i];
  }
  __device__ void store(T* p) const {
#pragma unroll
    for (int i = 0; i < kWords; ++i) reinterpret_cast<Word*>(p)[i] = w[i];
  }
};

template <class In, int E>
__device__ __forceinline__ float load_row(const In* x, float (&v)[E]) {
  RowPart<In, E> r;
  r.load(x + E * (threadIdx.x & 31));
  float ss = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) ss += (v[e] = to_f32(r.v[e])) * v[e];
  return l2_inverse(warp_sum(ss));
}

// The warp tasks of both passes: 2·T·H rows of q and k (L2 norm), then runs of 32 values of beta,
// then of g.
struct Tasks {
  int64_t rows, beta, gate;
  __host__ __device__ explicit Tasks(const InputArgs& p)
      : rows(p.form.qk_l2norm ? 2 * p.T * p.H : 0),
        beta(p.form.beta_max > 0 ? (p.T * p.HV + 31) / 32 : 0),
        gate(p.form.gate != DeltaGateForm::LogDecay ? (p.T * p.HV * p.width + 31) / 32 : 0) {}
  __host__ __device__ int64_t total() const { return rows + beta + gate; }
};

// Runs this warp's tasks: row(is_k, r) for row r of q or k; beta(i) and gate(i, column) for the
// lane's value i of beta or g.
template <class Row, class Beta, class Gate>
__device__ __forceinline__ void for_each_task(const InputArgs& p, Row&& row, Beta&& beta, Gate&& gate) {
  const int lane = threadIdx.x & 31;
  const Tasks tasks(p);
  const int64_t warps = int64_t(gridDim.x) * kThreads / 32, qk_rows = p.T * p.H, cols = p.HV * p.width;
  for (int64_t w = (blockIdx.x * int64_t(kThreads) + threadIdx.x) / 32; w < tasks.total(); w += warps) {
    if (w < tasks.rows) {
      row(w >= qk_rows, w >= qk_rows ? w - qk_rows : w);
    } else if (w < tasks.rows + tasks.beta) {
      const int64_t i = (w - tasks.rows) * 32 + lane;
      if (i < p.T * p.HV) beta(i);
    } else {
      const int64_t i = (w - tasks.rows - tasks.beta) * 32 + lane;
      if (i < p.T * cols) gate(i, i % cols);
    }
  }
}

template <class In, class Out, int E>
__global__ void __launch_bounds__(kThreads) inputs_kernel(InputArgs p) {
  for_each_task(
      p,
      [&](bool is_k, int64_t row) {
        float v[E];
        const float inv = load_row<In, E>(static_cast<const In*>(is_k ? p.k : p.q) + row * p.K, v);
        RowPart<Out, E> y;
#pragma unroll
        for (int e = 0; e < E; ++e) y.v[e] = from_f32<Out>(v[e] * inv);
        y.store(static_cast<Out*>(is_k ? p.out.k : p.out.q) + row * p.K + E * (threadIdx.x & 31));
      },
      [&](int64_t i) { p.out.beta[i] = form_beta(p.form, p.b[i]); },
      [&](int64_t i, int64_t c) { p.out.g[i] = gate_value(p.form, p.a[i], c, p.width).g; });
}

// Backward, in place: dx = ρ (dy − ρ² x (x·dy)) for the rows, db = dbeta·beta_max·σ(b)(1 − σ(b)),
// da = dg·∂g/∂a. Runs after gate_sums_kernel, which reads dg before it is overwritten.
template <class In, int E>
__global__ void __launch_bounds__(kThreads) inputs_grad_kernel(InputArgs p) {
  for_each_task(
      p,
      [&](bool is_k, int64_t row) {
        float v[E];
        const float inv = load_row<In, E>(static_cast<const In*>(is_k ? p.k : p.q) + row * p.K, v);
        RowPart<float, E> dy;
        float* at = (is_k ? p.dk : p.dq) + row * p.K + E * (threadIdx.x & 31);
        dy.load(at);
        float xdy = 0;
#pragma unroll
        for (int e = 0; e < E; ++e) xdy += v[e] * dy.v[e];
        xdy = warp_sum(xdy);
#pragma unroll
        for (int e = 0; e < E; ++e) dy.v[e] = inv * (dy.v[e] - inv * inv * v[e] * xdy);
        dy.store(at);
      },
      [&](int64_t i) {
        const float s = sigmoidf(p.b[i]);
        p.dbeta[i] *= p.form.beta_max * s * (1.0f - s);
      },
      [&](int64_t i, int64_t c) { p.dg[i] *= gate_value(p.form, p.a[i], c, p.width).dgdx; });
}

// dA_log and ddt_bias are sums over all tokens. Stage 1: block (32 gate columns, token split s)
// sums its columns' dg·∂g/∂a and dg·∂g/∂A_log over the split's tokens, 8 token lanes per column,
// the lanes combined in order → part[s][c] = {Σ da, Σ dA}. Stage 2 (gate_params_kernel): one block
// per head sums the splits in order, then the head's columns in order. Deterministic.
constexpr int kSumCols = 32, kSumLanes = kThreads / kSumCols;
__global__ void __launch_bounds__(kThreads) gate_sums_kernel(InputArgs p, int64_t split_len, float2* part) {
  __shared__ float2 acc[kSumLanes][kSumCols];
  const int col = threadIdx.x % kSumCols, lane = threadIdx.x / kSumCols;
  const int64_t cols = p.HV * p.width, c = blockIdx.x * int64_t(kSumCols) + col;
  const int64_t t0 = blockIdx.y * split_len, t1 = t0 + split_len < p.T ? t0 + split_len : p.T;
  float2 sum = {0, 0};
  if (c < cols)
    for (int64_t t = t0 + lane; t < t1; t += kSumLanes) {
      const int64_t i = t * cols + c;
      const GateValue gv = gate_value(p.form, p.a[i], c, p.width);
      sum.x += p.dg[i] * gv.dgdx;
      sum.y += p.dg[i] * gv.dgdA;
    }
  acc[lane][col] = sum;
  __syncthreads();
  if (lane != 0 || c >= cols) return;
  for (int l = 1; l < kSumLanes; ++l) sum.x += acc[l][col].x, sum.y += acc[l][col].y;
  part[blockIdx.y * cols + c] = sum;
}

__global__ void __launch_bounds__(kThreads) gate_params_kernel(InputArgs p, int64_t splits, const float2* part,
                                                               float* dA_log, float* ddt_bias) {
  __shared__ float colA[kThreads];
  const int64_t cols = p.HV * p.width, h = blockIdx.x;
  float a_sum = 0;
  for (int64_t w = threadIdx.x; w < p.width; w += kThreads) {
    const int64_t c = h * p.width + w;
    float2 s = {0, 0};
    for (int64_t sp = 0; sp < splits; ++sp) s.x += part[sp * cols + c].x, s.y += part[sp * cols + c].y;
    if (ddt_bias) ddt_bias[c] = s.x;
    a_sum += s.y;
  }
  colA[threadIdx.x] = a_sum;
  __syncthreads();
  if (threadIdx.x != 0) return;
  float total = 0;
  for (int i = 0; i < kThreads; ++i) total += colA[i];
  dA_log[h] = total;
}

InputArgs make_args(const DeltaRuleDims& d, const DeltaInputForm& form, const void* q, const void* k, const float* b,
                    const float* a) {
  InputArgs p{};
  p.T = d.tokens(), p.H = d.H, p.K = d.K, p.HV = d.HV, p.width = d.g_width();
  p.form = form, p.q = q, p.k = k, p.b = b, p.a = a;
  return p;
}

unsigned grid_for(const InputArgs& p) {
  return unsigned(std::clamp<int64_t>((Tasks(p).total() * 32 + kThreads - 1) / kThreads, 1, 8 * 1024));
}

template <class F>
void by_type(DType t, F&& f) {
  if (t == DType::F32) f(float{});
  else if (t == DType::BF16) f(__nv_bfloat16{});
  else f(__half{});
}
// f(std::integral_constant<int, K/32>) for K in {32, 64, 128, 256} (check_delta_dims).
template <class F>
void by_row_part(int64_t K, F&& f) {
  switch (K) {
    case 32: return f(std::integral_constant<int, 1>{});
    case 64: return f(std::integral_constant<int, 2>{});
    case 128: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

int64_t gate_splits(const DeltaRuleDims& d) { return std::clamp<int64_t>((d.tokens() + 511) / 512, 1, 128); }

}  // namespace

void check_delta_input_form(const DeltaInputForm& form, const char* what) {
  check(form.gate == DeltaGateForm::LogDecay || form.A_log,
        std::string(what) + ": a gate form needs A_log (and optionally dt_bias)");
  check(form.gate != DeltaGateForm::LowerBound || form.lower_bound < 0,
        std::string(what) + ": the lower-bound gate needs lower_bound < 0");
  check(form.beta_max >= 0, std::string(what) + ": beta_max must be 0 (beta given) or positive");
}

size_t delta_inputs_bytes(const DeltaRuleDims& d, size_t es, bool gates) {
  const size_t T = size_t(d.tokens());
  return 2 * align_up(T * d.H * d.K * es) + (gates ? align_up(T * d.HV * 4) + align_up(T * d.g_stride() * 4) : 0);
}

DeltaInputs delta_inputs_at(void* block, const DeltaRuleDims& d, size_t es) {
  const size_t T = size_t(d.tokens());
  char* p = static_cast<char*>(block);
  DeltaInputs r;
  r.q = p, p += align_up(T * d.H * d.K * es);
  r.k = p, p += align_up(T * d.H * d.K * es);
  r.beta = reinterpret_cast<float*>(p), p += align_up(T * d.HV * 4);
  r.g = reinterpret_cast<float*>(p);
  return r;
}

void delta_inputs_forward(const DeltaRuleDims& d, const DeltaInputForm& form, DType in, DType out_dt, const void* q,
                          const void* k, const float* b, const float* a, const DeltaInputs& out, cudaStream_t s) {
  check_delta_input_form(form, "delta rule input pass (cuda)");
  InputArgs p = make_args(d, form, q, k, b, a);
  p.out = out;
  if (Tasks(p).total() == 0) return;
  by_type(in, [&](auto i) {
    by_type(out_dt, [&](auto o) {
      by_row_part(d.K, [&](auto e) {
        inputs_kernel<decltype(i), decltype(o), decltype(e)::value><<<grid_for(p), kThreads, 0, s>>>(p);
      });
    });
  });
  check_cuda(cudaGetLastError(), "delta rule input pass");
}

size_t delta_inputs_grad_scratch(const DeltaRuleDims& d) { return size_t(2 * gate_splits(d) * d.g_stride()); }

void delta_inputs_backward(const DeltaRuleDims& d, const DeltaInputForm& form, DType in, const void* q, const void* k,
                           const float* b, const float* a, float* dq, float* dk, float* dbeta, float* dg,
                           float* dA_log, float* ddt_bias, float* scratch, cudaStream_t s) {
  check_delta_input_form(form, "delta rule input backward (cuda)");
  InputArgs p = make_args(d, form, q, k, b, a);
  p.dq = dq, p.dk = dk, p.dbeta = dbeta, p.dg = dg;
  if (form.gate != DeltaGateForm::LogDecay) {
    check(dA_log && (ddt_bias || !form.dt_bias), "delta rule input backward (cuda): dA_log/ddt_bias outputs missing");
    const int64_t splits = gate_splits(d), split_len = (d.tokens() + splits - 1) / splits;
    auto* part = reinterpret_cast<float2*>(scratch);
    const dim3 grid(unsigned((d.g_stride() + kSumCols - 1) / kSumCols), unsigned(splits));
    gate_sums_kernel<<<grid, kThreads, 0, s>>>(p, split_len, part);
    gate_params_kernel<<<unsigned(d.HV), kThreads, 0, s>>>(p, splits, part, dA_log, form.dt_bias ? ddt_bias : nullptr);
    check_cuda(cudaGetLastError(), "delta rule gate parameter sums");
  }
  if (Tasks(p).total() == 0) return;
  by_type(in, [&](auto i) {
    by_row_part(d.K, [&](auto e) { inputs_grad_kernel<decltype(i), decltype(e)::value><<<grid_for(p), kThreads, 0, s>>>(p); });
  });
  check_cuda(cudaGetLastError(), "delta rule input backward");
}

}  // namespace hla::cuda
