#include "core/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace hla {

using json = nlohmann::json;

Config Config::load(const std::string& path) {
  std::ifstream in(path);
  check(bool(in), path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

Config Config::parse(const std::string& text, const std::string& label) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(label + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  check(j.is_object(), label + ": top level is not a JSON object");
  return Config(std::move(j), label);
}

std::string Config::field_error(const std::string& key, const std::string& what) const {
  return file_ + ": field '" + prefix_ + key + "' " + what;
}

bool Config::has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

const json& Config::need(const std::string& key) const {
  check(has(key), field_error(key, "is missing"));
  return j_[key];
}

static bool integral(const json& v) {
  return v.is_number_integer() || (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
                                   std::fabs(v.get<double>()) < 9e15);
}

int64_t Config::get_int(const std::string& key) const {
  const json& v = need(key);
  check(integral(v), field_error(key, "must be an integer"));
  return v.is_number_integer() ? v.get<int64_t>() : int64_t(v.get<double>());
}
int64_t Config::get_int(const std::string& key, int64_t dflt) const { return has(key) ? get_int(key) : dflt; }

double Config::get_double(const std::string& key) const {
  const json& v = need(key);
  check(v.is_number(), field_error(key, "must be a number"));
  return v.get<double>();
}
double Config::get_double(const std::string& key, double dflt) const {
  return has(key) ? get_double(key) : dflt;
}

bool Config::get_bool(const std::string& key, bool dflt) const {
  if (!has(key)) return dflt;
  check(j_[key].is_boolean(), field_error(key, "must be true or false"));
  return j_[key].get<bool>();
}

std::string Config::get_string(const std::string& key) const {
  const json& v = need(key);
  check(v.is_string(), field_error(key, "must be a string"));
  return v.get<std::string>();
}
std::string Config::get_string(const std::string& key, const std::string& dflt) const {
  return has(key) ? get_string(key) : dflt;
}

std::vector<int64_t> Config::get_int_list(const std::string& key) const {
  const json& v = need(key);
  check(v.is_array(), field_error(key, "must be a list of integers"));
  std::vector<int64_t> r;
  for (auto& e : v) {
    check(integral(e), field_error(key, "must be a list of integers"));
    r.push_back(e.is_number_integer() ? e.get<int64_t>() : int64_t(e.get<double>()));
  }
  return r;
}

std::vector<std::string> Config::get_string_list(const std::string& key) const {
  const json& v = need(key);
  check(v.is_array(), field_error(key, "must be a list of strings"));
  std::vector<std::string> r;
  for (auto& e : v) {
    check(e.is_string(), field_error(key, "must be a list of strings"));
    r.push_back(e.get<std::string>());
  }
  return r;
}

Config Config::sub(const std::string& key) const {
  const json& v = need(key);
  check(v.is_object(), field_error(key, "must be an object"));
  return Config(v, file_, prefix_ + key + ".");
}

}  // namespace hla
