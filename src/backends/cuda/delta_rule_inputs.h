// The input pass of a DeltaInputForm (delta_rule_cuda.h) and the chain rule back through it, shared
// by the chunked forward (DeltaChunkPlan) and backward (DeltaChunkBackward).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "backends/cuda/delta_rule_cuda.h"
#include "core/dtype.h"

namespace hla::cuda {

// Where the transformed inputs go: q, k [T,H,K] in the output element type, beta [T,HV] and
// g [T,HV(,K)] fp32. Buffers of transforms the form does not ask for are not written.
struct DeltaInputs {
  void *q = nullptr, *k = nullptr;
  float *beta = nullptr, *g = nullptr;
};

// Throws hla::Error naming `what` where the form is incomplete (a gate without A_log, ...).
void check_delta_input_form(const DeltaInputForm& form, const char* what);

// Bytes of one block holding the transformed q, k for dims d (element size `es`) and, with
// `gates`, beta and g; and that block carved into a DeltaInputs (256-byte aligned pieces; beta and
// g point past q, k, inside the block only when it was sized with `gates`).
size_t delta_inputs_bytes(const DeltaRuleDims& d, size_t es, bool gates);
DeltaInputs delta_inputs_at(void* block, const DeltaRuleDims& d, size_t es);

// One launch: q, k (element type `in`) → out.q, out.k (element type `out_dt`), b → out.beta,
// a → out.g, each as the form says.
void delta_inputs_forward(const DeltaRuleDims& d, const DeltaInputForm& form, DType in, DType out_dt, const void* q,
                          const void* k, const float* b, const float* a, const DeltaInputs& out, cudaStream_t s);

// Floats of scratch delta_inputs_backward needs (the per-split partial sums of dA_log, ddt_bias).
size_t delta_inputs_grad_scratch(const DeltaRuleDims& d);
// Gradients of the raw inputs, in place: dq, dk [T,H,K] fp32 hold the gradients of the normalised
// q, k on entry and those of the raw q, k (element type `in`) on return; dbeta those of b; dg
// those of a, after dA_log [HV] and, with form.dt_bias, ddt_bias [HV·g_width] are written (summed
// over tokens in a fixed order). Transforms the form does not name leave their gradient as is.
void delta_inputs_backward(const DeltaRuleDims& d, const DeltaInputForm& form, DType in, const void* q, const void* k,
                           const float* b, const float* a, float* dq, float* dk, float* dbeta, float* dg,
                           float* dA_log, float* ddt_bias, float* scratch, cudaStream_t s);

}  // namespace hla::cuda
