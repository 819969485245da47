#include "train/trainer.h"

#include <chrono>
#include <cstdio>

#include "core/error.h"
#include "train/checkpoint.h"

namespace hla::train {

namespace {

std::string fmt_duration(double s) {
  char b[32];
  if (s >= 3600) std::snprintf(b, sizeof b, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  else std::snprintf(b, sizeof b, "%dm%02ds", int(s / 60), int(s) % 60);
  return b;
}

void restore(TrainModel<float>& model, AdamW& opt, const CheckpointData& c, int64_t step) {
  for (Param<float>* p : model.params()) {
    auto it = c.weights.find(p->name);
    check(it != c.weights.end() && size_t(it->second.numel()) == p->w.size(),
          "resume: the checkpoint has no tensor '" + p->name + "' of the model's shape");
    std::copy(it->second.f32(), it->second.f32() + it->second.numel(), p->w.begin());
  }
  opt.load_state(c.optimizer, step);
}

}  // namespace

TrainResult train_loop(TrainModel<float>& model, const nlohmann::json& config, const TrainOptions& o,
                       const MicroBatchFn& micro) {
  OptimConfig oc = o.optim;
  oc.total = o.steps;
  AdamW opt(oc);
  TrainResult r;
  if (o.resume) {
    check(!o.out.empty(), "--resume needs --out");
    if (auto c = load_latest_checkpoint(o.out)) {
      r.start_step = c->state.at("step").get<int64_t>();
      restore(model, opt, *c, r.start_step);
      for (auto& p : c->state.at("curve")) r.curve.emplace_back(p[0].get<int64_t>(), p[1].get<double>());
      std::fprintf(stderr, "hla train: resumed from step %lld\n", (long long)r.start_step);
    }
  }
  auto save = [&](int64_t step) {
    if (o.out.empty()) return;
    nlohmann::json curve = nlohmann::json::array();
    for (auto& [s, l] : r.curve) curve.push_back({s, l});
    CheckpointData c{config, model.export_weights(), opt.state(), {{"step", step}, {"curve", curve}}};
    save_checkpoint(o.out, step, c, o.keep);
  };
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t dense_steps = int64_t(o.dsa_warmup * double(o.steps));
  for (int64_t step = r.start_step; step < o.steps; ++step) {
    model.set_dense_attention(step < dense_steps);
    std::vector<Batch> mb;
    double norm = 0, tokens = 0;
    for (int64_t i = 0; i < o.accum; ++i) {
      mb.push_back(micro(step, i));
      norm += double(mb.back().labelled());
      tokens += double(mb.back().ids.size());
    }
    check(norm > 0, "hla train: a step's batches have no labelled position");
    model.zero_grad();
    double lm = 0;
    for (auto& b : mb) lm += model.forward_backward(b, norm, tokens).lm_sum;
    const double gnorm = opt.step(model.params());
    r.tokens += int64_t(tokens);
    r.curve.emplace_back(step, lm / norm);
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int64_t done = step + 1 - r.start_step;
    if (o.log_every > 0 && ((step + 1) % o.log_every == 0 || step + 1 == o.steps))
      std::fprintf(stderr, "step %lld/%lld | loss %.4f | lr %.2e | gnorm %.2f | %.0f tok/s | ETA %s\n",
                   (long long)(step + 1), (long long)o.steps, lm / norm, lr_at(oc, step), gnorm,
                   double(r.tokens) / el, fmt_duration(el / double(done) * double(o.steps - step - 1)).c_str());
    if (o.ckpt_every > 0 && (step + 1) % o.ckpt_every == 0 && step + 1 < o.steps) save(step + 1);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  save(o.steps);
  return r;
}

}  // namespace hla::train
