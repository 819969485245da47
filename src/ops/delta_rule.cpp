#include "ops/delta_rule.h"

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

template <class T>
void delta_rule_recurrent(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                          const T* beta, T scale, T* state, T* o) {
  d.validate();
  const int64_t H = d.H, HV = d.HV, K = d.K, V = d.V, group = HV / H;
  std::vector<T> kv(V);
  for (int64_t n = 0; n < d.num_seqs(); ++n) {
    for (int64_t j = 0; j < HV; ++j) {
      T* S = state + (n * HV + j) * K * V;
      const int64_t h = j / group;
      for (int64_t t = d.cu_seqlens[n]; t < d.cu_seqlens[n + 1]; ++t) {
        const T* qt = q + (t * H + h) * K;
        const T* kt = k + (t * H + h) * K;
        const T* vt = v + (t * HV + j) * V;
        const T* gt = g + t * d.g_stride() + (d.gate == DeltaGate::PerKey ? j * K : j);
        const T b = beta[t * HV + j];
        // decay, then kv = S'^T k
        for (int64_t a = 0; a < K; ++a) {
          const T decay = std::exp(d.gate == DeltaGate::PerKey ? gt[a] : gt[0]);
          for (int64_t c = 0; c < V; ++c) S[a * V + c] *= decay;
        }
        std::fill(kv.begin(), kv.end(), T(0));
        for (int64_t a = 0; a < K; ++a)
          for (int64_t c = 0; c < V; ++c) kv[c] += S[a * V + c] * kt[a];
        // u = beta (v - kv); S += k u^T; o = S^T (scale q)
        for (int64_t c = 0; c < V; ++c) kv[c] = b * (vt[c] - kv[c]);
        T* ot = o + (t * HV + j) * V;
        for (int64_t c = 0; c < V; ++c) ot[c] = 0;
        for (int64_t a = 0; a < K; ++a) {
          const T qa = scale * qt[a];
          for (int64_t c = 0; c < V; ++c) {
            S[a * V + c] += kt[a] * kv[c];
            ot[c] += S[a * V + c] * qa;
          }
        }
      }
    }
  }
}

template <class T>
void delta_rule_forward(const DeltaRuleDims& d, const T* q, const T* k, const T* v, const T* g,
                        const T* beta, T scale, T* state, T* o, DeltaMode mode) {
  // The chunkwise form lands next; until then both modes run the reference recurrence.
  (void)mode;
  delta_rule_recurrent(d, q, k, v, g, beta, scale, state, o);
}

template void delta_rule_forward<float>(const DeltaRuleDims&, const float*, const float*, const float*,
                                        const float*, const float*, float, float*, float*, DeltaMode);
template void delta_rule_forward<double>(const DeltaRuleDims&, const double*, const double*, const double*,
                                         const double*, const double*, double, double*, double*, DeltaMode);
template void delta_rule_recurrent<float>(const DeltaRuleDims&, const float*, const float*, const float*,
                                          const float*, const float*, float, float*, float*);
template void delta_rule_recurrent<double>(const DeltaRuleDims&, const double*, const double*, const double*,
                                           const double*, const double*, double, double*, double*);

}  // namespace hla
