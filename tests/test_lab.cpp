// The lab's pieces: task generators (labels follow the task's definition), held-out splits, the
// optimizer's no-decay rule and schedule, checkpoint + resume equals an uninterrupted run, the PNG
// writer, and `hla train` producing a model directory that `hla generate` loads.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <set>

#include "eval/data.h"
#include "eval/lab.h"
#include "eval/plot.h"
#include "eval/tasks.h"
#include "model/model.h"
#include "tests/common.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

using namespace hla;
using namespace hla::eval;

TEST(LabTasks, MqarLabelsAreTheValuesBoundInTheContext) {
  auto t = make_task("mqar", "standard");
  std::mt19937_64 rng(1);
  for (int64_t N : t->test_levels) {
    Example e = t->sample(rng, N, true);
    std::map<int64_t, int64_t> bound;
    for (int64_t i = 0; i < N; ++i) bound[e.ids[size_t(2 * i)]] = e.ids[size_t(2 * i + 1)];
    ASSERT_EQ(int64_t(bound.size()), N);  // distinct keys
    int64_t labelled = 0;
    for (size_t p = 0; p < e.ids.size(); ++p)
      if (e.labels[p] >= 0) {
        ++labelled;
        ASSERT_EQ(bound.at(e.ids[p]), e.labels[p]);
        ASSERT_EQ(e.ids[p + 1], e.labels[p]);  // the value follows the query key
      }
    EXPECT_EQ(labelled, N);
  }
}

TEST(LabTasks, ParityS5AndMultiHopLabels) {
  std::mt19937_64 rng(2);
  Example p = make_task("parity", "smoke")->sample(rng, 17, false);
  int64_t par = 0;
  for (size_t i = 0; i < p.ids.size(); ++i) {
    par ^= p.ids[i] - 4;
    ASSERT_EQ(p.labels[i], 4 + par);
  }
  Example pt = make_task("parity", "smoke")->sample(rng, 17, true);
  EXPECT_EQ(std::count_if(pt.labels.begin(), pt.labels.end(), [](int64_t l) { return l >= 0; }), 1);

  auto mh = make_task("multihop", "smoke");
  Example m = mh->sample(rng, 3, false);
  std::map<int64_t, int64_t> next;
  size_t i = 0;
  for (; m.ids[i] != 1; i += 2) next[m.ids[i]] = m.ids[i + 1];  // edges up to SEP
  EXPECT_EQ(m.ids[i + 1], 3 + 3);                                 // HOP_3
  for (size_t q = i + 2; q < m.ids.size(); q += 2) {
    int64_t x = m.ids[q];
    for (int h = 0; h < 3; ++h) x = next.at(x);
    EXPECT_EQ(m.labels[q], x);
  }
}

// A task with a tiny example space, so training draws hit test examples often.
struct TinyTask : Task {
  TinyTask() { name = "tiny", level_name = "length", train_levels = {3}, test_levels = {3}, vocab = 6; }
  Example sample(std::mt19937_64& rng, int64_t n, bool) const override {
    Example e;
    for (int64_t i = 0; i < n; ++i) e.ids.push_back(4 + int64_t(rng() & 1)), e.labels.push_back(4);
    return e;
  }
};

TEST(LabData, TrainingNeverSeesATestSequence) {
  TinyTask t;
  TaskData d(t, 0, 3);  // 3 of the 8 possible sequences held out
  std::set<std::vector<int64_t>> test;
  for (auto& e : d.test_set(3)) test.insert(e.ids);
  std::set<std::vector<int64_t>> seen;
  for (int64_t step = 0; step < 50; ++step) {
    train::Batch b = d.train_batch(step, 0, 4);
    for (size_t s = 0; s + 1 < b.cu_seqlens.size(); ++s) {
      std::vector<int64_t> ids(b.ids.begin() + b.cu_seqlens[s], b.ids.begin() + b.cu_seqlens[s + 1]);
      ASSERT_FALSE(test.count(ids));
      seen.insert(ids);
    }
  }
  EXPECT_EQ(seen.size() + test.size(), 8u);  // every other sequence does occur
}

// Multi-hop's curriculum: with 100 training steps, hop counts 1, ≤ 2, ≤ 3, ≤ 4 over the quarters
// (the HOP_h token, 3 + h, follows SEP); without a step count every hop count from the start.
TEST(LabData, CurriculumUnlocksHopCountsInOrder) {
  const auto task = make_task("multihop", "smoke");
  ASSERT_TRUE(task->curriculum);
  auto hops_in = [](const train::Batch& b) {
    std::set<int64_t> hops;
    for (size_t t = 0; t + 1 < b.ids.size(); ++t)
      if (b.ids[t] == 1) hops.insert(b.ids[t + 1] - 3);
    return hops;
  };
  const TaskData d(*task, 0, 4, 100);
  for (auto [step, most] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {24, 1}, {25, 2}, {60, 3}, {99, 4}}) {
    const std::set<int64_t> hops = hops_in(d.train_batch(step, 0, 64));
    EXPECT_EQ(*hops.begin(), 1) << "step " << step;
    EXPECT_EQ(*hops.rbegin(), most) << "step " << step;
  }
  const TaskData all(*task, 0, 4);
  EXPECT_EQ(hops_in(all.train_batch(0, 0, 64)), (std::set<int64_t>{1, 2, 3, 4}));
}

