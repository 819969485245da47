// Params: the one place where a model's tensors are named and shaped. Every layer declares its
// weights through bind(); the same declarations load a checkpoint (checking each shape against the
// config) and create a random-weight checkpoint for `hla init`, so the two can never disagree.
#pragma once
#include <cstdint>
#include <map>
#include <random>
#include <string>

#include "core/safetensors.h"
#include "core/tensor.h"

namespace hla {

// How `hla init` fills a tensor. Loading ignores it.
enum class Init { Normal, Ones, Zeros, ALog, DtBias, Conv };

class Params {
 public:
  // Load mode: tensors come from `ckpt`.
  explicit Params(const Checkpoint* ckpt) : ckpt_(ckpt) {}
  // Init mode: random tensors with std 0.02 from `seed`.
  explicit Params(uint64_t seed);

  // Binds `name` of `shape` (as the config implies) to *dst as contiguous f32.
  void bind(const std::string& name, const Shape& shape, Tensor* dst, Init init = Init::Normal);
  bool has(const std::string& name) const;  // in load mode: does the checkpoint hold it
  bool loading() const { return ckpt_ != nullptr; }

  const std::map<std::string, Tensor>& created() const { return created_; }
  int64_t num_params() const { return num_params_; }

 private:
  const Checkpoint* ckpt_ = nullptr;
  std::mt19937_64 rng_;
  std::map<std::string, Tensor> created_;
  int64_t num_params_ = 0;
};

}  // namespace hla
