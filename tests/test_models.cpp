// The four architectures against Hugging Face transformers' own outputs (../shared/fixtures/models):
// full-forward logits, greedy generation with the cache, and decode == full forward.
#include <gtest/gtest.h>

#include "core/safetensors.h"
#include "model/model.h"
#include "runtime/session.h"
#include "tests/common.h"

using namespace hla;

namespace {

std::vector<int64_t> row_ids(const Tensor& ids, int64_t row, int64_t n) {
  std::vector<int64_t> r;
  for (int64_t t = 0; t < n; ++t) r.push_back(int64_t(ids.at({row, t})));
  return r;
}

// logits [B,T,V] of a packed full forward, each row its own sequence.
Tensor full_forward(const Model& m, const Tensor& ids) {
  const int64_t B = ids.size(0), T = ids.size(1);
  std::vector<int64_t> flat;
  std::vector<SequenceCache> caches(size_t(B), m.new_cache());
  SeqBatch b;
  b.cu_seqlens = {0};
  for (int64_t r = 0; r < B; ++r) {
    auto ids_r = row_ids(ids, r, T);
    flat.insert(flat.end(), ids_r.begin(), ids_r.end());
    b.cu_seqlens.push_back((r + 1) * T);
    b.caches.push_back(&caches[size_t(r)]);
  }
  return m.forward(flat, b, true).reshape({B, T, m.spec().vocab});
}

class FixtureModel : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureModel, LogitsMatchTransformers) {
  HLA_REQUIRE_FIXTURES();
  const std::string dir = fixture("models/" + GetParam());
  auto m = Model::load(dir);
  SafeTensorsFile ref(dir + "/reference.safetensors");
  const double err = max_rel(full_forward(*m, ref.get("input_ids")), ref.get("logits"));
  EXPECT_LT(err, 1e-4);
  RecordProperty("max_rel_error", std::to_string(err));
  if (ref.has("gen_ids")) {
    EXPECT_LT(max_rel(full_forward(*m, ref.get("gen_ids")), ref.get("gen_logits")), 1e-4);
  }
}

TEST_P(FixtureModel, GreedyGenerationMatchesTransformers) {
  HLA_REQUIRE_FIXTURES();
  const std::string dir = fixture("models/" + GetParam());
  SafeTensorsFile ref(dir + "/reference.safetensors");
  if (!ref.has("gen_ids")) GTEST_SKIP() << "no gen_ids in this fixture";
  auto m = Model::load(dir);
  Tensor gen = ref.get("gen_ids");
  const auto all = row_ids(gen, 0, gen.size(1));
  const std::vector<int64_t> prompt(all.begin(), all.begin() + 12), expected(all.begin() + 12, all.end());
  Session s(*m);
  Sampler greedy(SamplingParams{});
  EXPECT_EQ(s.generate(prompt, int64_t(expected.size()), greedy), expected);
}

// Prefill of a prefix then token-by-token decode gives the full forward's logits.
TEST_P(FixtureModel, DecodeWithCacheEqualsFullForward) {
  HLA_REQUIRE_FIXTURES();
  const std::string dir = fixture("models/" + GetParam());
  auto m = Model::load(dir);
  SafeTensorsFile ref(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids");
  const int64_t T = ids.size(1), V = m->spec().vocab;
  Tensor full = full_forward(*m, ids);
  for (int64_t split : {1, 5, 20}) {
    Session s(*m);
    auto all = row_ids(ids, 1, T);
    std::vector<float> logits = s.append(std::vector<int64_t>(all.begin(), all.begin() + split));
    double worst = 0, scale = 0;
    for (int64_t t = split - 1; t < T; ++t) {
      if (t >= split) logits = s.append({all[size_t(t)]});
      for (int64_t v = 0; v < V; ++v) {
        worst = std::max(worst, std::fabs(logits[size_t(v)] - full.at({1, t, v})));
        scale = std::max(scale, std::fabs(full.at({1, t, v})));
      }
    }
    EXPECT_LT(worst / scale, 1e-5) << "prefill " << split;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureModel,
                         ::testing::Values("qwen3_next", "qwen3_5", "qwen3_5_vl", "kimi_linear", "deepseek_v32"));

}  // namespace
