// Times hla's CUDA delta-rule kernels on the shapes of issue 3 and prints one CSV row per case:
//   op,shape,dtype,us,TFLOPs,GBps
// TFLOP/s counts useful FLOPs 4·T·HV·K·V (the convention FlashInfer and the issue use); GB/s counts
// the fewest bytes the op must move: q,k,v,g,beta read, o written, the fp32 state read and written.
// Inputs are drawn on the device (q,v normal; k L2-normalised; g = log-sigmoid clamped at −5;
// beta in (0,1)), bf16 like the FLA side of anchors/anchor_bench.py. Times are medians over
// repeated launches after a warm-up, measured with CUDA events.
// Forward+backward rows (*_chunk_bwd, *_chunk_fwdbwd) time DeltaChunkBackward after the forward;
// *_chunk_fwd_layer / *_chunk_bwd_layer / *_decode_layer rows the op with the layer transforms inside
// (DeltaInputForm).
//   bench_delta_rule [--quick] [--only=SUBSTRING of "op,shape"]
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/delta_rule_cuda.h"

using namespace hla;

namespace {

__device__ float hash_normal(uint64_t i, uint32_t seed) {
  // Two 32-bit hashes -> Box-Muller.
  auto h = [](uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return uint32_t(x);
  };
  const float u1 = (h(2 * i + (uint64_t(seed) << 40)) + 1.f) * 2.3283064e-10f;
  const float u2 = h(2 * i + 1 + (uint64_t(seed) << 40)) * 2.3283064e-10f;
  return sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2);
}

enum class Fill { Normal, LogSigmoid, Beta };

__global__ void fill_f32(float* x, size_t n, uint32_t seed, Fill f) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float z = hash_normal(i, seed);
    x[i] = f == Fill::LogSigmoid ? fmaxf(-5.f, -log1pf(expf(-z))) : f == Fill::Beta ? 1.f / (1.f + expf(-z)) : z;
  }
}

// rows of `dim` normal values, L2-normalised when `normalise`, stored as bf16.
__global__ void fill_rows_bf16(__nv_bfloat16* x, size_t rows, int dim, uint32_t seed, bool normalise) {
  const size_t r = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  float ss = 0.f;
  for (int i = 0; i < dim; ++i) {
    const float z = hash_normal(r * dim + i, seed);
    ss += z * z;
  }
  const float s = normalise ? rsqrtf(ss) : 1.f;
  for (int i = 0; i < dim; ++i) x[r * dim + i] = __float2bfloat16(hash_normal(r * dim + i, seed) * s);
}

void ck(cudaError_t e, const char* what) { cuda::check_cuda(e, what); }

struct Inputs {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  float *g = nullptr, *beta = nullptr, *state = nullptr;
  Inputs(int64_t T, int64_t H, int64_t HV, int64_t K, int64_t V, bool kda, int64_t states) {
    const size_t nq = T * H * K, nv = T * HV * V, ng = T * HV * (kda ? K : 1), nb = T * HV, ns = states * HV * K * V;
    ck(cudaMalloc(&q, nq * 2), "alloc q");
    ck(cudaMalloc(&k, nq * 2), "alloc k");
    ck(cudaMalloc(&v, nv * 2), "alloc v");
    ck(cudaMalloc(&o, nv * 2), "alloc o");
    ck(cudaMalloc(&g, ng * 4), "alloc g");
    ck(cudaMalloc(&beta, nb * 4), "alloc beta");
    ck(cudaMalloc(&state, ns * 4), "alloc state");
    const unsigned blocks = 1024;
    fill_rows_bf16<<<unsigned((T * H + 255) / 256), 256>>>(static_cast<__nv_bfloat16*>(q), T * H, int(K), 1, false);
    fill_rows_bf16<<<unsigned((T * H + 255) / 256), 256>>>(static_cast<__nv_bfloat16*>(k), T * H, int(K), 2, true);
    fill_rows_bf16<<<unsigned((T * HV + 255) / 256), 256>>>(static_cast<__nv_bfloat16*>(v), T * HV, int(V), 3, false);
    fill_f32<<<blocks, 256>>>(g, ng, 4, Fill::LogSigmoid);
    fill_f32<<<blocks, 256>>>(beta, nb, 5, Fill::Beta);
    ck(cudaDeviceSynchronize(), "fill inputs");
  }
  ~Inputs() {
    for (void* p : {q, k, v, o, static_cast<void*>(g), static_cast<void*>(beta), static_cast<void*>(state)}) cudaFree(p);
  }
};

