// MoE routed experts on the GPU (CudaDevice::moe), with no host round trip, so that a decode step
// through an MoE block can be recorded into a CUDA graph:
//   1. route: one warp per token picks its top_k experts from the router logits (cpu::moe_route's
//      rules) and counts the tokens of each expert;
//   2. plan: one warp turns the counts into each expert's first row in expert order and its first
//      row tile of the grouped GEMMs;
//   3. gather: each (token, pick) row of x goes to its expert's next free row, as bf16;
//   4. two grouped GEMMs on the tensor cores (wgmma for prefill-sized passes, mma.sync for a few
//      rows per expert): h = SwiGLU(rows · gate_up_e^T) as bf16, then y = h · down_e^T, each block
//      one row tile of one expert (found from the plan on the GPU);
//   5. combine: out[t] = Σ_j weight_j · y[row of pick j] (+ shared_gate[t] · shared[t]), in pick
//      order, so the result does not depend on the order in which step 3 handed out the rows.
// Tokens go through in passes of kMoeTokensPerPass, which bounds the scratch (y is fp32 [rows, D]).
// A pass of at most kMoeGemvPicks (token, pick) rows (decode at batch 1 and 2) skips steps 2 and
// 3: one GEMV per pick reads its expert's rows directly (a 16-row tile would idle 15 of its rows).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "backends/device.h"

namespace hla::cuda {

constexpr int64_t kMoeTokensPerPass = 8192, kMoeGemvPicks = 16;

// Shapes the kernels take: D and I multiples of 8 (16-byte rows), at most 1024 experts, at most 32
// expert groups dividing the experts evenly, and top_k at most the experts.
bool moe_fits(const MoeExperts& m);
// Scratch bytes moe_forward needs for passes of up to `tokens` tokens.
size_t moe_scratch_bytes(const MoeExperts& m, int64_t tokens);
// Device::moe for bf16 experts (m.gate_up and m.down hold bf16) on `stream`; scratch holds
// moe_scratch_bytes(m, min(T, kMoeTokensPerPass)) bytes, 256-byte aligned.
void moe_forward(const MoeExperts& m, const float* x, const float* logits, const float* shared,
                 const float* shared_gate, float* out, int64_t T, void* scratch, cudaStream_t stream);

}  // namespace hla::cuda
