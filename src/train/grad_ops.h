// Forward and backward of the building blocks of a trainable hla_hybrid model, in float (training)
// and double (finite-difference checks). Rows are packed tokens; shapes are [rows, dim]. Every
// backward *accumulates* into parameter gradients (dW, dw, db) and, unless said otherwise,
// *overwrites* the input gradient.
#pragma once
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "backends/cpu/nn.h"

namespace hla::train {

template <class T>
using Vec = std::vector<T>;

template <class T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <class T>
inline T silu(T x) { return x * sigmoid(x); }
template <class T>
inline T dsilu(T x) {  // d silu / dx
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// General matrix multiply on row-major operands: C[M,N] = alpha·op(A)·op(B) + beta·C.
template <class T>
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, const T* B, T* C, T beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M * N; ++i) C[i] *= beta;
    return;
  }
  const auto TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
  const int lda = int(ta ? M : K), ldb = int(tb ? K : N);
  if constexpr (sizeof(T) == 4)
    cblas_sgemm(CblasRowMajor, TA, TB, int(M), int(N), int(K), 1.0f, A, lda, B, ldb, beta, C, int(N));
  else
    cblas_dgemm(CblasRowMajor, TA, TB, int(M), int(N), int(K), 1.0, A, lda, B, ldb, beta, C, int(N));
}

// y[M,N] = x[M,K]·W[N,K]^T
template <class T>
inline void linear_fwd(const T* x, const T* W, T* y, int64_t M, int64_t K, int64_t N) {
  gemm<T>(false, true, M, N, K, x, W, y, T(0));
}
// dW += dy^T·x; dx (= or +=, as accumulate says) dy·W. dx may be nullptr (input not trained).
template <class T>
inline void linear_bwd(const T* x, const T* W, const T* dy, T* dx, T* dW, int64_t M, int64_t K, int64_t N,
                       bool accumulate = false) {
  gemm<T>(true, false, N, K, M, dy, x, dW, T(1));
  if (dx) gemm<T>(false, false, M, K, N, dy, W, dx, accumulate ? T(1) : T(0));
}

// RMSNorm y = x·r·w', r = (mean x² + eps)^-½, w' = 1+w (zero-centred, Qwen) or w.
template <class T>
inline void rms_fwd(const T* x, const T* w, T* y, int64_t rows, int64_t dim, T eps, bool zc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const T s = T(1) / std::sqrt(ss / T(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = xr[i] * s * (zc ? T(1) + w[i] : w[i]);
  }
}
template <class T>
inline void rms_bwd(const T* x, const T* w, const T* dy, T* dx, T* dw, int64_t rows, int64_t dim, T eps, bool zc) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* g = dy + r * dim;
    T ss = 0, dot = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const T s = T(1) / std::sqrt(ss / T(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      const T wi = zc ? T(1) + w[i] : w[i];
      dw[i] += g[i] * xr[i] * s;
      dot += g[i] * wi * xr[i];
    }
    for (int64_t i = 0; i < dim; ++i) {
      const T wi = zc ? T(1) + w[i] : w[i];
      dx[r * dim + i] = s * g[i] * wi - xr[i] * s * s * s * dot / T(dim);
    }
  }
}

// Gated RMSNorm of the linear mixers' output: y = rms(o)·w ⊙ act(z), act = SiLU or sigmoid.
template <class T>
inline void gated_rms_fwd(const T* o, const T* z, const T* w, T* y, int64_t rows, int64_t dim, T eps, bool silu_act) {
  rms_fwd(o, w, y, rows, dim, eps, false);
  for (int64_t i = 0; i < rows * dim; ++i) y[i] *= silu_act ? silu(z[i]) : sigmoid(z[i]);
}
template <class T>
inline void gated_rms_bwd(const T* o, const T* z, const T* w, const T* dy, T* do_, T* dz, T* dw, int64_t rows,
                          int64_t dim, T eps, bool silu_act) {
  Vec<T> n(size_t(rows * dim)), dn(size_t(rows * dim));
  rms_fwd(o, w, n.data(), rows, dim, eps, false);
  for (int64_t i = 0; i < rows * dim; ++i) {
    const T a = silu_act ? silu(z[i]) : sigmoid(z[i]);
    const T da = silu_act ? dsilu(z[i]) : a * (T(1) - a);
    dn[size_t(i)] = dy[i] * a;
    dz[i] = dy[i] * n[size_t(i)] * da;
  }
  rms_bwd(o, w, dn.data(), do_, dw, rows, dim, eps, false);
}

