// Model: a causal LM of one of the supported architectures, built from a ModelSpec and its weights.
// forward() runs the tokens of several sequences at once (packed), each continuing its own
// SequenceCache, so prefill, decode and batched decode are the same call.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/cache.h"
#include "backends/device.h"
#include "model/layers.h"
#include "model/spec.h"

namespace hla {

class Model {
 public:
  // Loads DIR/config.json and the checkpoint's weights (f32 in memory, any float dtype on disk).
  static std::unique_ptr<Model> load(const std::string& dir);
  // Random weights from `seed` (`hla init`); the tensors to write come back in *created.
  static std::unique_ptr<Model> random(const ModelSpec& spec, uint64_t seed, std::map<std::string, Tensor>* created);
  // Parameter count of `spec`, and (when ckpt is given) a check that the checkpoint holds every
  // tensor with the shape the config implies, without reading the weights.
  static int64_t count_params(const ModelSpec& spec, const Checkpoint* ckpt);

  const ModelSpec& spec() const { return spec_; }
  int64_t num_params() const { return num_params_; }
  SequenceCache new_cache() const;

  // Logits [rows, vocab]: one row per token when all_logits, else one per sequence (its last token).
  // ids are checked against the vocabulary; caches advance by their sequence's length.
  Tensor forward(const std::vector<int64_t>& ids, const SeqBatch& batch, bool all_logits) const;

  // Uploads the weights to `dev` (a model is bound to one device at a time).
  void bind_device(Device& dev);
  // forward() on the bound device, the cache in its slots: sequence i continues slot b.slots[i]
  // holding b.past[i] tokens (the caller resets a slot before a new sequence and counts its length).
  Tensor forward(Device& dev, const std::vector<int64_t>& ids, DevBatch& b, bool all_logits) const;
  // The same forward, greedy: each sequence's most likely next id (the lowest among ties), picked on
  // the device, so only the ids come back (a decode step of 64 sequences would otherwise copy
  // 64 × vocab logits to the host).
  std::vector<int64_t> forward_greedy(Device& dev, const std::vector<int64_t>& ids, DevBatch& b) const;

 private:
  Model(ModelSpec spec, Params& p);
  // The device forward up to the LM head: the logits [rows, vocab] in device scratch.
  const float* device_logits(Device& dev, const std::vector<int64_t>& ids, DevBatch& b, bool all_logits, bool greedy,
                             int64_t& n_rows) const;
  ModelSpec spec_;
  Tensor embed_, final_norm_, lm_head_;
  std::vector<Tensor> norm_in_, norm_post_;
  std::vector<std::unique_ptr<Mixer>> mixers_;
  std::vector<std::unique_ptr<Ffn>> ffns_;
  int64_t num_params_ = 0;
  Device* bound_ = nullptr;
  struct {
    DevMatrix embed, lm_head;
    std::vector<const float*> norm_in, norm_post;
    const float* final_norm = nullptr;
  } dev_;
};

}  // namespace hla
