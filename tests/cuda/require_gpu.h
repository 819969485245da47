// The CUDA tests skip themselves on machines without a GPU (CI compiles them, a GPU runs them).
#pragma once
#include <gtest/gtest.h>

#include "backends/cuda/delta_rule_cuda.h"

#define HLA_REQUIRE_GPU() \
  if (!::hla::cuda::device_available()) GTEST_SKIP() << "no CUDA device"
