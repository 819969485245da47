// Delta rule: shape checks, the token-by-token reference (forward and reverse-time backward), the
// mode dispatchers and the layer-side activations. The chunkwise form is in
// backends/cpu/delta_rule_chunk.cpp.
#include "ops/delta_rule.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"

namespace hla {

void DeltaRuleDims::validate() const {
  check(H > 0 && HV > 0 && K > 0 && V > 0, "delta rule: H, HV, K, V must be positive");
  check(HV % H == 0, "delta rule: value heads HV=" + std::to_string(HV) +
                         " must be a multiple of q/k heads H=" + std::to_string(H));
  check(cu_seqlens.size() >= 2 && cu_seqlens[0] == 0, "delta rule: cu_seqlens must start at 0 and name >= 1 sequence");
  for (size_t i = 1; i < cu_seqlens.size(); ++i)
    check(cu_seqlens[i] >= cu_seqlens[i - 1], "delta rule: cu_seqlens must be non-decreasing");
}

namespace {

template <class T>
std::vector<T> buf(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n));
}

// The pointers of one token of one (sequence, value head) stream.
template <class T>
struct TokenRef {
  const T *q, *k, *v, *g;
  T beta;
};

template <class T>
TokenRef<T> token(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g, const T* beta, int64_t t,
                  int64_t j) {
  const int64_t h = j / (d.HV / d.H);
  return {q + (t * d.H + h) * d.K, k + (t * d.H + h) * d.K, v + (t * d.HV + j) * d.V,
          g + t * d.g_stride() + j * d.g_width(), beta[t * d.HV + j]};
}

// S = decay(g) · S, row a scaled by exp(g[a]) (KDA) or all by exp(g[0]) (GDN). S is [K,V].
template <class T>
void decay_rows(T* S, const T* g, int64_t K, int64_t V, bool per_key) {
  for (int64_t a = 0; a < K; ++a) {
    const T f = std::exp(per_key ? g[a] : g[0]);
    for (int64_t c = 0; c < V; ++c) S[a * V + c] *= f;
  }
}

// One token of the recurrence on S [K,V] (decay, delta update); writes u = beta (v − S'^T k) [V]
// and, when o is given, o = S^T (scale q) [V]. Two passes over S: decay fused with S'^T k, then
// the update fused with the output (this is the decode path).
template <class T>
void recurrent_step(const DeltaRuleDims& d, const TokenRef<T>& x, T scale, T* S, T* u, T* o) {
  const int64_t K = d.K, V = d.V;
  const bool per_key = d.gate == DeltaGate::PerKey;
  const T decay = std::exp(x.g[0]);
  std::fill(u, u + V, T(0));
  for (int64_t a = 0; a < K; ++a) {
    const T f = per_key ? std::exp(x.g[a]) : decay;
    for (int64_t c = 0; c < V; ++c) {
      S[a * V + c] *= f;
      u[c] += S[a * V + c] * x.k[a];
    }
  }
  for (int64_t c = 0; c < V; ++c) u[c] = x.beta * (x.v[c] - u[c]);
  if (o) std::fill(o, o + V, T(0));
  for (int64_t a = 0; a < K; ++a) {
    const T qa = scale * x.q[a];
    for (int64_t c = 0; c < V; ++c) {
      S[a * V + c] += x.k[a] * u[c];
      if (o) o[c] += S[a * V + c] * qa;
    }
  }
}

}  // namespace

template <class T>
void delta_rule_recurrent(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                          const T* beta, T scale, T* state, T* o) {
  d.validate();
  const int64_t HV = d.HV, N = d.num_seqs(), KV = d.K * d.V;
  // Decode runs one token for many heads: parallel over (sequence, value head) once there is
  // enough work to pay for the threads.
  const bool par = d.tokens() * HV * KV >= (int64_t(1) << 16);
#pragma omp parallel for schedule(dynamic) if (par)
  for (int64_t nj = 0; nj < N * HV; ++nj) {
    const int64_t n = nj / HV, j = nj % HV;
    std::vector<T> u(buf<T>(d.V));
    for (int64_t t = d.cu_seqlens[n]; t < d.cu_seqlens[n + 1]; ++t)
      recurrent_step(d, token(d, q, k, v, g, beta, t, j), scale, state + nj * KV, u.data(),
                     o + (t * HV + j) * d.V);
  }
}

