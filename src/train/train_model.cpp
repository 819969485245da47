#include "train/train_model.h"

#include <cstring>
#include <type_traits>

#include "core/error.h"
#include "model/hybrid_layers.h"
#include "ops/delta_rule.h"
#include "train/grad_ops.h"

namespace hla::train {

int64_t Batch::labelled() const {
  int64_t n = 0;
  for (int64_t l : labels) n += l >= 0;
  return n;
}

// What a layer sees of the batch.
struct Ctx {
  const std::vector<int64_t>* cu;
  int64_t N;               // packed tokens
  double index_scale = 0;  // weight of each query's indexer KL
  double* index_loss = nullptr;
  bool dense = false;      // DSA warm-up
  const DeltaRuleKernels* delta = nullptr;  // another backend's delta-rule op (float models only)
};

namespace {

template <class T>
Vec<T> zeros(int64_t n) { return Vec<T>(size_t(n), T(0)); }

template <class T>
void add(T* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Copies column block [c0, c0+w) of a [N, C] matrix into [N, w] (or back with `scatter`).
template <class T>
void cols(T* full, T* part, int64_t N, int64_t C, int64_t c0, int64_t w, bool scatter) {
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < w; ++j) {
      if (scatter) full[t * C + c0 + j] = part[t * w + j];
      else part[t * w + j] = full[t * C + c0 + j];
    }
}

}  // namespace

template <class T>
struct TrainModel<T>::Layer {
  virtual ~Layer() = default;
  // y [N, D] = layer(x [N, D]); keeps what backward needs.
  virtual void forward(const T* x, T* y, const Ctx& c) = 0;
  // dx [N, D] (overwritten) from dy; parameter gradients accumulate.
  virtual void backward(const T* dy, T* dx, const Ctx& c) = 0;
};

namespace {

template <class T>
using Base = typename TrainModel<T>::Layer;

// Binds parameters by checkpoint name; the owner keeps them.
template <class T>
struct Binder {
  const std::function<Tensor(const std::string&)>& get;
  std::vector<std::unique_ptr<Param<T>>>& out;
  Param<T>* operator()(const std::string& name, const Shape& shape, bool decay = true) {
    Tensor t = get(name);
    check(t.numel() == shape_numel(shape),
          "tensor '" + name + "' has shape " + shape_str(t.shape()) + " but the config implies " + shape_str(shape));
    auto p = std::make_unique<Param<T>>();
    p->name = name, p->shape = t.shape(), p->decay = decay && shape.size() >= 2;
    Tensor f = t.to_f32();
    p->w.assign(f.f32(), f.f32() + f.numel());
    p->g.assign(p->w.size(), T(0));
    out.push_back(std::move(p));
    return out.back().get();
  }
};

template <class T>
struct Linear {
  Param<T>* W = nullptr;
  int64_t in = 0, out = 0;
  void bind(Binder<T>& b, const std::string& name, int64_t i, int64_t o) {
    in = i, out = o;
    W = b(name, {o, i});
  }
  void fwd(const T* x, T* y, int64_t N) const { linear_fwd(x, W->w.data(), y, N, in, out); }
  void bwd(const T* x, const T* dy, T* dx, int64_t N, bool accumulate) const {
    linear_bwd(x, W->w.data(), dy, dx, W->g.data(), N, in, out, accumulate);
  }
};

// ------------------------------------------------------------------------------------------------
// SwiGLU MLP: down(silu(gate x) ⊙ up x).
// ------------------------------------------------------------------------------------------------
template <class T>
struct Mlp : Base<T> {
  Linear<T> gate, up, down;
  Vec<T> x, g, u, h;
  Mlp(Binder<T>& b, const std::string& pre, int64_t D, int64_t I) {
    gate.bind(b, pre + "gate_proj.weight", D, I);
    up.bind(b, pre + "up_proj.weight", D, I);
    down.bind(b, pre + "down_proj.weight", I, D);
  }
  void forward(const T* x_, T* y, const Ctx& c) override {
    const int64_t N = c.N, I = gate.out;
    x.assign(x_, x_ + N * gate.in);
    g = zeros<T>(N * I), u = zeros<T>(N * I), h = zeros<T>(N * I);
    gate.fwd(x_, g.data(), N);
    up.fwd(x_, u.data(), N);
    for (int64_t i = 0; i < N * I; ++i) h[size_t(i)] = silu(g[size_t(i)]) * u[size_t(i)];
    down.fwd(h.data(), y, N);
  }
  void backward(const T* dy, T* dx, const Ctx& c) override {
    const int64_t N = c.N, I = gate.out;
    Vec<T> dh = zeros<T>(N * I), dg = zeros<T>(N * I), du = zeros<T>(N * I);
    down.bwd(h.data(), dy, dh.data(), N, false);
    for (int64_t i = 0; i < N * I; ++i) {
      dg[size_t(i)] = dh[size_t(i)] * u[size_t(i)] * dsilu(g[size_t(i)]);
      du[size_t(i)] = dh[size_t(i)] * silu(g[size_t(i)]);
    }
    gate.bwd(x.data(), dg.data(), dx, N, false);
    up.bwd(x.data(), du.data(), dx, N, true);
  }
};

// ------------------------------------------------------------------------------------------------
// Delta-rule core shared by GDN and KDA: conv'd q,k,v -> l2 norm -> delta rule (ops) -> o.
// ------------------------------------------------------------------------------------------------
template <class T>
struct DeltaCore {
  DeltaRuleDims d;
  T scale;
  Vec<T> qr, kr, q, k, v, g, beta, o;  // qr/kr: before the l2 norm
  // The CPU op's form: with a state of at most 16 × 16 the token loop costs less than the 64-row
  // chunk products (a KKKA MQAR model, one thread: 28.5K → 41K tokens/s at 8 × 8, 1.05× at 16 × 16;
  // the chunks win from 32 × 32, by 1.08×, and at 64 × 64 by 1.37×). Both forms give the same values.
  DeltaMode mode() const { return d.K * d.V <= 256 ? DeltaMode::Recurrent : DeltaMode::Chunk; }
  void forward(const Ctx& c) {
    d.cu_seqlens = *c.cu;
    q = zeros<T>(c.N * d.H * d.K), k = zeros<T>(c.N * d.H * d.K), o = zeros<T>(c.N * d.HV * d.V);
    l2norm_forward<T>(qr.data(), q.data(), c.N * d.H, d.K);
    l2norm_forward<T>(kr.data(), k.data(), c.N * d.H, d.K);
    if constexpr (std::is_same_v<T, float>) {
      if (c.delta) return c.delta->forward(d, q.data(), k.data(), v.data(), g.data(), beta.data(), scale, o.data());
    }
    Vec<T> state = zeros<T>(d.num_seqs() * d.HV * d.K * d.V);
    delta_rule_forward<T>(d, q.data(), k.data(), v.data(), g.data(), beta.data(), scale, state.data(), o.data(),
                          mode());
  }
  // From do: dqr, dkr (before the l2 norm), dv, dg, dbeta.
  void backward(const T* dout, Vec<T>& dqr, Vec<T>& dkr, Vec<T>& dv, Vec<T>& dg, Vec<T>& dbeta, const Ctx& c) {
    const int64_t N = c.N;
    Vec<T> dq = zeros<T>(N * d.H * d.K), dk = zeros<T>(N * d.H * d.K);
    dv = zeros<T>(N * d.HV * d.V), dg = zeros<T>(N * d.g_stride()), dbeta = zeros<T>(N * d.HV);
    [&] {  // the op's backward: another backend's kernels where set (float models), else the CPU op
      if constexpr (std::is_same_v<T, float>) {
        if (c.delta)
          return c.delta->backward(d, q.data(), k.data(), v.data(), g.data(), beta.data(), scale, dout, dq.data(),
                                   dk.data(), dv.data(), dg.data(), dbeta.data());
      }
      delta_rule_backward<T>(d, q.data(), k.data(), v.data(), g.data(), beta.data(), scale, nullptr, dout, nullptr,
                             dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data(), nullptr, mode());
    }();
    dqr = zeros<T>(N * d.H * d.K), dkr = zeros<T>(N * d.H * d.K);
    l2norm_backward<T>(qr.data(), dq.data(), dqr.data(), N * d.H, d.K);
    l2norm_backward<T>(kr.data(), dk.data(), dkr.data(), N * d.H, d.K);
  }
};

// Gated DeltaNet, Qwen3.5 flat layout (`linear_attn.*`): in_proj_qkv -> conv over [q|k|v] ->
// delta rule with g = −exp(A_log)·softplus(a + dt_bias), beta = beta_max·sigmoid(b) -> gated RMSNorm (SiLU
// of z) -> out_proj.
template <class T>
struct Gdn : Base<T> {
  int64_t D, nk, nv, dk, dv, kw, C;
  T eps, beta_max;
  Linear<T> qkv, zp, bp, ap, out;
  Param<T>*conv, *A_log, *dt_bias, *norm;
  DeltaCore<T> core;
  Vec<T> x, mixed, pre, act, z, bl, a, yn;
  Gdn(Binder<T>& b, const ModelSpec& s, const std::string& pre_) {
    D = s.hidden, nk = s.lin_nk, nv = s.lin_nv, dk = s.lin_dk, dv = s.lin_dv, kw = s.conv_kernel;
    C = 2 * nk * dk + nv * dv, eps = T(s.norm_eps), beta_max = T(s.beta_max);
    qkv.bind(b, pre_ + "in_proj_qkv.weight", D, C);
    zp.bind(b, pre_ + "in_proj_z.weight", D, nv * dv);
    bp.bind(b, pre_ + "in_proj_b.weight", D, nv);
    ap.bind(b, pre_ + "in_proj_a.weight", D, nv);
    conv = b(pre_ + "conv1d.weight", {C, 1, kw});
    A_log = b(pre_ + "A_log", {nv}, false);
    dt_bias = b(pre_ + "dt_bias", {nv}, false);
    norm = b(pre_ + "norm.weight", {dv}, false);
    out.bind(b, pre_ + "out_proj.weight", nv * dv, D);
    core.d.H = nk, core.d.HV = nv, core.d.K = dk, core.d.V = dv, core.d.gate = DeltaGate::Scalar;
    core.scale = T(1) / std::sqrt(T(dk));
  }
  void forward(const T* x_, T* y, const Ctx& c) override {
    const int64_t N = c.N;
    x.assign(x_, x_ + N * D);
    mixed = zeros<T>(N * C), pre = zeros<T>(N * C), act = zeros<T>(N * C);
    z = zeros<T>(N * nv * dv), bl = zeros<T>(N * nv), a = zeros<T>(N * nv);
    qkv.fwd(x_, mixed.data(), N);
    zp.fwd(x_, z.data(), N);
    bp.fwd(x_, bl.data(), N);
    ap.fwd(x_, a.data(), N);
    conv_fwd(mixed.data(), conv->w.data(), pre.data(), act.data(), *c.cu, C, kw);
    core.qr = zeros<T>(N * nk * dk), core.kr = zeros<T>(N * nk * dk), core.v = zeros<T>(N * nv * dv);
    cols(act.data(), core.qr.data(), N, C, 0, nk * dk, false);
    cols(act.data(), core.kr.data(), N, C, nk * dk, nk * dk, false);
    cols(act.data(), core.v.data(), N, C, 2 * nk * dk, nv * dv, false);
    core.beta = zeros<T>(N * nv), core.g = zeros<T>(N * nv);
    beta_sigmoid_forward<T>(bl.data(), core.beta.data(), N * nv, beta_max);
    gate_softplus_forward<T>(a.data(), A_log->w.data(), dt_bias->w.data(), core.g.data(), N, nv, 1);
    core.forward(c);
    yn = zeros<T>(N * nv * dv);
    gated_rms_fwd(core.o.data(), z.data(), norm->w.data(), yn.data(), N * nv, dv, eps, true);
    out.fwd(yn.data(), y, N);
  }
  void backward(const T* dy, T* dx, const Ctx& c) override {
    const int64_t N = c.N;
    Vec<T> dyn = zeros<T>(N * nv * dv), dout = zeros<T>(N * nv * dv), dz = zeros<T>(N * nv * dv);
    out.bwd(yn.data(), dy, dyn.data(), N, false);
    gated_rms_bwd(core.o.data(), z.data(), norm->w.data(), dyn.data(), dout.data(), dz.data(), norm->g.data(), N * nv,
                  dv, eps, true);
    Vec<T> dqr, dkr, dv_, dg, dbeta;
    core.backward(dout.data(), dqr, dkr, dv_, dg, dbeta, c);
    Vec<T> dbl = zeros<T>(N * nv), da = zeros<T>(N * nv), dA = zeros<T>(nv), ddt = zeros<T>(nv);
    beta_sigmoid_backward<T>(bl.data(), dbeta.data(), dbl.data(), N * nv, beta_max);
    gate_softplus_backward<T>(a.data(), A_log->w.data(), dt_bias->w.data(), dg.data(), da.data(), dA.data(), ddt.data(),
                              N, nv, 1);
    add(A_log->g.data(), dA.data(), nv);
    add(dt_bias->g.data(), ddt.data(), nv);
    Vec<T> dact = zeros<T>(N * C), dmixed = zeros<T>(N * C);
    cols(dact.data(), dqr.data(), N, C, 0, nk * dk, true);
    cols(dact.data(), dkr.data(), N, C, nk * dk, nk * dk, true);
    cols(dact.data(), dv_.data(), N, C, 2 * nk * dk, nv * dv, true);
    conv_bwd(mixed.data(), conv->w.data(), pre.data(), dact.data(), dmixed.data(), conv->g.data(), *c.cu, C, kw);
    qkv.bwd(x.data(), dmixed.data(), dx, N, false);
    zp.bwd(x.data(), dz.data(), dx, N, true);
    bp.bwd(x.data(), dbl.data(), dx, N, true);
    ap.bwd(x.data(), da.data(), dx, N, true);
  }
};

// Kimi Delta Attention (`self_attn.*`, Kimi-Linear names): q/k/v each with its own conv; per-key
// decay g = −exp(A_log[h])·softplus(f_b(f_a x) + dt_bias); output gate sigmoid(g_b(g_a x)).
template <class T>
struct Kda : Base<T> {
  int64_t D, H, dk, HK, kw;
  T eps, beta_max;
  Linear<T> qp, kp, vp, fa, fb, bp, ga, gb, out;
  Param<T>*cq, *ck, *cv, *A_log, *dt_bias, *onorm;
  DeltaCore<T> core;
  Vec<T> x, qm, km, vm, pq, pk, pv, flo, f, bl, glo, og, yn;
  Kda(Binder<T>& b, const ModelSpec& s, const std::string& p) {
    D = s.hidden, H = s.lin_nv, dk = s.lin_dk, HK = H * dk, kw = s.conv_kernel, eps = T(s.norm_eps),
    beta_max = T(s.beta_max);
    qp.bind(b, p + "q_proj.weight", D, HK);
    kp.bind(b, p + "k_proj.weight", D, HK);
    vp.bind(b, p + "v_proj.weight", D, HK);
    cq = b(p + "q_conv1d.weight", {HK, 1, kw});
    ck = b(p + "k_conv1d.weight", {HK, 1, kw});
    cv = b(p + "v_conv1d.weight", {HK, 1, kw});
    fa.bind(b, p + "f_a_proj.weight", D, dk);
    fb.bind(b, p + "f_b_proj.weight", dk, HK);
    dt_bias = b(p + "dt_bias", {HK}, false);
    A_log = b(p + "A_log", {1, 1, H, 1}, false);
    bp.bind(b, p + "b_proj.weight", D, H);
    ga.bind(b, p + "g_a_proj.weight", D, dk);
    gb.bind(b, p + "g_b_proj.weight", dk, HK);
    onorm = b(p + "o_norm.weight", {dk}, false);
    out.bind(b, p + "o_proj.weight", HK, D);
    core.d.H = H, core.d.HV = H, core.d.K = dk, core.d.V = dk, core.d.gate = DeltaGate::PerKey;
    core.scale = T(1) / std::sqrt(T(dk));
  }
  void forward(const T* x_, T* y, const Ctx& c) override {
    const int64_t N = c.N;
    x.assign(x_, x_ + N * D);
    qm = zeros<T>(N * HK), km = zeros<T>(N * HK), vm = zeros<T>(N * HK);
    pq = zeros<T>(N * HK), pk = zeros<T>(N * HK), pv = zeros<T>(N * HK);
    core.qr = zeros<T>(N * HK), core.kr = zeros<T>(N * HK), core.v = zeros<T>(N * HK);
    qp.fwd(x_, qm.data(), N), kp.fwd(x_, km.data(), N), vp.fwd(x_, vm.data(), N);
    conv_fwd(qm.data(), cq->w.data(), pq.data(), core.qr.data(), *c.cu, HK, kw);
    conv_fwd(km.data(), ck->w.data(), pk.data(), core.kr.data(), *c.cu, HK, kw);
    conv_fwd(vm.data(), cv->w.data(), pv.data(), core.v.data(), *c.cu, HK, kw);
    flo = zeros<T>(N * dk), f = zeros<T>(N * HK), bl = zeros<T>(N * H);
    fa.fwd(x_, flo.data(), N);
    fb.fwd(flo.data(), f.data(), N);
    core.g = zeros<T>(N * HK), core.beta = zeros<T>(N * H);
    gate_softplus_forward<T>(f.data(), A_log->w.data(), dt_bias->w.data(), core.g.data(), N, H, dk);
    bp.fwd(x_, bl.data(), N);
    beta_sigmoid_forward<T>(bl.data(), core.beta.data(), N * H, beta_max);
    core.forward(c);
    glo = zeros<T>(N * dk), og = zeros<T>(N * HK), yn = zeros<T>(N * HK);
    ga.fwd(x_, glo.data(), N);
    gb.fwd(glo.data(), og.data(), N);
    gated_rms_fwd(core.o.data(), og.data(), onorm->w.data(), yn.data(), N * H, dk, eps, false);
    out.fwd(yn.data(), y, N);
  }
  void backward(const T* dy, T* dx, const Ctx& c) override {
    const int64_t N = c.N;
    Vec<T> dyn = zeros<T>(N * HK), dout = zeros<T>(N * HK), dog = zeros<T>(N * HK), dlo = zeros<T>(N * dk);
    out.bwd(yn.data(), dy, dyn.data(), N, false);
    gated_rms_bwd(core.o.data(), og.data(), onorm->w.data(), dyn.data(), dout.data(), dog.data(), onorm->g.data(),
                  N * H, dk, eps, false);
    gb.bwd(glo.data(), dog.data(), dlo.data(), N, false);
    ga.bwd(x.data(), dlo.data(), dx, N, false);
    Vec<T> dqr, dkr, dv, dg, dbeta;
    core.backward(dout.data(), dqr, dkr, dv, dg, dbeta, c);
    Vec<T> dbl = zeros<T>(N * H), df = zeros<T>(N * HK), dA = zeros<T>(H), ddt = zeros<T>(HK);
    beta_sigmoid_backward<T>(bl.data(), dbeta.data(), dbl.data(), N * H, beta_max);
    bp.bwd(x.data(), dbl.data(), dx, N, true);
    gate_softplus_backward<T>(f.data(), A_log->w.data(), dt_bias->w.data(), dg.data(), df.data(), dA.data(), ddt.data(),
                              N, H, dk);
    add(A_log->g.data(), dA.data(), H);
    add(dt_bias->g.data(), ddt.data(), HK);
    fb.bwd(flo.data(), df.data(), dlo.data(), N, false);
    fa.bwd(x.data(), dlo.data(), dx, N, true);
    Vec<T> dm = zeros<T>(N * HK);
    conv_bwd(qm.data(), cq->w.data(), pq.data(), dqr.data(), dm.data(), cq->g.data(), *c.cu, HK, kw);
    qp.bwd(x.data(), dm.data(), dx, N, true);
    conv_bwd(km.data(), ck->w.data(), pk.data(), dkr.data(), dm.data(), ck->g.data(), *c.cu, HK, kw);
    kp.bwd(x.data(), dm.data(), dx, N, true);
    conv_bwd(vm.data(), cv->w.data(), pv.data(), dv.data(), dm.data(), cv->g.data(), *c.cu, HK, kw);
    vp.bwd(x.data(), dm.data(), dx, N, true);
  }
};

// Lightning attention (see model/hybrid_layers.h): q,k,v = SiLU(proj x); S_t = γ_h S_{t−1} + k v^T;
// o = S^T q·dk^-½; gated RMSNorm (sigmoid of g_proj x); o_proj. The backward runs time in
// reverse with dS_t = γ dS_{t+1} + s·q_t do_t^T, reading the states S_t saved by the forward.
template <class T>
struct LightningLayer : Base<T> {
  int64_t D, H, dk, HK;
  T eps, scale;
  std::vector<T> decay;
  Linear<T> qp, kp, vp, gp, out;
  Param<T>* onorm;
  Vec<T> x, qm, km, vm, q, k, v, gate, o, states, yn;
  LightningLayer(Binder<T>& b, const ModelSpec& s, const std::string& p) {
    D = s.hidden, H = s.lin_nv, dk = s.lin_dk, HK = H * dk, eps = T(s.norm_eps), scale = T(1) / std::sqrt(T(dk));
    qp.bind(b, p + "q_proj.weight", D, HK);
    kp.bind(b, p + "k_proj.weight", D, HK);
    vp.bind(b, p + "v_proj.weight", D, HK);
    gp.bind(b, p + "g_proj.weight", D, HK);
    onorm = b(p + "o_norm.weight", {dk}, false);
    out.bind(b, p + "o_proj.weight", HK, D);
    // γ rounded through float as the inference path stores it
    for (double g : lightning_log_decay(H)) decay.push_back(T(float(std::exp(g))));
  }
  void forward(const T* x_, T* y, const Ctx& c) override {
    const int64_t N = c.N, S = int64_t(c.cu->size()) - 1, KK = dk * dk;
    x.assign(x_, x_ + N * D);
    for (Vec<T>* b : {&qm, &km, &vm, &q, &k, &v, &gate, &o}) *b = zeros<T>(N * HK);
    qp.fwd(x_, qm.data(), N), kp.fwd(x_, km.data(), N), vp.fwd(x_, vm.data(), N), gp.fwd(x_, gate.data(), N);
    for (int64_t i = 0; i < N * HK; ++i) q[size_t(i)] = silu(qm[size_t(i)]), k[size_t(i)] = silu(km[size_t(i)]), v[size_t(i)] = silu(vm[size_t(i)]);
    states = zeros<T>(N * H * KK);
    const auto& cu = *c.cu;
#pragma omp parallel for collapse(2) if (N * KK > 16384)
    for (int64_t n = 0; n < S; ++n)
      for (int64_t h = 0; h < H; ++h) {
        Vec<T> St = zeros<T>(KK);
        for (int64_t t = cu[size_t(n)]; t < cu[size_t(n + 1)]; ++t) {
          const T *kt = k.data() + t * HK + h * dk, *vt = v.data() + t * HK + h * dk, *qt = q.data() + t * HK + h * dk;
          T* ot = o.data() + t * HK + h * dk;
          for (int64_t a = 0; a < dk; ++a)
            for (int64_t b = 0; b < dk; ++b) {
              T& s = St[size_t(a * dk + b)];
              s = decay[size_t(h)] * s + kt[a] * vt[b];
              ot[b] += s * qt[a] * scale;
            }
          std::copy(St.begin(), St.end(), states.begin() + (t * H + h) * KK);
        }
      }
    yn = zeros<T>(N * HK);
    gated_rms_fwd(o.data(), gate.data(), onorm->w.data(), yn.data(), N * H, dk, eps, false);
    out.fwd(yn.data(), y, N);
  }
  void backward(const T* dy, T* dx, const Ctx& c) override {
    const int64_t N = c.N, S = int64_t(c.cu->size()) - 1, KK = dk * dk;
    Vec<T> dyn = zeros<T>(N * HK), dout = zeros<T>(N * HK), dgate = zeros<T>(N * HK);
    out.bwd(yn.data(), dy, dyn.data(), N, false);
    gated_rms_bwd(o.data(), gate.data(), onorm->w.data(), dyn.data(), dout.data(), dgate.data(), onorm->g.data(), N * H,
                  dk, eps, false);
    Vec<T> dq = zeros<T>(N * HK), dk_ = zeros<T>(N * HK), dv = zeros<T>(N * HK);
    const auto& cu = *c.cu;
#pragma omp parallel for collapse(2) if (N * KK > 16384)
    for (int64_t n = 0; n < S; ++n)
      for (int64_t h = 0; h < H; ++h) {
        Vec<T> dS = zeros<T>(KK);
        for (int64_t t = cu[size_t(n + 1)] - 1; t >= cu[size_t(n)]; --t) {
          const T *kt = k.data() + t * HK + h * dk, *vt = v.data() + t * HK + h * dk, *qt = q.data() + t * HK + h * dk;
          const T* dot = dout.data() + t * HK + h * dk;
          const T* St = states.data() + (t * H + h) * KK;
          T *dqt = dq.data() + t * HK + h * dk, *dkt = dk_.data() + t * HK + h * dk, *dvt = dv.data() + t * HK + h * dk;
          for (int64_t a = 0; a < dk; ++a)
            for (int64_t b = 0; b < dk; ++b) {
              T& g = dS[size_t(a * dk + b)];
              g += scale * qt[a] * dot[b];
              dqt[a] += scale * St[a * dk + b] * dot[b];
              dkt[a] += g * vt[b];
              dvt[b] += g * kt[a];
            }
          for (auto& g : dS) g *= decay[size_t(h)];
        }
      }
    for (int64_t i = 0; i < N * HK; ++i) {
      dq[size_t(i)] *= dsilu(qm[size_t(i)]), dk_[size_t(i)] *= dsilu(km[size_t(i)]), dv[size_t(i)] *= dsilu(vm[size_t(i)]);
    }
    qp.bwd(x.data(), dq.data(), dx, N, false);
    kp.bwd(x.data(), dk_.data(), dx, N, true);
    vp.bwd(x.data(), dv.data(), dx, N, true);
    gp.bwd(x.data(), dgate.data(), dx, N, true);
  }
};

// ------------------------------------------------------------------------------------------------
// Softmax attention (GatedAttention's math): [q | gate] per head, zero-centred q/k RMSNorm, half-
// split RoPE, GQA, causal softmax over each query's keys, sigmoid(gate) ⊙ o, o_proj. Keys of a
// query: all causal ones, a sliding window, or the DSA indexer's top-k (positions are relative to
// the sequence start).
// ------------------------------------------------------------------------------------------------
template <class T>
struct Attn : Base<T> {
  MixerKind kind;
  int64_t D, nh, nkv, hd, window = 0;
  T eps, scale;
  std::vector<float> inv_freq;
  Linear<T> qp, kp, vp, out;
  Param<T>*qn, *kn;
  Vec<T> x, qg, qraw, kraw, q, k, v, gate, o, lse, og;
  // optional short conv over [q|k|v] (ModelSpec::attn_conv_kernel): its input and pre-activation
  Param<T>* conv = nullptr;
  int64_t kw = 0, C = 0;
  Vec<T> conv_in, conv_pre;
  // DSA indexer
  int64_t IH = 0, ID = 0, topk = 0;
  Linear<T> iq_p, ik_p, iw_p;
  Param<T>*ik_w = nullptr, *ik_b = nullptr;
  Vec<T> iq, ik_raw, ik, iw;
  std::vector<std::vector<int32_t>> sel;  // per packed row; empty = all causal keys (or the window)

