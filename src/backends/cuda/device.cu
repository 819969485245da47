// Device discovery, error reporting and the launch switch for the CUDA backend.
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

bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("HLA_CUDA_PDL");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

}  // namespace hla::cuda
