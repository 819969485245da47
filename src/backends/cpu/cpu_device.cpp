#include "backends/cpu/cpu_device.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace hla::cpu {

void CpuDevice::round(float* p, int64_t n) const {
  if (bf16_)
    for (int64_t i = 0; i < n; ++i) p[i] = bf16_to_f32(f32_to_bf16(p[i]));
}

DevMatrix CpuDevice::upload_matrix(const Tensor& w) {
  check(w.dim() >= 2, "internal: upload_matrix of a " + shape_str(w.shape()) + " tensor");
  const float* p = w.f32();
  weights_.emplace_back(p, p + w.numel());
  round(weights_.back().data(), w.numel());
  return {weights_.back().data(), w.size(0), w.numel() / w.size(0)};
}

const float* CpuDevice::upload_vector(const Tensor& v) {
  const float* p = v.f32();
  weights_.emplace_back(p, p + v.numel());
  return weights_.back().data();
}

float* CpuDevice::scratch(int64_t n) {
  scratch_.emplace_back(size_t(std::max<int64_t>(n, 1)));
  return scratch_.back().data();
}

const int32_t* CpuDevice::upload_i32(const std::vector<int32_t>& v) {
  int32_t* p = scratch_i32(int64_t(v.size()));
  std::copy(v.begin(), v.end(), p);
  return p;
}

const float* CpuDevice::upload_f32(const std::vector<float>& v) {
  float* p = scratch(int64_t(v.size()));
  std::copy(v.begin(), v.end(), p);
  return p;
}

void CpuDevice::zero(float* p, int64_t n) { std::fill(p, p + n, 0.0f); }

void CpuDevice::to_host_bytes(const void* src, void* dst, size_t bytes) { std::memcpy(dst, src, bytes); }

float* CpuDevice::cache_pool(int64_t layer, CachePart part, int64_t n) {
  auto& pool = pools_[{layer, part}];
  if (pool.empty()) pool.assign(size_t(slots_ * n), 0.0f);
  check(int64_t(pool.size()) == slots_ * n, "internal: cache part size changed");
  return pool.data();
}

float* CpuDevice::cache_rows(int64_t layer, CachePart part, int64_t slot, int64_t rows, int64_t width) {
  Rows& r = rows_[{layer, part, slot}];
  check(r.v.empty() || r.width == width, "internal: cache rows changed width");
  r.width = width;
  if (int64_t(r.v.size()) < rows * width) r.v.resize(size_t(rows * width));
  return r.v.data();
}

void CpuDevice::reset_slot(int64_t slot) {
  for (auto& [key, pool] : pools_) {
    const size_t n = pool.size() / size_t(slots_);
    std::fill(pool.begin() + std::ptrdiff_t(size_t(slot) * n), pool.begin() + std::ptrdiff_t(size_t(slot + 1) * n), 0.0f);
  }
  for (auto& [key, r] : rows_)
    if (std::get<2>(key) == slot) r.v.clear();
}

namespace {
struct CpuSnapshot : Device::SlotSnapshot {
  std::map<std::pair<int64_t, CachePart>, std::vector<float>> fixed;  // each part's block of the slot
  std::map<std::pair<int64_t, CachePart>, std::pair<std::vector<float>, int64_t>> rows;  // rows, width
  size_t bytes() const override {
    size_t n = 0;
    for (auto& [key, v] : fixed) n += v.size();
    for (auto& [key, r] : rows) n += r.first.size();
    return n * sizeof(float);
  }
};
}  // namespace

size_t CpuDevice::snapshot_bytes(int64_t slot, int64_t rows) const {
  size_t n = 0;
  for (auto& [key, pool] : pools_) n += pool.size() / size_t(slots_);
  for (auto& [key, r] : rows_)
    if (std::get<2>(key) == slot && !r.v.empty()) n += size_t(rows * r.width);
  return n * sizeof(float);
}

