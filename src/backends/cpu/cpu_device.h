// CpuDevice: the Device interface on host memory, each operation by the CPU oracle's own function
// (nn.h, the delta-rule CPU forms). Model::forward on a CpuDevice equals the plain CPU forward, so
// a test can check every layer's device wiring without a GPU; the CUDA device is then held to it.
// With bf16 = true it rounds what the CUDA device's bf16 mode rounds — weights, GEMM operands,
// SwiGLU's gate/up products, a delta-rule mixer's projected rows (DeltaMixer::in_proj), delta-rule
// q/k/v and attention q/k/v — and nothing else: the plain bf16 implementation of the same math that
// the CUDA bf16 error is measured against. (The CUDA device keeps the gate/up products in fp32 in
// its one-row GEMV, and the projected rows in fp32 outside its fused bf16 prefill.)
#pragma once
#include <deque>
#include <map>
#include <tuple>
#include <vector>

#include "backends/device.h"

namespace hla::cpu {

class CpuDevice : public Device {
 public:
  explicit CpuDevice(int64_t slots, bool bf16 = false) : slots_(slots), bf16_(bf16) {}
  std::string name() const override { return bf16_ ? "cpu-device (bf16)" : "cpu-device"; }
  int64_t max_slots() const override { return slots_; }

  DevMatrix upload_matrix(const Tensor& w) override;
  const float* upload_vector(const Tensor& v) override;
  void begin_forward(int64_t) override { scratch_.clear(); }
  float* scratch(int64_t n) override;
  Mark scratch_mark() const override { return {scratch_.size(), 0}; }
  void scratch_release(Mark m) override { scratch_.resize(m.chunk); }
  const int32_t* upload_i32(const std::vector<int32_t>& v) override;
  const float* upload_f32(const std::vector<float>& v) override;
  void zero(float* p, int64_t n) override;
  void to_host_bytes(const void* src, void* dst, size_t bytes) override;
  float* cache_pool(int64_t layer, CachePart part, int64_t n) override;
  float* cache_rows(int64_t layer, CachePart part, int64_t slot, int64_t rows, int64_t width) override;
  void reset_slot(int64_t slot) override;
  int64_t slot_bytes(int64_t slot) const override;
  std::unique_ptr<SlotSnapshot> save_slot(int64_t slot, int64_t rows) override;
  size_t snapshot_bytes(int64_t slot, int64_t rows) const override;
  void load_slot(const SlotSnapshot& snapshot, int64_t slot) override;
  int64_t memory_bytes() const override;

  void linear(const float* x, int64_t ldx, const DevMatrix& W, float* y, int64_t M) override;
  void embed(const DevMatrix& table, const int32_t* ids, float* out, int64_t T) override;
  void add(float* h, const float* y, int64_t n) override;
  void residual_norm(const float* h, const float* w, float* x, void* x_op, int64_t rows, int64_t dim, float eps,
                     bool zero_centered) override;
  void copy(float* dst, Strides dst_st, const float* src, Strides src_st, int64_t n0, int64_t n1, int64_t n2) override;
  void rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows, int64_t dim,
                float eps, bool zero_centered) override;
  void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                  float eps) override;
  void gated_rms_norm(float* o, const float* gate, int64_t ld_gate, const float* w, int64_t T, int64_t heads,
                      int64_t dim, float eps, GateAct act) override;
  void l2norm(float* x, int64_t ld, int64_t T, int64_t heads, int64_t dim) override;
  void swiglu(const float* gu, float* out, int64_t T, int64_t I) override;
  void delta_mixer(const DeltaMixer& m, const DevBatch& b, float* out) override;
  void sigmoid_mul(float* o, const float* gate, int64_t ld_gate, int64_t ld_gate_head, int64_t T, int64_t heads,
                   int64_t dim, void* o_op) override;
  void sigmoid(const float* x, int64_t ldx, float* y, int64_t T, int64_t n, float scale) override;
  void gate_softplus(const float* a, int64_t lda, const float* A_log, const float* dt_bias, float* g, int64_t T,
                     int64_t H, int64_t width) override;
  void causal_conv_silu(const float* x, int64_t ldx, const float* w, float* y, int64_t C, int64_t kw,
                        const DevBatch& b, float* conv_pool) override;
  void rope(float* x, int64_t T, int64_t heads, int64_t ld_token, int64_t ld_head, const float* inv_freq, int64_t rot,
            const DevBatch& b, RopePairs pairs, float attn_factor) override;
  void delta_rule(const DeltaRuleDims& d, const float* q, const float* k, const float* v, int64_t ld, const float* g,
                  const float* beta, float scale, const DevBatch& b, float* state_pool, float* o) override;
  void attention(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                 int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window, const int32_t* selected,
                 int64_t topk) override;
  void decode_attention(int64_t layer, const DevBatch& b, const float* q, const float* k, const float* v, float* o,
                        int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window) override;
  void dsa_select(const float* iq, const float* w, const float* keys, int64_t n, int64_t S, int64_t IH, int64_t ID,
                  int64_t topk, int32_t* selected) override;
  void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) override;
  void gather_rows(const float* src, const int32_t* idx, float* dst, int64_t n, int64_t D) override;
  void scatter_add_rows(float* dst, const int32_t* idx, const float* w, const float* src, int64_t n,
                        int64_t D) override;

 private:
  // Rounds n values to bf16 in place when bf16_ (else nothing).
  void round(float* p, int64_t n) const;
  int64_t slots_;
  bool bf16_;
  std::deque<std::vector<float>> weights_, scratch_;  // deques: pointers stay valid as they grow
  std::map<std::pair<int64_t, CachePart>, std::vector<float>> pools_;
  struct Rows {
    std::vector<float> v;
    int64_t width = 0;
  };
  std::map<std::tuple<int64_t, CachePart, int64_t>, Rows> rows_;
};

}  // namespace hla::cpu