// LayerNorm with bias (biased variance), the DSA indexer's key norm; the forward is cpu::layer_norm.
template <class T>
inline void layer_norm_bwd(const T* x, const T* w, const T* dy, T* dx, T* dw, T* db, int64_t rows, int64_t dim, T eps) {
  Vec<T> xh(static_cast<size_t>(dim)), g(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    T mean, s;
    cpu::layer_norm_stats(xr, dim, eps, mean, s);
    T mg = 0, mgx = 0;
    for (int64_t i = 0; i < dim; ++i) {
      xh[size_t(i)] = (xr[i] - mean) * s;
      g[size_t(i)] = dyr[i] * w[i];
      dw[i] += dyr[i] * xh[size_t(i)];
      db[i] += dyr[i];
      mg += g[size_t(i)];
      mgx += g[size_t(i)] * xh[size_t(i)];
    }
    mg /= T(dim), mgx /= T(dim);
    if (dx)
      for (int64_t i = 0; i < dim; ++i) dx[r * dim + i] = s * (g[size_t(i)] - mg - xh[size_t(i)] * mgx);
  }
}

// Depthwise causal conv + SiLU over the packed sequences (cu [N+1]), x [T,C], w [C,Kw] (tap Kw−1 is
// the current token), zero history at each sequence start. pre [T,C] keeps the pre-activation.
// Both passes walk blocks of kConvBlock channels row by row, so every access is contiguous within
// a row and a block owns its dw rows (no reduction across threads).
constexpr int64_t kConvBlock = 64;
template <class T>
inline void conv_fwd(const T* x, const T* w, T* pre, T* y, const std::vector<int64_t>& cu, int64_t C, int64_t Kw) {
  const int64_t N = int64_t(cu.size()) - 1;
#pragma omp parallel for collapse(2) if (C * cu.back() > 32768)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c0 = 0; c0 < C; c0 += kConvBlock)
      for (int64_t t = cu[size_t(n)]; t < cu[size_t(n + 1)]; ++t)
        for (int64_t c = c0; c < std::min(C, c0 + kConvBlock); ++c) {
          T acc = 0;
          for (int64_t j = 0; j < Kw; ++j) {
            const int64_t src = t - (Kw - 1) + j;
            if (src >= cu[size_t(n)]) acc += w[c * Kw + j] * x[src * C + c];
          }
          pre[t * C + c] = acc;
          y[t * C + c] = silu(acc);
        }
}
// dx overwritten, dw accumulated.
template <class T>
inline void conv_bwd(const T* x, const T* w, const T* pre, const T* dy, T* dx, T* dw, const std::vector<int64_t>& cu,
                     int64_t C, int64_t Kw) {
  const int64_t N = int64_t(cu.size()) - 1, rows = cu.back();
  std::vector<T> dp(static_cast<size_t>(rows * C));  // the gradient at each pre-activation
#pragma omp parallel for if (rows * C > 32768)
  for (int64_t i = 0; i < rows * C; ++i) dp[size_t(i)] = dy[i] * dsilu(pre[i]);
#pragma omp parallel for if (C * rows > 32768)
  for (int64_t c0 = 0; c0 < C; c0 += kConvBlock)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = cu[size_t(n)]; t < cu[size_t(n + 1)]; ++t)
        for (int64_t c = c0; c < std::min(C, c0 + kConvBlock); ++c) {
          // dx[t] collects the taps of the outputs t..t+Kw−1 that read it
          T acc = 0;
          for (int64_t j = 0; j < Kw; ++j) {
            const int64_t dst = t + (Kw - 1) - j;
            if (dst < cu[size_t(n + 1)]) acc += w[c * Kw + j] * dp[size_t(dst * C + c)];
          }
          dx[t * C + c] = acc;
          for (int64_t j = 0; j < Kw; ++j) {
            const int64_t src = t - (Kw - 1) + j;
            if (src >= cu[size_t(n)]) dw[c * Kw + j] += dp[size_t(t * C + c)] * x[src * C + c];
          }
        }
}

// Half-split RoPE of the first `rot` dims of `heads` vectors of width hd at position pos; inverse
// rotates back (the backward of a rotation is its transpose).
template <class T>
inline void rope(T* x, int64_t heads, int64_t hd, const std::vector<float>& inv_freq, int64_t pos, bool inverse) {
  const int64_t half = int64_t(inv_freq.size());
  for (int64_t i = 0; i < half; ++i) {
    // the angle in fp32 like the inference path, so the two agree to round-off
    const float ang = float(pos) * inv_freq[size_t(i)];
    const T c = T(std::cos(ang)), s = inverse ? -T(std::sin(ang)) : T(std::sin(ang));
    for (int64_t h = 0; h < heads; ++h) {
      T* xh = x + h * hd;
      const T a = xh[i], b = xh[i + half];
      xh[i] = a * c - b * s;
      xh[i + half] = b * c + a * s;
    }
  }
}

}  // namespace hla::train
