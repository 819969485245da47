// The delta-rule ops (GDN, KDA) on CPU: the fp64 fixture dumps (flash-linear-attention's naive
// recurrences with autograd gradients), chunk == recurrent on many shapes, finite differences of
// every backward, and `hla op` as a user runs it.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <random>

#include "core/safetensors.h"
#include "ops/delta_rule.h"
#include "tests/common.h"

using namespace hla;

namespace {

// All inputs and cotangents of one op call, in double; cast per test to the compute type.
struct Problem {
  DeltaRuleDims d;
  std::vector<double> q, k, v, g, beta, h0, dout, dht;
  double scale = 0;
};

std::vector<double> zeros(int64_t n) { return std::vector<double>(static_cast<size_t>(n), 0.0); }

// Random inputs as the layers produce them: k L2-normalised, beta in (0,1), g = log decay ≤ 0
// (down to g_min per token), q as drawn.
Problem make_problem(DeltaGate gate, std::vector<int64_t> cu, int64_t H, int64_t HV, int64_t K, int64_t V,
                     bool with_h0, uint32_t seed, double g_min = -3.0) {
  Problem p;
  p.d.H = H, p.d.HV = HV, p.d.K = K, p.d.V = V, p.d.gate = gate, p.d.cu_seqlens = std::move(cu);
  const int64_t T = p.d.tokens(), N = p.d.num_seqs();
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  auto normal = [&](int64_t n) {
    std::vector<double> x = zeros(n);
    for (auto& e : x) e = nd(rng);
    return x;
  };
  p.q = normal(T * H * K);
  p.k = normal(T * H * K);
  l2norm_forward(p.k.data(), p.k.data(), T * H, K);
  p.v = normal(T * HV * V);
  p.g = zeros(T * p.d.g_stride());
  for (auto& e : p.g) e = g_min * std::pow(ud(rng), 2.0);  // many mild gates, some steep
  p.beta = zeros(T * HV);
  for (auto& e : p.beta) e = 0.05 + 0.9 * ud(rng);
  p.h0 = with_h0 ? normal(N * HV * K * V) : zeros(N * HV * K * V);
  p.dout = normal(T * HV * V);
  p.dht = normal(N * HV * K * V);
  p.scale = 1.0 / std::sqrt(double(K));
  return p;
}

template <class T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// Forward outputs and all gradients of one call, stored as double.
struct Result {
  std::vector<double> o, ht, dq, dk, dv, dg, dbeta, dh0;
};

template <class T>
Result run(const Problem& p, DeltaMode mode, bool backward = true, int64_t chunk = 64) {
  const auto q = cast<T>(p.q), k = cast<T>(p.k), v = cast<T>(p.v), g = cast<T>(p.g), b = cast<T>(p.beta),
             h0 = cast<T>(p.h0), dout = cast<T>(p.dout), dht = cast<T>(p.dht);
  std::vector<T> state = h0, o(p.dout.size());
  if (mode == DeltaMode::Chunk) {
    delta_rule_chunk<T>(p.d, q.data(), k.data(), v.data(), g.data(), b.data(), T(p.scale), state.data(), o.data(),
                        chunk);
  } else {
    delta_rule_recurrent<T>(p.d, q.data(), k.data(), v.data(), g.data(), b.data(), T(p.scale), state.data(),
                            o.data());
  }
  Result r;
  r.o.assign(o.begin(), o.end());
  r.ht.assign(state.begin(), state.end());
  if (!backward) return r;
  std::vector<T> dq(q.size()), dk(k.size()), dv(v.size()), dg(g.size()), db(b.size()), dh0(h0.size());
  if (mode == DeltaMode::Chunk)
    delta_rule_backward_chunk<T>(p.d, q.data(), k.data(), v.data(), g.data(), b.data(), T(p.scale), h0.data(),
                                 dout.data(), dht.data(), dq.data(), dk.data(), dv.data(), dg.data(), db.data(),
                                 dh0.data(), chunk);
  else
    delta_rule_backward_recurrent<T>(p.d, q.data(), k.data(), v.data(), g.data(), b.data(), T(p.scale),
                                     h0.data(), dout.data(), dht.data(), dq.data(), dk.data(), dv.data(),
                                     dg.data(), db.data(), dh0.data());
  for (auto [dst, src] : {std::pair{&r.dq, &dq}, {&r.dk, &dk}, {&r.dv, &dv}, {&r.dg, &dg}, {&r.dbeta, &db},
                          {&r.dh0, &dh0}})
    dst->assign(src->begin(), src->end());
  return r;
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

// Every output and gradient of `got` within tol_fwd / tol_bwd relative L2 of `ref`.
void expect_close(const Result& got, const Result& ref, double tol_fwd, double tol_bwd, const std::string& what) {
  EXPECT_LT(rel(got.o, ref.o), tol_fwd) << what << ": o";
  EXPECT_LT(rel(got.ht, ref.ht), tol_fwd) << what << ": ht";
  const std::pair<const char*, std::pair<const std::vector<double>*, const std::vector<double>*>> grads[] = {
      {"dq", {&got.dq, &ref.dq}}, {"dk", {&got.dk, &ref.dk}},       {"dv", {&got.dv, &ref.dv}},
      {"dg", {&got.dg, &ref.dg}}, {"dbeta", {&got.dbeta, &ref.dbeta}}, {"dh0", {&got.dh0, &ref.dh0}}};
  for (const auto& [name, ab] : grads) {
    if (!ab.second->empty()) {
      EXPECT_LT(rel(*ab.first, *ab.second), tol_bwd) << what << ": " << name;
    }
  }
}

std::vector<double> to_vec(const Tensor& t) {
  std::vector<double> x = zeros(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) x[size_t(i)] = t.flat(i);
  return x;
}

// A fixture dump as a Problem plus its reference outputs and gradients.
std::pair<Problem, Result> load_fixture(const std::string& path) {
  SafeTensorsFile f(path);
  Tensor q = f.get("in_q"), v = f.get("in_v");
  const bool kda = f.get("in_g").dim() == 4;
  const int64_t B = q.size(0), T = q.size(1);
  std::vector<int64_t> cu;
  for (int64_t b = 0; b <= B; ++b) cu.push_back(b * T);
  Problem p;
  p.d.H = q.size(2), p.d.K = q.size(3), p.d.HV = v.size(2), p.d.V = v.size(3);
  p.d.gate = kda ? DeltaGate::PerKey : DeltaGate::Scalar, p.d.cu_seqlens = cu;
  p.q = to_vec(q), p.k = to_vec(f.get("in_k")), p.v = to_vec(v), p.g = to_vec(f.get("in_g"));
  p.beta = to_vec(f.get("in_beta")), p.h0 = to_vec(f.get("in_h0"));
  p.dout = to_vec(f.get("in_do")), p.dht = to_vec(f.get("in_dht"));
  p.scale = 1.0 / std::sqrt(double(p.d.K));
  Result r;
  r.o = to_vec(f.get("out_o")), r.ht = to_vec(f.get("out_ht"));
  r.dq = to_vec(f.get("grad_q")), r.dk = to_vec(f.get("grad_k")), r.dv = to_vec(f.get("grad_v"));
  r.dg = to_vec(f.get("grad_g")), r.dbeta = to_vec(f.get("grad_beta")), r.dh0 = to_vec(f.get("grad_h0"));
  return {p, r};
}

const char* kFixtures[] = {"gdn_B1_T130_H2_K64_V64", "gdn_B2_T77_H3_K32_V48", "kda_B1_T130_H2_K64_V64",
                           "kda_B2_T77_H3_K32_V48"};

}  // namespace

// ---------------------------------------------------------------------------------------------
// The fixture dumps: fp64 references from a peer implementation.
// ---------------------------------------------------------------------------------------------

TEST(DeltaRuleFixtures, BothModesMatchReferenceInFloatAndDouble) {
  HLA_REQUIRE_FIXTURES();
  for (const char* name : kFixtures) {
    const auto [p, ref] = load_fixture(fixture(std::string("ops/") + name + ".safetensors"));
    for (DeltaMode mode : {DeltaMode::Chunk, DeltaMode::Recurrent}) {
      const std::string what = std::string(name) + (mode == DeltaMode::Chunk ? " chunk" : " recurrent");
      expect_close(run<float>(p, mode), ref, 1e-5, 1e-4, what + " f32");
      // The dumps hold fp32 arithmetic (~1e-7): double agrees to that.
      expect_close(run<double>(p, mode), ref, 1e-6, 1e-6, what + " f64");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// chunk == recurrent on many shapes, forward and backward.
// ---------------------------------------------------------------------------------------------

struct Shape_ {
  std::vector<int64_t> cu;
  int64_t H, HV, K, V;
};

TEST(DeltaRuleChunk, MatchesRecurrentOnManyShapes) {
  const Shape_ shapes[] = {
      {{0, 1}, 2, 2, 32, 32},            // one token
      {{0, 63}, 1, 1, 32, 32},           // under one chunk
      {{0, 64}, 1, 1, 32, 32},           // exactly one chunk
      {{0, 65}, 1, 1, 32, 32},           // one row into the second chunk
      {{0, 130}, 2, 2, 32, 32},          // partial third chunk
      {{0, 1, 71, 200, 205}, 1, 1, 32, 32},  // varlen [1, 70, 129, 5]
      {{0, 70, 70, 100}, 1, 2, 32, 32},  // empty sequence in the batch, GVA 2x
      {{0, 67}, 2, 4, 32, 32},           // GVA 2x
      {{0, 67}, 1, 4, 32, 32},           // GVA 4x
      {{0, 80}, 2, 2, 32, 48},           // K != V
      {{0, 40, 130}, 1, 2, 64, 128},     // K != V, wide, varlen, GVA
  };
  uint32_t seed = 1;
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey})
    for (const auto& s : shapes)
      for (bool h0 : {false, true}) {
        const Problem p = make_problem(gate, s.cu, s.H, s.HV, s.K, s.V, h0, seed++);
        const std::string what = std::string(gate == DeltaGate::Scalar ? "gdn" : "kda") + " T=" +
                                 std::to_string(p.d.tokens()) + " N=" + std::to_string(p.d.num_seqs()) +
                                 " H=" + std::to_string(s.H) + " HV=" + std::to_string(s.HV) + " K=" +
                                 std::to_string(s.K) + " V=" + std::to_string(s.V) + (h0 ? " h0" : "");
        const Result ref = run<double>(p, DeltaMode::Recurrent);
        expect_close(run<double>(p, DeltaMode::Chunk), ref, 1e-11, 1e-10, what + " f64");
        expect_close(run<float>(p, DeltaMode::Chunk), ref, 1e-5, 1e-4, what + " f32");
      }
}

TEST(DeltaRuleChunk, AnyChunkSizeGivesTheSameResult) {
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey}) {
    const Problem p = make_problem(gate, {0, 37, 100}, 2, 2, 16, 24, true, 7);
    const Result ref = run<double>(p, DeltaMode::Recurrent);
    for (int64_t c : {1, 5, 16, 24, 33, 128}) expect_close(run<double>(p, DeltaMode::Chunk, true, c), ref, 1e-11, 1e-10, "chunk " + std::to_string(c));
  }
}

