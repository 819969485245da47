// CUDA delta-rule kernels against the CPU oracle (fp64 recurrence) and the op fixtures.
// Every test skips itself where no GPU is present.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "backends/cuda/delta_rule_cuda.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "ops/delta_rule.h"
#include "tests/common.h"
#include "tests/cuda/require_gpu.h"
#include "tests/delta_rule_problem.h"

namespace hla {
namespace {

// Device buffer holding host values converted to `dt` (F32/F16/BF16), and back.
struct DevBuf {
  void* p = nullptr;
  size_t n = 0;
  DType dt = DType::F32;
  DevBuf(const std::vector<double>& x, DType dtype) : n(x.size()), dt(dtype) {
    std::vector<uint8_t> bytes(n * dtype_size(dt));
    for (size_t i = 0; i < n; ++i) {
      const float f = float(x[i]);
      if (dt == DType::F32) std::memcpy(&bytes[i * 4], &f, 4);
      else {
        const uint16_t h = dt == DType::BF16 ? f32_to_bf16(f) : f32_to_f16(f);
        std::memcpy(&bytes[i * 2], &h, 2);
      }
    }
    cuda::check_cuda(cudaMalloc(&p, std::max<size_t>(bytes.size(), 16)), "test alloc");
    cuda::check_cuda(cudaMemcpy(p, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), "test upload");
  }
  DevBuf(size_t count, DType dtype, uint8_t fill) : n(count), dt(dtype) {
    cuda::check_cuda(cudaMalloc(&p, std::max<size_t>(n * dtype_size(dt), 16)), "test alloc");
    cuda::check_cuda(cudaMemset(p, fill, n * dtype_size(dt)), "test memset");
  }
  ~DevBuf() { cudaFree(p); }
  std::vector<double> get() const {
    std::vector<uint8_t> bytes(n * dtype_size(dt));
    cuda::check_cuda(cudaMemcpy(bytes.data(), p, bytes.size(), cudaMemcpyDeviceToHost), "test download");
    std::vector<double> x(n);
    for (size_t i = 0; i < n; ++i) {
      if (dt == DType::F32) {
        float f;
        std::memcpy(&f, &bytes[i * 4], 4);
        x[i] = f;
      } else {
        uint16_t h;
        std::memcpy(&h, &bytes[i * 2], 2);
        x[i] = dt == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      }
    }
    return x;
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> bytes(n * dtype_size(dt));
    cuda::check_cuda(cudaMemcpy(bytes.data(), p, bytes.size(), cudaMemcpyDeviceToHost), "test download");
    return bytes;
  }
  float* f32() const { return static_cast<float*>(p); }
};

struct Result {
  std::vector<double> o, ht;
};

Result cpu_reference(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
                     const std::vector<double>& v) {
  Result r{std::vector<double>(p.d.tokens() * p.d.HV * p.d.V), p.h0};
  delta_rule_recurrent<double>(p.d, q.data(), k.data(), v.data(), p.g.data(), p.beta.data(), p.scale, r.ht.data(),
                               r.o.data());
  return r;
}

Result gpu_chunk(const Problem& p, DType dt, int state_cols = 0, int seg_chunks = 0) {
  DevBuf q(p.q, dt), k(p.k, dt), v(p.v, dt), g(p.g, DType::F32), beta(p.beta, DType::F32), st(p.h0, DType::F32);
  DevBuf o(size_t(p.d.tokens() * p.d.HV * p.d.V), dt, 0xff);  // poisoned: every element must be written
  cuda::DeltaChunkPlan plan(p.d, dt, state_cols, seg_chunks);
  plan.forward(q.p, k.p, v.p, g.f32(), beta.f32(), float(p.scale), st.f32(), o.p, nullptr);
  cuda::check_cuda(cudaDeviceSynchronize(), "chunk forward");
  return {o.get(), st.get()};
}

struct Case {
  DeltaGate gate;
  int64_t H, HV, K, V;
  std::vector<int64_t> lens;
};
// State-pass variants: {state_cols, seg_chunks} (see DeltaChunkPlan), with a label.
struct Variant {
  int cols, seg;
  const char* label;
};
const Variant kVariants[] = {{16, 0, "tile16"}, {32, 0, "tile32"}, {-1, -1, "wide"}, {-1, 1, "wide seg1"},
                             {-1, 2, "wide seg2"}};
bool variant_fits(const Variant& v, int64_t K, int64_t V) {
  return v.cols > 0 ? V % v.cols == 0 : K <= 128 && V <= 128;
}

std::string name(const Case& s) {
  std::string r = s.gate == DeltaGate::PerKey ? "kda" : "gdn";
  r += " H" + std::to_string(s.H) + " HV" + std::to_string(s.HV) + " K" + std::to_string(s.K) + " V" +
       std::to_string(s.V) + " lens";
  for (auto l : s.lens) r += " " + std::to_string(l);
  return r;
}
const std::vector<Case>& shapes() {
  static const std::vector<Case> s = {
      {DeltaGate::Scalar, 2, 4, 64, 64, {130, 1, 64, 77}},
      {DeltaGate::PerKey, 2, 4, 64, 64, {130, 1, 64, 77}},
      {DeltaGate::Scalar, 1, 2, 128, 128, {200, 65}},
      {DeltaGate::PerKey, 1, 2, 128, 128, {200, 65}},
      {DeltaGate::Scalar, 2, 2, 32, 48, {77, 77}},
      {DeltaGate::PerKey, 2, 2, 32, 48, {77, 77}},
      {DeltaGate::Scalar, 1, 1, 256, 256, {100}},
      {DeltaGate::PerKey, 1, 1, 256, 256, {100}},
      {DeltaGate::Scalar, 1, 2, 128, 64, {129}},
  };
  return s;
}

TEST(CudaDeltaRule, ChunkFp32MatchesFp64Recurrence) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 1;
  for (const Case& s : shapes()) {
    const Problem p = make_problem(s.gate, s.H, s.HV, s.K, s.V, s.lens, seed++);
    const Result ref = cpu_reference(p, p.q, p.k, p.v);
    for (const Variant& var : kVariants) {  // every form of the state pass
      if (!variant_fits(var, s.K, s.V)) continue;
      const Result got = gpu_chunk(p, DType::F32, var.cols, var.seg);
      const double eo = rel_l2(got.o, ref.o), eh = rel_l2(got.ht, ref.ht);
      std::printf("[ fp32 ] %-40s %-9s o %.2e  ht %.2e\n", name(s).c_str(), var.label, eo, eh);
      EXPECT_LT(eo, 1e-4) << name(s);
      EXPECT_LT(eh, 1e-4) << name(s);
    }
  }
}

// bf16 / fp16 inputs: no worse than 2x the error of a plain recurrence that gets the same rounded
// inputs (fp32 state, output rounded to the element type), both against the fp64 truth.
TEST(CudaDeltaRule, Chunk16BitWithinTwicePlainRecurrence) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 100;
  for (DType dt : {DType::BF16, DType::F16}) {
    for (const Case& s : shapes()) {
      if (dt == DType::F16 && s.gate == DeltaGate::PerKey) continue;  // rejected, see below
      const Problem p = make_problem(s.gate, s.H, s.HV, s.K, s.V, s.lens, seed++);
      const Result ref = cpu_reference(p, p.q, p.k, p.v);
      const auto qr = round_to(p.q, dt), kr = round_to(p.k, dt), vr = round_to(p.v, dt);
      Result plain{std::vector<double>(ref.o.size()), p.h0};
      {
        std::vector<float> q(qr.begin(), qr.end()), k(kr.begin(), kr.end()), v(vr.begin(), vr.end());
        std::vector<float> g(p.g.begin(), p.g.end()), b(p.beta.begin(), p.beta.end());
        std::vector<float> st(p.h0.begin(), p.h0.end()), o(ref.o.size());
        delta_rule_recurrent<float>(p.d, q.data(), k.data(), v.data(), g.data(), b.data(), float(p.scale), st.data(),
                                    o.data());
        plain.o = round_to(std::vector<double>(o.begin(), o.end()), dt);
        plain.ht.assign(st.begin(), st.end());
      }
      const double po = rel_l2(plain.o, ref.o), ph = rel_l2(plain.ht, ref.ht);
      // Against the recurrence on the rounded inputs: what the kernel adds beyond input rounding.
      const Result ref_r = cpu_reference(p, qr, kr, vr);
      for (const Variant& var : kVariants) {
        if (!variant_fits(var, s.K, s.V)) continue;
        const Result got = gpu_chunk(p, dt, var.cols, var.seg);
        const double eo = rel_l2(got.o, ref.o), eh = rel_l2(got.ht, ref.ht);
        std::printf("[ %s ] %-40s %-9s o %.2e (plain %.2e, ratio %.2f; vs rounded-input ref %.2e)  ht %.2e (plain "
                    "%.2e, ratio %.2f)\n",
                    dtype_name(dt), name(s).c_str(), var.label, eo, po, eo / po, rel_l2(got.o, ref_r.o), eh, ph,
                    eh / ph);
        EXPECT_LE(eo, 2 * po) << name(s) << " " << var.label;
        // The bar, for both 16-bit types: no worse than 2x the plain recurrence.
        EXPECT_LE(eh, 2.0 * ph) << name(s) << " " << var.label;
      }
    }
  }
}

