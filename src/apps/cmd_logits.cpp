#include "apps/commands.h"

namespace hla::cli {

void register_logits(CLI::App& app) { app.add_subcommand("logits", "not yet built"); }

}  // namespace hla::cli
