// Each `hla <command>` lives in its own apps/cmd_<name>.cpp and registers itself here.
#pragma once
#include <CLI/CLI.hpp>

#include "core/error.h"
#include "runtime/session.h"

namespace hla::cli {

// --device for whole-model commands: the model runs on the CPU; with CUDA built in, only the
// delta-rule ops (hla op) run on the GPU so far.
inline void require_cpu_model_device(const std::string& device) {
  if (device == "cpu") return;
#ifdef HLA_HAS_CUDA
  throw Error("--device " + device + ": the model runs on the CPU only for now (hla op runs its kernels on CUDA)");
#else
  throw Error("--device " + device + ": this build has no CUDA backend (build with -DHLA_CUDA=ON)");
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
