// hla init --config C --out DIR [--seed S] [--dtype f32|bf16]: a random-weight checkpoint of any
// supported architecture and size, in the real Hugging Face layout (config.json + safetensors),
// for tests, demos and benchmarks.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "apps/commands.h"
#include "core/config.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/model.h"

namespace hla::cli {

namespace fs = std::filesystem;

void register_init(CLI::App& app) {
  auto* cmd = app.add_subcommand("init", "Write a random-weight checkpoint for a config.json");
  struct Options {
    std::string config, out, dtype = "f32", tokenizer;
    uint64_t seed = 0;
  };
  auto o = std::make_shared<Options>();
  cmd->add_option("--config", o->config, "config.json of the model to create")->required();
  cmd->add_option("--out", o->out, "output directory")->required();
  cmd->add_option("--seed", o->seed, "random seed")->default_val(0);
  cmd->add_option("--dtype", o->dtype, "weight dtype on disk: f32 or bf16")->default_val("f32");
  cmd->add_option("--tokenizer", o->tokenizer, "directory whose tokenizer.json / tokenizer_config.json to copy in");
  cmd->callback([o] {
    check(o->dtype == "f32" || o->dtype == "bf16", "--dtype must be f32 or bf16");
    check(o->tokenizer.empty() || fs::exists(fs::path(o->tokenizer) / "tokenizer.json"),
          (fs::path(o->tokenizer) / "tokenizer.json").string() + ": not found");
    const Config cfg = Config::load(o->config);
    const ModelSpec spec = parse_model_spec(cfg);
    std::fprintf(stderr, "hla init: %s, %lld layers, %.1fM parameters...\n", spec.model_type.c_str(),
                 (long long)spec.n_layers, double(Model::count_params(spec, nullptr)) / 1e6);
    std::map<std::string, Tensor> tensors;
    Model::random(spec, o->seed, &tensors);
    if (o->dtype == "bf16")
      for (auto& [name, t] : tensors) t = t.to(DType::BF16);
    std::error_code ec;
    fs::create_directories(o->out, ec);
    check(!ec, o->out + ": cannot create directory (" + ec.message() + ")");
    write_safetensors((fs::path(o->out) / "model.safetensors").string(), tensors, {{"format", "pt"}});
    std::ofstream(fs::path(o->out) / "config.json") << cfg.raw().dump(2) << "\n";
    if (!o->tokenizer.empty()) {
      for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
        const fs::path src = fs::path(o->tokenizer) / f;
        if (fs::exists(src)) fs::copy_file(src, fs::path(o->out) / f, fs::copy_options::overwrite_existing, ec);
        check(!ec, src.string() + ": cannot copy (" + ec.message() + ")");
      }
    }
    std::fprintf(stderr, "hla init: wrote %s\n", o->out.c_str());
  });
}

}  // namespace hla::cli
