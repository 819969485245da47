#include "apps/commands.h"

namespace hla::cli {

void register_init(CLI::App& app) { app.add_subcommand("init", "not yet built"); }

}  // namespace hla::cli
