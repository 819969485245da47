// hla info --model DIR (or --config FILE): the layer layout of a hybrid model, its parameters, and
// what its cache costs: KV bytes per token of context (attention layers only) against the constant
// recurrent state per sequence (linear layers, short-conv histories, sliding-window KV).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "apps/commands.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/model.h"

namespace hla::cli {

namespace {

std::string human_bytes(double b) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", b, unit[u]);
  return buf;
}

char layer_letter(MixerKind k) {
  switch (k) {
    case MixerKind::GatedDeltaNet:
    case MixerKind::KimiDeltaAttention:
    case MixerKind::Lightning: return 'L';
    case MixerKind::GatedAttention:
    case MixerKind::MLA: return 'F';
    case MixerKind::SlidingAttention: return 'W';
    case MixerKind::SparseMLA:
    case MixerKind::SparseAttention: return 'S';
  }
  return '?';
}

// "Gated DeltaNet", "KDA, lightning", ...: the linear mixers a model uses.
std::string linear_kinds(const ModelSpec& s) {
  std::string r;
  for (MixerKind k : {MixerKind::GatedDeltaNet, MixerKind::KimiDeltaAttention, MixerKind::Lightning})
    if (std::count(s.mixers.begin(), s.mixers.end(), k))
      r += (r.empty() ? "" : ", ") + std::string(k == MixerKind::GatedDeltaNet ? "Gated DeltaNet"
                                                 : k == MixerKind::KimiDeltaAttention ? "KDA" : "lightning");
  return r;
}

}  // namespace

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Layer layout, parameters and cache sizes of a model");
  auto model = std::make_shared<std::string>(), config = std::make_shared<std::string>();
  auto* src = cmd->add_option("--model", *model, "model directory (checks the weights' names and shapes)");
  cmd->add_option("--config", *config, "a config.json alone (no weights)")->excludes(src);
  cmd->callback([model, config] {
    check(!model->empty() || !config->empty(), "hla info needs --model DIR or --config FILE");
    std::unique_ptr<Checkpoint> ckpt;
    ModelSpec s;
    if (!model->empty()) {
      s = load_model_spec(*model);
      ckpt = std::make_unique<Checkpoint>(*model);
    } else {
      s = parse_model_spec(Config::load(*config));
    }
    const int64_t params = Model::count_params(s, ckpt.get());
    int64_t n_linear = 0, n_full = 0, n_sparse = 0;
    std::string layout;
    for (auto k : s.mixers) {
      layout += layer_letter(k);
      const char c = layer_letter(k);
      n_linear += c == 'L', n_full += c == 'F' || c == 'W', n_sparse += c == 'S';
    }
    const double kv = double(s.kv_bytes_per_token()), st = double(s.state_bytes_per_sequence());
    std::printf("model_type      %s\n", s.model_type.c_str());
    std::printf("layers          %lld: %lld linear%s, %lld full attention, %lld sparse attention\n",
                (long long)s.n_layers, (long long)n_linear,
                n_linear == 0 ? "" : (" (" + linear_kinds(s) + ")").c_str(), (long long)n_full,
                (long long)n_sparse);
    std::printf("layout          %s   (L linear, F full, W sliding window, S sparse)\n", layout.c_str());
    std::printf("hidden / vocab  %lld / %lld\n", (long long)s.hidden, (long long)s.vocab);
    std::printf("parameters      %lld (%.2f M)\n", (long long)params, double(params) / 1e6);
    std::printf("kv cache        %s per token (f32; full and sparse attention layers)\n", human_bytes(kv).c_str());
    std::printf("recurrent state %s per sequence, constant (f32; linear layers, short convs, sliding windows)\n", human_bytes(st).c_str());
    for (int64_t ctx : {4096, 32768, 131072})
      std::printf("cache at %6lld  %s per sequence\n", (long long)ctx, human_bytes(kv * double(ctx) + st).c_str());
  });
}

}  // namespace hla::cli
