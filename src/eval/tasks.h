// Synthetic tasks of the architecture lab (research/sparse_eval.md §E), each a generator of token
// sequences with per-position labels (-100 = no loss / not scored) at a difficulty `level`
// (pairs, hops, length...). Token 0 is PAD, 1 SEP, 2 QRY; each task's own symbols follow.
// params() records the exact generator parameters for the report.
#pragma once
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace hla::eval {

struct Example {
  std::vector<int64_t> ids, labels;
};

class Task {
 public:
  virtual ~Task() = default;
  std::string name, level_name;                   // "mqar", "pairs"
  std::vector<int64_t> train_levels, test_levels;  // training samples a level uniformly per sequence
  // Curriculum: the training levels unlock in order, the first k of n during the k-th n-th of the
  // steps (levels whose skill builds on the one before, like hops).
  bool curriculum = false;
  int64_t vocab = 0;
  // Metric: accuracy per labelled position, or per example (all its labelled positions right —
  // for answers of several tokens, which is greedy decoding's exact match under teacher forcing).
  bool exact_match = false;
  nlohmann::json params;
  // A test example scores only what the task measures (e.g. positions beyond the training length).
  virtual Example sample(std::mt19937_64& rng, int64_t level, bool test) const = 0;
};

// Tasks: mqar, multihop, niah, copy, selective_copy, parity, s5, induction. preset: smoke | standard.
std::unique_ptr<Task> make_task(const std::string& name, const std::string& preset);
std::vector<std::string> task_names();

}  // namespace hla::eval
