// The CUDA Device: a Model's layers on one GPU (Model::bind_device + Model::forward(Device&)).
// Weights are uploaded in fp32 (the exact mode, checked against the CPU logits within 1e-4) or bf16
// (half the bytes; GEMMs read bf16 operands with fp32 accumulation). Activations, the recurrent
// state and the KV rows stay fp32. No CUDA types here, so the apps include it freely.
#pragma once
#include <memory>

#include "backends/device.h"
#include "core/dtype.h"

namespace hla::cuda {

// A device with room for `slots` cached sequences; weights: DType::F32 or DType::BF16. Throws
// hla::Error naming the problem when no GPU is usable.
std::unique_ptr<Device> make_cuda_device(int64_t slots, DType weights);

}  // namespace hla::cuda
