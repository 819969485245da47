// CPU building blocks against their plain forms (blocked GEMM attention against attention_plain)
// and against hand-made cases (MoE routing).
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

// MoE routing (cpu::moe_route, the oracle of the CPU forward and of the GPU routing kernel) on
// hand-made logits: softmax with tied experts (the lower index first), with and without
// renormalisation; sigmoid scores where the correction bias and the group limit decide the picks
// while the weights stay the unbiased sigmoid probabilities.
TEST(MoeRoute, SoftmaxPicksTiesInIndexOrder) {
  const float logit[4] = {0.0f, 2.0f, 1.0f, 2.0f};
  cpu::MoeRouter r;
  r.experts = 4, r.top_k = 2;
  const auto picks = cpu::moe_route(logit, nullptr, r);
  ASSERT_EQ(picks.size(), 2u);
  EXPECT_EQ(picks[0].first, 1);
  EXPECT_EQ(picks[1].first, 3);
  EXPECT_FLOAT_EQ(picks[0].second, 0.5f);
  EXPECT_FLOAT_EQ(picks[1].second, 0.5f);
  r.norm_topk = false;
  const float p = std::exp(2.0f) / (1.0f + 2.0f * std::exp(2.0f) + std::exp(1.0f));
  for (const auto& pick : cpu::moe_route(logit, nullptr, r)) EXPECT_NEAR(pick.second, p, 1e-6f);
}

TEST(MoeRoute, SigmoidGroupsAndBiasSelectUnbiasedWeightsScale) {
  // Biased scores by group of 2: {0.9, 0.1} {0.61, 0.6} {0.95, 0.0} {0.5, 0.55}; the two best
  // groups by their top-2 sums are 1 (1.21) and 3 (1.05), so experts 4 and 0, the best alone, are
  // not picked.
  const float want_select[8] = {0.9f, 0.1f, 0.61f, 0.6f, 0.95f, 0.0f, 0.5f, 0.55f};
  float logit[8], bias[8];
  for (int e = 0; e < 8; ++e) logit[e] = 0.0f;
  logit[2] = std::log(3.0f);  // probability 0.75
  for (int e = 0; e < 8; ++e) bias[e] = want_select[e] - 1.0f / (1.0f + std::exp(-logit[e]));
  cpu::MoeRouter r;
  r.experts = 8, r.top_k = 2, r.sigmoid = true, r.n_group = 4, r.topk_group = 2, r.routed_scale = 2.5f;
  const auto picks = cpu::moe_route(logit, bias, r);
  ASSERT_EQ(picks.size(), 2u);
  EXPECT_EQ(picks[0].first, 2);
  EXPECT_EQ(picks[1].first, 3);
  EXPECT_NEAR(picks[0].second, 0.75f / 1.25f * 2.5f, 1e-5f);
  EXPECT_NEAR(picks[1].second, 0.5f / 1.25f * 2.5f, 1e-5f);
  r.n_group = 1;  // without the group limit the best two alone win
  const auto free_picks = cpu::moe_route(logit, bias, r);
  EXPECT_EQ(free_picks[0].first, 4);
  EXPECT_EQ(free_picks[1].first, 0);
}

}  // namespace
