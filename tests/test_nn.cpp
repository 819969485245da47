// CPU building blocks against their plain forms: blocked (GEMM) attention against attention_plain.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backends/cpu/nn.h"

using namespace hla;

namespace {

TEST(CpuAttention, BlockedEqualsPlain) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  struct Case {
    int64_t T, S, nh, nkv, dq, dv;
  };
  // prefill (T = S), continuation of a cached prefix (T < S), odd block tails, GQA, dq != dv
  for (const Case c : {Case{32, 32, 4, 4, 16, 16}, Case{33, 33, 8, 2, 16, 16}, Case{100, 130, 8, 2, 24, 8},
                       Case{257, 257, 4, 1, 32, 32}, Case{40, 300, 2, 2, 8, 12}}) {
    std::vector<float> q(size_t(c.T * c.nh * c.dq)), k(size_t(c.S * c.nkv * c.dq)), v(size_t(c.S * c.nkv * c.dv));
    for (auto* x : {&q, &k, &v})
      for (auto& e : *x) e = n(rng);
    std::vector<float> blocked(size_t(c.T * c.nh * c.dv)), plain(blocked.size());
    const float scale = 1.0f / std::sqrt(float(c.dq));
    cpu::attention(q.data(), k.data(), v.data(), blocked.data(), c.T, c.S, c.nh, c.nkv, c.dq, c.dv, scale);
    cpu::attention_plain(q.data(), k.data(), v.data(), plain.data(), c.T, c.S, c.nh, c.nkv, c.dq, c.dv, scale);
    double err = 0, mag = 0;
    for (size_t i = 0; i < plain.size(); ++i) {
      err = std::max(err, double(std::fabs(blocked[i] - plain[i])));
      mag = std::max(mag, double(std::fabs(plain[i])));
    }
    EXPECT_LT(err / mag, 1e-5) << "T " << c.T << " S " << c.S << " nh " << c.nh << " nkv " << c.nkv;
  }
}

}  // namespace
