// Chunkwise (WY/UT) delta rule on CPU, forward and backward, float and double.
//
// Per (sequence, value head) the tokens are cut into chunks of C rows (the last one partial).
// Inside a chunk, with G_i the inclusive cumsum of the log gates from the chunk start ([L] for GDN,
// [L,K] for KDA; ≤ 0 and non-increasing), S the state entering the chunk and s the scale:
//   Mkk[i,j] = Σ_d k_i[d] k_j[d] e^{G_i[d]−G_j[d]}  (j < i)     Mqk[i,j] = same with q_i  (j ≤ i)
//   Tm = (I + diag(β) Mkk)^{-1}
//   W  = Tm diag(β) (K ⊙ e^G)        U = Tm diag(β) V           (the WY representation)
//   Vn = U − W S                                                (the deltas u_t of the recurrence)
//   O  = s (Q ⊙ e^G) S + s Mqk Vn
//   S ← diag(e^{G_last}) S + (K ⊙ e^{G_last−G})^T Vn
// Every factor e^{G} and e^{G_last−G} is ≤ 1. The decayed Gram matrices would need e^{−G}, which
// overflows (64 tokens at g = −5 is e^{320}), so they are built per sub-chunk of 16 rows R_a
// around its middle row m: Mqk[R_a, 0:a1] = (Q_a ⊙ e^{G_a−G_m}) (K_{0:a1} ⊙ e^{G_m−G})^T.
// Columns before R_a get factors ≤ 1; inside R_a each factor spans at most 8 tokens (≤ e^{40} at
// g ≥ −5). When a sub-chunk's factors would exceed e^{lim} (lim = ln(max)/2, 44 for float), that
// sub-chunk is done row by row with m = i (all factors ≤ 1), so the result is exact for any g ≤ 0.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "ops/delta_rule.h"

namespace hla {

namespace {

// ---------------------------------------------------------------------------------------------
// Small dense kernels for the chunk matrices (≤ 64 × 256): register-tiled, vectorised by the
// compiler through GCC vector types (64-byte vectors: one AVX-512 or two AVX2 registers).
// ---------------------------------------------------------------------------------------------

template <class T>
struct Simd {
  typedef T vec __attribute__((vector_size(64)));
  static constexpr int W = int(64 / sizeof(T));
};

template <class T>
std::vector<T> buf(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n));
}

// Which part of A is known to be zero: Lower means A(i,p) = 0 for p > i, Upper for p < i.
enum class Tri { None, Lower, Upper };

// C[MR, NV·W] (=, or += when acc) alpha · Σ_{p0≤p<p1} A(r,p) B[p,:].
template <class T, int MR, int NV>
inline void mm_tile(int64_t p0, int64_t p1, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb, T* C,
                    int64_t ldc, T alpha, bool acc) {
  using Vec = typename Simd<T>::vec;
  constexpr int W = Simd<T>::W;
  Vec c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = Vec{};
  for (int64_t p = p0; p < p1; ++p) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + p * ldb + v * W, sizeof(Vec));
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * ars + p * acs];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      Vec out = alpha * c[r][v];
      if (acc) {
        Vec old;
        std::memcpy(&old, C + r * ldc + v * W, sizeof(Vec));
        out += old;
      }
      std::memcpy(C + r * ldc + v * W, &out, sizeof(Vec));
    }
}

template <class T, int MR>
void mm_rows(int64_t i, int64_t N, int64_t P, T alpha, const T* A, int64_t ars, int64_t acs, const T* B,
             int64_t ldb, T* C, int64_t ldc, bool acc, Tri tri) {
  constexpr int W = Simd<T>::W;
  const int64_t p0 = tri == Tri::Upper ? std::min(i, P) : 0;
  const int64_t p1 = tri == Tri::Lower ? std::min(P, i + MR) : P;
  const T* Ai = A + i * ars;
  T* Ci = C + i * ldc;
  int64_t j = 0;
  for (; j + 2 * W <= N; j += 2 * W) mm_tile<T, MR, 2>(p0, p1, Ai, ars, acs, B + j, ldb, Ci + j, ldc, alpha, acc);
  for (; j + W <= N; j += W) mm_tile<T, MR, 1>(p0, p1, Ai, ars, acs, B + j, ldb, Ci + j, ldc, alpha, acc);
  for (; j < N; ++j)
    for (int r = 0; r < MR; ++r) {
      T s = 0;
      for (int64_t p = p0; p < p1; ++p) s += Ai[r * ars + p * acs] * B[p * ldb + j];
      Ci[r * ldc + j] = alpha * s + (acc ? Ci[r * ldc + j] : T(0));
    }
}

