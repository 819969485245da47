// Helpers shared by the tests: fixture paths, temporary directories, file I/O, error metrics.
#pragma once
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>

#include "core/tensor.h"

namespace hla {

// Fixtures are read in place from ../shared/fixtures (HLA_FIXTURES overrides at run time).
inline std::string fixture(const std::string& rel) {
  const char* env = std::getenv("HLA_FIXTURES");
  return std::string(env ? env : HLA_FIXTURES_DEFAULT) + "/" + rel;
}
inline bool have_fixtures() { return std::filesystem::exists(fixture("models")); }
#define HLA_REQUIRE_FIXTURES() \
  if (!::hla::have_fixtures()) GTEST_SKIP() << "fixtures not found at " << ::hla::fixture("")

inline std::string cli_path() { return HLA_CLI_PATH; }

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "hla-test-XXXXXX").string();
    path = mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  std::string str() const { return path.string(); }
};

inline std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
inline void write_file(const std::string& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// ||a - b||_2 / ||b||_2 over all elements (any dtypes).
inline double rel_l2(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    double d = a.flat(i) - b.flat(i);
    num += d * d;
    den += b.flat(i) * b.flat(i);
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}
// max|a - b| / max|b|: the fixtures' logit metric.
inline double max_rel(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    num = std::max(num, std::fabs(a.flat(i) - b.flat(i)));
    den = std::max(den, std::fabs(b.flat(i)));
  }
  return num / (den > 0 ? den : 1);
}

// Runs a shell command, returns its exit code; stdout/stderr captured into *out if given.
inline int run_command(const std::string& cmd, std::string* out = nullptr) {
  TempDir d;
  std::string log = d / "log";
  int rc = std::system((cmd + " >" + log + " 2>&1").c_str());
  if (out) *out = read_file(log);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

// A tiny hla_hybrid config over `pattern` (K kda, G gdn, L lightning, A attention, W sliding, S sparse).
// attn_conv: the attention layers' short conv kernel (0 = plain attention).
// neg_eigval: the delta-rule layers' beta in [0, 2].
inline nlohmann::json tiny_hybrid_config(const std::string& pattern, bool tie = true, int64_t attn_conv = 0,
                                         bool neg_eigval = false) {
  return {{"linear_allow_neg_eigval", neg_eigval},
          {"attention_conv_kernel_dim", attn_conv},
          {"model_type", "hla_hybrid"},
          {"vocab_size", 23},
          {"hidden_size", 16},
          {"num_hidden_layers", int64_t(pattern.size())},
          {"layer_pattern", pattern},
          {"intermediate_size", 24},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 6},
          {"partial_rotary_factor", 0.67},
          {"sliding_window", 3},
          {"index_n_heads", 2},
          {"index_head_dim", 4},
          {"index_topk", 4},
          {"linear_num_value_heads", 2},
          {"linear_key_head_dim", 4},
          {"linear_conv_kernel_dim", 3},
          {"tie_word_embeddings", tie}};
}

}  // namespace hla
