#include "model/hybrid_layers.h"

#include <cstring>

#include "backends/cpu/nn.h"

namespace hla {

using namespace hla::cpu;

std::vector<double> lightning_log_decay(int64_t heads) {
  std::vector<double> g(static_cast<size_t>(heads));
  for (int64_t h = 0; h < heads; ++h) g[size_t(h)] = -std::pow(2.0, -8.0 * double(h + 1) / double(heads));
  return g;
}

void DsaIndexer::bind(Params& p, const std::string& pre, const ModelSpec& s) {
  D = s.hidden, IH = s.index_heads, ID = s.index_dim, topk = s.index_topk;
  p.bind(pre + "indexer.wq.weight", {IH * ID, D}, &wq);
  p.bind(pre + "indexer.wk.weight", {ID, D}, &wk);
  p.bind(pre + "indexer.k_norm.weight", {ID}, &k_norm_w, Init::Ones);
  p.bind(pre + "indexer.k_norm.bias", {ID}, &k_norm_b, Init::Zeros);
  p.bind(pre + "indexer.weights_proj.weight", {IH, D}, &w_proj);
}

std::vector<std::vector<int32_t>> DsaIndexer::select(const float* x, int64_t n, int64_t past,
                                                     std::vector<float>& index_k) const {
  std::vector<float> iq(size_t(n * IH * ID)), ik(size_t(n * ID)), w(size_t(n * IH));
  linear(x, wq.f32(), iq.data(), n, D, IH * ID);
  linear(x, wk.f32(), ik.data(), n, D, ID);
  layer_norm(ik.data(), k_norm_w.f32(), k_norm_b.f32(), ik.data(), n, ID, 1e-6f);
  linear(x, w_proj.f32(), w.data(), n, D, IH);
  index_k.insert(index_k.end(), ik.begin(), ik.end());
  if (past + n <= topk) return {};
  std::vector<std::vector<int32_t>> sel(static_cast<size_t>(n));
#pragma omp parallel for schedule(dynamic)
  for (int64_t t = 0; t < n; ++t) {
    const int64_t S = past + t + 1;
    std::vector<float> score(static_cast<size_t>(S));
    dsa_scores(iq.data() + t * IH * ID, w.data() + t * IH, index_k.data(), S, IH, ID, score.data());
    sel[size_t(t)] = dsa_topk(score.data(), S, topk);
  }
  return sel;
}

void DsaIndexer::bind_device(Device& dev) {
  proj_d = dev.upload_matrix(stack_rows({{&wq, 0, IH * ID}, {&wk, 0, ID}, {&w_proj, 0, IH}}));
  k_norm_w_d = dev.upload_vector(k_norm_w);
  k_norm_b_d = dev.upload_vector(k_norm_b);
}

const int32_t* DsaIndexer::select_device(Device& dev, const float* x, const DevBatch& b, int64_t i,
                                         int64_t layer) const {
  const int64_t n = b.len(i), t0 = b.cu_seqlens[size_t(i)], W = IH * ID + ID + IH;
  float* P = dev.scratch(n * W);
  dev.linear(x + t0 * D, D, proj_d, P, n);
  float* iq = dev.scratch(n * IH * ID);
  float* ik = dev.scratch(n * ID);
  float* w = dev.scratch(n * IH);
  dev.copy(iq, {IH * ID, 1, 0}, P, {W, 1, 0}, n, IH * ID, 1);
  dev.copy(ik, {ID, 1, 0}, P + IH * ID, {W, 1, 0}, n, ID, 1);
  dev.copy(w, {IH, 1, 0}, P + IH * ID + ID, {W, 1, 0}, n, IH, 1);
  dev.layer_norm(ik, k_norm_w_d, k_norm_b_d, ik, n, ID, 1e-6f);
  return dsa_select_device(dev, b, i, layer, iq, w, ik, IH, ID, topk);
}

const int32_t* dsa_select_device(Device& dev, const DevBatch& b, int64_t i, int64_t layer, const float* iq,
                                 const float* w, const float* ik, int64_t IH, int64_t ID, int64_t topk) {
  const int64_t n = b.len(i), past = b.past[size_t(i)];
  float* keys = dev.cache_rows(layer, CachePart::IndexK, b.slots[size_t(i)], past + n, ID);
  dev.copy(keys + past * ID, {ID, 1, 0}, ik, {ID, 1, 0}, n, ID, 1);
  int32_t* sel = dev.scratch_i32(n * topk);
  dev.dsa_select(iq, w, keys, n, past + n, IH, ID, topk, sel);
  return sel;
}

namespace {

// See hybrid_layers.h. Weights: q/k/v/g_proj [H·dk, D], o_norm [dk], o_proj [D, H·dk]; the
// cache's `state` holds S [H, dk, dk].
class Lightning : public Mixer {
 public:
  Lightning(const ModelSpec& s, Params& p, const std::string& pre) : s_(s) {
    const int64_t D = s.hidden, HK = s.lin_nv * s.lin_dk;
    p.bind(pre + "q_proj.weight", {HK, D}, &q_);
    p.bind(pre + "k_proj.weight", {HK, D}, &k_);
    p.bind(pre + "v_proj.weight", {HK, D}, &v_);
    p.bind(pre + "g_proj.weight", {HK, D}, &g_);
    p.bind(pre + "o_norm.weight", {s.lin_dk}, &o_norm_, Init::OutNorm);
    p.bind(pre + "o_proj.weight", {D, HK}, &o_);
    for (double g : lightning_log_decay(s.lin_nv)) decay_.push_back(float(std::exp(g)));
  }

