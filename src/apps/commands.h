// Each `hla <command>` lives in its own apps/cmd_<name>.cpp and registers itself here.
#pragma once
#include <CLI/CLI.hpp>

#include "runtime/session.h"

namespace hla::cli {

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

}  // namespace hla::cli
