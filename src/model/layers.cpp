#include "model/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <tuple>

#include "backends/cpu/nn.h"
#include "core/error.h"
#include "model/hybrid_layers.h"
#include "ops/delta_rule.h"

namespace hla {

using namespace hla::cpu;

namespace {

std::vector<float> buffer(int64_t n) { return std::vector<float>(size_t(n)); }

// ---------------------------------------------------------------------------------------------
// Delta-rule mixers. Both run: projections on all packed tokens -> per sequence short conv with
// its rolling state -> l2(q)·dk^-0.5, l2(k), beta, log-decay g -> delta rule from the cached state
// -> gated RMSNorm per value head -> out_proj.
// ---------------------------------------------------------------------------------------------

struct DeltaCore {
  int64_t nk, nv, dk, dv, kw, conv_dim;
  DeltaGate gate;
  // conv_out [Ts, conv_dim] = [q (nk·dk) | k (nk·dk) | v (nv·dv)] after SiLU; g [Ts, g_stride]; beta [Ts, nv].
  void run(const float* conv_in, const float* conv_w, const float* g, const float* beta, float* o, int64_t Ts,
           LayerCache& c) const {
    auto conv_out = buffer(Ts * conv_dim);
    causal_conv1d_silu(conv_in, conv_w, c.conv.data(), conv_out.data(), Ts, conv_dim, kw);
    auto q = buffer(Ts * nk * dk), k = buffer(Ts * nk * dk), v = buffer(Ts * nv * dv);
    for (int64_t t = 0; t < Ts; ++t) {
      const float* row = conv_out.data() + t * conv_dim;
      std::memcpy(q.data() + t * nk * dk, row, sizeof(float) * size_t(nk * dk));
      std::memcpy(k.data() + t * nk * dk, row + nk * dk, sizeof(float) * size_t(nk * dk));
      std::memcpy(v.data() + t * nv * dv, row + 2 * nk * dk, sizeof(float) * size_t(nv * dv));
    }
    l2norm_forward(q.data(), q.data(), Ts * nk, dk);
    l2norm_forward(k.data(), k.data(), Ts * nk, dk);
    DeltaRuleDims d;
    d.H = nk, d.HV = nv, d.K = dk, d.V = dv, d.gate = gate, d.cu_seqlens = {0, Ts};
    delta_rule_forward<float>(d, q.data(), k.data(), v.data(), g, beta, 1.0f / std::sqrt(float(dk)),
                              c.state.data(), o, Ts > 1 ? DeltaMode::Chunk : DeltaMode::Recurrent);
  }
  void init_cache(LayerCache& c) const {
    c.conv.assign(size_t(conv_dim * (kw - 1)), 0.0f);
    c.state.assign(size_t(nv * dk * dv), 0.0f);
  }
  // The same on a device, over every sequence of b at once, added to h: m.prep names the conv
  // input (rows of stride ldx), the conv taps and the gates' inputs and outputs, m the output's
  // gated norm and projection; the rest is this core's.
  void run_device(Device& dev, DeltaMixer m, const DevBatch& b, int64_t layer, float* h) const {
    DeltaPrep& p = m.prep;
    p.C = conv_dim, p.kw = kw;
    p.conv_pool = dev.cache_pool(layer, CachePart::Conv, conv_dim * (kw - 1));
    p.l2_heads = 2 * nk, p.head_dim = dk, p.H = nv;  // q and k heads, adjacent
    m.dims.H = nk, m.dims.HV = nv, m.dims.K = dk, m.dims.V = dv, m.dims.gate = gate;
    m.scale = 1.0f / std::sqrt(float(dk));
    m.state_pool = dev.cache_pool(layer, CachePart::State, nv * dk * dv);
    dev.delta_mixer(m, b, h);
  }
};

// Qwen3-Next / Qwen3.5 Gated DeltaNet (`linear_attn.*`).
class GatedDeltaNet : public Mixer {
 public:
  GatedDeltaNet(const ModelSpec& s, Params& p, const std::string& pre) : s_(s) {
    const int64_t D = s.hidden, nk = s.lin_nk, nv = s.lin_nv, dk = s.lin_dk, dv = s.lin_dv;
    core_ = {nk, nv, dk, dv, s.conv_kernel, 2 * nk * dk + nv * dv, DeltaGate::Scalar};
    grouped_ = s.arch == Arch::Qwen3Next;
    if (grouped_) {  // one projection grouped by key head: [q_g | k_g | v_g (r·dv) | z_g (r·dv)]
      p.bind(pre + "in_proj_qkvz.weight", {2 * nk * dk + 2 * nv * dv, D}, &in_qkvz_);
      p.bind(pre + "in_proj_ba.weight", {2 * nv, D}, &in_ba_);
    } else {  // Qwen3.5: flat [q | k | v], z, b, a
      p.bind(pre + "in_proj_qkv.weight", {2 * nk * dk + nv * dv, D}, &in_qkvz_);
      p.bind(pre + "in_proj_z.weight", {nv * dv, D}, &in_z_);
      p.bind(pre + "in_proj_b.weight", {nv, D}, &in_b_);
      p.bind(pre + "in_proj_a.weight", {nv, D}, &in_a_);
    }
    p.bind(pre + "conv1d.weight", {core_.conv_dim, 1, s.conv_kernel}, &conv_w_, Init::Conv);
    p.bind(pre + "A_log", {nv}, &A_log_, Init::ALog);
    p.bind(pre + "dt_bias", {nv}, &dt_bias_, Init::DtBias);
    p.bind(pre + "norm.weight", {dv}, &norm_, Init::OutNorm);
    p.bind(pre + "out_proj.weight", {D, nv * dv}, &out_proj_);
  }

  void init_cache(LayerCache& c) const override { core_.init_cache(c); }

