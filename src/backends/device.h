// Device: the operations a Model's layers need when they run off the host (Model::forward on a
// Device). The CUDA backend implements it (backends/cuda/cuda_device); the CPU backend implements it
// with the oracle's own functions (backends/cpu/cpu_device), so every layer's device wiring is
// checked against the plain CPU forward on machines without a GPU.
//
// Pointers are the device's memory. Activations are fp32 and row-major; `ld` is a row stride in
// elements. Matrices are uploaded once in the device's weight type (fp32, or bf16 with fp32
// accumulation); vectors (norms, gates, conv taps) stay fp32. The hybrid cache lives on the device
// as a pool of `slots` sequences: per (layer, part) a fixed-size block per slot (conv inputs,
// delta-rule state) and growable rows (KV, index keys).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backends/cpu/nn.h"
#include "core/tensor.h"
#include "ops/delta_rule.h"

namespace hla {

// A weight matrix W [rows, cols] on the device (y = x · W^T), elem_bytes per element (the
// device's weight type).
struct DevMatrix {
  const void* p = nullptr;
  int64_t rows = 0, cols = 0, elem_bytes = 4;
  DevMatrix row_block(int64_t row0, int64_t n) const {
    return {static_cast<const char*>(p) + row0 * cols * elem_bytes, n, cols, elem_bytes};
  }
};

// The tokens of one forward: sequence i owns rows [cu_seqlens[i], cu_seqlens[i+1]), continues cache
// slot slots[i], which already holds past[i] tokens. The d_* arrays are the device's copies.
struct DevBatch {
  std::vector<int64_t> cu_seqlens, slots, past;
  const int32_t* d_cu = nullptr;     // [N+1]
  const int32_t* d_slots = nullptr;  // [N]
  const int32_t* d_pos = nullptr;    // [T]: each token's position in its sequence
  int64_t num_seqs() const { return int64_t(slots.size()); }
  int64_t tokens() const { return cu_seqlens.back(); }
  int64_t len(int64_t i) const { return cu_seqlens[size_t(i + 1)] - cu_seqlens[size_t(i)]; }
  bool one_token_each() const { return tokens() == num_seqs(); }
};

// Activation rows that a layer's GEMMs read: fp32 rows f32 (row stride ld; null when no layer needs
// them), and/or the same rows already in the device's GEMM operand type (op, contiguous, from
// Device::operand_rows), which linear_rows, swiglu_mlp and a delta mixer's projection then read
// instead of converting f32 (the normalised residual stream: its norm writes the operand once).
struct DevRows {
  const float* f32 = nullptr;
  int64_t ld = 0;
  const void* op = nullptr;
};

// The input side of a delta-rule layer (Gated DeltaNet, KDA) between its input projection and the
// recurrence, for Device::delta_prep: y [T, C] = SiLU(causal conv(x)) (as causal_conv_silu), then
// the first l2_heads heads of head_dim channels of y L2-normalised in place (q and k, as l2norm);
// beta [T, H] = beta_max·sigmoid(b) (b row stride ldb); g [T, H·gate_width] = −exp(A_log[h])·softplus(a +
// dt_bias) (a row stride lda, as gate_softplus).
struct DeltaPrep {
  const float* x;
  int64_t ldx;
  const float* conv_w;  // [C, kw]
  int64_t C, kw;
  float* conv_pool;  // [slots, C, kw−1]
  float* y;
  int64_t l2_heads, head_dim;
  const float* b;
  int64_t ldb;
  float beta_max;  // 1, or 2 for negative eigenvalues (ModelSpec::beta_max)
  float* beta;
  const float* a;
  int64_t lda;
  const float *A_log, *dt_bias;
  float* g;
  int64_t H, gate_width;
};

// A delta-rule layer between its input projections and its output, for Device::delta_mixer: prep's
// steps (prep.y is the device's own: it need not be set), the delta rule (dims, scale) over q, k, v
// = the conv rows [q (H·K) | k (H·K) | v (HV·V)] from each sequence's slot in state_pool, then o
// [T, HV, V] = gated RMSNorm(o)·norm·act(gate) per value head (token t's gate rows at gate +
// t·ld_gate, as gated_rms_norm), then out [T, out_proj.rows] += o · out_proj^T (out: the residual
// stream).
//
// With in_proj set, the layer's input projection is the mixer's first step: rows [T, in_proj.rows]
// = in · in_proj^T hold the conv input, b, a and the output gate from columns x_col, b_col, a_col
// and gate_col (prep.x, prep.b, prep.a, gate and their strides are then ignored). A bf16 device stores these rows in
// bf16 (its fused prefill: the 2.0B Qwen3.5 model's GDN projection is 12,352 values a token, 1.6 GB in fp32 at 32K
// tokens), and CpuDevice's bf16 mode rounds them the same way.
struct DeltaMixer {
  DeltaPrep prep;
  DeltaRuleDims dims;
  float scale;
  float* state_pool;
  const float* gate;
  int64_t ld_gate;
  const float* norm;
  float eps;
  cpu::GateAct act;
  DevMatrix out_proj;
  DevRows in;
  DevMatrix in_proj;  // unset (p == nullptr): the rows are given through prep and gate
  int64_t x_col = 0, b_col = 0, a_col = 0, gate_col = 0;
};

// An attention layer's q, k and v from its projection rows, for Device::attention_prep: q [T, nh,
// hd] = RoPE(RMSNorm(q rows)·q_norm), q head h of token t read at q_in + t·ld_q + h·q_head; k [T,
// nkv, hd] likewise from k_in with k_norm; v [T, nkv·hd] = the v_in rows (k_in, v_in row stride
// ld_kv). RMSNorm as rms_norm, RoPE as rope on the first rot channels of each head.
struct AttentionPrep {
  const float* q_in;
  int64_t ld_q, q_head;
  const float *k_in, *v_in;
  int64_t ld_kv;
  int64_t nh, nkv, hd;
  const float *q_norm, *k_norm;
  float eps;
  bool zero_centered;
  const float* inv_freq;
  int64_t rot;
  cpu::RopePairs pairs;
  float attn_factor;
  float *q, *k, *v;
};

// An MoE block's routed experts, for Device::moe: E = router.experts experts, each a SwiGLU MLP
// of hidden size D and intermediate size I. Expert e's gate and up rows, interleaved as for
// Device::swiglu, are rows [2I·e, 2I·(e+1)) of gate_up [E·2I, D]; its down projection is rows
// [D·e, D·(e+1)) of down [E·D, I]. bias [E] (device memory, or null) as cpu::moe_route's.
struct MoeExperts {
  cpu::MoeRouter router;
  const float* bias = nullptr;
  int64_t D = 0, I = 0;
  DevMatrix gate_up, down;
};

// Parts of a layer's cache.
enum class CachePart { Conv, State, K, V, IndexK };

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  virtual int64_t max_slots() const = 0;