// Median of `reps` timed calls of fn (each timed alone with events), after `warm` untimed calls.
template <class F>
double median_us(F&& fn, int warm, int reps) {
  for (int i = 0; i < warm; ++i) fn();
  cudaEvent_t a, b;
  ck(cudaEventCreate(&a), "event");
  ck(cudaEventCreate(&b), "event");
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    ck(cudaEventRecord(a), "record");
    fn();
    ck(cudaEventRecord(b), "record");
    ck(cudaEventSynchronize(b), "sync");
    ck(cudaEventElapsedTime(&ms[i], a, b), "elapsed");
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2] * 1e3;
}

// Cases whose "op,shape" does not contain this substring are skipped (--only=..., for ncu).
std::string g_only;
bool selected(const char* op, const std::string& shape) {
  return g_only.empty() || (std::string(op) + "," + shape).find(g_only) != std::string::npos;
}

void row(const char* op, const std::string& shape, double us, double flops, double bytes) {
  std::printf("%s,%s,bf16,%.1f,%.2f,%.0f\n", op, shape.c_str(), us, flops / (us * 1e-6) / 1e12,
              bytes / (us * 1e-6) / 1e9);
  std::fflush(stdout);
}

// The layer transforms inside the op as a model's layer uses them (DeltaInputForm: q/k L2 norm,
// beta sigmoid, GDN's softplus gate or KDA's lower-bound gate; A_log and dt_bias zero), reading the
// benchmark's inputs as the raw projections.
struct LayerForm {
  float* params = nullptr;  // A_log [H], dt_bias [H·width]
  cuda::DeltaInputForm form;
  explicit LayerForm(const DeltaRuleDims& d) {
    const size_t n = size_t(d.HV * (1 + d.g_width()));
    ck(cudaMalloc(&params, n * 4), "alloc gate parameters");
    ck(cudaMemset(params, 0, n * 4), "zero gate parameters");
    form.qk_l2norm = true, form.beta_max = 1, form.A_log = params, form.dt_bias = params + d.HV;
    form.gate = d.gate == DeltaGate::PerKey ? cuda::DeltaGateForm::LowerBound : cuda::DeltaGateForm::Softplus;
  }
  ~LayerForm() { cudaFree(params); }
};

void bench_chunk(bool kda, int64_t H, int64_t K, std::vector<int64_t> lens, const std::string& shape, int reps) {
  DeltaRuleDims d;
  d.H = H, d.HV = H, d.K = K, d.V = K, d.gate = kda ? DeltaGate::PerKey : DeltaGate::Scalar;
  d.cu_seqlens = {0};
  for (int64_t l : lens) d.cu_seqlens.push_back(d.cu_seqlens.back() + l);
  const char *op = kda ? "kda_chunk_fwd" : "gdn_chunk_fwd",
             *op_layer = kda ? "kda_chunk_fwd_layer" : "gdn_chunk_fwd_layer";
  if (!selected(op, shape) && !selected(op_layer, shape)) return;
  const int64_t T = d.tokens(), N = d.num_seqs(), V = K;
  Inputs in(T, H, H, K, V, kda, N);
  const float scale = 1.f / std::sqrt(float(K));
  const double flops = 4.0 * T * H * K * V;
  const double bytes = 2.0 * (2 * T * H * K + 2 * T * H * V) + 4.0 * T * H * (kda ? K + 1 : 2) + 8.0 * N * H * K * V;
  // State-pass variants, each a row: the column-tiled pass at 16 and 32 columns per block, the wide
  // pass unsegmented, and the wide pass with the plan's segments (when it picks any).
  struct Var {
    const char* label;
    int cols, seg;
  };
  for (const Var& var : {Var{"tile16", 16, 0}, Var{"tile32", 32, 0}, Var{"wide", -1, -1}, Var{"wide+seg", -1, 0}}) {
    if (!selected(op, shape)) break;
    cuda::DeltaChunkPlan plan(d, DType::BF16, var.cols, var.seg);
    if (var.seg == 0 && var.cols < 0 && plan.segments() == 0) continue;  // the plan picked no segments
    const double us = median_us(
        [&] {
          plan.forward(in.q, in.k, in.v, in.g, in.beta, scale, in.state, in.o, nullptr);
        },
        3, reps);
    ck(cudaGetLastError(), "chunk forward");
    std::string label = shape + " [" + var.label;
    if (plan.segments()) label += " " + std::to_string(plan.segments()) + " segs";
    row(op, label + "]", us, flops, bytes);
  }
  if (!selected(op_layer, shape)) return;
  // The plan's own pick with the layer form, to set against the rows above.
  const LayerForm layer(d);
  cuda::DeltaChunkPlan plan(d, DType::BF16);
  const double us = median_us(
      [&] { plan.forward(in.q, in.k, in.v, in.g, in.beta, scale, in.state, in.o, nullptr, layer.form); }, 3, reps);
  ck(cudaGetLastError(), "chunk forward with the layer form");
  row(op_layer, shape + " [auto]", us, flops, bytes);
}

