// hla bench --model DIR [--prefill 1024,8192,32768] [--decode-batch 1,16,64] [--decode-steps N]
// [--chunk C] [--seed S]: the model benchmark for any checkpoint (real, or from `hla init`), on
// random token ids. Prefill: one prompt of each length, fed in chunks of C tokens as the server
// does, timed whole. Decode: B sequences after a 128-token prompt each, then N steps of one token
// per sequence in one packed forward (the first step is a warm-up, not timed). One CSV row per case:
//   case,tokens,seconds,tokens_per_s,cache_mib,peak_rss_mib
// cache_mib: the hybrid cache the case holds at its end (KV of full-attention layers grows with the
// context, linear layers' state does not); peak_rss_mib: the process's peak resident memory so far.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>

#include "apps/commands.h"
#include "core/error.h"
#include "model/model.h"

namespace hla::cli {

namespace {

struct BenchOptions {
  std::string model, device = "cpu";
  std::vector<int64_t> prefill{1024, 8192, 32768}, batches{1, 16, 64};
  int64_t steps = 32, chunk = 2048;
  uint64_t seed = 0;
};

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

double mib(size_t bytes) { return double(bytes) / (1024.0 * 1024.0); }

class Bench {
 public:
  Bench(const Model& m, uint64_t seed) : m_(m), rng_(seed), vocab_(m.spec().vocab) {}

  std::vector<int64_t> random_ids(int64_t n) {
    std::uniform_int_distribution<int64_t> u(0, vocab_ - 1);
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (auto& id : ids) id = u(rng_);
    return ids;
  }

  // Folds `n` tokens of every cache in `caches` into them, one packed forward.
  void step(std::vector<SequenceCache>& caches, int64_t n) {
    SeqBatch b;
    b.cu_seqlens = {0};
    for (auto& c : caches) b.caches.push_back(&c), b.cu_seqlens.push_back(b.cu_seqlens.back() + n);
    m_.forward(random_ids(n * int64_t(caches.size())), b, false);
  }

  void prefill(int64_t len, int64_t chunk) {
    std::vector<SequenceCache> c{m_.new_cache()};
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t done = 0; done < len; done += chunk) step(c, std::min(chunk, len - done));
    row("prefill_" + std::to_string(len), len, seconds_since(t0), c);
  }

  void decode(int64_t batch, int64_t steps) {
    std::vector<SequenceCache> c;
    for (int64_t i = 0; i < batch; ++i) c.push_back(m_.new_cache());
    step(c, 128);
    step(c, 1);  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < steps; ++s) step(c, 1);
    row("decode_batch_" + std::to_string(batch), batch * steps, seconds_since(t0), c);
  }

 private:
  static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  static void row(const std::string& name, int64_t tokens, double s, const std::vector<SequenceCache>& caches) {
    size_t bytes = 0;
    for (const auto& c : caches) bytes += c.bytes();
    std::printf("%s,%lld,%.4f,%.1f,%.2f,%.1f\n", name.c_str(), (long long)tokens, s, double(tokens) / s, mib(bytes),
                peak_rss_mib());
    std::fflush(stdout);
  }

  const Model& m_;
  std::mt19937_64 rng_;
  int64_t vocab_;
};

}  // namespace

void register_bench(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench", "Prefill and decode speed and memory of a model on random token ids (CSV)");
  auto o = std::make_shared<BenchOptions>();
  cmd->add_option("--model", o->model, "model directory")->required();
  cmd->add_option("--prefill", o->prefill, "prompt lengths, comma-separated")->delimiter(',')->capture_default_str();
  cmd->add_option("--decode-batch", o->batches, "decode batch sizes, comma-separated")->delimiter(',')->capture_default_str();
  cmd->add_option("--decode-steps", o->steps, "timed decode steps per batch size")->capture_default_str();
  cmd->add_option("--chunk", o->chunk, "prefill chunk (tokens per forward)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "seed of the random token ids")->capture_default_str();
  cmd->add_option("--device", o->device, "cpu or cuda")->default_val("cpu");
  cmd->callback([o] {
    require_cpu_model_device(o->device);
    for (int64_t n : o->prefill) check(n > 0, "--prefill: lengths must be positive (got " + std::to_string(n) + ")");
    for (int64_t n : o->batches) check(n > 0, "--decode-batch: sizes must be positive (got " + std::to_string(n) + ")");
    check(o->steps > 0, "--decode-steps must be positive");
    check(o->chunk > 0, "--chunk must be positive");
    auto m = Model::load(o->model);
    std::printf("case,tokens,seconds,tokens_per_s,cache_mib,peak_rss_mib\n");
    Bench b(*m, o->seed);
    for (int64_t n : o->prefill) b.prefill(n, o->chunk);
    for (int64_t n : o->batches) b.decode(n, o->steps);
  });
}

}  // namespace hla::cli
