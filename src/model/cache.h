// The hybrid cache of one sequence: constant-size recurrent state for delta-rule layers, growing
// KV rows for attention/MLA layers (and the DeepSeek indexer's keys). Plain values, so a snapshot
// (prefix cache, speculative rollback) is a copy.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace hla {

struct LayerCache {
  std::vector<float> conv;     // [C, Kw-1]: the last Kw-1 pre-conv inputs (linear layers)
  std::vector<float> state;    // [HV, K, V] fp32 delta-rule state (linear layers)
  std::vector<float> k, v;     // [S, n_kv_heads·dq], [S, n_kv_heads·dv] (attention layers)
  std::vector<float> index_k;  // [S, index_dim] (DeepSeek sparse layers)
};

struct SequenceCache {
  int64_t length = 0;  // tokens already folded into the cache
  std::vector<LayerCache> layers;
  size_t bytes() const;
};

// The tokens of several sequences packed along one axis: sequence i owns rows
// [cu_seqlens[i], cu_seqlens[i+1]) and continues caches[i] (positions start at caches[i]->length).
struct SeqBatch {
  std::vector<int64_t> cu_seqlens;
  std::vector<SequenceCache*> caches;
  int64_t num_seqs() const { return int64_t(caches.size()); }
  int64_t tokens() const { return cu_seqlens.back(); }
  int64_t len(int64_t i) const { return cu_seqlens[size_t(i + 1)] - cu_seqlens[size_t(i)]; }
};

}  // namespace hla