  // ---- memory -------------------------------------------------------------------------------
  virtual DevMatrix upload_matrix(const Tensor& w) = 0;  // 2-D (or reshaped to 2-D by the caller)
  virtual const float* upload_vector(const Tensor& v) = 0;
  // Scratch valid until the next begin_forward(), or until a release to a mark taken before it
  // (Model::forward releases each layer's scratch after the layer: work runs in stream order, so
  // the next layer may reuse the memory). replay_key >= 0 promises that this forward issues the
  // same operations on the same scratch as every other forward with that key — only uploaded values
  // differ — so the device may record it once (a CUDA graph) and replay it; −1: no promise.
  virtual void begin_forward(int64_t replay_key = -1) = 0;
  virtual float* scratch(int64_t n) = 0;
  struct Mark {
    size_t chunk, used;
  };
  virtual Mark scratch_mark() const = 0;
  virtual void scratch_release(Mark m) = 0;
  int32_t* scratch_i32(int64_t n) { return reinterpret_cast<int32_t*>(scratch(n)); }
  virtual const int32_t* upload_i32(const std::vector<int32_t>& v) = 0;  // into scratch
  virtual const float* upload_f32(const std::vector<float>& v) = 0;      // into scratch
  virtual void zero(float* p, int64_t n) = 0;
  // Copies device bytes to the host; the forward's work up to here has finished when it returns.
  virtual void to_host_bytes(const void* src, void* dst, size_t bytes) = 0;
  void to_host(const float* src, float* dst, int64_t n) { to_host_bytes(src, dst, size_t(n) * sizeof(float)); }
  void to_host(const int32_t* src, int32_t* dst, int64_t n) { to_host_bytes(src, dst, size_t(n) * sizeof(int32_t)); }
  // Cache: the [slots, n] pool of a fixed-size part (zeros for a fresh slot), and the rows of a
  // growable part for one slot, grown to hold `rows` rows of `width` (earlier rows kept).
  virtual float* cache_pool(int64_t layer, CachePart part, int64_t n) = 0;
  virtual float* cache_rows(int64_t layer, CachePart part, int64_t slot, int64_t rows, int64_t width) = 0;
  virtual void reset_slot(int64_t slot) = 0;            // zeros its fixed parts, empties its rows
  virtual int64_t slot_bytes(int64_t slot) const = 0;  // cache memory held for one slot now
  // A copy of one slot's cache in the device's memory (the server's prefix snapshots): save_slot
  // copies the slot's fixed parts and the first `rows` rows of each growable part, between
  // forwards; load_slot makes `slot` hold that cache again (a snapshot of this device only).
  class SlotSnapshot {
   public:
    virtual ~SlotSnapshot() = default;
    virtual size_t bytes() const = 0;
  };
  virtual std::unique_ptr<SlotSnapshot> save_slot(int64_t slot, int64_t rows) = 0;
  virtual size_t snapshot_bytes(int64_t slot, int64_t rows) const = 0;  // what save_slot would hold
  virtual void load_slot(const SlotSnapshot& snapshot, int64_t slot) = 0;
  virtual int64_t memory_bytes() const = 0;            // device memory in use (weights, cache, scratch)