// Reverse-time backward, per (sequence, value head). For one token, with S' = decay·S_{t−1},
// kv = S'^T k, u = beta (v − kv), S_t = S' + k u^T, o = S_t^T (s q), and dS = dL/dS_t:
//   dq = s S_t do;  dS += s q do^T;  dk = dS u;  du = dS^T k;  dbeta = du·(v − kv);  dv = beta du;
//   dkv = −beta du;  dS' = dS + k dkv^T;  dk += S' dkv;  dg = Σ dS' ⊙ S' (per row for KDA);
//   dS_{t−1} = decay · dS'.
// States are recomputed per 64-token segment from checkpoints, so memory is O((T/64 + 64)·K·V).
template <class T>
void delta_rule_backward_recurrent(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                                   const T* beta, T scale, const T* h0, const T* dout, const T* dht, T* dq,
                                   T* dk, T* dv, T* dg, T* dbeta, T* dh0) {
  d.validate();
  const int64_t H = d.H, HV = d.HV, K = d.K, V = d.V, KV = K * V, group = HV / H, seg = 64;
  const bool per_key = d.gate == DeltaGate::PerKey;
  std::fill(dq, dq + d.tokens() * H * K, T(0));
  std::fill(dk, dk + d.tokens() * H * K, T(0));
  std::vector<T> S(buf<T>(KV)), dS(buf<T>(KV)), Sp(buf<T>(KV)), saved(buf<T>(seg * KV)), ckpt;
  std::vector<T> kv(buf<T>(V)), u(buf<T>(V)), du(buf<T>(V));
  for (int64_t n = 0; n < d.num_seqs(); ++n) {
    const int64_t t0 = d.cu_seqlens[n], t1 = d.cu_seqlens[n + 1], nseg = (t1 - t0 + seg - 1) / seg;
    for (int64_t j = 0; j < HV; ++j) {
      const int64_t h = j / group, nj = n * HV + j;
      // Forward sweep: the state entering each segment.
      ckpt.assign(size_t(nseg * KV), T(0));
      if (h0) std::copy(h0 + nj * KV, h0 + (nj + 1) * KV, S.begin());
      else std::fill(S.begin(), S.end(), T(0));
      for (int64_t s = 0; s < nseg; ++s) {
        std::copy(S.begin(), S.end(), ckpt.begin() + s * KV);
        for (int64_t t = t0 + s * seg; t < std::min(t1, t0 + (s + 1) * seg); ++t)
          recurrent_step(d, token(d, q, k, v, g, beta, t, j), scale, S.data(), u.data(), (T*)nullptr);
      }
      if (dht) std::copy(dht + nj * KV, dht + (nj + 1) * KV, dS.begin());
      else std::fill(dS.begin(), dS.end(), T(0));
      for (int64_t s = nseg - 1; s >= 0; --s) {
        const int64_t ts = t0 + s * seg, te = std::min(t1, ts + seg);
        std::copy(ckpt.begin() + s * KV, ckpt.begin() + (s + 1) * KV, S.begin());
        for (int64_t t = ts; t < te; ++t) {
          std::copy(S.begin(), S.end(), saved.begin() + (t - ts) * KV);
          recurrent_step(d, token(d, q, k, v, g, beta, t, j), scale, S.data(), u.data(), (T*)nullptr);
        }
        for (int64_t t = te - 1; t >= ts; --t) {
          const TokenRef<T> x = token(d, q, k, v, g, beta, t, j);
          const T* dot = dout + (t * HV + j) * V;
          T* dqt = dq + (t * H + h) * K;
          T* dkt = dk + (t * H + h) * K;
          // S' and kv, then u; S_t = S' + k u^T lives in S (reused as scratch per token).
          std::copy(saved.begin() + (t - ts) * KV, saved.begin() + (t - ts + 1) * KV, Sp.begin());
          decay_rows(Sp.data(), x.g, K, V, per_key);
          std::fill(kv.begin(), kv.end(), T(0));
          for (int64_t a = 0; a < K; ++a)
            for (int64_t c = 0; c < V; ++c) kv[size_t(c)] += Sp[size_t(a * V + c)] * x.k[a];
          for (int64_t c = 0; c < V; ++c) u[size_t(c)] = x.beta * (x.v[c] - kv[size_t(c)]);
          for (int64_t a = 0; a < K; ++a) {
            T acc = 0;
            for (int64_t c = 0; c < V; ++c) {
              const T st = Sp[size_t(a * V + c)] + x.k[a] * u[size_t(c)];
              acc += st * dot[c];
              dS[size_t(a * V + c)] += scale * x.q[a] * dot[c];
            }
            dqt[a] += scale * acc;
          }
          std::fill(du.begin(), du.end(), T(0));
          for (int64_t a = 0; a < K; ++a) {
            T acc = 0;
            for (int64_t c = 0; c < V; ++c) {
              acc += dS[size_t(a * V + c)] * u[size_t(c)];
              du[size_t(c)] += dS[size_t(a * V + c)] * x.k[a];
            }
            dkt[a] += acc;
          }
          T db = 0;
          T* dvt = dv + (t * HV + j) * V;
          for (int64_t c = 0; c < V; ++c) {
            db += du[size_t(c)] * (x.v[c] - kv[size_t(c)]);
            dvt[c] = x.beta * du[size_t(c)];
            du[size_t(c)] *= -x.beta;  // now dkv
          }
          dbeta[t * HV + j] = db;
          T* dgt = dg + t * d.g_stride() + j * d.g_width();
          if (!per_key) dgt[0] = 0;
          for (int64_t a = 0; a < K; ++a) {
            T acc = 0, gsum = 0;
            for (int64_t c = 0; c < V; ++c) {
              T& ds = dS[size_t(a * V + c)];
              ds += x.k[a] * du[size_t(c)];
              acc += Sp[size_t(a * V + c)] * du[size_t(c)];
              gsum += ds * Sp[size_t(a * V + c)];
            }
            dkt[a] += acc;
            if (per_key) dgt[a] = gsum;
            else dgt[0] += gsum;
          }
          decay_rows(dS.data(), x.g, K, V, per_key);
        }
      }
      if (dh0) std::copy(dS.begin(), dS.end(), dh0 + nj * KV);
    }
  }
}

