// CUDA forms of the delta-rule ops (GDN, KDA) — same math and layout as src/ops/delta_rule.h.
//
// Tensors live on the device. q,k [T,H,K], v and o [T,HV,V] in the element type `dt` (F32, F16 or
// BF16); g ([T,HV] GDN, [T,HV,K] KDA, natural-log decays) and beta [T,HV] are float32; states are
// float32 [.,HV,K,V]. Matmul operands use the input's precision (bf16/fp16 tensor cores; fp32
// inputs use a 3xTF32 split so they stay within ~1e-6 of fp32), accumulation and state are fp32.
// Every kernel is deterministic: no atomics, fixed reduction orders.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/tensor.h"
#include "ops/delta_rule.h"

namespace hla::cuda {

// True when a CUDA device is present and usable (tests skip themselves otherwise).
bool device_available();
// Throws hla::Error naming `what` when a CUDA call failed.
void check_cuda(cudaError_t e, const char* what);
// The multiprocessors of device dev (asked once per device).
int sm_count(int dev);

// The layer transforms a caller may leave to the op (flash-linear-attention's
// use_qk_l2norm_in_kernel, use_gate_in_kernel and beta sigmoid): with them the op's q, k, beta and
// g arguments are the raw projections, and the op computes what the chunk kernels read (an input
// pass in delta_rule_inputs.cu, the forward's beta and gate in its prep kernel) exactly as the CPU
// layer functions of ops/delta_rule.h do:
//   qk_l2norm:  q, k rows per head ← l2norm_forward (eps 1e-6), in the input's element type;
//   beta_max:   > 0: beta ← beta_max·sigmoid(b) (beta_sigmoid_forward); 0: beta is used as given;
//   gate:       Softplus: g ← −exp(A_log)·softplus(a + dt_bias); LowerBound (KDA):
//               g ← lower_bound·sigmoid(exp(A_log)·(a + dt_bias)); LogDecay: g is used as given.
// A_log [HV] and dt_bias [HV·g_width] (nullptr = none) are fp32 device pointers. The backward then
// returns the gradients of the raw inputs, plus dA_log and ddt_bias.
enum class DeltaGateForm { LogDecay, Softplus, LowerBound };
struct DeltaInputForm {
  bool qk_l2norm = false;
  float beta_max = 0;
  DeltaGateForm gate = DeltaGateForm::LogDecay;
  float lower_bound = -5;
  const float* A_log = nullptr;
  const float* dt_bias = nullptr;
  bool plain() const { return !qk_l2norm && beta_max == 0 && gate == DeltaGateForm::LogDecay; }
};

// Chunked forward (chunk 64, WY/UT form) for one fixed set of sequence lengths. Three launches
// (five with a segmented state pass):
//   prep   (chunk x value head, token-parallel): gate cumsum, L = strict-tril(beta K K^T ⊙ decay),
//          T = (I+L)^{-1}, W = T(beta K ⊙ e^G), U = T(beta V), causal P = s Q K^T ⊙ decay;
//   state  (sequence x value head x V-tile, sequential over chunks): v_new = U − W S,
//          S ← e^{G_last} S + (K ⊙ e^{G_last−G})^T v_new; records the state entering each chunk;
//   output (chunk x value head x V-tile): O = (s Q ⊙ e^G) S_chunk + P v_new.
// K must be 32, 64, 128 or 256; V a multiple of 16 up to 256. KDA's gates must satisfy
// g ≥ −10 per token (the intra-chunk decays are factored around the middle row of each 16-token
// sub-chunk, e^{±8·|g|} must stay finite in fp32; for the same reason KDA takes BF16 or F32
// inputs, not F16); GDN gates are unrestricted.
class DeltaChunkPlan {
 public:
  // Uploads the chunk table and allocates the workspace for `d` (d.cu_seqlens on the host).
  // state_cols: how the sequential state pass splits V. 16 or 32: that many V columns per block
  // (column-tiled pass); -1: the wide pass, all of V per block (8 warps, 16 columns each, sharing
  // the W/K/U tiles; K, V ≤ 128); 0: wide where sequences x heads fill the multiprocessors, else
  // column tiles picked by occupancy.
  // seg_chunks (wide pass only): cut each sequence into segments of that many chunks, run in
  // parallel from [0 | I] and merged through their transition matrices M (see state_wide_kernel);
  // 0 picks by how many blocks sequences x heads give; −1 never segments. The automatic pick
  // (state_cols 0) never segments: the column-tiled pass measured faster.
  DeltaChunkPlan(const DeltaRuleDims& d, DType dt, int state_cols = 0, int seg_chunks = 0);
  ~DeltaChunkPlan();
  DeltaChunkPlan(const DeltaChunkPlan&) = delete;
  DeltaChunkPlan& operator=(const DeltaChunkPlan&) = delete;