  void forward(const float* x, float* out, const SeqBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), D = s_.hidden, nk = s_.lin_nk, nv = s_.lin_nv, dk = s_.lin_dk, dv = s_.lin_dv;
    const int64_t r = nv / nk, C = core_.conv_dim;
    auto mixed = buffer(T * C), z = buffer(T * nv * dv), bb = buffer(T * nv), a = buffer(T * nv);
    if (grouped_) {
      const int64_t G = 2 * dk + 2 * r * dv;  // width of one key-head group
      auto P = buffer(T * nk * G), Q = buffer(T * 2 * nv);
      linear(x, in_qkvz_.f32(), P.data(), T, D, nk * G);
      linear(x, in_ba_.f32(), Q.data(), T, D, 2 * nv);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < nk; ++g) {
          const float* src = P.data() + (t * nk + g) * G;
          float* row = mixed.data() + t * C;
          std::memcpy(row + g * dk, src, sizeof(float) * size_t(dk));
          std::memcpy(row + nk * dk + g * dk, src + dk, sizeof(float) * size_t(dk));
          std::memcpy(row + 2 * nk * dk + g * r * dv, src + 2 * dk, sizeof(float) * size_t(r * dv));
          std::memcpy(z.data() + t * nv * dv + g * r * dv, src + 2 * dk + r * dv, sizeof(float) * size_t(r * dv));
          const float* ba = Q.data() + (t * nk + g) * 2 * r;
          for (int64_t i = 0; i < r; ++i) {
            bb[size_t(t * nv + g * r + i)] = ba[i];
            a[size_t(t * nv + g * r + i)] = ba[r + i];
          }
        }
    } else {
      linear(x, in_qkvz_.f32(), mixed.data(), T, D, C);
      linear(x, in_z_.f32(), z.data(), T, D, nv * dv);
      linear(x, in_b_.f32(), bb.data(), T, D, nv);
      linear(x, in_a_.f32(), a.data(), T, D, nv);
    }
    // beta = beta_max · sigmoid(b); g = -exp(A_log) · softplus(a + dt_bias), in place
    beta_sigmoid_forward(bb.data(), bb.data(), T * nv, s_.beta_max);
    gate_softplus_forward(a.data(), A_log_.f32(), dt_bias_.f32(), a.data(), T, nv, int64_t(1));
    auto o = buffer(T * nv * dv);
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t t0 = b.cu_seqlens[size_t(i)];
      core_.run(mixed.data() + t0 * C, conv_w_.f32(), a.data() + t0 * nv, bb.data() + t0 * nv,
                o.data() + t0 * nv * dv, b.len(i), b.caches[size_t(i)]->layers[size_t(layer)]);
    }
    gated_rms_norm(o.data(), z.data(), norm_.f32(), T * nv, dv, s_.norm_eps, GateAct::SiLU);
    linear(o.data(), out_proj_.f32(), out, T, nv * dv, D);
  }

  // On a device both checkpoint layouts become one input projection [q | k | v | z | b | a].
  void bind_device(Device& dev) override {
    const int64_t nk = s_.lin_nk, nv = s_.lin_nv, dk = s_.lin_dk, dv = s_.lin_dv, r = nv / nk, C = core_.conv_dim;
    std::vector<RowSlice> qkvz;
    if (grouped_) {
      const int64_t G = 2 * dk + 2 * r * dv;
      const int64_t off[4] = {0, dk, 2 * dk, 2 * dk + r * dv}, len[4] = {dk, dk, r * dv, r * dv};
      for (int part = 0; part < 4; ++part)
        for (int64_t g = 0; g < nk; ++g) qkvz.push_back({&in_qkvz_, g * G + off[part], len[part]});
      for (int part = 0; part < 2; ++part)
        for (int64_t g = 0; g < nk; ++g) qkvz.push_back({&in_ba_, g * 2 * r + part * r, r});
    } else {
      qkvz = {{&in_qkvz_, 0, C}, {&in_z_, 0, nv * dv}, {&in_b_, 0, nv}, {&in_a_, 0, nv}};
    }
    dev_ = {dev.upload_matrix(stack_rows(qkvz)), dev.upload_matrix(out_proj_), dev.upload_vector(conv_w_),
            dev.upload_vector(A_log_),           dev.upload_vector(dt_bias_),  dev.upload_vector(norm_)};
  }

  void forward_device(Device& dev, const DevRows& x, float* h, const DevBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), nv = s_.lin_nv, dv = s_.lin_dv, C = core_.conv_dim;
    DeltaMixer m{};  // the projection's rows: [q | k | v (C) | z (nv·dv) | b (nv) | a (nv)]
    m.in = x, m.in_proj = dev_.in;
    m.x_col = 0, m.gate_col = C, m.b_col = C + nv * dv, m.a_col = C + nv * dv + nv;
    DeltaPrep& p = m.prep;
    p.conv_w = dev_.conv;
    p.beta_max = s_.beta_max, p.beta = dev.scratch(T * nv);
    p.A_log = dev_.A_log, p.dt_bias = dev_.dt_bias, p.g = dev.scratch(T * nv);
    p.gate_width = 1;
    m.norm = dev_.norm, m.eps = s_.norm_eps, m.act = GateAct::SiLU;
    m.out_proj = dev_.out;
    core_.run_device(dev, m, b, layer, h);
  }
  bool replayable_decode() const override { return true; }
  bool needs_f32_input() const override { return false; }

 private:
  const ModelSpec& s_;
  DeltaCore core_;
  bool grouped_;
  Tensor in_qkvz_, in_ba_, in_z_, in_b_, in_a_, conv_w_, A_log_, dt_bias_, norm_, out_proj_;
  struct {
    DevMatrix in, out;
    const float *conv, *A_log, *dt_bias, *norm;
  } dev_{};
};

// Kimi-Linear's Kimi Delta Attention (`self_attn.*`): per-channel decay from a low-rank gate.
class KimiDeltaAttention : public Mixer {
 public:
  KimiDeltaAttention(const ModelSpec& s, Params& p, const std::string& pre) : s_(s) {
    const int64_t D = s.hidden, H = s.lin_nv, dk = s.lin_dk, kw = s.conv_kernel, HK = H * dk;
    core_ = {H, H, dk, dk, kw, 3 * HK, DeltaGate::PerKey};
    p.bind(pre + "q_proj.weight", {HK, D}, &q_);
    p.bind(pre + "k_proj.weight", {HK, D}, &k_);
    p.bind(pre + "v_proj.weight", {HK, D}, &v_);
    Tensor qc, kc, vc;  // three depthwise convs == one over the concatenated channels [q|k|v]
    p.bind(pre + "q_conv1d.weight", {HK, 1, kw}, &qc, Init::Conv);
    p.bind(pre + "k_conv1d.weight", {HK, 1, kw}, &kc, Init::Conv);
    p.bind(pre + "v_conv1d.weight", {HK, 1, kw}, &vc, Init::Conv);
    if (!p.materialize()) return;
    conv_w_ = Tensor::f32({3 * HK, kw});
    for (int i = 0; i < 3; ++i)
      std::memcpy(conv_w_.f32() + i * HK * kw, (i == 0 ? qc : i == 1 ? kc : vc).f32(), sizeof(float) * size_t(HK * kw));
    p.bind(pre + "f_a_proj.weight", {dk, D}, &f_a_);
    p.bind(pre + "f_b_proj.weight", {HK, dk}, &f_b_);
    p.bind(pre + "dt_bias", {HK}, &dt_bias_, Init::DtBias);
    p.bind(pre + "A_log", {1, 1, H, 1}, &A_log_, Init::ALog);
    p.bind(pre + "b_proj.weight", {H, D}, &b_);
    p.bind(pre + "g_a_proj.weight", {dk, D}, &g_a_);
    p.bind(pre + "g_b_proj.weight", {HK, dk}, &g_b_);
    p.bind(pre + "o_norm.weight", {dk}, &o_norm_, Init::OutNorm);
    p.bind(pre + "o_proj.weight", {D, HK}, &o_);
  }

  void init_cache(LayerCache& c) const override { core_.init_cache(c); }

