// The CUDA device's own operations against CpuDevice (the oracle's functions) where the model tests
// would hide a shape: the decode GEMVs (one row: fp32 activations, K split across warps; 2–8 rows
// on the tensor cores: bf16 operands, K sliced across a cluster's blocks), alone and with their
// SwiGLU epilogue, and the cuBLASLt GEMM
// past them (bf16 operands); the
// fused delta-rule decode prep (conv state over several steps, grouped heads, per-key gates), the
// fused bf16 prefill mixer (conv → op → gated norm → GEMM), the prefill short conv, and
// attention prep (gated q rows, partial RoPE); the greedy pick (argmax, lowest index on
// ties); the MoE block's routed experts; a cache slot's prefix snapshot.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <random>

#include "backends/cpu/cpu_device.h"
#include "backends/cuda/cuda_device.h"
#include "backends/cuda/delta_rule_cuda.h"
#include "core/dtype.h"
#include "model/layers.h"
#include "tests/cuda/require_gpu.h"

using namespace hla;

namespace {

// y = x · W^T on `dev` (x rows ldx apart), back on the host.
// Writable scratch holding v (a residual stream that an op adds to).
float* scratch_with(Device& dev, const std::vector<float>& v) {
  const int64_t n = int64_t(v.size());
  float* p = dev.scratch(n);
  dev.copy(p, {n, 1, 0}, dev.upload_f32(v), {n, 1, 0}, 1, n, 1);
  return p;
}

// y = x · W^T (Device::linear), or h0 + x · W^T (linear_add) when h0 is given.
std::vector<float> run_linear(Device& dev, const Tensor& W, const std::vector<float>& x, int64_t M, int64_t ldx,
                              const std::vector<float>* h0 = nullptr) {
  const DevMatrix w = dev.upload_matrix(W);
  dev.begin_forward();
  const float* xd = dev.upload_f32(x);
  float* yd = h0 ? scratch_with(dev, *h0) : dev.scratch(M * W.size(0));
  if (h0)
    dev.linear_add({xd, ldx}, w, yd, M);
  else
    dev.linear(xd, ldx, w, yd, M);
  std::vector<float> y(size_t(M * W.size(0)));
  dev.to_host(yd, y.data(), M * W.size(0));
  return y;
}

std::vector<float> random_vector(int64_t n, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}

// A [rows, cols] tensor of values uniform in (−amp, amp) rounded to bf16, so that an fp32 and a
// bf16 device hold the same weights.
Tensor random_bf16_tensor(int64_t rows, int64_t cols, std::mt19937& rng, float amp = 1.0f) {
  Tensor t = Tensor::f32({rows, cols});
  const std::vector<float> v = random_vector(rows * cols, rng, -amp, amp);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = bf16_to_f32(f32_to_bf16(v[size_t(i)]));
  return t;
}
float max_rel_diff(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, double(std::fabs(got[i] - want[i])));
    scale = std::max(scale, double(std::fabs(want[i])));
  }
  return float(err / scale);
}
// A batch of sequences of `lens` tokens in `slots` after `past` tokens, uploaded as Model does.
DevBatch make_batch(Device& dev, const std::vector<int64_t>& lens, const std::vector<int64_t>& slots,
                    const std::vector<int64_t>& past) {
  DevBatch b;
  b.cu_seqlens = {0}, b.slots = slots, b.past = past;
  std::vector<int32_t> cu{0}, sl(slots.begin(), slots.end()), pos;
  for (size_t i = 0; i < lens.size(); ++i) {
    b.cu_seqlens.push_back(b.cu_seqlens.back() + lens[i]);
    cu.push_back(int32_t(b.cu_seqlens.back()));
    for (int64_t t = 0; t < lens[i]; ++t) pos.push_back(int32_t(past[i] + t));
  }
  b.d_cu = dev.upload_i32(cu), b.d_slots = dev.upload_i32(sl), b.d_pos = dev.upload_i32(pos);
  return b;
}

// The two packed forwards of the delta-mixer tests (3 sequences in slots 2, 0, 5; the second forward
// continues their conv and recurrent states): each forward's output rows [T, n_out] (added to a
// residual stream of values in [−2, 2], taken off again on the host) from the mixer make(batch,
// forward) builds, run by the device's delta_mixer (fused) or Device's default steps, then the 6
// slots' conv and state pools of layer 0 (conv_width, state_width values a slot).
std::vector<float> run_mixer_forwards(Device& dev, bool fused, int64_t n_out, int64_t conv_width, int64_t state_width,
                                      const std::function<DeltaMixer(const DevBatch&, size_t)>& make) {
  const std::vector<std::vector<int64_t>> lens{{37, 5, 64}, {3, 70, 2}}, past{{0, 0, 0}, {37, 5, 64}};
  std::vector<float> got;
  for (size_t f = 0; f < 2; ++f) {
    dev.begin_forward();
    const DevBatch b = make_batch(dev, lens[f], {2, 0, 5}, past[f]);
    const int64_t T = b.tokens();
    const DeltaMixer m = make(b, f);
    std::mt19937 rng{unsigned(f)};
    const std::vector<float> residual = random_vector(T * n_out, rng, -2.0f, 2.0f);
    float* out = scratch_with(dev, residual);
    if (fused)
      dev.delta_mixer(m, b, out);
    else
      dev.Device::delta_mixer(m, b, out);
    std::vector<float> h(size_t(T * n_out));
    dev.to_host(out, h.data(), T * n_out);
    for (size_t t = 0; t < h.size(); ++t) h[t] -= residual[t];
    got.insert(got.end(), h.begin(), h.end());
  }
  for (auto [part, width] : {std::pair{CachePart::Conv, conv_width}, {CachePart::State, state_width}}) {
    std::vector<float> h(size_t(6 * width));
    dev.to_host(dev.cache_pool(0, part, width), h.data(), 6 * width);
    got.insert(got.end(), h.begin(), h.end());
  }
  return got;
}
// Token counts of run_mixer_forwards' two forwards.
const int64_t kMixerTokens[2] = {37 + 5 + 64, 3 + 70 + 2};