  Attn(Binder<T>& b, const ModelSpec& s, const std::string& p, MixerKind k_) : kind(k_) {
    D = s.hidden, nh = s.n_heads, nkv = s.n_kv_heads, hd = s.head_dim, eps = T(s.norm_eps);
    scale = T(1) / std::sqrt(T(hd));
    inv_freq = rope_inv_freq_f(s.rope.theta, s.rope.rot);
    qp.bind(b, p + "q_proj.weight", D, nh * 2 * hd);
    kp.bind(b, p + "k_proj.weight", D, nkv * hd);
    vp.bind(b, p + "v_proj.weight", D, nkv * hd);
    out.bind(b, p + "o_proj.weight", nh * hd, D);
    qn = b(p + "q_norm.weight", {hd}, false);
    kn = b(p + "k_norm.weight", {hd}, false);
    kw = s.attn_conv_kernel, C = s.attn_conv_channels();
    if (kw > 0) conv = b(p + "conv1d.weight", {C, 1, kw});
    if (kind == MixerKind::SlidingAttention) window = s.sliding_window;
    if (kind == MixerKind::SparseAttention) {
      IH = s.index_heads, ID = s.index_dim, topk = s.index_topk;
      iq_p.bind(b, p + "indexer.wq.weight", D, IH * ID);
      ik_p.bind(b, p + "indexer.wk.weight", D, ID);
      ik_w = b(p + "indexer.k_norm.weight", {ID}, false);
      ik_b = b(p + "indexer.k_norm.bias", {ID}, false);
      iw_p.bind(b, p + "indexer.weights_proj.weight", D, IH);
    }
  }
  static std::vector<float> rope_inv_freq_f(double theta, int64_t rot) {
    std::vector<float> f(static_cast<size_t>(rot / 2));
    for (int64_t i = 0; i < rot / 2; ++i) f[size_t(i)] = 1.0f / std::pow(float(theta), float(2 * i) / float(rot));
    return f;
  }

