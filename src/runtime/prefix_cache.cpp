#include "runtime/prefix_cache.h"

#include <algorithm>

namespace hla {
template <class Snapshot>
uint64_t PrefixCache<Snapshot>::hash(const int64_t* t, int64_t n) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the ids' bytes
  for (int64_t i = 0; i < n; ++i)
    for (int b = 0; b < 8; ++b) h = (h ^ ((uint64_t(t[i]) >> (8 * b)) & 0xff)) * 1099511628211ull;
  return h ^ uint64_t(n);
}

template <class Snapshot>
int64_t PrefixCache<Snapshot>::lookup(const std::vector<int64_t>& tokens, const Snapshot** out) {
  const int64_t n = int64_t(tokens.size());
  for (int64_t len = ((n - 1) / block_) * block_; len > 0; len -= block_) {
    auto it = index_.find(hash(tokens.data(), len));
    if (it == index_.end()) continue;
    const Entry& e = *it->second;
    if (int64_t(e.tokens.size()) != len || !std::equal(e.tokens.begin(), e.tokens.end(), tokens.begin())) continue;
    lru_.splice(lru_.begin(), lru_, it->second);
    *out = &e.snapshot;
    return len;
  }
  return 0;
}

template <class Snapshot>
void PrefixCache<Snapshot>::insert(const std::vector<int64_t>& tokens, int64_t length,
                                   const std::function<size_t()>& snapshot_bytes,
                                   const std::function<Snapshot()>& make) {
  const uint64_t h = hash(tokens.data(), length);
  if (index_.count(h)) {
    lru_.splice(lru_.begin(), lru_, index_[h]);
    return;
  }
  const size_t b = snapshot_bytes() + size_t(length) * sizeof(int64_t);
  if (b > budget_) return;
  Snapshot snapshot = make();
  while (bytes_ + b > budget_ && !lru_.empty()) {
    const Entry& victim = lru_.back();
    bytes_ -= victim.bytes;
    index_.erase(hash(victim.tokens.data(), int64_t(victim.tokens.size())));
    lru_.pop_back();
  }
  lru_.push_front(Entry{std::vector<int64_t>(tokens.begin(), tokens.begin() + length), std::move(snapshot), b});
  index_[h] = lru_.begin();
  bytes_ += b;
}

template class PrefixCache<SequenceCache>;
template class PrefixCache<DeviceSnapshot>;

}  // namespace hla
