// CUDA tensor-core attention (attention_flash) against an fp64 reference: its error must stay
// within twice that of a plain bf16 implementation (the CPU oracle on q,k,v rounded to bf16).
// Every test skips itself where no GPU is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "backends/cpu/nn.h"
#include "backends/cuda/attention_cuda.h"
#include "backends/cuda/delta_rule_cuda.h"
#include "core/dtype.h"
#include "tests/cuda/require_gpu.h"

namespace hla {
namespace {

struct DevF32 {
  float* p = nullptr;
  size_t n = 0;
  explicit DevF32(size_t count) : n(count) {
    cuda::check_cuda(cudaMalloc(&p, std::max<size_t>(n * 4, 16)), "test alloc");
    cuda::check_cuda(cudaMemset(p, 0, n * 4), "test memset");
  }
  explicit DevF32(const std::vector<float>& x) : DevF32(x.size()) {
    cuda::check_cuda(cudaMemcpy(p, x.data(), n * 4, cudaMemcpyHostToDevice), "test upload");
  }
  DevF32(const DevF32&) = delete;
  ~DevF32() { cudaFree(p); }
  std::vector<float> get() const {
    std::vector<float> x(n);
    cuda::check_cuda(cudaMemcpy(x.data(), p, n * 4, cudaMemcpyDeviceToHost), "test download");
    return x;
  }
};

std::vector<float> randn(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(count);
  for (auto& e : x) e = dist(rng);
  return x;
}

std::vector<float> round_bf16(const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return y;
}

// fp64 causal attention, threads over query rows.
std::vector<double> attention_f64(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                                  int64_t n, int64_t S, int64_t nh, int64_t nkv, int64_t dq, int64_t dv, double scale) {
  std::vector<double> out(size_t(n * nh * dv));
  const int64_t group = nh / nkv;
  const int nthreads = int(std::max(1u, std::min(32u, std::thread::hardware_concurrency())));
  auto work = [&](int tid) {
    std::vector<double> p(static_cast<size_t>(S));
    for (int64_t ih = tid; ih < n * nh; ih += nthreads) {
      const int64_t i = ih / nh, h = ih % nh, kvh = h / group, pos = S - n + i;
      const float* qi = &q[size_t(ih * dq)];
      double mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        const float* kj = &k[size_t((j * nkv + kvh) * dq)];
        double dot = 0;
        for (int64_t d = 0; d < dq; ++d) dot += double(qi[d]) * double(kj[d]);
        p[size_t(j)] = dot * scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      double sum = 0;
      for (int64_t j = 0; j <= pos; ++j) sum += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
      double* oi = &out[size_t(ih * dv)];
      for (int64_t j = 0; j <= pos; ++j) {
        const float* vj = &v[size_t((j * nkv + kvh) * dv)];
        const double w = p[size_t(j)] / sum;
        for (int64_t d = 0; d < dv; ++d) oi[d] += w * double(vj[d]);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < nthreads; ++t) pool.emplace_back(work, t);
  for (auto& t : pool) t.join();
  return out;
}

double max_abs_err(const std::vector<float>& a, const std::vector<double>& ref) {
  double e = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    e = std::max(e, std::abs(double(a[i]) - ref[i]));
  }
  return e;
}

struct Case {
  int64_t n, S;
};

// Runs every (heads, dims) combination for the given shapes.
void check_cases(const std::vector<Case>& cases) {
  const int64_t heads[][2] = {{4, 4}, {16, 2}, {8, 1}};
  const int64_t dims[][2] = {{64, 64}, {128, 128}, {256, 256}, {192, 128}};
  uint32_t seed = 1234;
  for (const Case& c : cases)
    for (const auto& hd : heads)
      for (const auto& dd : dims) {
        const int64_t n = c.n, S = c.S, nh = hd[0], nkv = hd[1], dq = dd[0], dv = dd[1];
        const float scale = 1.0f / std::sqrt(float(dq));
        const auto q = randn(size_t(n * nh * dq), seed++), k = randn(size_t(S * nkv * dq), seed++),
                   v = randn(size_t(S * nkv * dv), seed++);
        const auto ref = attention_f64(q, k, v, n, S, nh, nkv, dq, dv, scale);
        const auto qb = round_bf16(q), kb = round_bf16(k), vb = round_bf16(v);
        std::vector<float> plain(size_t(n * nh * dv));
        cpu::attention(qb.data(), kb.data(), vb.data(), plain.data(), n, S, nh, nkv, dq, dv, scale);
        const double bound = 2.0 * max_abs_err(plain, ref) + 1e-6;

        DevF32 dq_(q), dk(k), dvv(v), dout(size_t(n * nh * dv));
        ASSERT_TRUE(cuda::attention_flash(dq_.p, dk.p, dvv.p, dout.p, n, S, nh, nkv, dq, dv, scale, nullptr));
        cuda::check_cuda(cudaDeviceSynchronize(), "attention_flash test");
        const double err = max_abs_err(dout.get(), ref);
        std::printf("  n=%-5lld S=%-5lld nh=%-2lld nkv=%-2lld dq=%-3lld dv=%-3lld  err %.3e  bound %.3e  (%.2fx plain)\n",
                    (long long)n, (long long)S, (long long)nh, (long long)nkv, (long long)dq, (long long)dv, err,
                    bound, err / std::max(1e-30, bound / 2));
        EXPECT_LE(err, bound) << "n=" << n << " S=" << S << " nh=" << nh << " nkv=" << nkv << " dq=" << dq
                              << " dv=" << dv;
      }
}

TEST(AttentionFlash, PrefillWithinTwicePlainBf16) {
  HLA_REQUIRE_GPU();
  check_cases({{1, 1}, {17, 17}, {64, 64}, {100, 100}, {257, 257}, {1000, 1000}});
}

TEST(AttentionFlash, DecodeWithinTwicePlainBf16) {
  HLA_REQUIRE_GPU();
  check_cases({{1, 1}, {1, 63}, {1, 4096}});
}

TEST(AttentionFlash, ChunkContinuationWithinTwicePlainBf16) {
  HLA_REQUIRE_GPU();
  check_cases({{37, 300}});
}

TEST(AttentionFlash, Deterministic) {
  HLA_REQUIRE_GPU();
  const Case cases[] = {{1, 4096}, {257, 257}, {37, 300}};
  for (const Case& c : cases) {
    const int64_t nh = 16, nkv = 2, d = 128;
    const auto q = randn(size_t(c.n * nh * d), 7), k = randn(size_t(c.S * nkv * d), 8),
               v = randn(size_t(c.S * nkv * d), 9);
    DevF32 dq_(q), dk(k), dv(v), o1(size_t(c.n * nh * d)), o2(size_t(c.n * nh * d));
    ASSERT_TRUE(cuda::attention_flash(dq_.p, dk.p, dv.p, o1.p, c.n, c.S, nh, nkv, d, d, 0.088f, nullptr));
    ASSERT_TRUE(cuda::attention_flash(dq_.p, dk.p, dv.p, o2.p, c.n, c.S, nh, nkv, d, d, 0.088f, nullptr));
    const auto a = o1.get(), b = o2.get();
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << "n=" << c.n << " S=" << c.S;
  }
}

TEST(AttentionFlash, UnsupportedShapesReturnFalse) {
  HLA_REQUIRE_GPU();
  DevF32 buf(size_t(1) << 16);
  const float* p = buf.p;
  EXPECT_FALSE(cuda::attention_flash(p, p, p, buf.p, 4, 4, 2, 2, 48, 64, 1.f, nullptr));   // dq = 48
  EXPECT_FALSE(cuda::attention_flash(p, p, p, buf.p, 4, 4, 2, 2, 64, 96, 1.f, nullptr));   // dv = 96
  EXPECT_FALSE(cuda::attention_flash(p, p, p, buf.p, 4, 4, 2, 2, 512, 512, 1.f, nullptr)); // too wide
  EXPECT_FALSE(cuda::attention_flash(p, p, p, buf.p, 4, 4, 3, 2, 64, 64, 1.f, nullptr));   // nh % nkv
  EXPECT_FALSE(cuda::attention_flash(p, p, p, buf.p, 5, 4, 2, 2, 64, 64, 1.f, nullptr));   // n > S
  cuda::check_cuda(cudaDeviceSynchronize(), "attention_flash test");
}

// Prints timings only (never asserts them): causal prefill (n = S) at 8K and 32K and one decode
// step at 8K, for the two GQA shapes of the models (d 256 with 16/2 heads, d 128 with 32/8).
TEST(AttentionFlash, Timing) {
  HLA_REQUIRE_GPU();
  const int64_t shapes[][3] = {{16, 2, 256}, {32, 8, 128}};  // nh, nkv, d
  const int64_t Smax = 32768;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (const auto& sh : shapes) {
    const int64_t nh = sh[0], nkv = sh[1], d = sh[2];
    const float scale = 1.0f / std::sqrt(float(d));
    DevF32 q(size_t(Smax * nh * d)), k(size_t(Smax * nkv * d)), v(size_t(Smax * nkv * d)), o(size_t(Smax * nh * d));
    {  // a repeated 4M-value random pattern: realistic magnitudes without generating 128M normals
      const auto pattern = randn(size_t(1) << 22, 11);
      for (DevF32* t : {&q, &k, &v})
        for (size_t off = 0; off < t->n; off += pattern.size())
          cuda::check_cuda(cudaMemcpy(t->p + off, pattern.data(), std::min(pattern.size(), t->n - off) * 4,
                                      cudaMemcpyHostToDevice),
                           "upload");
    }
    auto time_us = [&](int64_t n, int64_t S, int iters) {
      const float* qp = q.p + (S - n) * nh * d;  // the newest n queries
      ASSERT_TRUE(cuda::attention_flash(qp, k.p, v.p, o.p, n, S, nh, nkv, d, d, scale, nullptr));  // warm-up
      cudaEventRecord(e0, nullptr);
      for (int it = 0; it < iters; ++it) cuda::attention_flash(qp, k.p, v.p, o.p, n, S, nh, nkv, d, d, scale, nullptr);
      cudaEventRecord(e1, nullptr);
      cuda::check_cuda(cudaEventSynchronize(e1), "timing");
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      const double us = 1e3 * ms / iters;
      const double flops = 4.0 * double(n) * (n == S ? S / 2.0 : double(S)) * nh * d;
      std::printf("  attention_flash n=%lld S=%lld nh=%lld nkv=%lld d=%lld: %.1f us, %.1f TFLOP/s\n", (long long)n,
                  (long long)S, (long long)nh, (long long)nkv, (long long)d, us, flops / (us * 1e-6) / 1e12);
    };
    time_us(8192, 8192, 5);
    time_us(Smax, Smax, 3);
    time_us(1, 8192, 50);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace
}  // namespace hla
