#include "backends/cpu/nn.h"

#include <cblas.h>

#include <algorithm>
#include <functional>

namespace hla::cpu {

void linear(const float* x, const float* W, float* y, int64_t M, int64_t K, int64_t N) {
  if (M == 0 || N == 0) return;
  if (M == 1)  // decode: a GEMV streams W once
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(N), int(K), 1.0f, W, int(K), x, 1, 0.0f, y, 1);
  else
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, x, int(K), W,
                int(K), 0.0f, y, int(N));
}

static float inv_rms(const float* x, int64_t dim, float eps) {
  float ss = 0;
  for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
  return 1.0f / std::sqrt(ss / float(dim) + eps);
}

void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps,
              bool zero_centered) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    const float s = inv_rms(xr, dim, eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * s * (zero_centered ? 1.0f + w[i] : w[i]);
  }
}

void gated_rms_norm(float* o, const float* gate, const float* w, int64_t rows, int64_t dim, float eps,
                    GateAct act) {
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = o + r * dim;
    const float* g = gate + r * dim;
    const float s = inv_rms(orow, dim, eps);
    for (int64_t i = 0; i < dim; ++i)
      orow[i] = orow[i] * s * w[i] * (act == GateAct::SiLU ? silu(g[i]) : sigmoid(g[i]));
  }
}

void causal_conv1d_silu(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C,
                        int64_t Kw) {
  const int64_t P = Kw - 1;  // taps that reach into the past
#pragma omp parallel for if (T * C > 65536)
  for (int64_t c = 0; c < C; ++c) {
    const float* wc = w + c * Kw;
    float* st = state + c * P;
    for (int64_t t = 0; t < T; ++t) {
      // window = [inputs t-P .. t]; those before this call come from the state
      float acc = 0;
      for (int64_t j = 0; j < Kw; ++j) {
        const int64_t src = t - P + j;
        acc += wc[j] * (src >= 0 ? x[src * C + c] : st[P + src]);
      }
      y[t * C + c] = silu(acc);
    }
    // new state = last P inputs of [state | x]
    for (int64_t j = 0; j < P; ++j) {
      const int64_t src = T - P + j;
      st[j] = src >= 0 ? x[src * C + c] : st[j + T];
    }
  }
}

std::vector<float> rope_inv_freq(double theta, int64_t rot) {
  std::vector<float> f(static_cast<size_t>(rot / 2));
  for (int64_t i = 0; i < rot / 2; ++i) {
    // HF: 1 / theta ** (arange(0, rot, 2, int64).float() / rot), in fp32
    const float expo = float(2 * i) / float(rot);
    f[size_t(i)] = 1.0f / std::pow(float(theta), expo);
  }
  return f;
}

void rope(float* x, int64_t heads, int64_t stride, const std::vector<float>& inv_freq, int64_t pos, RopePairs pairs,
          float attn_factor) {
  const int64_t half = int64_t(inv_freq.size());
  for (int64_t i = 0; i < half; ++i) {
    const float ang = float(pos) * inv_freq[size_t(i)];
    const float c = std::cos(ang) * attn_factor, s = std::sin(ang) * attn_factor;
    // dims (ia, ib) rotate together by frequency i
    const int64_t ia = pairs == RopePairs::HalfSplit ? i : 2 * i, ib = pairs == RopePairs::HalfSplit ? i + half : 2 * i + 1;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + h * stride;
      const float a = xh[ia], b = xh[ib];
      xh[ia] = a * c - b * s;
      xh[ib] = b * c + a * s;
    }
  }
}

void attention(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t S,
               int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
               const std::vector<std::vector<int32_t>>* selected) {
  if (selected || T < kAttentionBlock) return attention_plain(q, k, v, out, T, S, nh, nkv, dq, dv, scale, selected);
  // Blocks of kAttentionBlock queries of one head: scores = Q·K^T over the keys the block's last
  // query sees (one GEMM), causal mask and softmax per row, then out = P·V (one GEMM). OpenBLAS runs
  // single-threaded inside the parallel loop.
  const int64_t group = nh / nkv, blocks = (T + kAttentionBlock - 1) / kAttentionBlock;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(kAttentionBlock * S));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t i0 = blk * kAttentionBlock, B = std::min(kAttentionBlock, T - i0), kvh = h / group;
        const int64_t keys = S - T + i0 + B;  // the block's last query sees keys 0 .. keys−1
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(B), int(keys), int(dq), scale, q + (i0 * nh + h) * dq,
                    int(nh * dq), k + kvh * dq, int(nkv * dq), 0.0f, p.data(), int(keys));
        for (int64_t r = 0; r < B; ++r) {
          float* pr = p.data() + r * keys;
          const int64_t seen = S - T + i0 + r + 1;
          const float mx = *std::max_element(pr, pr + seen);
          float sum = 0;
          for (int64_t u = 0; u < seen; ++u) sum += (pr[u] = std::exp(pr[u] - mx));
          for (int64_t u = 0; u < seen; ++u) pr[u] /= sum;
          std::fill(pr + seen, pr + keys, 0.0f);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(B), int(dv), int(keys), 1.0f, p.data(), int(keys),
                    v + kvh * dv, int(nkv * dv), 0.0f, out + (i0 * nh + h) * dv, int(nh * dv));
      }
    }
  }
}