TEST(CudaDeltaRule, ChunkIsDeterministic) {
  HLA_REQUIRE_GPU();
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey}) {
    const Problem p = make_problem(gate, 2, 4, 128, 128, {300, 17, 128}, 7);
    DevBuf q(p.q, DType::BF16), k(p.k, DType::BF16), v(p.v, DType::BF16), g(p.g, DType::F32),
        beta(p.beta, DType::F32);
    for (int seg : {-1, 1}) {
    cuda::DeltaChunkPlan plan(p.d, DType::BF16, 0, seg);
    std::vector<uint8_t> first_o, first_s;
    for (int run = 0; run < 2; ++run) {
      DevBuf st(p.h0, DType::F32), o(size_t(p.d.tokens() * p.d.HV * p.d.V), DType::BF16, 0);
      plan.forward(q.p, k.p, v.p, g.f32(), beta.f32(), float(p.scale), st.f32(), o.p, nullptr);
      cuda::check_cuda(cudaDeviceSynchronize(), "chunk forward");
      if (run == 0) first_o = o.raw(), first_s = st.raw();
      else EXPECT_TRUE(first_o == o.raw() && first_s == st.raw());
    }
    }
  }
}

// The op fixtures (flash-linear-attention's naive recurrences, fp64) and their tensors.
const char* kOpFixtures[] = {"gdn_B1_T130_H2_K64_V64", "gdn_B2_T77_H3_K32_V48", "kda_B1_T130_H2_K64_V64",
                             "kda_B2_T77_H3_K32_V48"};

std::vector<double> fixture_vec(const SafeTensorsFile& st, const char* name) {
  const Tensor t = st.get(name);
  std::vector<double> x(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) x[i] = t.flat(i);
  return x;
}

// A fixture's inputs as a Problem ([B,T,...] tensors packed as B sequences of T tokens).
Problem fixture_problem(const SafeTensorsFile& st, bool kda) {
  const Tensor q = st.get("in_q"), v = st.get("in_v");
  Problem p;
  const int64_t B = q.size(0), T = q.size(1);
  p.d.H = q.size(2), p.d.HV = v.size(2), p.d.K = q.size(3), p.d.V = v.size(3);
  p.d.gate = kda ? DeltaGate::PerKey : DeltaGate::Scalar;
  for (int64_t b = 0; b <= B; ++b) p.d.cu_seqlens.push_back(b * T);
  p.q = fixture_vec(st, "in_q"), p.k = fixture_vec(st, "in_k"), p.v = fixture_vec(st, "in_v");
  p.g = fixture_vec(st, "in_g"), p.beta = fixture_vec(st, "in_beta"), p.h0 = fixture_vec(st, "in_h0");
  p.scale = 1.0 / std::sqrt(double(p.d.K));
  return p;
}

// Forward on the op fixtures: fp32 inputs within 1e-4.
TEST(CudaDeltaRule, ChunkMatchesOpFixtures) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  for (const char* f : kOpFixtures) {
    SafeTensorsFile st(fixture(std::string("ops/") + f + ".safetensors"));
    auto vec = [&](const char* n) { return fixture_vec(st, n); };
    const Problem p = fixture_problem(st, f[0] == 'k');
    const Result got = gpu_chunk(p, DType::F32);
    const double eo = rel_l2(got.o, vec("out_o")), eh = rel_l2(got.ht, vec("out_ht"));
    std::printf("[ fixture ] %-26s o %.2e  ht %.2e\n", f, eo, eh);
    EXPECT_LT(eo, 1e-4) << f;
    EXPECT_LT(eh, 1e-4) << f;
  }
}

