// One training step of a tiny hybrid (KDA, grouped-value GDN and attention layers) through two
// paths: the CPU op and the CUDA kernels for the GDN/KDA layers' delta rule (`hla train --device
// cuda`). Loss, every parameter's gradient and the logits after the AdamW step must agree.
// Skips itself where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/train_kernels.h"
#include "core/config.h"
#include "eval/data.h"
#include "eval/tasks.h"
#include "model/model.h"
#include "tests/cuda/require_gpu.h"
#include "train/optim.h"

namespace hla {
namespace {

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += std::pow(double(a[i]) - b[i], 2), den += std::pow(double(b[i]), 2);
  return std::sqrt(num / std::max(den, 1e-300));
}

// Loss, gradients and post-step logits of one step, CPU op vs CUDA kernels.
void expect_same_step(const nlohmann::json& cfg) {
  auto task = eval::make_task("mqar", "smoke");
  eval::TaskData data(*task, 3, 1);
  const ModelSpec spec = parse_model_spec(Config(cfg, "cfg"));
  std::map<std::string, Tensor> init;
  Model::random(spec, 11, &init);
  auto get = [&](const std::string& n) { return init.at(n); };
  train::TrainModel<float> cpu(spec, get), gpu(spec, get);
  gpu.set_delta_rule_kernels(&cuda::delta_rule_training_kernels());
  const train::Batch b = data.train_batch(0, 0, 6);  // 6 packed sequences of 16 to 64 tokens
  const double norm = double(b.labelled()), tokens = double(b.ids.size());
  const auto lc = cpu.forward_backward(b, norm, tokens), lg = gpu.forward_backward(b, norm, tokens);
  EXPECT_NEAR(lg.lm_sum, lc.lm_sum, 1e-5 * std::fabs(lc.lm_sum));
  const auto pc = cpu.params(), pg = gpu.params();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i) EXPECT_LT(rel_l2(pg[i]->g, pc[i]->g), 1e-4) << pc[i]->name;
  train::OptimConfig oc;
  oc.lr = 1e-3, oc.total = 1;
  train::AdamW oa(oc), ob(oc);
  oa.step(pc), ob.step(pg);
  EXPECT_LT(rel_l2(gpu.logits(b), cpu.logits(b)), 1e-4);
}

nlohmann::json tiny(const std::vector<std::string>& layers, int64_t key_heads, int64_t value_heads) {
  return {{"model_type", "hla_hybrid"}, {"vocab_size", 68}, {"hidden_size", 64},
          {"num_hidden_layers", layers.size()}, {"layer_types", layers}, {"intermediate_size", 128},
          {"num_attention_heads", 2}, {"head_dim", 32}, {"linear_num_key_heads", key_heads},
          {"linear_num_value_heads", value_heads}, {"linear_key_head_dim", 32}, {"tie_word_embeddings", true}};
}

TEST(CudaTraining, OneStepMatchesTheCpuPath) {
  HLA_REQUIRE_GPU();
  expect_same_step(tiny({"kda", "gdn", "kda", "attention"}, 4, 4));
}

TEST(CudaTraining, OneStepMatchesTheCpuPathWithGroupedValueHeads) {
  HLA_REQUIRE_GPU();
  expect_same_step(tiny({"gdn", "attention", "gdn"}, 2, 4));  // 2 value heads per key head
}

}  // namespace
}  // namespace hla