TEST(CudaDeviceOps, LinearMatchesCpuDeviceInBf16) {
  HLA_REQUIRE_GPU();
  struct Shape {
    int64_t M, N, K, ldx;
  };
  // M = 1: the scalar GEMV with K splits 1, 2 and 4, short rows (lanes without columns); M = 2..8:
  // the tensor-core GEMV with 1, 4 and 8 slices of K (a cluster's partials), row counts off the
  // 128-row groups, padded x rows, slices of several staged x tiles and a short last one, batches
  // of loads past a slice's end; K off the 32-column steps and M > 8: cuBLASLt.
  const Shape shapes[] = {{1, 37, 32, 32},       {1, 2048, 4096, 4096},  {3, 2053, 2048, 2056},  {8, 12352, 2048, 2048},
                          {2, 100, 96, 100},     {8, 2048, 6144, 6144},  {1, 300, 16384, 16384}, {5, 70000, 64, 64},
                          {9, 100, 96, 100},     {16, 2048, 6144, 6144}, {40, 64, 64, 64},       {4, 50, 40, 40},
                          {1, 2048, 6144, 6144}, {13, 333, 4096, 4096},  {6, 34000, 1056, 1060}, {64, 300, 8192, 8192},
                          {7, 300, 8192, 8192},  {27, 2049, 2048, 2048}};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const Shape& s : shapes) {
    Tensor W = Tensor::f32({s.N, s.K});  // bf16 values, so that an fp32 device holds the same weights
    for (int64_t i = 0; i < W.numel(); ++i) W.f32()[i] = bf16_to_f32(f32_to_bf16(u(rng)));
    std::vector<float> x(size_t(s.M * s.ldx));
    for (float& v : x) v = u(rng);
    auto gpu = cuda::make_cuda_device(1, DType::BF16);
    cpu::CpuDevice cpu(1, /*bf16 operands=*/s.M > 1);  // the one-row GEMV keeps x in fp32
    const std::vector<float> got = run_linear(*gpu, W, x, s.M, s.ldx), want = run_linear(cpu, W, x, s.M, s.ldx);
    // The same bf16 products summed in another order in fp32.
    EXPECT_LT(max_rel_diff(got, want), 1e-5) << "M " << s.M << " N " << s.N << " K " << s.K;
    // Added to a residual stream (the GEMV's and cuBLASLt's epilogues read y).
    std::vector<float> h0(size_t(s.M * s.N));
    for (float& v : h0) v = 4 * u(rng);
    EXPECT_LT(max_rel_diff(run_linear(*gpu, W, x, s.M, s.ldx, &h0), run_linear(cpu, W, x, s.M, s.ldx, &h0)), 1e-5)
        << "add, M " << s.M << " N " << s.N << " K " << s.K;
  }
}

// The bf16 values a product p may round to when another summation order moves it by up to `tol`:
// one, or the two on either side of a rounding midpoint within tol of p.
std::vector<float> bf16_roundings(float p, double tol) {
  const uint16_t b = f32_to_bf16(p);
  std::vector<float> r{bf16_to_f32(b)};
  if ((b & 0x7fff) == 0 || (b & 0x7fff) >= 0x7f80) return r;
  for (const uint16_t n : {uint16_t(b + 1), uint16_t(b - 1)}) {  // the neighbours in magnitude
    const double mid = (double(r[0]) + double(bf16_to_f32(n))) / 2;
    if (std::fabs(double(p) - mid) <= tol) r.push_back(bf16_to_f32(n));
  }
  return r;
}

// W's rows are (gate, up) pairs; M ≤ 8 runs a GEMV with the SwiGLU epilogue (one row: K splits 1
// and 2, fp32 products; 2–8 rows: tensor cores, unsliced and with a cluster's partials), M > 8
// cuBLASLt and the swiglu kernel. Past one row both round the gate/up products to bf16 first, so
// each output must equal SiLU(g)·u for g, u a rounding of the CPU's products (either side of a
// rounding midpoint that the GPU's summation order, 1e-5 of the largest product, may cross).
TEST(CudaDeviceOps, LinearSwigluMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  std::mt19937 rng(3);
  for (auto [M, N, K] : {std::tuple{1, 200, 96},
                         {1, 2048, 6144},
                         {5, 2048, 6144},
                         {8, 300, 2048},
                         {12, 200, 96},
                         {20, 200, 96},
                         {8, 40000, 512},
                         {64, 12288, 2048}}) {
    const Tensor W = random_bf16_tensor(N, K, rng);
    const std::vector<float> x = random_vector(M * K, rng);
    auto run = [&](Device& dev) {
      const DevMatrix wd = dev.upload_matrix(W);
      dev.begin_forward();
      float* out = dev.scratch(M * N / 2);
      dev.linear_swiglu(dev.upload_f32(x), K, wd, out, M);
      std::vector<float> h(size_t(M * N / 2));
      dev.to_host(out, h.data(), M * N / 2);
      return h;
    };
    auto gpu = cuda::make_cuda_device(1, DType::BF16);
    cpu::CpuDevice cpu(1, /*bf16 operands=*/M > 1);
    if (M == 1) {
      EXPECT_LT(max_rel_diff(run(*gpu), run(cpu)), 1e-5) << "M " << M << " N " << N << " K " << K;
      continue;
    }
    const std::vector<float> got = run(*gpu), gu = run_linear(cpu, W, x, M, K);
    double gu_max = 0, y_max = 1e-30;
    for (float v : gu) gu_max = std::max(gu_max, double(std::fabs(v)));
    for (float v : got) y_max = std::max(y_max, double(std::fabs(v)));
    int64_t bad = 0;
    for (int64_t i = 0; i < M * N / 2; ++i) {
      double best = 1e30;
      for (float g : bf16_roundings(gu[size_t(2 * i)], 1e-5 * gu_max))
        for (float u : bf16_roundings(gu[size_t(2 * i + 1)], 1e-5 * gu_max))
          best = std::min(best, std::fabs(double(got[size_t(i)]) - double(g / (1 + std::exp(-g)) * u)));
      bad += best > 1e-5 * y_max;
    }
    EXPECT_EQ(bad, 0) << "M " << M << " N " << N << " K " << K;
  }
}

