// The training loop: gradient accumulation over micro-batches, AdamW + clipping + schedule, the
// DSA indexer warm-up, a progress line, periodic atomic checkpoints and resume.
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "train/optim.h"
#include "train/train_model.h"

namespace hla::train {

struct TrainOptions {
  std::string out;              // checkpoint directory ("" = none)
  int64_t steps = 100;          // optimizer steps
  int64_t accum = 1;            // micro-batches per step
  OptimConfig optim;            // total/warmup are set from steps if 0
  double dsa_warmup = 0.1;      // fraction of steps with dense attention in sparse layers
  int64_t log_every = 10;       // progress line every N steps (0 = never)
  int64_t ckpt_every = 0;       // checkpoint every N steps and at the end (0 = only at the end; needs out)
  bool resume = false;          // continue from OUT's latest checkpoint
  int keep = 2;                 // checkpoints kept
};

struct TrainResult {
  std::vector<std::pair<int64_t, double>> curve;  // (step, mean LM loss of the step)
  int64_t start_step = 0;                          // > 0 after a resume
  double seconds = 0;
  int64_t tokens = 0;
};

// `micro(step, i)` returns micro-batch i of optimizer step `step`; it must depend only on its
// arguments, so that a resumed run sees the batches an uninterrupted one would.
using MicroBatchFn = std::function<Batch(int64_t step, int64_t i)>;

TrainResult train_loop(TrainModel<float>& model, const nlohmann::json& config, const TrainOptions& opt,
                       const MicroBatchFn& micro);

}  // namespace hla::train