  void forward(const float* x, float* out, const SeqBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), D = s_.hidden, H = s_.lin_nv, dk = s_.lin_dk, HK = H * dk, C = 3 * HK;
    auto qkv = buffer(T * C), tmp = buffer(T * HK), lo = buffer(T * dk);
    for (int i = 0; i < 3; ++i) {
      linear(x, (i == 0 ? q_ : i == 1 ? k_ : v_).f32(), tmp.data(), T, D, HK);
      for (int64_t t = 0; t < T; ++t)
        std::memcpy(qkv.data() + t * C + i * HK, tmp.data() + t * HK, sizeof(float) * size_t(HK));
    }
    // g = -exp(A_log[h]) · softplus(f_b(f_a(x)) + dt_bias), one decay per (head, key channel)
    auto g = buffer(T * HK);
    linear(x, f_a_.f32(), lo.data(), T, D, dk);
    linear(lo.data(), f_b_.f32(), g.data(), T, dk, HK);
    gate_softplus_forward(g.data(), A_log_.f32(), dt_bias_.f32(), g.data(), T, H, dk);
    auto beta = buffer(T * H);
    linear(x, b_.f32(), beta.data(), T, D, H);
    beta_sigmoid_forward(beta.data(), beta.data(), T * H, s_.beta_max);
    auto o = buffer(T * HK);
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t t0 = b.cu_seqlens[size_t(i)];
      core_.run(qkv.data() + t0 * C, conv_w_.f32(), g.data() + t0 * HK, beta.data() + t0 * H, o.data() + t0 * HK,
                b.len(i), b.caches[size_t(i)]->layers[size_t(layer)]);
    }
    auto og = buffer(T * HK);
    linear(x, g_a_.f32(), lo.data(), T, D, dk);
    linear(lo.data(), g_b_.f32(), og.data(), T, dk, HK);
    gated_rms_norm(o.data(), og.data(), o_norm_.f32(), T * H, dk, s_.norm_eps, GateAct::Sigmoid);
    linear(o.data(), o_.f32(), out, T, HK, D);
  }

  // On a device: one input projection [q | k | v | f_a | g_a | b] of x.
  void bind_device(Device& dev) override {
    const int64_t H = s_.lin_nv, HK = H * s_.lin_dk, dk = s_.lin_dk;
    dev_ = {dev.upload_matrix(stack_rows(
                {{&q_, 0, HK}, {&k_, 0, HK}, {&v_, 0, HK}, {&f_a_, 0, dk}, {&g_a_, 0, dk}, {&b_, 0, H}})),
            dev.upload_matrix(f_b_),
            dev.upload_matrix(g_b_),
            dev.upload_matrix(o_),
            dev.upload_vector(conv_w_),
            dev.upload_vector(A_log_),
            dev.upload_vector(dt_bias_),
            dev.upload_vector(o_norm_)};
  }

  void forward_device(Device& dev, const DevRows& x, float* h, const DevBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), H = s_.lin_nv, dk = s_.lin_dk, HK = H * dk;
    const int64_t W = 3 * HK + 2 * dk + H;
    float* in = dev.scratch(T * W);
    const float* lo = in + 3 * HK;  // [f_a x | g_a x], then b x
    float* graw = dev.scratch(T * HK);
    dev.linear_rows(x, dev_.in, in, T);
    dev.linear(lo, W, dev_.f_b, graw, T);
    float* og = dev.scratch(T * HK);
    dev.linear(lo + dk, W, dev_.g_b, og, T);
    DeltaMixer m{};
    DeltaPrep& p = m.prep;
    p.x = in, p.ldx = W, p.conv_w = dev_.conv;
    p.b = lo + 2 * dk, p.ldb = W, p.beta_max = s_.beta_max, p.beta = dev.scratch(T * H);
    p.a = graw, p.lda = HK, p.A_log = dev_.A_log, p.dt_bias = dev_.dt_bias, p.g = dev.scratch(T * HK);
    p.gate_width = dk;
    m.gate = og, m.ld_gate = HK, m.norm = dev_.o_norm, m.eps = s_.norm_eps, m.act = GateAct::Sigmoid;
    m.out_proj = dev_.o;
    core_.run_device(dev, m, b, layer, h);
  }
  bool replayable_decode() const override { return true; }
  bool needs_f32_input() const override { return false; }

 private:
  const ModelSpec& s_;
  DeltaCore core_;
  Tensor q_, k_, v_, conv_w_, f_a_, f_b_, dt_bias_, A_log_, b_, g_a_, g_b_, o_norm_, o_;
  struct {
    DevMatrix in, f_b, g_b, o;
    const float *conv, *A_log, *dt_bias, *o_norm;
  } dev_{};
};

// ---------------------------------------------------------------------------------------------
// Softmax attention.
// ---------------------------------------------------------------------------------------------

void append_rows(std::vector<float>& cache, const float* rows, int64_t n, int64_t width) {
  cache.insert(cache.end(), rows, rows + n * width);
}

// Qwen3-Next / Qwen3.5 full attention: per-head [q | gate] projection, zero-centred q/k norms,
// partial half-split RoPE, GQA, sigmoid output gate. hla_hybrid's sliding-window and sparse layers
// are the same layer with each query restricted to a window / to the keys a DSA indexer picks.
class GatedAttention : public Mixer {
 public:
  GatedAttention(const ModelSpec& s, Params& p, const std::string& pre, MixerKind kind = MixerKind::GatedAttention)
      : s_(s), inv_freq_(rope_inv_freq(s.rope.theta, s.rope.rot)) {
    if (kind == MixerKind::SlidingAttention) window_ = s.sliding_window;
    if (kind == MixerKind::SparseAttention) {
      indexer_ = std::make_unique<DsaIndexer>();
      indexer_->bind(p, pre, s);
    }
    const int64_t D = s.hidden, nh = s.n_heads, nkv = s.n_kv_heads, hd = s.head_dim;
    p.bind(pre + "q_proj.weight", {nh * 2 * hd, D}, &q_);
    p.bind(pre + "k_proj.weight", {nkv * hd, D}, &k_);
    p.bind(pre + "v_proj.weight", {nkv * hd, D}, &v_);
    p.bind(pre + "o_proj.weight", {D, nh * hd}, &o_);
    p.bind(pre + "q_norm.weight", {hd}, &q_norm_, Init::Zeros);
    p.bind(pre + "k_norm.weight", {hd}, &k_norm_, Init::Zeros);
    if (s.attn_conv_kernel > 0)
      p.bind(pre + "conv1d.weight", {s.attn_conv_channels(), 1, s.attn_conv_kernel}, &conv_w_, Init::Conv);
  }

  void init_cache(LayerCache& c) const override {
    c.k.clear(), c.v.clear(), c.index_k.clear();
    c.conv.assign(size_t(s_.attn_conv_channels() * std::max<int64_t>(s_.attn_conv_kernel - 1, 0)), 0.0f);
  }