// beta in (0, 2) (linear_allow_neg_eigval: the transition I − beta·k·kᵀ reflects when beta > 1):
// the chunk form's (I + diag(beta) Mkk)^{-1} and its backward still give the recurrence's answer.
TEST(DeltaRuleChunk, NegativeEigenvaluesMatchRecurrent) {
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey}) {
    Problem p = make_problem(gate, {0, 70, 200}, 1, 2, 32, 32, true, 13);
    for (double& b : p.beta) b *= 2.0;
    const Result ref = run<double>(p, DeltaMode::Recurrent);
    const std::string what = gate == DeltaGate::Scalar ? "gdn" : "kda";
    expect_close(run<double>(p, DeltaMode::Chunk), ref, 1e-11, 1e-10, what + " f64");
    expect_close(run<float>(p, DeltaMode::Chunk), ref, 1e-5, 1e-4, what + " f32");
  }
}

// Gates at the bound KDA's lower-bound form allows (−5 per token, e^{−320} over a chunk) and far
// beyond it (−40 per token, where sub-chunks fall back to one row at a time): no overflow, the
// same answer as the recurrence, in float.
TEST(DeltaRuleChunk, SteepGatesStayExact) {
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey})
    for (double g_const : {-5.0, -40.0}) {
      Problem p = make_problem(gate, {0, 150}, 1, 1, 32, 32, true, 11);
      for (size_t i = 0; i < p.g.size(); ++i) p.g[i] = (i % 3 == 0) ? g_const : g_const * 0.5;
      const Result ref = run<double>(p, DeltaMode::Recurrent);
      const std::string what = std::string(gate == DeltaGate::Scalar ? "gdn" : "kda") + " g=" + std::to_string(g_const);
      expect_close(run<float>(p, DeltaMode::Chunk), ref, 1e-5, 1e-4, what);
      expect_close(run<double>(p, DeltaMode::Chunk), ref, 1e-11, 1e-10, what + " f64");
    }
}

