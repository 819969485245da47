// The whole model on the GPU (Model::forward on the CUDA device) against the CPU forward: the four
// fixture architectures and an hla_hybrid model whose shapes take the fast kernels (delta-rule chunk
// and decode, flash attention), in fp32 (within 1e-4) and bf16 (within 2x the error of the plain
// bf16 implementation, CpuDevice's bf16 mode), prefill and batched decode; greedy generation of
// the fixture prompts as transformers generated them.
#include <gtest/gtest.h>

#include "backends/cpu/cpu_device.h"
#include "backends/cuda/cuda_device.h"
#include "backends/cuda/delta_rule_cuda.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "runtime/session.h"
#include "tests/common.h"
#include "tests/cuda/require_gpu.h"
#include "tests/device_model_check.h"

using namespace hla;

namespace {

// fp32 weights on the GPU against the CPU forward: the 1e-4 bar, and no greedy flips.
void expect_fp32_matches_cpu(Model& m, int64_t T, uint32_t seed, const std::string& name) {
  auto dev = cuda::make_cuda_device(3, DType::F32);
  const DeviceModelErrors e = compare_device_model(m, *dev, T, seed);
  std::printf("[ model fp32 ] %s prefill %.3g decode %.3g\n", name.c_str(), e.prefill, e.decode);
  EXPECT_LT(e.prefill, 1e-4);
  EXPECT_LT(e.decode, 1e-4);
  EXPECT_EQ(e.greedy_flips, 0);
}

// bf16 on the GPU against the plain bf16 implementation of the same math, both against fp32.
void expect_bf16_within_plain(Model& m, int64_t T, uint32_t seed) {
  auto dev = cuda::make_cuda_device(3, DType::BF16);
  const DeviceModelErrors got = compare_device_model(m, *dev, T, seed);
  cpu::CpuDevice plain(3, true);
  const DeviceModelErrors bound = compare_device_model(m, plain, T, seed);
  EXPECT_LE(got.prefill, 2 * bound.prefill + 1e-6) << "plain bf16: " << bound.prefill;
  EXPECT_LE(got.decode, 2 * bound.decode + 1e-6) << "plain bf16: " << bound.decode;
  std::printf("[ model bf16 ] prefill %.3g (plain %.3g)  decode %.3g (plain %.3g)\n", got.prefill, bound.prefill,
              got.decode, bound.decode);
}

class CudaModel : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModel, Fp32MatchesCpu) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  auto m = Model::load(fixture("models/" + GetParam()));
  expect_fp32_matches_cpu(*m, 37, 5, GetParam());
}

TEST_P(CudaModel, Bf16WithinTwicePlainBf16) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  auto m = Model::load(fixture("models/" + GetParam()));
  expect_bf16_within_plain(*m, 37, 5);
}

// The fixture's greedy continuation (transformers, fp32) in both GPU modes.
TEST_P(CudaModel, GreedyGenerationMatchesTransformers) {
  HLA_REQUIRE_GPU();
  HLA_REQUIRE_FIXTURES();
  const std::string dir = fixture("models/" + GetParam());
  SafeTensorsFile ref(dir + "/reference.safetensors");
  auto m = Model::load(dir);
  Tensor gen = ref.get("gen_ids");
  std::vector<int64_t> all;
  for (int64_t t = 0; t < gen.size(1); ++t) all.push_back(int64_t(gen.at({0, t})));
  const std::vector<int64_t> prompt(all.begin(), all.begin() + 12), expected(all.begin() + 12, all.end());
  for (DType dt : {DType::F32, DType::BF16}) {
    auto dev = cuda::make_cuda_device(1, dt);
    m->bind_device(*dev);
    Session s(*m, *dev, 0);
    Sampler greedy(SamplingParams{});
    EXPECT_EQ(s.generate(prompt, int64_t(expected.size()), greedy), expected) << dtype_name(dt);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModel, ::testing::Values("qwen3_next", "qwen3_5", "kimi_linear", "deepseek_v32"));

// K = V = 64 linear heads (chunk + decode kernels), head dim 64 attention (flash in bf16), windowed
// and DSA layers, over 300 tokens (chunks of 64, an odd tail; KV rows grow past 256 while decoding). Without the DSA layer every
// decode step after the second replays a CUDA graph.
std::unique_ptr<Model> fast_shape_hybrid(const std::string& pattern, bool neg_eigval = false) {
  const nlohmann::json j = {{"linear_allow_neg_eigval", neg_eigval},
                            {"model_type", "hla_hybrid"},
                            {"vocab_size", 97},
                            {"hidden_size", 128},
                            {"num_hidden_layers", int64_t(pattern.size())},
                            {"layer_pattern", pattern},
                            {"intermediate_size", 160},
                            {"num_attention_heads", 4},
                            {"num_key_value_heads", 2},
                            {"head_dim", 64},
                            {"partial_rotary_factor", 0.5},
                            {"sliding_window", 40},
                            {"index_n_heads", 2},
                            {"index_head_dim", 16},
                            {"index_topk", 24},
                            {"linear_num_key_heads", 2},
                            {"linear_num_value_heads", 2},
                            {"linear_key_head_dim", 64},
                            {"linear_value_head_dim", 64},
                            {"linear_conv_kernel_dim", 4}};
  return Model::random(parse_model_spec(Config(j, "test-config.json")), 3, nullptr);
}

class CudaModelFastShapes : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModelFastShapes, Fp32MatchesCpu) {
  HLA_REQUIRE_GPU();
  auto m = fast_shape_hybrid(GetParam());
  expect_fp32_matches_cpu(*m, 300, 7, "hybrid " + GetParam());
}

INSTANTIATE_TEST_SUITE_P(Hybrid, CudaModelFastShapes, ::testing::Values("KGAWS", "KGAW"));

// bf16 without the DSA layer: its top-k pick is discrete, and the bf16 rounding of the indexer's
// projections flips near-tied picks, a jump no bound on rounding error covers (H200, session 13:
// with session 12's larger embeddings one flip in each path put the GPU's decode at 0.156 and the
// plain bf16 prefill at 0.156, against 0.043 unflipped). The fp32 test above covers the selection.
class CudaModelFastShapesBf16 : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModelFastShapesBf16, WithinTwicePlainBf16) {
  HLA_REQUIRE_GPU();
  auto m = fast_shape_hybrid(GetParam());
  expect_bf16_within_plain(*m, 300, 7);
}

INSTANTIATE_TEST_SUITE_P(Hybrid, CudaModelFastShapesBf16, ::testing::Values("KGAW"));

// beta in [0, 2] through the prefill prep (sigmoid scale) and the fused decode prep kernel.
TEST(CudaModel, NegativeEigenvaluesFp32MatchesCpu) {
  HLA_REQUIRE_GPU();
  auto m = fast_shape_hybrid("KGA", true);
  expect_fp32_matches_cpu(*m, 300, 7, "hybrid KGA, neg eigval");
}

}  // namespace