  void forward(const float* x, float* out, const SeqBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), D = s_.hidden, nh = s_.n_heads, nkv = s_.n_kv_heads, hd = s_.head_dim;
    auto qg = buffer(T * nh * 2 * hd), q = buffer(T * nh * hd), gate = buffer(T * nh * hd);
    auto k = buffer(T * nkv * hd), v = buffer(T * nkv * hd), o = buffer(T * nh * hd);
    linear(x, q_.f32(), qg.data(), T, D, nh * 2 * hd);
    linear(x, k_.f32(), k.data(), T, D, nkv * hd);
    linear(x, v_.f32(), v.data(), T, D, nkv * hd);
    for (int64_t r = 0; r < T * nh; ++r) {
      std::memcpy(q.data() + r * hd, qg.data() + r * 2 * hd, sizeof(float) * size_t(hd));
      std::memcpy(gate.data() + r * hd, qg.data() + r * 2 * hd + hd, sizeof(float) * size_t(hd));
    }
    if (s_.attn_conv_kernel > 0) short_conv(q.data(), k.data(), v.data(), b, layer);
    rms_norm(q.data(), q_norm_.f32(), q.data(), T * nh, hd, s_.norm_eps, true);
    rms_norm(k.data(), k_norm_.f32(), k.data(), T * nkv, hd, s_.norm_eps, true);
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      LayerCache& c = b.caches[size_t(i)]->layers[size_t(layer)];
      const int64_t t0 = b.cu_seqlens[size_t(i)], n = b.len(i), past = b.caches[size_t(i)]->length;
      for (int64_t t = 0; t < n; ++t) {
        rope(q.data() + (t0 + t) * nh * hd, nh, hd, inv_freq_, past + t, RopePairs::HalfSplit);
        rope(k.data() + (t0 + t) * nkv * hd, nkv, hd, inv_freq_, past + t, RopePairs::HalfSplit);
      }
      append_rows(c.k, k.data() + t0 * nkv * hd, n, nkv * hd);
      append_rows(c.v, v.data() + t0 * nkv * hd, n, nkv * hd);
      // Rows held before this call: all `past` ones, or the last window−1 of them in a sliding layer;
      // key indices below count from the first held row.
      const int64_t held = int64_t(c.k.size()) / (nkv * hd) - n;
      std::vector<std::vector<int32_t>> sel;
      if (window_ > 0) sel = window_keys(n, held, window_);
      if (indexer_) sel = indexer_->select(x + t0 * D, n, past, c.index_k);
      attention(q.data() + t0 * nh * hd, c.k.data(), c.v.data(), o.data() + t0 * nh * hd, n, held + n, nh, nkv, hd,
                hd, 1.0f / std::sqrt(float(hd)), sel.empty() ? nullptr : &sel);
      if (window_ > 0) {  // keep only what later tokens can still see: memory stays window-bounded
        const size_t drop = size_t(std::max<int64_t>(held + n - (window_ - 1), 0) * nkv * hd);
        c.k.erase(c.k.begin(), c.k.begin() + std::ptrdiff_t(drop));
        c.v.erase(c.v.begin(), c.v.begin() + std::ptrdiff_t(drop));
      }
    }
    for (int64_t j = 0; j < T * nh * hd; ++j) o[size_t(j)] *= sigmoid(gate[size_t(j)]);
    linear(o.data(), o_.f32(), out, T, nh * hd, D);
  }

  void bind_device(Device& dev) override {
    const int64_t nh = s_.n_heads, KV = s_.n_kv_heads * s_.head_dim;
    dev_.qkv = dev.upload_matrix(stack_rows({{&q_, 0, nh * 2 * s_.head_dim}, {&k_, 0, KV}, {&v_, 0, KV}}));
    dev_.o = dev.upload_matrix(o_);
    dev_.q_norm = dev.upload_vector(q_norm_);
    dev_.k_norm = dev.upload_vector(k_norm_);
    dev_.inv_freq = dev.upload_vector(vector_tensor(inv_freq_));
    if (s_.attn_conv_kernel > 0) dev_.conv = dev.upload_vector(conv_w_);
    if (indexer_) indexer_->bind_device(dev);
  }

  // The device cache keeps every KV row; a sliding layer restricts its queries to the window.
  void forward_device(Device& dev, const DevRows& x, float* h, const DevBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), nh = s_.n_heads, nkv = s_.n_kv_heads, hd = s_.head_dim;
    const int64_t Q = nh * hd, KV = nkv * hd, W = 2 * Q + 2 * KV;  // projection rows: [q|gate per head], k, v
    float* qkv = dev.scratch(T * W);
    dev.linear_rows(x, dev_.qkv, qkv, T);
    float* q = dev.scratch(T * Q);
    float* k = dev.scratch(T * KV);
    float* v = dev.scratch(T * KV);
    AttentionPrep p{qkv,
                    W,
                    2 * hd,
                    qkv + 2 * Q,
                    qkv + 2 * Q + KV,
                    W,
                    nh,
                    nkv,
                    hd,
                    dev_.q_norm,
                    dev_.k_norm,
                    s_.norm_eps,
                    true,
                    dev_.inv_freq,
                    int64_t(inv_freq_.size()) * 2,
                    RopePairs::HalfSplit,
                    1.0f,
                    q,
                    k,
                    v};
    if (s_.attn_conv_kernel > 0) {  // SiLU(causal conv) over the channels [q | k | v], then the rest in place
      const int64_t C = Q + 2 * KV, kw = s_.attn_conv_kernel;
      float* packed = dev.scratch(T * C);
      float* y = dev.scratch(T * C);
      dev.copy(packed, {C, hd, 1}, qkv, {W, 2 * hd, 1}, T, nh, hd);  // q without its gate
      dev.copy(packed + Q, {C, 1, 0}, qkv + 2 * Q, {W, 1, 0}, T, 2 * KV, 1);
      dev.causal_conv_silu(packed, C, dev_.conv, y, C, kw, b, dev.cache_pool(layer, CachePart::Conv, C * (kw - 1)));
      p.q_in = y, p.ld_q = C, p.q_head = hd, p.k_in = y + Q, p.v_in = y + Q + KV, p.ld_kv = C;
    }
    dev.attention_prep(p, b);
    float* o = dev.scratch(T * Q);
    const float scale = 1.0f / std::sqrt(float(hd));
    if (b.one_token_each() && !indexer_)  // decode: one launch for the batch
      dev.decode_attention(layer, b, q, k, v, o, nh, nkv, hd, hd, scale, window_);
    else
      for (int64_t i = 0; i < b.num_seqs(); ++i) {
        const int64_t t0 = b.cu_seqlens[size_t(i)], n = b.len(i), past = b.past[size_t(i)], slot = b.slots[size_t(i)];
        float* kc = dev.cache_rows(layer, CachePart::K, slot, past + n, KV);
        float* vc = dev.cache_rows(layer, CachePart::V, slot, past + n, KV);
        dev.copy(kc + past * KV, {KV, 1, 0}, k + t0 * KV, {KV, 1, 0}, n, KV, 1);
        dev.copy(vc + past * KV, {KV, 1, 0}, v + t0 * KV, {KV, 1, 0}, n, KV, 1);
        const int32_t* sel = indexer_ ? indexer_->select_device(dev, x.f32, b, i, layer) : nullptr;
        dev.attention(q + t0 * Q, kc, vc, o + t0 * Q, n, past + n, nh, nkv, hd, hd, scale, window_, sel,
                      indexer_ ? indexer_->topk : 0);
      }
    void* o_op = dev.operand_rows(T, Q);  // the gated output in the output GEMM's operand type
    dev.sigmoid_mul(o, qkv + hd, W, 2 * hd, T, nh, hd, o_op);
    dev.linear_add({o_op ? nullptr : o, Q, o_op}, dev_.o, h, T);
  }
  bool replayable_decode() const override { return !indexer_; }
  bool needs_f32_input() const override { return indexer_ != nullptr; }  // the DSA indexer reads x

 private:
  // q [T,nh·hd], k, v [T,nkv·hd] <- SiLU(causal conv) over the channels [q|k|v], per sequence from its
  // cached last inputs (ModelSpec::attn_conv_kernel).
  void short_conv(float* q, float* k, float* v, const SeqBatch& b, int64_t layer) const {
    const int64_t T = b.tokens(), Q = s_.n_heads * s_.head_dim, KV = s_.n_kv_heads * s_.head_dim, C = Q + 2 * KV;
    auto in = buffer(T * C), y = buffer(T * C);
    const std::pair<float*, int64_t> parts[] = {{q, Q}, {k, KV}, {v, KV}};
    auto move_rows = [&](float* packed, bool pack) {  // [q|k|v] rows <-> the three tensors
      for (int64_t t = 0; t < T; ++t) {
        float* row = packed + t * C;
        for (auto [x, w] : parts) {
          if (pack) std::memcpy(row, x + t * w, sizeof(float) * size_t(w));
          else std::memcpy(x + t * w, row, sizeof(float) * size_t(w));
          row += w;
        }
      }
    };
    move_rows(in.data(), true);
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t t0 = b.cu_seqlens[size_t(i)];
      causal_conv1d_silu(in.data() + t0 * C, conv_w_.f32(), b.caches[size_t(i)]->layers[size_t(layer)].conv.data(),
                         y.data() + t0 * C, b.len(i), C, s_.attn_conv_kernel);
    }
    move_rows(y.data(), false);
  }

  const ModelSpec& s_;
  std::vector<float> inv_freq_;
  Tensor q_, k_, v_, o_, q_norm_, k_norm_, conv_w_;
  int64_t window_ = 0;
  std::unique_ptr<DsaIndexer> indexer_;
  struct {
    DevMatrix qkv, o;
    const float *q_norm, *k_norm, *inv_freq, *conv;
  } dev_{};
};