  // Rows of the three tensors q [N,nh·hd], k, v [N,nkv·hd] <-> rows of packed [N,C] = [q|k|v].
  void move_qkv(T* q_, T* k_, T* v_, T* packed, int64_t N, bool pack) const {
    const std::pair<T*, int64_t> parts[] = {{q_, nh * hd}, {k_, nkv * hd}, {v_, nkv * hd}};
    for (int64_t t = 0; t < N; ++t) {
      T* row = packed + t * C;
      for (auto [a, w] : parts) {
        if (pack) std::copy_n(a + t * w, w, row);
        else std::copy_n(row, w, a + t * w);
        row += w;
      }
    }
  }

  // Keys of packed row t (sequence start t0), as positions relative to t0.
  template <class F>
  void for_keys(int64_t t, int64_t t0, F&& f) const {
    const int64_t pos = t - t0;
    if (!sel.empty()) {
      for (int32_t u : sel[size_t(t)]) f(int64_t(u));
    } else {
      for (int64_t u = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; u <= pos; ++u) f(u);
    }
  }

  void index_forward(const T* x_, const Ctx& c) {
    const int64_t N = c.N;
    iq = zeros<T>(N * IH * ID), ik_raw = zeros<T>(N * ID), ik = zeros<T>(N * ID), iw = zeros<T>(N * IH);
    iq_p.fwd(x_, iq.data(), N);
    ik_p.fwd(x_, ik_raw.data(), N);
    cpu::layer_norm(ik_raw.data(), ik_w->w.data(), ik_b->w.data(), ik.data(), N, ID, T(1e-6));
    iw_p.fwd(x_, iw.data(), N);
    sel.assign(size_t(N), {});
    const auto& cu = *c.cu;
    std::vector<int64_t> start(static_cast<size_t>(N));
    for (size_t n = 0; n + 1 < cu.size(); ++n) std::fill(start.begin() + cu[n], start.begin() + cu[n + 1], cu[n]);
    {
#pragma omp parallel for schedule(dynamic, 8) if (N > topk * 2)
      for (int64_t t = 0; t < N; ++t) {
        const int64_t t0 = start[size_t(t)], S = t - t0 + 1;
        if (c.dense || S <= topk) {
          sel[size_t(t)].resize(size_t(S));
          std::iota(sel[size_t(t)].begin(), sel[size_t(t)].end(), 0);
          continue;
        }
        Vec<T> score(static_cast<size_t>(S));
        cpu::dsa_scores(iq.data() + t * IH * ID, iw.data() + t * IH, ik.data() + t0 * ID, S, IH, ID, score.data());
        sel[size_t(t)] = cpu::dsa_topk(score.data(), S, topk);
      }
    }
  }

