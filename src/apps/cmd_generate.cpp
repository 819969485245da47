// hla generate --model DIR --prompt-ids 5,17,42 --max-new-tokens N [--temperature T --top-k K
// --top-p P --seed S]: prints the generated ids (prompt excluded) space-separated on one line.
// With a tokenizer in DIR, --prompt "text" works too and prints the text as it is generated
// (--print-ids prints ids instead).
#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>

#include "apps/commands.h"
#include "core/error.h"
#include "model/model.h"
#include "runtime/session.h"
#include "runtime/text_model.h"

namespace hla::cli {

namespace {

struct GenerateOptions {
  std::string model, prompt_ids, prompt, device = "cpu", dtype = "f32";
  int64_t max_new = 32;
  SamplingParams sampling;
  bool stats = false, print_ids = false;
};

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(tok, &used);
    } catch (const std::exception&) {
      used = std::string::npos;
    }
    check(used == tok.size() && !tok.empty(), "--prompt-ids: '" + tok + "' is not an integer token id");
    ids.push_back(v);
  }
  check(!ids.empty(), "--prompt-ids: empty prompt");
  return ids;
}

}  // namespace

void register_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate tokens from a prompt (greedy or sampled)");
  auto o = std::make_shared<GenerateOptions>();
  cmd->add_option("--model", o->model, "model directory")->required();
  auto* ids_opt = cmd->add_option("--prompt-ids", o->prompt_ids, "comma-separated prompt token ids");
  cmd->add_option("--prompt", o->prompt, "prompt text (needs tokenizer.json in the model directory)")->excludes(ids_opt);
  cmd->add_flag("--print-ids", o->print_ids, "with --prompt: print token ids, not text");
  cmd->add_option("--max-new-tokens", o->max_new, "tokens to generate")->default_val(32);
  add_sampling_options(cmd, o->sampling);
  cmd->add_option("--device", o->device, "cpu or cuda")->default_val("cpu");
  cmd->add_option("--dtype", o->dtype, "weights on the GPU: f32 or bf16")->default_val("f32");
  cmd->add_flag("--stats", o->stats, "print prefill and decode speed to stderr");
  cmd->callback([o] {
    check(!o->prompt_ids.empty() || !o->prompt.empty(), "give --prompt-ids or --prompt");
    const std::vector<int64_t> parsed = o->prompt.empty() ? parse_ids(o->prompt_ids) : std::vector<int64_t>{};
    std::unique_ptr<Device> dev = open_device(o->device, o->dtype, 1);
    TextModel tm = load_text_model(o->model);
    if (dev) tm.model->bind_device(*dev);
    const Model* m = tm.model.get();
    const std::vector<int64_t> prompt = o->prompt.empty() ? parsed : tm.encode_prompt(o->prompt);
    const bool as_text = !o->prompt.empty() && !o->print_ids;
    std::unique_ptr<Detokenizer> text;
    if (as_text) text = std::make_unique<Detokenizer>(*tm.tokenizer, tm.stop_ids);
    Session session = dev ? Session(*m, *dev, 0) : Session(*m);
    Sampler sampler(o->sampling);
    using clock = std::chrono::steady_clock;
    auto t0 = clock::now(), t1 = t0;
    int64_t printed = 0;
    // Ids: every generated id, EOS included (the contract). Text: the EOS is not text.
    const std::vector<int64_t>& stop = as_text ? tm.stop_ids : m->spec().eos_token_ids;
    std::vector<int64_t> out = session.generate(prompt, o->max_new, sampler, stop, [&](int64_t id) {
      if (printed++ == 0) t1 = clock::now();
      if (text) std::fputs(text->push(id).c_str(), stdout);
      else std::printf(printed > 1 ? " %lld" : "%lld", (long long)id);
      std::fflush(stdout);
      return true;
    });
    if (text) std::fputs(text->finish().c_str(), stdout);
    std::printf("\n");
    std::fflush(stdout);  // the ids line before the stats line, also when both go to one file
    if (o->stats) {
      const double pre = std::chrono::duration<double>(t1 - t0).count();
      const double dec = std::chrono::duration<double>(clock::now() - t1).count();
      std::fprintf(stderr, "prefill: %zu tokens in %.3f s (%.1f tok/s); decode: %zu tokens in %.3f s (%.2f tok/s)\n",
                   prompt.size(), pre, double(prompt.size()) / pre, out.size() - 1, dec,
                   out.size() > 1 ? double(out.size() - 1) / dec : 0.0);
    }
  });
}

}  // namespace hla::cli
