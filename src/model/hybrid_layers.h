// Pieces of the hla_hybrid architecture that the existing layers do not have: the lightning mixer
// (decay-only linear attention), the key selections of sliding-window and DSA-sparse attention
// (used by GatedAttention), and the scoring both the inference and the training path call, so the
// two pick the same keys.
#pragma once
#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "model/layers.h"

namespace hla {

// Lightning attention (MiniMax-01): per value head h a constant log-decay −slope_h with the ALiBi
// slopes slope_h = 2^(−8(h+1)/H); no delta rule, no learned gate:
//   S_t = exp(−slope_h)·S_{t−1} + k_t v_t^T,   o_t = S_t^T (dk^-0.5 · q_t),   q,k,v = SiLU(proj x)
// then a per-head RMSNorm with a sigmoid output gate and o_proj.
std::vector<double> lightning_log_decay(int64_t heads);
std::unique_ptr<Mixer> make_lightning(const ModelSpec& s, Params& p, const std::string& pre);

// Keys of n new queries at positions past..past+n−1 under a sliding window: query at pos sees
// max(0, pos−window+1) .. pos.
std::vector<std::vector<int32_t>> window_keys(int64_t n, int64_t past, int64_t window);

// DSA lightning-indexer score of one query against S keys [S, ID]:
//   score[u] = Σ_h w[h]·IH^-0.5 · ReLU(q_h · k_u · ID^-0.5),   q [IH, ID], w [IH].
template <class T>
void dsa_scores(const T* q, const T* w, const T* keys, int64_t S, int64_t IH, int64_t ID, T* score) {
  const T wscale = T(1) / std::sqrt(T(IH)), sscale = T(1) / std::sqrt(T(ID));
  for (int64_t u = 0; u < S; ++u) {
    const T* ku = keys + u * ID;
    T acc = 0;
    for (int64_t h = 0; h < IH; ++h) {
      const T* qh = q + h * ID;
      T dot = 0;
      for (int64_t d = 0; d < ID; ++d) dot += qh[d] * ku[d];
      acc += w[h] * wscale * std::max(dot * sscale, T(0));
    }
    score[u] = acc;
  }
}

// The `topk` best of score[0..n) in ascending index order (the lower index wins a tie).
template <class T>
std::vector<int32_t> dsa_topk(const T* score, int64_t n, int64_t topk) {
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  if (n <= topk) return idx;
  std::partial_sort(idx.begin(), idx.begin() + topk, idx.end(), [&](int32_t a, int32_t c) {
    return score[a] != score[c] ? score[a] > score[c] : a < c;
  });
  idx.resize(size_t(topk));
  std::sort(idx.begin(), idx.end());
  return idx;
}

// The DSA indexer of an hla_hybrid sparse-attention layer (`self_attn.indexer.*`). Unlike
// DeepSeek's it reads x directly (no q latent) and uses no RoPE: index q [IH·ID] = wq·x,
// index k [ID] = LayerNorm(wk·x), weights [IH] = weights_proj·x.
struct DsaIndexer {
  Tensor wq, wk, k_norm_w, k_norm_b, w_proj;
  int64_t D = 0, IH = 0, ID = 0, topk = 0;
  void bind(Params& p, const std::string& pre, const ModelSpec& s);
  // Keys per new query (x [n, D] at positions past..), appending the new index keys to index_k;
  // {} when every query can see all its causal keys.
  std::vector<std::vector<int32_t>> select(const float* x, int64_t n, int64_t past, std::vector<float>& index_k) const;
  // The same for sequence i of b on a device (x [T, D] all tokens of b): selected [n, topk] in
  // scratch; the new index keys go to the slot's IndexK rows of `layer`.
  DevMatrix proj_d;  // [wq; wk; weights_proj]
  const float *k_norm_w_d = nullptr, *k_norm_b_d = nullptr;
  void bind_device(Device& dev);
  const int32_t* select_device(Device& dev, const float* x, const DevBatch& b, int64_t i, int64_t layer) const;
};

}  // namespace hla