  void forward(const T* x_, T* y, const Ctx& c) override {
    const int64_t N = c.N;
    x.assign(x_, x_ + N * D);
    qg = zeros<T>(N * nh * 2 * hd), kraw = zeros<T>(N * nkv * hd), v = zeros<T>(N * nkv * hd);
    qp.fwd(x_, qg.data(), N), kp.fwd(x_, kraw.data(), N), vp.fwd(x_, v.data(), N);
    qraw = zeros<T>(N * nh * hd), gate = zeros<T>(N * nh * hd);
    for (int64_t r = 0; r < N * nh; ++r) {
      std::copy_n(qg.begin() + r * 2 * hd, hd, qraw.begin() + r * hd);
      std::copy_n(qg.begin() + r * 2 * hd + hd, hd, gate.begin() + r * hd);
    }
    if (conv) {  // q, k, v <- SiLU(conv) over [q|k|v]
      conv_in = zeros<T>(N * C), conv_pre = zeros<T>(N * C);
      Vec<T> act = zeros<T>(N * C);
      move_qkv(qraw.data(), kraw.data(), v.data(), conv_in.data(), N, true);
      conv_fwd(conv_in.data(), conv->w.data(), conv_pre.data(), act.data(), *c.cu, C, kw);
      move_qkv(qraw.data(), kraw.data(), v.data(), act.data(), N, false);
    }
    q = zeros<T>(N * nh * hd), k = zeros<T>(N * nkv * hd);
    rms_fwd(qraw.data(), qn->w.data(), q.data(), N * nh, hd, eps, true);
    rms_fwd(kraw.data(), kn->w.data(), k.data(), N * nkv, hd, eps, true);
    const auto& cu = *c.cu;
    for (size_t n = 0; n + 1 < cu.size(); ++n)
      for (int64_t t = cu[n]; t < cu[n + 1]; ++t) {
        rope(q.data() + t * nh * hd, nh, hd, inv_freq, t - cu[n], false);
        rope(k.data() + t * nkv * hd, nkv, hd, inv_freq, t - cu[n], false);
      }
    if (kind == MixerKind::SparseAttention) index_forward(x_, c);
    o = zeros<T>(N * nh * hd), lse = zeros<T>(N * nh);
    const int64_t group = nh / nkv;
    std::vector<int64_t> start(static_cast<size_t>(N));  // sequence start of each packed row
    for (size_t n = 0; n + 1 < cu.size(); ++n) std::fill(start.begin() + cu[n], start.begin() + cu[n + 1], cu[n]);
    {  // one parallel region over every (row, head)
#pragma omp parallel for collapse(2) schedule(dynamic, 8) if (N * nh > 64)
      for (int64_t t = 0; t < N; ++t)
        for (int64_t h = 0; h < nh; ++h) {
          const int64_t t0 = start[size_t(t)];
          const T* qi = q.data() + (t * nh + h) * hd;
          const int64_t kvh = h / group;
          T mx = -INFINITY;
          for_keys(t, t0, [&](int64_t u) {
            const T* ku = k.data() + ((t0 + u) * nkv + kvh) * hd;
            T dot = 0;
            for (int64_t d = 0; d < hd; ++d) dot += qi[d] * ku[d];
            mx = std::max(mx, dot * scale);
          });
          T sum = 0;
          T* oi = o.data() + (t * nh + h) * hd;
          for_keys(t, t0, [&](int64_t u) {
            const T* ku = k.data() + ((t0 + u) * nkv + kvh) * hd;
            const T* vu = v.data() + ((t0 + u) * nkv + kvh) * hd;
            T dot = 0;
            for (int64_t d = 0; d < hd; ++d) dot += qi[d] * ku[d];
            const T p = std::exp(dot * scale - mx);
            sum += p;
            for (int64_t d = 0; d < hd; ++d) oi[d] += p * vu[d];
          });
          for (int64_t d = 0; d < hd; ++d) oi[d] /= sum;
          lse[size_t(t * nh + h)] = mx + std::log(sum);
        }
    }
    og = zeros<T>(N * nh * hd);
    for (int64_t i = 0; i < N * nh * hd; ++i) og[size_t(i)] = o[size_t(i)] * sigmoid(gate[size_t(i)]);
    out.fwd(og.data(), y, N);
  }