// A SwiGLU MLP (Device::swiglu_mlp): the GEMV path at one row, the tensor-core GEMV at 5, and the
// bf16 prefill path (SwiGLU writing the down GEMM's bf16 operand) at 12 and 300 rows, one with
// strided x rows, written and added to a residual stream, against CpuDevice with the same operand
// rounding. Both round the gate/up
// products and h to bf16; the GEMM's other summation order can move one of them across a rounding
// boundary (one bf16 ulp, 2^-8 relative, in one of I terms), hence the bound.
TEST(CudaDeviceOps, SwigluMlpMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  std::mt19937 rng(5);
  for (auto [M, D, I, ldx] :
       {std::tuple{1, 96, 100, 96}, {5, 256, 64, 256}, {12, 96, 100, 104}, {300, 2048, 512, 2048}}) {
    const Tensor gate_up = random_bf16_tensor(2 * I, D, rng, 0.1f), down = random_bf16_tensor(D, I, rng, 0.1f);
    const std::vector<float> x = random_vector(M * ldx, rng);
    const std::vector<float> h0 = random_vector(M * D, rng, -0.5f, 0.5f);
    auto run = [&](Device& dev, bool add) {
      const DevMatrix gu = dev.upload_matrix(gate_up), dn = dev.upload_matrix(down);
      dev.begin_forward();
      float* out = add ? scratch_with(dev, h0) : dev.scratch(M * D);
      dev.swiglu_mlp({dev.upload_f32(x), ldx}, gu, dn, out, M, add);
      std::vector<float> y(size_t(M * D));
      dev.to_host(out, y.data(), M * D);
      for (size_t i = 0; add && i < y.size(); ++i) y[i] -= h0[i];  // the MLP's part, compared as without add
      return y;
    };
    auto gpu = cuda::make_cuda_device(1, DType::BF16);
    cpu::CpuDevice cpu(1, /*bf16 operands=*/M > 1);
    for (const bool add : {false, true})
      EXPECT_LT(max_rel_diff(run(*gpu, add), run(cpu, add)), 2e-3)
          << "M " << M << " D " << D << " I " << I << " add " << add;
  }
}

// Three decode steps of a Gated DeltaNet-shaped (scalar gate, grouped value heads) and a KDA-shaped
// (per-key gate, head dim 64, beta in [0, 2]) layer over sequences in slots 2, 0 and 5: the conv state
// carries over.
TEST(CudaDeviceOps, DeltaPrepMatchesCpuDeviceOverDecodeSteps) {
  HLA_REQUIRE_GPU();
  struct Case {
    int64_t nk, nv, dk, gate_width;
    float beta_max;
  };
  for (const Case c : {Case{2, 4, 128, 1, 1.0f}, Case{3, 3, 64, 64, 2.0f}}) {
    const int64_t C = 2 * c.nk * c.dk + c.nv * c.dk, kw = 4, N = 3, ldx = C + 2 * c.nv + 4, G = c.nv * c.gate_width;
    std::mt19937 rng(7);
    const Tensor conv_w = vector_tensor(random_vector(C * kw, rng)), A_log = vector_tensor(random_vector(c.nv, rng));
    const Tensor dt_bias = vector_tensor(random_vector(G, rng));
    std::vector<std::vector<float>> xs, as;
    for (int step = 0; step < 3; ++step)
      xs.push_back(random_vector(N * ldx, rng, -2, 2)), as.push_back(random_vector(N * G, rng, -4, 4));
    auto run = [&](Device& dev) {
      const float *w = dev.upload_vector(conv_w), *al = dev.upload_vector(A_log), *dt = dev.upload_vector(dt_bias);
      std::vector<float> out;
      for (int step = 0; step < 3; ++step) {
        dev.begin_forward();
        const DevBatch b = make_batch(dev, {1, 1, 1}, {2, 0, 5}, {step, step, step});
        DeltaPrep p{};
        p.x = dev.upload_f32(xs[size_t(step)]), p.ldx = ldx, p.conv_w = w, p.C = C, p.kw = kw;
        p.conv_pool = dev.cache_pool(0, CachePart::Conv, C * (kw - 1)), p.y = dev.scratch(N * C);
        p.l2_heads = 2 * c.nk, p.head_dim = c.dk;
        p.b = p.x + C, p.ldb = ldx, p.beta_max = c.beta_max, p.beta = dev.scratch(N * c.nv);
        p.a = dev.upload_f32(as[size_t(step)]), p.lda = G, p.A_log = al, p.dt_bias = dt, p.g = dev.scratch(N * G);
        p.H = c.nv, p.gate_width = c.gate_width;
        dev.delta_prep(p, b);
        for (auto [ptr, n] : {std::pair{p.y, N * C}, {p.beta, N * c.nv}, {p.g, N * G}}) {
          std::vector<float> h(static_cast<size_t>(n));
          dev.to_host(ptr, h.data(), n);
          out.insert(out.end(), h.begin(), h.end());
        }
      }
      std::vector<float> pool(size_t(6 * C * (kw - 1)));
      dev.to_host(dev.cache_pool(0, CachePart::Conv, C * (kw - 1)), pool.data(), int64_t(pool.size()));
      out.insert(out.end(), pool.begin(), pool.end());
      return out;
    };
    auto gpu = cuda::make_cuda_device(6, DType::F32);
    cpu::CpuDevice cpu(6);
    const std::vector<float> got = run(*gpu), want = run(cpu);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(max_rel_diff(got, want), 1e-5) << "dk " << c.dk << " gate width " << c.gate_width;
  }
}