void attention_plain(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t S,
                     int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
                     const std::vector<std::vector<int32_t>>* selected) {
  const int64_t group = nh / nkv;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(S));
    std::vector<int32_t> keys(static_cast<size_t>(S));
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t pos = S - T + i, kvh = h / group;
        int64_t n = 0;
        if (selected) {
          for (int32_t u : (*selected)[size_t(i)])
            if (u <= pos) keys[size_t(n++)] = u;
        } else {
          for (int64_t u = 0; u <= pos; ++u) keys[size_t(n++)] = int32_t(u);
        }
        const float* qi = q + (i * nh + h) * dq;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const float* ku = k + (keys[size_t(j)] * nkv + kvh) * dq;
          float dot = 0;
          for (int64_t d = 0; d < dq; ++d) dot += qi[d] * ku[d];
          p[size_t(j)] = dot * scale;
          mx = std::max(mx, p[size_t(j)]);
        }
        float sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
        float* oi = out + (i * nh + h) * dv;
        std::fill(oi, oi + dv, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float* vu = v + (keys[size_t(j)] * nkv + kvh) * dv;
          const float pj = p[size_t(j)] / sum;
          for (int64_t d = 0; d < dv; ++d) oi[d] += pj * vu[d];
        }
      }
    }
  }
}

std::vector<std::vector<int32_t>> window_keys(int64_t n, int64_t past, int64_t window) {
  std::vector<std::vector<int32_t>> sel(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = past + t, first = std::max<int64_t>(0, pos - window + 1);
    sel[size_t(t)].resize(size_t(pos - first + 1));
    std::iota(sel[size_t(t)].begin(), sel[size_t(t)].end(), int32_t(first));
  }
  return sel;
}

std::vector<std::pair<int64_t, float>> moe_route(const float* logit, const float* bias, const MoeRouter& r) {
  const int64_t E = r.experts, k = r.top_k;
  std::vector<float> prob(static_cast<size_t>(E)), select(static_cast<size_t>(E));
  if (!r.sigmoid) {  // softmax over all experts, select on the probabilities
    const float mx = *std::max_element(logit, logit + E);
    float sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += prob[size_t(e)] = std::exp(logit[e] - mx);
    for (auto& p : prob) p /= sum;
    select = prob;
  } else {  // sigmoid scores; the correction bias steers selection only
    for (int64_t e = 0; e < E; ++e) {
      prob[size_t(e)] = sigmoid(logit[e]);
      select[size_t(e)] = prob[size_t(e)] + (bias ? bias[e] : 0.0f);
    }
    if (r.n_group > 1) {  // keep the topk_group groups with the best sum of their top-2 scores
      const int64_t G = r.n_group, per = E / G;
      std::vector<std::pair<float, int64_t>> gscore;
      for (int64_t g = 0; g < G; ++g) {
        std::vector<float> v(select.begin() + g * per, select.begin() + (g + 1) * per);
        std::partial_sort(v.begin(), v.begin() + std::min<int64_t>(2, per), v.end(), std::greater<float>());
        gscore.emplace_back(v[0] + (per > 1 ? v[1] : 0.0f), g);
      }
      std::stable_sort(gscore.begin(), gscore.end(), [](auto& a, auto& b) { return a.first > b.first; });
      for (size_t i = size_t(r.topk_group); i < gscore.size(); ++i)
        for (int64_t e = gscore[i].second * per; e < (gscore[i].second + 1) * per; ++e) select[size_t(e)] = -INFINITY;
    }
  }
  std::vector<int64_t> idx(static_cast<size_t>(E));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
    return select[size_t(a)] != select[size_t(b)] ? select[size_t(a)] > select[size_t(b)] : a < b;
  });
  float sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += prob[size_t(idx[size_t(i)])];
  std::vector<std::pair<int64_t, float>> picks;
  for (int64_t i = 0; i < k; ++i) {
    float w = prob[size_t(idx[size_t(i)])];
    if (r.norm_topk) w /= r.sigmoid ? sum + 1e-20f : sum;
    picks.emplace_back(idx[size_t(i)], w * r.routed_scale);
  }
  return picks;
}

}  // namespace hla::cpu