  T prob(int64_t t, int64_t t0, int64_t h, int64_t u) const {
    const T* qi = q.data() + (t * nh + h) * hd;
    const T* ku = k.data() + ((t0 + u) * nkv + h / (nh / nkv)) * hd;
    T dot = 0;
    for (int64_t d = 0; d < hd; ++d) dot += qi[d] * ku[d];
    return std::exp(dot * scale - lse[size_t(t * nh + h)]);
  }

  void backward(const T* dy, T* dx, const Ctx& c) override {
    const int64_t N = c.N, group = nh / nkv;
    Vec<T> dog = zeros<T>(N * nh * hd), dout = zeros<T>(N * nh * hd), dgate = zeros<T>(N * nh * hd);
    out.bwd(og.data(), dy, dog.data(), N, false);
    for (int64_t i = 0; i < N * nh * hd; ++i) {
      const T s = sigmoid(gate[size_t(i)]);
      dout[size_t(i)] = dog[size_t(i)] * s;
      dgate[size_t(i)] = dog[size_t(i)] * o[size_t(i)] * s * (T(1) - s);
    }
    Vec<T> dq = zeros<T>(N * nh * hd), dk = zeros<T>(N * nkv * hd), dv = zeros<T>(N * nkv * hd);
    const auto& cu = *c.cu;
    const int64_t S = int64_t(cu.size()) - 1;
    // one task per (sequence, kv head): it owns dk/dv of that head's rows
#pragma omp parallel for collapse(2) schedule(dynamic) if (N * nh > 64)
    for (int64_t n = 0; n < S; ++n)
      for (int64_t kvh = 0; kvh < nkv; ++kvh) {
        const int64_t t0 = cu[size_t(n)];
        for (int64_t t = t0; t < cu[size_t(n + 1)]; ++t)
          for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
            const T* doi = dout.data() + (t * nh + h) * hd;
            const T* oi = o.data() + (t * nh + h) * hd;
            const T* qi = q.data() + (t * nh + h) * hd;
            T* dqi = dq.data() + (t * nh + h) * hd;
            T Di = 0;
            for (int64_t d = 0; d < hd; ++d) Di += doi[d] * oi[d];
            for_keys(t, t0, [&](int64_t u) {
              const int64_t row = (t0 + u) * nkv + kvh;
              const T* ku = k.data() + row * hd;
              const T* vu = v.data() + row * hd;
              const T p = prob(t, t0, h, u);
              T dp = 0;
              for (int64_t d = 0; d < hd; ++d) dp += doi[d] * vu[d];
              const T ds = p * (dp - Di) * scale;
              T* dku = dk.data() + row * hd;
              T* dvu = dv.data() + row * hd;
              for (int64_t d = 0; d < hd; ++d) {
                dvu[d] += p * doi[d];
                dqi[d] += ds * ku[d];
                dku[d] += ds * qi[d];
              }
            });
          }
      }
    if (kind == MixerKind::SparseAttention) index_backward(c);
    for (size_t n = 0; n + 1 < cu.size(); ++n)
      for (int64_t t = cu[n]; t < cu[n + 1]; ++t) {
        rope(dq.data() + t * nh * hd, nh, hd, inv_freq, t - cu[n], true);
        rope(dk.data() + t * nkv * hd, nkv, hd, inv_freq, t - cu[n], true);
      }
    Vec<T> dqraw = zeros<T>(N * nh * hd), dkraw = zeros<T>(N * nkv * hd), dqg = zeros<T>(N * nh * 2 * hd);
    rms_bwd(qraw.data(), qn->w.data(), dq.data(), dqraw.data(), qn->g.data(), N * nh, hd, eps, true);
    rms_bwd(kraw.data(), kn->w.data(), dk.data(), dkraw.data(), kn->g.data(), N * nkv, hd, eps, true);
    if (conv) {  // back through SiLU(conv) to the projections' outputs
      Vec<T> dact = zeros<T>(N * C), din = zeros<T>(N * C);
      move_qkv(dqraw.data(), dkraw.data(), dv.data(), dact.data(), N, true);
      conv_bwd(conv_in.data(), conv->w.data(), conv_pre.data(), dact.data(), din.data(), conv->g.data(), *c.cu, C, kw);
      move_qkv(dqraw.data(), dkraw.data(), dv.data(), din.data(), N, false);
    }
    for (int64_t r = 0; r < N * nh; ++r) {
      std::copy_n(dqraw.begin() + r * hd, hd, dqg.begin() + r * 2 * hd);
      std::copy_n(dgate.begin() + r * hd, hd, dqg.begin() + r * 2 * hd + hd);
    }
    qp.bwd(x.data(), dqg.data(), dx, N, false);
    kp.bwd(x.data(), dkraw.data(), dx, N, true);
    vp.bwd(x.data(), dv.data(), dx, N, true);
  }