// The gated RMS norm of the delta-rule layers' output (in place, fp32): rows of 128 and 256 (the
// vector kernel, gate rows strided inside wider projection rows) and of 64 and 100 (the scalar one),
// SiLU and sigmoid gates.
TEST(CudaDeviceOps, GatedRmsNormMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  for (auto [dim, heads, act] : {std::tuple{128, 4, cpu::GateAct::SiLU},
                                 {256, 2, cpu::GateAct::Sigmoid},
                                 {64, 3, cpu::GateAct::SiLU},
                                 {100, 2, cpu::GateAct::Sigmoid}}) {
    const int64_t T = 37, ld_gate = heads * dim + 12;
    std::mt19937 rng(31);
    const std::vector<float> o = random_vector(T * heads * dim, rng, -2, 2),
                             gate = random_vector(T * ld_gate, rng, -3, 3);
    const Tensor w = vector_tensor(random_vector(dim, rng, 0.5f, 1.5f));
    auto run = [&](Device& dev) {
      const float* wd = dev.upload_vector(w);
      dev.begin_forward();
      float* od = const_cast<float*>(dev.upload_f32(o));
      dev.gated_rms_norm(od, dev.upload_f32(gate) + 4, ld_gate, wd, T, heads, dim, 1e-6f, act);
      std::vector<float> h(o.size());
      dev.to_host(od, h.data(), int64_t(h.size()));
      return h;
    };
    auto gpu = cuda::make_cuda_device(1, DType::F32);
    cpu::CpuDevice cpu(1);
    EXPECT_LT(max_rel_diff(run(*gpu), run(cpu)), 1e-5) << "dim " << dim;
  }
}

// A delta-rule layer's mixer (Device::delta_mixer) over two packed forwards, the second continuing
// the slots' conv and recurrent states: the CUDA device's fused bf16 prefill (bf16 q, k, v from the
// conv, bf16 o into the gated norm, which writes the output GEMM's operand) against the same
// device's unfused steps (Device::delta_mixer: fp32 rows, packs between them). Gated DeltaNet-shaped
// (scalar gate, 2 key / 4 value heads of 128, SiLU gate) and KDA-shaped (per-key gate, 4 heads of
// 64, beta in [0, 2], sigmoid gate; 16-lane L2 norms). Both round the same values to bf16 at the
// same places; only the L2 norm sums its squares in another order, which can move a q or k value
// across a bf16 rounding boundary, hence a bound of a few bf16 ulps (2^-8 relative each) rather
// than bitwise. Both are also held to the fp32 CpuDevice: the fused path may not be less accurate.
TEST(CudaDeviceOps, DeltaMixerMatchesUnfusedSteps) {
  HLA_REQUIRE_GPU();
  struct Case {
    int64_t nk, nv, dk, gate_width;
    float beta_max;
    cpu::GateAct act;
  };
  for (const Case c : {Case{2, 4, 128, 1, 1.0f, cpu::GateAct::SiLU}, Case{4, 4, 64, 64, 2.0f, cpu::GateAct::Sigmoid}}) {
    const int64_t HK = c.nk * c.dk, HVV = c.nv * c.dk, C = 2 * HK + HVV, kw = 4, G = c.nv * c.gate_width, D = 96;
    const int64_t ldx = C + c.nv + G + HVV + 4;  // [conv input | b | a | gate | pad]
    std::mt19937 rng(17);
    const Tensor conv_w = vector_tensor(random_vector(C * kw, rng)), A_log = vector_tensor(random_vector(c.nv, rng));
    const Tensor dt_bias = vector_tensor(random_vector(G, rng)),
                 norm = vector_tensor(random_vector(c.dk, rng, 0.5f, 1.5f));
    const Tensor out_proj = random_bf16_tensor(D, HVV, rng, 0.1f);
    std::vector<std::vector<float>> xs;
    for (int64_t n : kMixerTokens) xs.push_back(random_vector(n * ldx, rng, -2, 2));
    auto run = [&](Device& dev, bool fused) {
      const float *w = dev.upload_vector(conv_w), *al = dev.upload_vector(A_log), *dt = dev.upload_vector(dt_bias);
      const float* nw = dev.upload_vector(norm);
      const DevMatrix op = dev.upload_matrix(out_proj);
      return run_mixer_forwards(dev, fused, D, C * (kw - 1), c.nv * c.dk * c.dk, [&](const DevBatch& b, size_t f) {
        const int64_t T = b.tokens();
        DeltaMixer m{};
        DeltaPrep& p = m.prep;
        p.x = dev.upload_f32(xs[f]), p.ldx = ldx, p.conv_w = w, p.C = C, p.kw = kw;
        p.conv_pool = dev.cache_pool(0, CachePart::Conv, C * (kw - 1));
        p.l2_heads = 2 * c.nk, p.head_dim = c.dk;
        p.b = p.x + C, p.ldb = ldx, p.beta_max = c.beta_max, p.beta = dev.scratch(T * c.nv);
        p.a = p.x + C + c.nv, p.lda = ldx, p.A_log = al, p.dt_bias = dt, p.g = dev.scratch(T * G);
        p.H = c.nv, p.gate_width = c.gate_width;
        m.dims.H = c.nk, m.dims.HV = c.nv, m.dims.K = c.dk, m.dims.V = c.dk;
        m.dims.gate = c.gate_width == 1 ? DeltaGate::Scalar : DeltaGate::PerKey;
        m.scale = 1.0f / std::sqrt(float(c.dk));
        m.state_pool = dev.cache_pool(0, CachePart::State, c.nv * c.dk * c.dk);
        m.gate = p.x + C + c.nv + G, m.ld_gate = ldx, m.norm = nw, m.eps = 1e-6f, m.act = c.act, m.out_proj = op;
        return m;
      });
    };
    auto fused_dev = cuda::make_cuda_device(6, DType::BF16), steps_dev = cuda::make_cuda_device(6, DType::BF16);
    cpu::CpuDevice cpu(6);
    const std::vector<float> fused = run(*fused_dev, true), steps = run(*steps_dev, false), exact = run(cpu, false);
    ASSERT_EQ(fused.size(), exact.size());
    const float e_fused = max_rel_diff(fused, exact), e_steps = max_rel_diff(steps, exact);
    EXPECT_LT(max_rel_diff(fused, steps), 4e-3) << "dk " << c.dk;
    EXPECT_LE(e_fused, 1.1f * e_steps + 1e-6f) << "dk " << c.dk << ": fused " << e_fused << ", steps " << e_steps;
    EXPECT_LT(e_fused, 3e-2) << "dk " << c.dk;
  }
}

