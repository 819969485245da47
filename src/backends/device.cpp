// The fused Device operations' defaults: the unfused operations one after another (what the CPU device
// runs, and any device for shapes its fused kernels do not take).
#include "backends/device.h"

#include <numeric>

#include "core/error.h"

namespace hla {

void Device::linear_rows(const DevRows& x, const DevMatrix& W, float* y, int64_t M) {
  check(x.f32 != nullptr, "internal: " + name() + " has no operand rows to read");
  linear(x.f32, x.ld, W, y, M);
}

void Device::linear_add(const DevRows& x, const DevMatrix& W, float* h, int64_t M) {
  float* y = scratch(M * W.rows);
  linear_rows(x, W, y, M);
  add(h, y, M * W.rows);
}

void Device::linear_swiglu(const float* x, int64_t ldx, const DevMatrix& W, float* out, int64_t M) {
  float* gu = scratch(M * W.rows);
  linear(x, ldx, W, gu, M);
  swiglu(gu, out, M, W.rows / 2);
}

void Device::swiglu_mlp(const DevRows& x, const DevMatrix& gate_up, const DevMatrix& down, float* out, int64_t M,
                        bool add) {
  const int64_t I = gate_up.rows / 2;
  float* h = scratch(M * I);
  if (x.f32) {
    linear_swiglu(x.f32, x.ld, gate_up, h, M);
  } else {
    float* gu = scratch(M * gate_up.rows);
    linear_rows(x, gate_up, gu, M);
    swiglu(gu, h, M, I);
  }
  if (add) return linear_add({h, I}, down, out, M);
  linear(h, I, down, out, M);
}

void Device::delta_prep(const DeltaPrep& p, const DevBatch& b) {
  const int64_t T = b.tokens();
  causal_conv_silu(p.x, p.ldx, p.conv_w, p.y, p.C, p.kw, b, p.conv_pool);
  l2norm(p.y, p.C, T, p.l2_heads, p.head_dim);
  sigmoid(p.b, p.ldb, p.beta, T, p.H, p.beta_max);
  gate_softplus(p.a, p.lda, p.A_log, p.dt_bias, p.g, T, p.H, p.gate_width);
}

float* Device::project_delta_input(DeltaMixer& m, int64_t T) {
  if (!m.in_proj.p) return nullptr;
  const int64_t W = m.in_proj.rows;
  float* rows = scratch(T * W);
  linear_rows(m.in, m.in_proj, rows, T);
  m.prep.x = rows + m.x_col, m.prep.ldx = W;
  m.prep.b = rows + m.b_col, m.prep.ldb = W;
  m.prep.a = rows + m.a_col, m.prep.lda = W;
  m.gate = rows + m.gate_col, m.ld_gate = W;
  m.in_proj = {};
  return rows;
}

void Device::delta_mixer(const DeltaMixer& mixer, const DevBatch& b, float* out) {
  const int64_t T = b.tokens(), HK = mixer.dims.H * mixer.dims.K, HVV = mixer.dims.HV * mixer.dims.V;
  DeltaMixer m = mixer;
  project_delta_input(m, T);
  DeltaPrep p = m.prep;
  p.y = scratch(T * p.C);
  delta_prep(p, b);
  float* o = scratch(T * HVV);
  delta_rule(m.dims, p.y, p.y + HK, p.y + 2 * HK, p.C, p.g, p.beta, m.scale, b, m.state_pool, o);
  gated_rms_norm(o, m.gate, m.ld_gate, m.norm, T, m.dims.HV, m.dims.V, m.eps, m.act);
  linear_add({o, HVV}, m.out_proj, out, T);
}

void Device::attention_prep(const AttentionPrep& p, const DevBatch& b) {
  const int64_t T = b.tokens(), Q = p.nh * p.hd, KV = p.nkv * p.hd;
  copy(p.q, {Q, p.hd, 1}, p.q_in, {p.ld_q, p.q_head, 1}, T, p.nh, p.hd);
  copy(p.k, {KV, 1, 0}, p.k_in, {p.ld_kv, 1, 0}, T, KV, 1);
  copy(p.v, {KV, 1, 0}, p.v_in, {p.ld_kv, 1, 0}, T, KV, 1);
  rms_norm(p.q, p.hd, p.q_norm, p.q, p.hd, T * p.nh, p.hd, p.eps, p.zero_centered);
  rms_norm(p.k, p.hd, p.k_norm, p.k, p.hd, T * p.nkv, p.hd, p.eps, p.zero_centered);
  rope(p.q, T, p.nh, Q, p.hd, p.inv_freq, p.rot, b, p.pairs, p.attn_factor);
  rope(p.k, T, p.nkv, KV, p.hd, p.inv_freq, p.rot, b, p.pairs, p.attn_factor);
}

void Device::moe(const MoeExperts& m, const float* x, const float* logits, const float* shared,
                 const float* shared_gate, float* out, int64_t T) {
  // The block's sum first, then one add into out: the CPU forward's order of fp32 additions.
  const int64_t D = m.D, E = m.router.experts;
  std::vector<float> host_logits(static_cast<size_t>(T * E)), bias;
  to_host(logits, host_logits.data(), T * E);
  if (m.bias) {
    bias.resize(size_t(E));
    to_host(m.bias, bias.data(), E);
  }
  std::vector<std::vector<int32_t>> tokens(static_cast<size_t>(E));
  std::vector<std::vector<float>> weights(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t)
    for (auto [e, w] : cpu::moe_route(host_logits.data() + t * E, m.bias ? bias.data() : nullptr, m.router)) {
      tokens[size_t(e)].push_back(int32_t(t));
      weights[size_t(e)].push_back(w);
    }
  float *sum = scratch(T * D), *xe = scratch(T * D), *y = scratch(T * D);
  zero(sum, T * D);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = int64_t(tokens[size_t(e)].size());
    if (n == 0) continue;
    const int32_t* idx = upload_i32(tokens[size_t(e)]);
    gather_rows(x, idx, xe, n, D);
    swiglu_mlp({xe, D}, m.gate_up.row_block(2 * m.I * e, 2 * m.I), m.down.row_block(D * e, D), y, n, false);
    scatter_add_rows(sum, idx, upload_f32(weights[size_t(e)]), y, n, D);
  }
  if (shared) {
    std::vector<int32_t> all(static_cast<size_t>(T));
    std::iota(all.begin(), all.end(), 0);
    scatter_add_rows(sum, upload_i32(all), shared_gate ? shared_gate : upload_f32(std::vector<float>(size_t(T), 1.0f)),
                     shared, T, D);
  }
  add(out, sum, T * D);
}

}  // namespace hla
