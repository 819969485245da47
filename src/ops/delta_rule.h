// The delta-rule family (GDN, KDA): shapes and the CPU forms hla computes them in.
//
// Per sequence and value head, state S ∈ R^{K×V}, gates in natural-log space (g ≤ 0):
//   GDN: S' = exp(g_t) · S            KDA: S' = Diag(exp(g_t)) · S   (one decay per key row)
//   u_t = beta_t · (v_t − S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = S_t^T (scale · q_t)
// Layout is packed and sequence-first: tokens of all sequences along one axis T, split by
// cu_seqlens [N+1]. q,k [T,H,K]; v [T,HV,V]; beta [T,HV]; g [T,HV] (GDN) or [T,HV,K] (KDA);
// state [N,HV,K,V]. With HV > H, value head j reads q/k head j / (HV/H).
//
// Forms: `delta_rule_recurrent` (token by token, the reference and the decode path) and
// `delta_rule_chunk` (chunkwise WY/UT, the prefill path, backends/cpu/delta_rule_chunk.cpp), each
// with a backward. Both run in float or double (double for tests and finite differences).
#pragma once
#include <cstdint>
#include <vector>

namespace hla {

enum class DeltaGate { Scalar, PerKey };  // GDN: one decay per head; KDA: one per key channel

struct DeltaRuleDims {
  int64_t H = 0, HV = 0, K = 0, V = 0;
  DeltaGate gate = DeltaGate::Scalar;
  std::vector<int64_t> cu_seqlens;  // {0, T0, T0+T1, ...}

  int64_t num_seqs() const { return int64_t(cu_seqlens.size()) - 1; }
  int64_t tokens() const { return cu_seqlens.empty() ? 0 : cu_seqlens.back(); }
  int64_t g_width() const { return gate == DeltaGate::PerKey ? K : 1; }  // gate values per value head
  int64_t g_stride() const { return HV * g_width(); }                   // per token
  void validate() const;  // throws hla::Error on inconsistent sizes
};

// Token-by-token recurrence: the plain reference every other form is tested against.
// `state` holds h0 on entry and the final state on return; `o` is [T,HV,V].
template <class T>
void delta_rule_recurrent(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                          const T* beta, T scale, T* state, T* o);

// Chunkwise (WY/UT) form, same contract. Chunks of `chunk` tokens never cross a sequence boundary.
// Exact for any g ≤ 0: every decay factor it forms is bounded (see the .cpp), so gates down to
// −5 per token and below neither overflow nor lose accuracy. OpenMP over (sequence, value head).
template <class T>
void delta_rule_chunk(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                      const T* beta, T scale, T* state, T* o, int64_t chunk = 64);

enum class DeltaMode { Chunk, Recurrent };

// What layers call: the chunkwise form for prefill, the recurrence for decode.
template <class T>
void delta_rule_forward(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                        const T* beta, T scale, T* state, T* o, DeltaMode mode);

// Backward of the op: gradients of a loss given dout = dL/do [T,HV,V] and dht = dL/d(final state)
// [N,HV,K,V]. h0 is the initial state (nullptr = zeros), dht may be nullptr (zeros), dh0 may be
// nullptr (not wanted). Outputs are overwritten: dq, dk [T,H,K] (summed over the value heads of a
// group), dv [T,HV,V], dg like g, dbeta [T,HV], dh0 [N,HV,K,V].
//   recurrent: reverse-time over tokens, recomputing states from checkpoints every 64 tokens.
//   chunk: reverse-time over chunks (per-chunk states from a forward sweep), OpenMP over (seq, head).
template <class T>
void delta_rule_backward_recurrent(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                                   const T* beta, T scale, const T* h0, const T* dout, const T* dht, T* dq,
                                   T* dk, T* dv, T* dg, T* dbeta, T* dh0);
template <class T>
void delta_rule_backward_chunk(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                               const T* beta, T scale, const T* h0, const T* dout, const T* dht, T* dq, T* dk,
                               T* dv, T* dg, T* dbeta, T* dh0, int64_t chunk = 64);
template <class T>
void delta_rule_backward(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                         const T* beta, T scale, const T* h0, const T* dout, const T* dht, T* dq, T* dk, T* dv,
                         T* dg, T* dbeta, T* dh0, DeltaMode mode);

// ---------------------------------------------------------------------------------------------
// Layer-side pieces that produce the op's inputs, each with its backward (d* outputs overwritten).
// ---------------------------------------------------------------------------------------------

// q/k L2 norm per row of `dim`: y = x / sqrt(Σx² + eps).
template <class T>
void l2norm_forward(const T* x, T* y, int64_t rows, int64_t dim, T eps = T(1e-6));
template <class T>
void l2norm_backward(const T* x, const T* dy, T* dx, int64_t rows, int64_t dim, T eps = T(1e-6));

// beta = beta_max·sigmoid(b), elementwise over n values (beta_max 1, or 2 for negative eigenvalues).
template <class T>
void beta_sigmoid_forward(const T* b, T* beta, int64_t n, T beta_max);
template <class T>
void beta_sigmoid_backward(const T* b, const T* dbeta, T* db, int64_t n, T beta_max);

// Gate activations over a [tokens, HV, width] pre-activation `a` (width 1 for GDN, K for KDA's
// per-key gate), A_log [HV], dt_bias [HV·width] (nullptr = none):
//   softplus form:    g = −exp(A_log[h]) · softplus(a + dt_bias)    (softplus linear above 20, as torch)
//   lower-bound form: g = lb · sigmoid(exp(A_log[h]) · (a + dt_bias)), lb ∈ [−5, 0)  (KDA)
// Backward gives da (like a; it may alias dg), dA_log [HV] and ddt_bias [HV·width] (summed over
// tokens; skipped when dt_bias is nullptr).
template <class T>
void gate_softplus_forward(const T* a, const T* A_log, const T* dt_bias, T* g, int64_t tokens, int64_t HV,
                           int64_t width);
template <class T>
void gate_softplus_backward(const T* a, const T* A_log, const T* dt_bias, const T* dg, T* da, T* dA_log,
                            T* ddt_bias, int64_t tokens, int64_t HV, int64_t width);
template <class T>
void gate_lowerbound_forward(const T* a, const T* A_log, const T* dt_bias, T lower_bound, T* g, int64_t tokens,
                             int64_t HV, int64_t width);
template <class T>
void gate_lowerbound_backward(const T* a, const T* A_log, const T* dt_bias, T lower_bound, const T* dg, T* da,
                              T* dA_log, T* ddt_bias, int64_t tokens, int64_t HV, int64_t width);

}  // namespace hla
