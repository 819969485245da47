// Tokenizer encoding speed on one core, in MB/s of UTF-8 input.
//   bench_tokenizer MODEL_DIR [FILE...]
// Without files the corpus is this repository's sources and notes (English prose and C++) plus
// generated multilingual text (Chinese, Japanese, Korean, Russian, Arabic, Hindi, emoji, numbers).
// Each corpus is encoded twice with a fresh tokenizer: "cold" starts with an empty word cache,
// "warm" shows the steady state of a long-running server.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "text/tokenizer.h"

namespace fs = std::filesystem;

namespace {

std::string read(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string repo_text() {
  std::string out;
  for (const char* dir : {"src", "research", "tests", "bench"}) {
    const fs::path root = fs::path(HLA_SOURCE_DIR) / dir;
    if (!fs::exists(root)) continue;
    for (const auto& e : fs::recursive_directory_iterator(root)) {
      const auto ext = e.path().extension();
      if (e.is_regular_file() && (ext == ".md" || ext == ".cpp" || ext == ".h" || ext == ".cu") &&
          e.path().string().find("node_modules") == std::string::npos && e.path().filename() != "unicode_data.inc")
        out += read(e.path());
    }
  }
  return out;
}

std::string multilingual(size_t bytes) {
  static const char* kPhrases[] = {
      "人工智能正在改变世界。", "大型语言模型可以生成文本，也可以回答问题。", "今日はいい天気ですね。", "東京の空は青い。",
      "안녕하세요, 오늘 날씨가 좋네요.", "Съешь же ещё этих мягких французских булок, да выпей чаю.",
      "مرحبا بالعالم، كيف حالك اليوم؟", "नमस्ते दुनिया, आज मौसम अच्छा है।", "Ελληνικά κείμενα εδώ.",
      "The model reads long contexts cheaply.", "😀 👍🏽 👨‍👩‍👧", "Xin chào thế giới!"};
  std::mt19937 rng(7);
  std::string out;
  while (out.size() < bytes) {
    out += kPhrases[rng() % std::size(kPhrases)];
    if (rng() % 4 == 0) out += " " + std::to_string(rng() % 100000) + " ";
    if (rng() % 8 == 0) out += "\n";
  }
  return out;
}

void bench(const std::string& model, const std::string& name, const std::string& text) {
  const auto tok = hla::Tokenizer::load(model);
  for (const char* pass : {"cold", "warm"}) {
    const auto t0 = std::chrono::steady_clock::now();
    size_t n = 0;
    // Line by line, as requests and documents arrive: the cache carries over between calls.
    for (size_t i = 0; i < text.size();) {
      size_t j = text.find('\n', i);
      j = j == std::string::npos ? text.size() : j + 1;
      n += tok->encode(std::string_view(text).substr(i, j - i)).size();
      i = j;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-14s %-5s %8.2f MB  %9zu tokens  %7.3f s  %7.2f MB/s\n", name.c_str(), pass, text.size() / 1e6, n, s,
                text.size() / 1e6 / s);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_tokenizer MODEL_DIR [FILE...]\n");
    return 2;
  }
  try {
    if (argc > 2) {
      std::string text;
      for (int i = 2; i < argc; ++i) text += read(argv[i]);
      bench(argv[1], "files", text);
    } else {
      bench(argv[1], "repository", repo_text());
      bench(argv[1], "multilingual", multilingual(4 << 20));
    }
  } catch (const hla::Error& e) {
    std::fprintf(stderr, "bench_tokenizer: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
