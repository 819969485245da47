// An OpenAI-compatible HTTP server over the continuous-batching Engine, on 127.0.0.1:
//   POST /v1/completions, POST /v1/chat/completions (streaming SSE or not), GET /v1/models,
//   GET /health, GET /metrics (Prometheus text).
// Every bad request gets a 4xx with an OpenAI-style JSON error and the server keeps serving.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "runtime/engine.h"
#include "runtime/text_model.h"

namespace hla {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string model_name;                 // the id clients send as "model"
  size_t max_body_bytes = 8u << 20;       // larger bodies: 413
  int64_t max_prompt_tokens = 32768;      // longer prompts: 400
  int64_t max_tokens_limit = 4096;        // max_tokens above this: 400
  int64_t http_threads = 96;              // each streaming client holds one
  EngineOptions engine;
  Device* device = nullptr;  // the model bound to it: the engine runs there; null: on the CPU
};

class OpenAIServer {
 public:
  // Serves tm (text endpoints need its tokenizer; token-id prompts work without one).
  OpenAIServer(const TextModel& tm, ServerOptions opt);
  ~OpenAIServer();
  // Binds and serves until stop() (from another thread or a signal). Throws hla::Error if the port
  // cannot be bound.
  void run();
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hla
