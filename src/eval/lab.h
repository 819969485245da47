// `hla lab`: trains a ladder of hla_hybrid layouts on the synthetic tasks (and Brown perplexity),
// over model sizes, seeds and a small learning-rate sweep, and writes report.md, results.json,
// curves.json and PNG plots.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace hla::eval {

struct LabSize {
  std::string name;
  int64_t hidden, layers, heads, head_dim, lin_heads, lin_dim, intermediate, index_topk;
};

struct LabPreset {
  std::string name;
  std::vector<std::string> tasks;    // task names, and "brown" for perplexity
  std::vector<std::string> layouts;  // attention, kda-3:1, gdn-3:1, kda-7:1, lightning-7:1, kda, gdn, sparse-3:1
  std::vector<LabSize> sizes;
  std::vector<uint64_t> seeds;
  std::vector<double> lrs;           // the best (by mean test accuracy / lowest perplexity) is reported
  int64_t steps = 0, batch = 0, eval_examples = 0, brown_len = 128;
  bool neg_eigval = false;  // delta-rule layers with beta in [0, 2] (linear_allow_neg_eigval)
};

LabPreset lab_preset(const std::string& name);  // smoke | standard
// The model config of `layout` at `size` for a task with `vocab` tokens; neg_eigval sets
// linear_allow_neg_eigval.
nlohmann::json lab_model_config(const std::string& layout, const LabSize& size, int64_t vocab, bool neg_eigval);

// Runs the preset (only the listed tasks/layouts when given) and writes OUT/report.md,
// OUT/results.json, OUT/curves.json, OUT/plots/*.png. Progress goes to stderr.
void run_lab(const LabPreset& preset, const std::string& out);

}  // namespace hla::eval
