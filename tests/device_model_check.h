// Model::forward on a Device against the plain CPU forward (the oracle): a packed prefill of several
// sequences with every token's logits, then prefill + batched decode of two sequences at different
// positions (one token each per step, the decode path). Shared by the CpuDevice test (the wiring)
// and the CUDA test (the kernels).
#pragma once
#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "model/model.h"

namespace hla {

struct DeviceModelErrors {
  double prefill = 0, decode = 0;  // max|device − cpu| / max|cpu| over the logits compared
  // Decode steps whose argmax differs although the CPU's best logit leads the second by more than
  // 2e-4 of the largest (twice what the fp32 bar lets either side move): greedy decoding diverged.
  int64_t greedy_flips = 0;
};

inline DeviceModelErrors compare_device_model(Model& m, Device& dev, int64_t T, uint32_t seed) {
  const int64_t V = m.spec().vocab, B = 3;
  std::mt19937 rng(seed);
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(B));
  for (auto& r : rows)
    for (int64_t t = 0; t < T; ++t) r.push_back(int64_t(rng() % uint32_t(V)));
  // The oracle: every row's full forward on the CPU.
  std::vector<Tensor> ref;
  for (auto& r : rows) {
    SequenceCache c = m.new_cache();
    SeqBatch sb{{0, T}, {&c}};
    ref.push_back(m.forward(r, sb, true));
  }
  auto err = [&](const float* got, const Tensor& want, int64_t t, double& worst) {
    double e = 0, scale = 0;
    for (int64_t v = 0; v < V; ++v) {
      e = std::max(e, double(std::fabs(got[v] - want.f32()[t * V + v])));
      scale = std::max(scale, double(std::fabs(want.f32()[t * V + v])));
    }
    worst = std::max(worst, e / scale);
  };
  DeviceModelErrors out;
  m.bind_device(dev);
  // 1. All rows at once, lengths T, T−3, T (odd ones), every token's logits.
  {
    DevBatch b;
    b.cu_seqlens = {0};
    std::vector<int64_t> ids;
    const int64_t len[3] = {T, T - 3, T};
    for (int64_t i = 0; i < B; ++i) {
      dev.reset_slot(i);
      ids.insert(ids.end(), rows[size_t(i)].begin(), rows[size_t(i)].begin() + len[i]);
      b.cu_seqlens.push_back(b.cu_seqlens.back() + len[i]);
      b.slots.push_back(i), b.past.push_back(0);
    }
    Tensor logits = m.forward(dev, ids, b, true);
    for (int64_t i = 0; i < B; ++i)
      for (int64_t t = 0; t < len[i]; ++t) err(logits.f32() + (b.cu_seqlens[size_t(i)] + t) * V, ref[size_t(i)], t, out.prefill);
  }
  // 2. Row 0 prefilled with 5 tokens in slot 2 and row 1 with 9 in slot 0, then both decode one
  // token per step together until row 1 ends.
  {
    const int64_t pre[2] = {5, 9}, slot[2] = {2, 0};
    for (int64_t i = 0; i < 2; ++i) {
      dev.reset_slot(slot[i]);
      DevBatch b{{0, pre[i]}, {slot[i]}, {0}};
      Tensor l = m.forward(dev, std::vector<int64_t>(rows[size_t(i)].begin(), rows[size_t(i)].begin() + pre[i]), b, false);
      err(l.f32(), ref[size_t(i)], pre[i] - 1, out.decode);
    }
    for (int64_t step = 0; pre[1] + step < T; ++step) {
      DevBatch b{{0, 1, 2}, {slot[0], slot[1]}, {pre[0] + step, pre[1] + step}};
      Tensor l = m.forward(dev, {rows[0][size_t(pre[0] + step)], rows[1][size_t(pre[1] + step)]}, b, false);
      for (int64_t i = 0; i < 2; ++i) {
        const float* got = l.f32() + i * V;
        const float* want = ref[size_t(i)].f32() + (pre[i] + step) * V;
        err(got, ref[size_t(i)], pre[i] + step, out.decode);
        std::vector<float> sorted(want, want + V);
        std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
        float scale = 0;
        for (int64_t v = 0; v < V; ++v) scale = std::max(scale, std::fabs(want[v]));
        if (std::max_element(got, got + V) - got != std::max_element(want, want + V) - want &&
            sorted[0] - sorted[1] > 2e-4f * scale)
          ++out.greedy_flips;
      }
    }
  }
  return out;
}

}  // namespace hla
