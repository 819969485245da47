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

// The device form of a DSA selection for sequence i of b: appends its n new index keys ik [n, ID] to
// the slot's IndexK rows of `layer` and picks topk keys for its queries iq [n, IH·ID] with weights
// w [n, IH]; selected [n, topk] in scratch. Shared by hla_hybrid's sparse attention and
// DeepSeek-V3.2's sparse MLA, which differ only in how they project iq, ik and w.
const int32_t* dsa_select_device(Device& dev, const DevBatch& b, int64_t i, int64_t layer, const float* iq,
                                 const float* w, const float* ik, int64_t IH, int64_t ID, int64_t topk);

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