// Training step of the op: the forward (bf16, the plan's own state-pass pick) then the backward
// (DeltaChunkBackward: fp32 recompute and fp32 gradients). Rows: *_chunk_bwd (backward alone) and
// *_chunk_fwdbwd (both). TFLOP/s counts 3x the forward's useful FLOPs (the backward does about
// twice the forward's products); GB/s the forward's bytes plus dout read and the gradients written
// (dq, dk, dv fp32, dg, dbeta).
void bench_chunk_bwd(bool kda, int64_t H, int64_t K, std::vector<int64_t> lens, const std::string& shape, int reps) {
  DeltaRuleDims d;
  d.H = H, d.HV = H, d.K = K, d.V = K, d.gate = kda ? DeltaGate::PerKey : DeltaGate::Scalar;
  d.cu_seqlens = {0};
  for (int64_t l : lens) d.cu_seqlens.push_back(d.cu_seqlens.back() + l);
  const char* op_b = kda ? "kda_chunk_bwd" : "gdn_chunk_bwd";
  const char* op_fb = kda ? "kda_chunk_fwdbwd" : "gdn_chunk_fwdbwd";
  if (!selected(op_b, shape) && !selected(op_fb, shape) &&
      !selected(kda ? "kda_chunk_bwd_layer" : "gdn_chunk_bwd_layer", shape))
    return;
  const int64_t T = d.tokens(), N = d.num_seqs(), V = K;
  Inputs in(T, H, H, K, V, kda, N);
  Inputs grads_in(T, H, H, K, V, kda, 0);  // its v is the bf16 dout
  float *dq, *dk, *dv, *dg, *db;
  const size_t nq = T * H * K, nv = T * H * V, ng = T * H * (kda ? K : 1);
  ck(cudaMalloc(&dq, nq * 4), "alloc dq");
  ck(cudaMalloc(&dk, nq * 4), "alloc dk");
  ck(cudaMalloc(&dv, nv * 4), "alloc dv");
  ck(cudaMalloc(&dg, ng * 4), "alloc dg");
  ck(cudaMalloc(&db, T * H * 4), "alloc dbeta");
  const float scale = 1.f / std::sqrt(float(K));
  const double flops = 3 * 4.0 * T * H * K * V;
  const double fwd_bytes = 2.0 * (2 * T * H * K + 2 * T * H * V) + 4.0 * T * H * (kda ? K + 1 : 2) + 8.0 * N * H * K * V;
  const double bwd_bytes = 2.0 * (2 * T * H * K + 2 * T * H * V) + 8.0 * T * H * (kda ? K + 1 : 2) +
                           4.0 * (2 * T * H * K + T * H * V) + 4.0 * N * H * K * V;
  cuda::DeltaChunkPlan plan(d, DType::BF16);
  cuda::DeltaChunkBackward bwd(d, DType::BF16);
  auto backward = [&] {
    bwd.backward(in.q, in.k, in.v, in.g, in.beta, scale, nullptr, grads_in.v, nullptr, dq, dk, dv, dg, db, nullptr,
                 nullptr);
  };
  if (selected(op_b, shape)) {
    const double us = median_us(backward, 2, reps);
    ck(cudaGetLastError(), "chunk backward");
    row(op_b, shape, us, 2 * 4.0 * T * H * K * V, bwd_bytes);
  }
  const char* op_bl = kda ? "kda_chunk_bwd_layer" : "gdn_chunk_bwd_layer";
  if (selected(op_bl, shape)) {  // the backward with the layer form (raw-input gradients, dA_log, ddt_bias)
    const LayerForm layer(d);
    float* dparams = nullptr;
    ck(cudaMalloc(&dparams, size_t(H * (1 + d.g_width())) * 4), "alloc gate parameter gradients");
    const double us = median_us(
        [&] {
          bwd.backward(in.q, in.k, in.v, in.g, in.beta, scale, nullptr, grads_in.v, nullptr, dq, dk, dv, dg, db,
                       nullptr, nullptr, layer.form, dparams, dparams + H);
        },
        2, reps);
    ck(cudaGetLastError(), "chunk backward with the layer form");
    cudaFree(dparams);
    row(op_bl, shape, us, 2 * 4.0 * T * H * K * V, bwd_bytes);
  }
  if (selected(op_fb, shape)) {
    const double us = median_us(
        [&] {
          ck(cudaMemsetAsync(in.state, 0, size_t(N) * H * K * V * 4), "state");
          plan.forward(in.q, in.k, in.v, in.g, in.beta, scale, in.state, in.o, nullptr);
          backward();
        },
        2, reps);
    ck(cudaGetLastError(), "chunk forward+backward");
    row(op_fb, shape, us, flops, fwd_bytes + bwd_bytes);
  }
  for (float* x : {dq, dk, dv, dg, db}) cudaFree(x);
}

