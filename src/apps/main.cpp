// hla — command-line entry point. Every failure is one line on stderr and exit code 1.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "apps/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  // libgomp reads OMP_WAIT_POLICY once, when it is loaded (before main). Its default keeps idle
  // threads spinning, which on a machine with other work (the server's own HTTP threads, other
  // jobs) starves the thread doing the work: 100M-model decode on 2 busy cores fell from 92 to 3
  // tokens/s. Unless the user chose a policy, start again with passive waiting.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then run as we are
  }
  CLI::App app{"hla: hybrid linear-attention language models (Qwen3-Next, Qwen3.5, Kimi-Linear, DeepSeek-V3.2)"};
  app.require_subcommand(1);
  hla::cli::register_op(app);
  hla::cli::register_logits(app);
  hla::cli::register_generate(app);
  hla::cli::register_init(app);
  hla::cli::register_info(app);
  hla::cli::register_serve(app);
  hla::cli::register_chat(app);
  hla::cli::register_tokenize(app);
  hla::cli::register_train(app);
  hla::cli::register_lab(app);
  hla::cli::register_bench(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "hla: error: %s (see hla --help)\n", e.what());
    return 2;
  } catch (const hla::Error& e) {
    std::fprintf(stderr, "hla: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "hla: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hla: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
