// Session: one sequence with its hybrid cache. append() feeds tokens (prefill or one decode step) and
// returns the logits of the last one; generate() runs prompt + sampling loop.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "model/model.h"

namespace hla {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = all
  float top_p = 1.0f;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int64_t sample(const float* logits, int64_t vocab);
  bool greedy() const { return p_.temperature == 0.0f; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<double> prob_;  // scratch, reused across tokens
  std::vector<int64_t> idx_;
};

class Session {
 public:
  explicit Session(const Model& m) : model_(m), cache_(m.new_cache()) {}
  // On a device (the model bound to it): the cache is slot `slot` of dev, reset here.
  Session(const Model& m, Device& dev, int64_t slot) : model_(m), dev_(&dev), slot_(slot) { dev.reset_slot(slot); }
  // Folds `ids` into the cache, at most prefill_chunk tokens per forward (a long prompt's
  // activations would not fit at once: a 128K-token forward of a 2B model needs ~100 GB of fp32
  // scratch); returns the logits [vocab] after the last id.
  std::vector<float> append(const std::vector<int64_t>& ids);
  // append() on a device for greedy decoding: the most likely next id, picked on the device.
  int64_t append_greedy(const std::vector<int64_t>& ids);
  // Tokens per forward in append(); a multiple of 64 keeps the delta rule's chunks where one
  // forward would put them.
  void set_prefill_chunk(int64_t n);
  // Prompt, then up to max_new sampled tokens (stops after any id in `eos`). on_token sees each new
  // id as it comes and may return false to stop. On a device, greedy picks happen there.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int64_t max_new, Sampler& sampler,
                                const std::vector<int64_t>& eos = {},
                                const std::function<bool(int64_t)>& on_token = {});
  const SequenceCache& cache() const { return cache_; }
  SequenceCache& cache() { return cache_; }
  int64_t length() const { return dev_ ? dev_length_ : cache_.length; }

 private:
  const Model& model_;
  SequenceCache cache_;  // on the CPU
  Device* dev_ = nullptr;
  int64_t slot_ = 0, dev_length_ = 0;
  int64_t prefill_chunk_ = 8192;

  // Folds all of ids but its last piece of at most prefill_chunk_ tokens; returns that piece.
  std::vector<int64_t> fold_all_but_last(const std::vector<int64_t>& ids);
  Tensor forward_piece(const std::vector<int64_t>& piece);  // its logits; the cache advances
  DevBatch device_batch(int64_t n);  // n tokens continuing the device slot (its length counts them)
};

}  // namespace hla
