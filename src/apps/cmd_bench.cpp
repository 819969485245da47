// hla bench --model DIR [--prefill 1024,8192,32768] [--decode-batch 1,16,64] [--decode-steps N]
// [--chunk C] [--seed S]: the model benchmark for any checkpoint (real, or from `hla init`), on
// random token ids. Prefill: one prompt of each length, fed in chunks of C tokens as the server
// does, timed whole. Decode: B sequences after a 128-token prompt each (--decode-prompt), then N steps of one token
// per sequence in one packed forward (the first step is a warm-up, not timed), each step's input the
// previous step's greedy pick (made on the device there, as transformers' greedy generate does). One CSV row per case:
//   case,tokens,seconds,tokens_per_s,cache_mib,peak_rss_mib,device_mib
// cache_mib: the hybrid cache the case holds at its end (KV of full-attention layers grows with the
// context, linear layers' state does not); peak_rss_mib: the process's peak resident memory so far;
// device_mib: GPU memory in use after the case (weights, cache, scratch; 0 on the CPU).
// --device cuda runs the model on the GPU (--dtype bf16, the default there, or f32).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>

#include "apps/commands.h"
#include "backends/cpu/nn.h"
#include "core/error.h"
#include "model/model.h"

namespace hla::cli {

namespace {

struct BenchOptions {
  std::string model, device = "cpu", dtype;  // dtype "": bf16 on the GPU, f32 on the CPU
  std::vector<int64_t> prefill{1024, 8192, 32768}, batches{1, 16, 64};
  int64_t steps = 32, chunk = 2048, decode_prompt = 128;
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
  Bench(const Model& m, Device* dev, uint64_t seed) : m_(m), dev_(dev), rng_(seed), vocab_(m.spec().vocab) {}

  std::vector<int64_t> random_ids(int64_t n) {
    std::uniform_int_distribution<int64_t> u(0, vocab_ - 1);
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (auto& id : ids) id = u(rng_);
    return ids;
  }

  void prefill(int64_t len, int64_t chunk) {
    auto run = [&](Seqs& s) {
      for (int64_t done = 0; done < len; done += chunk) {
        const int64_t n = std::min(chunk, len - done);
        step(s, random_ids(n), n);
      }
    };
    if (dev_) {  // a GPU's first forward of a shape sets up (GEMM plans, scratch): untimed run first
      Seqs w = open(1);
      run(w);
    }
    Seqs s = open(1);
    const auto t0 = std::chrono::steady_clock::now();
    run(s);
    row("prefill_" + std::to_string(len), len, seconds_since(t0), s);
  }

  void decode(int64_t batch, int64_t steps, int64_t prompt) {
    Seqs s = open(batch);
    std::vector<int64_t> next = step(s, random_ids(prompt * batch), prompt);
    next = step(s, next, 1);  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < steps; ++i) next = step(s, next, 1);
    row("decode_batch_" + std::to_string(batch), batch * steps, seconds_since(t0), s);
  }

 private:
  // B sequences: CPU caches, or device slots 0..B−1 with their lengths.
  struct Seqs {
    std::vector<SequenceCache> caches;
    std::vector<int64_t> past;
  };
  Seqs open(int64_t B) {
    Seqs s;
    s.past.assign(size_t(B), 0);
    for (int64_t i = 0; i < B; ++i) {
      if (dev_) dev_->reset_slot(i);
      else s.caches.push_back(m_.new_cache());
    }
    return s;
  }
  // Folds ids, n per sequence, into every sequence of s in one packed forward; returns each
  // sequence's greedy next id.
  std::vector<int64_t> step(Seqs& s, const std::vector<int64_t>& ids, int64_t n) {
    const int64_t B = int64_t(s.past.size());
    std::vector<int64_t> cu{0};
    for (int64_t i = 0; i < B; ++i) cu.push_back(cu.back() + n);
    std::vector<int64_t> next;
    if (dev_) {
      DevBatch b{cu, {}, s.past};
      for (int64_t i = 0; i < B; ++i) b.slots.push_back(i);
      next = m_.forward_greedy(*dev_, ids, b);
    } else {
      SeqBatch b{cu, {}};
      for (auto& c : s.caches) b.caches.push_back(&c);
      const Tensor logits = m_.forward(ids, b, false);
      for (int64_t i = 0; i < B; ++i) next.push_back(cpu::argmax(logits.f32() + i * vocab_, vocab_));
    }
    for (auto& p : s.past) p += n;
    return next;
  }
  static double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  void row(const std::string& name, int64_t tokens, double s, const Seqs& seqs) const {
    size_t bytes = 0;
    for (const auto& c : seqs.caches) bytes += c.bytes();
    if (dev_)
      for (int64_t i = 0; i < int64_t(seqs.past.size()); ++i) bytes += size_t(dev_->slot_bytes(i));
    std::printf("%s,%lld,%.4f,%.1f,%.2f,%.1f,%.1f\n", name.c_str(), (long long)tokens, s, double(tokens) / s, mib(bytes),
                peak_rss_mib(), dev_ ? mib(size_t(dev_->memory_bytes())) : 0.0);
    std::fflush(stdout);
  }

  const Model& m_;
  Device* dev_;
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
  cmd->add_option("--decode-prompt", o->decode_prompt, "prompt tokens per sequence before decode")->capture_default_str();
  cmd->add_option("--seed", o->seed, "seed of the random token ids")->capture_default_str();
  cmd->add_option("--device", o->device, "cpu or cuda")->default_val("cpu");
  cmd->add_option("--dtype", o->dtype, "weights: f32 or bf16 (default bf16 on the GPU; the CPU computes in f32 only)");
  cmd->callback([o] {
    if (o->dtype.empty()) o->dtype = o->device == "cuda" ? "bf16" : "f32";
    for (int64_t n : o->prefill) check(n > 0, "--prefill: lengths must be positive (got " + std::to_string(n) + ")");
    for (int64_t n : o->batches) check(n > 0, "--decode-batch: sizes must be positive (got " + std::to_string(n) + ")");
    check(o->steps > 0, "--decode-steps must be positive");
    check(o->chunk > 0, "--chunk must be positive");
    check(o->decode_prompt > 0, "--decode-prompt must be positive");
    const int64_t slots = *std::max_element(o->batches.begin(), o->batches.end());
    std::unique_ptr<Device> dev = open_device(o->device, o->dtype, slots);
    auto m = Model::load(o->model);
    if (dev) m->bind_device(*dev);
    std::printf("case,tokens,seconds,tokens_per_s,cache_mib,peak_rss_mib,device_mib\n");
    Bench b(*m, dev.get(), o->seed);
    for (int64_t n : o->prefill) b.prefill(n, o->chunk);
    for (int64_t n : o->batches) b.decode(n, o->steps, o->decode_prompt);
  });
}

}  // namespace hla::cli
