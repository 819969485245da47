#include "apps/commands.h"

namespace hla::cli {

void register_info(CLI::App& app) { app.add_subcommand("info", "not yet built"); }

}  // namespace hla::cli