void bench_decode(bool kda, int64_t B, int64_t H, int64_t K, int reps) {
  DeltaRuleDims d;
  d.H = H, d.HV = H, d.K = K, d.V = K, d.gate = kda ? DeltaGate::PerKey : DeltaGate::Scalar;
  const std::string shape = "B" + std::to_string(B) + " H" + std::to_string(H) + " D" + std::to_string(K);
  const char *op = kda ? "kda_decode" : "gdn_decode", *op_layer = kda ? "kda_decode_layer" : "gdn_decode_layer";
  if (!selected(op, shape) && !selected(op_layer, shape)) return;
  Inputs in(B, H, H, K, K, kda, B);
  std::vector<int32_t> slots(B);
  for (int64_t i = 0; i < B; ++i) slots[i] = int32_t(i);
  int32_t* ds = nullptr;
  ck(cudaMalloc(&ds, B * 4), "alloc slots");
  ck(cudaMemcpy(ds, slots.data(), B * 4, cudaMemcpyHostToDevice), "slots");
  ck(cudaMemset(in.state, 0, size_t(B) * H * K * K * 4), "state");
  const float scale = 1.f / std::sqrt(float(K));
  const double state_bytes = 8.0 * B * H * K * K;
  auto run = [&](const char* name, const cuda::DeltaInputForm& form) {
    const double us = median_us(
        [&] {
          cuda::delta_rule_decode(d, DType::BF16, B, 1, in.q, in.k, in.v, in.g, in.beta, scale, in.state, ds, nullptr,
                                  in.o, nullptr, 0, 0, form);
        },
        10, reps);
    ck(cudaGetLastError(), name);
    row(name, shape, us, 4.0 * B * H * K * K, state_bytes);
  };
  if (selected(op, shape)) run(op, {});
  if (selected(op_layer, shape)) run(op_layer, LayerForm(d).form);
  cudaFree(ds);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else if (std::strncmp(argv[i], "--only=", 7) == 0) g_only = argv[i] + 7;
  }
  if (!cuda::device_available()) {
    std::fprintf(stderr, "bench_delta_rule: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  ck(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("# device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  std::printf("op,shape,dtype,us,TFLOPs,GBps\n");
  const int reps = quick ? 5 : 20;
  struct S {
    int64_t B, T, H;
  };
  const std::vector<S> fixed = {{1, 4096, 32}, {1, 16384, 32}, {4, 4096, 32}, {1, 65536, 16}, {8, 2048, 64}, {1, 8192, 96}};
  const std::vector<int64_t> varlen = {1300, 547, 2048, 963, 271, 3063};
  for (bool kda : {false, true}) {
    for (const S& s : fixed)
      bench_chunk(kda, s.H, 128, std::vector<int64_t>(s.B, s.T), "B" + std::to_string(s.B) + " T" + std::to_string(s.T) +
                  " H" + std::to_string(s.H) + " D128", reps);
    bench_chunk(kda, 64, 128, varlen, "varlen[1300 547 2048 963 271 3063] H64 D128", reps);
  }
  // Forward + backward on the issue's training shapes.
  const std::vector<S> train = {{1, 16384, 32}, {4, 4096, 32}, {1, 65536, 16}, {8, 2048, 64}};
  for (bool kda : {false, true}) {
    for (const S& s : train)
      bench_chunk_bwd(kda, s.H, 128, std::vector<int64_t>(s.B, s.T),
                      "B" + std::to_string(s.B) + " T" + std::to_string(s.T) + " H" + std::to_string(s.H) + " D128",
                      quick ? 3 : 10);
    bench_chunk_bwd(kda, 64, 128, varlen, "varlen[1300 547 2048 963 271 3063] H64 D128", quick ? 3 : 10);
  }
  for (bool kda : {false, true})
    for (int64_t B : {1, 64, 256}) bench_decode(kda, B, 32, 128, quick ? 20 : 100);
  return 0;
}
