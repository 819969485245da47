#include "runtime/engine.h"

#include <algorithm>

#include "core/error.h"

namespace hla {

bool Request::wait(std::vector<int64_t>* out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !tokens_.empty() || finished_; });
  while (!tokens_.empty()) {
    out->push_back(tokens_.front());
    tokens_.pop_front();
  }
  return finished_;
}

bool Request::finished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_;
}

std::string Request::finish_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

void Request::push(int64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tokens_.push_back(id);
  }
  cv_.notify_all();
}

void Request::finish(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
    reason_ = reason;
  }
  cv_.notify_all();
}

Engine::Engine(const Model& model, EngineOptions opt, Device* dev)
    : model_(model),
      opt_(opt),
      dev_(dev),
      prefix_(opt.prefix_cache_bytes, opt.block),
      device_prefix_(opt.prefix_cache_bytes, opt.block) {
  check(!dev || dev->max_slots() >= opt.max_slots, "internal: the device holds fewer cache slots than --max-slots");
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& r : pending_) r->finish("cancelled");
  for (auto& s : slots_) s->req->finish("cancelled");
}

std::shared_ptr<Request> Engine::submit(std::vector<int64_t> prompt, GenerationParams params) {
  auto r = std::make_shared<Request>(std::move(prompt), std::move(params));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stats_.queued + stats_.running >= opt_.max_queued) return nullptr;
    pending_.push_back(r);
    stats_.requests++;
    stats_.queued = int64_t(pending_.size());
  }
  cv_.notify_all();
  return r;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Engine::loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !pending_.empty() || !slots_.empty(); });
      if (stop_) return;
    }
    try {
      step();
    } catch (const std::exception& e) {  // a failed step fails its requests, never the server
      for (auto& s : slots_) s->req->finish(std::string("error: ") + e.what());
      slots_.clear();
    }
  }
}

// The lowest device cache slot no running request holds (there are at least max_slots).
int64_t Engine::free_device_slot() const {
  for (int64_t id = 0;; ++id)
    if (std::none_of(slots_.begin(), slots_.end(), [&](const std::unique_ptr<Slot>& s) { return s->dev_slot == id; }))
      return id;
}

void Engine::emit(Slot& s, int64_t id) {
  s.last = id;
  s.generated++;
  const auto& stop = s.req->params.stop_ids;
  if (std::find(stop.begin(), stop.end(), id) != stop.end()) {
    s.req->finish("stop");
    return;
  }
  s.req->push(id);
  if (s.generated >= s.req->params.max_tokens) s.req->finish("length");
}

