// Each `hla <command>` lives in its own apps/cmd_<name>.cpp and registers itself here.
#pragma once
#include <CLI/CLI.hpp>

#include <memory>

#include "backends/device.h"
#include "core/error.h"
#include "runtime/session.h"
#ifdef HLA_HAS_CUDA
#include "backends/cuda/cuda_device.h"
#endif

namespace hla::cli {

// --device / --dtype of the whole-model commands: nullptr for the CPU (the model's own forward), else
// the CUDA device with room for `slots` cached sequences and its weights in `dtype` (f32: exact,
// within 1e-4 of the CPU; bf16: half the bytes, fp32 accumulation).
inline std::unique_ptr<Device> open_device(const std::string& device, const std::string& dtype, int64_t slots) {
  check(device == "cpu" || device == "cuda", "--device: expected cpu or cuda, got '" + device + "'");
  check(dtype == "f32" || dtype == "bf16", "--dtype: expected f32 or bf16, got '" + dtype + "'");
  if (device == "cpu") {
    check(dtype == "f32", "--dtype " + dtype + ": the CPU engine computes in f32 only");
    return nullptr;
  }
#ifdef HLA_HAS_CUDA
  return cuda::make_cuda_device(slots, dtype == "bf16" ? DType::BF16 : DType::F32);
#else
  (void)slots;
  throw Error("--device cuda: this build has no CUDA backend (build with -DHLA_CUDA=ON)");
#endif
}

// --temperature --top-k --top-p --seed, with the command's defaults already in `p`.
inline void add_sampling_options(CLI::App* cmd, SamplingParams& p) {
  cmd->add_option("--temperature", p.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", p.top_k, "sample from the k most likely (0 = all)")->capture_default_str();
  cmd->add_option("--top-p", p.top_p, "nucleus sampling mass")->capture_default_str();
  cmd->add_option("--seed", p.seed, "sampling seed")->capture_default_str();
}

void register_op(CLI::App& app);
void register_logits(CLI::App& app);
void register_generate(CLI::App& app);
void register_init(CLI::App& app);
void register_info(CLI::App& app);
void register_serve(CLI::App& app);
void register_chat(CLI::App& app);
void register_tokenize(CLI::App& app);
void register_train(CLI::App& app);
void register_lab(CLI::App& app);
void register_bench(CLI::App& app);

}  // namespace hla::cli