  void init_cache(LayerCache& c) const override { c.state.assign(size_t(s_.lin_nv * s_.lin_dk * s_.lin_dk), 0.0f); }

  void forward(const float* x, float* out, const SeqBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), D = s_.hidden, H = s_.lin_nv, dk = s_.lin_dk, HK = H * dk;
    std::vector<float> q(size_t(T * HK)), k(size_t(T * HK)), v(size_t(T * HK)), gate(size_t(T * HK)), o(size_t(T * HK));
    linear(x, q_.f32(), q.data(), T, D, HK);
    linear(x, k_.f32(), k.data(), T, D, HK);
    linear(x, v_.f32(), v.data(), T, D, HK);
    linear(x, g_.f32(), gate.data(), T, D, HK);
    for (int64_t j = 0; j < T * HK; ++j) q[size_t(j)] = silu(q[size_t(j)]), k[size_t(j)] = silu(k[size_t(j)]), v[size_t(j)] = silu(v[size_t(j)]);
    const float scale = 1.0f / std::sqrt(float(dk));
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      float* state = b.caches[size_t(i)]->layers[size_t(layer)].state.data();
#pragma omp parallel for if (b.len(i) * H > 64)
      for (int64_t h = 0; h < H; ++h) {
        float* S = state + h * dk * dk;  // [dk (key), dk (value)]
        for (int64_t t = b.cu_seqlens[size_t(i)]; t < b.cu_seqlens[size_t(i + 1)]; ++t) {
          const float* kt = k.data() + t * HK + h * dk;
          const float* vt = v.data() + t * HK + h * dk;
          const float* qt = q.data() + t * HK + h * dk;
          float* ot = o.data() + t * HK + h * dk;
          std::fill(ot, ot + dk, 0.0f);
          for (int64_t a = 0; a < dk; ++a) {
            float* row = S + a * dk;
            for (int64_t c = 0; c < dk; ++c) {
              row[c] = decay_[size_t(h)] * row[c] + kt[a] * vt[c];
              ot[c] += row[c] * qt[a] * scale;
            }
          }
        }
      }
    }
    gated_rms_norm(o.data(), gate.data(), o_norm_.f32(), T * H, dk, s_.norm_eps, GateAct::Sigmoid);
    linear(o.data(), o_.f32(), out, T, HK, D);
  }

 private:
  const ModelSpec& s_;
  std::vector<float> decay_;
  Tensor q_, k_, v_, g_, o_norm_, o_;
};

}  // namespace

std::unique_ptr<Mixer> make_lightning(const ModelSpec& s, Params& p, const std::string& pre) {
  return std::make_unique<Lightning>(s, p, pre);
}

}  // namespace hla