// Decode and multi-token verify with states in a slot pool, against the recurrence run per sequence,
// through both kernels: 16 V columns per work item on a persistent grid, and 32 columns with one
// block per item (K ≤ 128, V a multiple of 32). N = 160 gives 1920–2560 16-column items, more than
// the persistent grid's resident blocks, so its blocks stride over several items with the next
// one's state loaded ahead.
TEST(CudaDeltaRule, DecodeFromSlotPool) {
  HLA_REQUIRE_GPU();
  struct Shape {
    int64_t N, K, V;
  };
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey}) {
    for (int64_t tokens : {1, 3}) {
      for (auto [N, K, V] :
           {Shape{5, 64, 64}, {5, 128, 64}, {160, 64, 64}, {160, 128, 64}, {5, 256, 64}, {160, 128, 48}})
        for (int columns : {16, 32}) {
          if (columns == 32 && (K > 128 || V % 32 != 0)) continue;
          const int64_t slots = 2 * N + 2, H = 2, HV = 4;
          const Problem p = make_problem(gate, H, HV, K, V, std::vector<int64_t>(N, tokens), 11 + K + tokens);
          // Pool: sequence n lives in slot 2n+1 (with decoys in between); h0 from the problem.
          const int64_t sz = HV * K * V;
          std::vector<double> pool(slots * sz);
          std::mt19937 rng(5);
          std::normal_distribution<double> nd;
          for (auto& x : pool) x = nd(rng);
          for (int64_t n = 0; n < N; ++n) {
            std::copy(p.h0.begin() + n * sz, p.h0.begin() + (n + 1) * sz, pool.begin() + (2 * n + 1) * sz);
          }
          const Result ref = cpu_reference(p, p.q, p.k, p.v);
          DevBuf q(p.q, DType::F32), k(p.k, DType::F32), v(p.v, DType::F32), g(p.g, DType::F32),
              beta(p.beta, DType::F32), pl(pool, DType::F32);
          DevBuf o(size_t(N * tokens * HV * V), DType::F32, 0xff);
          std::vector<int32_t> si(N), so;
          for (int64_t n = 0; n < N; ++n) si[n] = int32_t(2 * n + 1);
          // Multi-token steps write the state after the last token to slot 0 / 2 / 4 ... (the even
          // slots) and earlier tokens' states to the last slot (scratch); one token writes back in place.
          if (tokens > 1)
            for (int64_t n = 0; n < N; ++n)
              for (int64_t t = 0; t < tokens; ++t) so.push_back(t + 1 == tokens ? int32_t(2 * n) : int32_t(slots - 1));
          int32_t *dsi = nullptr, *dso = nullptr;
          cuda::check_cuda(cudaMalloc(&dsi, N * 4), "alloc");
          cuda::check_cuda(cudaMemcpy(dsi, si.data(), N * 4, cudaMemcpyHostToDevice), "upload");
          if (!so.empty()) {
            cuda::check_cuda(cudaMalloc(&dso, so.size() * 4), "alloc");
            cuda::check_cuda(cudaMemcpy(dso, so.data(), so.size() * 4, cudaMemcpyHostToDevice), "upload");
          }
          cuda::delta_rule_decode(p.d, DType::F32, N, tokens, q.p, k.p, v.p, g.f32(), beta.f32(), float(p.scale),
                                  pl.f32(), dsi, dso, o.p, nullptr, 0, columns);
          cuda::check_cuda(cudaDeviceSynchronize(), "decode");
          const auto pool_out = pl.get();
          std::vector<double> ht(N * sz);
          for (int64_t n = 0; n < N; ++n) {
            const int64_t slot = tokens > 1 ? 2 * n : 2 * n + 1;
            std::copy(pool_out.begin() + slot * sz, pool_out.begin() + (slot + 1) * sz, ht.begin() + n * sz);
          }
          const double eo = rel_l2(o.get(), ref.o), eh = rel_l2(ht, ref.ht);
          const std::string what = "N " + std::to_string(N) + " tokens " + std::to_string(tokens) + " K " +
                                   std::to_string(K) + " V " + std::to_string(V) + " columns " +
                                   std::to_string(columns);
          EXPECT_LT(eo, 1e-5) << what;
          EXPECT_LT(eh, 1e-5) << what;
          cudaFree(dsi);
          cudaFree(dso);
        }
    }
  }
  // A kernel the shape does not allow is refused before any launch.
  DeltaRuleDims d;
  d.H = d.HV = 1, d.K = 256, d.V = 64;
  EXPECT_THROW(cuda::delta_rule_decode(d, DType::F32, 1, 1, nullptr, nullptr, nullptr, nullptr, nullptr, 1.f, nullptr,
                                       nullptr, nullptr, nullptr, nullptr, 0, 32),
               Error);
  d.K = 64, d.V = 48;
  EXPECT_THROW(cuda::delta_rule_decode(d, DType::F32, 1, 1, nullptr, nullptr, nullptr, nullptr, nullptr, 1.f, nullptr,
                                       nullptr, nullptr, nullptr, nullptr, 0, 32),
               Error);
}

// ---------------------------------------------------------------------------------------------
// Backward (DeltaChunkBackward): against the fp64 recurrent backward, the op fixtures' gradients,
// and bitwise repeatability.
struct Grads {
  std::vector<double> dq, dk, dv, dg, dbeta, dh0;
};
const char* kGradNames[] = {"dq", "dk", "dv", "dg", "dbeta", "dh0"};
std::vector<double>* grad(Grads& g, int i) {
  std::vector<double>* r[] = {&g.dq, &g.dk, &g.dv, &g.dg, &g.dbeta, &g.dh0};
  return r[i];
}

// Cotangents: dout standard normal, dht small (empty = none).
struct Cotangents {
  std::vector<double> dout, dht;
};
Cotangents make_cotangents(const Problem& p, bool with_dht, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  Cotangents c;
  c.dout.resize(p.d.tokens() * p.d.HV * p.d.V);
  for (auto& x : c.dout) x = nd(rng);
  if (with_dht) {
    c.dht.resize(p.h0.size());
    for (auto& x : c.dht) x = 0.1 * nd(rng);
  }
  return c;
}

// The CPU recurrent backward in T (double: the oracle; float: the plain 16-bit reference).
template <class T>
Grads cpu_backward(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
                   const std::vector<double>& v, const std::vector<double>& dout, const std::vector<double>& dht,
                   bool with_h0) {
  auto cv = [](const std::vector<double>& x) { return std::vector<T>(x.begin(), x.end()); };
  const auto tq = cv(q), tk = cv(k), tv = cv(v), tg = cv(p.g), tb = cv(p.beta), th = cv(p.h0), tdo = cv(dout),
             tdh = cv(dht);
  std::vector<T> dq(tq.size()), dk(tk.size()), dv(tv.size()), dg(tg.size()), db(tb.size()), dh0(th.size());
  delta_rule_backward_recurrent<T>(p.d, tq.data(), tk.data(), tv.data(), tg.data(), tb.data(), T(p.scale),
                                   with_h0 ? th.data() : nullptr, tdo.data(), dht.empty() ? nullptr : tdh.data(),
                                   dq.data(), dk.data(), dv.data(), dg.data(), db.data(), dh0.data());
  auto back = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  return {back(dq), back(dk), back(dv), back(dg), back(db), back(dh0)};
}

