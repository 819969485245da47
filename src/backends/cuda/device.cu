// Device discovery and error reporting for the CUDA backend.
#include <string>

#include "backends/cuda/delta_rule_cuda.h"
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

}  // namespace hla::cuda
