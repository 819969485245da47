// Each `hla <command>` lives in its own apps/cmd_<name>.cpp and registers itself here.
#pragma once
#include <CLI/CLI.hpp>

namespace hla::cli {

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
