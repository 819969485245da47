// The CUDA delta-rule kernels as a training step's DeltaRuleKernels (`hla train --device cuda`).
#pragma once
#include "train/train_model.h"

namespace hla::cuda {

// Chunk forward and backward on the GPU in fp32 (3xTF32 tensor-core matmuls, fp32 state), same
// math as the CPU op to ~1e-6. Each call uploads its inputs and downloads its outputs; the rest of
// the training step (projections, convolutions, norms, attention, MLPs, optimizer) stays on the CPU.
const train::DeltaRuleKernels& delta_rule_training_kernels();

}  // namespace hla::cuda