Grads gpu_backward(const Problem& p, DType dt, const Cotangents& c, bool with_h0, int state_cols = 0) {
  const int64_t T = p.d.tokens();
  DevBuf q(p.q, dt), k(p.k, dt), v(p.v, dt), g(p.g, DType::F32), beta(p.beta, DType::F32), h0(p.h0, DType::F32),
      dout(c.dout, dt), dht(c.dht.empty() ? std::vector<double>(1) : c.dht, DType::F32);
  // Poisoned (NaN) outputs: every element must be written.
  DevBuf dq(size_t(T * p.d.H * p.d.K), DType::F32, 0xff), dk(size_t(T * p.d.H * p.d.K), DType::F32, 0xff),
      dv(size_t(T * p.d.HV * p.d.V), DType::F32, 0xff), dg(p.g.size(), DType::F32, 0xff),
      db(p.beta.size(), DType::F32, 0xff), dh0(p.h0.size(), DType::F32, 0xff);
  cuda::DeltaChunkBackward bwd(p.d, dt, state_cols);
  bwd.backward(q.p, k.p, v.p, g.f32(), beta.f32(), float(p.scale), with_h0 ? h0.f32() : nullptr, dout.p,
               c.dht.empty() ? nullptr : dht.f32(), dq.f32(), dk.f32(), dv.f32(), dg.f32(), db.f32(), dh0.f32(),
               nullptr);
  cuda::check_cuda(cudaDeviceSynchronize(), "chunk backward");
  return {dq.get(), dk.get(), dv.get(), dg.get(), db.get(), dh0.get()};
}

// The forward's shapes the backward takes (K, V ≤ 128), then T = 1 and a 3-way GVA with odd lengths.
const std::vector<Case>& bwd_shapes() {
  static const std::vector<Case> s = [] {
    std::vector<Case> r;
    for (const Case& c : shapes())
      if (c.K <= 128 && c.V <= 128) r.push_back(c);
    r.push_back({DeltaGate::PerKey, 1, 1, 64, 32, {1}});
    r.push_back({DeltaGate::Scalar, 1, 1, 64, 32, {1}});
    r.push_back({DeltaGate::PerKey, 2, 6, 128, 96, {63, 191, 5}});
    return r;
  }();
  return s;
}

TEST(CudaDeltaRule, BackwardFp32MatchesFp64Recurrence) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 300;
  for (const Case& s : bwd_shapes()) {
    for (int variant = 0; variant < 2; ++variant) {  // {random h0, dht} and {zero h0, no dht}
      const bool with_h0 = variant == 0, with_dht = variant == 0;
      const Problem p = make_problem(s.gate, s.H, s.HV, s.K, s.V, s.lens, seed++);
      const Cotangents c = make_cotangents(p, with_dht, seed++);
      const Grads ref = cpu_backward<double>(p, p.q, p.k, p.v, c.dout, c.dht, with_h0);
      for (int cols : {16, 32}) {  // both widths of the reverse state pass
        if (s.V % cols) continue;
        Grads got = gpu_backward(p, DType::F32, c, with_h0, cols);
        Grads r = ref;
        std::printf("[ bwd fp32 ] %-40s %s cols%d", name(s).c_str(), with_h0 ? "h0+dht " : "zero   ", cols);
        for (int i = 0; i < 6; ++i) {
          const double e = rel_l2(*grad(got, i), *grad(r, i));
          std::printf(" %s %.1e", kGradNames[i], e);
          EXPECT_LT(e, 1e-4) << name(s) << " " << kGradNames[i] << (with_h0 ? " h0+dht" : " zero") << " cols " << cols;
        }
        std::printf("\n");
      }
    }
  }
}

// 16-bit inputs (q, k, v, dout rounded): no worse than 2x the error of the fp32 recurrent backward
// on the same rounded inputs, both against the fp64 truth on the unrounded ones.
TEST(CudaDeltaRule, Backward16BitWithinTwicePlainRecurrence) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 400;
  for (DType dt : {DType::BF16, DType::F16}) {
    for (const Case& s : bwd_shapes()) {
      const Problem p = make_problem(s.gate, s.H, s.HV, s.K, s.V, s.lens, seed++);
      const Cotangents c = make_cotangents(p, true, seed++);
      const Grads ref = cpu_backward<double>(p, p.q, p.k, p.v, c.dout, c.dht, true);
      Grads plain = cpu_backward<float>(p, round_to(p.q, dt), round_to(p.k, dt), round_to(p.v, dt),
                                        round_to(c.dout, dt), c.dht, true);
      Grads got = gpu_backward(p, dt, c, true);
      Grads r = ref;
      std::printf("[ bwd %s ] %-40s", dtype_name(dt), name(s).c_str());
      for (int i = 0; i < 6; ++i) {
        const double e = rel_l2(*grad(got, i), *grad(r, i)), pe = rel_l2(*grad(plain, i), *grad(r, i));
        std::printf(" %s %.1e (x%.2f)", kGradNames[i], e, e / pe);
        EXPECT_LE(e, 2 * pe) << dtype_name(dt) << " " << name(s) << " " << kGradNames[i];
      }
      std::printf("\n");
    }
  }
}

TEST(CudaDeltaRule, BackwardIsDeterministic) {
  HLA_REQUIRE_GPU();
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey}) {
    const Problem p = make_problem(gate, 2, 4, 128, 128, {300, 17, 128}, 9);
    const Cotangents c = make_cotangents(p, true, 10);
    const int64_t T = p.d.tokens();
    DevBuf q(p.q, DType::BF16), k(p.k, DType::BF16), v(p.v, DType::BF16), g(p.g, DType::F32),
        beta(p.beta, DType::F32), h0(p.h0, DType::F32), dout(c.dout, DType::BF16), dht(c.dht, DType::F32);
    for (int cols : {16, 32}) {
      cuda::DeltaChunkBackward bwd(p.d, DType::BF16, cols);
      std::vector<std::vector<uint8_t>> first;
      for (int run = 0; run < 2; ++run) {
        DevBuf dq(size_t(T * p.d.H * p.d.K), DType::F32, 0), dk(size_t(T * p.d.H * p.d.K), DType::F32, 0),
            dv(size_t(T * p.d.HV * p.d.V), DType::F32, 0), dg(p.g.size(), DType::F32, 0),
            db(p.beta.size(), DType::F32, 0), dh0(p.h0.size(), DType::F32, 0);
        bwd.backward(q.p, k.p, v.p, g.f32(), beta.f32(), float(p.scale), h0.f32(), dout.p, dht.f32(), dq.f32(),
                     dk.f32(), dv.f32(), dg.f32(), db.f32(), dh0.f32(), nullptr);
        cuda::check_cuda(cudaDeviceSynchronize(), "chunk backward");
        std::vector<std::vector<uint8_t>> now = {dq.raw(), dk.raw(), dv.raw(), dg.raw(), db.raw(), dh0.raw()};
        if (run == 0) first = now;
        else
          for (int i = 0; i < 6; ++i) EXPECT_TRUE(first[i] == now[i]) << kGradNames[i] << " cols " << cols;
      }
    }
  }
}

