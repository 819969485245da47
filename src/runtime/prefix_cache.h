// PrefixCache: snapshots of a sequence's whole hybrid cache (recurrent state + conv state + KV
// rows) taken at block boundaries of its prompt, so a later request that shares the prefix starts
// from the snapshot instead of re-running its prefill. Recurrent state cannot be rolled back, so a
// snapshot must be taken exactly at the boundary; the engine prefills in block-aligned chunks.
// LRU-evicted under a byte budget. Not thread-safe: the engine thread owns it.
// Snapshot: SequenceCache (the CPU engine's caches, copied in and out) or DeviceSnapshot (a device
// cache slot's copy in the device's memory, freed on eviction).
#pragma once
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "backends/device.h"
#include "model/cache.h"

namespace hla {

using DeviceSnapshot = std::unique_ptr<Device::SlotSnapshot>;

template <class Snapshot>
class PrefixCache {
 public:
  PrefixCache(size_t budget_bytes, int64_t block) : budget_(budget_bytes), block_(block) {}
  int64_t block() const { return block_; }
  // Longest snapshot for a proper prefix of `tokens` (at least one token is left to run, since the
  // next logits are needed): returns its length and sets *out to it (valid until the next
  // insert); 0 on a miss.
  int64_t lookup(const std::vector<int64_t>& tokens, const Snapshot** out);
  // Stores make()'s snapshot of a cache that holds exactly tokens[0:length]. Only when that prefix
  // is not stored yet is snapshot_bytes() asked (what make() will hold), and make() runs only when
  // that fits the budget, so a cache larger than the whole budget is never copied.
  void insert(const std::vector<int64_t>& tokens, int64_t length, const std::function<size_t()>& snapshot_bytes,
              const std::function<Snapshot()>& make);
  size_t bytes() const { return bytes_; }
  size_t entries() const { return lru_.size(); }

 private:
  struct Entry {
    std::vector<int64_t> tokens;
    Snapshot snapshot;
    size_t bytes;
  };
  static uint64_t hash(const int64_t* t, int64_t n);
  size_t budget_, bytes_ = 0;
  int64_t block_;
  std::list<Entry> lru_;  // front = most recently used
  std::unordered_map<uint64_t, typename std::list<Entry>::iterator> index_;
};

extern template class PrefixCache<SequenceCache>;
extern template class PrefixCache<DeviceSnapshot>;

}  // namespace hla
