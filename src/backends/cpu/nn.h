// CPU building blocks of the models, on contiguous f32 rows. Shapes are given as [rows, dim];
// "packed" activations hold the tokens of all sequences of a batch along one axis.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

namespace hla::cpu {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x * sigmoid(x); }

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
void attention(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t S,
               int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
               const std::vector<std::vector<int32_t>>* selected = nullptr);

}  // namespace hla::cpu