// C[M,N] (=, or += when acc) alpha · A B, A(i,p) = A[i·ars + p·acs] (so A^T costs nothing),
// B row-major [P,N] with row stride ldb, C row-major with row stride ldc.
template <class T>
void mm(int64_t M, int64_t N, int64_t P, T alpha, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb,
        T* C, int64_t ldc, bool acc, Tri tri = Tri::None) {
  // 8×2 vector accumulators fit AVX-512's 32 registers; AVX2 (16) holds 4×2 (each vector is two).
#ifdef __AVX512F__
  constexpr int MR = 8;
#else
  constexpr int MR = 4;
#endif
  int64_t i = 0;
  for (; i + MR <= M; i += MR) mm_rows<T, MR>(i, N, P, alpha, A, ars, acs, B, ldb, C, ldc, acc, tri);
  if constexpr (MR > 4)
    for (; i + 4 <= M; i += 4) mm_rows<T, 4>(i, N, P, alpha, A, ars, acs, B, ldb, C, ldc, acc, tri);
  for (; i < M; ++i) mm_rows<T, 1>(i, N, P, alpha, A, ars, acs, B, ldb, C, ldc, acc, tri);
}

// dst[c, r] = src[r, c] for a [rows, cols] block.
template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// x ← exp(x) over an array. Double uses libm (tests, finite differences); float uses a
// vectorisable Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, and a degree-6 polynomial for
// e^r (within 1.5 ulp). Inputs are clamped to [−88, 88]; below −87 the result is 0 (no subnormals).
void exp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}
void exp_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = std::clamp(x[i], -88.0f, 88.0f);
    const float fn = std::nearbyint(xi * 1.44269504088896341f);
    const float r = (xi - fn * 0.693359375f) + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (int32_t(fn) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    x[i] = xi < -87.0f ? 0.0f : p * scale;
  }
}

// ---------------------------------------------------------------------------------------------
// One (sequence, value head) stream: gathered chunk inputs and the intra-chunk products.
// Row-major scratch: [C,K] for q/k-shaped, [C,V] for v-shaped, [C,C] for chunk matrices.
// ---------------------------------------------------------------------------------------------

template <class T>
struct Stream {
  static constexpr int64_t BC = 16;  // sub-chunk rows of the decayed Gram matrices
  const DeltaRuleDims& d;
  const int64_t C, K, V, Kg, j, h;  // chunk size, dims, gate width, value head and its q/k head
  int64_t L = 0;         // rows of the current chunk
  bool growing = false;  // some g > 0 in the chunk (outside the contract, still computed exactly)
  std::vector<T> Q, Kk, Vv, beta, G;  // gathered inputs; G = chunk-local cumsum of g [C,Kg]
  std::vector<T> eG, eGr, gl;         // e^{G}, e^{G_last−G} [C,Kg]; e^{G_last} [Kg]
  std::vector<T> Qd, Kd, Kr, Bk, Bv;  // Q⊙e^G, K⊙e^G, K⊙e^{G_last−G}, β·Kd [C,K]; β·V [C,V]
  std::vector<T> Mkk, Mqk, Tm;        // [C,C]
  std::vector<T> W, U, Vn;            // [C,K], [C,V], [C,V]
  std::vector<T> rowf, colf, Qa, Ka, Kc, KcT;  // sub-chunk factors and scaled operands

  Stream(const DeltaRuleDims& dims, int64_t chunk, int64_t jv)
      : d(dims), C(chunk), K(dims.K), V(dims.V), Kg(dims.g_width()), j(jv), h(jv / (dims.HV / dims.H)) {
    for (auto* b : {&Q, &Kk, &Qd, &Kd, &Kr, &Bk, &W, &Kc}) b->resize(size_t(C * K));
    for (auto* b : {&Vv, &Bv, &U, &Vn}) b->resize(size_t(C * V));
    for (auto* b : {&G, &eG, &eGr, &colf}) b->resize(size_t(C * Kg));
    for (auto* b : {&Mkk, &Mqk, &Tm}) b->resize(size_t(C * C));
    beta.resize(size_t(C));
    gl.resize(size_t(Kg));
    rowf.resize(size_t(BC * Kg));
    Qa.resize(size_t(BC * K));
    Ka.resize(size_t(BC * K));
    KcT.resize(size_t(K * C));
  }

