// Host-tensor entry points of the CUDA delta-rule forward and backward (`hla op --device cuda`, tests).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backends/cuda/delta_rule_cuda.h"
#include "core/error.h"

namespace hla::cuda {
namespace {

// A device copy of a host tensor converted to `dt`; freed on scope exit.
struct Dev {
  void* p = nullptr;
  Dev(const Tensor& t, DType dt) {
    const Tensor c = t.to(dt);
    check_cuda(cudaMalloc(&p, std::max<size_t>(c.nbytes(), 16)), "op alloc");
    check_cuda(cudaMemcpy(p, c.raw(), c.nbytes(), cudaMemcpyHostToDevice), "op upload");
  }
  Dev(size_t bytes) { check_cuda(cudaMalloc(&p, std::max<size_t>(bytes, 16)), "op alloc"); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

}  // namespace

DeltaForwardHost delta_rule_forward_host(const DeltaRuleDims& d, DeltaMode mode, DType dt, const Tensor& q,
                                         const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                                         const Tensor& h0, float scale) {
  check(device_available(), "--device cuda: no CUDA device found");
  const int64_t T = d.tokens(), N = d.num_seqs();
  check(q.numel() == T * d.H * d.K && k.numel() == q.numel() && v.numel() == T * d.HV * d.V &&
            g.numel() == T * d.g_stride() && beta.numel() == T * d.HV && h0.numel() == N * d.HV * d.K * d.V,
        "delta rule forward (cuda): tensor sizes do not match the dims");
  Dev dq(q, dt), dk(k, dt), dv(v, dt), dg(g, DType::F32), db(beta, DType::F32), ds(h0, DType::F32);
  Dev dout(size_t(T * d.HV * d.V) * dtype_size(dt));
  if (mode == DeltaMode::Chunk) {
    DeltaChunkPlan plan(d, dt);
    plan.forward(dq.p, dk.p, dv.p, static_cast<float*>(dg.p), static_cast<float*>(db.p), scale,
                 static_cast<float*>(ds.p), dout.p, nullptr);
  } else {
    // Token by token: the decode kernel with every sequence's tokens as one verify step, states
    // in a pool of N slots (slot n = sequence n).
    const int64_t L = N ? T / N : 0;
    for (int64_t n = 0; n < N; ++n)
      check(d.cu_seqlens[n + 1] - d.cu_seqlens[n] == L,
            "delta rule forward (cuda): the recurrent mode needs sequences of equal length");
    std::vector<int32_t> slots(N);
    for (int64_t n = 0; n < N; ++n) slots[n] = int32_t(n);
    Dev dslots(size_t(N) * 4);
    check_cuda(cudaMemcpy(dslots.p, slots.data(), size_t(N) * 4, cudaMemcpyHostToDevice), "op upload");
    if (L > 0)
      delta_rule_decode(d, dt, N, L, dq.p, dk.p, dv.p, static_cast<float*>(dg.p), static_cast<float*>(db.p), scale,
                        static_cast<float*>(ds.p), static_cast<int32_t*>(dslots.p), nullptr, dout.p, nullptr);
  }
  check_cuda(cudaDeviceSynchronize(), "delta rule forward (cuda)");
  DeltaForwardHost r{Tensor::zeros(dt, {T, d.HV, d.V}), Tensor::zeros(DType::F32, {N, d.HV, d.K, d.V})};
  check_cuda(cudaMemcpy(r.o.raw(), dout.p, r.o.nbytes(), cudaMemcpyDeviceToHost), "op download");
  check_cuda(cudaMemcpy(r.ht.raw(), ds.p, r.ht.nbytes(), cudaMemcpyDeviceToHost), "op download");
  return r;
}

DeltaBackwardHost delta_rule_backward_host(const DeltaRuleDims& d, DType dt, const Tensor& q, const Tensor& k,
                                           const Tensor& v, const Tensor& g, const Tensor& beta, const Tensor& h0,
                                           const Tensor& dout, const Tensor& dht, float scale) {
  check(device_available(), "--device cuda: no CUDA device found");
  const int64_t T = d.tokens(), N = d.num_seqs(), HV = d.HV;
  check(q.numel() == T * d.H * d.K && k.numel() == q.numel() && v.numel() == T * HV * d.V &&
            g.numel() == T * d.g_stride() && beta.numel() == T * HV && h0.numel() == N * HV * d.K * d.V &&
            dout.numel() == v.numel() && (!dht.defined() || dht.numel() == h0.numel()),
        "delta rule backward (cuda): tensor sizes do not match the dims");
  Dev dq(q, dt), dk(k, dt), dv(v, dt), dg(g, DType::F32), db(beta, DType::F32), ds(h0, DType::F32), ddo(dout, dt);
  std::unique_ptr<Dev> ddht;
  if (dht.defined()) ddht = std::make_unique<Dev>(dht, DType::F32);
  DeltaBackwardHost r{Tensor::zeros(DType::F32, {T, d.H, d.K}), Tensor::zeros(DType::F32, {T, d.H, d.K}),
                      Tensor::zeros(DType::F32, {T, HV, d.V}),  Tensor::zeros(DType::F32, {T, HV, d.g_width()}),
                      Tensor::zeros(DType::F32, {T, HV}),       Tensor::zeros(DType::F32, {N, HV, d.K, d.V})};
  Dev gq(r.dq.nbytes()), gk(r.dk.nbytes()), gv(r.dv.nbytes()), gg(r.dg.nbytes()), gb(r.dbeta.nbytes()),
      gh(r.dh0.nbytes());
  {
    DeltaChunkBackward bwd(d, dt);
    bwd.backward(dq.p, dk.p, dv.p, static_cast<float*>(dg.p), static_cast<float*>(db.p), scale,
                 static_cast<float*>(ds.p), ddo.p, ddht ? static_cast<float*>(ddht->p) : nullptr,
                 static_cast<float*>(gq.p), static_cast<float*>(gk.p), static_cast<float*>(gv.p),
                 static_cast<float*>(gg.p), static_cast<float*>(gb.p), static_cast<float*>(gh.p), nullptr);
    check_cuda(cudaDeviceSynchronize(), "delta rule backward (cuda)");
  }
  const std::pair<Tensor*, const Dev*> outs[] = {{&r.dq, &gq}, {&r.dk, &gk}, {&r.dv, &gv},
                                                 {&r.dg, &gg}, {&r.dbeta, &gb}, {&r.dh0, &gh}};
  for (const auto& [t, dev] : outs)
    check_cuda(cudaMemcpy(t->raw(), dev->p, t->nbytes(), cudaMemcpyDeviceToHost), "op download");
  return r;
}

}  // namespace hla::cuda
