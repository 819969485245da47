// hla op gdn|kda --input IN.safetensors --output OUT.safetensors [--mode chunk|recurrent] [--device cpu|cuda]
//
// Runs one delta-rule op on a dump in the fixture format (DESIGN.md, "Fixtures"). Each of the B
// rows is its own sequence; the scale is K^-0.5.
//   inputs:      in_q, in_k [B,T,H,K]; in_v [B,T,HV,V]; in_g [B,T,HV] (gdn) or [B,T,HV,K] (kda);
//                in_beta [B,T,HV]; in_h0 [B,HV,K,V]
//   cotangents:  in_do [B,T,HV,V], in_dht [B,HV,K,V] (optional; one alone means the other is zero)
//   outputs:     out_o [B,T,HV,V], out_ht [B,HV,K,V]; with cotangents also grad_q grad_k grad_v
//                grad_g grad_beta grad_h0 (gradients of sum(o·do) + sum(ht·dht), shaped as the inputs)
// Computes in double when in_q is F64, else in f32; writes in in_q's dtype.
// --device cuda runs the CUDA forward (chunk: the chunked kernels; recurrent: the decode kernel
// over all tokens) in in_q's dtype where the kernels take it (BF16, F16 and F32; F64 dumps run in
// F32). With cotangents the gradients come from the CUDA chunked backward (DeltaChunkBackward,
// in either mode: the gradients are the same function), computed in fp32 from inputs rounded to
// in_q's dtype, written in in_q's dtype like the outputs; it takes K in {32, 64, 128}, V ≤ 128.
#include <cmath>
#include <map>
#include <memory>

#include "apps/commands.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "ops/delta_rule.h"
#ifdef HLA_HAS_CUDA
#include "backends/cuda/delta_rule_cuda.h"
#endif