  // `state` [N,HV,K,V] holds h0 on entry and the final state on return. With a non-plain `form`
  // q, k, beta and g are the raw inputs it names: the prep kernel applies beta's sigmoid and the
  // gate as it reads them; the L2-normalised q, k go to a workspace the plan allocates on the first
  // such call.
  void forward(const void* q, const void* k, const void* v, const float* g, const float* beta, float scale,
               float* state, void* o, cudaStream_t stream, const DeltaInputForm& form = {}) const;

  // For the backward (DeltaChunkBackward): runs prep and the state pass only (no output), also
  // writing T = (I+L)^{-1} and the decayed key Gram matrix Mkk (without beta), both fp32
  // [chunks,HV,64,64], and returns where this plan's workspace holds what the backward reads
  // (valid until the next call on this plan). Gc is fp32 [T,HV(,K)]; W [T,HV,K], P [T,HV,64]
  // (s·Mqk⊙decay, causal part only: entries above the diagonal are unspecified), kg, qg [T,HV,K]
  // (KDA only), h [chunks,HV,V,K] (state entering each chunk, transposed), vn [T,HV,V], all in the
  // plan's element type. single_tf32 (F32 plans only): single tf32 products instead of 3xTF32, for
  // a recompute from bf16 inputs (see DeltaChunkBackward).
  struct Saved {
    const int2* chunk_tab;  // per chunk: {first token, sequence}
    const int* cu;          // [N+1] token offsets
    const int* chunk_off;   // [N+1] first chunk of each sequence
    const float* Gc;
    const void *W, *P, *kg, *qg, *h, *vn;
  };
  Saved record(const void* q, const void* k, const void* v, const float* g, const float* beta, float scale,
               float* state, float* Tm, float* Mkk, bool single_tf32, cudaStream_t stream) const;

  int64_t chunks() const { return chunks_; }
  bool wide() const { return wide_; }
  int64_t segments() const { return segmented_ ? nseg_ : 0; }  // 0 when not segmented
  size_t workspace_bytes() const { return ws_bytes_; }

 private:
  DeltaRuleDims d_;
  DType dt_;
  int64_t chunks_ = 0;
  int state_cols_ = 16;
  bool wide_ = false, segmented_ = false;
  int64_t nseg_ = 0;
  size_t ws_bytes_ = 0;
  void* ws_ = nullptr;  // one allocation: chunk table, cu_seqlens, chunk offsets, intermediates
  mutable void* in_ws_ = nullptr;  // q, k after a DeltaInputForm's L2 norm (allocated on first use)

  void run(const void* q, const void* k, const void* v, const float* g, const float* beta, float scale, float* state,
           void* o, float* Tm, float* Mkk, Saved* saved, bool single_tf32, cudaStream_t stream,
           const DeltaInputForm& form) const;
};

// Chunked backward (chunk 64) for one fixed set of sequence lengths: given dout [T,HV,V] (element
// type `dt`) and optionally dht [N,HV,K,V] (fp32), computes dq, dk [T,H,K] (summed over the value
// heads of a group, in a fixed order), dv [T,HV,V], dg like g, dbeta [T,HV] and optionally dh0
// [N,HV,K,V]. Every gradient is fp32, whatever `dt`: they feed fp32 optimizer state, and a 16-bit
// dq/dk/dv would add a rounding the CPU backward does not have.
// Numerics: 16-bit inputs are widened to fp32 once, and the whole backward — the forward recompute
// included (an fp32 DeltaChunkPlan) — runs on fp32 tiles. Its tensor-core products are 3xTF32 for
// fp32 and fp16 inputs (fp16's own rounding is tf32's), so the error is that of the input rounding
// alone (about a plain fp32 recurrence on the rounded inputs); for bf16 inputs they are single
// tf32 products (2^-11 rounding against bf16's 2^-9: 1.00-1.09x the plain recurrence's error in
// the tests, a third of the tensor work), except in KDA's intra-chunk kernel under a gate form
// (3xTF32 there: the token sums dA_log, ddt_bias need it, see backward()).
// Launches: convert (16-bit only); record (prep + state pass of the fp32 forward, keeping T and
// Mkk); dstate (sequence x value head x V-tile, reverse over chunks: dS and dv_new); state terms
// and intra-chunk (chunk x value head: dq, dk, dv, dbeta, dg); a group sum of dq, dk when HV > H.
// K must be 32, 64 or 128 and V a multiple of 16 up to 128; KDA's gates g ≥ −10 as in the forward.
class DeltaChunkBackward {
 public:
  // state_cols: V columns per block of the reverse state pass, 16 or 32 (32 only when 32 divides
  // V); 0 picks by how many waves of blocks each gives (one block per multiprocessor fits).
  DeltaChunkBackward(const DeltaRuleDims& d, DType dt, int state_cols = 0);
  ~DeltaChunkBackward();
  DeltaChunkBackward(const DeltaChunkBackward&) = delete;
  DeltaChunkBackward& operator=(const DeltaChunkBackward&) = delete;