template <class T>
void delta_rule_forward(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                        const T* beta, T scale, T* state, T* o, DeltaMode mode) {
  if (mode == DeltaMode::Chunk) delta_rule_chunk(d, q, k, v, g, beta, scale, state, o);
  else delta_rule_recurrent(d, q, k, v, g, beta, scale, state, o);
}

template <class T>
void delta_rule_backward(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                         const T* beta, T scale, const T* h0, const T* dout, const T* dht, T* dq, T* dk, T* dv,
                         T* dg, T* dbeta, T* dh0, DeltaMode mode) {
  if (mode == DeltaMode::Chunk)
    delta_rule_backward_chunk(d, q, k, v, g, beta, scale, h0, dout, dht, dq, dk, dv, dg, dbeta, dh0);
  else
    delta_rule_backward_recurrent(d, q, k, v, g, beta, scale, h0, dout, dht, dq, dk, dv, dg, dbeta, dh0);
}

// ---------------------------------------------------------------------------------------------
// Layer-side activations.
// ---------------------------------------------------------------------------------------------

template <class T>
void l2norm_forward(const T* x, T* y, int64_t rows, int64_t dim, T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const T inv = T(1) / std::sqrt(ss + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv;
  }
}

// y = x·ρ with ρ = (Σx² + eps)^(−1/2), dρ/dx = −ρ³ x, so dx = ρ (dy − y (y·dy)).
template <class T>
void l2norm_backward(const T* x, const T* dy, T* dx, int64_t rows, int64_t dim, T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    T ss = 0, xdy = 0;
    for (int64_t i = 0; i < dim; ++i) {
      ss += xr[i] * xr[i];
      xdy += xr[i] * dyr[i];
    }
    const T inv = T(1) / std::sqrt(ss + eps);
    for (int64_t i = 0; i < dim; ++i) dx[r * dim + i] = inv * (dyr[i] - inv * inv * xr[i] * xdy);
  }
}

namespace {
template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
template <class T>
T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));  // torch's threshold: linear above 20
}
}  // namespace

template <class T>
void beta_sigmoid_forward(const T* b, T* beta, int64_t n, T beta_max) {
  for (int64_t i = 0; i < n; ++i) beta[i] = beta_max * sigmoid(b[i]);
}

template <class T>
void beta_sigmoid_backward(const T* b, const T* dbeta, T* db, int64_t n, T beta_max) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid(b[i]);
    db[i] = dbeta[i] * beta_max * s * (T(1) - s);
  }
}

template <class T>
void gate_softplus_forward(const T* a, const T* A_log, const T* dt_bias, T* g, int64_t tokens, int64_t HV,
                           int64_t width) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < HV; ++h) {
      const T A = std::exp(A_log[h]);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t i = (t * HV + h) * width + c;
        g[i] = -A * softplus(a[i] + (dt_bias ? dt_bias[h * width + c] : T(0)));
      }
    }
}