  // Gathers tokens [t0, t0+len) and forms everything that does not depend on the state.
  void load(const T* q, const T* k, const T* v, const T* g, const T* b, int64_t t0, int64_t len) {
    L = len;
    const int64_t H = d.H, HV = d.HV;
    int pos = 0;
    for (int64_t i = 0; i < L; ++i) {
      const int64_t t = t0 + i;
      std::memcpy(&Q[i * K], q + (t * H + h) * K, sizeof(T) * size_t(K));
      std::memcpy(&Kk[i * K], k + (t * H + h) * K, sizeof(T) * size_t(K));
      std::memcpy(&Vv[i * V], v + (t * HV + j) * V, sizeof(T) * size_t(V));
      beta[i] = b[t * HV + j];
      const T* gt = g + t * d.g_stride() + j * Kg;
      for (int64_t c = 0; c < Kg; ++c) {
        G[i * Kg + c] = gt[c] + (i ? G[(i - 1) * Kg + c] : T(0));
        pos |= int(gt[c] > 0);
      }
    }
    growing = pos != 0;
    const T* Glast = &G[(L - 1) * Kg];
    for (int64_t i = 0; i < L; ++i)
      for (int64_t c = 0; c < Kg; ++c) {
        eG[i * Kg + c] = G[i * Kg + c];
        eGr[i * Kg + c] = Glast[c] - G[i * Kg + c];
      }
    std::copy(Glast, Glast + Kg, gl.begin());
    exp_inplace(eG.data(), L * Kg);
    exp_inplace(eGr.data(), L * Kg);
    exp_inplace(gl.data(), Kg);
    for (int64_t i = 0; i < L; ++i) {
      scale_row(&Qd[i * K], &Q[i * K], &eG[i * Kg]);
      scale_row(&Kd[i * K], &Kk[i * K], &eG[i * Kg]);
      scale_row(&Kr[i * K], &Kk[i * K], &eGr[i * Kg]);
      for (int64_t c = 0; c < K; ++c) Bk[i * K + c] = beta[i] * Kd[i * K + c];
      for (int64_t c = 0; c < V; ++c) Bv[i * V + c] = beta[i] * Vv[i * V + c];
    }
    grams();
    solve();
  }

  // out[0:K] = x ⊙ f, f one value (GDN) or K values (KDA).
  void scale_row(T* out, const T* x, const T* f) const {
    if (Kg == 1)
      for (int64_t c = 0; c < K; ++c) out[c] = x[c] * f[0];
    else
      for (int64_t c = 0; c < K; ++c) out[c] = x[c] * f[c];
  }

  // Walks the sub-chunks R_a = [a0, a1) with their reference rows, leaving in Qa, Ka the scaled
  // rows Q/K[R_a] ⊙ e^{G−G_m}, in rowf/colf the factors and in Kc rows 0:a1 of K ⊙ e^{G_m−G};
  // then calls fn(a0, a1).
  template <class Fn>
  void for_each_block(Fn&& fn) {
    const T lim = T(0.5) * std::log(std::numeric_limits<T>::max());
    for (int64_t a0 = 0, a1; a0 < L; a0 = a1) {
      a1 = std::min(a0 + BC, L);
      int64_t m = a0 + (a1 - a0) / 2;
      if (!factors(a0, a1, m, lim)) {  // gates too steep for a shared reference: one row at a time
        a1 = a0 + 1;
        m = a0;
        factors(a0, a1, m, lim);
      }
      for (int64_t i = a0; i < a1; ++i) {
        scale_row(&Qa[(i - a0) * K], &Q[i * K], &rowf[(i - a0) * Kg]);
        scale_row(&Ka[(i - a0) * K], &Kk[i * K], &rowf[(i - a0) * Kg]);
      }
      for (int64_t jj = 0; jj < a1; ++jj) scale_row(&Kc[jj * K], &Kk[jj * K], &colf[jj * Kg]);
      fn(a0, a1);
    }
  }