std::unique_ptr<Device::SlotSnapshot> CpuDevice::save_slot(int64_t slot, int64_t rows) {
  auto snap = std::make_unique<CpuSnapshot>();
  for (auto& [key, pool] : pools_) {
    const size_t n = pool.size() / size_t(slots_);
    snap->fixed[key].assign(pool.begin() + std::ptrdiff_t(size_t(slot) * n),
                            pool.begin() + std::ptrdiff_t(size_t(slot + 1) * n));
  }
  for (auto& [key, r] : rows_) {
    if (std::get<2>(key) != slot || r.v.empty()) continue;
    check(int64_t(r.v.size()) >= rows * r.width, "internal: a snapshot of more cache rows than the slot holds");
    snap->rows[{std::get<0>(key), std::get<1>(key)}] = {{r.v.begin(), r.v.begin() + std::ptrdiff_t(rows * r.width)},
                                                        r.width};
  }
  return snap;
}

void CpuDevice::load_slot(const SlotSnapshot& snapshot, int64_t slot) {
  const auto& snap = static_cast<const CpuSnapshot&>(snapshot);
  reset_slot(slot);
  for (auto& [key, v] : snap.fixed)
    std::copy(v.begin(), v.end(), cache_pool(key.first, key.second, int64_t(v.size())) + slot * int64_t(v.size()));
  for (auto& [key, r] : snap.rows) {
    const int64_t width = r.second, n = int64_t(r.first.size()) / width;
    std::copy(r.first.begin(), r.first.end(), cache_rows(key.first, key.second, slot, n, width));
  }
}

int64_t CpuDevice::slot_bytes(int64_t slot) const {
  size_t n = 0;
  for (auto& [key, pool] : pools_) n += pool.size() / size_t(slots_);
  for (auto& [key, r] : rows_)
    if (std::get<2>(key) == slot) n += r.v.size();
  return int64_t(n * sizeof(float));
}

int64_t CpuDevice::memory_bytes() const {
  size_t n = 0;
  for (auto* d : {&weights_, &scratch_})
    for (auto& v : *d) n += v.size();
  for (auto& [key, pool] : pools_) n += pool.size();
  for (auto& [key, r] : rows_) n += r.v.size();
  return int64_t(n * sizeof(float));
}

void CpuDevice::linear(const float* x, int64_t ldx, const DevMatrix& W, float* y, int64_t M) {
  const float* w = static_cast<const float*>(W.p);
  if (bf16_) {  // the operand rows as bf16
    std::vector<float> xr(size_t(M * W.cols));
    for (int64_t m = 0; m < M; ++m) std::memcpy(xr.data() + m * W.cols, x + m * ldx, sizeof(float) * size_t(W.cols));
    round(xr.data(), M * W.cols);
    return cpu::linear(xr.data(), w, y, M, W.cols, W.rows);
  }
  if (ldx == W.cols) return cpu::linear(x, w, y, M, W.cols, W.rows);
  for (int64_t m = 0; m < M; ++m) cpu::linear(x + m * ldx, w, y + m * W.rows, 1, W.cols, W.rows);
}

void CpuDevice::embed(const DevMatrix& table, const int32_t* ids, float* out, int64_t T) {
  const float* t = static_cast<const float*>(table.p);
  for (int64_t i = 0; i < T; ++i) std::memcpy(out + i * table.cols, t + ids[i] * table.cols, sizeof(float) * size_t(table.cols));
}

void CpuDevice::add(float* h, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] += y[i];
}

void CpuDevice::residual_norm(const float* h, const float* w, float* x, void* x_op, int64_t rows, int64_t dim,
                              float eps, bool zero_centered) {
  check(x != nullptr && x_op == nullptr, "internal: cpu-device norms write fp32 rows only");
  cpu::rms_norm(h, w, x, rows, dim, eps, zero_centered);
}

void CpuDevice::copy(float* dst, Strides d, const float* src, Strides s, int64_t n0, int64_t n1, int64_t n2) {
  for (int64_t i = 0; i < n0; ++i)
    for (int64_t j = 0; j < n1; ++j)
      for (int64_t k = 0; k < n2; ++k) dst[i * d.s0 + j * d.s1 + k * d.s2] = src[i * s.s0 + j * s.s1 + k * s.s2];
}

void CpuDevice::rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows, int64_t dim,
                         float eps, bool zero_centered) {
  for (int64_t r = 0; r < rows; ++r) cpu::rms_norm(x + r * ldx, w, y + r * ldy, 1, dim, eps, zero_centered);
}

void CpuDevice::layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                           float eps) {
  cpu::layer_norm(x, w, b, y, rows, dim, eps);
}

