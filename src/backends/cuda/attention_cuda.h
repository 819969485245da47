// CUDA softmax attention of one sequence over its cached keys, as cpu::attention computes it.
//
// Device tensors, fp32: q [n, nh, dq] (the sequence's n newest queries; query i sits at position
// S−n+i), k [S, nkv, dq], v [S, nkv, dv], o [n, nh, dv]. GQA: head h reads kv head h / (nh/nkv).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace hla::cuda {

// fp32 throughout, any head dims: one warp per (query, head) with an online softmax. window > 0:
// query at pos sees keys pos−window+1 .. pos; selected [n, topk] (−1 = none): only those keys.
void attention_reference(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                         int64_t nkv, int64_t dq, int64_t dv, float scale, int64_t window, const int32_t* selected,
                         int64_t topk, cudaStream_t stream);

// Tensor-core causal attention (operands rounded to bf16 as they are loaded, fp32 accumulation and
// softmax), for prefill and decode. Returns false, doing nothing, where the shape is not supported
// (then attention_reference runs).
bool attention_flash(const float* q, const float* k, const float* v, float* o, int64_t n, int64_t S, int64_t nh,
                     int64_t nkv, int64_t dq, int64_t dv, float scale, cudaStream_t stream);

}  // namespace hla::cuda