TEST(LabOptim, ScheduleAndNoDecayRule) {
  train::OptimConfig c;
  c.lr = 1.0, c.warmup = 10, c.total = 110, c.min_lr_ratio = 0.1;
  EXPECT_NEAR(train::lr_at(c, 0), 0.1, 1e-12);
  EXPECT_NEAR(train::lr_at(c, 9), 1.0, 1e-12);
  EXPECT_NEAR(train::lr_at(c, 60), 0.55, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(train::lr_at(c, 110), 0.1, 1e-12);
  train::Param<float> mat, norm;
  mat.name = "w", mat.w = {1.0f}, mat.g = {0.0f}, mat.decay = true;
  norm.name = "n", norm.w = {1.0f}, norm.g = {0.0f}, norm.decay = false;
  c.weight_decay = 0.5;
  train::AdamW opt(c);
  opt.step({&mat, &norm});
  EXPECT_NEAR(mat.w[0], 1.0f - 0.1f * 0.5f, 1e-6);  // decayed by lr·wd with a zero gradient
  EXPECT_EQ(norm.w[0], 1.0f);
}

namespace {
nlohmann::json tiny_cfg() {
  return {{"model_type", "hla_hybrid"}, {"vocab_size", 6}, {"hidden_size", 16}, {"num_hidden_layers", 2},
          {"layer_pattern", "KA"}, {"intermediate_size", 32}, {"num_attention_heads", 2}, {"head_dim", 8},
          {"linear_num_value_heads", 2}, {"linear_key_head_dim", 8}, {"tie_word_embeddings", true}};
}
}  // namespace

// Killing a run and resuming gives the weights and loss curve of an uninterrupted run.
TEST(LabTrain, ResumeEqualsUninterruptedRun) {
  TinyTask task;
  TaskData data(task, 1, 2);
  const ModelSpec spec = parse_model_spec(Config(tiny_cfg(), "cfg"));
  std::map<std::string, Tensor> init;
  Model::random(spec, 4, &init);
  auto run = [&](const std::string& out, int64_t steps, bool resume) {
    train::TrainModel<float> m(spec, [&](const std::string& n) { return init.at(n); });
    train::TrainOptions o;
    o.out = out, o.steps = steps, o.resume = resume, o.log_every = 0, o.optim.warmup = 2;
    auto r = train::train_loop(m, tiny_cfg(), o, [&](int64_t s, int64_t i) { return data.train_batch(s, i, 4); });
    return std::make_pair(m.export_weights(), r);
  };
  TempDir a;
  auto [wa, ra] = run(a.str(), 6, false);
  // A run killed during step 4 (after its step-3 checkpoint), then re-run with the same arguments
  // and --resume. (OpenBLAS's float GEMM rounding varies with buffer alignment, so two runs agree
  // to round-off, not bit for bit.)
  TempDir c;
  {
    train::TrainModel<float> m(spec, [&](const std::string& n) { return init.at(n); });
    train::TrainOptions o;
    o.out = c.str(), o.steps = 6, o.log_every = 0, o.optim.warmup = 2, o.ckpt_every = 3;
    int64_t calls = 0;
    try {
      train::train_loop(m, tiny_cfg(), o, [&](int64_t s, int64_t i) {
        if (++calls > 4) throw std::runtime_error("killed");  // dies during step 4, after the step-3 checkpoint
        return data.train_batch(s, i, 4);
      });
    } catch (const std::runtime_error&) {
    }
  }
  auto [wc, rc] = run(c.str(), 6, true);
  EXPECT_EQ(rc.start_step, 3);
  ASSERT_EQ(rc.curve.size(), ra.curve.size());
  for (size_t i = 0; i < ra.curve.size(); ++i) EXPECT_NEAR(rc.curve[i].second, ra.curve[i].second, 1e-5) << i;
  for (auto& [name, t] : wa)
    for (int64_t i = 0; i < t.numel(); ++i) ASSERT_NEAR(t.f32()[i], wc.at(name).f32()[i], 1e-5) << name;
  EXPECT_TRUE(std::filesystem::exists(c / "model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(c / "checkpoints/step-00000006.tmp"));
}

TEST(LabPlot, PngIsWellFormed) {
  TempDir d;
  line_plot(d / "p.png", "title 1.5", "pairs", "accuracy", {{"a", {1, 2, 4}, {0.1, 0.5, 0.9}}, {"b", {1, 2, 4}, {1, 1, 0}}}, true);
  const std::string png = read_file(d / "p.png");
  ASSERT_GT(png.size(), 100u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  EXPECT_EQ(png.substr(png.size() - 8, 4), "IEND");
  EXPECT_LT(png.size(), 720u * 440u * 3u / 4u);  // the run-length deflate compresses
}

TEST(LabCli, TrainWritesAModelThatGenerateLoads) {
  TempDir d;
  std::ofstream(d / "cfg.json") << tiny_cfg().dump();
  std::string out;
  ASSERT_EQ(run_command(cli_path() + " train --config " + (d / "cfg.json") + " --data parity --out " + (d / "m") +
                            " --steps 3 --batch 2 --eval-examples 2",
                        &out),
            0)
      << out;
  EXPECT_NE(out.find("parity length=32 accuracy"), std::string::npos) << out;
  ASSERT_EQ(run_command(cli_path() + " generate --model " + (d / "m") + " --prompt-ids 4,5,4 --max-new-tokens 3 --temperature 0", &out), 0)
      << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), ' '), 2) << out;
  EXPECT_NE(run_command(cli_path() + " train --config " + (d / "cfg.json") + " --data nosuchtask --out " + (d / "x"), &out), 0);
  EXPECT_NE(out.find("unknown task"), std::string::npos) << out;
  EXPECT_NE(
      run_command(cli_path() + " train --config " + (d / "cfg.json") + " --data parity --lr -0.01 --out " + (d / "x"),
                  &out),
      0);
  EXPECT_NE(out.find("learning rate -0.01"), std::string::npos) << out;
  // --device cuda trains where CUDA is built in and a GPU is present, else fails with one clear line.
  if (run_command(cli_path() + " train --config " + (d / "cfg.json") +
                      " --data parity --device cuda --steps 1 --batch 2 --eval-examples 2 --out " + (d / "y"),
                  &out) != 0)
    EXPECT_NE(out.find("--device cuda: "), std::string::npos) << out;
  else
    EXPECT_NE(out.find("parity length=32 accuracy"), std::string::npos) << out;
}

// `kill -9` of the real binary at three moments of a run that checkpoints every step (so kills land
// inside checkpoint writes too), then --resume: the run finishes from its last good checkpoint and
// its loss curve equals the uninterrupted run's (to OpenBLAS round-off, see above).
TEST(LabCli, KillNineThenResumeMatchesUninterruptedRun) {
  TempDir d;
  std::ofstream(d / "cfg.json") << tiny_cfg().dump();
  const std::string args = " train --config " + (d / "cfg.json") +
                           " --data parity --steps 120 --batch 4 --ckpt-every 1 --log-every 0 --eval-examples 2 --out ";
  std::string out;
  ASSERT_EQ(run_command(cli_path() + args + (d / "a"), &out), 0) << out;
  const std::string latest = d / "b/checkpoints/latest";
  int kills = 0;
  std::string last_seen;
  for (int k = 0; k < 3; ++k) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const std::string cmd = "exec " + cli_path() + args + (d / "b") + (k ? " --resume" : "") + " >/dev/null 2>&1";
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    // Kill once this run has written a checkpoint of its own, a few milliseconds later each time.
    for (int waited = 0; waited < 30000; ++waited) {
      if (std::filesystem::exists(latest) && read_file(latest) != last_seen) break;
      usleep(1000);
    }
    usleep(useconds_t(1000 + 3000 * k));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    kills += WIFSIGNALED(status);
    last_seen = read_file(latest);
  }
  ASSERT_GE(kills, 1) << "every run finished before its kill";
  ASSERT_EQ(run_command(cli_path() + args + (d / "b") + " --resume", &out), 0) << out;
  EXPECT_NE(out.find("resumed from step"), std::string::npos) << out;
  auto curve = [&](const std::string& run) {
    std::ifstream f(d / (run + "/checkpoints/step-00000120/trainer_state.json"));
    return nlohmann::json::parse(f).at("curve");
  };
  const auto ca = curve("a"), cb = curve("b");
  ASSERT_EQ(ca.size(), 120u);
  ASSERT_EQ(cb.size(), ca.size());
  for (size_t i = 0; i < ca.size(); ++i) {
    EXPECT_EQ(cb[i][0], ca[i][0]);
    EXPECT_NEAR(cb[i][1].get<double>(), ca[i][1].get<double>(), 1e-4) << "step " << i;
  }
}