// The residual stream's operand rows (Device::operand_rows, DevRows::op): the bf16 device's norm
// writes the fp32 rows and their bf16 operand together, and a GEMM, SwiGLU MLP or delta mixer
// projection reading the operand gives bit for bit what it gives converting the fp32 rows itself.
// Decode-sized batches get no operand rows.
TEST(CudaDeviceOps, NormOperandRowsFeedTheGemmsAsTheirOwnConversion) {
  HLA_REQUIRE_GPU();
  const int64_t T = 300, D = 2048, N = 96;
  std::mt19937 rng(31);
  const std::vector<float> h0 = random_vector(T * D, rng);
  const Tensor w = vector_tensor(random_vector(D, rng, 0.5f, 1.5f)), W = random_bf16_tensor(N, D, rng, 0.1f);
  const Tensor gate_up = random_bf16_tensor(2 * N, D, rng, 0.1f), down = random_bf16_tensor(D, N, rng, 0.1f);
  auto dev = cuda::make_cuda_device(1, DType::BF16);
  const float* wd = dev->upload_vector(w);
  const DevMatrix Wd = dev->upload_matrix(W), gud = dev->upload_matrix(gate_up), dnd = dev->upload_matrix(down);
  dev->begin_forward();
  EXPECT_EQ(dev->operand_rows(8, D), nullptr);
  const float* h = dev->upload_f32(h0);
  float* x = dev->scratch(T * D);
  void* x_op = dev->operand_rows(T, D);
  ASSERT_NE(x_op, nullptr);
  dev->residual_norm(h, wd, x, x_op, T, D, 1e-6f, true);
  std::vector<float> got_x(size_t(T * D));
  std::vector<uint16_t> got_op(size_t(T * D));
  dev->to_host(x, got_x.data(), T * D);
  dev->to_host_bytes(x_op, got_op.data(), got_op.size() * 2);
  std::vector<float> want_x(size_t(T * D));
  cpu::rms_norm(h0.data(), w.f32(), want_x.data(), T, D, 1e-6f, true);
  EXPECT_LT(max_rel_diff(got_x, want_x), 1e-5);
  int64_t off = 0;
  for (int64_t i = 0; i < T * D; ++i) off += got_op[size_t(i)] != f32_to_bf16(got_x[size_t(i)]);
  EXPECT_EQ(off, 0);
  float *y1 = dev->scratch(T * N), *y2 = dev->scratch(T * N), *m1 = dev->scratch(T * D), *m2 = dev->scratch(T * D);
  dev->linear(x, D, Wd, y1, T);
  dev->linear_rows({nullptr, 0, x_op}, Wd, y2, T);
  dev->swiglu_mlp({x, D}, gud, dnd, m1, T, false);
  dev->swiglu_mlp({nullptr, 0, x_op}, gud, dnd, m2, T, false);
  std::vector<float> a(size_t(T * N)), b(size_t(T * N)), c(size_t(T * D)), e(size_t(T * D));
  dev->to_host(y1, a.data(), T * N), dev->to_host(y2, b.data(), T * N);
  dev->to_host(m1, c.data(), T * D), dev->to_host(m2, e.data(), T * D);
  EXPECT_EQ(a, b);
  EXPECT_EQ(c, e);
}

// A gated attention layer's output (Device::sigmoid_mul into operand rows): the product written
// straight into the output GEMM's bf16 operand and added to the residual stream gives bit for bit
// what the in-place product converted by linear_add gives; o itself is left as it was.
TEST(CudaDeviceOps, GatedOutputOperandFeedsTheGemmAsItsOwnConversion) {
  HLA_REQUIRE_GPU();
  const int64_t T = 300, heads = 6, dim = 128, Q = heads * dim, ld_gate = 2 * Q + 40, D = 512;
  std::mt19937 rng(37);
  const std::vector<float> o0 = random_vector(T * Q, rng), gate = random_vector(T * ld_gate, rng, -4.0f, 4.0f);
  const std::vector<float> h0 = random_vector(T * D, rng);
  const Tensor W = random_bf16_tensor(D, Q, rng, 0.1f);
  auto dev = cuda::make_cuda_device(1, DType::BF16);
  const DevMatrix Wd = dev->upload_matrix(W);
  dev->begin_forward();
  const float* g = dev->upload_f32(gate) + dim;  // every other head of the rows, as q's gates sit
  float *o1 = scratch_with(*dev, o0), *o2 = scratch_with(*dev, o0), *h1 = scratch_with(*dev, h0),
        *h2 = scratch_with(*dev, h0);
  void* o_op = dev->operand_rows(T, Q);
  ASSERT_NE(o_op, nullptr);
  dev->sigmoid_mul(o1, g, ld_gate, 2 * dim, T, heads, dim, nullptr);
  dev->linear_add({o1, Q}, Wd, h1, T);
  dev->sigmoid_mul(o2, g, ld_gate, 2 * dim, T, heads, dim, o_op);
  dev->linear_add({nullptr, 0, o_op}, Wd, h2, T);
  std::vector<float> a(size_t(T * D)), b(size_t(T * D)), o(size_t(T * Q));
  dev->to_host(h1, a.data(), T * D), dev->to_host(h2, b.data(), T * D), dev->to_host(o2, o.data(), T * Q);
  EXPECT_EQ(a, b);
  EXPECT_EQ(o, o0);
  EXPECT_GT(max_rel_diff(a, h0), 1e-2);  // the product was added
}