  // rowf = e^{G_i − G_m} (i ∈ [a0,a1)), colf = e^{G_m − G_j} (j < a1). A block of several rows
  // needs non-increasing G (its largest exponents are then G_{a0} − G_m and G_m − G_{a1−1}) and
  // those ≤ lim; otherwise returns false. A single row (m = a0) always works: its factors are
  // the exact e^{G_i − G_j} themselves.
  bool factors(int64_t a0, int64_t a1, int64_t m, T lim) {
    const T* Gm = &G[m * Kg];
    if (a1 - a0 > 1) {
      if (growing) return false;
      int bad = 0;
      for (int64_t c = 0; c < Kg; ++c)
        bad |= int(G[a0 * Kg + c] - Gm[c] > lim) | int(Gm[c] - G[(a1 - 1) * Kg + c] > lim);
      if (bad) return false;
    }
    for (int64_t i = a0; i < a1; ++i)
      for (int64_t c = 0; c < Kg; ++c) rowf[(i - a0) * Kg + c] = G[i * Kg + c] - Gm[c];
    for (int64_t jj = 0; jj < a1; ++jj)
      for (int64_t c = 0; c < Kg; ++c) colf[jj * Kg + c] = Gm[c] - G[jj * Kg + c];
    exp_inplace(rowf.data(), (a1 - a0) * Kg);
    exp_inplace(colf.data(), a1 * Kg);
    return true;
  }

  // Mkk (strictly lower) and Mqk (lower, diagonal included), as defined in the file header.
  void grams() {
    std::fill(Mkk.begin(), Mkk.end(), T(0));
    std::fill(Mqk.begin(), Mqk.end(), T(0));
    for_each_block([&](int64_t a0, int64_t a1) {
      transpose(Kc.data(), a1, K, K, KcT.data(), C);
      mm(a1 - a0, a1, K, T(1), Qa.data(), K, 1, KcT.data(), C, &Mqk[a0 * C], C, false);
      mm(a1 - a0, a1, K, T(1), Ka.data(), K, 1, KcT.data(), C, &Mkk[a0 * C], C, false);
      for (int64_t i = a0; i < a1; ++i)  // the block's upper part holds unused (possibly huge) products
        for (int64_t jj = i; jj < a1; ++jj) {
          if (jj > i) Mqk[i * C + jj] = 0;
          Mkk[i * C + jj] = 0;
        }
    });
  }

  // Tm = (I + diag(β) Mkk)^{-1} by forward substitution, row i: Tm[i] = e_i − Σ_{j<i} β_i Mkk[i,j] Tm[j];
  // then W = Tm Bk, U = Tm Bv.
  void solve() {
    std::fill(Tm.begin(), Tm.end(), T(0));
    for (int64_t i = 0; i < L; ++i) {
      T* Ti = &Tm[i * C];
      Ti[i] = 1;
      for (int64_t jj = 0; jj < i; ++jj) {
        const T l = beta[i] * Mkk[i * C + jj];
        const T* Tj = &Tm[jj * C];
        for (int64_t c = 0; c <= jj; ++c) Ti[c] -= l * Tj[c];
      }
    }
    mm(L, K, L, T(1), Tm.data(), C, 1, Bk.data(), K, W.data(), K, false, Tri::Lower);
    mm(L, V, L, T(1), Tm.data(), C, 1, Bv.data(), V, U.data(), V, false, Tri::Lower);
  }

  // Vn = U − W S for the state S [K,V] entering the chunk.
  void deltas(const T* S) {
    std::copy(U.begin(), U.begin() + L * V, Vn.begin());
    mm(L, V, K, T(-1), W.data(), K, 1, S, V, Vn.data(), V, true);
  }

  // S ← diag(e^{G_last}) S + Kr^T Vn.
  void advance(T* S) const {
    for (int64_t a = 0; a < K; ++a) {
      const T f = gl[Kg == 1 ? 0 : a];
      for (int64_t c = 0; c < V; ++c) S[a * V + c] *= f;
    }
    mm(K, V, L, T(1), Kr.data(), 1, K, Vn.data(), V, S, V, true);
  }
};

// Threads only pay off with work to share: a few microseconds' worth per call is run serially.
bool worth_threads(const DeltaRuleDims& d) { return d.tokens() * d.HV * d.K * d.V >= (int64_t(1) << 20); }

void check_chunk(const DeltaRuleDims& d, int64_t chunk) {
  d.validate();
  check(chunk > 0, "delta rule: chunk size must be positive (is " + std::to_string(chunk) + ")");
}

}  // namespace