// The op fixtures' gradients (FLA's naive recurrences through autograd, fp64): fp32 within 1e-4.
TEST(CudaDeltaRule, BackwardMatchesOpFixtures) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  for (const char* f : kOpFixtures) {
    SafeTensorsFile st(fixture(std::string("ops/") + f + ".safetensors"));
    auto vec = [&](const char* n) { return fixture_vec(st, n); };
    const Problem p = fixture_problem(st, f[0] == 'k');
    Cotangents c{vec("in_do"), vec("in_dht")};
    Grads got = gpu_backward(p, DType::F32, c, true);
    Grads want{vec("grad_q"), vec("grad_k"), vec("grad_v"), vec("grad_g"), vec("grad_beta"), vec("grad_h0")};
    std::printf("[ fixture bwd ] %-26s", f);
    for (int i = 0; i < 6; ++i) {
      const double e = rel_l2(*grad(got, i), *grad(want, i));
      std::printf(" %s %.1e", kGradNames[i], e);
      EXPECT_LT(e, 1e-4) << f << " " << kGradNames[i];
    }
    std::printf("\n");
  }
}

// `hla op --device cuda`'s path (delta_rule_forward_host) against the CPU path on the op fixtures,
// fp32, chunk and recurrent modes; then the command itself where the hla binary sits beside this
// test binary (build dir, or the carried bin/ folder).
TEST(CudaDeltaRule, OpForwardMatchesCpuPathOnFixtures) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  for (const char* f : kOpFixtures) {
    SafeTensorsFile st(fixture(std::string("ops/") + f + ".safetensors"));
    const Problem p = fixture_problem(st, f[0] == 'k');
    auto t32 = [](const std::vector<double>& x) {
      Tensor t = Tensor::zeros(DType::F32, {int64_t(x.size())});
      for (size_t i = 0; i < x.size(); ++i) t.data<float>()[i] = float(x[i]);
      return t;
    };
    const Tensor q = t32(p.q), k = t32(p.k), v = t32(p.v), g = t32(p.g), b = t32(p.beta), h0 = t32(p.h0);
    for (DeltaMode mode : {DeltaMode::Chunk, DeltaMode::Recurrent}) {
      Tensor cpu_o = Tensor::zeros(DType::F32, {int64_t(p.d.tokens() * p.d.HV * p.d.V)}), cpu_s = h0.clone();
      delta_rule_forward<float>(p.d, q.data<float>(), k.data<float>(), v.data<float>(), g.data<float>(),
                                b.data<float>(), float(p.scale), cpu_s.data<float>(), cpu_o.data<float>(), mode);
      const auto got = cuda::delta_rule_forward_host(p.d, mode, DType::F32, q, k, v, g, b, h0, float(p.scale));
      const double eo = rel_l2(got.o, cpu_o), eh = rel_l2(got.ht, cpu_s);
      std::printf("[ op ] %-26s %-9s o %.2e  ht %.2e (vs CPU f32 path)\n", f,
                  mode == DeltaMode::Chunk ? "chunk" : "recurrent", eo, eh);
      EXPECT_LT(eo, 1e-4) << f;
      EXPECT_LT(eh, 1e-4) << f;
    }
  }
}

std::string hla_binary() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  const auto p = std::filesystem::path(std::string(buf, size_t(n))).parent_path() / "hla";
  return std::filesystem::exists(p) ? p.string() : "";
}