// A Gated DeltaNet-shaped mixer that runs its own input projection (DeltaMixer::in_proj: rows
// [q | k | v | z | b | a] of 1,544 values from 96 inputs), two packed forwards as above: the CUDA
// device's fused bf16 prefill stores the rows in bf16; CpuDevice's bf16 mode rounds the same rows
// (the plain bf16 implementation); the CUDA device's unfused steps keep them in fp32. All three
// are held to the fp32 CpuDevice: the fused path within 2× the plain bf16 error (the bar),
// and a column taken from the wrong place would be an error of order one.
TEST(CudaDeviceOps, DeltaMixerWithInputProjectionMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  const int64_t nk = 2, nv = 4, dk = 128, HK = nk * dk, HVV = nv * dk, C = 2 * HK + HVV, kw = 4, D = 96, Dout = 80;
  const int64_t W = C + HVV + 2 * nv;
  std::mt19937 rng(23);
  const Tensor in_proj = random_bf16_tensor(W, D, rng, 0.2f), out_proj = random_bf16_tensor(Dout, HVV, rng, 0.1f);
  const Tensor conv_w = vector_tensor(random_vector(C * kw, rng)), A_log = vector_tensor(random_vector(nv, rng));
  const Tensor dt_bias = vector_tensor(random_vector(nv, rng)),
               norm = vector_tensor(random_vector(dk, rng, 0.5f, 1.5f));
  std::vector<std::vector<float>> xs;
  for (int64_t n : kMixerTokens) xs.push_back(random_vector(n * D, rng, -2, 2));
  auto run = [&](Device& dev, bool fused) {
    const float *w = dev.upload_vector(conv_w), *al = dev.upload_vector(A_log), *dt = dev.upload_vector(dt_bias);
    const float* nw = dev.upload_vector(norm);
    const DevMatrix ip = dev.upload_matrix(in_proj), op = dev.upload_matrix(out_proj);
    return run_mixer_forwards(dev, fused, Dout, C * (kw - 1), nv * dk * dk, [&](const DevBatch& b, size_t f) {
      const int64_t T = b.tokens();
      DeltaMixer m{};
      m.in = {dev.upload_f32(xs[f]), D}, m.in_proj = ip;
      m.x_col = 0, m.gate_col = C, m.b_col = C + HVV, m.a_col = C + HVV + nv;
      DeltaPrep& p = m.prep;
      p.conv_w = w, p.C = C, p.kw = kw, p.conv_pool = dev.cache_pool(0, CachePart::Conv, C * (kw - 1));
      p.l2_heads = 2 * nk, p.head_dim = dk, p.beta_max = 1.0f, p.beta = dev.scratch(T * nv);
      p.A_log = al, p.dt_bias = dt, p.g = dev.scratch(T * nv), p.H = nv, p.gate_width = 1;
      m.dims.H = nk, m.dims.HV = nv, m.dims.K = dk, m.dims.V = dk, m.dims.gate = DeltaGate::Scalar;
      m.scale = 1.0f / std::sqrt(float(dk));
      m.state_pool = dev.cache_pool(0, CachePart::State, nv * dk * dk);
      m.norm = nw, m.eps = 1e-6f, m.act = cpu::GateAct::SiLU, m.out_proj = op;
      return m;
    });
  };
  auto fused_dev = cuda::make_cuda_device(6, DType::BF16), steps_dev = cuda::make_cuda_device(6, DType::BF16);
  cpu::CpuDevice plain_dev(6, /*bf16=*/true), exact_dev(6);
  const std::vector<float> fused = run(*fused_dev, true), steps = run(*steps_dev, false);
  const std::vector<float> plain = run(plain_dev, true), exact = run(exact_dev, true);
  const float e_fused = max_rel_diff(fused, exact), e_steps = max_rel_diff(steps, exact),
              e_plain = max_rel_diff(plain, exact);
  EXPECT_LE(e_fused, 2 * e_plain) << "fused " << e_fused << ", plain " << e_plain;
  EXPECT_LE(e_steps, 2 * e_plain) << "steps " << e_steps << ", plain " << e_plain;
  EXPECT_LT(e_fused, 3e-2);
  EXPECT_GT(e_plain, 0.0f);  // the plain bf16 run did round
}

// The prefill short conv (causal_conv_silu over packed sequences) in two forwards, the second
// continuing the slots' conv states: 4-channel and 1-channel rows (row stride off 4), 4 taps and
// 2 (window places that weigh 0) and 6 (the 16-place window); a 50K-token sequence makes each
// thread slide over several tokens, across a sequence start.
TEST(CudaDeviceOps, CausalConvMatchesCpuDeviceOverTwoForwards) {
  HLA_REQUIRE_GPU();
  struct Case {
    int64_t C, ldx, kw;
    std::vector<int64_t> lens1, lens2;
  };
  const Case cases[] = {{48, 52, 4, {5, 37, 1, 70}, {3, 4, 1, 40}},
                        {48, 50, 2, {5, 37, 1, 70}, {3, 4, 1, 40}},
                        {40, 40, 6, {2, 9, 1, 30}, {1, 1, 7, 3}},
                        {48, 48, 4, {50000, 3, 7, 2}, {1, 2, 3, 40}}};
  const std::vector<int64_t> slots{3, 1, 0, 2};
  for (const Case& c : cases) {
    std::mt19937 rng(23);
    const Tensor conv_w = vector_tensor(random_vector(c.C * c.kw, rng));
    std::vector<std::vector<float>> xs;
    for (const auto* lens : {&c.lens1, &c.lens2}) {
      int64_t T = 0;
      for (int64_t n : *lens) T += n;
      xs.push_back(random_vector(T * c.ldx, rng, -2, 2));
    }
    auto run = [&](Device& dev) {
      const float* w = dev.upload_vector(conv_w);
      float* pool = dev.cache_pool(0, CachePart::Conv, c.C * (c.kw - 1));
      std::vector<float> out;
      std::vector<int64_t> past(slots.size(), 0);
      for (int f = 0; f < 2; ++f) {
        const std::vector<int64_t>& lens = f == 0 ? c.lens1 : c.lens2;
        dev.begin_forward();
        const DevBatch b = make_batch(dev, lens, slots, past);
        const int64_t T = b.tokens();
        float* y = dev.scratch(T * c.C);
        dev.causal_conv_silu(dev.upload_f32(xs[size_t(f)]), c.ldx, w, y, c.C, c.kw, b, pool);
        std::vector<float> h(static_cast<size_t>(T * c.C));
        dev.to_host(y, h.data(), T * c.C);
        out.insert(out.end(), h.begin(), h.end());
        for (size_t i = 0; i < lens.size(); ++i) past[i] += lens[i];
      }
      std::vector<float> state(size_t(4 * c.C * (c.kw - 1)));
      dev.to_host(pool, state.data(), int64_t(state.size()));
      out.insert(out.end(), state.begin(), state.end());
      return out;
    };
    auto gpu = cuda::make_cuda_device(4, DType::F32);
    cpu::CpuDevice cpu(4);
    const std::vector<float> got = run(*gpu), want = run(cpu);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(max_rel_diff(got, want), 1e-5) << "C " << c.C << " ldx " << c.ldx << " kw " << c.kw;
  }
}