template <class T>
void delta_rule_chunk(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g, const T* beta,
                      T scale, T* state, T* o, int64_t chunk) {
  check_chunk(d, chunk);
  const int64_t HV = d.HV, V = d.V, KV = d.K * d.V, N = d.num_seqs();
#pragma omp parallel for schedule(dynamic) if (worth_threads(d))
  for (int64_t nj = 0; nj < N * HV; ++nj) {
    const int64_t n = nj / HV, j = nj % HV;
    Stream<T> s(d, chunk, j);
    std::vector<T> O(buf<T>(chunk * V));
    T* S = state + nj * KV;
    for (int64_t t0 = d.cu_seqlens[n]; t0 < d.cu_seqlens[n + 1]; t0 += chunk) {
      const int64_t L = std::min(chunk, d.cu_seqlens[n + 1] - t0);
      s.load(q, k, v, g, beta, t0, L);
      s.deltas(S);
      // O = s·Qd S + s·Mqk Vn, before S moves on.
      mm(L, V, d.K, scale, s.Qd.data(), d.K, 1, S, V, O.data(), V, false);
      mm(L, V, L, scale, s.Mqk.data(), chunk, 1, s.Vn.data(), V, O.data(), V, true, Tri::Lower);
      s.advance(S);
      for (int64_t i = 0; i < L; ++i)
        std::memcpy(o + ((t0 + i) * HV + j) * V, &O[i * V], sizeof(T) * size_t(V));
    }
  }
}

