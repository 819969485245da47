// Params: the one place where a model's tensors are named and shaped. Every layer declares its
// weights through bind(); the same declarations load a checkpoint (checking each shape against the
// config) and create a random-weight checkpoint for `hla init`, so the two can never disagree.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <string>

#include "core/safetensors.h"
#include "core/tensor.h"

namespace hla {

// How a weight starts when no checkpoint supplies it (hla init, training from scratch); loading
// ignores it.
// OutNorm: the gain of a linear-attention layer's gated output norm, 0.1 rather than 1. The norm
// emits unit-scale outputs whatever its input, so at gain 1 the linear branches swamp the token
// embeddings (std 0.02) from the first step: in the lab's smoke models one KDA, GDN or lightning
// layer in front of an attention layer stopped it from learning single-hop recall (0.35 against
// 1.000 alone), and at 0.1 `KA` and `KKKA` learn it (1.000; docs/RESULTS_LAB.md).
// Embed: the token embeddings, std 2.4/sqrt(hidden) (0.3 at the lab's hidden 64) rather than 0.02, so
// that the (tied) initial logits have std about 2.4 whatever the width. At 0.02 the embeddings are
// so small that within the first few hundred steps the pre-attention blocks' outputs (mostly the
// MLPs) bury the token identity in the residual stream: in `KKKKKKKA` the input of the attention
// layer lost all correlation with the token embedding by step 200 and the model never formed the
// recall circuit (MQAR 0.36–0.42 over seeds), while the same layers with the attention first or
// fourth (`AKKKKKKK`, `KKKAKKKK`) learned it (1.000). Embedding std 0.1 gave 0.71, 0.3 gave 1.000
// (docs/RESULTS_LAB.md).
enum class Init { Normal, Ones, Zeros, ALog, DtBias, Conv, OutNorm, Embed };

class Params {
 public:
  // Load mode: tensors come from `ckpt`. With materialize=false only names and shapes are checked
  // (the mmap is not read), which is what `hla info` needs.
  explicit Params(const Checkpoint* ckpt, bool materialize = true) : ckpt_(ckpt), materialize_(materialize) {}
  // Init mode: random tensors with std 0.02 from `seed`.
  explicit Params(uint64_t seed);
  // Count mode: no checkpoint, no data; only num_params().
  Params() : materialize_(false) {}

  // Binds `name` of `shape` (as the config implies) to *dst as contiguous f32.
  void bind(const std::string& name, const Shape& shape, Tensor* dst, Init init = Init::Normal);
  bool has(const std::string& name) const;  // in load mode: does the checkpoint hold it
  bool loading() const { return ckpt_ != nullptr; }
  bool materialize() const { return materialize_; }  // do bound tensors hold data

  const std::map<std::string, Tensor>& created() const { return created_; }
  int64_t num_params() const { return num_params_; }
  // Load mode: called after each tensor with the bytes read so far (progress of long loads).
  void on_progress(std::function<void(size_t)> f) { progress_ = std::move(f); }

 private:
  const Checkpoint* ckpt_ = nullptr;
  bool materialize_ = true;
  std::mt19937_64 rng_;
  std::map<std::string, Tensor> created_;
  int64_t num_params_ = 0;
  size_t loaded_bytes_ = 0;
  std::function<void(size_t)> progress_;
};

}  // namespace hla
