// TrainModel: an hla_hybrid model with an explicit backward, for `hla train` and `hla lab`.
// It computes the same function as the inference Model built from the same config and weights
// (tests/test_train_grad.cpp checks the logits agree), but without caches: every sequence of a
// batch starts empty, tokens of all sequences are packed along one axis (cu_seqlens), and each
// layer keeps what its backward needs.
//
// Losses. LM: Σ over labelled positions of cross-entropy(logits, label) / norm. DSA indexer (sparse
// layers): per query KL(p ‖ softmax(I)) over the keys it attends to, p = the attention weights
// averaged over heads (detached), divided by the batch's tokens. Following DeepSeek-V3.2 the
// indexer's input is detached: indexer weights get gradients from the KL only, everything else
// from the LM loss only.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/spec.h"
#include "ops/delta_rule.h"

namespace hla::train {

template <class T>
struct Param {
  std::string name;
  Shape shape;
  std::vector<T> w, g;  // value and accumulated gradient
  bool decay = true;    // AdamW weight decay: matrices yes; norms, biases, embeddings, gates' A/dt no
};

// A batch of sequences packed along one axis. labels[t] is the token position t must predict (the
// next token for LM data, the answer for tasks) or -100 (no loss there).
struct Batch {
  std::vector<int64_t> ids, labels, cu_seqlens;  // [N], [N], [S+1]
  int64_t labelled() const;
};

// The delta-rule op inside the GDN/KDA layers of a training step (chunk form, zero initial state,
// fp32): the CPU op unless a backend supplies another (`hla train --device cuda` passes the CUDA
// kernels, backends/cuda/train_kernels.h). q,k [T,H,K], v,o [T,HV,V], g [T,HV(,K)], beta [T,HV].
struct DeltaRuleKernels {
  std::function<void(const DeltaRuleDims&, const float* q, const float* k, const float* v, const float* g,
                     const float* beta, float scale, float* o)>
      forward;
  // Gradients (overwritten) from dout.
  std::function<void(const DeltaRuleDims&, const float* q, const float* k, const float* v, const float* g,
                     const float* beta, float scale, const float* dout, float* dq, float* dk, float* dv, float* dg,
                     float* dbeta)>
      backward;
};

template <class T>
class TrainModel {
 public:
  // `get(name)` returns the checkpoint tensor `name` (any float dtype); shapes are checked.
  TrainModel(const ModelSpec& spec, const std::function<Tensor(const std::string&)>& get);
  ~TrainModel();

  struct Loss {
    double lm_sum = 0;     // Σ cross-entropy over labelled positions (not divided by norm)
    double index_sum = 0;  // Σ indexer KL over the queries of sparse layers
    int64_t labelled = 0;
  };
  // Forward and backward of one (micro-)batch: gradients of (Σ CE)/norm (+ indexer KL / index_norm)
  // are added to each Param::g.
  Loss forward_backward(const Batch& b, double norm, double index_norm);
  // Forward only: logits [labelled, vocab] of the labelled positions, in order.
  std::vector<T> logits(const Batch& b);

  std::vector<Param<T>*> params();
  void zero_grad();
  // The weights as float tensors under their checkpoint names (what `hla generate` loads).
  std::map<std::string, Tensor> export_weights() const;
  // DSA warm-up: sparse layers attend to every causal key while their indexer learns.
  void set_dense_attention(bool dense);
  // Runs the GDN/KDA layers' delta-rule op through `k` (must outlive the model); nullptr: the CPU op.
  void set_delta_rule_kernels(const DeltaRuleKernels* k) { delta_kernels_ = k; }
  const ModelSpec& spec() const { return spec_; }

  struct Layer;

 private:
  ModelSpec spec_;
  std::vector<std::unique_ptr<Param<T>>> params_;
  std::vector<std::unique_ptr<Layer>> mixers_, mlps_;
  Param<T>*embed_ = nullptr, *lm_head_ = nullptr, *final_norm_ = nullptr;
  std::vector<Param<T>*> norm_in_, norm_post_;
  std::vector<std::vector<T>> h_in_, h_mid_;  // saved residual stream before each norm
  std::vector<T> h_final_, hf_;                // last residual stream; final-normed labelled rows
  std::vector<int64_t> rows_;                  // the labelled rows
  bool dense_ = false;
  const DeltaRuleKernels* delta_kernels_ = nullptr;
  std::vector<T> forward(const Batch& b);  // logits [rows_, vocab]
};

}  // namespace hla::train
