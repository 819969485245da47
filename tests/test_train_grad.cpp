// Training path: the trainable hla_hybrid model computes the same logits as the inference Model
// loaded from its checkpoint, and its explicit backward matches central finite differences in
// double for every layer kind (and the DSA indexer's KL loss).
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "core/safetensors.h"
#include "model/model.h"
#include "train/train_model.h"
#include "tests/common.h"

using namespace hla;
using namespace hla::train;

namespace {

ModelSpec spec_of(const nlohmann::json& j) { return parse_model_spec(Config(j, "test-config.json")); }

Batch tiny_batch(int64_t vocab, const std::vector<int64_t>& lens, uint32_t seed) {
  std::mt19937 rng(seed);
  Batch b;
  b.cu_seqlens = {0};
  for (int64_t n : lens) {
    for (int64_t t = 0; t < n; ++t) {
      b.ids.push_back(int64_t(rng() % uint32_t(vocab)));
      b.labels.push_back(rng() % 4 == 0 ? -100 : int64_t(rng() % uint32_t(vocab)));
    }
    b.cu_seqlens.push_back(b.cu_seqlens.back() + n);
  }
  return b;
}

// Random weights in the checkpoint layout, pushed off hla init's values (norm weights, gates) so
// that every gradient term matters.
std::map<std::string, Tensor> random_weights(const ModelSpec& s, uint64_t seed) {
  std::map<std::string, Tensor> w;
  Model::random(s, seed, &w);
  std::mt19937 rng(uint32_t(seed) + 7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (auto& [name, t] : w) {
    float* p = t.f32();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] += (t.dim() == 1 ? 0.2f : 0.15f) * n(rng);
  }
  return w;
}

template <class T>
std::unique_ptr<TrainModel<T>> make_train(const ModelSpec& s, const std::map<std::string, Tensor>& w) {
  return std::make_unique<TrainModel<T>>(s, [&](const std::string& name) { return w.at(name); });
}

}  // namespace

// The trainable model and the inference model (loaded from the checkpoint it would write, run
// with its caches on a packed batch) give the same logits.
TEST(TrainModel, LogitsMatchInferenceModel) {
  struct Case {
    std::string pattern;
    int64_t conv;
    bool neg_eigval;
  };
  for (const auto& [pattern, conv, neg_eigval] : std::vector<Case>{
           {"KGLAWS", 0, false}, {"SA", 0, false}, {"WLAG", 0, false}, {"ASWK", 3, false}, {"KG", 0, true}}) {
    const nlohmann::json cfg = tiny_hybrid_config(pattern, pattern != "SA", conv, neg_eigval);
    const ModelSpec s = spec_of(cfg);
    auto tm = make_train<float>(s, random_weights(s, 3));
    Batch b = tiny_batch(s.vocab, {11, 7}, 5);
    std::fill(b.labels.begin(), b.labels.end(), 0);  // logits at every position
    const std::vector<float> lt = tm->logits(b);

    TempDir dir;
    write_safetensors(dir / "model.safetensors", tm->export_weights());
    std::ofstream(dir / "config.json") << cfg.dump();
    auto m = Model::load(dir.str());
    std::vector<SequenceCache> caches{m->new_cache(), m->new_cache()};
    SeqBatch sb;
    sb.cu_seqlens = b.cu_seqlens;
    sb.caches = {&caches[0], &caches[1]};
    Tensor li = m->forward(b.ids, sb, true);
    ASSERT_EQ(li.numel(), int64_t(lt.size()));
    double err = 0, mx = 0;
    for (int64_t i = 0; i < li.numel(); ++i) {
      err = std::max(err, std::fabs(double(li.f32()[i]) - double(lt[size_t(i)])));
      mx = std::max(mx, std::fabs(double(lt[size_t(i)])));
    }
    EXPECT_LT(err / mx, 1e-5) << pattern;
  }
}

// linear_allow_neg_eigval reaches both delta-rule layers: the same weights give other logits
// (LogitsMatchInferenceModel then holds the inference model to the same beta).
TEST(TrainModel, NegativeEigenvaluesChangeTheDeltaLayers) {
  for (const std::string pattern : {"K", "G"}) {
    const ModelSpec plain = spec_of(tiny_hybrid_config(pattern)),
                    neg = spec_of(tiny_hybrid_config(pattern, true, 0, true));
    EXPECT_EQ(plain.beta_max, 1.0f);
    EXPECT_EQ(neg.beta_max, 2.0f);
    const auto w = random_weights(plain, 4);
    const Batch b = tiny_batch(plain.vocab, {9}, 2);
    const std::vector<float> lp = make_train<float>(plain, w)->logits(b), ln = make_train<float>(neg, w)->logits(b);
    double diff = 0;
    for (size_t i = 0; i < lp.size(); ++i) diff = std::max(diff, std::fabs(double(lp[i]) - double(ln[i])));
    EXPECT_GT(diff, 1e-3) << pattern;
  }
}

