// hla chat [--model DIR]: an interactive, multi-turn chat on the terminal. Replies stream as they
// are generated. Without --model it talks to the demo model shipped in the repository
// (models/brown-hybrid, a small hybrid hla trained on the Brown corpus). A tokenizer without a chat
// template gets plain continuation: the conversation as lines of text. A turn re-uses the conversation's hybrid cache: when the new rendered prompt extends
// what the cache already holds, only the new tokens are prefilled (recurrent state cannot be
// rolled back, so anything else starts over). Commands: /reset, /exit (or end of input).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "core/error.h"
#include "runtime/session.h"
#include "runtime/text_model.h"

namespace hla::cli {

namespace {

// models/brown-hybrid beside the build directory of this binary (build/hla -> models/...).
std::string shipped_demo_model() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  for (auto dir = exe.parent_path(); !dir.empty() && dir != dir.parent_path(); dir = dir.parent_path())
    if (std::filesystem::exists(dir / "models/brown-hybrid/config.json")) return (dir / "models/brown-hybrid").string();
  return "";
}

}  // namespace

void register_chat(CLI::App& app) {
  auto* cmd = app.add_subcommand("chat", "Interactive multi-turn chat (needs tokenizer.json with a chat template)");
  struct Options {
    std::string model, system, device = "cpu", dtype = "f32";
    int64_t max_new = 512;
    SamplingParams sampling{0.7f, 40, 0.95f, 0};
  };
  auto o = std::make_shared<Options>();
  cmd->add_option("--model", o->model, "model directory (default: the shipped demo model)");
  cmd->add_option("--system", o->system, "system prompt");
  cmd->add_option("--max-new-tokens", o->max_new, "longest reply")->default_val(512);
  add_sampling_options(cmd, o->sampling);
  cmd->add_option("--device", o->device, "cpu or cuda")->default_val("cpu");
  cmd->add_option("--dtype", o->dtype, "weights on the GPU: f32 or bf16")->default_val("f32");
  cmd->callback([o] {
    if (o->model.empty()) o->model = shipped_demo_model();
    check(!o->model.empty(), "--model is needed (the demo model models/brown-hybrid was not found)");
    std::unique_ptr<Device> dev = open_device(o->device, o->dtype, 1);
    TextModel tm = load_text_model(o->model);
    if (dev) tm.model->bind_device(*dev);
    auto new_session = [&] {
      return dev ? std::make_unique<Session>(*tm.model, *dev, 0) : std::make_unique<Session>(*tm.model);
    };
    const Tokenizer& tok = tm.need_tokenizer();
    // With a template: the model's own chat format. Without: each turn is a line of plain text.
    auto render = [&](const nlohmann::ordered_json& msgs) {
      if (tok.has_chat_template()) return tm.encode_chat(msgs);
      std::string text;
      for (auto& m : msgs) text += m["content"].get<std::string>() + "\n";
      return tm.encode_prompt(text);
    };
    Sampler sampler(o->sampling);
    auto session = new_session();
    std::vector<int64_t> history;  // the tokens folded into session's cache
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    auto reset = [&] {
      session = new_session();
      history.clear();
      messages = nlohmann::ordered_json::array();
      if (!o->system.empty()) messages.push_back({{"role", "system"}, {"content", o->system}});
    };
    reset();
    std::fprintf(stderr, "hla chat: %s (%s)%s. /reset starts over, /exit quits.\n", o->model.c_str(),
                 tm.model->spec().model_type.c_str(), tok.has_chat_template() ? "" : ", no chat template: plain continuation");
    std::string line;
    while (true) {
      std::fputs("> ", stdout);
      std::fflush(stdout);
      if (!std::getline(std::cin, line) || line == "/exit") break;
      if (line == "/reset") {
        reset();
        std::fputs("(conversation cleared)\n", stdout);
        continue;
      }
      if (line.empty()) continue;
      messages.push_back({{"role", "user"}, {"content", line}});
      const std::vector<int64_t> ids = render(messages);
      const bool extends = history.size() < ids.size() && std::equal(history.begin(), history.end(), ids.begin());
      if (!extends) {
        session = new_session();
        history.clear();
      }
      const std::vector<int64_t> fresh(ids.begin() + int64_t(history.size()), ids.end());
      Detokenizer text(tok, tm.stop_ids);
      std::string reply;
      const auto t0 = std::chrono::steady_clock::now();
      auto t1 = t0;
      std::vector<int64_t> out = session->generate(fresh, o->max_new, sampler, tm.stop_ids, [&](int64_t id) {
        if (t1 == t0) t1 = std::chrono::steady_clock::now();
        const std::string piece = text.push(id);
        reply += piece;
        std::fputs(piece.c_str(), stdout);
        std::fflush(stdout);
        return true;
      });
      const std::string tail = text.finish();
      reply += tail;
      std::fputs((tail + "\n").c_str(), stdout);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
      std::fprintf(stderr, "[%zu tokens, %.1f tok/s; prefilled %zu, reused %zu from the cache]\n", out.size(),
                   out.size() > 1 ? double(out.size() - 1) / secs : 0.0, fresh.size(), history.size());
      // Every generated token but the last has been fed back into the cache.
      history.insert(history.end(), fresh.begin(), fresh.end());
      if (!out.empty()) history.insert(history.end(), out.begin(), out.end() - 1);
      messages.push_back({{"role", "assistant"}, {"content", reply}});
    }
  });
}

}  // namespace hla::cli
