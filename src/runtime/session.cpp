#include "runtime/session.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backends/cpu/nn.h"
#include "core/error.h"

namespace hla {

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  check(p.temperature >= 0, "--temperature must be >= 0");
  check(p.top_p > 0 && p.top_p <= 1, "--top-p must be in (0, 1]");
  check(p.top_k >= 0, "--top-k must be >= 0");
}

int64_t Sampler::sample(const float* logits, int64_t vocab) {
  if (greedy()) return cpu::argmax(logits, vocab);
  // Unnormalised probabilities at this temperature. Sorting a 150k vocabulary for every token would
  // cost more than the forward pass of a small model, so only the candidates get sorted.
  const float mx = *std::max_element(logits, logits + vocab);
  prob_.resize(size_t(vocab));
  for (int64_t i = 0; i < vocab; ++i) prob_[size_t(i)] = std::exp(double(logits[i] - mx) / p_.temperature);
  auto draw = [&](const int64_t* ids, int64_t n, double mass) {  // one id of ids[0..n) by probability
    double u = std::uniform_real_distribution<double>(0.0, mass)(rng_);
    for (int64_t i = 0; i < n; ++i)
      if ((u -= prob_[size_t(ids[i])]) < 0) return ids[i];
    return ids[n - 1];  // u landed on the rounding slack at the very end
  };
  idx_.resize(size_t(vocab));
  std::iota(idx_.begin(), idx_.end(), int64_t(0));
  if (p_.top_k == 0 && p_.top_p >= 1.0f)
    return draw(idx_.data(), vocab, std::accumulate(prob_.begin(), prob_.end(), 0.0));
  auto more_likely = [&](int64_t a, int64_t b) { return prob_[size_t(a)] != prob_[size_t(b)] ? prob_[size_t(a)] > prob_[size_t(b)] : a < b; };
  // The k most likely (top_k), sorted; the nucleus is the shortest prefix of them holding top_p of
  // their mass. Without top_k, the candidate set doubles until it holds the nucleus.
  const int64_t k = p_.top_k > 0 ? std::min(p_.top_k, vocab) : vocab;
  double total = 0;
  if (p_.top_k > 0) {
    std::nth_element(idx_.begin(), idx_.begin() + (k - 1), idx_.end(), more_likely);
    for (int64_t i = 0; i < k; ++i) total += prob_[size_t(idx_[size_t(i)])];
  } else {
    total = std::accumulate(prob_.begin(), prob_.end(), 0.0);
  }
  for (int64_t n = std::min<int64_t>(k, 64);; n = std::min(k, 2 * n)) {
    if (n < k) std::nth_element(idx_.begin(), idx_.begin() + (n - 1), idx_.begin() + k, more_likely);
    std::sort(idx_.begin(), idx_.begin() + n, more_likely);
    double mass = 0;
    for (int64_t i = 0; i < n; ++i) {
      mass += prob_[size_t(idx_[size_t(i)])];
      if (mass >= p_.top_p * total) return draw(idx_.data(), i + 1, mass);
    }
    if (n == k) return draw(idx_.data(), n, mass);
  }
}

void Session::set_prefill_chunk(int64_t n) {
  check(n > 0, "internal: prefill chunk must be positive");
  prefill_chunk_ = n;
}

DevBatch Session::device_batch(int64_t n) {
  DevBatch b{{0, n}, {slot_}, {dev_length_}};
  dev_length_ += n;
  return b;
}

Tensor Session::forward_piece(const std::vector<int64_t>& piece) {
  const int64_t n = int64_t(piece.size());
  if (dev_) {
    DevBatch b = device_batch(n);
    return model_.forward(*dev_, piece, b, false);
  }
  SeqBatch b{{0, n}, {&cache_}};
  return model_.forward(piece, b, false);
}

std::vector<int64_t> Session::fold_all_but_last(const std::vector<int64_t>& ids) {
  check(!ids.empty(), "empty prompt");
  size_t done = 0;
  for (; ids.size() - done > size_t(prefill_chunk_); done += size_t(prefill_chunk_))
    forward_piece(std::vector<int64_t>(ids.begin() + std::ptrdiff_t(done),
                                       ids.begin() + std::ptrdiff_t(done + size_t(prefill_chunk_))));
  return std::vector<int64_t>(ids.begin() + std::ptrdiff_t(done), ids.end());
}

std::vector<float> Session::append(const std::vector<int64_t>& ids) {
  const Tensor logits = forward_piece(fold_all_but_last(ids));
  return std::vector<float>(logits.f32(), logits.f32() + logits.numel());
}

int64_t Session::append_greedy(const std::vector<int64_t>& ids) {
  check(dev_ != nullptr, "internal: append_greedy runs on a device");
  const std::vector<int64_t> piece = fold_all_but_last(ids);
  DevBatch b = device_batch(int64_t(piece.size()));
  return model_.forward_greedy(*dev_, piece, b)[0];
}

std::vector<int64_t> Session::generate(const std::vector<int64_t>& prompt, int64_t max_new, Sampler& sampler,
                                       const std::vector<int64_t>& eos, const std::function<bool(int64_t)>& on_token) {
  check(max_new >= 0, "--max-new-tokens must be >= 0");
  std::vector<int64_t> out;
  if (max_new == 0) return out;
  // On a device a greedy pick happens there: one id per step comes back instead of the logits.
  auto next = [&](const std::vector<int64_t>& ids) {
    if (dev_ && sampler.greedy()) return append_greedy(ids);
    const std::vector<float> logits = append(ids);
    return sampler.sample(logits.data(), int64_t(logits.size()));
  };
  for (int64_t id = next(prompt);; id = next({id})) {
    out.push_back(id);
    if (on_token && !on_token(id)) break;
    if (std::find(eos.begin(), eos.end(), id) != eos.end() || int64_t(out.size()) >= max_new) break;
  }
  return out;
}

}  // namespace hla