TEST(DeltaRuleChunk, ForwardDispatcherAndNullableBackwardArguments) {
  const Problem p = make_problem(DeltaGate::PerKey, {0, 20}, 1, 1, 8, 8, false, 3);
  std::vector<double> s1(p.h0.size(), 0.0), s2 = s1, o1(p.dout.size()), o2 = o1;
  delta_rule_forward(p.d, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.scale, s1.data(),
                     o1.data(), DeltaMode::Chunk);
  delta_rule_forward(p.d, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.scale, s2.data(),
                     o2.data(), DeltaMode::Recurrent);
  EXPECT_LT(rel(o1, o2), 1e-12);
  // h0 = nullptr is a zero state, dht = nullptr a zero cotangent.
  Problem z = p;
  std::fill(z.dht.begin(), z.dht.end(), 0.0);
  const Result ref = run<double>(z, DeltaMode::Recurrent);
  for (DeltaMode mode : {DeltaMode::Chunk, DeltaMode::Recurrent}) {
    std::vector<double> dq(p.q.size()), dk(p.k.size()), dv(p.v.size()), dg(p.g.size()), db(p.beta.size());
    delta_rule_backward<double>(p.d, p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), p.scale, nullptr,
                        p.dout.data(), nullptr, dq.data(), dk.data(), dv.data(), dg.data(), db.data(), nullptr, mode);
    EXPECT_LT(rel(dq, ref.dq), 1e-10);
    EXPECT_LT(rel(dg, ref.dg), 1e-10);
    EXPECT_LT(rel(db, ref.dbeta), 1e-10);
  }
}