// Prefill and decode rows of Qwen3-Next-style gated q rows [q_h | gate_h], partial and full RoPE,
// plain and zero-centred norm weights.
TEST(CudaDeviceOps, AttentionPrepMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  for (auto [hd, rot, zero_centered] : {std::tuple{256, 64, true}, {64, 64, false}, {128, 16, true}}) {
    const int64_t nh = 4, nkv = 2, Q = nh * hd, KV = nkv * hd, W = 2 * Q + 2 * KV, T = 6;
    std::mt19937 rng(9);
    const Tensor qn = vector_tensor(random_vector(hd, rng)), kn = vector_tensor(random_vector(hd, rng));
    std::vector<float> inv_freq(size_t(rot / 2));
    for (size_t i = 0; i < inv_freq.size(); ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * float(i) / float(rot));
    const Tensor freq = vector_tensor(inv_freq);
    const std::vector<float> qkv = random_vector(T * W, rng, -2, 2);
    auto run = [&](Device& dev) {
      dev.begin_forward();
      const DevBatch b = make_batch(dev, {3, 1, 2}, {0, 1, 2}, {5, 17, 0});
      const float* in = dev.upload_f32(qkv);
      const AttentionPrep p{in,
                            W,
                            2 * hd,
                            in + 2 * Q,
                            in + 2 * Q + KV,
                            W,
                            nh,
                            nkv,
                            hd,
                            dev.upload_vector(qn),
                            dev.upload_vector(kn),
                            1e-6f,
                            zero_centered,
                            dev.upload_vector(freq),
                            rot,
                            cpu::RopePairs::HalfSplit,
                            1.0f,
                            dev.scratch(T * Q),
                            dev.scratch(T * KV),
                            dev.scratch(T * KV)};
      dev.attention_prep(p, b);
      std::vector<float> out(size_t(T * (Q + 2 * KV)));
      dev.to_host(p.q, out.data(), T * Q);
      dev.to_host(p.k, out.data() + T * Q, T * KV);
      dev.to_host(p.v, out.data() + T * (Q + KV), T * KV);
      return out;
    };
    auto gpu = cuda::make_cuda_device(3, DType::F32);
    cpu::CpuDevice cpu(3);
    EXPECT_LT(max_rel_diff(run(*gpu), run(cpu)), 1e-5) << "hd " << hd << " rot " << rot;
  }
}

// The routed experts (route, sort by expert, grouped GEMMs, combine: moe_cuda.h) against the
// default Device::moe on CpuDevice (cpu::moe_route on the host, one expert at a time), both with
// bf16 operands. Softmax routing at batch-1/2 decode (a GEMV per pick), 16-row tiles and 128-row
// tiles; sigmoid routing with a bias, groups and a scale, on D and I off the 64-column steps and
// tiles, through all three paths; more tokens than one pass.
TEST(CudaDeviceOps, MoeMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  struct Case {
    int64_t E, k, D, I, T;
    bool sigmoid;
    int64_t n_group, topk_group;
    bool shared, gate;
  };
  const Case cases[] = {{64, 8, 256, 128, 1, false, 1, 1, true, true},
                        {64, 8, 256, 128, 2, false, 1, 1, false, false},
                        {64, 8, 256, 128, 5, false, 1, 1, true, true},
                        {32, 4, 96, 40, 10, true, 4, 2, true, true},
                        {64, 8, 256, 128, 64, false, 1, 1, false, false},
                        {64, 8, 256, 128, 700, false, 1, 1, true, true},
                        {32, 4, 96, 40, 3, true, 4, 2, true, false},
                        {32, 4, 96, 40, 600, true, 4, 2, false, false},
                        {4, 2, 64, 32, 8200, false, 1, 1, true, true},
                        // wgmma tiles: 2 and 3 blocks of 256 columns, the last partial; 9 and 3 steps of 64 along K
                        // with 8-column tails (the 4-stage ring wraps).
                        {8, 2, 520, 136, 1100, false, 1, 1, true, true}};
  std::mt19937 rng(17);
  for (const Case& c : cases) {
    const Tensor gate_up = random_bf16_tensor(c.E * 2 * c.I, c.D, rng, 0.1f);
    const Tensor down = random_bf16_tensor(c.E * c.D, c.I, rng, 0.1f);
    const Tensor bias = vector_tensor(random_vector(c.E, rng, -0.1f, 0.1f));
    const std::vector<float> x = random_vector(c.T * c.D, rng), logits = random_vector(c.T * c.E, rng, -3.0f, 3.0f);
    const std::vector<float> shared = random_vector(c.T * c.D, rng), gate = random_vector(c.T, rng, 0.0f, 1.0f);
    const std::vector<float> residual = random_vector(c.T * c.D, rng);  // what the block adds to
    cpu::MoeRouter router{c.E, c.k, c.sigmoid, c.n_group, c.topk_group, true, c.sigmoid ? 2.5f : 1.0f};
    auto run = [&](Device& dev) {
      const MoeExperts m{router,
                         c.sigmoid ? dev.upload_vector(bias) : nullptr,
                         c.D,
                         c.I,
                         dev.upload_matrix(gate_up),
                         dev.upload_matrix(down)};
      dev.begin_forward();
      float* out = scratch_with(dev, residual);
      dev.moe(m, dev.upload_f32(x), dev.upload_f32(logits), c.shared ? dev.upload_f32(shared) : nullptr,
              c.gate ? dev.upload_f32(gate) : nullptr, out, c.T);
      std::vector<float> y(size_t(c.T * c.D));
      dev.to_host(out, y.data(), c.T * c.D);
      for (size_t i = 0; i < y.size(); ++i) y[i] -= residual[i];  // the block's part
      return y;
    };
    auto gpu = cuda::make_cuda_device(1, DType::BF16);
    cpu::CpuDevice cpu(1, /*bf16 operands=*/true);
    // The same bf16 products summed in another order; where that moves a gate/up product or a
    // SwiGLU output across a bf16 rounding boundary, it differs by one bf16 ulp (2^-8 relative) in
    // one of I terms.
    EXPECT_LT(max_rel_diff(run(*gpu), run(cpu)), 2e-3)
        << "E " << c.E << " k " << c.k << " D " << c.D << " I " << c.I << " T " << c.T;
  }
}

