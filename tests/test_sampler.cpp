// The sampler draws from exactly the distribution it claims: softmax at the temperature, cut to the
// top-k, then to the nucleus (shortest most-likely prefix holding top_p of the mass).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "runtime/session.h"

using namespace hla;

namespace {

// Empirical frequencies of n draws.
std::map<int64_t, double> frequencies(const std::vector<float>& logits, SamplingParams p, int n) {
  Sampler s(p);
  std::map<int64_t, double> f;
  for (int i = 0; i < n; ++i) f[s.sample(logits.data(), int64_t(logits.size()))] += 1.0 / n;
  return f;
}

// log-probabilities for the given probabilities (softmax of these at temperature 1 gives them back)
std::vector<float> logits_for(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(float(std::log(p)));
  return l;
}

}  // namespace

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  std::vector<float> l = {0.1f, 2.0f, -1.0f, 2.0f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(l.data(), 4), 1);
}

TEST(Sampler, MatchesSoftmaxAtTemperature) {
  const std::vector<double> p = {0.5, 0.25, 0.15, 0.1};
  auto f = frequencies(logits_for(p), SamplingParams{1.0f, 0, 1.0f, 1}, 200000);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(f[int64_t(i)], p[i], 0.006) << i;
  // temperature 2 flattens: probabilities ∝ sqrt(p)
  auto g = frequencies(logits_for(p), SamplingParams{2.0f, 0, 1.0f, 2}, 200000);
  double z = 0;
  for (double x : p) z += std::sqrt(x);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(g[int64_t(i)], std::sqrt(p[i]) / z, 0.006) << i;
}

TEST(Sampler, TopKAndTopPCutTheTail) {
  const std::vector<double> p = {0.1, 0.4, 0.2, 0.3};
  auto k2 = frequencies(logits_for(p), SamplingParams{1.0f, 2, 1.0f, 3}, 100000);
  EXPECT_EQ(k2.size(), 2u);
  EXPECT_NEAR(k2[1], 0.4 / 0.7, 0.01);
  EXPECT_NEAR(k2[3], 0.3 / 0.7, 0.01);
  // top_p 0.5: 0.4 < 0.5, 0.4 + 0.3 >= 0.5 -> ids {1, 3}
  auto nuc = frequencies(logits_for(p), SamplingParams{1.0f, 0, 0.5f, 4}, 100000);
  EXPECT_EQ(nuc.size(), 2u);
  EXPECT_NEAR(nuc[1], 0.4 / 0.7, 0.01);
  // top_k 3 then top_p 0.6 of the renormalised top 3 (0.4, 0.3, 0.2 of 0.9): 0.44, 0.78 -> {1, 3}
  auto both = frequencies(logits_for(p), SamplingParams{1.0f, 3, 0.6f, 5}, 50000);
  EXPECT_EQ(both.size(), 2u);
}

TEST(Sampler, NucleusOverALargeVocabulary) {
  // 150k ids, 100 of them likely: the nucleus at 0.9 stays among those 100.
  std::vector<float> l(150000, -20.0f);
  for (int i = 0; i < 100; ++i) l[size_t(i * 1499)] = 5.0f - 0.01f * float(i);
  Sampler s(SamplingParams{1.0f, 0, 0.9f, 6});
  for (int i = 0; i < 200; ++i) EXPECT_EQ(s.sample(l.data(), int64_t(l.size())) % 1499, 0);
}
