// Training checkpoints, written so that a kill at any moment never loses the last good one:
//   OUT/checkpoints/step-00000100/{model,optimizer}.safetensors, config.json, trainer_state.json
// is filled under a temporary name and renamed into place (a directory rename is atomic), then
// OUT/checkpoints/latest (the directory's name) is replaced by temp file + rename, then older
// checkpoints beyond `keep` are removed. OUT/config.json + OUT/model.safetensors (the latest
// weights, each replaced atomically) make OUT a model directory `hla generate` loads.
#pragma once
#include <map>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/tensor.h"

namespace hla::train {

struct CheckpointData {
  nlohmann::json config;   // the model's config.json
  std::map<std::string, Tensor> weights, optimizer;
  nlohmann::json state;    // trainer state: step, loss curve, options
};

void save_checkpoint(const std::string& out, int64_t step, const CheckpointData& c, int keep = 2);
// The checkpoint OUT/checkpoints/latest names, or nullopt when there is none.
std::optional<CheckpointData> load_latest_checkpoint(const std::string& out);

// Writes `text` to `path` by temp file + rename.
void write_file_atomic(const std::string& path, const std::string& text);

}  // namespace hla::train