// yarn's blend of interpolated and extrapolated frequencies (DeepSeek-V3.2 checkpoints).
std::vector<float> mla_inv_freq(const RopeSpec& r) {
  std::vector<float> f = rope_inv_freq(r.theta, r.rot);
  if (!r.yarn) return f;
  const double dim = double(r.rot), base = r.theta;
  auto corr = [&](double rot) {
    return dim * std::log(double(r.original_max_pos) / (rot * 2 * M_PI)) / (2 * std::log(base));
  };
  double lo = corr(r.beta_fast), hi = corr(r.beta_slow);
  if (r.truncate) lo = std::floor(lo), hi = std::ceil(hi);
  lo = std::max(lo, 0.0), hi = std::min(hi, dim - 1);
  if (lo == hi) hi += 0.001;
  for (size_t i = 0; i < f.size(); ++i) {
    const float ramp = std::clamp(float((double(i) - lo) / (hi - lo)), 0.0f, 1.0f);
    const float extra = 1.0f - ramp;  // weight of the extrapolated (original) frequency
    f[i] = float(f[i] / r.factor) * (1.0f - extra) + f[i] * extra;
  }
  return f;
}

float yarn_attention_factor(const RopeSpec& r) {
  if (!r.yarn) return 1.0f;
  auto m = [&](double mm) { return r.factor <= 1 ? 1.0 : 0.1 * mm * std::log(r.factor) + 1.0; };
  return r.mscale_all_dim != 0 ? float(m(r.mscale) / m(r.mscale_all_dim)) : float(m(1.0));
}

// Multi-head latent attention. Kimi-Linear: no RoPE, plain q_proj. DeepSeek-V3.2: q through the
// q_a/q_b low-rank path, interleaved RoPE on the last dr dims, plus the lightning indexer that
// picks index_topk keys per query. The cache holds the expanded per-head K [S, nh·(dn+dr)] and V.
class MultiLatentAttention : public Mixer {
 public:
  MultiLatentAttention(const ModelSpec& s, Params& p, const std::string& pre, bool sparse)
      : s_(s), sparse_(sparse), rope_(s.arch == Arch::DeepseekV32) {
    const int64_t D = s.hidden, nh = s.n_heads, dq = s.qk_nope + s.qk_rope, R = s.kv_lora_rank;
    if (s.q_lora_rank > 0) {
      p.bind(pre + "q_a_proj.weight", {s.q_lora_rank, D}, &q_a_);
      p.bind(pre + "q_a_layernorm.weight", {s.q_lora_rank}, &q_a_norm_, Init::Ones);
      p.bind(pre + "q_b_proj.weight", {nh * dq, s.q_lora_rank}, &q_b_);
    } else {
      p.bind(pre + "q_proj.weight", {nh * dq, D}, &q_b_);
    }
    p.bind(pre + "kv_a_proj_with_mqa.weight", {R + s.qk_rope, D}, &kv_a_);
    p.bind(pre + "kv_a_layernorm.weight", {R}, &kv_a_norm_, Init::Ones);
    p.bind(pre + "kv_b_proj.weight", {nh * (s.qk_nope + s.v_head), R}, &kv_b_);
    p.bind(pre + "o_proj.weight", {D, nh * s.v_head}, &o_);
    if (rope_) {
      inv_freq_ = mla_inv_freq(s.rope);
      attn_factor_ = yarn_attention_factor(s.rope);
    }
    if (sparse_) {
      const int64_t IH = s.index_heads, ID = s.index_dim;
      p.bind(pre + "indexer.wq_b.weight", {IH * ID, s.q_lora_rank}, &iq_);
      p.bind(pre + "indexer.wk.weight", {ID, D}, &ik_);
      p.bind(pre + "indexer.k_norm.weight", {ID}, &ik_norm_w_, Init::Ones);
      p.bind(pre + "indexer.k_norm.bias", {ID}, &ik_norm_b_, Init::Zeros);
      p.bind(pre + "indexer.weights_proj.weight", {IH, D}, &iw_);
      index_freq_ = rope_inv_freq(s.rope.theta, s.qk_rope);
      if (s.rope.yarn) index_freq_ = inv_freq_;
    }
  }

  void init_cache(LayerCache& c) const override { c.k.clear(), c.v.clear(), c.index_k.clear(); }