void CpuDevice::gated_rms_norm(float* o, const float* gate, int64_t ld_gate, const float* w, int64_t T, int64_t heads,
                               int64_t dim, float eps, GateAct act) {
  for (int64_t t = 0; t < T; ++t) cpu::gated_rms_norm(o + t * heads * dim, gate + t * ld_gate, w, heads, dim, eps, act);
}

void CpuDevice::l2norm(float* x, int64_t ld, int64_t T, int64_t heads, int64_t dim) {
  for (int64_t t = 0; t < T; ++t) l2norm_forward(x + t * ld, x + t * ld, heads, dim);
}

void CpuDevice::swiglu(const float* gu, float* out, int64_t T, int64_t I) {
  // bf16: the gate/up products rounded, as the bf16 GEMM that makes them stores them.
  auto at = [&](int64_t i) { return bf16_ ? bf16_to_f32(f32_to_bf16(gu[i])) : gu[i]; };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) out[t * I + i] = silu(at(t * 2 * I + 2 * i)) * at(t * 2 * I + 2 * i + 1);
}

void CpuDevice::delta_mixer(const DeltaMixer& mixer, const DevBatch& b, float* out) {
  DeltaMixer m = mixer;
  if (float* rows = project_delta_input(m, b.tokens())) round(rows, b.tokens() * mixer.in_proj.rows);
  Device::delta_mixer(m, b, out);
}

void CpuDevice::sigmoid_mul(float* o, const float* gate, int64_t ld_gate, int64_t ld_gate_head, int64_t T,
                            int64_t heads, int64_t dim, void* o_op) {
  check(o_op == nullptr, "internal: the cpu device has no operand rows");
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < dim; ++i) o[(t * heads + h) * dim + i] *= cpu::sigmoid(gate[t * ld_gate + h * ld_gate_head + i]);
}

void CpuDevice::sigmoid(const float* x, int64_t ldx, float* y, int64_t T, int64_t n, float scale) {
  for (int64_t t = 0; t < T; ++t) beta_sigmoid_forward(x + t * ldx, y + t * n, n, scale);
}

void CpuDevice::gate_softplus(const float* a, int64_t lda, const float* A_log, const float* dt_bias, float* g,
                              int64_t T, int64_t H, int64_t width) {
  for (int64_t t = 0; t < T; ++t) gate_softplus_forward(a + t * lda, A_log, dt_bias, g + t * H * width, 1, H, width);
}

void CpuDevice::causal_conv_silu(const float* x, int64_t ldx, const float* w, float* y, int64_t C, int64_t kw,
                                 const DevBatch& b, float* conv_pool) {
  for (int64_t i = 0; i < b.num_seqs(); ++i) {
    const int64_t t0 = b.cu_seqlens[size_t(i)], n = b.len(i);
    std::vector<float> in(size_t(n * C));
    for (int64_t t = 0; t < n; ++t) std::memcpy(in.data() + t * C, x + (t0 + t) * ldx, sizeof(float) * size_t(C));
    causal_conv1d_silu(in.data(), w, conv_pool + b.slots[size_t(i)] * C * (kw - 1), y + t0 * C, n, C, kw);
  }
}

void CpuDevice::rope(float* x, int64_t, int64_t heads, int64_t ld_token, int64_t ld_head, const float* inv_freq,
                     int64_t rot, const DevBatch& b, RopePairs pairs, float attn_factor) {
  const std::vector<float> f(inv_freq, inv_freq + rot / 2);
  for (int64_t i = 0; i < b.num_seqs(); ++i)
    for (int64_t t = 0; t < b.len(i); ++t) {
      const int64_t row = b.cu_seqlens[size_t(i)] + t;
      cpu::rope(x + row * ld_token, heads, ld_head, f, b.past[size_t(i)] + t, pairs, attn_factor);
    }
}

