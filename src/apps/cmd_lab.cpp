// hla lab --preset smoke|standard --out DIR: the architecture lab (train a ladder of layouts on the
// synthetic tasks, write report.md, results.json and plots). Flags narrow or lengthen a preset.
#include <cstdio>
#include <memory>
#include <sstream>

#include "apps/commands.h"
#include "core/error.h"
#include "eval/lab.h"

namespace hla::cli {

namespace {
std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> r;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) r.push_back(x);
  return r;
}
}  // namespace

void register_lab(CLI::App& app) {
  auto* cmd = app.add_subcommand("lab", "Train a ladder of hybrid layouts on synthetic tasks and write a report");
  struct Options {
    std::string preset = "smoke", out, tasks, layouts;
    int64_t steps = 0, seeds = 0;
  };
  auto o = std::make_shared<Options>();
  cmd->add_option("--preset", o->preset, "smoke (minutes on 2 CPU cores) or standard")->default_val("smoke");
  cmd->add_option("--out", o->out, "output directory (report.md, results.json, curves.json, plots/)")->required();
  cmd->add_option("--tasks", o->tasks, "comma-separated tasks instead of the preset's (mqar, multihop, niah, copy, "
                                       "selective_copy, parity, s5, induction, brown)");
  cmd->add_option("--layouts", o->layouts, "comma-separated layouts instead of the preset's");
  cmd->add_option("--steps", o->steps, "training steps per run instead of the preset's");
  cmd->add_option("--seeds", o->seeds, "number of seeds instead of the preset's");
  cmd->callback([o] {
    eval::LabPreset p = eval::lab_preset(o->preset);
    if (!o->tasks.empty()) p.tasks = split(o->tasks);
    if (!o->layouts.empty()) p.layouts = split(o->layouts);
    if (o->steps > 0) p.steps = o->steps;
    if (o->seeds > 0) {
      p.seeds.clear();
      for (int64_t i = 0; i < o->seeds; ++i) p.seeds.push_back(uint64_t(i));
    }
    for (auto& l : p.layouts) eval::lab_model_config(l, p.sizes[0], 8);  // unknown names fail before any training
    eval::run_lab(p, o->out);
  });
}

}  // namespace hla::cli
