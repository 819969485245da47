#include "runtime/session.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace hla {

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  check(p.temperature >= 0, "--temperature must be >= 0");
  check(p.top_p > 0 && p.top_p <= 1, "--top-p must be in (0, 1]");
  check(p.top_k >= 0, "--top-k must be >= 0");
}

int64_t Sampler::sample(const float* logits, int64_t vocab) {
  if (p_.temperature == 0.0f)  // greedy; the lowest id wins ties, as torch.argmax
    return int64_t(std::max_element(logits, logits + vocab) - logits);
  std::vector<int64_t> idx(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = p_.top_k > 0 ? std::min(p_.top_k, vocab) : vocab;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
    return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
  });
  idx.resize(size_t(k));
  std::vector<double> prob(idx.size());
  const double mx = logits[idx[0]];
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i) sum += prob[i] = std::exp((logits[idx[i]] - mx) / p_.temperature);
  // nucleus: the smallest prefix (by probability) whose mass reaches top_p
  double mass = 0;
  size_t keep = idx.size();
  for (size_t i = 0; i < idx.size(); ++i) {
    mass += prob[i] / sum;
    if (mass >= p_.top_p) {
      keep = i + 1;
      break;
    }
  }
  std::discrete_distribution<size_t> dist(prob.begin(), prob.begin() + long(keep));
  return idx[dist(rng_)];
}

std::vector<float> Session::append(const std::vector<int64_t>& ids) {
  check(!ids.empty(), "empty prompt");
  SeqBatch b{{0, int64_t(ids.size())}, {&cache_}};
  Tensor logits = model_.forward(ids, b, false);
  return std::vector<float>(logits.f32(), logits.f32() + logits.numel());
}

std::vector<int64_t> Session::generate(const std::vector<int64_t>& prompt, int64_t max_new, Sampler& sampler,
                                       const std::vector<int64_t>& eos, const std::function<bool(int64_t)>& on_token) {
  check(max_new >= 0, "--max-new-tokens must be >= 0");
  std::vector<int64_t> out;
  if (max_new == 0) return out;
  std::vector<float> logits = append(prompt);
  while (true) {
    const int64_t id = sampler.sample(logits.data(), int64_t(logits.size()));
    out.push_back(id);
    if (on_token && !on_token(id)) break;
    if (std::find(eos.begin(), eos.end(), id) != eos.end() || int64_t(out.size()) >= max_new) break;
    logits = append({id});
  }
  return out;
}

}  // namespace hla
