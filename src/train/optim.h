// AdamW with decoupled weight decay (none on norms, biases, embeddings and the delta-rule gate
// parameters: Param::decay), global-norm gradient clipping, and the warmup + cosine schedule.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "train/train_model.h"

namespace hla::train {

struct OptimConfig {
  double lr = 1e-3, min_lr_ratio = 0.1;  // cosine decays lr to lr·min_lr_ratio at the last step
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, clip = 1.0;
  int64_t warmup = 0, total = 1;  // steps
};

// A one-line error for a learning rate, weight decay or clip out of range.
void validate(const OptimConfig& c);

// Learning rate at optimizer step `step` (0-based): linear warmup over `warmup` steps, then cosine.
double lr_at(const OptimConfig& c, int64_t step);

class AdamW {
 public:
  explicit AdamW(const OptimConfig& c);  // validates c
  // One update from the accumulated gradients (already averaged); clips their global norm to
  // c.clip first. Returns the norm before clipping.
  double step(const std::vector<Param<float>*>& params);
  int64_t steps_done() const { return t_; }
  // Moments as tensors "m.<param>", "v.<param>" (for the checkpoint) and back.
  std::map<std::string, Tensor> state() const;
  void load_state(const std::map<std::string, Tensor>& st, int64_t steps_done);

 private:
  OptimConfig c_;
  int64_t t_ = 0;
  std::map<std::string, std::vector<float>> m_, v_;
};

}  // namespace hla::train