// Central differences in double: for each parameter tensor, up to `per_tensor` coordinates.
void check_gradients(const std::string& pattern, bool tie, bool dense, int64_t attn_conv = 0, bool neg_eigval = false) {
  const ModelSpec s = spec_of(tiny_hybrid_config(pattern, tie, attn_conv, neg_eigval));
  auto w = random_weights(s, 11);
  auto m = make_train<double>(s, w);
  m->set_dense_attention(dense);
  const Batch b = tiny_batch(s.vocab, {9, 6}, 17);
  const double norm = double(b.labelled()), inorm = 7.0;
  m->zero_grad();
  m->forward_backward(b, norm, inorm);
  std::map<std::string, std::vector<double>> grads;  // the calls below accumulate into g again
  for (Param<double>* p : m->params()) grads[p->name] = p->g;
  std::vector<int64_t> labels;
  for (int64_t l : b.labels)
    if (l >= 0) labels.push_back(l);
  std::mt19937 rng(5);
  const double h = 1e-6;
  for (Param<double>* p : m->params()) {
    const bool indexer = p->name.find("indexer.") != std::string::npos;
    auto loss = [&] {
      if (indexer) return m->forward_backward(b, norm, inorm).index_sum / inorm;
      const std::vector<double> z = m->logits(b);
      double ce = 0;
      for (size_t r = 0; r < labels.size(); ++r) {
        const double* row = z.data() + r * size_t(s.vocab);
        const double mx = *std::max_element(row, row + s.vocab);
        double sum = 0;
        for (int64_t v = 0; v < s.vocab; ++v) sum += std::exp(row[v] - mx);
        ce += std::log(sum) + mx - row[labels[r]];
      }
      return ce / norm;
    };
    const std::vector<double>& grad = grads[p->name];
    for (int i = 0; i < 4; ++i) {
      const size_t at = rng() % p->w.size();
      const double w0 = p->w[at];
      p->w[at] = w0 + h;
      const double lp = loss();
      p->w[at] = w0 - h;
      const double lm = loss();
      p->w[at] = w0;
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(grad[at], fd, 1e-6 + 1e-4 * std::fabs(fd)) << pattern << " " << p->name << "[" << at << "]";
    }
  }
}

TEST(TrainGrad, KdaLayer) { check_gradients("K", true, false); }
TEST(TrainGrad, GdnLayer) { check_gradients("G", false, false); }
TEST(TrainGrad, LightningLayer) { check_gradients("L", true, false); }
TEST(TrainGrad, AttentionLayer) { check_gradients("A", true, false); }
TEST(TrainGrad, SlidingWindowLayer) { check_gradients("W", true, false); }
TEST(TrainGrad, SparseLayerAndIndexerKL) { check_gradients("S", true, false); }
TEST(TrainGrad, SparseLayerDenseWarmup) { check_gradients("S", true, true); }
TEST(TrainGrad, HybridStack) { check_gradients("KAGL", false, false); }
TEST(TrainGrad, AttentionLayersWithShortConv) { check_gradients("ASW", true, false, 3); }
TEST(TrainGrad, DeltaLayersWithNegativeEigenvalues) { check_gradients("KG", true, false, 0, true); }

// Prefill then token-by-token decode through the caches (recurrent states, KV, the sliding window's
// last rows, and the attention layers' conv state) gives the logits of one full forward.
TEST(TrainModel, HybridDecodeEqualsFullForward) {
  for (int64_t conv : {0, 3}) {
    const nlohmann::json cfg = tiny_hybrid_config("KGLAWS", true, conv);
    const ModelSpec s = spec_of(cfg);
    const auto w = random_weights(s, 21);
    TempDir dir;
    write_safetensors(dir / "model.safetensors", w);
    std::ofstream(dir / "config.json") << cfg.dump();
    auto m = Model::load(dir.str());
    const std::vector<int64_t> ids = tiny_batch(s.vocab, {12}, 9).ids;
    auto run = [&](SequenceCache& c, const std::vector<int64_t>& part) {
      SeqBatch sb;
      sb.cu_seqlens = {0, int64_t(part.size())};
      sb.caches = {&c};
      return m->forward(part, sb, true);
    };
    SequenceCache full = m->new_cache(), inc = m->new_cache();
    const Tensor ref = run(full, ids);
    std::vector<float> got;
    const Tensor pre = run(inc, std::vector<int64_t>(ids.begin(), ids.begin() + 5));
    got.assign(pre.f32(), pre.f32() + pre.numel());
    for (size_t t = 5; t < ids.size(); ++t) {
      const Tensor one = run(inc, {ids[t]});
      got.insert(got.end(), one.f32(), one.f32() + one.numel());
    }
    ASSERT_EQ(int64_t(got.size()), ref.numel());
    // the sliding-window layer (index 4, window 3) holds only the 2 rows the next token can see
    EXPECT_EQ(int64_t(inc.layers[4].k.size()), 2 * s.n_kv_heads * s.head_dim);
    EXPECT_EQ(int64_t(full.layers[4].v.size()), 2 * s.n_kv_heads * s.head_dim);
    double err = 0, mx = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      err = std::max(err, std::fabs(double(got[size_t(i)]) - ref.f32()[i]));
      mx = std::max(mx, std::fabs(double(ref.f32()[i])));
    }
    EXPECT_LT(err / mx, 1e-5) << "attention conv " << conv;
  }
}