  // KL(p ‖ softmax(I)) per query over its keys, p = head-averaged attention (detached); gradients
  // reach the indexer weights only (its input x is detached).
  void index_backward(const Ctx& c) {
    const int64_t N = c.N;
    Vec<T> diq = zeros<T>(N * IH * ID), dik = zeros<T>(N * ID), diw = zeros<T>(N * IH);
    const T wscale = T(1) / std::sqrt(T(IH)), sscale = T(1) / std::sqrt(T(ID));
    const auto& cu = *c.cu;
    double loss = 0;
    for (size_t n = 0; n + 1 < cu.size(); ++n) {
      const int64_t t0 = cu[n];
      // sequential over queries: dik rows are shared between queries
      for (int64_t t = t0; t < cu[n + 1]; ++t) {
        const auto& keys = sel[size_t(t)];
        const int64_t m = int64_t(keys.size());
        Vec<T> p = zeros<T>(m), I = zeros<T>(m), dots(size_t(m * IH));
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t h = 0; h < nh; ++h) p[size_t(j)] += prob(t, t0, h, keys[size_t(j)]) / T(nh);
          const T* ku = ik.data() + (t0 + keys[size_t(j)]) * ID;
          for (int64_t h = 0; h < IH; ++h) {
            const T* qh = iq.data() + (t * IH + h) * ID;
            T dot = 0;
            for (int64_t d = 0; d < ID; ++d) dot += qh[d] * ku[d];
            dots[size_t(j * IH + h)] = dot * sscale;
            I[size_t(j)] += iw[size_t(t * IH + h)] * wscale * std::max(dot * sscale, T(0));
          }
        }
        const T mx = *std::max_element(I.begin(), I.end());
        T z = 0;
        for (auto& v : I) z += std::exp(v - mx);
        for (int64_t j = 0; j < m; ++j) {
          const T logq = I[size_t(j)] - mx - std::log(z);
          if (p[size_t(j)] > 0) loss += double(p[size_t(j)]) * (std::log(double(p[size_t(j)])) - double(logq));
          const T dI = (std::exp(logq) - p[size_t(j)]) * T(c.index_scale);
          const T* ku = ik.data() + (t0 + keys[size_t(j)]) * ID;
          T* dku = dik.data() + (t0 + keys[size_t(j)]) * ID;
          for (int64_t h = 0; h < IH; ++h) {
            const T s = dots[size_t(j * IH + h)];
            diw[size_t(t * IH + h)] += dI * wscale * std::max(s, T(0));
            if (s <= 0) continue;
            const T ds = dI * iw[size_t(t * IH + h)] * wscale * sscale;
            const T* qh = iq.data() + (t * IH + h) * ID;
            T* dqh = diq.data() + (t * IH + h) * ID;
            for (int64_t d = 0; d < ID; ++d) dqh[d] += ds * ku[d], dku[d] += ds * qh[d];
          }
        }
      }
    }
    *c.index_loss += loss * c.index_scale;
    Vec<T> dikr = zeros<T>(N * ID);
    layer_norm_bwd(ik_raw.data(), ik_w->w.data(), dik.data(), dikr.data(), ik_w->g.data(), ik_b->g.data(), N, ID, T(1e-6));
    iq_p.bwd(x.data(), diq.data(), nullptr, N, false);
    ik_p.bwd(x.data(), dikr.data(), nullptr, N, false);
    iw_p.bwd(x.data(), diw.data(), nullptr, N, false);
  }
};

}  // namespace

