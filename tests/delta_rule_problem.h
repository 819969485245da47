// A delta-rule problem drawn as the layers produce their inputs, shared by the CUDA kernel tests
// (tests/cuda/test_cuda_delta_rule.cpp) and the CPU model of the chunk kernel's rounding
// (bench/delta_rule_rounding.cpp), so that both see the same cases for the same seeds.
#pragma once
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "ops/delta_rule.h"

namespace hla {

inline double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

inline std::vector<double> round_to(const std::vector<double>& x, DType dt) {
  std::vector<double> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float f = float(x[i]);
    r[i] = dt == DType::BF16 ? bf16_to_f32(f32_to_bf16(f)) : dt == DType::F16 ? f16_to_f32(f32_to_f16(f)) : f;
  }
  return r;
}

// Inputs as the layers produce them: k L2-normalised, g = log-sigmoid clamped to [−5, 0),
// beta in (0, 1); q and v standard normal, h0 small.
struct Problem {
  DeltaRuleDims d;
  std::vector<double> q, k, v, g, beta, h0;
  double scale = 0;
};

inline Problem make_problem(DeltaGate gate, int64_t H, int64_t HV, int64_t K, int64_t V, std::vector<int64_t> lens,
                            uint32_t seed) {
  Problem p;
  p.d.H = H, p.d.HV = HV, p.d.K = K, p.d.V = V, p.d.gate = gate;
  p.d.cu_seqlens = {0};
  for (int64_t l : lens) p.d.cu_seqlens.push_back(p.d.cu_seqlens.back() + l);
  const int64_t T = p.d.tokens(), N = p.d.num_seqs();
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud(0.05, 0.95);
  p.q.resize(T * H * K), p.k.resize(T * H * K), p.v.resize(T * HV * V);
  p.g.resize(T * p.d.g_stride()), p.beta.resize(T * HV), p.h0.resize(N * HV * K * V);
  for (auto& x : p.q) x = nd(rng);
  for (int64_t r = 0; r < T * H; ++r) {
    double s = 0;
    for (int64_t i = 0; i < K; ++i) s += (p.k[r * K + i] = nd(rng)) * p.k[r * K + i];
    for (int64_t i = 0; i < K; ++i) p.k[r * K + i] /= std::sqrt(s);
  }
  for (auto& x : p.v) x = nd(rng);
  for (auto& x : p.g) x = std::max(-5.0, -std::log1p(std::exp(-nd(rng))));
  for (auto& x : p.beta) x = ud(rng);
  for (auto& x : p.h0) x = 0.1 * nd(rng);
  p.scale = 1.0 / std::sqrt(double(K));
  return p;
}

}  // namespace hla
