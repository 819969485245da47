// Config: typed, checked access to a config.json (or one object nested in it). Every failed lookup
// throws hla::Error naming the file and the field, e.g.
//   "models/x/config.json: field 'text_config.num_attention_heads' must be an integer".
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace hla {

class Config {
 public:
  Config() = default;
  Config(nlohmann::json j, std::string file, std::string prefix = "")
      : j_(std::move(j)), file_(std::move(file)), prefix_(std::move(prefix)) {}
  static Config load(const std::string& path);
  static Config parse(const std::string& text, const std::string& label);

  // Present and not null.
  bool has(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t dflt) const;
  double get_double(const std::string& key) const;
  double get_double(const std::string& key, double dflt) const;
  bool get_bool(const std::string& key, bool dflt) const;
  std::string get_string(const std::string& key) const;
  std::string get_string(const std::string& key, const std::string& dflt) const;
  std::vector<int64_t> get_int_list(const std::string& key) const;
  std::vector<std::string> get_string_list(const std::string& key) const;
  Config sub(const std::string& key) const;  // a nested object

  // A new error naming this field: "file: field 'prefix.key' <what>".
  std::string field_error(const std::string& key, const std::string& what) const;
  const nlohmann::json& raw() const { return j_; }
  const std::string& file() const { return file_; }

 private:
  const nlohmann::json& need(const std::string& key) const;
  nlohmann::json j_ = nlohmann::json::object();
  std::string file_, prefix_;
};

}  // namespace hla
