// hla train --config C --data TASK|brown --out DIR [--steps N ...] [--resume]: trains an hla_hybrid
// model from scratch in fp32 (on the CPU; --device cuda runs the delta-rule op of its GDN/KDA layers on
// the GPU) and writes checkpoints that `hla generate --model DIR` loads.
#include <cstdio>
#include <filesystem>
#include <memory>

#include "apps/commands.h"
#include "core/config.h"
#include "core/error.h"
#include "eval/data.h"
#include "model/model.h"
#include "train/trainer.h"
#ifdef HLA_HAS_CUDA
#include "backends/cuda/delta_rule_cuda.h"
#include "backends/cuda/train_kernels.h"
#endif

namespace hla::cli {

void register_train(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train an hla_hybrid model on a synthetic task or the Brown corpus (CPU, fp32)");
  struct Options {
    std::string config, data, out, preset = "smoke", device = "cpu";
    int64_t steps = 200, batch = 16, accum = 1, seq_len = 128, warmup = -1, ckpt_every = 0, log_every = 10, eval_n = 200;
    double lr = 1e-3, wd = 0.1, clip = 1.0, dsa_warmup = 0.1;
    uint64_t seed = 0;
    bool resume = false;
  };
  auto o = std::make_shared<Options>();
  cmd->add_option("--config", o->config, "config.json of an hla_hybrid model (vocab_size may be left out)")->required();
  cmd->add_option("--data", o->data, "a task (mqar, multihop, niah, copy, selective_copy, parity, s5, induction) or brown")->required();
  cmd->add_option("--out", o->out, "checkpoint / model directory")->required();
  cmd->add_option("--steps", o->steps, "optimizer steps")->default_val(200);
  cmd->add_option("--batch", o->batch, "sequences per micro-batch")->default_val(16);
  cmd->add_option("--accum", o->accum, "micro-batches per step (gradient accumulation)")->default_val(1);
  cmd->add_option("--lr", o->lr, "peak learning rate")->default_val(1e-3);
  cmd->add_option("--warmup", o->warmup, "warmup steps (default 5% of steps)");
  cmd->add_option("--weight-decay", o->wd, "AdamW weight decay (not on norms, biases, embeddings, gates)")->default_val(0.1);
  cmd->add_option("--clip", o->clip, "gradient clipping norm (0 = off)")->default_val(1.0);
  cmd->add_option("--seed", o->seed, "seed of the initial weights and of the data")->default_val(0);
  cmd->add_option("--preset", o->preset, "task generator parameters: smoke or standard")->default_val("smoke");
  cmd->add_option("--seq-len", o->seq_len, "window length for brown (bytes)")->default_val(128);
  cmd->add_option("--dsa-warmup", o->dsa_warmup, "fraction of steps with dense attention in sparse layers")->default_val(0.1);
  cmd->add_option("--ckpt-every", o->ckpt_every, "checkpoint every N steps (always at the end)")->default_val(0);
  cmd->add_option("--log-every", o->log_every, "progress line every N steps")->default_val(10);
  cmd->add_option("--eval-examples", o->eval_n, "held-out examples per test level evaluated at the end")->default_val(200);
  cmd->add_option("--device", o->device, "cpu, or cuda: the GDN/KDA layers' delta-rule op runs on the GPU, the rest on the CPU")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--resume", o->resume, "continue from the latest checkpoint in --out");
  cmd->callback([o] {
    check(o->steps > 0 && o->batch > 0 && o->accum > 0, "--steps, --batch and --accum must be positive");
    Config cfg = Config::load(o->config);
    nlohmann::json j = cfg.raw();
    const bool brown = o->data == "brown";
    std::unique_ptr<eval::Task> task;
    std::unique_ptr<eval::TaskData> data;
    eval::BrownCorpus corpus;
    int64_t vocab = 256;
    if (brown) {
      corpus = eval::BrownCorpus::load(eval::BrownCorpus::default_dir());
    } else {
      task = eval::make_task(o->data, o->preset);
      data = std::make_unique<eval::TaskData>(*task, o->seed, o->eval_n, o->steps);
      vocab = task->vocab;
    }
    if (!j.contains("vocab_size")) j["vocab_size"] = vocab;
    check(j["vocab_size"].is_number_integer() && j["vocab_size"].get<int64_t>() >= vocab,
          o->config + ": field 'vocab_size' must be at least " + std::to_string(vocab) + " for --data " + o->data);
    const ModelSpec spec = parse_model_spec(Config(j, o->config));
    std::map<std::string, Tensor> init;
    Model::random(spec, o->seed, &init);
    train::TrainModel<float> model(spec, [&](const std::string& n) { return init.at(n); });
    if (o->device == "cuda") {
#ifdef HLA_HAS_CUDA
      check(cuda::device_available(), "--device cuda: no CUDA device found");
      model.set_delta_rule_kernels(&cuda::delta_rule_training_kernels());
#else
      throw Error("--device cuda: this build has no CUDA backend (build with -DHLA_CUDA=ON)");
#endif
    }
    std::fprintf(stderr, "hla train: %s on %s, %lld layers, %.2fM parameters\n", spec.model_type.c_str(), o->data.c_str(),
                 (long long)spec.n_layers, double(Model::count_params(spec, nullptr)) / 1e6);
    train::TrainOptions t;
    t.out = o->out, t.steps = o->steps, t.accum = o->accum, t.resume = o->resume, t.dsa_warmup = o->dsa_warmup;
    t.log_every = o->log_every, t.ckpt_every = o->ckpt_every;
    t.optim.lr = o->lr, t.optim.weight_decay = o->wd, t.optim.clip = o->clip;
    t.optim.warmup = o->warmup >= 0 ? o->warmup : std::max<int64_t>(1, o->steps / 20);
    train::MicroBatchFn micro = [&](int64_t step, int64_t i) {
      return brown ? eval::text_batch(corpus.train, o->seed, step, i, o->batch, o->seq_len)
                   : data->train_batch(step, i, o->batch);
    };
    const auto r = train::train_loop(model, j, t, micro);
    std::fprintf(stderr, "hla train: %lld steps in %.1f s (%.0f tokens/s), wrote %s\n", (long long)(o->steps - r.start_step),
                 r.seconds, double(r.tokens) / std::max(r.seconds, 1e-9), o->out.c_str());
    if (brown) {
      std::printf("brown held-out perplexity per byte: %.3f\n", eval::text_perplexity(model, corpus.test, o->seq_len, 64));
    } else {
      for (int64_t level : task->test_levels)
        std::printf("%s %s=%lld accuracy %.4f\n", task->name.c_str(), task->level_name.c_str(), (long long)level,
                    data->evaluate(model, level));
    }
  });
}

}  // namespace hla::cli