void Engine::step() {
  // Admit waiting requests into free slots, each starting from its longest cached prefix.
  std::vector<std::shared_ptr<Request>> admitted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!pending_.empty() && int64_t(slots_.size() + admitted.size()) < opt_.max_slots) {
      admitted.push_back(pending_.front());
      pending_.pop_front();
    }
  }
  int64_t hits = 0, misses = 0, hit_tokens = 0;
  for (auto& r : admitted) {
    auto s = std::make_unique<Slot>(Slot{r, SequenceCache{}, -1, Sampler(r->params.sampling)});
    if (dev_) {
      s->dev_slot = free_device_slot();
      const DeviceSnapshot* snap = nullptr;
      s->fed = s->cached = device_prefix_.lookup(r->prompt, &snap);
      if (snap)
        dev_->load_slot(**snap, s->dev_slot);
      else
        dev_->reset_slot(s->dev_slot);
    } else {
      const SequenceCache* snap = nullptr;
      s->fed = s->cached = prefix_.lookup(r->prompt, &snap);
      s->cache = snap ? *snap : model_.new_cache();
    }
    r->cached_tokens_ = s->fed;
    (s->fed > 0 ? hits : misses)++;
    hit_tokens += s->fed;
    slots_.push_back(std::move(s));
  }
  // Cancelled requests (client gone) free their slot now.
  slots_.erase(std::remove_if(slots_.begin(), slots_.end(),
                              [](const std::unique_ptr<Slot>& s) {
                                if (!s->req->cancelled()) return false;
                                s->req->finish("cancelled");
                                return true;
                              }),
               slots_.end());
  // Pack: decoding slots feed their last token; prefilling slots a chunk that ends at the next
  // block boundary (so its state can be snapshotted there) within the step's token budget.
  std::vector<int64_t> ids, cu{0};
  std::vector<Slot*> in_batch;
  std::vector<int64_t> chunk;
  int64_t budget = opt_.max_step_tokens;
  for (auto& s : slots_)
    if (s->fed == int64_t(s->req->prompt.size())) {
      ids.push_back(s->last);
      in_batch.push_back(s.get()), chunk.push_back(0), budget--;
    }
  for (auto& s : slots_) {
    const int64_t left = int64_t(s->req->prompt.size()) - s->fed;
    if (left == 0 || budget <= 0) continue;
    const int64_t n = std::min({left, opt_.block - s->fed % opt_.block, budget});
    ids.insert(ids.end(), s->req->prompt.begin() + s->fed, s->req->prompt.begin() + s->fed + n);
    in_batch.push_back(s.get()), chunk.push_back(n), budget -= n;
  }
  for (size_t i = 0; i < in_batch.size(); ++i) cu.push_back(cu.back() + std::max<int64_t>(chunk[i], 1));
  int64_t prompt_tokens = 0, generated = 0;
  if (!in_batch.empty()) {
    // A row picks a token when its sequence decodes or its prompt ends in this step.
    std::vector<bool> picks(in_batch.size());
    bool all_greedy = true;
    for (size_t i = 0; i < in_batch.size(); ++i) {
      const Slot& s = *in_batch[i];
      picks[i] = chunk[i] == 0 || (s.fed + chunk[i] == int64_t(s.req->prompt.size()) && s.req->params.max_tokens > 0);
      all_greedy = all_greedy && (!picks[i] || s.sampler.greedy());
    }
    // On a device with only greedy picks, they happen there: ids come back instead of logits.
    Tensor logits;
    std::vector<int64_t> best;
    if (dev_) {
      DevBatch b{cu, {}, {}};
      for (Slot* s : in_batch) b.slots.push_back(s->dev_slot), b.past.push_back(s->cached);
      if (all_greedy) best = model_.forward_greedy(*dev_, ids, b);
      else logits = model_.forward(*dev_, ids, b, false);
    } else {
      SeqBatch b{cu, {}};
      for (Slot* s : in_batch) b.caches.push_back(&s->cache);
      logits = model_.forward(ids, b, false);  // one row per sequence: its last token
    }
    for (size_t i = 0; i < in_batch.size(); ++i) {
      Slot& s = *in_batch[i];
      s.cached += std::max<int64_t>(chunk[i], 1);
      if (chunk[i] > 0) {
        s.fed += chunk[i], prompt_tokens += chunk[i];
        if (s.fed % opt_.block == 0) {
          if (dev_)
            device_prefix_.insert(
                s.req->prompt, s.fed, [&] { return dev_->snapshot_bytes(s.dev_slot, s.fed); },
                [&] { return dev_->save_slot(s.dev_slot, s.fed); });
          else
            prefix_.insert(
                s.req->prompt, s.fed, [&] { return s.cache.bytes(); }, [&] { return s.cache; });
        }
        if (s.fed == int64_t(s.req->prompt.size()) && s.req->params.max_tokens == 0) s.req->finish("length");
      }
      if (!picks[i]) continue;
      emit(s, best.empty() ? s.sampler.sample(logits.f32() + int64_t(i) * model_.spec().vocab, model_.spec().vocab)
                           : best[i]);
      generated++;
    }
  }
  // Finished requests leave their slots.
  slots_.erase(std::remove_if(slots_.begin(), slots_.end(), [](const std::unique_ptr<Slot>& s) { return s->req->finished(); }),
               slots_.end());
  std::lock_guard<std::mutex> lock(mu_);
  stats_.prompt_tokens += prompt_tokens;
  stats_.generated_tokens += generated;
  stats_.prefix_hits += hits, stats_.prefix_misses += misses, stats_.prefix_hit_tokens += hit_tokens;
  stats_.queued = int64_t(pending_.size());
  stats_.running = int64_t(slots_.size());
  stats_.prefix_cache_bytes = dev_ ? device_prefix_.bytes() : prefix_.bytes();
  stats_.steps++;
}

}  // namespace hla