// A cache slot's prefix snapshot (the server's prefix cache on a device): slot 1's fixed parts and
// first 7 of its 10 rows, saved, then overwritten, come back bit for bit when loaded into slot 2,
// on the GPU as on the CPU device.
TEST(CudaDeviceOps, SlotSnapshotRoundTrip) {
  HLA_REQUIRE_GPU();
  const int64_t n = 300, nc = 12, width = 40, rows = 7;
  auto run = [&](Device& dev) {
    std::mt19937 rng(29);
    auto fill = [&](float* dst, int64_t count) {
      dev.copy(dst, {count, 1, 0}, dev.upload_f32(random_vector(count, rng)), {count, 1, 0}, 1, count, 1);
    };
    auto read = [&](int64_t slot) {
      std::vector<float> out(size_t(n + nc + rows * width));
      dev.to_host(dev.cache_pool(0, CachePart::State, n) + slot * n, out.data(), n);
      dev.to_host(dev.cache_pool(1, CachePart::Conv, nc) + slot * nc, out.data() + n, nc);
      dev.to_host(dev.cache_rows(1, CachePart::K, slot, rows, width), out.data() + n + nc, rows * width);
      return out;
    };
    dev.begin_forward();
    fill(dev.cache_pool(0, CachePart::State, n) + n, n);
    fill(dev.cache_pool(1, CachePart::Conv, nc) + nc, nc);
    fill(dev.cache_rows(1, CachePart::K, 1, rows + 3, width), (rows + 3) * width);
    const std::vector<float> before = read(1);
    const auto snap = dev.save_slot(1, rows);
    EXPECT_EQ(snap->bytes(), size_t(n + nc + rows * width) * sizeof(float)) << dev.name();
    EXPECT_EQ(dev.snapshot_bytes(1, rows), snap->bytes()) << dev.name();
    dev.begin_forward();
    fill(dev.cache_pool(0, CachePart::State, n) + n, n);  // the slot moves on; the snapshot must not
    fill(dev.cache_rows(1, CachePart::K, 1, rows + 3, width), (rows + 3) * width);
    dev.load_slot(*snap, 2);
    EXPECT_EQ(read(2), before) << dev.name();
    EXPECT_NE(read(1), before) << dev.name();
  };
  auto gpu = cuda::make_cuda_device(3, DType::F32);
  cpu::CpuDevice cpu(3);
  run(*gpu);
  run(cpu);
}

// Device::copy: dense blocks (a plain copy on the GPU, K/V rows into the cache), a gather of
// strided heads (q without its gate), a broadcast (stride 0) and a transpose, as on the CPU device.
TEST(CudaDeviceOps, CopyMatchesCpuDevice) {
  HLA_REQUIRE_GPU();
  struct Case {
    Device::Strides d, s;
    int64_t n0, n1, n2, src_size, dst_size;
  };
  const Case cases[] = {
      {{96, 1, 0}, {96, 1, 0}, 37, 96, 1, 37 * 96, 40 * 96},      // dense rows, at an offset below
      {{1, 0, 0}, {1, 0, 0}, 5000, 1, 1, 5000, 5000},             // one dense run
      {{48, 16, 1}, {80, 32, 1}, 9, 3, 16, 9 * 80, 9 * 48},       // heads without their gates
      {{12, 1, 0}, {0, 1, 0}, 7, 12, 1, 12, 7 * 12},              // one row to every token (broadcast)
      {{1, 20, 0}, {30, 1, 0}, 20, 30, 1, 20 * 30, 30 * 20},      // a transpose
  };
  std::mt19937 rng(41);
  for (const Case& c : cases) {
    const std::vector<float> src = random_vector(c.src_size, rng);
    auto run = [&](Device& dev) {
      dev.begin_forward();
      float* dst = dev.scratch(c.dst_size + 96);
      dev.zero(dst, c.dst_size + 96);
      dev.copy(dst + 96, c.d, dev.upload_f32(src), c.s, c.n0, c.n1, c.n2);
      std::vector<float> out(size_t(c.dst_size + 96));
      dev.to_host(dst, out.data(), c.dst_size + 96);
      return out;
    };
    auto gpu = cuda::make_cuda_device(1, DType::F32);
    cpu::CpuDevice cpu(1);
    const std::vector<float> got = run(*gpu), want = run(cpu);
    EXPECT_EQ(got, want) << c.n0 << " x " << c.n1 << " x " << c.n2;
    EXPECT_NE(std::count(want.begin(), want.end(), 0.0f), int64_t(want.size()));  // something was copied
  }
}

TEST(CudaDeviceOps, ArgmaxPicksTheLowestIndexAmongTies) {
  HLA_REQUIRE_GPU();
  const int64_t rows = 5, n = 151936;
  std::mt19937 rng(5);
  std::normal_distribution<float> z;
  std::vector<float> x(size_t(rows * n));
  for (float& v : x) v = z(rng);
  x[size_t(0 * n + 70001)] = 9.0f, x[size_t(0 * n + 70000)] = 9.0f, x[size_t(0 * n + 151935)] = 9.0f;  // ties
  x[size_t(1 * n + n - 1)] = 9.0f;                                                                     // the last
  std::fill(x.begin() + 2 * n, x.begin() + 3 * n, 1.0f);                                               // all equal
  x[size_t(3 * n)] = 9.0f;                                                                             // the first
  auto dev = cuda::make_cuda_device(1, DType::BF16);
  dev->begin_forward();
  int32_t* best = dev->scratch_i32(rows);
  dev->argmax_rows(dev->upload_f32(x), rows, n, best);
  std::vector<int32_t> got(static_cast<size_t>(rows));
  dev->to_host(best, got.data(), rows);
  cpu::CpuDevice cpu(1);
  std::vector<int32_t> want(static_cast<size_t>(rows));
  cpu.argmax_rows(x.data(), rows, n, want.data());
  EXPECT_EQ(got, want);
  EXPECT_EQ(want[0], 70000);
  EXPECT_EQ(want[1], n - 1);
  EXPECT_EQ(want[2], 0);
  EXPECT_EQ(want[3], 0);
}

}  // namespace