TEST(CudaDeltaRule, OpCommandOnCuda) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  const std::string hla = hla_binary();
  if (hla.empty()) GTEST_SKIP() << "no hla binary beside the test binary";
  TempDir tmp;
  for (const char* f : kOpFixtures) {
    const std::string src = fixture(std::string("ops/") + f + ".safetensors"), op = std::string(f).substr(0, 3);
    SafeTensorsFile st(src);
    // The fixture holds cotangents: the CUDA backward's gradients against the CPU command's.
    std::string out;
    {
      const std::string args = " op " + op + " --input " + src + " --output ";
      ASSERT_EQ(run_command(hla + args + (tmp / "gpu_grad.safetensors") + " --device cuda", &out), 0) << out;
      ASSERT_EQ(run_command(hla + args + (tmp / "cpu_grad.safetensors") + " --device cpu", &out), 0) << out;
      SafeTensorsFile gpu(tmp / "gpu_grad.safetensors"), cpu(tmp / "cpu_grad.safetensors");
      for (const char* t : {"grad_q", "grad_k", "grad_v", "grad_g", "grad_beta", "grad_h0"}) {
        ASSERT_TRUE(gpu.has(t)) << t;
        const double e = rel_l2(gpu.get(t), cpu.get(t));
        std::printf("[ cli ] %-26s F64  grad      %-9s vs cpu %.2e\n", f, t, e);
        EXPECT_LT(e, 1e-4) << f << " " << t;
      }
    }
    for (DType dt : {DType::F64, DType::BF16}) {
      std::map<std::string, Tensor> m;
      for (const char* n : {"in_q", "in_k", "in_v", "in_g", "in_beta", "in_h0"}) m[n] = st.get(n).to(dt);
      write_safetensors(tmp / "in.safetensors", m);
      for (const char* mode : {"chunk", "recurrent"}) {
        const std::string args = " op " + op + " --mode " + mode + " --input " + (tmp / "in.safetensors") + " --output ";
        ASSERT_EQ(run_command(hla + args + (tmp / "gpu.safetensors") + " --device cuda", &out), 0) << out;
        ASSERT_EQ(run_command(hla + args + (tmp / "cpu.safetensors") + " --device cpu", &out), 0) << out;
        SafeTensorsFile gpu(tmp / "gpu.safetensors"), cpu(tmp / "cpu.safetensors");
        for (const char* t : {"out_o", "out_ht"}) {
          ASSERT_TRUE(gpu.has(t)) << t;
          EXPECT_EQ(gpu.get(t).dtype(), dt) << t;
          const double e = rel_l2(gpu.get(t), cpu.get(t)), truth = rel_l2(gpu.get(t), st.get(t));
          std::printf("[ cli ] %-26s %-4s %-9s %-6s vs cpu %.2e  vs fixture %.2e\n", f, dtype_name(dt), mode, t, e,
                      truth);
          // F64 dumps run in fp32 on the GPU; BF16 dumps in bf16 (the CPU path computes the bf16
          // inputs in fp32, so only output rounding and the bf16 matmul operands differ).
          EXPECT_LT(e, dt == DType::F64 ? 1e-4 : 2e-2) << f << " " << mode << " " << t;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Layer transforms inside the op (cuda::DeltaInputForm): raw q, k, beta logits and gate
// pre-activations against the CPU layer functions of ops/delta_rule.h composed with the fp64
// recurrence (forward) and the recurrent backward followed by the layer functions' backwards.
struct FormCase {
  const char* label;
  Case s;
  bool l2norm;
  double beta_max;
  cuda::DeltaGateForm gate;
  bool dt_bias;
};
const FormCase kFormCases[] = {
    {"qwen3-next", {DeltaGate::Scalar, 2, 4, 64, 64, {130, 1, 64, 77}}, true, 1, cuda::DeltaGateForm::Softplus, true},
    {"kimi-linear", {DeltaGate::PerKey, 1, 2, 128, 128, {200, 65}}, true, 1, cuda::DeltaGateForm::LowerBound, true},
    {"kda softplus", {DeltaGate::PerKey, 2, 2, 32, 48, {77, 77}}, true, 1, cuda::DeltaGateForm::Softplus, false},
    {"beta 2 only", {DeltaGate::Scalar, 1, 2, 128, 64, {129}}, false, 2, cuda::DeltaGateForm::LogDecay, false},
    {"l2norm only", {DeltaGate::PerKey, 2, 6, 128, 96, {63, 191, 5}}, true, 0, cuda::DeltaGateForm::LogDecay, false},
    {"T=1", {DeltaGate::PerKey, 1, 1, 64, 32, {1}}, true, 1, cuda::DeltaGateForm::LowerBound, true},
    // forward only (the backward takes K ≤ 128)
    {"K=256", {DeltaGate::Scalar, 1, 1, 256, 256, {100}}, true, 1, cuda::DeltaGateForm::Softplus, true},
};

// p: the transformed inputs the op computes with; the raw ones beside it.
struct FormProblem {
  Problem p;
  std::vector<double> q, k, b, a, A_log, dt_bias;
};

template <class T, class U>
std::vector<T> as(const std::vector<U>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// The form's transforms on the CPU in T: raw → (q, k, beta, g).
template <class T>
void apply_form(const FormCase& c, const FormProblem& f, const std::vector<double>& q_raw,
                const std::vector<double>& k_raw, std::vector<T>& q, std::vector<T>& k, std::vector<T>& beta,
                std::vector<T>& g) {
  const DeltaRuleDims& d = f.p.d;
  const int64_t T_ = d.tokens();
  q = as<T>(q_raw), k = as<T>(k_raw), beta = as<T>(f.b), g = as<T>(f.a);
  if (c.l2norm) {
    l2norm_forward<T>(q.data(), q.data(), T_ * d.H, d.K);
    l2norm_forward<T>(k.data(), k.data(), T_ * d.H, d.K);
  }
  if (c.beta_max > 0) beta_sigmoid_forward<T>(beta.data(), beta.data(), T_ * d.HV, T(c.beta_max));
  const auto A = as<T>(f.A_log), dtb = as<T>(f.dt_bias);
  const T* bias = c.dt_bias ? dtb.data() : nullptr;
  if (c.gate == cuda::DeltaGateForm::Softplus)
    gate_softplus_forward<T>(g.data(), A.data(), bias, g.data(), T_, d.HV, d.g_width());
  else if (c.gate == cuda::DeltaGateForm::LowerBound)
    gate_lowerbound_forward<T>(g.data(), A.data(), bias, T(-5), g.data(), T_, d.HV, d.g_width());
}

FormProblem make_form_problem(const FormCase& c, uint32_t seed) {
  FormProblem f;
  f.p = make_problem(c.s.gate, c.s.H, c.s.HV, c.s.K, c.s.V, c.s.lens, seed);
  Problem& p = f.p;
  std::mt19937 rng(seed + 7919);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud(-1.5, 0.3);
  f.q = p.q, f.k = p.k, f.b = p.beta, f.a = p.g;
  if (c.l2norm)  // rows of norm ~2√K: the normalisation is not a no-op
    for (auto* x : {&f.q, &f.k})
      for (auto& e : *x) e = 2 * nd(rng);
  if (c.beta_max > 0)
    for (auto& e : f.b) e = nd(rng);
  if (c.gate != cuda::DeltaGateForm::LogDecay) {
    f.A_log.resize(size_t(p.d.HV));
    for (auto& e : f.A_log) e = ud(rng);
    if (c.dt_bias) {
      f.dt_bias.resize(size_t(p.d.g_stride()));
      for (auto& e : f.dt_bias) e = 0.5 * nd(rng);
    }
    for (auto& e : f.a) e = nd(rng);
  }
  apply_form<double>(c, f, f.q, f.k, p.q, p.k, p.beta, p.g);
  return f;
}

// Device copies of A_log and dt_bias, and the form naming them.
struct DevForm {
  std::unique_ptr<DevBuf> A_log, dt_bias;
  cuda::DeltaInputForm form;
  DevForm(const FormCase& c, const FormProblem& f) {
    form.qk_l2norm = c.l2norm, form.beta_max = float(c.beta_max), form.gate = c.gate, form.lower_bound = -5;
    if (!f.A_log.empty()) A_log = std::make_unique<DevBuf>(f.A_log, DType::F32), form.A_log = A_log->f32();
    if (!f.dt_bias.empty()) dt_bias = std::make_unique<DevBuf>(f.dt_bias, DType::F32), form.dt_bias = dt_bias->f32();
  }
};

Result gpu_form_forward(const FormCase& c, const FormProblem& f, DType dt) {
  const Problem& p = f.p;
  DevBuf q(f.q, dt), k(f.k, dt), v(p.v, dt), a(f.a, DType::F32), b(f.b, DType::F32), st(p.h0, DType::F32);
  DevBuf o(size_t(p.d.tokens() * p.d.HV * p.d.V), dt, 0xff);
  const DevForm form(c, f);
  cuda::DeltaChunkPlan plan(p.d, dt);
  plan.forward(q.p, k.p, v.p, a.f32(), b.f32(), float(p.scale), st.f32(), o.p, nullptr, form.form);
  cuda::check_cuda(cudaDeviceSynchronize(), "chunk forward with an input form");
  return {o.get(), st.get()};
}

TEST(CudaDeltaRule, InputFormForwardMatchesCpuLayerFunctions) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 700;
  for (const FormCase& c : kFormCases) {
    const FormProblem f = make_form_problem(c, seed++);
    const Result ref = cpu_reference(f.p, f.p.q, f.p.k, f.p.v);
    const Result got = gpu_form_forward(c, f, DType::F32);
    const double eo = rel_l2(got.o, ref.o), eh = rel_l2(got.ht, ref.ht);
    std::printf("[ form fp32 ] %-13s %-40s o %.2e  ht %.2e\n", c.label, name(c.s).c_str(), eo, eh);
    EXPECT_LT(eo, 1e-4) << c.label;
    EXPECT_LT(eh, 1e-4) << c.label;
    // bf16: against a plain fp32 layer + recurrence on the same rounded raw q, k, v.
    const DType dt = DType::BF16;
    std::vector<float> q, k, beta, g;
    apply_form<float>(c, f, round_to(f.q, dt), round_to(f.k, dt), q, k, beta, g);
    std::vector<float> v = as<float>(round_to(f.p.v, dt)), st = as<float>(f.p.h0), o(ref.o.size());
    delta_rule_recurrent<float>(f.p.d, q.data(), k.data(), v.data(), g.data(), beta.data(), float(f.p.scale), st.data(),
                                o.data());
    const double po = rel_l2(round_to(as<double>(o), dt), ref.o), ph = rel_l2(as<double>(st), ref.ht);
    const Result g16 = gpu_form_forward(c, f, dt);
    const double bo = rel_l2(g16.o, ref.o), bh = rel_l2(g16.ht, ref.ht);
    std::printf("[ form bf16 ] %-13s o %.2e (plain %.2e, ratio %.2f)  ht %.2e (plain %.2e, ratio %.2f)\n", c.label, bo,
                po, bo / po, bh, ph, bh / ph);
    EXPECT_LE(bo, 2 * po) << c.label;
    EXPECT_LE(bh, 2 * ph) << c.label;
  }
}

// The same forms in the recurrent decode / verify kernel (delta_rule_decode): 4 sequences of 1 or 3
// tokens each from their slots, both column widths where the shape allows them; fp32 against the
// layer functions + fp64 recurrence, bf16 against the plain fp32 layer + recurrence on the same
// rounded raw inputs (bar 2x).
Result gpu_form_decode(const FormCase& c, const FormProblem& f, DType dt, int64_t tokens, int columns) {
  const Problem& p = f.p;
  const int64_t N = int64_t(p.d.cu_seqlens.size()) - 1;
  DevBuf q(f.q, dt), k(f.k, dt), v(p.v, dt), a(f.a, DType::F32), b(f.b, DType::F32), pool(p.h0, DType::F32);
  DevBuf o(size_t(p.d.tokens() * p.d.HV * p.d.V), dt, 0xff);
  std::vector<int32_t> sv(static_cast<size_t>(N));  // slot n holds sequence n
  std::iota(sv.begin(), sv.end(), 0);
  int32_t* si = nullptr;
  cuda::check_cuda(cudaMalloc(&si, size_t(N) * 4), "alloc");
  cuda::check_cuda(cudaMemcpy(si, sv.data(), size_t(N) * 4, cudaMemcpyHostToDevice), "upload");
  const DevForm form(c, f);
  cuda::delta_rule_decode(p.d, dt, N, tokens, q.p, k.p, v.p, a.f32(), b.f32(), float(p.scale), pool.f32(), si, nullptr,
                          o.p, nullptr, 0, columns, form.form);
  cuda::check_cuda(cudaDeviceSynchronize(), "decode with an input form");
  cudaFree(si);
  return {o.get(), pool.get()};
}

TEST(CudaDeltaRule, DecodeInputFormMatchesCpuLayerFunctions) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 900;
  for (FormCase c : kFormCases)
    for (int64_t tokens : {1, 3})
      for (int columns : {16, 32}) {
        if (columns == 32 && (c.s.K > 128 || c.s.V % 32 != 0)) continue;
        c.s.lens.assign(4, tokens);
        const FormProblem f = make_form_problem(c, seed++);
        const Result ref = cpu_reference(f.p, f.p.q, f.p.k, f.p.v);
        const Result got = gpu_form_decode(c, f, DType::F32, tokens, columns);
        const double eo = rel_l2(got.o, ref.o), eh = rel_l2(got.ht, ref.ht);
        const std::string what =
            std::string(c.label) + " tokens " + std::to_string(tokens) + " columns " + std::to_string(columns);
        EXPECT_LT(eo, 1e-4) << what;
        EXPECT_LT(eh, 1e-4) << what;
        const DType dt = DType::BF16;
        std::vector<float> q, k, beta, g;
        apply_form<float>(c, f, round_to(f.q, dt), round_to(f.k, dt), q, k, beta, g);
        std::vector<float> v = as<float>(round_to(f.p.v, dt)), st = as<float>(f.p.h0), o(ref.o.size());
        delta_rule_recurrent<float>(f.p.d, q.data(), k.data(), v.data(), g.data(), beta.data(), float(f.p.scale),
                                    st.data(), o.data());
        const double po = rel_l2(round_to(as<double>(o), dt), ref.o), ph = rel_l2(as<double>(st), ref.ht);
        const Result g16 = gpu_form_decode(c, f, dt, tokens, columns);
        const double bo = rel_l2(g16.o, ref.o), bh = rel_l2(g16.ht, ref.ht);
        std::printf("[ decode form ] %-28s fp32 o %.2e ht %.2e | bf16 o ratio %.2f ht ratio %.2f\n", what.c_str(), eo,
                    eh, bo / po, bh / ph);
        EXPECT_LE(bo, 2 * po) << what;
        EXPECT_LE(bh, 2 * ph) << what;
      }
  // An incomplete form (a gate without A_log) is refused before any launch.
  cuda::DeltaInputForm bad;
  bad.gate = cuda::DeltaGateForm::Softplus;
  DeltaRuleDims d;
  d.H = d.HV = 1, d.K = d.V = 64;
  EXPECT_THROW(cuda::delta_rule_decode(d, DType::F32, 1, 1, nullptr, nullptr, nullptr, nullptr, nullptr, 1.f, nullptr,
                                       nullptr, nullptr, nullptr, nullptr, 0, 0, bad),
               Error);
}

// Gradients of the raw inputs plus dA_log and ddt_bias.
struct FormGrads {
  Grads g;
  std::vector<double> dA_log, ddt_bias;
};
const char* kFormGradNames[] = {"dq", "dk", "dv", "da", "db", "dh0", "dA_log", "ddt_bias"};
std::vector<double>* form_grad(FormGrads& g, int i) { return i < 6 ? grad(g.g, i) : i == 6 ? &g.dA_log : &g.ddt_bias; }

// The CPU chain in T on raw q, k, v, dout (double: the oracle; float on rounded inputs: the plain
// 16-bit reference).
template <class T>
FormGrads cpu_form_backward(const FormCase& c, const FormProblem& f, const std::vector<double>& q_raw,
                            const std::vector<double>& k_raw, const std::vector<double>& v,
                            const std::vector<double>& dout, const std::vector<double>& dht) {
  const Problem& p = f.p;
  const int64_t N = p.d.tokens(), W = p.d.g_width();
  std::vector<T> q, k, beta, g;
  apply_form<T>(c, f, q_raw, k_raw, q, k, beta, g);
  FormGrads r;
  r.g = cpu_backward<T>(p, as<double>(q), as<double>(k), v, dout, dht, true);
  auto chain = [](std::vector<double>& x, auto&& f) {  // f(in T, out T) in place on x
    std::vector<T> t = as<T>(x);
    f(t.data());
    x = as<double>(t);
  };
  const std::vector<T> qr = as<T>(q_raw), kr = as<T>(k_raw), b = as<T>(f.b), a = as<T>(f.a), A = as<T>(f.A_log),
                       dtb = as<T>(f.dt_bias);
  Grads& gr = r.g;
  if (c.l2norm) {
    chain(gr.dq, [&](T* d) { l2norm_backward<T>(qr.data(), d, d, N * p.d.H, p.d.K); });
    chain(gr.dk, [&](T* d) { l2norm_backward<T>(kr.data(), d, d, N * p.d.H, p.d.K); });
  }
  if (c.beta_max > 0)
    chain(gr.dbeta, [&](T* d) { beta_sigmoid_backward<T>(b.data(), d, d, N * p.d.HV, T(c.beta_max)); });
  if (c.gate != cuda::DeltaGateForm::LogDecay) {
    std::vector<T> dA(A.size()), ddt(dtb.size());
    const T* bias = c.dt_bias ? dtb.data() : nullptr;
    chain(gr.dg, [&](T* d) {
      if (c.gate == cuda::DeltaGateForm::Softplus)
        gate_softplus_backward<T>(a.data(), A.data(), bias, d, d, dA.data(), ddt.data(), N, p.d.HV, W);
      else
        gate_lowerbound_backward<T>(a.data(), A.data(), bias, T(-5), d, d, dA.data(), ddt.data(), N, p.d.HV, W);
    });
    r.dA_log = as<double>(dA), r.ddt_bias = as<double>(ddt);
  }
  return r;
}

FormGrads gpu_form_backward(const FormCase& c, const FormProblem& f, const Cotangents& ct, DType dt) {
  const Problem& p = f.p;
  const int64_t T = p.d.tokens();
  DevBuf q(f.q, dt), k(f.k, dt), v(p.v, dt), a(f.a, DType::F32), b(f.b, DType::F32), h0(p.h0, DType::F32),
      dout(ct.dout, dt), dht(ct.dht, DType::F32);
  DevBuf dq(size_t(T * p.d.H * p.d.K), DType::F32, 0xff), dk(size_t(T * p.d.H * p.d.K), DType::F32, 0xff),
      dv(size_t(T * p.d.HV * p.d.V), DType::F32, 0xff), dg(f.a.size(), DType::F32, 0xff),
      db(f.b.size(), DType::F32, 0xff), dh0(p.h0.size(), DType::F32, 0xff), dA(f.A_log.size(), DType::F32, 0xff),
      ddt(f.dt_bias.size(), DType::F32, 0xff);
  const DevForm form(c, f);
  cuda::DeltaChunkBackward bwd(p.d, dt);
  bwd.backward(q.p, k.p, v.p, a.f32(), b.f32(), float(p.scale), h0.f32(), dout.p, dht.f32(), dq.f32(), dk.f32(),
               dv.f32(), dg.f32(), db.f32(), dh0.f32(), nullptr, form.form, dA.f32(), ddt.f32());
  cuda::check_cuda(cudaDeviceSynchronize(), "chunk backward with an input form");
  FormGrads r;
  r.g = {dq.get(), dk.get(), dv.get(), dg.get(), db.get(), dh0.get()};
  if (c.gate != cuda::DeltaGateForm::LogDecay) r.dA_log = dA.get(), r.ddt_bias = ddt.get();
  return r;
}

TEST(CudaDeltaRule, InputFormBackwardMatchesCpuLayerFunctions) {
  HLA_REQUIRE_GPU();
  uint32_t seed = 800;
  for (const FormCase& c : kFormCases) {
    if (c.s.K > 128 || c.s.V > 128) continue;  // the backward's limits
    const FormProblem f = make_form_problem(c, seed++);
    const Cotangents ct = make_cotangents(f.p, true, seed++);
    FormGrads ref = cpu_form_backward<double>(c, f, f.q, f.k, f.p.v, ct.dout, ct.dht);
    FormGrads got = gpu_form_backward(c, f, ct, DType::F32);
    std::printf("[ form bwd fp32 ] %-13s", c.label);
    for (int i = 0; i < 8; ++i) {
      if (form_grad(ref, i)->empty()) continue;
      const double e = rel_l2(*form_grad(got, i), *form_grad(ref, i));
      std::printf(" %s %.1e", kFormGradNames[i], e);
      EXPECT_LT(e, 1e-4) << c.label << " " << kFormGradNames[i];
    }
    std::printf("\n");
    // bf16: no worse than 2x the plain fp32 chain on the same rounded q, k, v, dout; bitwise repeatable.
    const DType dt = DType::BF16;
    FormGrads plain = cpu_form_backward<float>(c, f, round_to(f.q, dt), round_to(f.k, dt), round_to(f.p.v, dt),
                                               round_to(ct.dout, dt), ct.dht);
    FormGrads b1 = gpu_form_backward(c, f, ct, dt), b2 = gpu_form_backward(c, f, ct, dt);
    std::printf("[ form bwd bf16 ] %-13s", c.label);
    for (int i = 0; i < 8; ++i) {
      const auto& want = *form_grad(ref, i);
      EXPECT_TRUE(*form_grad(b1, i) == *form_grad(b2, i)) << c.label << " " << kFormGradNames[i];
      if (want.empty()) continue;
      const double e = rel_l2(*form_grad(b1, i), want), pe = rel_l2(*form_grad(plain, i), want);
      std::printf(" %s %.1e (x%.2f)", kFormGradNames[i], e, e / pe);
      EXPECT_LE(e, 2 * pe) << c.label << " " << kFormGradNames[i];
    }
    std::printf("\n");
  }
}

TEST(CudaDeltaRule, RejectsUnsupportedShapes) {
  HLA_REQUIRE_GPU();
  DeltaRuleDims d;
  d.H = 1, d.HV = 1, d.K = 256, d.V = 64, d.cu_seqlens = {0, 10};
  EXPECT_THROW(cuda::DeltaChunkBackward(d, DType::BF16), Error);  // the backward takes K ≤ 128
  d.K = 64, d.V = 256;
  EXPECT_THROW(cuda::DeltaChunkBackward(d, DType::BF16), Error);  // and V ≤ 128
  d.V = 48;
  EXPECT_THROW(cuda::DeltaChunkBackward(d, DType::BF16, 32), Error);  // 32 state columns need 32 | V
  d.K = 96, d.V = 64;
  EXPECT_THROW(cuda::DeltaChunkPlan(d, DType::BF16), Error);
  d.K = 64, d.V = 40;
  EXPECT_THROW(cuda::DeltaChunkPlan(d, DType::BF16), Error);
  d.V = 64, d.gate = DeltaGate::PerKey;
  EXPECT_THROW(cuda::DeltaChunkPlan(d, DType::F16), Error);
  // Incomplete input forms: a gate without A_log, a lower bound that is not negative.
  cuda::DeltaChunkPlan plan(d, DType::BF16);
  cuda::DeltaInputForm form;
  form.gate = cuda::DeltaGateForm::Softplus;
  EXPECT_THROW(plan.forward(nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr, nullptr, nullptr, form), Error);
  const float A_log = 0;
  form.gate = cuda::DeltaGateForm::LowerBound, form.A_log = &A_log, form.lower_bound = 0;
  EXPECT_THROW(plan.forward(nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr, nullptr, nullptr, form), Error);
}

}  // namespace
}  // namespace hla