namespace hla::cli {

namespace {

struct OpOptions {
  std::string op, input, output, mode, device;
};

// A dump whose shapes agree, its tensors contiguous in the compute type (F64 or F32).
struct OpDump {
  DeltaRuleDims d;
  int64_t B = 0, T = 0;
  DType io = DType::F32;       // dtype of in_q: outputs are written in it
  DType compute = DType::F32;  // F64 for F64 dumps
  Tensor q, k, v, g, beta, h0, dout, dht;  // dout / dht undefined when absent
};

OpDump read_dump(const std::string& path, bool kda) {
  SafeTensorsFile f(path);
  auto get = [&](const std::string& name) {
    check(f.has(name), path + ": no tensor '" + name + "'");
    Tensor t = f.get(name);
    check(dtype_is_float(t.dtype()), path + ": tensor '" + name + "' must be a float type (is " +
                                         dtype_name(t.dtype()) + ")");
    return t;
  };
  auto expect = [&](const std::string& name, const Tensor& t, const Shape& want, const char* dims) {
    check(t.shape() == want, path + ": tensor '" + name + "' has shape " + shape_str(t.shape()) + ", expected " +
                                 dims + " = " + shape_str(want));
  };
  OpDump x;
  Tensor q = get("in_q"), v = get("in_v");
  check(q.dim() == 4, path + ": tensor 'in_q' must be [B,T,H,K] (has shape " + shape_str(q.shape()) + ")");
  check(v.dim() == 4, path + ": tensor 'in_v' must be [B,T,HV,V] (has shape " + shape_str(v.shape()) + ")");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), HV = v.size(2), V = v.size(3);
  check(B > 0 && H > 0 && K > 0, path + ": tensor 'in_q' has an empty dimension " + shape_str(q.shape()));
  check(v.size(0) == B && v.size(1) == T && HV > 0 && V > 0 && HV % H == 0,
        path + ": tensor 'in_v' has shape " + shape_str(v.shape()) + ", expected [B,T,HV,V] with B=" +
            std::to_string(B) + ", T=" + std::to_string(T) + " and HV a multiple of H=" + std::to_string(H));
  Tensor k = get("in_k"), g = get("in_g"), beta = get("in_beta"), h0 = get("in_h0");
  expect("in_k", k, {B, T, H, K}, "[B,T,H,K]");
  if (kda) expect("in_g", g, {B, T, HV, K}, "[B,T,HV,K] (kda)");
  else expect("in_g", g, {B, T, HV}, "[B,T,HV] (gdn)");
  expect("in_beta", beta, {B, T, HV}, "[B,T,HV]");
  expect("in_h0", h0, {B, HV, K, V}, "[B,HV,K,V]");
  x.io = q.dtype();
  x.compute = x.io == DType::F64 ? DType::F64 : DType::F32;
  x.B = B, x.T = T;
  x.d.H = H, x.d.HV = HV, x.d.K = K, x.d.V = V, x.d.gate = kda ? DeltaGate::PerKey : DeltaGate::Scalar;
  for (int64_t b = 0; b <= B; ++b) x.d.cu_seqlens.push_back(b * T);
  x.q = q.to(x.compute), x.k = k.to(x.compute), x.v = v.to(x.compute), x.g = g.to(x.compute);
  x.beta = beta.to(x.compute), x.h0 = h0.to(x.compute);
  if (f.has("in_do")) {
    Tensor t = get("in_do");
    expect("in_do", t, {B, T, HV, V}, "[B,T,HV,V]");
    x.dout = t.to(x.compute);
  }
  if (f.has("in_dht")) {
    Tensor t = get("in_dht");
    expect("in_dht", t, {B, HV, K, V}, "[B,HV,K,V]");
    x.dht = t.to(x.compute);
  }
  return x;
}

template <class T>
std::map<std::string, Tensor> run_cpu(const OpDump& x, DeltaMode mode) {
  const T scale = T(1) / std::sqrt(T(x.d.K));
  const T *q = x.q.data<T>(), *k = x.k.data<T>(), *v = x.v.data<T>(), *g = x.g.data<T>(), *b = x.beta.data<T>();
  std::map<std::string, Tensor> out;
  out["out_ht"] = x.h0.clone();
  out["out_o"] = Tensor::zeros(x.compute, {x.B, x.T, x.d.HV, x.d.V});
  delta_rule_forward<T>(x.d, q, k, v, g, b, scale, out["out_ht"].data<T>(), out["out_o"].data<T>(), mode);
  if (x.dout.defined() || x.dht.defined()) {
    const Tensor dout = x.dout.defined() ? x.dout : Tensor::zeros(x.compute, out["out_o"].shape());
    for (const auto& [name, like] : {std::pair<const char*, const Tensor*>{"grad_q", &x.q}, {"grad_k", &x.k},
                                     {"grad_v", &x.v}, {"grad_g", &x.g}, {"grad_beta", &x.beta}, {"grad_h0", &x.h0}})
      out[name] = Tensor::zeros(x.compute, like->shape());
    delta_rule_backward<T>(x.d, q, k, v, g, b, scale, x.h0.data<T>(), dout.data<T>(),
                           x.dht.defined() ? x.dht.data<T>() : nullptr, out["grad_q"].data<T>(),
                           out["grad_k"].data<T>(), out["grad_v"].data<T>(), out["grad_g"].data<T>(),
                           out["grad_beta"].data<T>(), out["grad_h0"].data<T>(), mode);
  }
  return out;
}

#ifdef HLA_HAS_CUDA
std::map<std::string, Tensor> run_cuda(const OpDump& x, DeltaMode mode) {
  const DType dt = x.io == DType::BF16 || x.io == DType::F16 ? x.io : DType::F32;
  const float scale = float(1.0 / std::sqrt(double(x.d.K)));
  auto r = cuda::delta_rule_forward_host(x.d, mode, dt, x.q, x.k, x.v, x.g, x.beta, x.h0, scale);
  std::map<std::string, Tensor> out{{"out_o", r.o.reshape({x.B, x.T, x.d.HV, x.d.V})}, {"out_ht", r.ht}};
  if (x.dout.defined() || x.dht.defined()) {
    const Tensor dout = x.dout.defined() ? x.dout : Tensor::zeros(x.compute, {x.B, x.T, x.d.HV, x.d.V});
    auto b = cuda::delta_rule_backward_host(x.d, dt, x.q, x.k, x.v, x.g, x.beta, x.h0, dout, x.dht, scale);
    out["grad_q"] = b.dq.reshape(x.q.shape());
    out["grad_k"] = b.dk.reshape(x.k.shape());
    out["grad_v"] = b.dv.reshape(x.v.shape());
    out["grad_g"] = b.dg.reshape(x.g.shape());
    out["grad_beta"] = b.dbeta.reshape(x.beta.shape());
    out["grad_h0"] = b.dh0.reshape(x.h0.shape());
  }
  return out;
}
#endif

}  // namespace

void register_op(CLI::App& app) {
  auto* cmd = app.add_subcommand("op", "Run one delta-rule op (gdn, kda) on a dump: outputs, final state, gradients");
  auto o = std::make_shared<OpOptions>();
  cmd->add_option("op", o->op, "gdn (scalar gate) or kda (per-key gate)")->required()->check(CLI::IsMember({"gdn", "kda"}));
  cmd->add_option("--input", o->input, "safetensors dump: in_q in_k in_v in_g in_beta in_h0 [in_do in_dht]")->required();
  cmd->add_option("--output", o->output, "safetensors file to write out_o out_ht [grad_*]")->required();
  cmd->add_option("--mode", o->mode, "chunk (WY/UT, chunk 64) or recurrent (token by token)")
      ->default_val("chunk")
      ->check(CLI::IsMember({"chunk", "recurrent"}));
  cmd->add_option("--device", o->device, "cpu or cuda")->default_val("cpu")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->callback([o] {
#ifndef HLA_HAS_CUDA
    check(o->device == "cpu", "--device cuda: hla was built without CUDA (configure with -DHLA_CUDA=ON)");
#endif
    const OpDump x = read_dump(o->input, o->op == "kda");
    const DeltaMode mode = o->mode == "chunk" ? DeltaMode::Chunk : DeltaMode::Recurrent;
    std::map<std::string, Tensor> out;
#ifdef HLA_HAS_CUDA
    if (o->device == "cuda") out = run_cuda(x, mode);
    else
#endif
      out = x.compute == DType::F64 ? run_cpu<double>(x, mode) : run_cpu<float>(x, mode);
    for (auto& [name, t] : out) t = t.to(x.io);
    write_safetensors(o->output, out);
  });
}

}  // namespace hla::cli
