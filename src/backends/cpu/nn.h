// CPU building blocks of the models, on contiguous f32 rows. Shapes are given as [rows, dim];
// "packed" activations hold the tokens of all sequences of a batch along one axis.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

namespace hla::cpu {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x * sigmoid(x); }
// The greedy pick: the index of the largest of x[0..n), the lowest among ties (as torch.argmax).
inline int64_t argmax(const float* x, int64_t n) { return int64_t(std::max_element(x, x + n) - x); }

// y[M,N] = x[M,K] · W[N,K]^T — every Linear of these models (none has a bias). OpenBLAS.
void linear(const float* x, const float* W, float* y, int64_t M, int64_t K, int64_t N);

// RMSNorm over the last dim: y = x / sqrt(mean(x²) + eps) · (w or 1 + w).
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps,
              bool zero_centered);
// In place: o = rms(o) · w · act(gate), act = SiLU (Qwen GDN) or sigmoid (Kimi KDA).
enum class GateAct { SiLU, Sigmoid };
void gated_rms_norm(float* o, const float* gate, const float* w, int64_t rows, int64_t dim, float eps,
                    GateAct act);
// Mean and 1/sqrt(biased variance + eps) of one row of `dim` (LayerNorm forward and backward).
template <class T>
void layer_norm_stats(const T* xr, int64_t dim, T eps, T& mean, T& inv_std) {
  mean = 0;
  T var = 0;
  for (int64_t i = 0; i < dim; ++i) mean += xr[i];
  mean /= T(dim);
  for (int64_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
  inv_std = T(1) / std::sqrt(var / T(dim) + eps);
}
// LayerNorm with bias (biased variance), DeepSeek's indexer key norm.
template <class T>
void layer_norm(const T* x, const T* w, const T* b, T* y, int64_t rows, int64_t dim, T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T mean, s;
    layer_norm_stats(xr, dim, eps, mean, s);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = (xr[i] - mean) * s * w[i] + b[i];
  }
}

// Depthwise causal conv1d + SiLU over one sequence, channel-last x[T,C], weight [C,Kw] (tap Kw-1 is
// the current token). `state` [C,Kw-1] holds the previous Kw-1 inputs (zeros at the start) and is
// advanced to the last Kw-1 inputs.
void causal_conv1d_silu(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C,
                        int64_t Kw);

// RoPE inverse frequencies inv_freq[i] = 1/theta^(2i/rot), i < rot/2 (fp32, as HF).
std::vector<float> rope_inv_freq(double theta, int64_t rot);
// Rotates the first `rot` dims of each of `heads` vectors (row stride `stride`) at position `pos`,
// cos/sin scaled by attn_factor (yarn). Half-split pairs dims (i, i+rot/2) (Qwen, the DeepSeek
// indexer); interleaved pairs (2i, 2i+1) (DeepSeek MLA).
enum class RopePairs { HalfSplit, Interleaved };
void rope(float* x, int64_t heads, int64_t stride, const std::vector<float>& inv_freq, int64_t pos, RopePairs pairs,
          float attn_factor = 1.0f);

// Causal softmax attention of one sequence. q [T,nh,dq] are the newest T positions of a sequence
// whose keys k [S,nkv,dq] and values v [S,nkv,dv] are all cached (query i sits at S−T+i).
// GQA: head h reads kv head h / (nh/nkv). out [T,nh,dv]. When `selected` is given, query i attends
// only to the keys selected[i] (DeepSeek sparse attention; always causal).
// Dense prefill (T >= kAttentionBlock, no selection) runs blocked through GEMMs; the rest, and the
// tests' reference, is attention_plain (one (query, head) pair at a time).
void attention(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t S,
               int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
               const std::vector<std::vector<int32_t>>* selected = nullptr);
void attention_plain(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t S,
                     int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
                     const std::vector<std::vector<int32_t>>* selected = nullptr);
constexpr int64_t kAttentionBlock = 32;

// Keys of n new queries at positions past..past+n−1 under a sliding window: query at pos sees
// max(0, pos−window+1) .. pos.
std::vector<std::vector<int32_t>> window_keys(int64_t n, int64_t past, int64_t window);

// DSA lightning-indexer (DeepSeek-V3.2, hla_hybrid sparse layers) score of one query against S keys [S, ID]:
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

// MoE routing of one token. Softmax routers (Qwen): probabilities over all experts, the top_k
// picked on them. Sigmoid routers (Kimi, DeepSeek): sigmoid scores; the selection adds a
// correction bias, and with n_group > 1 keeps only the topk_group groups (experts/n_group each)
// whose two best biased scores sum highest. Ties go to the lower index. Weights are the picks'
// probabilities, over their sum when norm_topk (+1e-20 for sigmoid), times routed_scale.
struct MoeRouter {
  int64_t experts = 0, top_k = 0;
  bool sigmoid = false;
  int64_t n_group = 1, topk_group = 1;
  bool norm_topk = true;
  float routed_scale = 1.0f;
};
// The top_k (expert, weight) picks of logit [experts], in pick order; bias [experts] or null.
std::vector<std::pair<int64_t, float>> moe_route(const float* logit, const float* bias, const MoeRouter& r);

}  // namespace hla::cpu