template <class T>
TrainModel<T>::~TrainModel() = default;

template <class T>
TrainModel<T>::TrainModel(const ModelSpec& spec, const std::function<Tensor(const std::string&)>& get) : spec_(spec) {
  const ModelSpec& s = spec_;
  check(s.arch == Arch::HlaHybrid, "hla train: only model_type 'hla_hybrid' can be trained (got '" + s.model_type + "')");
  Binder<T> b{get, params_};
  const std::string pre = s.weight_prefix;
  embed_ = b(pre + "embed_tokens.weight", {s.vocab, s.hidden}, false);
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const std::string lp = pre + "layers." + std::to_string(l) + ".";
    norm_in_.push_back(b(lp + "input_layernorm.weight", {s.hidden}, false));
    norm_post_.push_back(b(lp + "post_attention_layernorm.weight", {s.hidden}, false));
    switch (s.mixers[size_t(l)]) {
      case MixerKind::GatedDeltaNet: mixers_.push_back(std::make_unique<Gdn<T>>(b, s, lp + "linear_attn.")); break;
      case MixerKind::KimiDeltaAttention: mixers_.push_back(std::make_unique<Kda<T>>(b, s, lp + "self_attn.")); break;
      case MixerKind::Lightning: mixers_.push_back(std::make_unique<LightningLayer<T>>(b, s, lp + "self_attn.")); break;
      case MixerKind::GatedAttention:
      case MixerKind::SlidingAttention:
      case MixerKind::SparseAttention:
        mixers_.push_back(std::make_unique<Attn<T>>(b, s, lp + "self_attn.", s.mixers[size_t(l)]));
        break;
      default: throw Error("hla train: mixer '" + std::string(mixer_name(s.mixers[size_t(l)])) + "' is not trainable");
    }
    mlps_.push_back(std::make_unique<Mlp<T>>(b, lp + "mlp.", s.hidden, s.intermediate));
  }
  final_norm_ = b(pre + "norm.weight", {s.hidden}, false);
  lm_head_ = s.tie_embeddings ? embed_ : b("lm_head.weight", {s.vocab, s.hidden});
}