  void forward(const float* x, float* out, const SeqBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), D = s_.hidden, nh = s_.n_heads, dn = s_.qk_nope, dr = s_.qk_rope;
    const int64_t dq = dn + dr, dv = s_.v_head, R = s_.kv_lora_rank, Rq = s_.q_lora_rank;
    auto q = buffer(T * nh * dq), qr = buffer(T * std::max<int64_t>(Rq, 1));
    if (Rq > 0) {
      linear(x, q_a_.f32(), qr.data(), T, D, Rq);
      rms_norm(qr.data(), q_a_norm_.f32(), qr.data(), T, Rq, 1e-6f, false);
      linear(qr.data(), q_b_.f32(), q.data(), T, Rq, nh * dq);
    } else {
      linear(x, q_b_.f32(), q.data(), T, D, nh * dq);
    }
    auto c = buffer(T * (R + dr)), lat = buffer(T * R), kv = buffer(T * nh * (dn + dv));
    linear(x, kv_a_.f32(), c.data(), T, D, R + dr);
    for (int64_t t = 0; t < T; ++t)
      rms_norm(c.data() + t * (R + dr), kv_a_norm_.f32(), lat.data() + t * R, 1, R, 1e-6f, false);
    linear(lat.data(), kv_b_.f32(), kv.data(), T, R, nh * (dn + dv));
    auto K = buffer(T * nh * dq), V = buffer(T * nh * dv), o = buffer(T * nh * dv);
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t t0 = b.cu_seqlens[size_t(i)], n = b.len(i), past = b.caches[size_t(i)]->length;
      for (int64_t t = t0; t < t0 + n; ++t) {
        float* k_pe = c.data() + t * (R + dr) + R;  // one rope key shared by all heads
        if (rope_) {
          rope(k_pe, 1, dr, inv_freq_, past + t - t0, RopePairs::Interleaved, attn_factor_);
          rope(q.data() + t * nh * dq + dn, nh, dq, inv_freq_, past + t - t0, RopePairs::Interleaved, attn_factor_);
        }
        for (int64_t h = 0; h < nh; ++h) {
          const float* kvh = kv.data() + (t * nh + h) * (dn + dv);
          float* Kh = K.data() + (t * nh + h) * dq;
          std::memcpy(Kh, kvh, sizeof(float) * size_t(dn));
          std::memcpy(Kh + dn, k_pe, sizeof(float) * size_t(dr));
          std::memcpy(V.data() + (t * nh + h) * dv, kvh + dn, sizeof(float) * size_t(dv));
        }
      }
      LayerCache& lc = b.caches[size_t(i)]->layers[size_t(layer)];
      append_rows(lc.k, K.data() + t0 * nh * dq, n, nh * dq);
      append_rows(lc.v, V.data() + t0 * nh * dv, n, nh * dv);
      std::vector<std::vector<int32_t>> sel;
      if (sparse_) sel = select_keys(x + t0 * D, qr.data() + t0 * Rq, n, past, lc);
      attention(q.data() + t0 * nh * dq, lc.k.data(), lc.v.data(), o.data() + t0 * nh * dv, n, past + n, nh, nh, dq,
                dv, s_.mla_scale(), sel.empty() ? nullptr : &sel);
    }
    linear(o.data(), o_.f32(), out, T, nh * dv, D);
  }

  void bind_device(Device& dev) override {
    if (s_.q_lora_rank > 0) {
      dev_.q_a = dev.upload_matrix(q_a_);
      dev_.q_a_norm = dev.upload_vector(q_a_norm_);
    }
    dev_.q_b = dev.upload_matrix(q_b_);
    dev_.kv_a = dev.upload_matrix(kv_a_);
    dev_.kv_a_norm = dev.upload_vector(kv_a_norm_);
    dev_.kv_b = dev.upload_matrix(kv_b_);
    dev_.o = dev.upload_matrix(o_);
    if (rope_) dev_.inv_freq = dev.upload_vector(vector_tensor(inv_freq_));
    if (sparse_) {
      dev_.iq = dev.upload_matrix(iq_);
      dev_.ik_iw = dev.upload_matrix(stack_rows({{&ik_, 0, s_.index_dim}, {&iw_, 0, s_.index_heads}}));
      dev_.ik_norm_w = dev.upload_vector(ik_norm_w_);
      dev_.ik_norm_b = dev.upload_vector(ik_norm_b_);
      dev_.index_freq = dev.upload_vector(vector_tensor(index_freq_));
    }
  }

  void forward_device(Device& dev, const DevRows& x, float* h, const DevBatch& b, int64_t layer) const override {
    const int64_t T = b.tokens(), nh = s_.n_heads, dn = s_.qk_nope, dr = s_.qk_rope;
    const int64_t dq = dn + dr, dv = s_.v_head, R = s_.kv_lora_rank, Rq = s_.q_lora_rank;
    float* q = dev.scratch(T * nh * dq);
    float* qr = nullptr;
    if (Rq > 0) {
      qr = dev.scratch(T * Rq);
      dev.linear_rows(x, dev_.q_a, qr, T);
      dev.rms_norm(qr, Rq, dev_.q_a_norm, qr, Rq, T, Rq, 1e-6f, false);
      dev.linear(qr, Rq, dev_.q_b, q, T);
    } else {
      dev.linear_rows(x, dev_.q_b, q, T);
    }
    float* c = dev.scratch(T * (R + dr));
    float* lat = dev.scratch(T * R);
    float* kv = dev.scratch(T * nh * (dn + dv));
    dev.linear_rows(x, dev_.kv_a, c, T);
    dev.rms_norm(c, R + dr, dev_.kv_a_norm, lat, R, T, R, 1e-6f, false);
    dev.linear(lat, R, dev_.kv_b, kv, T);
    if (rope_) {  // one rope key per token, shared by all heads
      const int64_t rot = int64_t(inv_freq_.size()) * 2;
      dev.rope(c + R, T, 1, R + dr, 0, dev_.inv_freq, rot, b, RopePairs::Interleaved, attn_factor_);
      dev.rope(q + dn, T, nh, nh * dq, dq, dev_.inv_freq, rot, b, RopePairs::Interleaved, attn_factor_);
    }
    // Indexer projections of all tokens: iq [T, IH·ID] (RoPE'd), ik [T, ID] (LayerNorm, RoPE'd), w [T, IH].
    const int64_t IH = s_.index_heads, ID = s_.index_dim;
    float *iq = nullptr, *ik = nullptr, *w = nullptr;
    if (sparse_) {
      iq = dev.scratch(T * IH * ID);
      float* kw = dev.scratch(T * (ID + IH));
      ik = dev.scratch(T * ID);
      w = dev.scratch(T * IH);
      dev.linear(qr, Rq, dev_.iq, iq, T);
      dev.linear_rows(x, dev_.ik_iw, kw, T);
      dev.copy(ik, {ID, 1, 0}, kw, {ID + IH, 1, 0}, T, ID, 1);
      dev.copy(w, {IH, 1, 0}, kw + ID, {ID + IH, 1, 0}, T, IH, 1);
      dev.layer_norm(ik, dev_.ik_norm_w, dev_.ik_norm_b, ik, T, ID, 1e-6f);
      const int64_t rot = int64_t(index_freq_.size()) * 2;
      dev.rope(iq, T, IH, IH * ID, ID, dev_.index_freq, rot, b, RopePairs::HalfSplit, attn_factor_);
      dev.rope(ik, T, 1, ID, 0, dev_.index_freq, rot, b, RopePairs::HalfSplit, attn_factor_);
    }
    float* o = dev.scratch(T * nh * dv);
    for (int64_t i = 0; i < b.num_seqs(); ++i) {
      const int64_t t0 = b.cu_seqlens[size_t(i)], n = b.len(i), past = b.past[size_t(i)], slot = b.slots[size_t(i)];
      float* K = dev.cache_rows(layer, CachePart::K, slot, past + n, nh * dq);
      float* V = dev.cache_rows(layer, CachePart::V, slot, past + n, nh * dv);
      const float* kvs = kv + t0 * nh * (dn + dv);
      dev.copy(K + past * nh * dq, {nh * dq, dq, 1}, kvs, {nh * (dn + dv), dn + dv, 1}, n, nh, dn);
      dev.copy(K + past * nh * dq + dn, {nh * dq, dq, 1}, c + t0 * (R + dr) + R, {R + dr, 0, 1}, n, nh, dr);
      dev.copy(V + past * nh * dv, {nh * dv, dv, 1}, kvs + dn, {nh * (dn + dv), dn + dv, 1}, n, nh, dv);
      const int32_t* sel = sparse_ ? dsa_select_device(dev, b, i, layer, iq + t0 * IH * ID, w + t0 * IH, ik + t0 * ID,
                                                       IH, ID, s_.index_topk)
                                   : nullptr;
      dev.attention(q + t0 * nh * dq, K, V, o + t0 * nh * dv, n, past + n, nh, nh, dq, dv, s_.mla_scale(), 0, sel,
                    sparse_ ? s_.index_topk : 0);
    }
    dev.linear_add({o, nh * dv}, dev_.o, h, T);
  }
  bool needs_f32_input() const override { return false; }

 private:
  // Lightning indexer for n new queries of one sequence: I[t,u] = Σ_h w[t,h]·ReLU(iq[t,h]·ik[u]·ID^-0.5),
  // w = weights_proj(x)·IH^-0.5; query t keeps the top index_topk causal keys (lowest index wins
  // ties). Returns {} when every query may see all its causal keys (dense attention).
  std::vector<std::vector<int32_t>> select_keys(const float* x, const float* qr, int64_t n, int64_t past,
                                                LayerCache& lc) const {
    const int64_t D = s_.hidden, IH = s_.index_heads, ID = s_.index_dim, Rq = s_.q_lora_rank;
    auto iq = buffer(n * IH * ID), ik = buffer(n * ID), w = buffer(n * IH);
    linear(qr, iq_.f32(), iq.data(), n, Rq, IH * ID);
    linear(x, ik_.f32(), ik.data(), n, D, ID);
    layer_norm(ik.data(), ik_norm_w_.f32(), ik_norm_b_.f32(), ik.data(), n, ID, 1e-6f);
    linear(x, iw_.f32(), w.data(), n, D, IH);
    for (int64_t t = 0; t < n; ++t) {
      rope(iq.data() + t * IH * ID, IH, ID, index_freq_, past + t, RopePairs::HalfSplit, attn_factor_);
      rope(ik.data() + t * ID, 1, ID, index_freq_, past + t, RopePairs::HalfSplit, attn_factor_);
    }
    append_rows(lc.index_k, ik.data(), n, ID);
    const int64_t S = past + n, topk = s_.index_topk;
    if (S <= topk) return {};
    std::vector<std::vector<int32_t>> sel(static_cast<size_t>(n));
#pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < n; ++t) {
      const int64_t causal = past + t + 1;
      std::vector<float> score(static_cast<size_t>(causal));
      dsa_scores(iq.data() + t * IH * ID, w.data() + t * IH, lc.index_k.data(), causal, IH, ID, score.data());
      sel[size_t(t)] = dsa_topk(score.data(), causal, topk);
    }
    return sel;
  }

  const ModelSpec& s_;
  bool sparse_, rope_;
  std::vector<float> inv_freq_, index_freq_;
  float attn_factor_ = 1.0f;
  Tensor q_a_, q_a_norm_, q_b_, kv_a_, kv_a_norm_, kv_b_, o_;
  Tensor iq_, ik_, ik_norm_w_, ik_norm_b_, iw_;
  struct {
    DevMatrix q_a, q_b, kv_a, kv_b, o, iq, ik_iw;
    const float *q_a_norm, *kv_a_norm, *inv_freq, *ik_norm_w, *ik_norm_b, *index_freq;
  } dev_{};
};