// `hla lab` end to end on a few steps: report, results.json in the schema (one record per
// task, difficulty, layout, size, seed), plots; a bad layout name is one clear line.
TEST(LabCli, LabWritesReportResultsAndPlots) {
  TempDir d;
  std::string out;
  ASSERT_EQ(run_command(cli_path() +
                            " lab --preset smoke --layouts attention,gdn --steps 3 --lrs 0.002 "
                            "--neg-eigval --lin-dim 8 --out " +
                            (d / "lab"),
                        &out),
            0)
      << out;
  const auto results = nlohmann::json::parse(read_file(d / "lab/results.json"));
  ASSERT_EQ(results.size(), 6u);  // 2 layouts x 3 pair counts
  std::set<std::string> layouts;
  for (const auto& r : results) {
    EXPECT_EQ(r.size(), 7u) << r.dump();
    EXPECT_EQ(r.at("task"), "mqar");
    EXPECT_EQ(r.at("metric"), "accuracy");
    EXPECT_EQ(r.at("size"), "s");
    const double v = r.at("value").get<double>();
    EXPECT_TRUE(v >= 0 && v <= 1) << v;
    layouts.insert(r.at("layout").get<std::string>());
  }
  EXPECT_EQ(layouts, (std::set<std::string>{"attention", "gdn"}));
  const std::string report = read_file(d / "lab/report.md");
  EXPECT_NE(report.find("| attention |"), std::string::npos) << report;
  EXPECT_NE(report.find("Pure linear layouts fall behind full attention"), std::string::npos);
  EXPECT_NE(report.find("learning rates {0.002}"), std::string::npos) << report;
  EXPECT_NE(report.find("β ∈ [0, 2], negative eigenvalues"), std::string::npos) << report;
  EXPECT_NE(report.find("linear 2 heads × 8 (state 128 floats per layer"), std::string::npos) << report;
  for (const char* png : {"plots/mqar_s_accuracy.png", "plots/mqar_s_training.png"})
    EXPECT_EQ(read_file(d / (std::string("lab/") + png)).substr(1, 3), "PNG") << png;
  EXPECT_NE(run_command(cli_path() + " lab --layouts nosuch --out " + (d / "x"), &out), 0);
  EXPECT_NE(out.find("unknown layout 'nosuch'"), std::string::npos) << out;
  EXPECT_NE(run_command(cli_path() + " lab --lrs 0.001,-1 --out " + (d / "x"), &out), 0);
  EXPECT_NE(out.find("learning rate -1"), std::string::npos) << out;
  EXPECT_NE(run_command(cli_path() + " lab --lin-dim -4 --out " + (d / "x"), &out), 0);
  EXPECT_NE(out.find("--lin-dim must be positive (got -4)"), std::string::npos) << out;
  EXPECT_NE(run_command(cli_path() + " lab --dsa-topk 0 --out " + (d / "x"), &out), 0);
  EXPECT_NE(out.find("--dsa-topk must be positive (got 0)"), std::string::npos) << out;
  for (const char* opt : {"--lin-dim", "--steps", "--seeds"}) {  // 0 is not "the preset's"
    EXPECT_NE(run_command(cli_path() + " lab " + opt + " 0 --out " + (d / "x"), &out), 0) << opt;
    EXPECT_NE(out.find(std::string(opt) + " must be positive (got 0)"), std::string::npos) << out;
  }
  EXPECT_FALSE(std::filesystem::exists(d / "x/results.json"));
  // the lab's configs carry the flag to every delta-rule layer
  const eval::LabSize size = eval::lab_preset("smoke").sizes[0];
  for (bool neg : {false, true})
    EXPECT_EQ(parse_model_spec(Config(eval::lab_model_config("kda-3:1", size, 8, neg), "lab")).beta_max,
              neg ? 2.0f : 1.0f);
}

// The demo model shipped in the repository (trained by hla on Brown) loads and writes text, and
// predicts held-out English far better than chance (256 byte values).
TEST(LabDemo, ShippedModelWritesEnglishBytes) {
  const std::string dir = (std::filesystem::path(__FILE__).parent_path().parent_path() / "models/brown-hybrid").string();
  ASSERT_TRUE(std::filesystem::exists(dir + "/model.safetensors")) << dir;
  std::string out;
  ASSERT_EQ(run_command(cli_path() + " generate --model " + dir + " --prompt 'The jury said that' --max-new-tokens 40 --temperature 0", &out), 0)
      << out;
  int letters = 0;
  for (char c : out) letters += std::isalpha(static_cast<unsigned char>(c)) || c == ' ';
  EXPECT_GT(letters, 30) << out;
  const ModelSpec spec = load_model_spec(dir);
  Checkpoint ck(dir);
  train::TrainModel<float> m(spec, [&](const std::string& n) { return ck.get(n); });
  const std::string text = "The committee said that the county would hold an election in the fall, and the mayor agreed.";
  EXPECT_LT(text_perplexity(m, text, int64_t(text.size()) - 2, 1), 12.0);
}