template <class T>
std::vector<Param<T>*> TrainModel<T>::params() {
  std::vector<Param<T>*> r;
  for (auto& p : params_) r.push_back(p.get());
  return r;
}

template <class T>
void TrainModel<T>::zero_grad() {
  for (auto& p : params_) std::fill(p->g.begin(), p->g.end(), T(0));
}

template <class T>
std::map<std::string, Tensor> TrainModel<T>::export_weights() const {
  std::map<std::string, Tensor> m;
  for (auto& p : params_) {
    Tensor t = Tensor::f32(p->shape);
    for (size_t i = 0; i < p->w.size(); ++i) t.f32()[i] = float(p->w[i]);
    m[p->name] = t;
  }
  return m;
}

template <class T>
void TrainModel<T>::set_dense_attention(bool dense) {
  dense_ = dense;
}

template <class T>
std::vector<T> TrainModel<T>::forward(const Batch& b) {
  const ModelSpec& s = spec_;
  const int64_t N = int64_t(b.ids.size()), D = s.hidden, V = s.vocab;
  check(int64_t(b.labels.size()) == N && !b.cu_seqlens.empty() && b.cu_seqlens.front() == 0 && b.cu_seqlens.back() == N,
        "internal: batch ids, labels and cu_seqlens disagree");
  Ctx c{&b.cu_seqlens, N};
  c.dense = dense_, c.delta = delta_kernels_;
  Vec<T> h = zeros<T>(N * D), x = zeros<T>(N * D), y = zeros<T>(N * D);
  for (int64_t t = 0; t < N; ++t) {
    const int64_t id = b.ids[size_t(t)];
    check(id >= 0 && id < V, "token id " + std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(V) + ")");
    std::copy_n(embed_->w.begin() + id * D, D, h.begin() + t * D);
  }
  h_in_.resize(size_t(s.n_layers)), h_mid_.resize(size_t(s.n_layers));
  const T eps = T(s.norm_eps);
  for (int64_t l = 0; l < s.n_layers; ++l) {
    h_in_[size_t(l)] = h;
    rms_fwd(h.data(), norm_in_[size_t(l)]->w.data(), x.data(), N, D, eps, s.zero_centered_norm);
    mixers_[size_t(l)]->forward(x.data(), y.data(), c);
    add(h.data(), y.data(), N * D);
    h_mid_[size_t(l)] = h;
    rms_fwd(h.data(), norm_post_[size_t(l)]->w.data(), x.data(), N, D, eps, s.zero_centered_norm);
    mlps_[size_t(l)]->forward(x.data(), y.data(), c);
    add(h.data(), y.data(), N * D);
  }
  h_final_ = h;
  rows_.clear();
  for (int64_t t = 0; t < N; ++t)
    if (b.labels[size_t(t)] >= 0) {
      check(b.labels[size_t(t)] < V, "label " + std::to_string(b.labels[size_t(t)]) + " is outside the vocabulary");
      rows_.push_back(t);
    }
  const int64_t R = int64_t(rows_.size());
  hf_ = zeros<T>(R * D);
  for (int64_t r = 0; r < R; ++r)
    rms_fwd(h.data() + rows_[size_t(r)] * D, final_norm_->w.data(), hf_.data() + r * D, 1, D, eps, s.zero_centered_norm);
  Vec<T> logits = zeros<T>(R * V);
  linear_fwd(hf_.data(), lm_head_->w.data(), logits.data(), R, D, V);
  return logits;
}

template <class T>
std::vector<T> TrainModel<T>::logits(const Batch& b) {
  return forward(b);
}

template <class T>
typename TrainModel<T>::Loss TrainModel<T>::forward_backward(const Batch& b, double norm, double index_norm) {
  const ModelSpec& s = spec_;
  const int64_t N = int64_t(b.ids.size()), D = s.hidden, V = s.vocab;
  Vec<T> logits = forward(b);
  const int64_t R = int64_t(rows_.size());
  Loss loss;
  loss.labelled = R;
  // cross-entropy; dlogits = (softmax − onehot) / norm, in place
  for (int64_t r = 0; r < R; ++r) {
    T* lr = logits.data() + r * V;
    const T mx = *std::max_element(lr, lr + V);
    T z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(lr[v] - mx);
    const int64_t y = b.labels[size_t(rows_[size_t(r)])];
    loss.lm_sum += double(std::log(z) + mx - lr[y]);
    for (int64_t v = 0; v < V; ++v) lr[v] = std::exp(lr[v] - mx) / z / T(norm);
    lr[y] -= T(1) / T(norm);
  }
  Vec<T> dhf = zeros<T>(R * D), dh = zeros<T>(N * D), dx = zeros<T>(N * D), tmp = zeros<T>(N * D);
  linear_bwd(hf_.data(), lm_head_->w.data(), logits.data(), dhf.data(), lm_head_->g.data(), R, D, V);
  const T eps = T(s.norm_eps);
  for (int64_t r = 0; r < R; ++r)
    rms_bwd(h_final_.data() + rows_[size_t(r)] * D, final_norm_->w.data(), dhf.data() + r * D, dh.data() + rows_[size_t(r)] * D,
            final_norm_->g.data(), 1, D, eps, s.zero_centered_norm);
  Ctx c{&b.cu_seqlens, N};
  c.dense = dense_, c.delta = delta_kernels_;
  c.index_scale = 1.0 / index_norm;
  c.index_loss = &loss.index_sum;
  for (int64_t l = s.n_layers - 1; l >= 0; --l) {
    mlps_[size_t(l)]->backward(dh.data(), dx.data(), c);
    rms_bwd(h_mid_[size_t(l)].data(), norm_post_[size_t(l)]->w.data(), dx.data(), tmp.data(), norm_post_[size_t(l)]->g.data(), N,
            D, eps, s.zero_centered_norm);
    add(dh.data(), tmp.data(), N * D);
    mixers_[size_t(l)]->backward(dh.data(), dx.data(), c);
    rms_bwd(h_in_[size_t(l)].data(), norm_in_[size_t(l)]->w.data(), dx.data(), tmp.data(), norm_in_[size_t(l)]->g.data(), N, D,
            eps, s.zero_centered_norm);
    add(dh.data(), tmp.data(), N * D);
  }
  for (int64_t t = 0; t < N; ++t) add(embed_->g.data() + b.ids[size_t(t)] * D, dh.data() + t * D, D);
  loss.index_sum *= index_norm;  // layers add KL·index_scale; report the plain sum
  return loss;
}

template class TrainModel<float>;
template class TrainModel<double>;

}  // namespace hla::train