  // ---- compute ------------------------------------------------------------------------------
  // y [M, W.rows] = x [M, W.cols] (row stride ldx) · W^T.
  virtual void linear(const float* x, int64_t ldx, const DevMatrix& W, float* y, int64_t M) = 0;
  // The same from DevRows: their operand rows where given (the default has none to read), else f32.
  virtual void linear_rows(const DevRows& x, const DevMatrix& W, float* y, int64_t M);
  // h [M, W.rows] += x [M, W.cols] · W^T (x as linear_rows reads it): a layer's output projection
  // adding into the residual stream, so the GEMM reads h instead of a pass reading its product back
  // (the default runs linear_rows into scratch, then add).
  virtual void linear_add(const DevRows& x, const DevMatrix& W, float* h, int64_t M);
  // Scratch for [rows, cols] activations in the device's GEMM operand type, for the producer of
  // DevRows::op; null where the device's GEMMs of that many rows read fp32 rows (the default).
  virtual void* operand_rows(int64_t /*rows*/, int64_t /*cols*/) { return nullptr; }
  virtual void embed(const DevMatrix& table, const int32_t* ids, float* out, int64_t T) = 0;
  virtual void add(float* h, const float* y, int64_t n) = 0;  // h += y
  // The norm between blocks: RMSNorm of the residual stream h [rows, dim] (as rms_norm) into x
  // (unless null) and into x_op (unless null: operand_rows' rows).
  virtual void residual_norm(const float* h, const float* w, float* x, void* x_op, int64_t rows, int64_t dim, float eps,
                             bool zero_centered) = 0;
  // Generic strided copy over a 3-D index space (a stride of 0 broadcasts).
  struct Strides {
    int64_t s0, s1, s2;
  };
  virtual void copy(float* dst, Strides dst_st, const float* src, Strides src_st, int64_t n0, int64_t n1,
                    int64_t n2) = 0;
  // y (row stride ldy) = RMSNorm(x rows of `dim`, row stride ldx), as cpu::rms_norm.
  virtual void rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t ldy, int64_t rows, int64_t dim,
                        float eps, bool zero_centered) = 0;
  virtual void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                          float eps) = 0;
  // o [T, heads, dim] = RMSNorm(o)·w·act(gate); token t's gate rows start at gate + t·ld_gate.
  virtual void gated_rms_norm(float* o, const float* gate, int64_t ld_gate, const float* w, int64_t T, int64_t heads,
                              int64_t dim, float eps, cpu::GateAct act) = 0;
  // In place x[t, h, :] /= ||x[t, h, :]|| (+eps), rows at x + t·ld + h·dim.
  virtual void l2norm(float* x, int64_t ld, int64_t T, int64_t heads, int64_t dim) = 0;
  // out [T, I] = SiLU(g) ⊙ u for gu [T, 2I] holding the pairs (g_i, u_i) side by side: a SwiGLU
  // block uploads its gate and up rows interleaved, so that one GEMV block computes both of a pair.
  // A bf16 device rounds g and u to bf16 first (a bf16 GEMM's stored products).
  virtual void swiglu(const float* gu, float* out, int64_t T, int64_t I) = 0;
  // out [M, W.rows / 2] = swiglu(x · W^T) for W's interleaved gate and up rows (x row stride ldx).
  // The default runs linear, then swiglu; the CUDA decode GEMV applies it as its epilogue.
  virtual void linear_swiglu(const float* x, int64_t ldx, const DevMatrix& W, float* out, int64_t M);
  // out [M, down.rows] = (add: +=) swiglu(x · gate_up^T) · down^T: a SwiGLU MLP. The default runs
  // linear_swiglu, then linear or linear_add; the CUDA device hands the hidden rows to the second
  // GEMM in bf16.
  virtual void swiglu_mlp(const DevRows& x, const DevMatrix& gate_up, const DevMatrix& down, float* out, int64_t M,
                          bool add);
  // o [T, heads, dim] ⊙= sigmoid(gate), gate row (t, h) at gate + t·ld_gate + h·ld_gate_head; with
  // o_op (operand_rows' rows [T, heads·dim]) the product goes there instead, o left as it is.
  virtual void sigmoid_mul(float* o, const float* gate, int64_t ld_gate, int64_t ld_gate_head, int64_t T, int64_t heads,
                           int64_t dim, void* o_op) = 0;
  // y [T, n] = scale·sigmoid(x) (row stride ldx).
  virtual void sigmoid(const float* x, int64_t ldx, float* y, int64_t T, int64_t n, float scale) = 0;
  // g [T, H·width] = −exp(A_log[h])·softplus(a + dt_bias) (a row stride lda), as gate_softplus_forward.
  virtual void gate_softplus(const float* a, int64_t lda, const float* A_log, const float* dt_bias, float* g,
                             int64_t T, int64_t H, int64_t width) = 0;
  // Depthwise causal conv + SiLU over C channels (x row stride ldx, weight [C, kw]) of every
  // sequence of `b`, continuing and advancing its slot in conv_pool [slots, C, kw−1].
  virtual void causal_conv_silu(const float* x, int64_t ldx, const float* w, float* y, int64_t C, int64_t kw,
                                const DevBatch& b, float* conv_pool) = 0;
  // DeltaPrep's steps for every sequence of b; the default runs causal_conv_silu, l2norm, sigmoid
  // and gate_softplus one after another, a device may fuse them (the CUDA decode step does).
  virtual void delta_prep(const DeltaPrep& p, const DevBatch& b);
  // DeltaMixer's steps for every sequence of b; the default runs linear (the input projection, if
  // m has one), delta_prep, delta_rule, gated_rms_norm and linear_add one after another. The CUDA
  // device's bf16 prefill passes the projected rows, q, k, v and o between them as 16-bit
  // operands, with no fp32 rows in between.
  virtual void delta_mixer(const DeltaMixer& m, const DevBatch& b, float* out);
  // Runs m's input projection (linear, into scratch rows [T, in_proj.rows]) and points m's prep
  // and gate into the rows, leaving in_proj unset; returns the rows (null when m has none).
  float* project_delta_input(DeltaMixer& m, int64_t T);
  // AttentionPrep's steps for the tokens of b; the default copies, normalises and rotates with
  // the ops above, a device may fuse them (the CUDA device does).
  virtual void attention_prep(const AttentionPrep& p, const DevBatch& b);
  // RoPE on x[t, h, :rot] (at x + t·ld_token + h·ld_head) at each token's position.
  virtual void rope(float* x, int64_t T, int64_t heads, int64_t ld_token, int64_t ld_head, const float* inv_freq,
                    int64_t rot, const DevBatch& b, cpu::RopePairs pairs, float attn_factor) = 0;
  // The delta rule over every sequence of `b` from its slot in state_pool [slots, HV, K, V]:
  // q, k [T, H, K], v [T, HV, V] at a common token stride ld (fp32; the device may compute in its
  // weight type), g [T, HV(·K)], beta [T, HV] contiguous; o [T, HV, V] contiguous.
  virtual void delta_rule(const DeltaRuleDims& d, const float* q, const float* k, const float* v, int64_t ld,
                          const float* g, const float* beta, float scale, const DevBatch& b, float* state_pool,
                          float* o) = 0;
  // Causal softmax attention of one sequence's n newest queries q [n, nh, dq] over its S cached
  // keys k [S, nkv, dq] and values v [S, nkv, dv] (query i sits at S−n+i); o [n, nh, dv]. window
  // > 0: each query sees its last `window` keys. selected [n, topk] (−1 = none): each query sees
  // only those keys.
  virtual void attention(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                         int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window, const int32_t* selected,
                         int64_t topk) = 0;
  // Decode step of attention layer `layer` (one token per sequence of b): appends row i of k [N, nkv·dq]
  // and v [N, nkv·dv] to sequence i's K/V rows at its position, then q [N, nh, dq] attends over
  // its rows 0..pos (the last `window` of them when window > 0); o [N, nh, dv]. One launch for the
  // batch, positions read on the device (so a recorded step replays at any position).
  virtual void decode_attention(int64_t layer, const DevBatch& b, const float* q, const float* k, const float* v,
                                float* o, int64_t nh, int64_t nkv, int64_t dq, int64_t dv, float scale,
                                int64_t window) = 0;
  // DSA lightning-indexer selection for n queries (positions S−n .. S−1) over keys [S, ID]:
  // selected [n, topk] holds the topk best causal keys by dsa_scores in ascending order (all causal
  // keys, then −1, when fewer).
  virtual void dsa_select(const float* iq, const float* w, const float* keys, int64_t n, int64_t S, int64_t IH,
                          int64_t ID, int64_t topk, int32_t* selected) = 0;
  // out [rows] = the index of the largest value of each row of x [rows, n], the lowest among ties
  // (greedy decoding on the device: only the ids come back, not the rows of logits).
  virtual void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out) = 0;
  // The routed experts of an MoE block for T tokens: out [T, D] += Σ over each token's picks
  // (cpu::moe_route of its router logits, logits [T, E]) of weight · expert(x row), x [T, D]
  // contiguous; plus, when shared is given, shared_gate[t] (1 when null) · shared [T, D]. The
  // default routes on the host (it copies the logits back) and runs each expert's tokens through
  // gather_rows, swiglu_mlp and scatter_add_rows; a device may route on itself.
  virtual void moe(const MoeExperts& m, const float* x, const float* logits, const float* shared,
                   const float* shared_gate, float* out, int64_t T);
  // Does moe() run these experts without the host, so that a decode step through it may be recorded?
  virtual bool moe_on_device(const MoeExperts&) const { return false; }
  // MoE: dst [n, D] = src rows idx; dst[idx[i]] += w[i]·src[i] (idx distinct within a call).
  virtual void gather_rows(const float* src, const int32_t* idx, float* dst, int64_t n, int64_t D) = 0;
  virtual void scatter_add_rows(float* dst, const int32_t* idx, const float* w, const float* src, int64_t n,
                                int64_t D) = 0;
};

}  // namespace hla
