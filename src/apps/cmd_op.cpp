#include "apps/commands.h"

namespace hla::cli {

void register_op(CLI::App& app) { app.add_subcommand("op", "not yet built"); }

}  // namespace hla::cli