// ---------------------------------------------------------------------------------------------
// Feed-forward blocks.
// ---------------------------------------------------------------------------------------------

class DenseFfn : public Ffn {
 public:
  DenseFfn(const ModelSpec& s, Params& p, const std::string& pre) {
    check(s.intermediate > 0, "config.json: field 'intermediate_size' is needed for dense MLP layers");
    mlp_.bind(p, pre, s.hidden, s.intermediate);
  }
  void forward(const float* x, float* out, int64_t T) const override { mlp_.forward(x, out, T); }
  void bind_device(Device& dev) override { mlp_.bind_device(dev); }
  bool replayable_decode() const override { return true; }
  bool needs_f32_input() const override { return false; }
  void forward_device(Device& dev, const DevRows& x, float* h, int64_t T) const override {
    mlp_.forward_device(dev, x, h, T, true);
  }

 private:
  SwiGLU mlp_;
};

// Routed experts + shared expert. Tokens are grouped by expert so each expert runs one GEMM.
class MoeFfn : public Ffn {
 public:
  MoeFfn(const ModelSpec& s, Params& p, const std::string& pre) : s_(s) {
    const int64_t D = s.hidden, E = s.n_experts;
    p.bind(pre + "gate.weight", {E, D}, &router_);
    if (s.router == Router::Sigmoid) p.bind(pre + "gate.e_score_correction_bias", {E}, &bias_, Init::Zeros);
    const bool kimi = s.arch == Arch::KimiLinear;
    experts_.resize(size_t(E));
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = pre + "experts." + std::to_string(e) + ".";
      if (kimi) experts_[size_t(e)].bind(p, ep, D, s.moe_intermediate, "w1", "w3", "w2");
      else experts_[size_t(e)].bind(p, ep, D, s.moe_intermediate);
    }
    if (s.shared_intermediate > 0) {
      shared_.bind(p, pre + (s.shared_gate ? "shared_expert." : "shared_experts."), D, s.shared_intermediate);
      if (s.shared_gate) p.bind(pre + "shared_expert_gate.weight", {1, D}, &shared_gate_);
    }
    router_spec_.experts = E, router_spec_.top_k = s.top_k, router_spec_.sigmoid = s.router == Router::Sigmoid;
    router_spec_.n_group = s.n_group, router_spec_.topk_group = s.topk_group, router_spec_.norm_topk = s.norm_topk;
    router_spec_.routed_scale = float(s.routed_scale);
  }

  // The experts go up stacked (MoeExperts' layout), so a device may run them all in one grouped GEMM.
  void bind_device(Device& dev) override {
    const int64_t D = s_.hidden;
    router_d_ = dev.upload_matrix(router_);
    std::vector<RowSlice> gate_up, down;
    for (const SwiGLU& e : experts_) {
      for (const RowSlice& r : e.gate_up_rows()) gate_up.push_back(r);
      down.push_back({&e.down, 0, D});
    }
    experts_d_ = {router_spec_,
                  router_spec_.sigmoid ? dev.upload_vector(bias_) : nullptr,
                  D,
                  s_.moe_intermediate,
                  dev.upload_matrix(stack_rows(gate_up)),
                  dev.upload_matrix(stack_rows(down))};
    if (s_.shared_intermediate > 0) {
      shared_.bind_device(dev);
      if (s_.shared_gate) shared_gate_d_ = dev.upload_matrix(shared_gate_);
    }
    replayable_ = dev.moe_on_device(experts_d_);
  }

  bool replayable_decode() const override { return replayable_; }
  void forward_device(Device& dev, const DevRows& x, float* h, int64_t T) const override {
    const int64_t D = s_.hidden, E = s_.n_experts;
    float* logits = dev.scratch(T * E);
    dev.linear_rows(x, router_d_, logits, T);
    float *shared = nullptr, *gate = nullptr;
    if (s_.shared_intermediate > 0) {
      shared = dev.scratch(T * D);
      shared_.forward_device(dev, x, shared, T, false);
      if (s_.shared_gate) {
        gate = dev.scratch(T);
        dev.linear_rows(x, shared_gate_d_, gate, T);
        dev.sigmoid(gate, 1, gate, T, 1, 1.0f);
      }
    }
    dev.moe(experts_d_, x.f32, logits, shared, gate, h, T);
  }

  void forward(const float* x, float* out, int64_t T) const override {
    const int64_t D = s_.hidden, E = s_.n_experts;
    auto logits = buffer(T * E);
    linear(x, router_.f32(), logits.data(), T, D, E);
    std::vector<std::vector<std::pair<int64_t, float>>> tokens_of(static_cast<size_t>(E));  // (token, weight)
    for (int64_t t = 0; t < T; ++t)
      for (auto [e, w] : moe_route(logits.data() + t * E, router_spec_.sigmoid ? bias_.f32() : nullptr, router_spec_))
        tokens_of[size_t(e)].emplace_back(t, w);
    std::fill(out, out + T * D, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      const auto& list = tokens_of[size_t(e)];
      if (list.empty()) continue;
      const int64_t n = int64_t(list.size());
      auto xin = buffer(n * D), y = buffer(n * D);
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(xin.data() + i * D, x + list[size_t(i)].first * D, sizeof(float) * size_t(D));
      experts_[size_t(e)].forward(xin.data(), y.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        float* o = out + list[size_t(i)].first * D;
        const float w = list[size_t(i)].second;
        for (int64_t d = 0; d < D; ++d) o[d] += w * y[size_t(i * D + d)];
      }
    }
    if (s_.shared_intermediate > 0) {
      auto y = buffer(T * D);
      shared_.forward(x, y.data(), T);
      std::vector<float> gate(size_t(T), 1.0f);
      if (s_.shared_gate) {
        linear(x, shared_gate_.f32(), gate.data(), T, D, 1);
        for (auto& g : gate) g = sigmoid(g);
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) out[t * D + d] += gate[size_t(t)] * y[size_t(t * D + d)];
    }
  }

 private:
  const ModelSpec& s_;
  Tensor router_, bias_, shared_gate_;
  std::vector<SwiGLU> experts_;
  SwiGLU shared_;
  MoeRouter router_spec_;
  DevMatrix router_d_, shared_gate_d_;
  MoeExperts experts_d_;
  bool replayable_ = false;
};

}  // namespace

