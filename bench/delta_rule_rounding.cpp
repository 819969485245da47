// The CUDA chunk kernel's 16-bit rounding points (GDN prep + state pass, delta_rule_chunk.cu),
// modelled on the CPU: where the final state's error comes from. For the GDN cases of
// tests/cuda/test_cuda_delta_rule.cpp's Chunk16BitWithinTwicePlainRecurrence (the same problems
// from the same seeds) it prints the final state's error against the fp64 recurrence, as a ratio
// to a plain fp32 recurrence on the same rounded inputs (the test's bar: 2), for the kernel's
// rounding points and with single ones removed. The model's "T once" row reproduced the H200's
// numbers to 3 digits (2026-11-27), e.g. 6.50e-04 (plain 2.99e-04, 2.18x) for K128 V64 lens 129.
//   build/bench_delta_rule_rounding [f16|bf16]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "tests/delta_rule_problem.h"

using namespace hla;

namespace {

struct Rounding {
  const char* name;
  int t_terms;     // T's scaled columns as 1 (rounded once) or 2 (plus the residual) 16-bit operands; 0: fp32
  bool wu, s, vn;  // W and U stored, S as the W·S operand, decayed v_new as the update operand: 16-bit
};

// The final states [N, HV, K, V] of the chunk form (chunks of 64) with these roundings to `dt`.
std::vector<double> chunk_model(const Problem& p, DType dt, const Rounding& r) {
  const DeltaRuleDims& d = p.d;
  const int64_t H = d.H, HV = d.HV, K = d.K, V = d.V, C = 64;
  auto rnd = [&](float x) { return float(round_to({double(x)}, dt)[0]); };
  const std::vector<double> kr = round_to(p.k, dt), vr = round_to(p.v, dt);
  std::vector<double> out(p.h0.size());
  for (int64_t n = 0; n < d.num_seqs(); ++n)
    for (int64_t j = 0; j < HV; ++j) {
      const int64_t h = j / (HV / H), bos = d.cu_seqlens[size_t(n)], eos = d.cu_seqlens[size_t(n + 1)];
      std::vector<float> S(static_cast<size_t>(K * V));
      for (int64_t i = 0; i < K * V; ++i) S[size_t(i)] = float(p.h0[size_t((n * HV + j) * K * V + i)]);
      for (int64_t t0 = bos; t0 < eos; t0 += C) {
        const int64_t lc = std::min(C, eos - t0);
        auto k = [&](int64_t i, int64_t e) { return float(kr[size_t(((t0 + i) * H + h) * K + e)]); };
        auto v = [&](int64_t i, int64_t c) { return float(vr[size_t(((t0 + i) * HV + j) * V + c)]); };
        auto beta = [&](int64_t i) { return float(p.beta[size_t((t0 + i) * HV + j)]); };
        std::vector<float> G(static_cast<size_t>(lc)), L(static_cast<size_t>(lc * lc)), T(static_cast<size_t>(lc * lc)),
            W(static_cast<size_t>(lc * K)), U(static_cast<size_t>(lc * V));
        float acc = 0;
        for (int64_t i = 0; i < lc; ++i) G[size_t(i)] = (acc += float(p.g[size_t((t0 + i) * HV + j)]));
        for (int64_t i = 0; i < lc; ++i)  // L = strict-tril(beta K K^T ⊙ decay), T = (I + L)^{-1}
          for (int64_t m = 0; m < i; ++m) {
            float s = 0;
            for (int64_t e = 0; e < K; ++e) s += k(i, e) * k(m, e);
            L[size_t(i * lc + m)] = s * beta(i) * std::exp(G[size_t(i)] - G[size_t(m)]);
          }
        for (int64_t c = 0; c < lc; ++c)
          for (int64_t i = c; i < lc; ++i) {
            float x = i == c ? 1.f : 0.f;
            for (int64_t m = c; m < i; ++m) x -= L[size_t(i * lc + m)] * T[size_t(m * lc + c)];
            T[size_t(i * lc + c)] = x;
          }
        auto operand = [&](float t) {  // T's entry as the MMA sees it
          if (r.t_terms == 0) return t;
          const float hi = rnd(t);
          return r.t_terms == 1 ? hi : hi + rnd(t - hi);
        };
        for (int64_t i = 0; i < lc; ++i) {  // W = T diag(beta e^G) K, U = T diag(beta) V
          for (int64_t e = 0; e < K; ++e) {
            float s = 0;
            for (int64_t m = 0; m <= i; ++m)
              s += operand(T[size_t(i * lc + m)] * beta(m) * std::exp(G[size_t(m)])) * k(m, e);
            W[size_t(i * K + e)] = r.wu ? rnd(s) : s;
          }
          for (int64_t c = 0; c < V; ++c) {
            float s = 0;
            for (int64_t m = 0; m <= i; ++m) s += operand(T[size_t(i * lc + m)] * beta(m)) * v(m, c);
            U[size_t(i * V + c)] = r.wu ? rnd(s) : s;
          }
        }
        const float Gl = G[size_t(lc - 1)];
        std::vector<float> vd(static_cast<size_t>(lc * V));  // e^{G_last − G_i} v_new, v_new = U − W S
        for (int64_t i = 0; i < lc; ++i)
          for (int64_t c = 0; c < V; ++c) {
            float s = 0;
            for (int64_t e = 0; e < K; ++e) {
              const float x = S[size_t(e * V + c)];
              s += W[size_t(i * K + e)] * (r.s ? rnd(x) : x);
            }
            const float x = (U[size_t(i * V + c)] - s) * std::exp(Gl - G[size_t(i)]);
            vd[size_t(i * V + c)] = r.vn ? rnd(x) : x;
          }
        for (int64_t e = 0; e < K; ++e)  // S ← e^{G_last} S + K^T vd
          for (int64_t c = 0; c < V; ++c) {
            float s = std::exp(Gl) * S[size_t(e * V + c)];
            for (int64_t i = 0; i < lc; ++i) s += k(i, e) * vd[size_t(i * V + c)];
            S[size_t(e * V + c)] = s;
          }
      }
      for (int64_t i = 0; i < K * V; ++i) out[size_t((n * HV + j) * K * V + i)] = S[size_t(i)];
    }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const DType dt = argc > 1 && std::strcmp(argv[1], "bf16") == 0 ? DType::BF16 : DType::F16;
  struct Case {
    int64_t H, HV, K, V;
    std::vector<int64_t> lens;
    uint32_t seed;  // the test's seed for this case in this dtype
  };
  const uint32_t first = dt == DType::F16 ? 109 : 100;  // bf16 runs all 9 shapes first, KDA ones included
  const std::vector<Case> cases = {{2, 4, 64, 64, {130, 1, 64, 77}, first},
                                   {1, 2, 128, 128, {200, 65}, dt == DType::F16 ? 110 : first + 2},
                                   {2, 2, 32, 48, {77, 77}, dt == DType::F16 ? 111 : first + 4},
                                   {1, 1, 256, 256, {100}, dt == DType::F16 ? 112 : first + 6},
                                   {1, 2, 128, 64, {129}, dt == DType::F16 ? 113 : first + 8}};
  const Rounding roundings[] = {{"kernel, T rounded once", 1, true, true, true},
                                {"kernel, T + its residual", 2, true, true, true},
                                {"T once, S kept fp32", 1, true, false, true},
                                {"T once, v_new kept fp32", 1, true, true, false},
                                {"T once, W and U kept fp32", 1, false, true, true}};
  for (const Case& c : cases) {
    const Problem p = make_problem(DeltaGate::Scalar, c.H, c.HV, c.K, c.V, c.lens, c.seed);
    std::vector<double> truth = p.h0, o(size_t(p.d.tokens() * c.HV * c.V));
    delta_rule_recurrent<double>(p.d, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.scale,
                                 truth.data(), o.data());
    // The plain recurrence: fp32 state, the same rounded inputs.
    auto f32 = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    std::vector<float> q = f32(round_to(p.q, dt)), k = f32(round_to(p.k, dt)), v = f32(round_to(p.v, dt)), g = f32(p.g),
                       b = f32(p.beta), st = f32(p.h0), of(o.size());
    delta_rule_recurrent<float>(p.d, q.data(), k.data(), v.data(), g.data(), b.data(), float(p.scale), st.data(),
                                of.data());
    const double plain = rel_l2(std::vector<double>(st.begin(), st.end()), truth);
    std::printf("gdn H%lld HV%lld K%lld V%lld (seed %u), %s: plain recurrence %.2e\n", (long long)c.H, (long long)c.HV,
                (long long)c.K, (long long)c.V, c.seed, dtype_name(dt), plain);
    for (const Rounding& r : roundings) {
      const double e = rel_l2(chunk_model(p, dt, r), truth);
      std::printf("  %-28s final state %.2e  %.2fx\n", r.name, e, e / plain);
    }
  }
}
