#include "train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"

namespace hla::train {

namespace fs = std::filesystem;

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    f.flush();
    check(bool(f), tmp + ": cannot write");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  check(!ec, path + ": cannot rename into place (" + ec.message() + ")");
}

static std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  check(bool(f), p.string() + ": cannot read");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void save_checkpoint(const std::string& out, int64_t step, const CheckpointData& c, int keep) {
  const fs::path root = fs::path(out) / "checkpoints";
  std::error_code ec;
  fs::create_directories(root, ec);
  check(!ec, root.string() + ": cannot create (" + ec.message() + ")");
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", (long long)step);
  const fs::path dir = root / name, tmp = root / (std::string(name) + ".tmp");
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  check(!ec, tmp.string() + ": cannot create (" + ec.message() + ")");
  write_safetensors((tmp / "model.safetensors").string(), c.weights, {{"format", "pt"}});
  write_safetensors((tmp / "optimizer.safetensors").string(), c.optimizer);
  write_file_atomic((tmp / "config.json").string(), c.config.dump(2) + "\n");
  write_file_atomic((tmp / "trainer_state.json").string(), c.state.dump() + "\n");
  fs::remove_all(dir, ec);  // a re-run of the same step replaces it
  fs::rename(tmp, dir, ec);
  check(!ec, dir.string() + ": cannot rename into place (" + ec.message() + ")");
  write_file_atomic((root / "latest").string(), std::string(name) + "\n");
  // the model directory view of the newest weights
  write_safetensors((fs::path(out) / "model.safetensors").string(), c.weights, {{"format", "pt"}});
  write_file_atomic((fs::path(out) / "config.json").string(), c.config.dump(2) + "\n");
  std::vector<std::string> steps;
  for (auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0 && e.path().extension() != ".tmp")
      steps.push_back(e.path().filename().string());
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + size_t(keep) < steps.size(); ++i) fs::remove_all(root / steps[i], ec);
}

std::optional<CheckpointData> load_latest_checkpoint(const std::string& out) {
  const fs::path root = fs::path(out) / "checkpoints";
  if (!fs::exists(root / "latest")) return std::nullopt;
  std::string name = read_text(root / "latest");
  name.erase(name.find_last_not_of(" \n\r\t") + 1);
  const fs::path dir = root / name;
  check(fs::is_directory(dir), (root / "latest").string() + ": names missing checkpoint '" + name + "'");
  CheckpointData c;
  c.config = nlohmann::json::parse(read_text(dir / "config.json"));
  c.state = nlohmann::json::parse(read_text(dir / "trainer_state.json"));
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    SafeTensorsFile f((dir / file).string());
    auto& dst = std::string(file) == "model.safetensors" ? c.weights : c.optimizer;
    for (auto& n : f.names()) dst[n] = f.get(n).to_f32();  // copies out of the mapping
  }
  return c;
}

}  // namespace hla::train
