#include "backends/cuda/train_kernels.h"

#include <cstring>

#include "backends/cuda/delta_rule_cuda.h"

namespace hla::cuda {
namespace {

// A read-only F32 view of caller memory: the host entry points copy it to the device.
Tensor view(const float* p, Shape shape) {
  return Tensor::view_of(nullptr, const_cast<float*>(p), DType::F32, std::move(shape));
}

void copy_out(const Tensor& t, float* dst) { std::memcpy(dst, t.raw(), t.nbytes()); }

}  // namespace

const train::DeltaRuleKernels& delta_rule_training_kernels() {
  static const train::DeltaRuleKernels kernels{
      [](const DeltaRuleDims& d, const float* q, const float* k, const float* v, const float* g, const float* beta,
         float scale, float* o) {
        const int64_t T = d.tokens();
        const Tensor h0 = Tensor::f32({d.num_seqs(), d.HV, d.K, d.V});
        auto r = delta_rule_forward_host(d, DeltaMode::Chunk, DType::F32, view(q, {T, d.H, d.K}), view(k, {T, d.H, d.K}),
                                         view(v, {T, d.HV, d.V}), view(g, {T, d.g_stride()}), view(beta, {T, d.HV}),
                                         h0, scale);
        copy_out(r.o, o);
      },
      [](const DeltaRuleDims& d, const float* q, const float* k, const float* v, const float* g, const float* beta,
         float scale, const float* dout, float* dq, float* dk, float* dv, float* dg, float* dbeta) {
        const int64_t T = d.tokens();
        const Tensor h0 = Tensor::f32({d.num_seqs(), d.HV, d.K, d.V});
        auto r = delta_rule_backward_host(d, DType::F32, view(q, {T, d.H, d.K}), view(k, {T, d.H, d.K}),
                                          view(v, {T, d.HV, d.V}), view(g, {T, d.g_stride()}), view(beta, {T, d.HV}),
                                          h0, view(dout, {T, d.HV, d.V}), Tensor(), scale);
        copy_out(r.dq, dq), copy_out(r.dk, dk), copy_out(r.dv, dv), copy_out(r.dg, dg), copy_out(r.dbeta, dbeta);
      }};
  return kernels;
}

}  // namespace hla::cuda