  // h0, dht and dh0 may be nullptr (zeros / not wanted). Outputs are overwritten. With a
  // non-plain `form`, q, k, beta and g are the raw inputs it names and dq, dk, dbeta, dg their
  // gradients; a gate form also writes dA_log [HV] and, with form.dt_bias, ddt_bias [HV·g_width]
  // (sums over tokens in a fixed order).
  void backward(const void* q, const void* k, const void* v, const float* g, const float* beta, float scale,
                const float* h0, const void* dout, const float* dht, float* dq, float* dk, float* dv, float* dg,
                float* dbeta, float* dh0, cudaStream_t stream, const DeltaInputForm& form = {}, float* dA_log = nullptr,
                float* ddt_bias = nullptr) const;

  size_t workspace_bytes() const { return ws_bytes_; }
  int state_cols() const { return state_cols_; }

 private:
  DeltaRuleDims d_;
  DType dt_;
  DeltaChunkPlan fwd_;  // fp32 forward, for the recompute
  int state_cols_ = 16;
  size_t ws_bytes_ = 0;
  void* ws_ = nullptr;
  mutable void* in_ws_ = nullptr;  // transformed inputs and gate-gradient partials (first form call)
};

// Recurrent decode / verify for a batch of N sequences with `tokens` new tokens each (1 for decode,
// more for a speculative verify step): q,k [N·tokens,H,K], v,o [N·tokens,HV,V], g, beta likewise.
// States live in a pool [slots,HV,K,V]; sequence n starts from pool[slot_in[n]]. With slot_out
// ([N,tokens] device int32) the state after token t is written to pool[slot_out[n·tokens+t]]
// (so a scheduler can roll back rejected drafts); without it the final state overwrites
// pool[slot_in[n]]. K in {32,64,128,256}, V a multiple of 16; d.cu_seqlens is not read. With ld > 0
// the rows of q, k and v are ld elements apart (a model's fused projection rows) instead of packed.
// Launched with PDL (launch.cuh): it may start while the kernel before it in the stream finishes.
// `columns` picks the kernel's V columns per work item, 16 or 32 (32 needs K ≤ 128 and V a multiple
// of 32); 0 chooses by the batch's size (tests force each). With a non-plain `form`, q, k, beta and g
// are the raw inputs it names, transformed in the kernel as the chunked forward does.
void delta_rule_decode(const DeltaRuleDims& d, DType dt, int64_t n_seqs, int64_t tokens, const void* q, const void* k,
                       const void* v, const float* g, const float* beta, float scale, float* state_pool,
                       const int32_t* slot_in, const int32_t* slot_out, void* o, cudaStream_t stream, int64_t ld = 0,
                       int columns = 0, const DeltaInputForm& form = {});

// Forward on host tensors (any float dtype; q, k, v run in `dt` = F32, F16 or BF16, g, beta and
// the state in F32), laid out as the CPU op takes them: q,k [T,H,K], v [T,HV,V], g [T,HV(,K)],
// beta [T,HV], h0 [N,HV,K,V]. Chunk mode runs DeltaChunkPlan; recurrent mode the decode kernel
// with each sequence's tokens as one multi-token step (equal lengths only). Returns o [T,HV,V]
// in `dt` and the final state [N,HV,K,V] in F32.
struct DeltaForwardHost {
  Tensor o, ht;
};
DeltaForwardHost delta_rule_forward_host(const DeltaRuleDims& d, DeltaMode mode, DType dt, const Tensor& q,
                                         const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                                         const Tensor& h0, float scale);

// Backward on host tensors, same layouts (dout [T,HV,V] runs in `dt` like q, k, v; dht [N,HV,K,V]
// may be undefined = zeros): DeltaChunkBackward. Returns fp32 gradients shaped like the inputs
// (dq, dk [T,H,K], dv [T,HV,V], dg [T,HV(,K)], dbeta [T,HV], dh0 [N,HV,K,V]).
struct DeltaBackwardHost {
  Tensor dq, dk, dv, dg, dbeta, dh0;
};
DeltaBackwardHost delta_rule_backward_host(const DeltaRuleDims& d, DType dt, const Tensor& q, const Tensor& k,
                                           const Tensor& v, const Tensor& g, const Tensor& beta, const Tensor& h0,
                                           const Tensor& dout, const Tensor& dht, float scale);

}  // namespace hla::cuda