// Reverse-time backward over chunks. Per chunk, given dO [L,V] and dSn = dL/d(state leaving the
// chunk), the forward's steps are undone in reverse order:
//   from O:       dQd = s dO S^T;  dMqk = s dO Vn^T (lower);  dVn = s Mqk^T dO
//   from S_next:  dVn += Kr dSn;  dKr = Vn dSn^T;  dgl = Σ_v dSn ⊙ S (per row)
//   from Vn:      dW = −dVn S^T;  dU = dVn
//   state:        dS = diag(gl) dSn + s Qd^T dO − W^T dVn   (passed to the previous chunk)
//   from W, U:    dBk = Tm^T dW;  dBv = Tm^T dU;  dTm = dW Bk^T + dU Bv^T
//   from Tm:      dL = −Tm^T dTm Tm^T (strictly lower), L = diag(β) Mkk: dMkk = β dL, dβ += Σ dL ⊙ Mkk
//   dβ += Σ dBk ⊙ Kd + Σ dBv ⊙ V;  dV = β dBv;  dKd = β dBk
//   Gram matrices off the diagonal, per sub-chunk (same factors as the forward):
//     dQrow = (dMqk Kc) ⊙ rowf,  dKrow = (dMkk Kc) ⊙ rowf,  dKcol += (dMqk^T Qa + dMkk^T Ka) ⊙ colf
//   dQ = dQrow + dQd ⊙ e^G + dMqk[i,i] k;  dK = dKrow + dKcol + dKd ⊙ e^G + dKr ⊙ e^{G_last−G} + dMqk[i,i] q
//   gates, per row (summed over K for GDN): terms in G_i, which depends on g_{≤i},
//     dG_i = q⊙dQrow + k⊙dKrow − k⊙dKcol + dQd⊙Qd + dKd⊙Kd  (+ dgl⊙gl on the last row),
//   and Kr_i = k ⊙ e^{G_last−G_i}, which depends on g_{>i}: dg_t = Σ_{i≥t} dG_i + Σ_{i<t} dKr_i⊙Kr_i.
template <class T>
void delta_rule_backward_chunk(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                               const T* beta, T scale, const T* h0, const T* dout, const T* dht, T* dq, T* dk,
                               T* dv, T* dg, T* dbeta, T* dh0, int64_t chunk) {
  check_chunk(d, chunk);
  const int64_t H = d.H, HV = d.HV, K = d.K, V = d.V, KV = K * V, N = d.num_seqs(), C = chunk;
  const int64_t group = HV / H, Tn = d.tokens(), Kg = d.g_width();
  // Every (token, head) row of dq/dk is written once by the stream that owns it; with grouped
  // value heads each value head writes its own row [T,HV,K], summed over the group after.
  std::vector<T> dq_heads, dk_heads;
  if (group > 1) {
    dq_heads.resize(size_t(Tn * HV * K));
    dk_heads.resize(size_t(Tn * HV * K));
  }
  T* dqh = group > 1 ? dq_heads.data() : dq;
  T* dkh = group > 1 ? dk_heads.data() : dk;
  const int64_t qk_heads = group > 1 ? HV : H;
#pragma omp parallel for schedule(dynamic) if (worth_threads(d))
  for (int64_t nj = 0; nj < N * HV; ++nj) {
    const int64_t n = nj / HV, j = nj % HV, t_begin = d.cu_seqlens[n], t_end = d.cu_seqlens[n + 1];
    const int64_t hq = group > 1 ? j : j / group;  // row of dqh/dkh this head writes
    const int64_t nc = (t_end - t_begin + C - 1) / C;
    Stream<T> s(d, C, j);
    // States entering each chunk, from a forward sweep.
    std::vector<T> states(buf<T>(std::max<int64_t>(nc, 1) * KV)), S(buf<T>(KV)), dS(buf<T>(KV));
    if (h0) std::copy(h0 + nj * KV, h0 + (nj + 1) * KV, S.begin());
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t t0 = t_begin + c * C;
      std::copy(S.begin(), S.end(), states.begin() + c * KV);
      s.load(q, k, v, g, beta, t0, std::min(C, t_end - t0));
      s.deltas(S.data());
      s.advance(S.data());
    }
    if (dht) std::copy(dht + nj * KV, dht + (nj + 1) * KV, dS.begin());
    // Per-chunk gradient scratch, named after what it holds ([C,K], [C,V], [C,C] as in Stream).
    auto dO = buf<T>(C * V), dVn = buf<T>(C * V), dBv = buf<T>(C * V);
    auto dQd = buf<T>(C * K), dKr = buf<T>(C * K), dW = buf<T>(C * K), dBk = buf<T>(C * K), X = buf<T>(C * K);
    auto dQrow = buf<T>(C * K), dKrow = buf<T>(C * K), dKcol = buf<T>(C * K);
    auto ST = buf<T>(V * K), dST = buf<T>(V * K), VnT = buf<T>(V * C), BkT = buf<T>(K * C), BvT = buf<T>(V * C);
    auto dMqk = buf<T>(C * C), dMkk = buf<T>(C * C), dT = buf<T>(C * C), TT = buf<T>(C * C), Y = buf<T>(C * C);
    auto dG = buf<T>(C * Kg), pKr = buf<T>(C * Kg), dgl = buf<T>(Kg), run = buf<T>(Kg);
    auto db = buf<T>(C), diag = buf<T>(C);
    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t t0 = t_begin + c * C, L = std::min(C, t_end - t0);
      const T* Sc = &states[c * KV];
      s.load(q, k, v, g, beta, t0, L);
      s.deltas(Sc);
      for (int64_t i = 0; i < L; ++i)
        std::memcpy(&dO[i * V], dout + ((t0 + i) * HV + j) * V, sizeof(T) * size_t(V));
      transpose(Sc, K, V, V, ST.data(), K);
      transpose(dS.data(), K, V, V, dST.data(), K);
      transpose(s.Vn.data(), L, V, V, VnT.data(), C);
      // From O.
      mm(L, K, V, scale, dO.data(), V, 1, ST.data(), K, dQd.data(), K, false);
      mm(L, L, V, scale, dO.data(), V, 1, VnT.data(), C, dMqk.data(), C, false);
      for (int64_t i = 0; i < L; ++i) std::fill(&dMqk[i * C + i + 1], &dMqk[i * C + L], T(0));
      mm(L, V, L, scale, s.Mqk.data(), 1, C, dO.data(), V, dVn.data(), V, false, Tri::Upper);
      // From S_next = diag(gl) S + Kr^T Vn.
      mm(L, V, K, T(1), s.Kr.data(), K, 1, dS.data(), V, dVn.data(), V, true);
      mm(L, K, V, T(1), s.Vn.data(), V, 1, dST.data(), K, dKr.data(), K, false);
      std::fill(dgl.begin(), dgl.end(), T(0));
      for (int64_t a = 0; a < K; ++a) {
        T acc = 0;
        for (int64_t cv = 0; cv < V; ++cv) acc += dS[a * V + cv] * Sc[a * V + cv];
        dgl[Kg == 1 ? 0 : a] += acc;
      }
      // From Vn = U − W S.
      mm(L, K, V, T(-1), dVn.data(), V, 1, ST.data(), K, dW.data(), K, false);
      // The state gradient handed to the previous chunk.
      for (int64_t a = 0; a < K; ++a) {
        const T f = s.gl[Kg == 1 ? 0 : a];
        for (int64_t cv = 0; cv < V; ++cv) dS[a * V + cv] *= f;
      }
      mm(K, V, L, scale, s.Qd.data(), 1, K, dO.data(), V, dS.data(), V, true);
      mm(K, V, L, T(-1), s.W.data(), 1, K, dVn.data(), V, dS.data(), V, true);
      // From W = Tm Bk, U = Tm Bv (dU = dVn).
      mm(L, K, L, T(1), s.Tm.data(), 1, C, dW.data(), K, dBk.data(), K, false, Tri::Upper);
      mm(L, V, L, T(1), s.Tm.data(), 1, C, dVn.data(), V, dBv.data(), V, false, Tri::Upper);
      transpose(s.Bk.data(), L, K, K, BkT.data(), C);
      transpose(s.Bv.data(), L, V, V, BvT.data(), C);
      mm(L, L, K, T(1), dW.data(), K, 1, BkT.data(), C, dT.data(), C, false);
      mm(L, L, V, T(1), dVn.data(), V, 1, BvT.data(), C, dT.data(), C, true);
      // From Tm = (I + L)^{-1}: dL = −Tm^T dTm Tm^T, kept strictly lower; dMkk = β dL.
      transpose(s.Tm.data(), L, L, C, TT.data(), C);
      mm(L, L, L, T(1), dT.data(), C, 1, TT.data(), C, Y.data(), C, false);
      mm(L, L, L, T(-1), s.Tm.data(), 1, C, Y.data(), C, dMkk.data(), C, false, Tri::Upper);
      for (int64_t i = 0; i < L; ++i) {
        std::fill(&dMkk[i * C + i], &dMkk[i * C + L], T(0));
        T acc = 0;
        for (int64_t jj = 0; jj < i; ++jj) acc += dMkk[i * C + jj] * s.Mkk[i * C + jj];
        for (int64_t a = 0; a < K; ++a) acc += dBk[i * K + a] * s.Kd[i * K + a];
        for (int64_t cv = 0; cv < V; ++cv) acc += dBv[i * V + cv] * s.Vv[i * V + cv];
        db[i] = acc;
        for (int64_t jj = 0; jj < i; ++jj) dMkk[i * C + jj] *= s.beta[i];
        for (int64_t a = 0; a < K; ++a) dBk[i * K + a] *= s.beta[i];     // now dKd
        for (int64_t cv = 0; cv < V; ++cv) dBv[i * V + cv] *= s.beta[i];  // now dV
      }
      // Through the decayed Gram matrices. The diagonal of Mqk (q_i·k_i) has no decay: it goes to
      // dq, dk directly, so dG only sums terms of the size of the gradient itself (no O(1) terms
      // that cancel, which would swamp dg when gates are steep).
      for (int64_t i = 0; i < L; ++i) {
        diag[i] = dMqk[i * C + i];
        dMqk[i * C + i] = 0;
      }
      std::fill(dKcol.begin(), dKcol.end(), T(0));
      s.for_each_block([&](int64_t a0, int64_t a1) {
        const int64_t R = a1 - a0;
        mm(R, K, a1, T(1), &dMqk[a0 * C], C, 1, s.Kc.data(), K, &dQrow[a0 * K], K, false);
        mm(R, K, a1, T(1), &dMkk[a0 * C], C, 1, s.Kc.data(), K, &dKrow[a0 * K], K, false);
        for (int64_t i = a0; i < a1; ++i) {
          s.scale_row(&dQrow[i * K], &dQrow[i * K], &s.rowf[(i - a0) * Kg]);
          s.scale_row(&dKrow[i * K], &dKrow[i * K], &s.rowf[(i - a0) * Kg]);
        }
        mm(a1, K, R, T(1), &dMqk[a0 * C], 1, C, s.Qa.data(), K, X.data(), K, false);
        mm(a1, K, R, T(1), &dMkk[a0 * C], 1, C, s.Ka.data(), K, X.data(), K, true);
        for (int64_t jj = 0; jj < a1; ++jj) {
          s.scale_row(&X[jj * K], &X[jj * K], &s.colf[jj * Kg]);
          for (int64_t a = 0; a < K; ++a) dKcol[jj * K + a] += X[jj * K + a];
        }
      });
      // Assemble dq, dk and, per row, the gate terms: dG (row i depends on g_{≤i}) and
      // pKr = dKr ⊙ Kr (Kr_i depends on g_{>i}).
      std::fill(dG.begin(), dG.end(), T(0));
      std::fill(pKr.begin(), pKr.end(), T(0));
      for (int64_t c2 = 0; c2 < Kg; ++c2) dG[(L - 1) * Kg + c2] = dgl[c2] * s.gl[c2];
      for (int64_t i = 0; i < L; ++i) {
        const int64_t t = t0 + i;
        T* dqt = dqh + (t * qk_heads + hq) * K;
        T* dkt = dkh + (t * qk_heads + hq) * K;
        const T* eg = &s.eG[i * Kg];
        const T* egr = &s.eGr[i * Kg];
        for (int64_t a = 0; a < K; ++a) {
          const int64_t x = i * K + a, ga = Kg == 1 ? 0 : a;
          dqt[a] = dQrow[x] + dQd[x] * eg[ga] + diag[i] * s.Kk[x];
          dkt[a] = dKrow[x] + dKcol[x] + dBk[x] * eg[ga] + dKr[x] * egr[ga] + diag[i] * s.Q[x];
          dG[i * Kg + ga] += s.Q[x] * dQrow[x] + s.Kk[x] * (dKrow[x] - dKcol[x]) + dQd[x] * s.Qd[x] +
                             dBk[x] * s.Kd[x];
          pKr[i * Kg + ga] += dKr[x] * s.Kr[x];
        }
        std::memcpy(dv + (t * HV + j) * V, &dBv[i * V], sizeof(T) * size_t(V));
        dbeta[t * HV + j] = db[i];
      }
      // dg_t = Σ_{i ≥ t} dG_i + Σ_{i < t} pKr_i within the chunk.
      std::fill(run.begin(), run.end(), T(0));
      for (int64_t i = L - 1; i >= 0; --i) {
        T* dgt = dg + (t0 + i) * d.g_stride() + j * Kg;
        for (int64_t c2 = 0; c2 < Kg; ++c2) dgt[c2] = run[c2] += dG[i * Kg + c2];
      }
      std::fill(run.begin(), run.end(), T(0));
      for (int64_t i = 0; i < L; ++i) {
        T* dgt = dg + (t0 + i) * d.g_stride() + j * Kg;
        for (int64_t c2 = 0; c2 < Kg; ++c2) {
          dgt[c2] += run[c2];
          run[c2] += pKr[i * Kg + c2];
        }
      }
    }
    if (dh0) std::copy(dS.begin(), dS.end(), dh0 + nj * KV);
  }
  if (group > 1) {
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t hh = 0; hh < H; ++hh) {
        T* dqt = dq + (t * H + hh) * K;
        T* dkt = dk + (t * H + hh) * K;
        std::fill(dqt, dqt + K, T(0));
        std::fill(dkt, dkt + K, T(0));
        for (int64_t r = 0; r < group; ++r) {
          const int64_t jv = hh * group + r;
          for (int64_t a = 0; a < K; ++a) {
            dqt[a] += dq_heads[(t * HV + jv) * K + a];
            dkt[a] += dk_heads[(t * HV + jv) * K + a];
          }
        }
      }
  }
}

template void delta_rule_chunk<float>(const DeltaRuleDims&, const float*, const float*, const float*, const float*,
                                      const float*, float, float*, float*, int64_t);
template void delta_rule_chunk<double>(const DeltaRuleDims&, const double*, const double*, const double*,
                                       const double*, const double*, double, double*, double*, int64_t);
template void delta_rule_backward_chunk<float>(const DeltaRuleDims&, const float*, const float*, const float*,
                                               const float*, const float*, float, const float*, const float*,
                                               const float*, float*, float*, float*, float*, float*, float*,
                                               int64_t);
template void delta_rule_backward_chunk<double>(const DeltaRuleDims&, const double*, const double*, const double*,
                                                const double*, const double*, double, const double*,
                                                const double*, const double*, double*, double*, double*, double*,
                                                double*, double*, int64_t);

}  // namespace hla
