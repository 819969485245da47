// The delta-rule family (GDN, KDA): shapes and the CPU forms hla computes them in.
//
// Per sequence and value head, state S ∈ R^{K×V}, gates in natural-log space (g ≤ 0):
//   GDN: S' = exp(g_t) · S            KDA: S' = Diag(exp(g_t)) · S   (one decay per key row)
//   u_t = beta_t · (v_t − S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = S_t^T (scale · q_t)
// Layout is packed and sequence-first: tokens of all sequences along one axis T, split by
// cu_seqlens [N+1]. q,k [T,H,K]; v [T,HV,V]; beta [T,HV]; g [T,HV] (GDN) or [T,HV,K] (KDA);
// state [N,HV,K,V]. With HV > H, value head j reads q/k head j / (HV/H).
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
  int64_t g_stride() const { return gate == DeltaGate::PerKey ? HV * K : HV; }  // per token
  void validate() const;  // throws hla::Error on inconsistent sizes
};

// Token-by-token recurrence: the plain reference every other form is tested against.
// `state` holds h0 on entry and the final state on return; `o` is [T,HV,V].
template <class T>
void delta_rule_recurrent(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                          const T* beta, T scale, T* state, T* o);

enum class DeltaMode { Chunk, Recurrent };

// What layers call: the chunkwise form for prefill, the recurrence for decode. Same contract as
// delta_rule_recurrent.
template <class T>
void delta_rule_forward(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                        const T* beta, T scale, T* state, T* o, DeltaMode mode);

}  // namespace hla
