// Engine: continuous batching for the server. One engine thread owns the model's compute; every
// step it packs, into one Model::forward, one token of each decoding request plus block-aligned
// prompt chunks of the requests still in prefill (chunked prefill), samples, and streams tokens to
// the waiting request handles. Each request lives in a slot holding its own hybrid cache; prompts
// start from the longest prefix snapshot in the PrefixCache. On a device (the model bound to it)
// each request's cache is one of the device's cache slots instead, and the prefix snapshots are
// copies of slots in the device's memory (Device::save_slot / load_slot).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/model.h"
#include "runtime/prefix_cache.h"
#include "runtime/session.h"

namespace hla {

struct GenerationParams {
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int64_t> stop_ids;  // finish after any of these (not included in the output)
};

// Shared by the engine thread (producer) and one HTTP handler (consumer).
class Request {
 public:
  Request(std::vector<int64_t> prompt, GenerationParams p) : prompt(std::move(prompt)), params(std::move(p)) {}
  const std::vector<int64_t> prompt;
  const GenerationParams params;

  // Waits up to `timeout` for new tokens; appends them to *out. Returns true once finished and
  // every token has been handed out.
  bool wait(std::vector<int64_t>* out, std::chrono::milliseconds timeout);
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  bool finished() const;
  std::string finish_reason() const;  // "stop", "length", "cancelled" or "error: ..."
  int64_t cached_prompt_tokens() const { return cached_tokens_; }

 private:
  friend class Engine;
  void push(int64_t id);
  void finish(const std::string& reason);
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<int64_t> tokens_;
  bool finished_ = false;
  std::string reason_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int64_t> cached_tokens_{0};
};

struct EngineOptions {
  int64_t max_slots = 32;             // requests decoding at once
  int64_t max_queued = 256;           // waiting + running; beyond this submit() refuses
  int64_t max_step_tokens = 512;      // tokens per forward: bounds the decode stall a prefill causes
                                      // (hla serve: 2048 on a GPU, where 512-token forwards idle it)
  int64_t block = 256;                // prefix-cache granularity = prefill chunk alignment
  size_t prefix_cache_bytes = size_t(1) << 30;
};

struct EngineStats {
  int64_t requests = 0, prompt_tokens = 0, generated_tokens = 0, queued = 0, running = 0;
  int64_t prefix_hits = 0, prefix_misses = 0, prefix_hit_tokens = 0, steps = 0;
  size_t prefix_cache_bytes = 0;
};

class Engine {
 public:
  // dev: run on this device (model bound to it, at least opt.max_slots cache slots); null: the CPU.
  Engine(const Model& model, EngineOptions opt, Device* dev = nullptr);
  ~Engine();
  // nullptr when the engine is at max_queued (the server answers 429).
  std::shared_ptr<Request> submit(std::vector<int64_t> prompt, GenerationParams params);
  EngineStats stats() const;
  const Model& model() const { return model_; }

 private:
  struct Slot {
    std::shared_ptr<Request> req;
    SequenceCache cache;  // on the CPU
    int64_t dev_slot;     // on a device: its cache slot
    Sampler sampler;
    int64_t fed = 0;        // prompt tokens folded into the cache
    int64_t cached = 0;     // tokens in the cache (prompt and generated)
    int64_t last = -1;      // last sampled token (decode input)
    int64_t generated = 0;
  };
  void loop();
  void step();
  void emit(Slot& s, int64_t id);
  int64_t free_device_slot() const;

  const Model& model_;
  const EngineOptions opt_;
  Device* dev_;
  PrefixCache<SequenceCache> prefix_;          // on the CPU
  PrefixCache<DeviceSnapshot> device_prefix_;  // on a device
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Request>> pending_;
  std::vector<std::unique_ptr<Slot>> slots_;  // engine thread only
  EngineStats stats_;                          // guarded by mu_
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace hla
