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

Engine::Engine(const Model& model, EngineOptions opt)
    : model_(model), opt_(opt), prefix_(opt.prefix_cache_bytes, opt.block), thread_([this] { loop(); }) {}

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

void Engine::emit(Slot& s, const float* logits) {
  const int64_t id = s.sampler.sample(logits, model_.spec().vocab);
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
    auto s = std::make_unique<Slot>(Slot{r, model_.new_cache(), Sampler(r->params.sampling)});
    s->fed = prefix_.lookup(r->prompt, &s->cache);
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
  std::vector<int64_t> ids;
  SeqBatch batch;
  batch.cu_seqlens = {0};
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
  for (size_t i = 0; i < in_batch.size(); ++i) {
    batch.cu_seqlens.push_back(batch.cu_seqlens.back() + std::max<int64_t>(chunk[i], 1));
    batch.caches.push_back(&in_batch[i]->cache);
  }
  int64_t prompt_tokens = 0, generated = 0;
  if (!in_batch.empty()) {
    Tensor logits = model_.forward(ids, batch, false);  // one row per sequence: its last token
    for (size_t i = 0; i < in_batch.size(); ++i) {
      Slot& s = *in_batch[i];
      const float* row = logits.f32() + int64_t(i) * model_.spec().vocab;
      if (chunk[i] == 0) {
        emit(s, row), generated++;
        continue;
      }
      s.fed += chunk[i], prompt_tokens += chunk[i];
      if (s.fed % opt_.block == 0) prefix_.insert(s.req->prompt, s.fed, s.cache);
      if (s.fed == int64_t(s.req->prompt.size())) {
        if (s.req->params.max_tokens == 0) s.req->finish("length");
        else emit(s, row), generated++;
      }
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
  stats_.prefix_cache_bytes = prefix_.bytes();
  stats_.steps++;
}

}  // namespace hla
