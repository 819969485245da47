// Every layer's device form (Model::forward on a Device) wired right: on the CpuDevice, whose
// operations are the CPU oracle's own functions, it must equal the plain CPU forward — for the
// four fixture architectures and for hla_hybrid's GDN/KDA/attention/sliding/sparse layers with the
// attention short conv.
#include <gtest/gtest.h>

#include "backends/cpu/cpu_device.h"
#include "core/config.h"
#include "core/error.h"
#include "runtime/engine.h"
#include "runtime/prefix_cache.h"
#include "runtime/session.h"
#include "tests/common.h"
#include "tests/device_model_check.h"

using namespace hla;

namespace {

class DeviceWiring : public ::testing::TestWithParam<std::string> {};

TEST_P(DeviceWiring, CpuDeviceEqualsCpuForward) {
  HLA_REQUIRE_FIXTURES();
  auto m = Model::load(fixture("models/" + GetParam()));
  cpu::CpuDevice dev(3);
  const DeviceModelErrors e = compare_device_model(*m, dev, 21, 5);
  EXPECT_LT(e.prefill, 1e-5);
  EXPECT_LT(e.decode, 1e-5);
  EXPECT_EQ(e.greedy_flips, 0);
}

// A Session on a device (generate's path with --device) decodes what the CPU Session decodes:
// sampled on the host from the device's logits, and greedy with the pick made on the device.
TEST_P(DeviceWiring, SessionOnDeviceGeneratesTheSameIds) {
  HLA_REQUIRE_FIXTURES();
  auto m = Model::load(fixture("models/" + GetParam()));
  const std::vector<int64_t> prompt{3, 17, 5, 9, 11, 2, 40};
  cpu::CpuDevice dev(2);
  m->bind_device(dev);
  for (const SamplingParams& p : {SamplingParams{0.8f, 20, 0.9f, 3}, SamplingParams{}}) {
    Sampler a(p), b(p);
    const std::vector<int64_t> cpu_ids = Session(*m).generate(prompt, 24, a);
    EXPECT_EQ(Session(*m, dev, 1).generate(prompt, 24, b), cpu_ids) << "temperature " << p.temperature;
  }
}

// The server's engine on a device (`hla serve --device`): more requests than its 3 slots (slots
// are reused), prompts longer than a step's token budget (chunked prefill), greedy picks (made on
// the device) and sampled ones, max_tokens 0 — each request gets what a CPU Session generates
// for it alone.
TEST(DeviceWiring, EngineOnDeviceServesWhatSessionsGenerate) {
  HLA_REQUIRE_FIXTURES();
  auto m = Model::load(fixture("models/qwen3_5"));
  cpu::CpuDevice dev(3);
  m->bind_device(dev);
  EngineOptions opt;
  opt.max_slots = 3, opt.max_step_tokens = 24, opt.block = 16;
  const int64_t lengths[] = {5, 40, 17, 3, 29, 9};
  std::vector<std::vector<int64_t>> prompts;
  std::vector<GenerationParams> params;
  for (int64_t i = 0; i < 6; ++i) {
    std::vector<int64_t> p;
    for (int64_t t = 0; t < lengths[i]; ++t) p.push_back((7 * t + 13 * i + 1) % m->spec().vocab);
    prompts.push_back(p);
    GenerationParams g;
    g.max_tokens = i == 3 ? 0 : 6 + i;
    if (i % 2 == 1) g.sampling = SamplingParams{0.8f, 20, 0.9f, uint64_t(i)};
    params.push_back(g);
  }
  std::vector<std::vector<int64_t>> got(prompts.size());
  {
    Engine engine(*m, opt, &dev);
    std::vector<std::shared_ptr<Request>> reqs;
    for (size_t i = 0; i < prompts.size(); ++i) reqs.push_back(engine.submit(prompts[i], params[i]));
    for (size_t i = 0; i < reqs.size(); ++i) {
      ASSERT_NE(reqs[i], nullptr);
      for (int tries = 0; !reqs[i]->wait(&got[i], std::chrono::milliseconds(100)); ++tries) ASSERT_LT(tries, 600);
      EXPECT_EQ(reqs[i]->finish_reason(), "length") << i;
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    Sampler sampler(params[i].sampling);
    EXPECT_EQ(got[i], Session(*m).generate(prompts[i], params[i].max_tokens, sampler)) << "request " << i;
  }
}

// The engine's prefix snapshots on a device (Device::save_slot / load_slot): after a request with
// a 48-token prefix, one sharing all 48 starts at 48 and one sharing 40 at 32 (the last block
// boundary stored), and each generates what a CPU Session generates for its prompt alone. Models
// with recurrent and conv state plus KV rows (Qwen3-Next) and with MLA KV and indexer-key rows
// (DeepSeek-V3.2).
TEST(DeviceWiring, EngineOnDeviceStartsFromPrefixSnapshots) {
  HLA_REQUIRE_FIXTURES();
  for (const char* name : {"qwen3_next", "deepseek_v32"}) {
    auto m = Model::load(fixture(std::string("models/") + name));
    cpu::CpuDevice dev(2);
    m->bind_device(dev);
    EngineOptions opt;
    opt.max_slots = 2, opt.max_step_tokens = 64, opt.block = 16;
    std::vector<int64_t> shared;
    for (int64_t t = 0; t < 48; ++t) shared.push_back((t * 37 + 11) % m->spec().vocab);
    auto prompt = [&](int64_t keep, std::vector<int64_t> tail) {
      std::vector<int64_t> p(shared.begin(), shared.begin() + keep);
      p.insert(p.end(), tail.begin(), tail.end());
      return p;
    };
    const std::vector<std::vector<int64_t>> prompts = {prompt(48, {1, 2, 3}), prompt(48, {4, 5}), prompt(40, {6})};
    const int64_t want_cached[] = {0, 48, 32};
    GenerationParams g;
    g.max_tokens = 6;
    Engine engine(*m, opt, &dev);
    for (size_t i = 0; i < prompts.size(); ++i) {  // one after another: each sees the snapshots before it
      auto r = engine.submit(prompts[i], g);
      ASSERT_NE(r, nullptr);
      std::vector<int64_t> got;
      for (int tries = 0; !r->wait(&got, std::chrono::milliseconds(100)); ++tries) ASSERT_LT(tries, 600);
      EXPECT_EQ(r->cached_prompt_tokens(), want_cached[i]) << name << " request " << i;
      Sampler sampler(g.sampling);
      EXPECT_EQ(got, Session(*m).generate(prompts[i], g.max_tokens, sampler)) << name << " request " << i;
    }
    EXPECT_EQ(engine.stats().prefix_hits, 2) << name;
    EXPECT_GT(engine.stats().prefix_cache_bytes, 0u) << name;
  }
}

// A snapshot is made only when it fits the prefix cache's budget (Device::snapshot_bytes says its
// size first): a cache larger than the whole budget is never copied, and one that fits is stored.
// A prefix stored already asks for neither its size nor a snapshot.
TEST(PrefixCache, MakesOnlySnapshotsThatFitTheBudget) {
  cpu::CpuDevice dev(2);
  dev.cache_pool(0, CachePart::State, 100);
  dev.cache_rows(0, CachePart::K, 1, 20, 8);
  const size_t bytes = dev.snapshot_bytes(1, 16);
  EXPECT_EQ(bytes, (100 + 16 * 8) * sizeof(float));
  EXPECT_EQ(dev.save_slot(1, 16)->bytes(), bytes);
  const std::vector<int64_t> tokens(20, 7);
  const size_t entry = bytes + 16 * sizeof(int64_t);  // the snapshot and its 16 token ids
  for (const size_t budget : {size_t(0), entry - 1, entry}) {
    PrefixCache<DeviceSnapshot> cache(budget, 16);
    int sized = 0, made = 0;
    auto insert = [&] {
      cache.insert(
          tokens, 16,
          [&] {
            ++sized;
            return dev.snapshot_bytes(1, 16);
          },
          [&] {
            ++made;
            return dev.save_slot(1, 16);
          });
    };
    insert();
    const bool fits = budget >= entry;
    EXPECT_EQ(sized, 1) << "budget " << budget;
    EXPECT_EQ(made, fits ? 1 : 0) << "budget " << budget;
    insert();
    EXPECT_EQ(sized, fits ? 1 : 2) << "budget " << budget;
    EXPECT_EQ(made, fits ? 1 : 0) << "budget " << budget;
    EXPECT_EQ(cache.entries(), fits ? 1u : 0u) << "budget " << budget;
    EXPECT_EQ(cache.bytes(), fits ? entry : 0u) << "budget " << budget;
  }
}

// A prompt fed in 64-token forwards ends where one forward ends (CPU and device sessions).
TEST_P(DeviceWiring, ChunkedPrefillEqualsOneForward) {
  HLA_REQUIRE_FIXTURES();
  auto m = Model::load(fixture("models/" + GetParam()));
  std::vector<int64_t> prompt;
  for (int64_t t = 0; t < 150; ++t) prompt.push_back((t * 37 + 11) % m->spec().vocab);
  const std::vector<float> whole = Session(*m).append(prompt);
  cpu::CpuDevice dev(1);
  m->bind_device(dev);
  Session cpu_chunked(*m), dev_chunked(*m, dev, 0);
  cpu_chunked.set_prefill_chunk(64), dev_chunked.set_prefill_chunk(64);
  for (const std::vector<float>& got : {cpu_chunked.append(prompt), dev_chunked.append(prompt)}) {
    double err = 0, scale = 0;
    for (size_t v = 0; v < whole.size(); ++v) {
      err = std::max(err, double(std::fabs(got[v] - whole[v])));
      scale = std::max(scale, double(std::fabs(whole[v])));
    }
    EXPECT_LT(err / scale, 1e-5);
  }
  EXPECT_EQ(dev_chunked.length(), 150);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DeviceWiring,
                         ::testing::Values("qwen3_next", "qwen3_5", "kimi_linear", "deepseek_v32"));

TEST(DeviceWiring, HybridLayersEqualCpuForward) {
  for (bool neg_eigval : {false, true}) {
    const nlohmann::json j = tiny_hybrid_config("KGAWS", false, 3, neg_eigval);
    const ModelSpec s = parse_model_spec(Config(j, "test-config.json"));
    auto m = Model::random(s, 11, nullptr);
    cpu::CpuDevice dev(3);
    const DeviceModelErrors e = compare_device_model(*m, dev, 17, 9);
    EXPECT_LT(e.prefill, 1e-5) << "neg eigval " << neg_eigval;
    EXPECT_LT(e.decode, 1e-5) << "neg eigval " << neg_eigval;
  }
}

TEST(DeviceWiring, LightningIsRefusedByName) {
  const nlohmann::json j = {{"model_type", "hla_hybrid"}, {"vocab_size", 8},  {"hidden_size", 8},
                            {"num_hidden_layers", 1},      {"layer_pattern", "L"}, {"intermediate_size", 8},
                            {"linear_num_value_heads", 2}, {"linear_key_head_dim", 4}};
  auto m = Model::random(parse_model_spec(Config(j, "test-config.json")), 1, nullptr);
  cpu::CpuDevice dev(1);
  try {
    m->bind_device(dev);
    FAIL() << "lightning layers bound to a device";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lightning"), std::string::npos) << e.what();
  }
}

}  // namespace