// ---------------------------------------------------------------------------------------------
// Finite differences (double) of every backward.
// ---------------------------------------------------------------------------------------------

namespace {

// Central differences of f at x, compared with the analytic gradient `grad` over all entries.
double fd_error(std::vector<double>& x, const std::vector<double>& grad, const std::function<double()>& f) {
  const double eps = 1e-6;
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + eps;
    const double fp = f();
    x[i] = x0 - eps;
    const double fm = f();
    x[i] = x0;
    const double fd = (fp - fm) / (2 * eps);
    num += (fd - grad[i]) * (fd - grad[i]);
    den += grad[i] * grad[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

TEST(DeltaRuleBackward, FiniteDifferences) {
  for (DeltaGate gate : {DeltaGate::Scalar, DeltaGate::PerKey})
    for (DeltaMode mode : {DeltaMode::Chunk, DeltaMode::Recurrent}) {
      // Two sequences (7 and 3 tokens), GVA 2x, K != V; chunk 4 so chunks and sub-chunks both split.
      Problem p = make_problem(gate, {0, 7, 10}, 1, 2, 4, 3, true, 5);
      const Result r = run<double>(p, mode, true, 4);
      auto loss = [&] {
        const Result f = run<double>(p, mode, false, 4);
        return dot(f.o, p.dout) + dot(f.ht, p.dht);
      };
      const std::string what = std::string(gate == DeltaGate::Scalar ? "gdn" : "kda") +
                               (mode == DeltaMode::Chunk ? " chunk" : " recurrent");
      EXPECT_LT(fd_error(p.q, r.dq, loss), 1e-7) << what << " dq";
      EXPECT_LT(fd_error(p.k, r.dk, loss), 1e-7) << what << " dk";
      EXPECT_LT(fd_error(p.v, r.dv, loss), 1e-7) << what << " dv";
      EXPECT_LT(fd_error(p.g, r.dg, loss), 1e-7) << what << " dg";
      EXPECT_LT(fd_error(p.beta, r.dbeta, loss), 1e-7) << what << " dbeta";
      EXPECT_LT(fd_error(p.h0, r.dh0, loss), 1e-7) << what << " dh0";
    }
}

TEST(DeltaRuleLayer, ActivationsMatchTheirDefinitions) {
  const double a[] = {-30.0, -1.0, 0.5, 19.0, 25.0}, A_log = 0.3, dtb = 0.2;
  double g[5];
  gate_softplus_forward(a, &A_log, &dtb, g, 5, 1, 1);
  EXPECT_NEAR(g[1], -std::exp(0.3) * std::log1p(std::exp(-0.8)), 1e-15);
  EXPECT_DOUBLE_EQ(g[4], -std::exp(0.3) * 25.2);  // softplus is linear above 20
  gate_lowerbound_forward(a, &A_log, &dtb, -5.0, g, 5, 1, 1);
  EXPECT_NEAR(g[2], -5.0 / (1.0 + std::exp(-std::exp(0.3) * 0.7)), 1e-15);
  const double x[] = {3.0, 4.0};
  double y[2];
  l2norm_forward(x, y, 1, 2);
  EXPECT_NEAR(y[0], 3.0 / std::sqrt(25.0 + 1e-6), 1e-15);
  const float bf[] = {0.0f, 2.0f};
  float beta[2];
  beta_sigmoid_forward(bf, beta, 2, 1.0f);
  EXPECT_FLOAT_EQ(beta[0], 0.5f);
  beta_sigmoid_forward(bf, beta, 2, 2.0f);  // negative eigenvalues: beta in [0, 2]
  EXPECT_FLOAT_EQ(beta[0], 1.0f);
  EXPECT_FLOAT_EQ(beta[1], 2.0f / (1.0f + std::exp(-2.0f)));
}

TEST(DeltaRuleLayer, FiniteDifferences) {
  std::mt19937 rng(9);
  std::normal_distribution<double> nd;
  auto normal = [&](int64_t n, double s = 1.0) {
    std::vector<double> x = zeros(n);
    for (auto& e : x) e = s * nd(rng);
    return x;
  };
  // l2norm over rows of 5.
  {
    auto x = normal(15), w = normal(15);
    std::vector<double> y(15), dx(15);
    l2norm_backward(x.data(), w.data(), dx.data(), 3, 5);
    EXPECT_LT(fd_error(x, dx, [&] { l2norm_forward(x.data(), y.data(), 3, 5); return dot(y, w); }), 1e-8);
  }
  for (double beta_max : {1.0, 2.0}) {
    auto b = normal(6, 3.0), w = normal(6);
    std::vector<double> beta(6), db(6);
    beta_sigmoid_backward(b.data(), w.data(), db.data(), 6, beta_max);
    EXPECT_LT(fd_error(b, db,
                       [&] {
                         beta_sigmoid_forward(b.data(), beta.data(), 6, beta_max);
                         return dot(beta, w);
                       }),
              1e-8);
  }
  // Gates over [tokens=3, HV=2, width] for width 1 (GDN) and 4 (KDA); pre-activations spread so
  // that some cross softplus' linear threshold at 20.
  for (int64_t width : {int64_t(1), int64_t(4)})
    for (bool lower : {false, true}) {
      const int64_t n = 3 * 2 * width;
      auto a = normal(n, 8.0), A_log = normal(2, 0.5), dtb = normal(2 * width), w = normal(n);
      a[0] = 24.0;
      auto g = zeros(n), da = zeros(n), dA = zeros(2), ddt = zeros(2 * width);
      auto f = [&] {
        if (lower) gate_lowerbound_forward(a.data(), A_log.data(), dtb.data(), -5.0, g.data(), 3, 2, width);
        else gate_softplus_forward(a.data(), A_log.data(), dtb.data(), g.data(), 3, 2, width);
        return dot(g, w);
      };
      if (lower)
        gate_lowerbound_backward(a.data(), A_log.data(), dtb.data(), -5.0, w.data(), da.data(), dA.data(), ddt.data(), 3, 2,
                                 width);
      else
        gate_softplus_backward(a.data(), A_log.data(), dtb.data(), w.data(), da.data(), dA.data(), ddt.data(), 3, 2, width);
      const std::string what = std::string(lower ? "lower-bound" : "softplus") + " width " + std::to_string(width);
      EXPECT_LT(fd_error(a, da, f), 1e-7) << what << " da";
      EXPECT_LT(fd_error(A_log, dA, f), 1e-7) << what << " dA_log";
      EXPECT_LT(fd_error(dtb, ddt, f), 1e-7) << what << " ddt_bias";
      auto in_place = w, dA2 = zeros(2), ddt2 = zeros(2 * width);  // da may alias dg
      if (lower)
        gate_lowerbound_backward(a.data(), A_log.data(), dtb.data(), -5.0, in_place.data(), in_place.data(), dA2.data(),
                                 ddt2.data(), 3, 2, width);
      else
        gate_softplus_backward(a.data(), A_log.data(), dtb.data(), in_place.data(), in_place.data(), dA2.data(),
                               ddt2.data(), 3, 2, width);
      EXPECT_EQ(in_place, da) << what;
      EXPECT_EQ(dA2, dA) << what;
      EXPECT_EQ(ddt2, ddt) << what;
    }
}

// ---------------------------------------------------------------------------------------------
// `hla op` as a user runs it.
// ---------------------------------------------------------------------------------------------

namespace {

// The tensors of a fixture dump, each converted to `dt`.
std::map<std::string, Tensor> dump_as(const std::string& path, DType dt) {
  SafeTensorsFile f(path);
  std::map<std::string, Tensor> m;
  for (const auto& name : f.names()) m[name] = f.get(name).to(dt);
  return m;
}

std::string op_cmd(const std::string& op, const std::string& in, const std::string& out, const std::string& extra = "") {
  return cli_path() + " op " + op + " --input " + in + " --output " + out + " " + extra;
}

// Runs a failing `hla op`: exit code `code` (1 for bad data, 2 for bad arguments) and one line
// naming `needle`.
void expect_op_error(const std::string& cmd, const std::string& needle, int code = 1) {
  std::string out;
  EXPECT_EQ(run_command(cmd, &out), code) << cmd;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_NE(out.find(needle), std::string::npos) << "expected '" << needle << "' in: " << out;
}

}  // namespace

TEST(DeltaRuleCli, OpWritesWhatTheFixtureHolds) {
  HLA_REQUIRE_FIXTURES();
  TempDir tmp;
  for (const char* name : kFixtures) {
    const std::string in = fixture(std::string("ops/") + name + ".safetensors"), op = std::string(name).substr(0, 3);
    SafeTensorsFile ref(in);
    for (const char* mode : {"chunk", "recurrent"}) {
      ASSERT_EQ(run_command(op_cmd(op, in, tmp / "out.safetensors", std::string("--mode ") + mode)), 0) << name;
      SafeTensorsFile out(tmp / "out.safetensors");
      for (const char* t : {"out_o", "out_ht", "grad_q", "grad_k", "grad_v", "grad_g", "grad_beta", "grad_h0"}) {
        ASSERT_TRUE(out.has(t)) << t;
        EXPECT_EQ(out.get(t).dtype(), DType::F64) << t;
        EXPECT_LT(rel_l2(out.get(t), ref.get(t)), 1e-6) << name << " " << mode << " " << t;
      }
    }
  }
}

TEST(DeltaRuleCli, OpKeepsTheDumpsDtypeAndSkipsGradientsWithoutCotangents) {
  HLA_REQUIRE_FIXTURES();
  TempDir tmp;
  const std::string src = fixture("ops/kda_B2_T77_H3_K32_V48.safetensors");
  SafeTensorsFile ref(src);
  write_safetensors(tmp / "f32.safetensors", dump_as(src, DType::F32));
  ASSERT_EQ(run_command(op_cmd("kda", tmp / "f32.safetensors", tmp / "out.safetensors")), 0);
  {
    SafeTensorsFile out(tmp / "out.safetensors");
    EXPECT_EQ(out.get("out_o").dtype(), DType::F32);
    EXPECT_LT(rel_l2(out.get("out_o"), ref.get("out_o")), 1e-5);
    EXPECT_LT(rel_l2(out.get("grad_g"), ref.get("grad_g")), 1e-4);
  }
  auto fwd = dump_as(src, DType::BF16);
  fwd.erase("in_do");
  fwd.erase("in_dht");
  write_safetensors(tmp / "bf16.safetensors", fwd);
  ASSERT_EQ(run_command(op_cmd("kda", tmp / "bf16.safetensors", tmp / "out.safetensors", "--mode recurrent")), 0);
  SafeTensorsFile out(tmp / "out.safetensors");
  EXPECT_EQ(out.names(), (std::vector<std::string>{"out_ht", "out_o"}));
  EXPECT_EQ(out.get("out_o").dtype(), DType::BF16);
  EXPECT_LT(rel_l2(out.get("out_o"), ref.get("out_o")), 3e-2);  // inputs rounded to bf16
}

TEST(DeltaRuleCli, BadInputEndsWithOneLineNamingTheTensor) {
  HLA_REQUIRE_FIXTURES();
  TempDir tmp;
  const std::string src = fixture("ops/gdn_B2_T77_H3_K32_V48.safetensors");
  auto missing = dump_as(src, DType::F64);
  missing.erase("in_beta");
  write_safetensors(tmp / "missing.safetensors", missing);
  expect_op_error(op_cmd("gdn", tmp / "missing.safetensors", tmp / "o"), "'in_beta'");
  auto mismatch = dump_as(src, DType::F64);
  mismatch["in_v"] = mismatch["in_v"].narrow(1, 0, 70).contiguous();
  write_safetensors(tmp / "mismatch.safetensors", mismatch);
  expect_op_error(op_cmd("gdn", tmp / "mismatch.safetensors", tmp / "o"), "'in_v'");
  auto bad_dht = dump_as(src, DType::F64);
  bad_dht["in_dht"] = bad_dht["in_h0"].narrow(3, 0, 16).contiguous();
  write_safetensors(tmp / "dht.safetensors", bad_dht);
  expect_op_error(op_cmd("gdn", tmp / "dht.safetensors", tmp / "o"), "'in_dht'");
  expect_op_error(op_cmd("kda", src, tmp / "o"), "'in_g'");  // a GDN gate given to KDA
  expect_op_error(op_cmd("gdn", tmp / "nope.safetensors", tmp / "o"), "nope.safetensors");
  expect_op_error(op_cmd("gdn", src, tmp / "o", "--mode fast"), "--mode", 2);
#ifndef HLA_HAS_CUDA
  expect_op_error(op_cmd("gdn", src, tmp / "o", "--device cuda"), "built without CUDA");
#endif
}
