// Device discovery, error reporting and the launch switch for the CUDA backend.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/launch.cuh"
#include "core/error.h"

namespace hla::cuda {

bool device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later checks start clean
    return false;
  }
  return n > 0;
}

void check_cuda(cudaError_t e, const char* what) {
  check(e == cudaSuccess, std::string("cuda: ") + what + ": " + cudaGetErrorString(e));
}

int sm_count(int dev) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  if (dev < kMaxDevices && cache[dev]) return cache[dev];
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "multiprocessor count");
  if (dev < kMaxDevices) cache[dev] = n;
  return n;
}

int blocks_on_card(const void* kernel, int threads, size_t smem) {
  int dev = 0, per_sm = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), "occupancy");
  return sm_count(dev) * std::max(per_sm, 1);
}

bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("HLA_CUDA_PDL");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

}  // namespace hla::cuda