// g = −A·sp(x), A = exp(A_log), x = a + dt_bias: dg/dx = −A·sigmoid(x) (−A above 20), dg/dA_log = g.
template <class T>
void gate_softplus_backward(const T* a, const T* A_log, const T* dt_bias, const T* dg, T* da, T* dA_log,
                            T* ddt_bias, int64_t tokens, int64_t HV, int64_t width) {
  std::fill(dA_log, dA_log + HV, T(0));
  if (dt_bias) std::fill(ddt_bias, ddt_bias + HV * width, T(0));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < HV; ++h) {
      const T A = std::exp(A_log[h]);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t i = (t * HV + h) * width + c;
        const T x = a[i] + (dt_bias ? dt_bias[h * width + c] : T(0)), d = dg[i];
        da[i] = -d * A * (x > T(20) ? T(1) : sigmoid(x));
        dA_log[h] += -d * A * softplus(x);
        if (dt_bias) ddt_bias[h * width + c] += da[i];
      }
    }
}

template <class T>
void gate_lowerbound_forward(const T* a, const T* A_log, const T* dt_bias, T lower_bound, T* g, int64_t tokens,
                             int64_t HV, int64_t width) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < HV; ++h) {
      const T A = std::exp(A_log[h]);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t i = (t * HV + h) * width + c;
        g[i] = lower_bound * sigmoid(A * (a[i] + (dt_bias ? dt_bias[h * width + c] : T(0))));
      }
    }
}

// g = lb·σ(z), z = A·x: dg/dx = lb·σ'(z)·A, dg/dA_log = lb·σ'(z)·z.
template <class T>
void gate_lowerbound_backward(const T* a, const T* A_log, const T* dt_bias, T lower_bound, const T* dg, T* da,
                              T* dA_log, T* ddt_bias, int64_t tokens, int64_t HV, int64_t width) {
  std::fill(dA_log, dA_log + HV, T(0));
  if (dt_bias) std::fill(ddt_bias, ddt_bias + HV * width, T(0));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < HV; ++h) {
      const T A = std::exp(A_log[h]);
      for (int64_t c = 0; c < width; ++c) {
        const int64_t i = (t * HV + h) * width + c;
        const T z = A * (a[i] + (dt_bias ? dt_bias[h * width + c] : T(0)));
        const T s = sigmoid(z), dz = dg[i] * lower_bound * s * (T(1) - s);
        da[i] = dz * A;
        dA_log[h] += dz * z;
        if (dt_bias) ddt_bias[h * width + c] += da[i];
      }
    }
}

#define HLA_DELTA_RULE_INSTANTIATE(T)                                                                                  \
  template void delta_rule_recurrent<T>(const DeltaRuleDims&, const T*, const T*, const T*, const T*, const T*, T, T*, \
                                        T*);                                                                           \
  template void delta_rule_forward<T>(const DeltaRuleDims&, const T*, const T*, const T*, const T*, const T*, T, T*,   \
                                      T*, DeltaMode);                                                                  \
  template void delta_rule_backward_recurrent<T>(const DeltaRuleDims&, const T*, const T*, const T*, const T*,         \
                                                 const T*, T, const T*, const T*, const T*, T*, T*, T*, T*, T*, T*);   \
  template void delta_rule_backward<T>(const DeltaRuleDims&, const T*, const T*, const T*, const T*, const T*, T,      \
                                       const T*, const T*, const T*, T*, T*, T*, T*, T*, T*, DeltaMode);               \
  template void l2norm_forward<T>(const T*, T*, int64_t, int64_t, T);                                                  \
  template void l2norm_backward<T>(const T*, const T*, T*, int64_t, int64_t, T);                                       \
  template void beta_sigmoid_forward<T>(const T*, T*, int64_t, T);                                                     \
  template void beta_sigmoid_backward<T>(const T*, const T*, T*, int64_t, T);                                          \
  template void gate_softplus_forward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t);                 \
  template void gate_softplus_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t,        \
                                          int64_t);                                                                    \
  template void gate_lowerbound_forward<T>(const T*, const T*, const T*, T, T*, int64_t, int64_t, int64_t);            \
  template void gate_lowerbound_backward<T>(const T*, const T*, const T*, T, const T*, T*, T*, T*, int64_t, int64_t,   \
                                            int64_t);
HLA_DELTA_RULE_INSTANTIATE(float)
HLA_DELTA_RULE_INSTANTIATE(double)
#undef HLA_DELTA_RULE_INSTANTIATE

}  // namespace hla
