#include "apps/commands.h"

namespace hla::cli {

void register_generate(CLI::App& app) { app.add_subcommand("generate", "not yet built"); }

}  // namespace hla::cli
