// The CUDA device's own operations against CpuDevice (the oracle's functions) where the model tests
// would hide a shape: the decode GEMV (up to 8 rows, K split across warps; bf16 weights, fp32
// activations) and the cuBLASLt GEMM past it (bf16 operands); the greedy pick (argmax, lowest index
// on ties).
#include <gtest/gtest.h>

#include <random>

#include "backends/cpu/cpu_device.h"
#include "backends/cuda/cuda_device.h"
#include "backends/cuda/delta_rule_cuda.h"
#include "core/dtype.h"
#include "tests/cuda/require_gpu.h"

using namespace hla;

namespace {

// y = x · W^T on `dev` (x rows ldx apart), back on the host.
std::vector<float> run_linear(Device& dev, const Tensor& W, const std::vector<float>& x, int64_t M, int64_t ldx) {
  const DevMatrix w = dev.upload_matrix(W);
  dev.begin_forward();
  const float* xd = dev.upload_f32(x);
  float* yd = dev.scratch(M * W.size(0));
  dev.linear(xd, ldx, w, yd, M);
  std::vector<float> y(size_t(M * W.size(0)));
  dev.to_host(yd, y.data(), M * W.size(0));
  return y;
}

TEST(CudaDeviceOps, LinearMatchesCpuDeviceInBf16) {
  HLA_REQUIRE_GPU();
  struct Shape {
    int64_t M, N, K, ldx;
  };
  // M ≤ 8: the GEMV with K splits 1, 2, 4 and 8, short rows (lanes without columns), an odd row
  // count, padded x rows; M > 8: cuBLASLt.
  const Shape shapes[] = {{1, 37, 32, 32},   {1, 2048, 4096, 4096},  {3, 2053, 2048, 2056},  {8, 12352, 2048, 2048},
                          {2, 100, 96, 100}, {8, 2048, 6144, 6144},  {1, 300, 16384, 16384}, {5, 70000, 64, 64},
                          {9, 100, 96, 100}, {16, 2048, 6144, 6144}, {40, 64, 64, 64}};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const Shape& s : shapes) {
    Tensor W = Tensor::f32({s.N, s.K});  // bf16 values, so that an fp32 device holds the same weights
    for (int64_t i = 0; i < W.numel(); ++i) W.f32()[i] = bf16_to_f32(f32_to_bf16(u(rng)));
    std::vector<float> x(size_t(s.M * s.ldx));
    for (float& v : x) v = u(rng);
    auto gpu = cuda::make_cuda_device(1, DType::BF16);
    cpu::CpuDevice cpu(1, /*bf16 operands=*/s.M > 8);  // the GEMV (M ≤ 8) keeps x in fp32
    const std::vector<float> got = run_linear(*gpu, W, x, s.M, s.ldx), want = run_linear(cpu, W, x, s.M, s.ldx);
    double err = 0, scale = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      err = std::max(err, double(std::fabs(got[i] - want[i])));
      scale = std::max(scale, double(std::fabs(want[i])));
    }
    // The same bf16 products summed in another order in fp32.
    EXPECT_LT(err / scale, 1e-5) << "M " << s.M << " N " << s.N << " K " << s.K;
  }
}

TEST(CudaDeviceOps, ArgmaxPicksTheLowestIndexAmongTies) {
  HLA_REQUIRE_GPU();
  const int64_t rows = 5, n = 151936;
  std::mt19937 rng(5);
  std::normal_distribution<float> z;
  std::vector<float> x(size_t(rows * n));
  for (float& v : x) v = z(rng);
  x[size_t(0 * n + 70001)] = 9.0f, x[size_t(0 * n + 70000)] = 9.0f, x[size_t(0 * n + 151935)] = 9.0f;  // ties
  x[size_t(1 * n + n - 1)] = 9.0f;                                                                     // the last
  std::fill(x.begin() + 2 * n, x.begin() + 3 * n, 1.0f);                                               // all equal
  x[size_t(3 * n)] = 9.0f;                                                                             // the first
  auto dev = cuda::make_cuda_device(1, DType::BF16);
  dev->begin_forward();
  int32_t* best = dev->scratch_i32(rows);
  dev->argmax_rows(dev->upload_f32(x), rows, n, best);
  std::vector<int32_t> got(static_cast<size_t>(rows));
  dev->to_host(best, got.data(), rows);
  cpu::CpuDevice cpu(1);
  std::vector<int32_t> want(static_cast<size_t>(rows));
  cpu.argmax_rows(x.data(), rows, n, want.data());
  EXPECT_EQ(got, want);
  EXPECT_EQ(want[0], 70000);
  EXPECT_EQ(want[1], n - 1);
  EXPECT_EQ(want[2], 0);
  EXPECT_EQ(want[3], 0);
}

}  // namespace