void SwiGLU::bind(Params& p, const std::string& prefix, int64_t d, int64_t i, const char* gate_name,
                  const char* up_name, const char* down_name) {
  D = d, I = i;
  p.bind(prefix + gate_name + ".weight", {I, D}, &gate);
  p.bind(prefix + up_name + ".weight", {I, D}, &up);
  p.bind(prefix + down_name + ".weight", {D, I}, &down);
}

void SwiGLU::forward(const float* x, float* out, int64_t T) const {
  auto g = buffer(T * I), u = buffer(T * I);
  linear(x, gate.f32(), g.data(), T, D, I);
  linear(x, up.f32(), u.data(), T, D, I);
  for (int64_t j = 0; j < T * I; ++j) g[size_t(j)] = silu(g[size_t(j)]) * u[size_t(j)];
  linear(g.data(), down.f32(), out, T, I, D);
}

std::vector<RowSlice> SwiGLU::gate_up_rows() const {
  std::vector<RowSlice> pairs;  // gate row i, then up row i: Device::swiglu's layout
  for (int64_t i = 0; i < I; ++i) pairs.push_back({&gate, i, 1}), pairs.push_back({&up, i, 1});
  return pairs;
}

void SwiGLU::bind_device(Device& dev) {
  gate_up_d = dev.upload_matrix(stack_rows(gate_up_rows()));
  down_d = dev.upload_matrix(down);
}

void SwiGLU::forward_device(Device& dev, const DevRows& x, float* out, int64_t T, bool add) const {
  dev.swiglu_mlp(x, gate_up_d, down_d, out, T, add);
}

void Mixer::bind_device(Device& dev) {
  throw Error("this model's mixer layers have no " + dev.name() + " form yet (lightning attention runs on the CPU only)");
}

void Mixer::forward_device(Device& dev, const DevRows&, float*, const DevBatch&, int64_t) const {
  throw Error("this model's mixer layers have no " + dev.name() + " form yet");
}

Tensor stack_rows(const std::vector<RowSlice>& slices) {
  check(!slices.empty(), "internal: stack_rows of nothing");
  const int64_t cols = slices[0].t->size(1);
  int64_t rows = 0;
  for (auto& sl : slices) {
    check(sl.t->dim() == 2 && sl.t->size(1) == cols && sl.row0 + sl.rows <= sl.t->size(0),
          "internal: stack_rows slices disagree");
    rows += sl.rows;
  }
  Tensor out = Tensor::f32({rows, cols});
  float* dst = out.f32();
  for (auto& sl : slices) {
    std::memcpy(dst, sl.t->f32() + sl.row0 * cols, sizeof(float) * size_t(sl.rows * cols));
    dst += sl.rows * cols;
  }
  return out;
}

Tensor vector_tensor(const std::vector<float>& v) {
  Tensor t = Tensor::f32({int64_t(v.size())});
  std::copy(v.begin(), v.end(), t.f32());
  return t;
}

std::unique_ptr<Mixer> make_mixer(const ModelSpec& s, int64_t layer, Params& p) {
  const std::string pre = s.weight_prefix + "layers." + std::to_string(layer) + ".";
  switch (s.mixers[size_t(layer)]) {
    case MixerKind::GatedDeltaNet: return std::make_unique<GatedDeltaNet>(s, p, pre + "linear_attn.");
    case MixerKind::KimiDeltaAttention: return std::make_unique<KimiDeltaAttention>(s, p, pre + "self_attn.");
    case MixerKind::GatedAttention: return std::make_unique<GatedAttention>(s, p, pre + "self_attn.");
    case MixerKind::MLA: return std::make_unique<MultiLatentAttention>(s, p, pre + "self_attn.", false);
    case MixerKind::SparseMLA: return std::make_unique<MultiLatentAttention>(s, p, pre + "self_attn.", true);
    case MixerKind::Lightning: return make_lightning(s, p, pre + "self_attn.");
    case MixerKind::SlidingAttention:
    case MixerKind::SparseAttention: return std::make_unique<GatedAttention>(s, p, pre + "self_attn.", s.mixers[size_t(layer)]);
  }
  throw Error("internal: unknown mixer kind");
}

std::unique_ptr<Ffn> make_ffn(const ModelSpec& s, int64_t layer, Params& p) {
  const std::string pre = s.weight_prefix + "layers." + std::to_string(layer) +
                          (s.arch == Arch::KimiLinear ? ".block_sparse_moe." : ".mlp.");
  if (s.ffns[size_t(layer)] == FfnKind::MoE) return std::make_unique<MoeFfn>(s, p, pre);
  return std::make_unique<DenseFfn>(s, p, pre);
}

}  // namespace hla
