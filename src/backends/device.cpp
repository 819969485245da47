// The fused Device operations' defaults: the unfused operations one after another (what the CPU device
// runs, and any device for shapes its fused kernels do not take).
#include "backends/device.h"

namespace hla {

void Device::linear_swiglu(const float* x, int64_t ldx, const DevMatrix& W, float* out, int64_t M) {
  float* gu = scratch(M * W.rows);
  linear(x, ldx, W, gu, M);
  swiglu(gu, out, M, W.rows / 2);
}

void Device::delta_prep(const DeltaPrep& p, const DevBatch& b) {
  const int64_t T = b.tokens();
  causal_conv_silu(p.x, p.ldx, p.conv_w, p.y, p.C, p.kw, b, p.conv_pool);
  l2norm(p.y, p.C, T, p.l2_heads, p.head_dim);
  sigmoid(p.b, p.ldb, p.beta, T, p.H);
  gate_softplus(p.a, p.lda, p.A_log, p.dt_bias, p.g, T, p.H, p.gate_width);
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

}  // namespace hla
