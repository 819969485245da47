// hla lab --preset smoke|standard --out DIR: the architecture lab (train a ladder of layouts on the
// synthetic tasks, write report.md, results.json and plots). Flags narrow or lengthen a preset.
#include <cstdio>
#include <memory>
#include <sstream>

#include "apps/commands.h"
#include "core/error.h"
#include "eval/lab.h"
#include "train/optim.h"

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
    int64_t steps = 0, seeds = 0, lin_dim = 0, dsa_topk = 0;
    std::vector<double> lrs;
    bool neg_eigval = false;
  };
  auto o = std::make_shared<Options>();
  cmd->add_option("--preset", o->preset, "smoke (minutes on 2 CPU cores) or standard")->default_val("smoke");
  cmd->add_option("--out", o->out, "output directory (report.md, results.json, curves.json, plots/)")->required();
  cmd->add_option("--tasks", o->tasks, "comma-separated tasks instead of the preset's (mqar, multihop, niah, copy, "
                                       "selective_copy, parity, s5, induction, brown)");
  cmd->add_option("--layouts", o->layouts, "comma-separated layouts instead of the preset's");
  auto* steps = cmd->add_option("--steps", o->steps, "training steps per run instead of the preset's");
  auto* seeds = cmd->add_option("--seeds", o->seeds, "number of seeds instead of the preset's");
  cmd->add_option("--lrs", o->lrs, "comma-separated learning rates to sweep instead of the preset's")->delimiter(',');
  auto* lin_dim =
      cmd->add_option("--lin-dim", o->lin_dim,
                      "head size of the linear layers instead of the preset's (a head's state is lin-dim^2 floats: "
                      "the recall claims hinge on it)");
  auto* dsa_topk =
      cmd->add_option("--dsa-topk", o->dsa_topk,
                      "keys each query of a DeepSeek-sparse layer attends to, instead of the preset's (sparse-3:1)");
  cmd->add_flag("--neg-eigval", o->neg_eigval,
                "GDN/KDA layers with beta in [0, 2] (negative eigenvalues, which parity needs; Grazzi et al.)");
  cmd->callback([o, steps, seeds, lin_dim, dsa_topk] {
    // Each of these, given, replaces the preset's value and must be positive (a 0 is an error, not
    // "the preset's").
    for (auto [opt, v] :
         {std::pair{steps, o->steps}, {seeds, o->seeds}, {lin_dim, o->lin_dim}, {dsa_topk, o->dsa_topk}})
      if (opt->count()) check(v > 0, opt->get_name() + " must be positive (got " + std::to_string(v) + ")");
    eval::LabPreset p = eval::lab_preset(o->preset);
    if (!o->tasks.empty()) p.tasks = split(o->tasks);
    if (!o->layouts.empty()) p.layouts = split(o->layouts);
    if (steps->count()) p.steps = o->steps;
    if (lin_dim->count())
      for (auto& size : p.sizes) size.lin_dim = o->lin_dim;
    if (dsa_topk->count())
      for (auto& size : p.sizes) size.index_topk = o->dsa_topk;
    if (!o->lrs.empty()) p.lrs = o->lrs;
    for (double lr : p.lrs) train::validate(train::OptimConfig{lr});  // before any training
    p.neg_eigval = o->neg_eigval;
    if (seeds->count()) {
      p.seeds.clear();
      for (int64_t i = 0; i < o->seeds; ++i) p.seeds.push_back(uint64_t(i));
    }
    for (auto& l : p.layouts)
      eval::lab_model_config(l, p.sizes[0], 8, p.neg_eigval);  // unknown names fail before any training
    eval::run_lab(p, o->out);
  });
}

}  // namespace hla::cli