void CpuDevice::delta_rule(const DeltaRuleDims& dims, const float* q, const float* k, const float* v, int64_t ld,
                           const float* g, const float* beta, float scale, const DevBatch& b, float* state_pool,
                           float* o) {
  const int64_t H = dims.H, HV = dims.HV, K = dims.K, V = dims.V, gs = dims.g_stride();
  for (int64_t i = 0; i < b.num_seqs(); ++i) {
    const int64_t t0 = b.cu_seqlens[size_t(i)], n = b.len(i);
    std::vector<float> qs(size_t(n * H * K)), ks(size_t(n * H * K)), vs(size_t(n * HV * V));
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(qs.data() + t * H * K, q + (t0 + t) * ld, sizeof(float) * size_t(H * K));
      std::memcpy(ks.data() + t * H * K, k + (t0 + t) * ld, sizeof(float) * size_t(H * K));
      std::memcpy(vs.data() + t * HV * V, v + (t0 + t) * ld, sizeof(float) * size_t(HV * V));
    }
    round(qs.data(), n * H * K), round(ks.data(), n * H * K), round(vs.data(), n * HV * V);
    DeltaRuleDims d = dims;
    d.cu_seqlens = {0, n};
    delta_rule_forward<float>(d, qs.data(), ks.data(), vs.data(), g + t0 * gs, beta + t0 * HV, scale,
                              state_pool + b.slots[size_t(i)] * HV * K * V, o + t0 * HV * V,
                              n > 1 ? DeltaMode::Chunk : DeltaMode::Recurrent);
  }
}

void CpuDevice::attention(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                          int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window, const int32_t* selected,
                          int64_t topk) {
  std::vector<std::vector<int32_t>> sel;
  if (window > 0) sel = window_keys(n, S - n, window);
  if (selected) {
    sel.assign(size_t(n), {});
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < topk; ++j)
        if (selected[t * topk + j] >= 0) sel[size_t(t)].push_back(selected[t * topk + j]);
  }
  if (bf16_) {  // rounded copies of the operands
    std::vector<float> qr(q, q + n * nh * dq), kr(k, k + S * nkv * dq), vr(v, v + S * nkv * dv);
    round(qr.data(), int64_t(qr.size())), round(kr.data(), int64_t(kr.size())), round(vr.data(), int64_t(vr.size()));
    return cpu::attention(qr.data(), kr.data(), vr.data(), o, n, S, nh, nkv, dq, dv, scale, sel.empty() ? nullptr : &sel);
  }
  cpu::attention(q, k, v, o, n, S, nh, nkv, dq, dv, scale, sel.empty() ? nullptr : &sel);
}

void CpuDevice::decode_attention(int64_t layer, const DevBatch& b, const float* q, const float* k, const float* v,
                                 float* o, int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
                                 int64_t window) {
  const int64_t KW = nkv * dq, VW = nkv * dv;
  for (int64_t i = 0; i < b.num_seqs(); ++i) {
    const int64_t S = b.past[size_t(i)] + 1, slot = b.slots[size_t(i)];
    float* kc = cache_rows(layer, CachePart::K, slot, S, KW);
    float* vc = cache_rows(layer, CachePart::V, slot, S, VW);
    std::memcpy(kc + (S - 1) * KW, k + i * KW, sizeof(float) * size_t(KW));
    std::memcpy(vc + (S - 1) * VW, v + i * VW, sizeof(float) * size_t(VW));
    attention(q + i * nh * dq, kc, vc, o + i * nh * dv, 1, S, nh, nkv, dq, dv, scale, window, nullptr, 0);
  }
}

void CpuDevice::dsa_select(const float* iq, const float* w, const float* keys, int64_t n, int64_t S, int64_t IH,
                           int64_t ID, int64_t topk, int32_t* selected) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t causal = S - n + t + 1;
    std::vector<float> score(static_cast<size_t>(causal));
    dsa_scores(iq + t * IH * ID, w + t * IH, keys, causal, IH, ID, score.data());
    std::vector<int32_t> idx = dsa_topk(score.data(), causal, topk);
    for (int64_t j = 0; j < topk; ++j) selected[t * topk + j] = j < int64_t(idx.size()) ? idx[size_t(j)] : -1;
  }
}

void CpuDevice::argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = int32_t(argmax(x + r * n, n));
}

void CpuDevice::gather_rows(const float* src, const int32_t* idx, float* dst, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * D, src + idx[i] * D, sizeof(float) * size_t(D));
}

void CpuDevice::scatter_add_rows(float* dst, const int32_t* idx, const float* w, const float* src, int64_t n,
                                 int64_t D) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) dst[idx[i] * D + d] += w[i] * src[i * D + d];
}

}  // namespace hla::cpu
