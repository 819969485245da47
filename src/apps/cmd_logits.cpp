// hla logits --model DIR --input IN.safetensors --output OUT.safetensors
// Reads int64 input_ids [B,T], writes float32 logits [B,T,V] of a full-sequence forward (each row
// is its own sequence).
#include <memory>

#include "apps/commands.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/model.h"

namespace hla::cli {

void register_logits(CLI::App& app) {
  auto* cmd = app.add_subcommand("logits", "Full-sequence forward: input_ids [B,T] -> logits [B,T,V]");
  auto opts = std::make_shared<std::tuple<std::string, std::string, std::string, std::string, std::string>>();
  auto& [model, input, output, device, dtype] = *opts;
  cmd->add_option("--model", model, "model directory (config.json + safetensors)")->required();
  cmd->add_option("--input", input, "safetensors file with int64 input_ids [B,T]")->required();
  cmd->add_option("--output", output, "safetensors file to write float32 logits [B,T,V]")->required();
  cmd->add_option("--device", device, "cpu or cuda")->default_val("cpu");
  cmd->add_option("--dtype", dtype, "weights on the GPU: f32 or bf16")->default_val("f32");
  cmd->callback([opts] {
    auto& [model_dir, in_path, out_path, device_name, weights] = *opts;
    SafeTensorsFile in(in_path);
    check(in.has("input_ids"), in_path + ": no tensor 'input_ids'");
    Tensor ids = in.get("input_ids");
    check(ids.dtype() == DType::I64 || ids.dtype() == DType::I32,
          in_path + ": tensor 'input_ids' must be int64 (is " + dtype_name(ids.dtype()) + ")");
    check(ids.dim() == 2 || ids.dim() == 1, in_path + ": tensor 'input_ids' must be [B,T]");
    if (ids.dim() == 1) ids = ids.reshape({1, ids.size(0)});
    const int64_t B = ids.size(0), T = ids.size(1);
    check(T > 0, in_path + ": tensor 'input_ids' is empty");
    std::unique_ptr<Device> dev = open_device(device_name, weights, B);
    auto m = Model::load(model_dir);
    const int64_t V = m->spec().vocab;
    // All rows run as one packed batch of independent sequences.
    std::vector<int64_t> flat(size_t(B * T)), cu{0};
    for (int64_t i = 0; i < B * T; ++i) flat[size_t(i)] = int64_t(ids.flat(i));
    for (int64_t b = 0; b < B; ++b) cu.push_back((b + 1) * T);
    Tensor logits;
    if (dev) {
      m->bind_device(*dev);
      DevBatch batch{cu, {}, std::vector<int64_t>(size_t(B), 0)};
      for (int64_t b = 0; b < B; ++b) batch.slots.push_back(b);
      logits = m->forward(*dev, flat, batch, true);
    } else {
      std::vector<SequenceCache> caches(size_t(B), m->new_cache());
      SeqBatch batch{cu, {}};
      for (auto& c : caches) batch.caches.push_back(&c);
      logits = m->forward(flat, batch, true);
    }
    write_safetensors(out_path, {{"logits", logits.reshape({B, T, V})}});
  });
}

}  // namespace hla::cli
