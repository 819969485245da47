// hla serve --model DIR --port P: the OpenAI-compatible server on 127.0.0.1.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "apps/commands.h"
#include "core/error.h"
#include "runtime/text_model.h"
#include "server/openai_server.h"

namespace hla::cli {

namespace {
OpenAIServer* g_server = nullptr;
void on_signal(int) {
  if (g_server) g_server->stop();
}
}  // namespace

void register_serve(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (continuous batching, prefix cache)");
  auto model = std::make_shared<std::string>();
  auto o = std::make_shared<ServerOptions>();
  auto cache_mb = std::make_shared<int64_t>(1024);
  auto device = std::make_shared<std::string>("cpu");
  auto dtype = std::make_shared<std::string>("f32");
  auto step_tokens = std::make_shared<int64_t>(0);
  cmd->add_option("--model", *model, "model directory")->required();
  cmd->add_option("--port", o->port, "TCP port on 127.0.0.1")->default_val(8080);
  cmd->add_option("--model-name", o->model_name, "model id clients send (default: the directory name)");
  cmd->add_option("--max-slots", o->engine.max_slots, "requests decoding at once")->default_val(32);
  cmd->add_option("--max-queued", o->engine.max_queued, "running + waiting requests before 429")->default_val(256);
  cmd->add_option("--max-prompt-tokens", o->max_prompt_tokens, "longest prompt accepted")->default_val(32768);
  cmd->add_option("--max-tokens-limit", o->max_tokens_limit, "largest max_tokens accepted")->default_val(4096);
  cmd->add_option("--max-body-bytes", o->max_body_bytes, "largest request body")->default_val(8u << 20);
  cmd->add_option("--max-step-tokens", *step_tokens,
                  "tokens per forward, prompt chunks and decode rows together: larger prefills faster, smaller stalls "
                  "running decodes less (default 512 on the CPU, 2048 on a GPU)");
  cmd->add_option("--prefix-block", o->engine.block, "prefix-cache block (tokens)")->default_val(256);
  cmd->add_option("--prefix-cache-mb", *cache_mb, "prefix-cache budget (MiB; on --device cuda, of GPU memory)")
      ->default_val(1024);
  cmd->add_option("--device", *device, "cpu or cuda (one GPU)")->capture_default_str();
  cmd->add_option("--dtype", *dtype, "weights on the GPU: f32 or bf16")->capture_default_str();
  cmd->callback([model, o, cache_mb, device, dtype, step_tokens] {
    check(o->port > 0 && o->port < 65536, "--port must be in 1..65535");
    check(o->engine.max_slots > 0 && o->engine.max_queued > 0, "--max-slots and --max-queued must be positive");
    check(o->engine.block > 0 && *cache_mb >= 0, "--prefix-block must be positive and --prefix-cache-mb >= 0");
    o->engine.prefix_cache_bytes = size_t(*cache_mb) << 20;
    check(*step_tokens >= 0, "--max-step-tokens must not be negative (0: the default)");
    if (o->model_name.empty()) o->model_name = std::filesystem::path(*model).lexically_normal().filename().string();
    if (o->model_name.empty()) o->model_name = std::filesystem::path(*model).parent_path().filename().string();
    // Opened before the weights load, so a missing GPU fails fast.
    std::unique_ptr<Device> dev = open_device(*device, *dtype, o->engine.max_slots);
    o->engine.max_step_tokens = *step_tokens > 0 ? *step_tokens : dev ? 2048 : 512;
    TextModel tm = load_text_model(*model);
    if (dev) tm.model->bind_device(*dev);
    o->device = dev.get();
    OpenAIServer server(tm, *o);
    g_server = &server;
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    std::fprintf(stderr, "hla serve: %s (%s, %s) on http://%s:%d\n", o->model_name.c_str(),
                 tm.model->spec().model_type.c_str(), dev ? dev->name().c_str() : "cpu", o->host.c_str(), o->port);
    server.run();
    g_server = nullptr;
  });
}

}  // namespace hla::cli
